"""The outcome DataModule: (question, full response, correct 0/1) for the outcome verifier (:class:`ORMModule`).

Two input formats, told apart per record:

* **Outcome records** ``{"problem_id", "prompt", "response", "correct"}`` (``correct`` is 0/1 or a bool), in the
  same file kinds :func:`pavlit.data.reading.iter_records` reads.
* **Step-label records** (``pavlit label`` output): each *seed* rollout's full response (the steps of its deepest
  labelled prefix) with ``seed_outcome`` as the label. First-pit records (``source: first_pit``) are prefixes of a
  rollout up to its pit, not full responses, and are left out.

The split is by problem (as for step labels), identical ``(problem_id, prompt, response)`` examples are kept once,
and class balance is a per-example loss weight ``N / (2 n_class)``. The score sits on the last token of the
response; a response that does not fit in ``max_length`` is a bad record (cutting it would cut the answer the
label is about).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pavlit.data.loading import keep_settings, setup_once, start_prepare, train_loader, val_loader
from pavlit.data.reading import BadRecords, OnBadRecord, iter_records
from pavlit.data.rollouts import group_rollouts, split_problems
from pavlit.labeling.records import validate_record
from pavlit.modules.losses import balance_weights
from pavlit.steps import StepTokens, outcome_tokens, pad_id_of, pad_step_batch

__all__ = ["OutcomeCollator", "OutcomeDataModule", "OutcomeExample", "outcome_tokens"]

log = logging.getLogger(__name__)

OUTCOME_FIELDS = {"problem_id": str, "prompt": str, "response": str}


@dataclass
class OutcomeExample:
    """One tokenised (question, response) pair: ``tokens.prefix_ends[-1]`` is the scored (last) token."""

    tokens: StepTokens
    correct: float
    problem_id: str


@dataclass
class OutcomeCollator:
    """Pads examples: ``input_ids``, ``attention_mask`` ``[B, T]``, ``positions`` ``[B, 1]``, ``prompt_end``,
    ``label``, ``weight`` ``[B]``.

    Args:
        pad_id: The tokenizer's pad id.
        weight_low: Loss weight of incorrect responses.
        weight_high: Loss weight of correct responses.
    """

    pad_id: int
    weight_low: float = 1.0
    weight_high: float = 1.0

    def __call__(self, examples: Sequence[OutcomeExample]) -> dict[str, torch.Tensor]:
        batch = pad_step_batch([e.tokens for e in examples], self.pad_id, side="right")
        last = torch.tensor([len(e.tokens.step_ends) for e in examples])
        positions = batch.prefix_positions.gather(1, last[:, None])
        label = torch.tensor([e.correct for e in examples], dtype=torch.float32)
        weight = torch.where(label < 0.5, self.weight_low, self.weight_high)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "positions": positions,
            "prompt_end": batch.prompt_end,
            "label": label,
            "weight": weight,
        }


class OutcomeDataModule(LightningDataModule):
    """Outcome-labelled responses for training an outcome verifier (docs/method.md §4, ORM).

    Args:
        path: Outcome records or a step-label dataset (see the module docstring), in any form
            :func:`pavlit.data.reading.iter_records` reads.
        val_fraction: Share of problems held out for validation.
        batch_size: Responses per batch.
        max_length: Longest tokenised question + response (also capped by the model's ``max_positions``).
        balance: Weight examples so that correct and incorrect responses carry equal loss.
        on_bad_record: ``"error"`` or ``"skip"`` (counted and logged).
        seed: Seeds the problem split and the shuffling.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        path: str,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        max_length: int = 512,
        balance: bool = True,
        on_bad_record: OnBadRecord = "error",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        keep_settings(self)  # every argument as an attribute; tokenizer, examples, weights and stats empty
        self.train_examples: list[OutcomeExample]
        self.val_examples: list[OutcomeExample]
        self.stats: Counter

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, split and tokenise with the model's tokenizer (``trainer.lightning_module.tokenizer``)."""
        setup_once(self)

    def prepare(self, tokenizer: Any) -> None:
        """Build the examples with ``tokenizer`` (what ``setup`` does, usable without a trainer)."""
        bad = start_prepare(self, tokenizer, "outcome record")
        triples = self._read(bad)
        if not self.stats["records"]:
            raise ValueError(
                f"{self.path}: holds no records (empty files?); expected outcome records {{problem_id, prompt, "
                "response, correct}} or `pavlit label` output"
            )
        seen: dict[tuple[str, str, str], float] = {}
        for where, problem_id, prompt, response, correct in triples:
            key = (problem_id, prompt, response)
            if key in seen:
                if seen[key] != correct:
                    bad(where, "the same problem and response appear earlier with the other label")
                else:
                    self.stats["duplicates"] += 1
                continue
            seen[key] = correct
        val_problems = split_problems([key[0] for key in seen], self.val_fraction, self.seed)
        for where, problem_id, prompt, response, _ in triples:
            key = (problem_id, prompt, response)
            if key not in seen:
                continue
            correct = seen.pop(key)
            try:
                tokens = outcome_tokens(prompt, response, tokenizer)
            except ValueError as err:
                bad(where, str(err))
                continue
            if len(tokens.input_ids) > self.max_length:
                bad(where, f"question + response is {len(tokens.input_ids)} tokens, over max_length={self.max_length}")
                continue
            if tokens.prefix_ends[-1] < 0:
                bad(where, "empty prompt and response with no BOS: nothing to score")
                continue
            example = OutcomeExample(tokens, correct, problem_id)
            (self.val_examples if problem_id in val_problems else self.train_examples).append(example)
        bad.summarise()
        self.stats["bad_records"] = bad.count
        if not self.train_examples:
            raise ValueError(f"{self.path}: no usable training responses ({dict(self.stats)})")
        n_low = sum(e.correct < 0.5 for e in self.train_examples)
        self.weights = balance_weights(n_low, len(self.train_examples) - n_low) if self.balance else (1.0, 1.0)
        self.stats.update(
            train_responses=len(self.train_examples),
            val_responses=len(self.val_examples),
            train_incorrect=n_low,
        )
        log.info("outcomes from %s: %s; class weights (0, 1) = %s", self.path, dict(self.stats), self.weights)

    def _read(self, bad: BadRecords) -> list[tuple[str, str, str, str, float]]:
        triples: list[tuple[str, str, str, str, float]] = []
        step_records = []
        for where, record in iter_records(self.path):
            if isinstance(record, str) or not isinstance(record, dict):
                bad(where, record if isinstance(record, str) else "expected a JSON object")
            elif "response" in record:
                reason = _outcome_problem(record)
                if reason:
                    bad(where, reason)
                else:
                    correct = float(record["correct"])
                    triples.append((where, record["problem_id"], record["prompt"], record["response"], correct))
            elif "steps" in record:
                try:
                    validate_record(record, where)
                except ValueError as err:
                    bad(where, str(err).removeprefix(f"{where}: "))
                    continue
                if record.get("source", "seed") == "seed":
                    step_records.append((where, record))
                else:
                    self.stats["not_seed"] += 1
            else:
                bad(where, "neither an outcome record (problem_id, prompt, response, correct) nor a step label")
        self.stats["records"] = len(triples) + len(step_records) + bad.count + self.stats["not_seed"]
        if step_records:
            rollouts, _ = group_rollouts(step_records, bad, dedupe=False)
            for rollout in rollouts:
                where = rollout.where[max(rollout.where)]
                if rollout.outcome not in (0.0, 1.0):
                    bad(where, f"seed_outcome must be 0 or 1, got {rollout.outcome}")
                    continue
                response = "".join(rollout.steps)
                triples.append((where, rollout.problem_id, rollout.prompt, response, rollout.outcome))
        return triples

    def train_dataloader(self) -> DataLoader:
        return train_loader(self, self.train_examples, OutcomeCollator(self._pad_id(), *self.weights))[0]

    def val_dataloader(self) -> DataLoader:
        return val_loader(self, self.val_examples, OutcomeCollator(self._pad_id()))

    def _pad_id(self) -> int:
        return pad_id_of(self.tokenizer)


def _outcome_problem(record: dict[str, Any]) -> str | None:
    for name, expected in OUTCOME_FIELDS.items():
        if not isinstance(record.get(name), expected):
            return f"field {name!r} should be a {expected.__name__}, got {record.get(name)!r}"
    correct = record.get("correct")
    if correct not in (0, 1) or (isinstance(correct, float) and correct != correct):
        return f"field 'correct' should be 0/1 or a bool, got {correct!r}"
    if not record["response"].strip():
        return "empty response"
    return None
