"""``pavlit search``: strategies × budgets × reward compositions over a split, resumable and split across ranks.

The problems are cut into fixed chunks; a unit of work is one (method, chunk), run at every budget of the method
at once (best-of-N draws its largest N once). Ranks take units round-robin and commit one shard per unit
atomically (:mod:`pavlit.jobs.shards`): rerunning the same command after a crash skips finished units. Every
unit is seeded from ``(seed, chunk)`` alone, so all methods start from the same random stream on the same
problems (paired comparisons), and the results do not depend on the number of ranks or on interruptions.

With ``alpha_sweep``, the named method first runs on the validation split for every α; the α with the highest
accuracy (mean over the sweep's budgets; the smaller α on ties) is then used on the test split. The test split
is never used to choose anything.

Output folder::

    job.json, chunk-*.jsonl   per-problem records of the test split (one per method × budget × problem)
    chunk-*.meta.json         each shard's integrity record (a shard that fails it is redone on resume)
    sweep/                    the α sweep's records (validation split)
    results.json              settings, every (line, budget) point, the compute-efficiency ratio, the sweep
    report.md                 the accuracy-vs-compute table, efficiency ratio, α sweep
    accuracy_vs_compute.png   accuracy vs generated tokens (log-x), one line per method
    config.yaml               the resolved config
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pavlit.interfaces import Problem, Reward, Sampler, Task
from pavlit.jobs.args import LaunchArgs, SamplerArgs
from pavlit.jobs.atomic import atomic_write_text
from pavlit.jobs.chunks import ChunkProgress, JobSpec, run_chunks
from pavlit.jobs.lock import output_lock
from pavlit.jobs.seeds import phase_seed
from pavlit.jobs.settings import describe
from pavlit.jobs.shards import ShardStore, chunks_for_rank
from pavlit.policy.backends import SamplerBackend
from pavlit.policy.checks import check_prompts
from pavlit.policy.sources import ModelSource
from pavlit.search import report
from pavlit.search.methods import AlphaSweep, Efficiency, Method, check_budgets
from pavlit.search.paired import paired_differences, render_paired

__all__ = ["AlphaSweep", "Efficiency", "Method", "search", "search_command"]

DEFAULT_BUDGETS = (1, 2, 4, 8, 16, 32, 64)
PLOT_NAME = "accuracy_vs_compute.png"
#: Fewest bootstrap resamples: below this the 2.5% and 97.5% percentiles of the resampled means are (almost) the
#: same resample, and the "95% CI" collapses towards the point.
MIN_BOOTSTRAP = 10


def search(
    task: Task,
    policy: ModelSource,
    methods: list[Method],
    output_dir: str = "runs/search",
    split: str = "test",
    num_problems: int | None = None,
    budgets: list[int] = list(DEFAULT_BUDGETS),  # noqa: B006 - jsonargparse needs a literal default
    max_new_tokens: int = 256,
    sampler: SamplerArgs | None = None,
    alpha_sweep: AlphaSweep | None = None,
    efficiency: Efficiency | None = None,
    chunk_size: int = 8,
    seed: int = 0,
    bootstrap: int = 1000,
    trainer: LaunchArgs | None = None,
    backend: SamplerBackend | None = None,
) -> dict[str, Any]:
    """Run every method at every budget on a split and write results, report and plot.

    Args:
        task: The problems and their checker.
        policy: The base policy π searched over.
        methods: The lines to compare (names must be unique).
        output_dir: The run folder; rerunning with the same settings resumes it.
        split: The split reported on.
        num_problems: Use only the first ``num_problems`` problems of the split.
        budgets: N for best-of-N, B for beam search, N for DVTS (a method may override them).
        max_new_tokens: Cap on a response's tokens (and on one step's, unless a strategy sets its own).
        sampler: Sampling settings (temperature 1 samples π itself).
        alpha_sweep: Tune one method's α on validation first.
        efficiency: The two lines of the compute-efficiency ratio.
        chunk_size: Problems per unit of work (the unit of resumption and of batching across problems).
        seed: Seed of every sampling call.
        bootstrap: Bootstrap resamples for the 95% CIs.
        trainer: Processes and nodes.
        backend: The sampling engine (default: pavlit's ``Sampler``; ``pavlit.policy.backends.VLLMBackend`` on a
            GPU).

    Returns:
        The ``results.json`` content (on rank 0; other ranks return their own counts).
    """
    names = [m.name for m in methods]
    if not methods:
        raise ValueError("give at least one method")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    job = JobSpec(task, policy, split, num_problems, sampler, chunk_size, seed, trainer, backend)
    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bootstrap < MIN_BOOTSTRAP:
        raise ValueError(f"bootstrap must be >= {MIN_BOOTSTRAP} resamples for a 95% CI, got {bootstrap}")
    for m in methods:
        if m.budgets is not None and not m.budgets:
            raise ValueError(f"method {m.name!r}: budgets is empty; give budgets, or leave it out to use the job's")
        check_budgets(f"method {m.name!r}: budgets", m.budgets if m.budgets is not None else budgets)
        alpha = getattr(m.reward, "alpha", None)
        if isinstance(alpha, float | int) and not math.isfinite(alpha):
            raise ValueError(f"method {m.name!r}: reward alpha must be a finite number, got {alpha}")
    for which in ("baseline", "target"):
        line = getattr(efficiency, which, None) if efficiency is not None else None
        if line is not None and line.split(" [", 1)[0] not in names:
            raise ValueError(
                f"efficiency.{which} names {line!r}, which is not among the methods {names} (a pick: 'name [pick]')"
            )
    if alpha_sweep is not None:
        for name in [alpha_sweep.method, *alpha_sweep.apply_to]:
            if name not in names:
                raise ValueError(f"alpha_sweep names method {name!r}, which is not among {names}")
            if not hasattr(_method(methods, name).reward, "alpha"):
                raise ValueError(f"method {name!r} has no reward with an alpha to sweep")
    plan = _Plan(methods, budgets, max_new_tokens, alpha_sweep, efficiency or Efficiency(), bootstrap)
    with output_lock(output_dir, "pavlit search"):
        return _run(job, plan, Path(output_dir))


def _method(methods: list[Method], name: str) -> Method:
    return next(m for m in methods if m.name == name)


def _describe_methods(methods: list[Method], budgets: list[int]) -> list[dict[str, Any]]:
    return [
        {"name": m.name, "search": describe(m.search), "reward": describe(m.reward), "budgets": m.budgets or budgets}
        for m in methods
    ]


def _records(
    method: Method, label: str, budgets: list[int], problems: list[Problem], task: Task, sampler: Sampler, seed: int
) -> list[dict[str, Any]]:
    by_budget = method.search.run_budgets(
        problems, sorted(budgets), task=task, sampler=sampler, reward=method.reward, seed=seed
    )
    records = []
    for budget in sorted(budgets):
        for problem, result in zip(problems, by_budget[budget]):
            response = result["response"]
            records.append(
                {
                    "method": label,
                    "budget": budget,
                    "problem_id": problem.id,
                    "correct": bool(task.score(problem, response) >= 0.5),
                    "answer": task.extract_answer(response),
                    "response": response,
                    "value": result.get("value"),
                    "tokens": int(result["tokens"]),
                    "step_samples": int(result.get("step_samples", 0)),
                    "verifier_calls": int(result.get("verifier_calls", 0)),
                    "reward_tokens": int(result.get("reward_tokens", 0)),
                    "candidates": result.get("candidates"),
                    **{key: int(result[key]) for key in ("contested", "reranked") if key in result},
                    "picks": {k: bool(task.score(problem, v) >= 0.5) for k, v in (result.get("picks") or {}).items()},
                }
            )
    return records


@dataclass
class _Plan:
    """What ``search`` compares, beyond what every chunked job has (:class:`~pavlit.jobs.chunks.JobSpec`)."""

    methods: list[Method]
    budgets: list[int]
    max_new_tokens: int
    sweep: AlphaSweep | None
    efficiency: Efficiency
    bootstrap: int


@dataclass
class _Unit:
    """One unit of work: a method (under a line label) at its budgets on one chunk of problems."""

    method: Method
    label: str
    budgets: list[int]
    chunk: int


def _work(
    job: JobSpec, units: list[_Unit], store: ShardStore, problems: list[Problem], sampler: Sampler, fabric: Any,
    desc: str,
) -> dict[str, Any]:  # fmt: skip
    """Run this rank's units not yet committed; one shard per unit."""
    rank, world = fabric.global_rank, fabric.world_size
    todo = [u for u in chunks_for_rank(len(units), rank, world) if not store.is_done(u)]
    stats = {"units": 0, "problems": 0, "generated_tokens": 0, "reward_tokens": 0, "seconds": 0.0}

    def run_unit(index: int) -> dict[str, int]:
        unit = units[index]
        chunk_problems = problems[unit.chunk * job.chunk_size : (unit.chunk + 1) * job.chunk_size]
        seed = phase_seed(job.seed, unit.chunk, "search")
        records = _records(unit.method, unit.label, unit.budgets, chunk_problems, job.task, sampler, seed)
        store.commit(index, records)
        return {
            "units": 1,
            "problems": len(chunk_problems),
            "generated_tokens": sum(r["tokens"] for r in records),
            "reward_tokens": sum(r["reward_tokens"] for r in records),
        }

    def postfix(index: int, stats: dict[str, Any], elapsed: float) -> dict[str, str]:
        return {"method": units[index].label, "tok_s": f"{stats['generated_tokens'] / elapsed:.0f}"}

    return run_chunks(todo, run_unit, stats, ChunkProgress(desc, "unit", rank, world, len(units)), postfix)


