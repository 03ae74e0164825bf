"""What a chunked job is: its problems cut into fixed chunks, its settings fingerprint, and the loop over its chunks.

``pavlit label`` and ``pavlit search`` both cut a split into chunks of ``chunk_size`` problems; ranks take chunks
round-robin (:func:`~pavlit.jobs.shards.chunks_for_rank`) and commit one shard per chunk, so a rerun skips what is
done. :class:`JobSpec` holds what the two jobs share, :func:`run_chunks` is the loop both run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pavlit.interfaces import SPLITS, Problem, Task
from pavlit.jobs.args import LaunchArgs, SamplerArgs, check_num_problems
from pavlit.jobs.settings import describe


@dataclass
class JobSpec:
    """The settings every chunked job shares (the arguments of ``label`` and ``search`` of the same names).

    Args:
        task: The problems and their checker.
        policy: The model source of the policy π the job samples from.
        split: The split the job runs on.
        num_problems: Only the first ``num_problems`` problems of the split (``None``: all).
        sampler: Sampling settings (``None``: the defaults).
        chunk_size: Problems per chunk (the unit of resumption and of work split across ranks).
        seed: Seed of every sampling call.
        trainer: Processes and nodes (``None``: one CPU process).
        backend: The sampling engine (``None``: pavlit's own ``Sampler``).
    """

    task: Task
    policy: Any
    split: str
    num_problems: int | None = None
    sampler: SamplerArgs | None = None
    chunk_size: int = 16
    seed: int = 0
    trainer: LaunchArgs | None = None
    backend: Any = None

    def __post_init__(self) -> None:
        self.sampler = self.sampler or SamplerArgs()
        self.trainer = self.trainer or LaunchArgs()
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        check_num_problems("num_problems", self.num_problems)

    def problems(self, split: str | None = None, num_problems: int | None = None) -> list[Problem]:
        """The job's problems (or the first ``num_problems`` of another ``split``); an empty split is refused."""
        if split is None:
            split, num_problems = self.split, self.num_problems
        problems = list(self.task.problems(split))
        if num_problems is not None:
            problems = problems[:num_problems]
        if not problems:
            raise ValueError(f"the task has no problems in split {split!r}")
        return problems

    def settings(self, **specific: Any) -> dict[str, Any]:
        """The job's fingerprinted settings: what determines its records (ranks, devices and folders do not).

        Args:
            specific: The settings of this job alone (split, budgets, methods, ...).
        """
        from pavlit.policy.backends import backend_fingerprint

        return {
            "task": describe(self.task),
            "policy": describe(self.policy),
            **specific,
            "sampler": vars(self.sampler),
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            **backend_fingerprint(self.backend),
        }


@dataclass
class ChunkProgress:
    """The progress bar of a job's loop (shown on rank 0 only).

    Args:
        desc: What the job is (``label``, ``search``, ``α sweep``).
        unit: What a chunk is called (``chunk``, ``unit``).
        rank: This process's rank.
        world: The number of ranks.
        total: The job's chunks on all ranks (the ones done before are named when there is one rank).
    """

    desc: str
    unit: str
    rank: int
    world: int
    total: int


def run_chunks(
    todo: list[int],
    run_chunk: Callable[[int], Mapping[str, float]],
    stats: dict[str, Any],
    progress: ChunkProgress,
    postfix: Callable[[int, dict[str, Any], float], dict[str, str]],
) -> dict[str, Any]:
    """Run ``run_chunk`` on every chunk of ``todo`` in order, adding the counts it returns to ``stats``.

    Args:
        todo: This rank's chunks not yet committed.
        run_chunk: Computes and commits one chunk; returns its counts (keys of ``stats``).
        stats: The counts so far; ``seconds`` is set when any chunk ran.
        progress: The progress bar's labels.
        postfix: ``(chunk, stats, elapsed seconds)`` → the bar's postfix after that chunk.

    Returns:
        ``stats``.
    """
    if not todo:
        return stats
    bar = None
    if progress.rank == 0:
        from tqdm.auto import tqdm

        done = progress.total - len(todo) if progress.world == 1 else 0
        note = f" ({done} {progress.unit}s already done)" if done else ""
        desc = f"{progress.desc} rank {progress.rank}/{progress.world}{note}"
        bar = tqdm(total=len(todo), desc=desc, unit=progress.unit, file=sys.stderr)
    start = time.perf_counter()
    for chunk in todo:
        for key, count in run_chunk(chunk).items():
            stats[key] += count
        if bar is not None:
            bar.update(1)
            bar.set_postfix(**postfix(chunk, stats, max(time.perf_counter() - start, 1e-9)))
    stats["seconds"] = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return stats
