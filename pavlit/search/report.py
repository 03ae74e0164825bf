"""Accuracy-vs-compute summaries of search results: bootstrap CIs, the compute-efficiency ratio, markdown, a plot.

Pure functions of the per-problem records ``pavlit search`` writes (one per method × budget × problem)::

    {"method": "pav_beam", "budget": 8, "problem_id": "test-00003", "correct": true, "tokens": 1234,
     "step_samples": 60, "verifier_calls": 60, "reward_tokens": 0, "picks": {"majority": false, ...}}

A *line* is a method (its chosen response) or one of its extra picks (``"orm_bon [majority]"``,
``"orm_bon [pass@N]"``), and a *point* is a line at one budget: accuracy over problems with a percentile
bootstrap 95% CI (problems resampled with replacement, the same resamples for every point, so lines compare
paired), and mean compute per problem.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Point",
    "bootstrap_ci",
    "compute_efficiency",
    "interpolate_log",
    "line_label",
    "plot_accuracy_vs_compute",
    "render_markdown",
    "summarise",
    "tokens_to_reach",
]

PICK_LABELS = {"oracle": "pass@N", "majority": "majority", "weighted": "weighted vote", "reward": "reward"}
COST_KEYS = ("tokens", "step_samples", "verifier_calls", "reward_tokens")


@dataclass
class Point:
    """One line at one budget."""

    line: str
    method: str
    pick: str | None
    budget: int
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    tokens: float
    step_samples: float
    verifier_calls: float
    reward_tokens: float


def line_label(method: str, pick: str | None) -> str:
    """``method`` for the chosen response, ``method [pick]`` for an extra pick."""
    return method if pick is None else f"{method} [{PICK_LABELS.get(pick, pick)}]"


def bootstrap_ci(
    correct: torch.Tensor, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``correct`` (``[n_problems]`` of 0/1), resampling problems.

    Args:
        correct: Per-problem outcomes.
        n_resamples: Bootstrap resamples.
        level: Coverage of the interval.
        seed: Seed of the resampling (the same seed draws the same problem indices for every line).

    Returns:
        ``(low, high)``; both equal the mean when there is one problem or no resample.
    """
    correct = torch.as_tensor(correct, dtype=torch.float64).flatten()
    n = correct.numel()
    if n == 0:
        raise ValueError("no outcomes to bootstrap")
    if n == 1 or n_resamples < 1:
        mean = float(correct.mean())
        return mean, mean
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (n_resamples, n), generator=generator)
    means = correct[index].mean(dim=1)
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high


def summarise(records: Iterable[Mapping[str, Any]], n_resamples: int = 1000, seed: int = 0) -> list[Point]:
    """One :class:`Point` per (line, budget), lines in first-seen order, budgets ascending.

    Every line at every budget must cover the same problems (it does when it comes from one ``pavlit search``).
    """
    groups: dict[tuple[str, str | None], dict[int, list[Mapping[str, Any]]]] = {}
    for record in records:
        lines = [(None, bool(record["correct"]))] + [(k, bool(v)) for k, v in (record.get("picks") or {}).items()]
        for pick, correct in lines:
            by_budget = groups.setdefault((record["method"], pick), {})
            # Only what the summary reads: a record's response and candidates are never kept (memory stays flat).
            kept = {"problem_id": record["problem_id"], "correct": correct, **{k: record.get(k) for k in COST_KEYS}}
            by_budget.setdefault(int(record["budget"]), []).append(kept)
    points = []
    for (method, pick), by_budget in groups.items():
        for budget in sorted(by_budget):
            rows = sorted(by_budget[budget], key=lambda r: str(r["problem_id"]))
            correct = torch.tensor([float(r["correct"]) for r in rows], dtype=torch.float64)
            low, high = bootstrap_ci(correct, n_resamples, seed=seed)
            costs = {key: sum(float(r.get(key) or 0) for r in rows) / len(rows) for key in COST_KEYS}
            points.append(
                Point(
                    line_label(method, pick), method, pick, budget, len(rows), float(correct.mean()), low, high, **costs
                )
            )
    return points


