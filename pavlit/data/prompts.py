"""Prompts for online RL: batches of problems the policy rolls out on inside ``training_step``.

An RL "dataset" holds no responses: :class:`PromptDataModule` streams :class:`PromptBatch` es of problems, and
:class:`pavlit.modules.policy_rl.PolicyRLModule` samples, scores and trains on its own rollouts of them. Streaming
prompts through a DataLoader keeps Lightning's loop, logging, checkpointing and DDP as they are: each rank reads
its own shard of every shuffled epoch, and every rank gets the same number of batches (the remainder is dropped),
so no rank waits for a gradient all-reduce that never comes.

Batches are :class:`PromptBatch` objects, not lists of :class:`~pavlit.interfaces.Problem`: Lightning moves a
batch to the device through ``apply_to_collection``, which refuses frozen dataclasses but passes unknown objects
through untouched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from pavlit.interfaces import Problem, Task

__all__ = ["PromptBatch", "PromptBatches", "PromptDataModule"]


class PromptBatch:
    """Problems to roll out on in one step.

    Attributes:
        problems: The problems.
        split: The split they come from.
    """

    __slots__ = ("problems", "split")

    def __init__(self, problems: Sequence[Problem], split: str) -> None:
        self.problems = tuple(problems)
        self.split = split

    def __len__(self) -> int:
        return len(self.problems)

    def __repr__(self) -> str:
        return f"PromptBatch({len(self.problems)} problems of {self.split!r})"


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PromptBatches(IterableDataset):
    """An epoch of prompt batches: the problems shuffled (seeded, a new order each epoch), cut into batches, split
    over the ranks.

    Args:
        problems: The problems.
        batch_size: Problems per batch (per rank).
        split: Their split's name (carried on every batch).
        shuffle: Reshuffle every epoch (with ``seed + epoch``); otherwise the problems' order.
        drop_last: Drop the last, smaller batch (training) or keep it (evaluation).
        seed: Shuffle seed.
        shard: Split every epoch over the ranks of a distributed run; ``False`` when the problems given are
            already this rank's share.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        batch_size: int,
        split: str,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        shard: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.split = split
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.shard = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next pass (otherwise each pass advances the epoch by one)."""
        self.epoch = epoch

    def _world_batches(self, world: int) -> int:
        per_step = self.batch_size * world
        full = len(self.problems) // per_step
        return full if self.drop_last or len(self.problems) % per_step == 0 else full + 1

    def _rank_and_world(self) -> tuple[int, int]:
        return _rank_and_world() if self.shard else (0, 1)

    def __len__(self) -> int:
        return self._world_batches(self._rank_and_world()[1])

    def __iter__(self) -> Iterator[PromptBatch]:
        rank, world = self._rank_and_world()
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        per_step = self.batch_size * world
        for index in range(self._world_batches(world)):
            chunk = order[index * per_step : (index + 1) * per_step]
            mine = chunk[rank * self.batch_size : (rank + 1) * self.batch_size]
            if mine:
                yield PromptBatch([self.problems[i] for i in mine], self.split)


class PromptDataModule(LightningDataModule):
    """Problems of a task for online RL: training prompts, and a few validation / test problems to evaluate on.

    Args:
        task: The problems and their checker (the RL module scores rollouts with it).
        split: The split rolled out on in training.
        batch_size: Prompts per training step and rank (each is sampled ``samples_per_prompt`` times).
        validation_split: The split of periodic evaluation (``"test"`` tracks test accuracy over training).
        eval_problems: The first this many problems of ``validation_split`` (and of ``test``) are evaluated
            (``None``: all).
        eval_batch_size: Problems per evaluation batch.
        seed: Shuffle seed of the training prompts.
    """

    def __init__(
        self,
        task: Task,
        split: str = "train",
        batch_size: int = 8,
        validation_split: str = "validation",
        eval_problems: int | None = 32,
        eval_batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if eval_problems is not None and eval_problems < 0:
            raise ValueError(f"eval_problems must be >= 0 or None, got {eval_problems}")
        self.task = task
        self.split = split
        self.batch_size = batch_size
        self.validation_split = validation_split
        self.eval_problems = eval_problems
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self._train: PromptBatches | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled prompt batches; one pass over the training split is an epoch."""
        if self._train is None:
            problems = self.task.problems(self.split)
            if len(problems) < self.batch_size * _rank_and_world()[1]:
                raise ValueError(
                    f"{len(problems)} {self.split!r} problems cannot fill one batch of {self.batch_size} per rank"
                )
            self._train = PromptBatches(problems, self.batch_size, self.split, seed=self.seed)
        return DataLoader(self._train, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The first ``eval_problems`` problems of ``validation_split``, in order, split over the ranks."""
        return self._eval_loader(self.validation_split)

    def test_dataloader(self) -> DataLoader:
        """The first ``eval_problems`` problems of the test split."""
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        problems = list(self.task.problems(split))[: self.eval_problems]
        rank, world = _rank_and_world()
        shard = problems[rank::world]
        return DataLoader(
            PromptBatches(shard, self.eval_batch_size, split, shuffle=False, drop_last=False, shard=False),
            batch_size=None,
        )
