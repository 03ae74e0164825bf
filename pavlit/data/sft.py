"""Supervised fine-tuning data: (prompt, response) pairs tokenised for a causal LM, loss on the response only.

Two sources of responses:

* ``response_source="reference"`` (SFT): the task's reference solution, ``"".join(problem.reference_steps)``.
* ``response_source="rollouts"`` (RFT, rejection-sampling fine-tuning): fine-tune on a run's **correct**
  rollouts, read from a JSONL file with one object per line::

      {"problem_id": "train-00012", "prompt": "Compute 3+4*2.\\n", "response": "3+4=7\\n...", "correct": true}

  ``correct`` is a bool (or 0/1); lines with ``correct`` false are dropped, blank lines are ignored, and a
  malformed line is an error that names ``file:line``. ``response`` is the generated text without special
  tokens, as :class:`pavlit.policy.sampler.Sampler` returns it.

Every example is encoded the way the policy will be prompted at sampling time: the prompt with the tokenizer's
special tokens (e.g. ``<bos>``), then the response without them, then ``eos`` so that the model learns to stop.
Encoding the two parts separately keeps the prompt's tokens identical to what the sampler feeds the model, even
for BPE tokenizers that could merge across the boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from pavlit.interfaces import Problem, Task
from pavlit.jobs.jsonl import json_objects
from pavlit.jobs.shards import check_job_folder
from pavlit.modules.checks import check_validation_data
from pavlit.steps import pad_id_of

__all__ = [
    "IGNORE_INDEX",
    "Rollout",
    "SFTDataModule",
    "SFTExample",
    "collate_sft",
    "encode_example",
    "read_rollouts",
]

log = logging.getLogger(__name__)

#: Label of a position that does not count in the loss (PyTorch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100
ROLLOUT_KEYS = ("problem_id", "prompt", "response", "correct")


@dataclass(frozen=True)
class SFTExample:
    """One tokenised example: ``labels`` equals ``input_ids`` on response tokens and ``IGNORE_INDEX`` elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Rollout:
    """One line of an RFT rollouts file (see the module docstring)."""

    problem_id: str
    prompt: str
    response: str
    correct: bool


