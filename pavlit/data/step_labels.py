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

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from pavlit.labeling.records import text_lines, validate_record
from pavlit.labeling.shards import SHARD_GLOB, check_job_folder
from pavlit.modules.checks import check_validation_data
from pavlit.steps import StepTokens, pad_step_batch, step_end_token_indices
from pavlit.verifier import balance_weights

__all__ = [
    "BadRecords",
    "ResumableSampler",
    "StepExample",
    "StepLabelCollator",
    "StepLabelDataModule",
    "group_rollouts",
    "iter_records",
    "is_validation_problem",
    "pad_id_of",
    "truncate_at_step",
]

log = logging.getLogger(__name__)

OnBadRecord = Literal["error", "skip"]


# --- reading ----------------------------------------------------------------------------------------------------


def _data_files(folder: Path) -> list[Path]:
    check_job_folder(folder)  # a label folder still being written, or a shard failing its integrity record
    shards = sorted(folder.glob(SHARD_GLOB))
    return shards or sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.parquet"))


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` from a step-label (or outcome) dataset; ``where`` is ``file:line`` or ``file:row n``.

    ``path`` may be a folder of ``chunk-*.jsonl`` shards (a labelling run's output), a folder of ``*.jsonl`` /
    ``*.parquet`` files, one such file, a folder written by ``datasets.Dataset.save_to_disk``, or anything
    ``datasets.load_dataset`` loads offline (a local folder of data files, or a cached dataset name). A line that
    is not JSON yields its error message (a ``str``) in place of the record, for the caller's bad-record policy.
    """
    source = Path(path).expanduser()
    files = [source] if source.is_file() else _data_files(source) if source.is_dir() else []
    if files:
        for file in files:
            if file.suffix == ".parquet":
                yield from _parquet_records(file)
            else:
                yield from _jsonl_records(file)
        return
    if source.is_dir():
        if not any(source.iterdir()):
            raise FileNotFoundError(
                f"cannot read a step-label dataset from {str(path)!r}: the folder is empty (expected chunk-*.jsonl, "
                "*.jsonl or *.parquet files)"
            )
    elif _looks_like_a_path(str(path)):
        raise FileNotFoundError(
            f"cannot read a step-label dataset from {str(path)!r}: no such file or folder (expected a `pavlit label` "
            "output folder, or *.jsonl / *.parquet files)"
        )
    yield from _hf_records(str(path), source)


def _looks_like_a_path(name: str) -> bool:
    # A dataset name for `datasets` is "name" or "owner/name"; anything else that does not exist is a missing path,
    # reported as such without asking `datasets` (which would look for it on the Hub).
    has_data_suffix = Path(name).suffix in (".jsonl", ".json", ".parquet")
    return name.startswith(("/", ".", "~")) or has_data_suffix or name.count("/") > 1


def _jsonl_records(file: Path) -> Iterator[tuple[str, Any]]:
    for line_no, line in text_lines(file):
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, f"not valid JSON ({err.msg}); is the file truncated?"


def _parquet_records(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(file)
        batches = parquet.iter_batches()
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{file}:row {row}", record
                row += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise ValueError(
            f"{file}: cannot read it as Parquet after {row} rows ({err}); is the file truncated or not Parquet?"
        ) from None


def _hf_records(name: str, folder: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if folder.is_dir() and ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many types; all mean "cannot read this"
        raise FileNotFoundError(
            f"cannot read a step-label dataset from {name!r}: it is not a file or a folder of chunk-*.jsonl / *.jsonl "
            f"/ *.parquet files, and datasets could not load it offline ({type(err).__name__}: {err})"
        ) from err
    splits = loaded.items() if isinstance(loaded, Mapping) else [("train", loaded)]
    for split, dataset in splits:
        for row, record in enumerate(dataset):
            yield f"{name}[{split}]:row {row}", dict(record)


class BadRecords:
    """The bad-record policy: raise on the first one, or count and log them.

    Args:
        mode: ``"error"`` raises ``ValueError(f"{where}: {reason}")``; ``"skip"`` counts and logs.
        what: What a record is, for the log line.
    """

    def __init__(self, mode: OnBadRecord, what: str = "record") -> None:
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.what = what
        self.count = 0
        self.first: list[str] = []

    def __call__(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.mode == "error":
            raise ValueError(f"{message} (set on_bad_record='skip' to count and skip such {self.what}s)")
        self.count += 1
        if len(self.first) < 5:
            self.first.append(message)
            log.warning("skipping bad %s: %s", self.what, message)

    def summarise(self) -> None:
        if self.count:
            log.warning("skipped %d bad %ss; first: %s", self.count, self.what, "; ".join(self.first))


def valid_step_records(
    path: str | Path, bad: BadRecords, step_delimiter: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The records of ``path`` that meet the step-label contract (others go to ``bad``).

    With ``step_delimiter``, every step but a record's last must end with it: a step that does not was not cut
    where inference cuts, so its label would sit on a token that search and RL never score.
    """
    records = []
    for where, record in iter_records(path):
        if isinstance(record, str):
            bad(where, record)
            continue
        if not isinstance(record, dict):
            bad(where, f"expected a JSON object, got {type(record).__name__}")
            continue
        try:
            validate_record(record, where)
        except ValueError as err:
            bad(where, str(err).removeprefix(f"{where}: "))
            continue
        if not 0.0 <= float(record["seed_outcome"]) <= 1.0:
            bad(where, f"seed_outcome must be in [0, 1], got {record['seed_outcome']}")
            continue
        if step_delimiter:
            cut = next((h for h, step in enumerate(record["steps"][:-1]) if not step.endswith(step_delimiter)), None)
            if cut is not None:
                bad(
                    where,
                    f"field 'steps': step {cut} ({record['steps'][cut]!r}) does not end with the step delimiter "
                    f"{step_delimiter!r}; every step but the last must (set data.init_args.step_delimiter to the "
                    "task's delimiter)",
                )
                continue
        records.append((where, record))
    return records


# --- grouping, splitting, truncation (pure) ---------------------------------------------------------------------


@dataclass
class Rollout:
    """The labelled prefixes of one seed rollout.

    Attributes:
        problem_id: The problem.
        prompt: The question text.
        steps: The deepest prefix's steps (the rollout as far as it was labelled).
        labels: ``h → (n_correct, n_rollouts)`` for the prefixes that carry a label.
        outcome: The seed rollout's final outcome (0/1).
        where: ``h → file:line`` of each label's record, for error messages.
    """

    problem_id: str
    prompt: str
    steps: list[str]
    labels: dict[int, tuple[int, int]]
    outcome: float
    where: dict[int, str]


def group_rollouts(
    records: Sequence[tuple[str, Mapping[str, Any]]], bad: BadRecords, dedupe: bool = True
) -> tuple[list[Rollout], Counter]:
    """Group prefix records by seed rollout ``(problem_id, policy, source, seed_index)``; pool identical prefixes.

    Returns:
        The rollouts (sorted by key, so the result does not depend on file order) and counts
        (``duplicates``: records repeated within a rollout; ``pooled``: labels merged into an earlier identical
        prefix of another rollout).
    """
    stats: Counter = Counter()
    groups: dict[tuple, dict[int, tuple[str, Mapping[str, Any]]]] = defaultdict(dict)
    for where, record in records:
        key = (record["problem_id"], record["policy"], record.get("source", "seed"), int(record.get("seed_index", 0)))
        h = record["step_index"]
        if h in groups[key]:
            earlier_where, earlier = groups[key][h]
            same_prefix = list(earlier["steps"]) == list(record["steps"]) and earlier["prompt"] == record["prompt"]
            counts = (record["n_correct"], record["n_rollouts"])
            earlier_counts = (earlier["n_correct"], earlier["n_rollouts"])
            if same_prefix and counts == earlier_counts:
                stats["duplicates"] += 1
            elif same_prefix:
                bad(
                    where,
                    f"the same rollout's prefix {h} appears earlier with other labels ({earlier_where}: "
                    f"{earlier_counts[0]}/{earlier_counts[1]} correct, here {counts[0]}/{counts[1]}); two label jobs "
                    "mixed? give each output folder once",
                )
            else:
                bad(where, f"another record of the same rollout and step_index {h} differs ({earlier_where})")
            continue
        groups[key][h] = (where, record)

    rollouts: list[Rollout] = []
    for key in sorted(groups):
        by_h = groups[key]
        deepest_where, deepest = by_h[max(by_h)]
        steps = list(deepest["steps"])
        rollout = Rollout(key[0], deepest["prompt"], steps, {}, float(deepest["seed_outcome"]), {})
        for h in sorted(by_h):
            where, record = by_h[h]
            if record["prompt"] != deepest["prompt"] or list(record["steps"]) != steps[:h]:
                bad(where, f"its steps are not a prefix of the same rollout's deepest record ({deepest_where})")
                continue
            rollout.labels[h] = (record["n_correct"], record["n_rollouts"])
            rollout.where[h] = where
        if rollout.labels:
            rollouts.append(rollout)

    if dedupe:
        owner: dict[tuple, tuple[int, int]] = {}
        for index, rollout in enumerate(rollouts):
            for h in sorted(rollout.labels):
                prefix = (rollout.problem_id, rollout.prompt, tuple(rollout.steps[:h]))
                if prefix not in owner:
                    owner[prefix] = (index, h)
                    continue
                first, first_h = owner[prefix]
                c, n = rollout.labels.pop(h)
                c0, n0 = rollouts[first].labels[first_h]
                rollouts[first].labels[first_h] = (c0 + c, n0 + n)
                stats["pooled"] += 1
        rollouts = [r for r in rollouts if r.labels]
    return rollouts, stats


def is_validation_problem(problem_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether ``problem_id`` belongs to validation: ``sha256(f"{seed}:{problem_id}")`` as a fraction in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_problems(problem_ids: Sequence[str], val_fraction: float, seed: int = 0) -> set[str]:
    """The validation problems: :func:`is_validation_problem`, plus the lowest-hash problem when that picks none.

    The fallback keeps a small dataset (a test, a smoke run) from ending with an empty validation set whenever
    ``val_fraction > 0`` and there are at least two problems.
    """
    unique = sorted(set(problem_ids))
    val = {p for p in unique if is_validation_problem(p, val_fraction, seed)}
    if not val and val_fraction > 0 and len(unique) >= 2:
        val = {min(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())}
    if len(val) == len(unique) and len(unique) >= 2:
        val.discard(max(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest()))
    return val


def truncate_at_step(tokens: StepTokens, max_length: int) -> StepTokens | None:
    """Cut ``tokens`` after the last prefix end that fits in ``max_length`` tokens; None if even the prompt does not.

    The cut keeps ``input_ids[: end + 1]`` of the deepest prefix that fits, so every kept label still sits on its
    step's own end token.
    """
    if len(tokens.input_ids) <= max_length:
        return tokens
    if tokens.prompt_end >= max_length:
        return None
    kept = [end for end in tokens.step_ends if end < max_length]
    cut = (kept[-1] if kept else tokens.prompt_end) + 1
    if cut <= 0:
        return None
    return StepTokens(tokens.input_ids[:cut], tokens.prompt_end, kept)


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


class ResumableSampler(DistributedSampler):
    """A seeded, per-epoch shuffling sampler over this rank's share of the data that can resume mid-epoch.

    It is a ``DistributedSampler`` (so Lightning leaves it in place under DDP) built with explicit rank and world
    size. :meth:`skip` makes the next iteration start after the batches a checkpointed run had already trained on,
    so ``--ckpt_path`` resumes to the same weights as an uninterrupted run.
    """

    def __init__(self, dataset: Sequence[Any], num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._skip = 0

    def skip(self, n_samples: int) -> None:
        """Leave out the first ``n_samples`` indices of the next iteration only."""
        self._skip = n_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        # __len__ stays the full epoch: Lightning counts the restored batches as already done.
        return iter(indices[skip:])


def resume_offset(trainer: Any) -> int:
    """Batches of the current epoch a restored run already trained on (0 for a fresh run or at an epoch start)."""
    if trainer is None or getattr(trainer, "ckpt_path", None) is None:
        return 0
    # `processed`, not `completed`: a checkpoint saved in on_train_batch_end (ModelCheckpoint every_n_train_steps)
    # holds a batch that has stepped the optimizer but is not yet counted as completed.
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed)


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
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        BadRecords(on_bad_record)  # validates the mode now, not at setup
        self.path = path
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.max_length = max_length
        self.balance = balance
        self.on_bad_record: OnBadRecord = on_bad_record
        self.dedupe = dedupe
        self.policy = policy
        self.seed = seed
        self.num_workers = num_workers
        self.step_delimiter = step_delimiter
        self.tokenizer: Any = None
        self.train_examples: list[StepExample] = []
        self.val_examples: list[StepExample] = []
        self.weights = (1.0, 1.0)
        self.stats: Counter = Counter()
        self._sampler: ResumableSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, group, split and tokenise (with the model's tokenizer: ``trainer.lightning_module``)."""
        if self.train_examples or self.val_examples:
            return
        if self.tokenizer is None:
            if self.trainer is None or getattr(self.trainer.lightning_module, "tokenizer", None) is None:
                raise RuntimeError("StepLabelDataModule needs a tokenizer: attach it to a trainer with a verifier")
            self.tokenizer = self.trainer.lightning_module.tokenizer
            model_limit = getattr(self.trainer.lightning_module, "max_positions", None)
            if model_limit is not None and model_limit < self.max_length:
                log.info("capping max_length %d at the model's %d positions", self.max_length, model_limit)
                self.max_length = int(model_limit)
        self.prepare(self.tokenizer)

    def prepare(self, tokenizer: Any) -> None:
        """Build the train and validation examples with ``tokenizer`` (``setup`` without a trainer)."""
        pad_id_of(tokenizer)  # a tokenizer that cannot pad is refused before reading any data
        self.tokenizer = tokenizer
        bad = BadRecords(self.on_bad_record, "step-label record")
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
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._sampler = ResumableSampler(self.train_examples, world, rank, shuffle=True, seed=self.seed)
        self._sampler.skip(resume_offset(trainer) * self.batch_size)
        return self._loader(self.train_examples, StepLabelCollator(self._pad_id(), *self.weights), self._sampler)

    def val_dataloader(self) -> DataLoader:
        check_validation_data(self, self.val_examples, f"data.val_fraction is {self.val_fraction}; raise it")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = DistributedSampler(self.val_examples, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_examples, StepLabelCollator(self._pad_id()), sampler)

    def _loader(self, examples: list, collate: Callable, sampler: Any) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _pad_id(self) -> int:
        return pad_id_of(self.tokenizer)


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos (padding is masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer {name!r} has neither a pad nor an eos token, so batches cannot be padded; set "
            "tokenizer.pad_token (e.g. to an existing special token) before training"
        )
    return int(pad)
