"""The step-label DataModule: Monte-Carlo prefix labels (``pavlit label`` output) → batches for the PAV.

What one training example is. The labelling stage writes one record per prefix. Prefixes of the same seed rollout
are grouped into **one** example: ``prompt + "".join(deepest steps)`` is tokenised once with
:func:`pavlit.steps.step_end_token_indices` and the soft label ``q_mc`` of prefix ``h`` sits at that prefix's end
token (``h = 0``, the question-only prefix, at the prompt's last token or BOS); every other position is ignored.
This is the same tokenisation search and RL use at inference, so a label and a score can never disagree about
where a step ends, and one forward pass scores all ``H + 1`` prefixes.

Choices (each documented, each configurable):

* **Split by problem**: a problem goes to validation when a hash of ``(seed, problem_id)`` falls below
  ``val_fraction`` (deterministic, independent of file order and stable as problems are added); every prefix and
  rollout of a problem stays on one side, so no prefix of a validation problem is ever trained on.
* **Class balance** (docs/method.md §4, over ``q < 0.5`` vs ``q ≥ 0.5``) is a per-label loss **weight**, not a sampler:
  an example is a whole rollout holding labels of both classes, so a sampler cannot balance labels, while weights
  ``N / (2 n_class)`` from the training labels give each class half of the loss — what balanced sampling of
  prefixes gives in expectation, without dropping or repeating any data. Validation metrics are unweighted.
* **Dedupe**: a record repeated within one rollout (a re-run shard, a file given twice) is dropped; the same
  rollout's prefix with *other* labels (two label jobs mixed into one dataset) is a bad record, never silently
  dropped; identical ``(problem_id, policy, steps)`` prefixes of *different* rollouts (the shared question-only
  prefix, a common first step) are pooled — their raw counts add up, ``q = Σ n_correct / Σ n_rollouts`` — and
  labelled once, at their first occurrence.
* **Too long**: a rollout longer than ``max_length`` tokens is cut at the last step boundary that fits, keeping the
  labels that fit (counted and logged); a prompt that alone does not fit is a bad record.
* **Bad records** (missing fields, labels outside [0, 1] or NaN, empty steps, inconsistent prefixes, prompts longer
  than the model allows) raise ``ValueError`` naming ``file:line`` with ``on_bad_record="error"``, or are counted
  and logged with ``"skip"``; never dropped silently. ``stats`` holds every count.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pavlit.data.loading import (
    ResumableSampler,
    keep_settings,
    pad_id_of,
    resume_offset,
    setup_once,
    start_prepare,
    train_loader,
    val_loader,
)
from pavlit.data.reading import BadRecords, OnBadRecord, iter_records, valid_step_records
from pavlit.data.rollouts import Rollout, group_rollouts, is_validation_problem, split_problems, truncate_at_step
from pavlit.modules.losses import balance_weights
from pavlit.steps import StepTokens, pad_step_batch, step_end_token_indices

# Reading (pavlit.data.reading), rollouts (pavlit.data.rollouts) and loading (pavlit.data.loading) have files of
# their own; their names stay importable from here, where they were first.
__all__ = [
    "BadRecords",
    "OnBadRecord",
    "ResumableSampler",
    "StepExample",
    "StepLabelCollator",
    "StepLabelDataModule",
    "group_rollouts",
    "iter_records",
    "is_validation_problem",
    "pad_id_of",
    "resume_offset",
    "split_problems",
    "truncate_at_step",
    "valid_step_records",
]

log = logging.getLogger(__name__)


# --- examples and batches ---------------------------------------------------------------------------------------


@dataclass
class StepExample:
    """One tokenised rollout with its prefix labels.

    Attributes:
        tokens: The tokenised rollout (truncated at a step boundary if it was too long).
        q: ``H + 1`` soft labels, NaN where the prefix has no label.
        outcome: The seed rollout's outcome (0/1), the target of the per-step outcome AUROC.
        problem_id: The problem (kept for split checks and debugging).
    """

    tokens: StepTokens
    q: list[float]
    outcome: float
    problem_id: str


@dataclass
class StepLabelCollator:
    """Pads examples into a batch (picklable, so it works with worker processes).

    The batch is a dict of tensors: ``input_ids``, ``attention_mask`` ``[B, T]``; ``positions`` ``[B, H+1]``
    (column 0 the question-only prefix); ``label_mask``, ``q``, ``weight``, ``outcome`` ``[B, H+1]``.

    Args:
        pad_id: The tokenizer's pad id.
        weight_low: Loss weight of labels with q < 0.5.
        weight_high: Loss weight of labels with q ≥ 0.5.
    """

    pad_id: int
    weight_low: float = 1.0
    weight_high: float = 1.0

    def __call__(self, examples: Sequence[StepExample]) -> dict[str, torch.Tensor]:
        batch = pad_step_batch([e.tokens for e in examples], self.pad_id, side="right")
        width = batch.prefix_positions.shape[1]
        q = torch.full((len(examples), width), float("nan"))
        for row, example in enumerate(examples):
            q[row, : len(example.q)] = torch.tensor(example.q, dtype=torch.float32)
        label_mask = batch.prefix_mask & ~torch.isnan(q)
        q = torch.where(label_mask, q, torch.zeros_like(q))
        weight = torch.where(q < 0.5, self.weight_low, self.weight_high) * label_mask
        outcome = torch.tensor([e.outcome for e in examples], dtype=torch.float32)[:, None].expand(-1, width)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "positions": batch.prefix_positions,
            "label_mask": label_mask,
            "q": q,
            "weight": weight,
            "outcome": outcome.contiguous(),
        }


# --- the DataModule ---------------------------------------------------------------------------------------------


class StepLabelDataModule(LightningDataModule):
    """Monte-Carlo step labels (docs/method.md §3) for training a process verifier (:class:`PAVModule`).

    See the module docstring for how records become examples, the split, class balance, dedupe and truncation.

    Args:
        path: The step-label dataset: a labelling run's folder of ``chunk-*.jsonl`` shards, a folder of ``*.jsonl``
            / ``*.parquet`` files, one file, a ``save_to_disk`` folder, or a dataset ``datasets`` loads offline.
        val_fraction: Share of problems (not prefixes) held out for validation.
        batch_size: Rollouts per batch (each holds the labels of all its prefixes).
        max_length: Longest tokenised rollout; longer ones are cut at a step boundary (also capped by the model's
            ``max_positions`` when it has one).
        balance: Weight labels so that q < 0.5 and q ≥ 0.5 carry equal loss (docs/method.md §4).
        on_bad_record: ``"error"`` stops at the first bad record (naming file and line); ``"skip"`` counts and
            logs bad records and goes on.
        dedupe: Drop repeated records and pool identical prefixes of different rollouts (see module docstring).
        policy: Keep only records rolled out by this policy (``"pi"``, or a prover's name to train its own
            Q-model); None accepts the dataset's only policy and refuses a mix.
        seed: Seeds the problem split and the shuffling.
        num_workers: DataLoader worker processes.
        step_delimiter: The task's step delimiter: every step of a record but the last must end with it (a bad
            record otherwise); ``None`` skips the check.
    """

    def __init__(
        self,
        path: str,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        max_length: int = 512,
        balance: bool = True,
        on_bad_record: OnBadRecord = "error",
        dedupe: bool = True,
        policy: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        step_delimiter: str | None = "\n",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        keep_settings(self)  # every argument as an attribute; tokenizer, examples, weights and stats empty
        self.train_examples: list[StepExample]
        self.val_examples: list[StepExample]
        self.stats: Counter
        self._sampler: ResumableSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, group, split and tokenise (with the model's tokenizer: ``trainer.lightning_module``)."""
        setup_once(self)

    def prepare(self, tokenizer: Any) -> None:
        """Build the train and validation examples with ``tokenizer`` (``setup`` without a trainer)."""
        bad = start_prepare(self, tokenizer, "step-label record")
        records = valid_step_records(self.path, bad, self.step_delimiter)
        self.stats["records"] = len(records) + bad.count
        if not self.stats["records"]:
            raise ValueError(
                f"{self.path}: holds no step-label records (empty files?); expected `pavlit label` output or JSONL / "
                "Parquet rows of the step-label contract (README, Data format)"
            )
        records = self._filter_policy(records)
        rollouts, group_stats = group_rollouts(records, bad, self.dedupe)
        self.stats.update(group_stats)
        val_problems = split_problems([r.problem_id for r in rollouts], self.val_fraction, self.seed)
        for rollout in rollouts:
            example = self._tokenise(rollout, bad)
            if example is None:
                continue
            target = self.val_examples if rollout.problem_id in val_problems else self.train_examples
            target.append(example)
        bad.summarise()
        self.stats["bad_records"] = bad.count
        if not self.train_examples:
            raise ValueError(f"{self.path}: no usable training rollouts ({dict(self.stats)})")
        labels = [q for e in self.train_examples for q in e.q if not math.isnan(q)]
        n_low = sum(q < 0.5 for q in labels)
        self.stats.update(
            train_rollouts=len(self.train_examples),
            val_rollouts=len(self.val_examples),
            train_labels=len(labels),
            val_labels=sum(not math.isnan(q) for e in self.val_examples for q in e.q),
            train_problems=len({e.problem_id for e in self.train_examples}),
            val_problems=len({e.problem_id for e in self.val_examples}),
            train_low=n_low,
        )
        self.weights = balance_weights(n_low, len(labels) - n_low) if self.balance else (1.0, 1.0)
        if self.stats["truncated"]:
            log.warning(
                "cut %d rollouts longer than %d tokens at a step boundary (%d labels dropped)",
                self.stats["truncated"],
                self.max_length,
                self.stats["labels_truncated"],
            )
        log.info(
            "step labels from %s: %s; class weights (q<0.5, q>=0.5) = %s", self.path, dict(self.stats), self.weights
        )

    def _filter_policy(self, records: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        policies = Counter(record["policy"] for _, record in records)
        if self.policy is None:
            if len(policies) > 1:
                raise ValueError(
                    f"{self.path} holds labels of several policies {dict(policies)}; set data.init_args.policy to "
                    "the one whose Q-values this verifier learns (e.g. 'pi')"
                )
            return records
        kept = [(where, record) for where, record in records if record["policy"] == self.policy]
        if not kept:
            raise ValueError(f"{self.path} holds no labels of policy {self.policy!r} (found {dict(policies)})")
        self.stats["other_policy"] = len(records) - len(kept)
        return kept

    def _tokenise(self, rollout: Rollout, bad: BadRecords) -> StepExample | None:
        try:
            tokens = step_end_token_indices(rollout.prompt, rollout.steps, self.tokenizer)
        except ValueError as err:
            bad(rollout.where[min(rollout.where)], str(err))
            return None
        if tokens.prompt_end < 0 and 0 in rollout.labels:
            bad(rollout.where[0], "the question-only prefix has no token (empty prompt and no BOS); it cannot score")
            del rollout.labels[0]
            if not rollout.labels:
                return None
        cut = truncate_at_step(tokens, self.max_length)
        if cut is None:
            bad(
                rollout.where[min(rollout.where)],
                f"the prompt alone is {tokens.prompt_end + 1} tokens, longer than max_length={self.max_length}",
            )
            return None
        if cut is not tokens:
            self.stats["truncated"] += 1
        n_prefixes = len(cut.step_ends) + 1
        q = [float("nan")] * n_prefixes
        for h, (c, n) in rollout.labels.items():
            if h < n_prefixes:
                q[h] = c / n
            else:
                self.stats["labels_truncated"] += 1
        if all(math.isnan(v) for v in q):
            return None
        return StepExample(cut, q, rollout.outcome, rollout.problem_id)

    def train_dataloader(self) -> DataLoader:
        loader, self._sampler = train_loader(
            self, self.train_examples, StepLabelCollator(self._pad_id(), *self.weights)
        )
        return loader

    def val_dataloader(self) -> DataLoader:
        return val_loader(self, self.val_examples, StepLabelCollator(self._pad_id()))

    def _pad_id(self) -> int:
        return pad_id_of(self.tokenizer)
