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
from pathlib import Path

from pavlit.jobs.jsonl import json_objects
from pavlit.search.paired import by_method_and_budget, paired_differences


def load(folder: Path) -> list[dict]:
    """The records of a search output folder's ``chunk-*.jsonl``."""
    files = sorted(folder.glob("chunk-*.jsonl"))
    if not files:
        raise SystemExit(f"{folder}: no chunk-*.jsonl records (is it a pavlit search output_dir?)")
    return [record for file in files for _, record in json_objects(file)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a pavlit search output_dir")
    parser.add_argument("--pairs", nargs="*", default=None, help="first:second method names (default: all pairs)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    records = load(args.folder)
    methods = list(dict.fromkeys(m for m, _ in by_method_and_budget(records)))
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else list(itertools.combinations(methods, 2))
    for first, second in pairs:
        for name in (first, second):
            if name not in methods:
                raise SystemExit(f"{args.folder}: no method {name!r}; it has {methods}")
    print("| first → second | N or B | problems | different responses | accuracy | difference [95% CI] |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for row in paired_differences(records, pairs, n_resamples=args.bootstrap):
        print(
            f"| {row['first']} → {row['second']} | {row['budget']} | {row['problems']} | "
            f"{row['different_responses']} | {row['accuracy_first']:.3f} → {row['accuracy_second']:.3f} | "
            f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] |"
        )


if __name__ == "__main__":
    main()
