"""Is a policy in the regime where process advantages can decide anything? Cheap measurements on countdown.

Two sub-commands, each printing one table and optionally writing JSON:

``pilot POLICY``
    Samples ``--samples`` responses per validation problem (temperature 1) and reports pass@1, pass@k, greedy
    accuracy, the policy's entropy per generated token (mean negative log-likelihood of its own samples, an
    unbiased estimate of the entropy at temperature 1), where responses fail (first invalid line, or valid steps
    that miss the target). Then, at the states along one sampled response per problem (question, after step 1,
    after step 2, ...), it samples ``--children`` next steps and reports the **distinct children per state**, the
    plug-in **step entropy** (nats, over distinct step texts), the share of valid children, and — with the task's
    exact solver — the share of valid children that keep the target reachable and the share of states whose
    children include both a reachable and a dead-end step (states where the choice of step matters).

``labels DIR``
    Statistics of ``pavlit label`` output: the share of labels strictly inside (0, 1), the mean ``|ΔQ̂|`` between
    consecutive prefixes of a seed rollout (how much one step changes the chance of success), and the mean
    binomial standard error of one label (the noise floor a verifier trained on them inherits).

Usage::

    python benchmarks/regime_map.py pilot runs/countdown/sft/policy --difficulty 2 --problems 100
    python benchmarks/regime_map.py labels runs/countdown/labels
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pavlit.tasks.countdown import CountdownTask, numbers_left, solvable  # noqa: E402


def _task(args: argparse.Namespace) -> CountdownTask:
    # n_train does not shape the validation and test splits (they are drawn first), so 0 keeps this fast.
    return CountdownTask(
        args.difficulty,
        args.task_seed,
        n_train=0,
        n_validation=args.n_validation,
        n_test=args.n_test,
        n_numbers=args.n_numbers,
        max_number=args.max_number,
        min_target=args.min_target,
        max_target=args.max_target,
    )


_FAILURE_KINDS = {
    "not of the form": "format",
    "not numbers separated": "format",
    "is not among": "number not available",
    "is not a non-negative integer": "negative or fractional",
    "not a non-negative": "negative or fractional",
    "numbers left are": "wrong 'left' list",
    "are left": "numbers unused",
    "target": "missed the target",
    "no 'Answer:'": "no answer line",
    "after the answer": "text after the answer",
}


def _failure_kind(reason: str) -> str:
    for needle, kind in _FAILURE_KINDS.items():
        if needle in reason:
            return kind
    return "wrong arithmetic" if ", not " in reason else "other"


def pilot(args: argparse.Namespace) -> dict:
    import torch

    from pavlit.modules.sft import pass_at_k, sample_correct_counts
    from pavlit.policy.sampler import Sampler
    from pavlit.policy.sources import Pretrained
    from pavlit.steps import split_steps

    torch.manual_seed(args.seed)
    model, tokenizer = Pretrained(path=args.policy).load()
    task = _task(args)
    problems = list(task.problems(args.split)[: args.problems])
    sampler = Sampler(model, tokenizer, temperature=args.temperature, seed=args.seed, max_batch=512)
    start = time.perf_counter()
    out = sampler.complete(
        [p.prompt for p in problems], n=args.samples, max_new_tokens=args.max_new_tokens, return_logprobs=True
    )
    k = args.samples
    counts, failures, nll, n_tokens = [], Counter(), 0.0, 0
    first_reachable = []
    for problem, texts, logprobs in zip(problems, out.texts, out.logprobs, strict=True):
        counts.append(sum(task.score(problem, t) >= 1.0 for t in texts))
        for text, lp in zip(texts, logprobs, strict=True):
            nll -= sum(lp)
            n_tokens += len(lp)
            result = task.check(problem, text)
            if not result.solved:
                failures[f"line {result.first_invalid + 1}: {_failure_kind(result.reason)}"] += 1
            steps = split_steps(text, "\n")
            if steps and not task.is_final_step(steps[0]):
                left = numbers_left(problem.metadata["numbers"], steps[:1])
                first_reachable.append(left is not None and solvable(left, problem.metadata["target"]))
    greedy = sample_correct_counts(Sampler(model, tokenizer, temperature=0.0), task, problems, 1, args.max_new_tokens)
    sampled_s = time.perf_counter() - start

    # States along one sampled response per problem: its valid steps so far (not the answer line).
    states = []
    for problem, texts in zip(problems, out.texts, strict=True):
        steps = [s for s in split_steps(texts[0], "\n") if not task.is_final_step(s)]
        for depth in range(len(problem.metadata["numbers"]) - 1):
            prefix = steps[:depth]
            if len(prefix) < depth or numbers_left(problem.metadata["numbers"], prefix) is None:
                break
            states.append((problem, prefix))
    children = sampler.next_step(
        [p.prompt + "".join(prefix) for p, prefix in states],
        n=args.children,
        max_new_tokens=args.max_step_tokens,
        seed=args.seed + 1,
    )
    by_depth = defaultdict(lambda: defaultdict(list))
    for (problem, prefix), texts in zip(states, children.texts, strict=True):
        depth = len(prefix)
        row = by_depth[depth]
        distinct = Counter(texts)
        row["distinct"].append(len(distinct))
        row["entropy"].append(-sum(c / len(texts) * math.log(c / len(texts)) for c in distinct.values()))
        reach = []
        for text in texts:
            left = numbers_left(problem.metadata["numbers"], [*prefix, text])
            row["valid"].append(left is not None)
            if left is not None:
                reach.append(solvable(left, problem.metadata["target"]))
        row["reachable"].extend(reach)
        row["mixed"].append(any(reach) and not all(reach))
        row["state_reachable"].append(
            solvable(numbers_left(problem.metadata["numbers"], prefix), problem.metadata["target"])
        )
    table = {}
    for depth in sorted(by_depth):
        row = by_depth[depth]
        table[depth] = {
            "states": len(row["distinct"]),
            "distinct_children": statistics.mean(row["distinct"]),
            "step_entropy_nats": statistics.mean(row["entropy"]),
            "valid_children": statistics.mean(row["valid"]),
            "reachable_among_valid": statistics.mean(row["reachable"]) if row["reachable"] else None,
            "states_reachable": statistics.mean(row["state_reachable"]),
            "states_with_reachable_and_dead_end_children": statistics.mean(row["mixed"]),
        }
    result = {
        "policy": args.policy,
        "task": vars(_task(args)) | {"_splits": None},
        "split": args.split,
        "problems": len(problems),
        "samples": k,
        "temperature": args.temperature,
        "pass@1": sum(pass_at_k(k, c, 1) for c in counts) / len(problems),
        f"pass@{k}": sum(pass_at_k(k, c, k) for c in counts) / len(problems),
        **{f"pass@{j}": sum(pass_at_k(k, c, j) for c in counts) / len(problems) for j in (2, 4, 8) if j < k},
        "greedy": sum(greedy) / len(problems),
        "nats_per_token": nll / max(n_tokens, 1),
        "first_step_keeps_target_reachable": statistics.mean(first_reachable) if first_reachable else None,
        "failures": dict(failures.most_common()),
        "by_depth": table,
        "seconds": round(time.perf_counter() - start, 1),
        "sampling_seconds": round(sampled_s, 1),
        "solved_counts": counts,
    }
    del result["task"]["_splits"]
    print(
        f"{args.split}: pass@1 {result['pass@1']:.3f}  pass@{k} {result[f'pass@{k}']:.3f}  "
        f"greedy {result['greedy']:.3f}"
        f"  {result['nats_per_token']:.3f} nats/token  first step keeps target reachable "
        f"{result['first_step_keeps_target_reachable']:.2f}  ({len(problems)} problems x {k}, {result['seconds']} s)"
    )
    print("failures (first bad line):", result["failures"])
    print(
        f"| depth | states | distinct children of {args.children} | step entropy (nats) | valid | reachable "
        "among valid | states with reachable and dead-end children |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for depth, row in table.items():
        reach = "—" if row["reachable_among_valid"] is None else f"{row['reachable_among_valid']:.2f}"
        print(
            f"| {depth} | {row['states']} | {row['distinct_children']:.2f} | {row['step_entropy_nats']:.2f} | "
            f"{row['valid_children']:.2f} | {reach} | {row['states_with_reachable_and_dead_end_children']:.2f} |"
        )
    return result


def labels(args: argparse.Namespace) -> dict:
    from pavlit.labeling.records import read_jsonl

    records = []
    for path in sorted(Path(args.labels).rglob("*.jsonl")):
        records.extend(r for r in read_jsonl(path, validate=False) if "q_mc" in r and "step_index" in r)
    if not records:
        raise SystemExit(f"{args.labels}: no step-label records (*.jsonl with q_mc) found")
    by_rollout = defaultdict(dict)
    for r in records:
        if r.get("policy", "pi") == "pi":
            by_rollout[(r["problem_id"], r.get("seed_index", 0), r.get("source", "seed"))][r["step_index"]] = r
    deltas, per_depth = [], defaultdict(list)
    for chain in by_rollout.values():
        for i in sorted(chain):
            if i - 1 in chain:
                delta = abs(chain[i]["q_mc"] - chain[i - 1]["q_mc"])
                deltas.append(delta)
                per_depth[i].append(delta)
    qs = [r["q_mc"] for r in records]
    se = [math.sqrt(r["q_mc"] * (1 - r["q_mc"]) / r["n_rollouts"]) for r in records if r["n_rollouts"]]
    result = {
        "records": len(records),
        "mean_q": statistics.mean(qs),
        "strictly_between_0_and_1": statistics.mean(0 < q < 1 for q in qs),
        "mean_abs_delta_q_per_step": statistics.mean(deltas) if deltas else None,
        "share_of_steps_with_abs_delta_q_over_0.25": statistics.mean(d > 0.25 for d in deltas) if deltas else None,
        "mean_abs_delta_q_by_step": {i: statistics.mean(v) for i, v in sorted(per_depth.items())},
        "mean_label_standard_error": statistics.mean(se),
    }
    print(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pilot", help="pass@k, entropy and step diversity of a policy on countdown")
    p.add_argument("policy")
    p.add_argument("--split", default="validation", choices=["validation", "test"])
    p.add_argument("--problems", type=int, default=100)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--children", type=int, default=8, help="next steps sampled per state")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-step-tokens", type=int, default=40)
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--n-validation", type=int, default=200, help="CountdownTask n_validation (as in the config)")
    p.add_argument("--n-test", type=int, default=200, help="CountdownTask n_test (as in the config)")
    p.add_argument("--n-numbers", type=int)
    p.add_argument("--max-number", type=int)
    p.add_argument("--min-target", type=int)
    p.add_argument("--max-target", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the result as JSON here")
    lab = sub.add_parser("labels", help="statistics of pavlit label output")
    lab.add_argument("labels")
    lab.add_argument("--out")
    args = parser.parse_args(argv)
    result = pilot(args) if args.command == "pilot" else labels(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
