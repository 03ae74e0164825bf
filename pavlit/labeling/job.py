"""``pavlit label``: seed rollouts and Monte-Carlo step labels for a split of a task, resumable and multi-rank.

The problems are cut into fixed chunks; ranks take chunks round-robin and commit one shard per chunk atomically
(:mod:`pavlit.jobs.shards`). Rerunning the same command after a crash or ``kill -9`` skips finished chunks.
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
from pathlib import Path
from typing import Any

from pavlit.interfaces import Task
from pavlit.jobs.args import LaunchArgs, SamplerArgs
from pavlit.jobs.atomic import atomic_write_lines, atomic_write_text
from pavlit.jobs.chunks import ChunkProgress, JobSpec, run_chunks
from pavlit.jobs.lock import output_lock
from pavlit.jobs.settings import describe
from pavlit.jobs.shards import ShardStore, chunks_for_rank
from pavlit.labeling.mc import LabelArgs, label_chunk
from pavlit.labeling.records import to_trl_prm
from pavlit.policy.backends import SamplerBackend
from pavlit.policy.checks import check_prompts
from pavlit.policy.sources import ModelSource

__all__ = ["LaunchArgs", "SamplerArgs", "label", "label_command"]


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
    job = JobSpec(task, policy, split, num_problems, sampler, chunk_size, seed, trainer, backend)
    if not isinstance(task.step_delimiter, str) or not task.step_delimiter:
        raise ValueError(
            f"task {type(task).__qualname__} has step_delimiter {task.step_delimiter!r}; a task must set a non-empty "
            "string that ends each step (e.g. '\\n')"
        )
    provers = provers or {}
    settings = job.settings(
        split=split,
        num_problems=num_problems,
        label=vars(label),
        provers={name: describe(p) for name, p in sorted(provers.items())},
    )
    with output_lock(output_dir, "pavlit label"):
        return _run(job, Path(output_dir), label, provers, settings)


def _run(
    job: JobSpec, out: Path, label_args: LabelArgs, provers: dict[str, ModelSource], settings: dict[str, Any]
) -> dict[str, Any]:
    from pavlit.policy.backends import PavlitBackend

    fabric = job.trainer.launch()
    rank, world = fabric.global_rank, fabric.world_size

    problems = job.problems()
    n_chunks = math.ceil(len(problems) / job.chunk_size)
    store = ShardStore(out, settings)
    rollout_store = ShardStore(out / "rollouts", settings)
    # A chunk is done when both of its shards pass their integrity checks (a failing one is set aside and redone).
    todo = [c for c in chunks_for_rank(n_chunks, rank, world) if not (store.is_done(c) and rollout_store.is_done(c))]

    engine = job.backend or PavlitBackend()
    sampling = job.sampler.settings(label_args.max_new_tokens, job.task.step_delimiter)

    def make_sampler(source: ModelSource) -> Any:
        return engine.build(source, sampling, fabric.device)

    stats = {"chunks": 0, "problems": 0, "prefixes": 0, "completions": 0, "generated_tokens": 0}
    if todo:
        pi = make_sampler(job.policy)
        # A vLLM sampler has no torch model here; it carries the model's config itself.
        check_prompts(problems, getattr(pi, "model", pi), pi.tokenizer, label_args.max_new_tokens)
        prover_samplers = {name: make_sampler(source) for name, source in provers.items()}

        def run_chunk(chunk: int) -> dict[str, int]:
            chunk_problems = problems[chunk * job.chunk_size : (chunk + 1) * job.chunk_size]
            result = label_chunk(pi, job.task, chunk_problems, label_args, chunk, job.seed, provers=prover_samplers)
            # Rollouts first: a chunk counts as done once its labels are committed, and a rerun rewrites both.
            rollout_store.commit(chunk, result.rollouts)
            store.commit(chunk, result.labels)
            return {
                "chunks": 1,
                "problems": len(chunk_problems),
                "prefixes": len(result.labels),
                "completions": result.n_completions,
                "generated_tokens": result.generated_tokens,
            }

        run_chunks(todo, run_chunk, stats, ChunkProgress("label", "chunk", rank, world, n_chunks), _postfix)
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


def _postfix(chunk: int, stats: dict[str, Any], elapsed: float) -> dict[str, str]:
    return {
        "problems_s": f"{stats['problems'] / elapsed:.2f}",
        "prefixes_s": f"{stats['prefixes'] / elapsed:.1f}",
        "rollouts_s": f"{stats['completions'] / elapsed:.1f}",
        "tok_s": f"{stats['generated_tokens'] / elapsed:.0f}",
    }


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
