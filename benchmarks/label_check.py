"""Check a `pavlit label` dataset against an independent re-estimate: fresh seeds, many more rollouts.

For a few prefixes (drawn at random among those with mixed labels, plus the question-only ones), sample
``--rollouts`` new completions from the same policy and compare each stored ``q_mc`` with the new estimate; a
z-score is computed from the stored label's own binomial error. Example::

    python benchmarks/label_check.py runs/tiny/labels --policy runs/tiny/sft/policy --prefixes 12 --rollouts 512
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import yaml

from pavlit.jobs.shards import ShardStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labels", help="a pavlit label output folder")
    parser.add_argument("--policy", required=True, help="the policy folder the labels were sampled from")
    parser.add_argument("--prefixes", type=int, default=12)
    parser.add_argument("--rollouts", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    from jsonargparse import ArgumentParser

    from pavlit import registry
    from pavlit.interfaces import Task
    from pavlit.policy.sampler import Sampler
    from pavlit.policy.sources import Pretrained

    folder = Path(args.labels)
    settings = json.loads((folder / "job.json").read_text())["settings"]
    registry.load_all()
    # The task exactly as the labeling job built it, from the resolved config it saved.
    config = yaml.safe_load((folder / "config.yaml").read_text())
    task_parser = ArgumentParser()
    task_parser.add_argument("--task", type=Task)
    task = task_parser.instantiate_classes(task_parser.parse_object({"task": config["task"]})).task
    records = [r for r in ShardStore(folder, settings).records() if r["source"] == "seed" and r["policy"] == "pi"]
    rng = random.Random(args.seed)
    mixed = [r for r in records if 0 < r["q_mc"] < 1]
    chosen = rng.sample(mixed, min(args.prefixes, len(mixed)))
    by_id = {p.id: p for p in task.problems(settings["split"])}
    model, tokenizer = Pretrained(args.policy).load()
    sampler = Sampler(model, tokenizer, max_new_tokens=settings["label"]["max_new_tokens"], max_batch=512)
    out = sampler.complete(
        [r["prompt"] + "".join(r["steps"]) for r in chosen], n=args.rollouts, seed=args.seed, delimiter="\n"
    )
    print(f"{'problem':>12} {'h':>2} {'stored q':>9} {'n':>3} {'fresh q':>8} {'z':>6}")
    zs = []
    for record, completions in zip(chosen, out.texts):
        head = "".join(record["steps"])
        fresh = sum(task.score(by_id[record["problem_id"]], head + c) for c in completions) / len(completions)
        sigma = math.sqrt(max(fresh * (1 - fresh), 1e-4) / record["n_rollouts"])
        z = (record["q_mc"] - fresh) / sigma
        zs.append(z)
        print(
            f"{record['problem_id']:>12} {record['step_index']:>2} {record['q_mc']:>9.3f} "
            f"{record['n_rollouts']:>3} {fresh:>8.3f} {z:>6.2f}"
        )
    print(f"mean z {sum(zs) / len(zs):+.2f}, max |z| {max(abs(z) for z in zs):.2f} over {len(zs)} prefixes")


if __name__ == "__main__":
    main()