def _run(job: JobSpec, plan: _Plan, out: Path) -> dict[str, Any]:
    from pavlit.policy.backends import PavlitBackend

    task, methods, budgets, sweep, bootstrap = job.task, plan.methods, plan.budgets, plan.sweep, plan.bootstrap
    fabric = job.trainer.launch()
    rank = fabric.global_rank
    sampling = job.sampler.settings(plan.max_new_tokens, task.step_delimiter)
    sampler = (job.backend or PavlitBackend()).build(job.policy, sampling, fabric.device)
    # A vLLM sampler has no torch model here; it carries the model's config itself.
    model, tokenizer = getattr(sampler, "model", sampler), sampler.tokenizer
    # The same checks as `pavlit label`: prompts the tokenizer covers and the context holds, a response cap within it.
    check_prompts(job.problems(), model, tokenizer, plan.max_new_tokens)
    if sweep is not None:
        check_prompts(job.problems(sweep.split, sweep.num_problems), model, tokenizer)
    stats: dict[str, Any] = {}
    sweep_summary = None
    if sweep is not None:
        swept = _method(methods, sweep.method)
        val_problems = job.problems(sweep.split, sweep.num_problems)
        sweep_budgets = sweep.budgets or swept.budgets or budgets
        n_chunks = math.ceil(len(val_problems) / job.chunk_size)
        settings = job.settings(
            max_new_tokens=plan.max_new_tokens,
            split=sweep.split,
            num_problems=sweep.num_problems,
            method=_describe_methods([swept], sweep_budgets)[0],
            alphas=sweep.alphas,
        )
        store = ShardStore(out / "sweep", settings)
        units = []
        for alpha in sweep.alphas:
            variant = Method(swept.name, swept.search, _with_alpha(swept.reward, alpha), sweep_budgets)
            units += [_Unit(variant, f"alpha={alpha:g}", sweep_budgets, c) for c in range(n_chunks)]
        stats["sweep"] = _work(job, units, store, val_problems, sampler, fabric, "α sweep")
        fabric.barrier()
        sweep_summary = _choose_alpha(store, sweep, bootstrap, job.seed)
        for name in [sweep.method, *sweep.apply_to]:
            _method(methods, name).reward.alpha = sweep_summary["chosen"]

    problems = job.problems()
    n_chunks = math.ceil(len(problems) / job.chunk_size)
    settings = job.settings(
        max_new_tokens=plan.max_new_tokens,
        split=job.split,
        num_problems=job.num_problems,
        methods=_describe_methods(methods, budgets),
    )
    store = ShardStore(out, settings)
    units = [_Unit(m, m.name, m.budgets or budgets, c) for m in methods for c in range(n_chunks)]
    stats["test"] = _work(job, units, store, problems, sampler, fabric, "search")
    fabric.barrier()
    if rank != 0:
        return stats

    records = list(store.records())  # read the shards once for every summary below
    points = report.summarise(records, n_resamples=bootstrap, seed=job.seed)
    baseline, target = _efficiency_lines(methods, plan.efficiency)
    lines = {p.line for p in points}
    eff = report.compute_efficiency(points, baseline, target) if baseline in lines and target in lines else None
    header = {
        "task": f"{type(task).__name__} ({job.split}, {len(problems)} problems)",
        "policy": describe(job.policy),
        "seed": job.seed,
        "bootstrap resamples": bootstrap,
        "methods": ", ".join(f"`{m.name}` = {m.search!r} + {m.reward!r}" for m in methods),
    }
    report.plot_accuracy_vs_compute(points, out / PLOT_NAME, title=f"{type(task).__name__}: accuracy vs compute")
    decisions = report.tree_decisions(records)
    paired = paired_differences(records, n_resamples=bootstrap, seed=job.seed)
    markdown = report.render_markdown(points, eff, header, sweep_summary, PLOT_NAME, decisions, render_paired(paired))
    results = {
        "settings": settings,
        "paired": paired,
        "points": report.points_as_dicts(points),
        "efficiency": eff,
        "alpha_sweep": sweep_summary,
        "tree_decisions": decisions,
        "this_run": stats,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", markdown)
    return results


def _with_alpha(reward: Reward, alpha: float) -> Reward:
    import copy

    variant = copy.copy(reward)  # shares loaded verifiers; only alpha differs
    variant.alpha = float(alpha)
    return variant


def _choose_alpha(store: ShardStore, sweep: AlphaSweep, bootstrap: int, seed: int) -> dict[str, Any]:
    points = report.summarise(store.records(), n_resamples=bootstrap, seed=seed)
    rows = []
    for alpha in sweep.alphas:
        mine = [p for p in points if p.line == f"alpha={alpha:g}"]
        if not mine:
            raise RuntimeError(f"the α sweep has no records for α = {alpha:g}")
        rows.append(
            {
                "alpha": alpha,
                "accuracy": sum(p.accuracy for p in mine) / len(mine),
                "ci_low": sum(p.ci_low for p in mine) / len(mine),
                "ci_high": sum(p.ci_high for p in mine) / len(mine),
                "by_budget": {p.budget: p.accuracy for p in mine},
            }
        )
    best = max(rows, key=lambda r: (r["accuracy"], -r["alpha"]))
    return {"method": sweep.method, "split": sweep.split, "alphas": rows, "chosen": best["alpha"]}


def _efficiency_lines(methods: list[Method], efficiency: Efficiency) -> tuple[str | None, str | None]:
    from pavlit.rewards import ORMReward, PAVReward, PQVReward
    from pavlit.search.best_of_n import BestOfN
    from pavlit.search.tree import BeamSearch

    baseline, target = efficiency.baseline, efficiency.target
    if baseline is None:
        baseline = next(
            (m.name for m in methods if isinstance(m.search, BestOfN) and isinstance(m.reward, ORMReward)), None
        )
    if target is None:
        target = next(
            (
                m.name
                for m in methods
                if isinstance(m.search, BeamSearch)
                and isinstance(m.reward, PAVReward)
                and not isinstance(m.reward, PQVReward)
            ),
            None,
        )
    return baseline, target


def search_command(argv: list[str]) -> int:
    """Best-of-N / beam search with reward compositions over a split: accuracy-vs-compute table, plot, efficiency."""
    from pavlit.commands import parse_job

    kwargs = parse_job("pavlit search", search, argv, "configs/tiny/search.yaml")
    out = Path(kwargs["output_dir"])
    results = search(**kwargs)
    if "points" in results:
        print((out / "report.md").read_text(encoding="utf-8"))
    return 0
