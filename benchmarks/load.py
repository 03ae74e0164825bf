"""Memory under load: ``pavlit label`` and ``pavlit search`` over many problems with the tiny untrained model.

Each command runs as its own subprocess on the arithmetic task (``--problems`` of them, e.g. 500 and 2000). While
it works, the process's resident memory (``/proc/<pid>/status`` VmRSS) is sampled together with the number of
problems finished (committed shards × chunk size); at exit the kernel reports its peak RSS (``wait4``). Printed
per command and size: peak RSS, and the growth of RSS per 1000 problems processed — the least-squares slope of
RSS against problems done over the second half of the work, after start-up, so the memory a streaming job needs
once (model, buffers, allocator pools) does not count; a job that accumulates per-problem state shows a steady
positive slope, and a larger peak at a larger ``--problems``. Search runs best-of-N with a cheap reward: an
untrained ORM exported to the output folder, plus majority vote. Example::

    OMP_NUM_THREADS=1 python benchmarks/load.py --problems 500 2000 --out runs/load
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "max_position": 128}


def _task(n_problems: int) -> dict[str, Any]:
    n = {"n_train": n_problems, "n_validation": 0, "n_test": n_problems}
    return {"class_path": "ArithmeticTask", "init_args": {"difficulty": 1, "seed": 0, **n}}


def label_config(out: Path, n_problems: int, chunk_size: int) -> dict[str, Any]:
    return {
        "task": _task(n_problems),
        "policy": {"class_path": "TinyPolicy", "init_args": TINY},
        "output_dir": str(out),
        "split": "train",
        "num_problems": n_problems,
        "label": {"n_cov": 1, "n_mc": 2, "max_steps": 4, "max_new_tokens": 32},
        "sampler": {"max_batch": 256},
        "chunk_size": chunk_size,
        "seed": 0,
    }


def search_config(out: Path, n_problems: int, chunk_size: int, orm: Path) -> dict[str, Any]:
    return {
        "task": _task(n_problems),
        "policy": {"class_path": "TinyPolicy", "init_args": TINY},
        "output_dir": str(out),
        "split": "test",
        "num_problems": n_problems,
        "methods": [
            {
                "name": "orm_bon",
                "search": {"class_path": "BestOfN"},
                "reward": {"class_path": "ORMReward", "init_args": {"verifier": str(orm)}},
            },
            {"name": "majority", "search": {"class_path": "BestOfN", "init_args": {"pick": "majority"}}},
        ],
        "budgets": [1, 4],
        "max_new_tokens": 32,
        "chunk_size": chunk_size,
        "bootstrap": 100,
        "seed": 0,
    }


def export_untrained_orm(folder: Path) -> Path:
    from pavlit.modules.orm import ORMModule
    from pavlit.policy.sources import TinyPolicy

    if not (folder / "pavlit_verifier.json").exists():
        ORMModule(source=TinyPolicy(**TINY)).save_pretrained(folder)
    return folder


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares MiB per problem of ``(problems_done, rss_mib)`` points; None with fewer than 2 distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def measure(command: str, config: dict[str, Any], out: Path, chunk_size: int) -> dict:
    """Run ``pavlit <command>`` on ``config``; sample RSS against problems done; return the measurements.

    A problem counts as processed once the shard holding it is committed; for search, once per method (a unit of
    work is one method on one chunk).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = out.parent / f"{out.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    samples: list[tuple[int, float]] = []
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "pavlit", command, "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss_mib(process.pid)
            if rss is not None:
                samples.append((len(list(out.glob("chunk-*.jsonl"))), rss))
            time.sleep(0.25)
    returncode = os.waitstatus_to_exitcode(status)
    process.returncode = returncode  # reaped by wait4 above
    if returncode != 0:
        raise RuntimeError(f"pavlit {command} failed (exit {returncode}); see {log}")
    n_shards = len(list(out.glob("chunk-*.jsonl")))
    # While working: after the first shard, before the last (then the job summarises and exits).
    working = [(shards * chunk_size, rss) for shards, rss in samples if 0 < shards < n_shards]
    slope = _slope([(x, y) for x, y in working if x >= n_shards * chunk_size / 2])
    return {
        "command": command,
        "problems": config["num_problems"] if config.get("num_problems") else None,
        "problems_processed": n_shards * chunk_size,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "rss_at_first_shard_mib": round(working[0][1], 1) if working else None,
        "rss_before_last_shard_mib": round(working[-1][1], 1) if working else None,
        "growth_mib_per_1000_problems": None if slope is None else round(slope * 1000, 2),
        "samples": len(working),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, nargs="+", default=[500, 2000], help="problem counts to run")
    parser.add_argument("--commands", nargs="+", default=["label", "search"], choices=["label", "search"])
    parser.add_argument("--chunk_size", type=int, default=16, help="problems per shard")
    parser.add_argument("--out", default="runs/load", help="output folder (each run in its own subfolder)")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()

    root = Path(args.out)
    orm = export_untrained_orm(root / "orm") if "search" in args.commands else None
    rows = []
    for n_problems in args.problems:
        for command in args.commands:
            out = root / f"{command}_{n_problems}"
            if out.exists():
                raise SystemExit(f"{out} exists; use a new --out (a resumed job would not measure the full run)")
            if command == "label":
                config = label_config(out, n_problems, args.chunk_size)
            else:
                config = search_config(out, n_problems, args.chunk_size, orm)
            row = measure(command, config, out, args.chunk_size)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| command | problems | processed | seconds | peak RSS (MiB) | RSS growth per 1000 processed (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        growth = row["growth_mib_per_1000_problems"]
        print(
            f"| {row['command']} | {row['problems']} | {row['problems_processed']} | {row['seconds']} "
            f"| {row['peak_rss_mib']} | {'n/a' if growth is None else growth} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
