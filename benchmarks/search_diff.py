"""Where do two search methods of one ``pavlit search`` run actually differ? Paired, per budget.

For every pair of methods (default: every pair that shares budgets) and budget, on the same problems: how many
problems the two return a *different* response for, each one's accuracy, and the accuracy difference with a
paired bootstrap 95% interval over problems (far tighter than comparing two unpaired intervals, because both
methods see the same problems). Example::

    python benchmarks/search_diff.py runs/tiny/search_diagnose --pairs pqv_beam:pav_beam mc_pqv_beam:mc_pav_beam
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import torch

from pavlit.search.report import bootstrap_ci


def load(folder: Path) -> dict[tuple[str, int], dict[str, dict]]:
    """``{(method, budget): {problem_id: record}}`` from a search output folder's ``chunk-*.jsonl``."""
    records: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    files = sorted(folder.glob("chunk-*.jsonl"))
    if not files:
        raise SystemExit(f"{folder}: no chunk-*.jsonl records (is it a pavlit search output_dir?)")
    for file in files:
        for line in file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[(record["method"], int(record["budget"]))][record["problem_id"]] = record
    return records


def compare(records: dict, first: str, second: str, n_resamples: int) -> list[dict]:
    """One row per budget both methods ran at."""
    budgets = sorted({b for m, b in records if m == first} & {b for m, b in records if m == second})
    rows = []
    for budget in budgets:
        a, b = records[(first, budget)], records[(second, budget)]
        problems = sorted(set(a) & set(b))
        if not problems:
            continue
        ca = torch.tensor([float(a[p]["correct"]) for p in problems])
        cb = torch.tensor([float(b[p]["correct"]) for p in problems])
        low, high = bootstrap_ci(cb - ca, n_resamples=n_resamples)
        rows.append(
            {
                "pair": f"{first} → {second}",
                "budget": budget,
                "problems": len(problems),
                "different_responses": sum(a[p]["response"] != b[p]["response"] for p in problems),
                "accuracy_first": float(ca.mean()),
                "accuracy_second": float(cb.mean()),
                "difference": float((cb - ca).mean()),
                "ci": (low, high),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a pavlit search output_dir")
    parser.add_argument("--pairs", nargs="*", default=None, help="first:second method names (default: all pairs)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    records = load(args.folder)
    methods = list(dict.fromkeys(m for m, _ in records))
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else list(itertools.combinations(methods, 2))
    for first, second in pairs:
        for name in (first, second):
            if name not in methods:
                raise SystemExit(f"{args.folder}: no method {name!r}; it has {methods}")
    print("| first → second | N or B | problems | different responses | accuracy | difference [95% CI] |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for first, second in pairs:
        for row in compare(records, first, second, args.bootstrap):
            low, high = row["ci"]
            print(
                f"| {row['pair']} | {row['budget']} | {row['problems']} | {row['different_responses']} | "
                f"{row['accuracy_first']:.3f} → {row['accuracy_second']:.3f} | "
                f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}] |"
            )


if __name__ == "__main__":
    main()
