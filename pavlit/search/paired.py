"""Paired differences between the methods of one search run: per budget, on the same problems.

Both methods answer every problem, so the accuracy difference has a *paired* bootstrap 95% interval (problems
resampled, the per-problem difference averaged), far tighter than two unpaired intervals side by side. Each row
also counts the problems where the two returned different responses: two methods can only differ there.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from pavlit.search.report import bootstrap_ci

__all__ = ["by_method_and_budget", "paired_differences", "render_paired"]


def by_method_and_budget(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], dict[str, Mapping[str, Any]]]:
    """``{(method, budget): {problem_id: record}}`` in the order the methods first appear."""
    grouped: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for record in records:
        grouped[(record["method"], int(record["budget"]))][record["problem_id"]] = record
    return grouped


def paired_differences(
    records: Iterable[Mapping[str, Any]],
    pairs: Sequence[tuple[str, str]] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per ``(first, second)`` pair and budget both ran at: ``second − first`` with its paired CI.

    Args:
        records: A search run's records (``method``, ``budget``, ``problem_id``, ``correct``, ``response``).
        pairs: ``(first, second)`` method names; default every pair of methods that share a budget, the earlier
            method (in record order: the config's order, baselines first) as ``first``.
        n_resamples: Bootstrap resamples.
        seed: Bootstrap seed.
    """
    grouped = by_method_and_budget(records)
    methods = list(dict.fromkeys(method for method, _ in grouped))
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]
    rows = []
    for first, second in pairs:
        budgets = sorted({b for m, b in grouped if m == first} & {b for m, b in grouped if m == second})
        for budget in budgets:
            a, b = grouped[(first, budget)], grouped[(second, budget)]
            problems = sorted(set(a) & set(b))
            if not problems:
                continue
            correct_a = torch.tensor([float(a[p]["correct"]) for p in problems])
            correct_b = torch.tensor([float(b[p]["correct"]) for p in problems])
            low, high = bootstrap_ci(correct_b - correct_a, n_resamples=n_resamples, seed=seed)
            rows.append(
                {
                    "first": first,
                    "second": second,
                    "budget": budget,
                    "problems": len(problems),
                    "different_responses": sum(a[p].get("response") != b[p].get("response") for p in problems),
                    "accuracy_first": float(correct_a.mean()),
                    "accuracy_second": float(correct_b.mean()),
                    "difference": float((correct_b - correct_a).mean()),
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return rows


def render_paired(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: the paired table, with whether each interval excludes 0."""
    if not rows:
        return []
    lines = [
        "## Paired differences (same problems)",
        "",
        "`second − first` accuracy with a paired bootstrap 95% CI over problems; a CI that contains 0 does not show",
        "a difference. *Different responses*: problems where the two methods returned different text.",
        "",
        "| second − first | N / B | problems | different responses | accuracies | difference [95% CI] |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        excludes = r["ci_low"] > 0 or r["ci_high"] < 0
        lines.append(
            f"| `{r['second']}` − `{r['first']}` | {r['budget']} | {r['problems']} | {r['different_responses']} | "
            f"{r['accuracy_second']:.3f} vs {r['accuracy_first']:.3f} | {r['difference']:+.3f} "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]{' **(excludes 0)**' if excludes else ''} |"
        )
    return lines + [""]