def encode_example(tokenizer: Any, prompt: str, response: str) -> SFTExample:
    """Tokenise ``prompt`` (with special tokens) + ``response`` (without) + ``eos``; mask the prompt from the loss.

    Args:
        tokenizer: A Hugging Face tokenizer with an ``eos_token_id``.
        prompt: The question as the policy sees it.
        response: The text the policy should learn to write after it.

    Returns:
        An :class:`SFTExample` whose labels are ``IGNORE_INDEX`` on every prompt token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: SFT appends eos so that the policy learns to stop")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return SFTExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with ``IGNORE_INDEX``, plus ``attention_mask``."""
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def read_rollouts(path: str | Path) -> list[Rollout]:
    """Every rollout of a JSONL rollouts file, or of every ``*.jsonl`` file in a folder (correct or not).

    A folder is what ``pavlit label`` writes under ``<output_dir>/rollouts`` (one file per chunk); its files are read
    in name order.

    Raises:
        ValueError: a line is not a JSON object with string ``problem_id``/``prompt``/``response`` and a boolean
            (or 0/1) ``correct`` (the message starts with ``file:line``), or a folder holds no ``*.jsonl`` file.
    """
    path = Path(path)
    if path.is_dir():
        check_job_folder(path)  # pavlit label's rollouts/ still being written, or a shard failing its record
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path}: a rollouts folder needs *.jsonl files (as pavlit label's <output_dir>/rollouts)")
        return [rollout for file in files for rollout in read_rollouts(file)]
    rollouts = []
    for where, record in json_objects(path, not_object=f"expected a JSON object with keys {ROLLOUT_KEYS}"):
        missing = [key for key in ROLLOUT_KEYS if key not in record]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; a rollout line needs {ROLLOUT_KEYS}")
        for key in ("problem_id", "prompt", "response"):
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        correct = record["correct"]
        # 0/1 numbers are accepted because outcome fields are often written as floats (1.0 = Rex passed).
        if not isinstance(correct, bool) and correct not in (0, 1):
            raise ValueError(f"{where}: 'correct' must be true/false (or 0/1), got {correct!r}")
        rollouts.append(Rollout(record["problem_id"], record["prompt"], record["response"], bool(correct)))
    return rollouts


class SFTDataModule(LightningDataModule):
    """Prompt/response pairs for supervised (SFT) or rejection-sampling (RFT) fine-tuning of the base policy.

    The tokenizer is the model's: :meth:`setup` takes it from ``trainer.lightning_module.tokenizer`` (or from
    ``self.tokenizer`` when set by hand outside a Trainer). The validation split always uses the task's reference
    solutions (for the token loss); the model samples its own answers on the same split for pass@k.

    Args:
        task: The problems (and, for ``"reference"``, their reference solutions).
        split: The split trained on with ``response_source="reference"``.
        validation_split: The split of the validation loss and of sampled pass@k.
        batch_size: Examples per batch (per device).
        max_length: Longest example in tokens (prompt + response + eos).
        num_workers: DataLoader worker processes.
        response_source: ``"reference"`` (SFT on reference solutions) or ``"rollouts"`` (RFT: fine-tune on a
            run's correct rollouts, read from ``rollouts_path``).
        rollouts_path: The JSONL rollouts file for ``response_source="rollouts"`` (format: module docstring), or a
            folder of them such as a labeling run's ``rollouts/``.
        on_too_long: What to do with an example longer than ``max_length``: ``"skip"`` (counted and logged as a
            warning) or ``"error"``.
        seed: Seed of the training shuffle.
    """

    def __init__(
        self,
        task: Task,
        split: str = "train",
        validation_split: str = "validation",
        batch_size: int = 32,
        max_length: int = 256,
        num_workers: int = 0,
        response_source: Literal["reference", "rollouts"] = "reference",
        rollouts_path: str | None = None,
        on_too_long: Literal["skip", "error"] = "skip",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if response_source not in ("reference", "rollouts"):
            raise ValueError(f"response_source must be 'reference' or 'rollouts', got {response_source!r}")
        if (response_source == "rollouts") != (rollouts_path is not None):
            raise ValueError("rollouts_path is needed exactly when response_source='rollouts' (RFT)")
        if on_too_long not in ("skip", "error"):
            raise ValueError(f"on_too_long must be 'skip' or 'error', got {on_too_long!r}")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.task = task
        self.split = split
        self.validation_split = validation_split
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.response_source = response_source
        self.rollouts_path = rollouts_path
        self.on_too_long = on_too_long
        self.seed = seed
        self.tokenizer: Any = None
        #: Examples dropped for exceeding ``max_length``, per dataset (``"train"``, ``"validation"``).
        self.skipped: dict[str, int] = {}
        self.train_examples: list[SFTExample] = []
        self.val_examples: list[SFTExample] = []

    def setup(self, stage: str) -> None:
        """Tokenise the training and validation examples with the model's tokenizer."""
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("SFTDataModule needs the model's tokenizer: the LightningModule has no .tokenizer")
        if stage == "fit" and not self.train_examples:
            self.train_examples = self._encode("train", self._train_pairs())
            if not self.train_examples:
                raise ValueError(f"no training examples left from {self._describe_source()}")
        if stage in ("fit", "validate") and not self.val_examples:
            self.val_examples = self._encode("validation", self._reference_pairs(self.validation_split))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded)."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_examples, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        check_validation_data(self, self.val_examples, "the task's validation split is empty; give it problems")
        return self._loader(self.val_examples, shuffle=False)

    def _loader(
        self, examples: list[SFTExample], shuffle: bool, generator: torch.Generator | None = None
    ) -> DataLoader:
        pad_id = pad_id_of(self.tokenizer)
        return DataLoader(
            examples,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=partial(collate_sft, pad_id=pad_id),
        )

    def _describe_source(self) -> str:
        if self.response_source == "rollouts":
            return f"the correct rollouts of {self.rollouts_path}"
        return f"the reference solutions of split {self.split!r}"

    def _train_pairs(self) -> list[tuple[str, str, str]]:
        if self.response_source == "reference":
            return self._reference_pairs(self.split)
        rollouts = read_rollouts(self.rollouts_path)
        kept = [(r.problem_id, r.prompt, r.response) for r in rollouts if r.correct]
        log.info("RFT: %d of %d rollouts in %s are correct and kept", len(kept), len(rollouts), self.rollouts_path)
        return kept

    def _reference_pairs(self, split: str) -> list[tuple[str, str, str]]:
        problems: Sequence[Problem] = self.task.problems(split)
        pairs = [(p.id, p.prompt, "".join(p.reference_steps)) for p in problems if p.reference_steps is not None]
        if len(pairs) < len(problems):
            log.warning(
                "%d of %d %s problems have no reference solution and are left out of SFT",
                len(problems) - len(pairs),
                len(problems),
                split,
            )
        return pairs

    def _encode(self, name: str, pairs: Iterable[tuple[str, str, str]]) -> list[SFTExample]:
        examples, too_long = [], []
        for problem_id, prompt, response in pairs:
            example = encode_example(self.tokenizer, prompt, response)
            if len(example.input_ids) <= self.max_length:
                examples.append(example)
                continue
            if self.on_too_long == "error":
                raise ValueError(
                    f"{name} example {problem_id!r} is {len(example.input_ids)} tokens, over max_length="
                    f"{self.max_length}; raise max_length or set on_too_long='skip'"
                )
            too_long.append(problem_id)
        self.skipped[name] = len(too_long)
        if too_long:
            log.warning(
                "skipped %d of %d %s examples longer than max_length=%d tokens (first: %s)",
                len(too_long),
                len(too_long) + len(examples),
                name,
                self.max_length,
                too_long[:3],
            )
        return examples
