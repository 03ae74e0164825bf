"""``pavlit label``: seed rollouts and Monte-Carlo step labels for a split of a task, resumable and multi-rank.

The problems are cut into fixed chunks; ranks take chunks round-robin and commit one shard per chunk atomically
(:mod:`pavlit.labeling.shards`). Rerunning the same command after a crash or ``kill -9`` skips finished chunks.
Every sampling call is seeded from ``(seed, chunk, phase)``, so the records are the same whatever the number of
ranks and however often the job was interrupted.

Output folder::

    job.json             settings fingerprint (resuming with other settings is refused)
    chunk-000000.jsonl   step labels, one record per (seed rollout, prefix) — pavlit.labeling.records
    chunk-000000.meta.json  the shard's integrity record (fingerprint, count, SHA-256); a mismatch is redone
    .pavlit.lock         while the job runs: a second job into this folder is refused
    rollouts/            the seed rollouts: {problem_id, prompt, response, correct} (RFT data, ORM data)
    trl_prm.jsonl        the labels in TRL's PRM schema {prompt, completions, labels}, in chunk order
    metrics.json         counts, accuracy of the seeds, label statistics, throughput
    config.yaml          the resolved config
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pavlit.interfaces import SPLITS, Problem, Task
from pavlit.labeling.mc import LabelArgs, label_chunk
from pavlit.labeling.records import to_trl_prm
from pavlit.labeling.shards import (
    ShardStore,
    atomic_write_lines,
    atomic_write_text,
    chunks_for_rank,
    describe,
    output_lock,
)
from pavlit.policy.backends import SamplerBackend, SamplingSettings, backend_fingerprint
from pavlit.policy.checks import check_prompts
from pavlit.policy.sources import ModelSource


@dataclass
class SamplerArgs:
    """Sampling settings shared by every rollout of a job.

    Args:
        temperature: Softmax temperature (1 = the policy's own distribution, which MC labels must use).
        top_p: Nucleus mass (1 = off).
        max_batch: Most sequences decoded at once (bounds memory; part of the seeding, so fixed per job).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_batch: int = 256

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplerArgs.temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplerArgs.top_p must be in (0, 1], got {self.top_p}")
        if self.max_batch < 1:
            raise ValueError(f"SamplerArgs.max_batch must be >= 1, got {self.max_batch}")


@dataclass
class LaunchArgs:
    """Where the job runs; ranks split the chunks (``--trainer.devices 2`` runs two processes).

    Args:
        accelerator: ``cpu`` or ``cuda``.
        devices: Processes per node.
        num_nodes: Nodes (launch one command per node, e.g. with SLURM or torchrun-style environment variables).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1

    def launch(self) -> Any:
        """Start the job's processes with Lightning Fabric and return this process's ``Fabric``.

        On CPU with several processes per node, each gets an equal share of the cores as torch threads
        (spinning OpenMP threads that outnumber the cores slow small models down by an order of magnitude).
        """
        import torch
        from lightning.fabric import Fabric

        world = self.devices * self.num_nodes
        fabric = Fabric(
            accelerator=self.accelerator,
            devices=self.devices,
            num_nodes=self.num_nodes,
            strategy="ddp" if world > 1 else "auto",
        )
        fabric.launch()
        if fabric.device.type == "cpu" and fabric.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.devices))
        return fabric


def label(
    task: Task,
    policy: ModelSource,
    output_dir: str = "runs/label",
    split: str = "train",
    num_problems: int | None = None,
    label: LabelArgs | None = None,
    sampler: SamplerArgs | None = None,
    provers: dict[str, ModelSource] | None = None,
    chunk_size: int = 16,
    seed: int = 0,
    trainer: LaunchArgs | None = None,
    backend: SamplerBackend | None = None,
) -> dict[str, Any]:
    """Label every prefix of ``n_cov`` seed rollouts per problem with ``n_mc`` Monte-Carlo completions.

    Args:
        task: The problems and their checker.
        policy: The base policy π (seeds and labels are sampled from it).
        output_dir: The dataset folder; rerunning with the same settings resumes it.
        split: Which split of the task to label.
        num_problems: Label only the first ``num_problems`` problems of the split.
        label: Rollout budgets (``n_cov``, ``n_mc``, first-pit seeding).
        sampler: Sampling settings.
        provers: Extra policies (name → model) whose completions from the same prefixes are labelled too,
            recorded with ``policy: <name>`` (fixed-checkpoint provers). Best-of-K provers need none.
        chunk_size: Problems per shard (the unit of resumption and of work split across ranks).
        seed: Seed of every sampling call.
        trainer: Processes and nodes.
        backend: The sampling engine (default: pavlit's ``Sampler``; ``pavlit.policy.backends.VLLMBackend`` on a
            GPU).

    Returns:
        The summary written to ``metrics.json`` (on rank 0; other ranks return their own counts).
    """
    label = label or LabelArgs()
    sampler = sampler or SamplerArgs()
    trainer = trainer or LaunchArgs()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_num_problems("num_problems", num_problems)
    if not isinstance(task.step_delimiter, str) or not task.step_delimiter:
        raise ValueError(
            f"task {type(task).__qualname__} has step_delimiter {task.step_delimiter!r}; a task must set a non-empty "
            "string that ends each step (e.g. '\\n')"
        )
    settings = _settings(task, policy, split, num_problems, label, sampler, provers, chunk_size, seed)
    settings.update(backend_fingerprint(backend))
    with output_lock(output_dir, "pavlit label"):
        return _run(
            task,
            policy,
            Path(output_dir),
            split,
            num_problems,
            label,
            sampler,
            provers or {},
            chunk_size,
            seed,
            trainer,
            settings,
            backend,
        )


def _settings(task, policy, split, num_problems, label, sampler, provers, chunk_size, seed) -> dict[str, Any]:
    """What determines the records (ranks, devices and the output folder do not)."""
    return {
        "task": describe(task),
        "policy": describe(policy),
        "split": split,
        "num_problems": num_problems,
        "label": vars(label),
        "sampler": vars(sampler),
        "provers": {name: describe(p) for name, p in sorted((provers or {}).items())},
        "chunk_size": chunk_size,
        "seed": seed,
    }


def check_num_problems(field: str, num_problems: int | None) -> None:
    """``num_problems`` is ``None`` (the whole split) or a positive count (``-1`` would silently drop the last)."""
    if num_problems is not None and (isinstance(num_problems, bool) or num_problems < 1):
        raise ValueError(f"{field} must be >= 1 (or null for the whole split), got {num_problems}")


def _run(
    task, policy, out, split, num_problems, label_args, sampler_args, provers, chunk_size, seed, trainer, settings,
    backend=None,
) -> dict[str, Any]:  # fmt: skip
    from pavlit.policy.backends import PavlitBackend

    fabric = trainer.launch()
    rank, world = fabric.global_rank, fabric.world_size

    problems = list(task.problems(split))
    if num_problems is not None:
        problems = problems[:num_problems]
    if not problems:
        raise ValueError(f"the task has no problems in split {split!r}")
    n_chunks = math.ceil(len(problems) / chunk_size)
    store = ShardStore(out, settings)
    rollout_store = ShardStore(out / "rollouts", settings)
    # A chunk is done when both of its shards pass their integrity checks (a failing one is set aside and redone).
    todo = [c for c in chunks_for_rank(n_chunks, rank, world) if not (store.is_done(c) and rollout_store.is_done(c))]

    engine = backend or PavlitBackend()
    sampling = SamplingSettings(
        temperature=sampler_args.temperature,
        top_p=sampler_args.top_p,
        max_new_tokens=label_args.max_new_tokens,
        max_batch=sampler_args.max_batch,
        delimiter=task.step_delimiter,
    )

    def make_sampler(source: ModelSource) -> Any:
        return engine.build(source, sampling, fabric.device)

    stats = {"chunks": 0, "problems": 0, "prefixes": 0, "completions": 0, "generated_tokens": 0}
    if todo:
        pi = make_sampler(policy)
        # A vLLM sampler has no torch model here; it carries the model's config itself.
        check_prompts(problems, getattr(pi, "model", pi), pi.tokenizer, label_args.max_new_tokens)
        prover_samplers = {name: make_sampler(source) for name, source in provers.items()}
        progress = _progress(len(todo), rank, world, n_chunks - len(todo) if world == 1 else None)
        start = time.perf_counter()
        for chunk in todo:
            chunk_problems = problems[chunk * chunk_size : (chunk + 1) * chunk_size]
            result = label_chunk(pi, task, chunk_problems, label_args, chunk, seed, provers=prover_samplers)
            # Rollouts first: a chunk counts as done once its labels are committed, and a rerun rewrites both.
            rollout_store.commit(chunk, result.rollouts)
            store.commit(chunk, result.labels)
            stats["chunks"] += 1
            stats["problems"] += len(chunk_problems)
            stats["prefixes"] += len(result.labels)
            stats["completions"] += result.n_completions
            stats["generated_tokens"] += result.generated_tokens
            elapsed = max(time.perf_counter() - start, 1e-9)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    problems_s=f"{stats['problems'] / elapsed:.2f}",
                    prefixes_s=f"{stats['prefixes'] / elapsed:.1f}",
                    rollouts_s=f"{stats['completions'] / elapsed:.1f}",
                    tok_s=f"{stats['generated_tokens'] / elapsed:.0f}",
                )
        stats["seconds"] = time.perf_counter() - start
        if progress is not None:
            progress.close()
    fabric.barrier()
    if rank != 0:
        return stats
    summary = _summarise(store, rollout_store, len(problems), stats)
    # One shard at a time (a seed rollout's prefixes all live in its chunk's shard): memory does not grow with the
    # dataset.
    rows = (row for shard in store.shards() for row in to_trl_prm(shard))
    atomic_write_lines(out / "trl_prm.jsonl", (json.dumps(row) + "\n" for row in rows))
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return summary


def check_prompts_fit(problems: list[Problem], model: Any, tokenizer: Any) -> None:
    """Refuse prompts the policy cannot read (``<unk>``) or that fill its context (:func:`check_prompts`)."""
    check_prompts(problems, model, tokenizer)


def _progress(total: int, rank: int, world: int, already: int | None):
    if rank != 0:
        return None
    from tqdm.auto import tqdm

    note = f" ({already} chunks already done)" if already else ""
    return tqdm(total=total, desc=f"label rank {rank}/{world}{note}", unit="chunk", file=sys.stderr)


def _summarise(store: ShardStore, rollout_store: ShardStore, n_problems: int, stats: dict[str, Any]) -> dict[str, Any]:
    """Label statistics streamed from the shards (memory does not grow with the dataset)."""
    n_records = n_rollouts = 0
    q_sum = q_mixed = 0.0
    q_hist = [0] * 10
    for record in store.records():
        n_records += 1
        n_rollouts += record["n_rollouts"]
        q = record["q_mc"]
        q_sum += q
        q_mixed += 0.0 < q < 1.0
        q_hist[min(int(q * 10), 9)] += 1
    n_seeds = n_correct = 0
    for rollout in rollout_store.records():
        n_seeds += 1
        n_correct += rollout["correct"]
    return {
        "problems": n_problems,
        "chunks_done": len(store.done_chunks()),
        "records": n_records,
        "label_rollouts": n_rollouts,
        "seed_rollouts": n_seeds,
        "seed_accuracy": n_correct / n_seeds if n_seeds else None,
        "mean_q_mc": q_sum / n_records if n_records else None,
        "fraction_q_strictly_between_0_and_1": q_mixed / n_records if n_records else None,
        "q_mc_histogram_deciles": q_hist,
        "this_run": stats,
    }


def label_command(argv: list[str]) -> int:
    """Sample seed rollouts and label every step prefix by Monte-Carlo rollouts (resumable, multi-rank)."""
    from pavlit.commands import parse_job

    kwargs = parse_job("pavlit label", label, argv, "configs/tiny/label.yaml")
    summary = label(**kwargs)
    if "records" in summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "q_mc_histogram_deciles"}, indent=2))
    return 0