def interpolate_log(x: float, xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """``y`` at ``x`` by linear interpolation in ``log x`` over increasing ``xs``; ``None`` outside their range."""
    if not xs or x < xs[0] or x > xs[-1] or x <= 0:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1 = xs[i - 1], xs[i]
            if x1 == x0:
                return ys[i]
            frac = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return ys[i - 1] + frac * (ys[i] - ys[i - 1])
    return ys[0]


def tokens_to_reach(accuracy: float, tokens: Sequence[float], accuracies: Sequence[float]) -> float | None:
    """Compute at which a curve first reaches ``accuracy``, interpolated on log-compute; ``None`` if never.

    The curve is read in order of increasing compute; if its first point already reaches ``accuracy`` the answer
    is that point's compute (no extrapolation below the smallest budget).
    """
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    xs, ys = [tokens[i] for i in order], [accuracies[i] for i in order]
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= accuracy:
            if i == 0 or ys[i] == ys[i - 1] or xs[i - 1] <= 0:
                return x
            frac = (accuracy - ys[i - 1]) / (ys[i] - ys[i - 1])
            return math.exp(math.log(xs[i - 1]) + frac * (math.log(x) - math.log(xs[i - 1])))
    return None


def compute_efficiency(points: Sequence[Point], baseline: str, target: str) -> dict[str, Any]:
    """The compute-efficiency ratio of docs/method.md §5 between two lines.

    ``ratio`` = generated tokens ``baseline`` spends at its largest budget ÷ tokens ``target`` needs to reach the
    same accuracy (interpolated on log-compute), ``None`` when ``target`` never reaches it or the baseline's accuracy
    is 0 (nothing to match). Also the ``target``
    accuracy at the baseline's compute (interpolated; ``None`` outside the target's measured range), and
    ``ratio_vs_first_reach``: the same quotient with the tokens at which the baseline *first* reaches its final
    accuracy. When best-of-N has saturated (its accuracy flat over the last budgets) the paper's ratio grows with
    the largest N measured, whatever the target does; this one does not.
    """
    base = sorted((p for p in points if p.line == baseline), key=lambda p: p.budget)
    tgt = sorted((p for p in points if p.line == target), key=lambda p: p.tokens)
    if not base or not tgt:
        raise ValueError(f"need both lines {baseline!r} and {target!r} in the results")
    top = base[-1]
    needed = tokens_to_reach(top.accuracy, [p.tokens for p in tgt], [p.accuracy for p in tgt])
    at_equal = interpolate_log(top.tokens, [p.tokens for p in tgt], [p.accuracy for p in tgt])
    best = max(tgt, key=lambda p: (p.accuracy, -p.tokens))
    by_tokens = sorted(base, key=lambda p: p.tokens)
    first = tokens_to_reach(top.accuracy, [p.tokens for p in by_tokens], [p.accuracy for p in by_tokens])
    usable = needed is not None and needed > 0 and top.accuracy > 0
    return {
        "baseline": baseline,
        "target": target,
        "baseline_budget": top.budget,
        "baseline_accuracy": top.accuracy,
        "baseline_tokens": top.tokens,
        "target_tokens_to_match": needed,
        # Matching a baseline that solves nothing is free: no ratio then, whatever the token counts say.
        "ratio": top.tokens / needed if usable else None,
        "baseline_tokens_first_reach": first,
        "ratio_vs_first_reach": first / needed if usable and first is not None else None,
        "baseline_solves_nothing": top.accuracy <= 0,
        "reached_at_smallest_budget": needed is not None
        and needed == tgt[0].tokens
        and tgt[0].accuracy >= top.accuracy,
        "target_accuracy_at_baseline_tokens": at_equal,
        "target_best_accuracy": best.accuracy,
        "target_best_budget": best.budget,
        "target_best_tokens": best.tokens,
    }


def tree_decisions(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per tree-search method and budget: mean finished candidates, contested and reranked selections per problem.

    Records without ``contested`` (best-of-N, or written before pavlit recorded it) are skipped. A method whose
    ``reranked`` is 0 everywhere chose exactly what ranking by ``Q̂^π`` alone would have (PQV beam search).
    """
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for record in records:
        if "contested" in record:
            groups.setdefault((record["method"], int(record["budget"])), []).append(record)
    rows = []
    for (method, budget), group in groups.items():
        n = len(group)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "problems": n,
                "candidates": sum(r.get("candidates") or 0 for r in group) / n,
                "contested": sum(r["contested"] for r in group) / n,
                "reranked": sum(r["reranked"] for r in group) / n,
                "problems_reranked": sum(r["reranked"] > 0 for r in group) / n,
            }
        )
    return sorted(rows, key=lambda r: (r["method"], r["budget"]))


def _fmt_tokens(x: float) -> str:
    return f"{x:,.0f}"


def render_markdown(
    points: Sequence[Point],
    efficiency: Mapping[str, Any] | None = None,
    header: Mapping[str, Any] | None = None,
    sweep: Mapping[str, Any] | None = None,
    plot_name: str | None = None,
    decisions: Sequence[Mapping[str, Any]] | None = None,
    paired: Sequence[str] | None = None,
) -> str:
    """The ``report.md`` of a search run: settings, the paired differences (``paired``: markdown lines from
    :func:`pavlit.search.paired.render_paired`) first, the accuracy-vs-compute table, efficiency, α sweep, and (given
    :func:`tree_decisions` rows) where the tree searches' reward composition decided anything."""
    lines = ["# Test-time search: accuracy vs compute", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    if header:
        lines.append("")
    lines += list(paired or [])
    lines += [
        "Accuracy over problems with a percentile bootstrap 95% CI (problems resampled); compute is the mean per",
        "problem: tokens generated by the policy for the search, step samples, verifier calls, and tokens the reward",
        "itself generated (Monte-Carlo oracle only). `[pass@N]` is the oracle pick among the method's candidates",
        "(best-of-N's samples; a tree search's finished candidates): the ceiling of any final pick.",
        "",
        "| method | N / B | accuracy | 95% CI | gen. tokens | step samples | verifier calls | reward tokens |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        lines.append(
            f"| {p.line} | {p.budget} | {p.accuracy:.3f} | [{p.ci_low:.3f}, {p.ci_high:.3f}] | "
            f"{_fmt_tokens(p.tokens)} | {p.step_samples:,.1f} | {p.verifier_calls:,.1f} | "
            f"{_fmt_tokens(p.reward_tokens)} |"
        )
    lines.append("")
    if efficiency is not None:
        e = efficiency
        lines += ["## Compute efficiency", ""]
        lines.append(
            f"Baseline `{e['baseline']}` at its largest budget ({e['baseline_budget']}): accuracy "
            f"{e['baseline_accuracy']:.3f} for {_fmt_tokens(e['baseline_tokens'])} generated tokens per problem."
        )
        if e.get("baseline_solves_nothing"):
            lines.append(
                "The baseline solves no problem at that budget, so matching it means nothing: no efficiency ratio "
                f"(`{e['target']}`'s best: {e['target_best_accuracy']:.3f} at budget {e['target_best_budget']}, "
                f"{_fmt_tokens(e['target_best_tokens'])} tokens)."
            )
        elif e["ratio"] is None:
            lines.append(
                f"`{e['target']}` does **not reach** that accuracy at the budgets measured (its best: "
                f"{e['target_best_accuracy']:.3f} at budget {e['target_best_budget']}, "
                f"{_fmt_tokens(e['target_best_tokens'])} tokens); no efficiency ratio."
            )
        else:
            bound = (
                " (already at its smallest budget, so this is a lower bound)" if e["reached_at_smallest_budget"] else ""
            )
            lines.append(
                f"`{e['target']}` reaches it with {_fmt_tokens(e['target_tokens_to_match'])} tokens (interpolated on "
                f"log-compute): **{e['ratio']:.2f}× more compute-efficient**{bound}."
            )
            first = e.get("baseline_tokens_first_reach")
            if first is not None and first < e["baseline_tokens"]:
                lines.append(
                    f"`{e['baseline']}` itself first reaches that accuracy at {_fmt_tokens(first)} tokens, so part of "
                    f"the ratio is the baseline saturating; against that point the ratio is "
                    f"**{e['ratio_vs_first_reach']:.2f}×**."
                )
        if e["target_accuracy_at_baseline_tokens"] is not None:
            lines.append(
                f"At the baseline's compute, `{e['target']}` has accuracy "
                f"{e['target_accuracy_at_baseline_tokens']:.3f} (interpolated) vs {e['baseline_accuracy']:.3f}."
            )
        else:
            lines.append(f"The baseline's compute lies outside the range measured for `{e['target']}`.")
        lines.append("")
    if sweep is not None:
        lines += [f"## α sweep on `{sweep['split']}` (method `{sweep['method']}`)", ""]
        lines += ["| α | accuracy | 95% CI |", "| ---: | ---: | --- |"]
        for row in sweep["alphas"]:
            lines.append(
                f"| {row['alpha']:.2f} | {row['accuracy']:.3f} | [{row['ci_low']:.3f}, {row['ci_high']:.3f}] |"
            )
        lines += ["", f"Chosen α = **{sweep['chosen']:.2f}** (highest accuracy, smaller α on ties); test uses it.", ""]
    if decisions:
        lines += [
            "## Where the reward composition decided",
            "",
            "Per problem: distinct finished candidates; *contested* selections (more children than free beam",
            "slots, so the ranking dropped some; elsewhere every child is kept whatever its reward); *reranked* ones",
            "(the kept set differs from ranking by `Q̂^π` alone: the selections the advantage term changed). Two",
            "compositions can only differ where the search is contested.",
            "",
            "| method | B | candidates | contested | reranked | problems with a reranked selection |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in decisions:
            lines.append(
                f"| {row['method']} | {row['budget']} | {row['candidates']:.1f} | {row['contested']:.2f} | "
                f"{row['reranked']:.2f} | {row['problems_reranked']:.0%} |"
            )
        lines.append("")
    if plot_name:
        lines += [f"![accuracy vs generated tokens]({plot_name})", ""]
    return "\n".join(lines)


def plot_accuracy_vs_compute(points: Sequence[Point], path: str | Path, title: str = "") -> Path:
    """Accuracy vs generated tokens per problem (log x), one line per method/pick, CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = list(dict.fromkeys(p.line for p in points))
    # Many lines (every method with its extra picks): one distinct colour each, the legend beside the axes.
    colours = plt.get_cmap("tab20" if len(lines) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7 + 2.5 * (len(lines) > 6), 4.5), dpi=120)
    for index, line in enumerate(lines):
        pts = sorted((p for p in points if p.line == line), key=lambda p: p.tokens)
        xs = [max(p.tokens, 1e-9) for p in pts]
        ys = [p.accuracy for p in pts]
        err = [[p.accuracy - p.ci_low for p in pts], [p.ci_high - p.accuracy for p in pts]]
        style = "--" if pts[0].pick == "oracle" else "-"
        ax.errorbar(
            xs, ys, yerr=err, fmt="o" + style, capsize=2, markersize=4, linewidth=1.2, label=line,
            color=colours(index % colours.N),
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "accuracy vs compute")
    ax.grid(True, which="both", alpha=0.3)
    if len(lines) > 6:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def points_as_dicts(points: Sequence[Point]) -> list[dict[str, Any]]:
    """JSON-ready points."""
    return [asdict(p) for p in points]
