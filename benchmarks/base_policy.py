"""How good is a base policy? Sampled pass@1 and pass@k of an exported policy folder on a task's splits.

Samples ``n`` responses (default 16, temperature 1) per problem with pavlit's :class:`Sampler`, scores them with
the task's checker and prints, per split, the unbiased pass@1 estimated from the ``n`` samples, pass@n, greedy
accuracy (temperature 0, one sample) and the sampling throughput. A useful base policy for PAVs is *mediocre*:
pass@1 well below pass@n leaves room for search and RL.

Usage::

    python benchmarks/base_policy.py runs/tiny/sft/policy                 # validation split, 16 samples
    python benchmarks/base_policy.py runs/tiny/sft/policy --splits validation test --out base_policy.json
    python benchmarks/base_policy.py path/to/policy --difficulty 3 --problems 100 --samples 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pavlit.modules.sft import pass_at_k, sample_correct_counts  # noqa: E402
from pavlit.policy.sampler import Sampler  # noqa: E402
from pavlit.policy.sources import Pretrained  # noqa: E402
from pavlit.tasks.arithmetic import ArithmeticTask  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="an exported policy folder (e.g. runs/tiny/sft/policy)")
    parser.add_argument("--splits", nargs="+", default=["validation"], choices=["train", "validation", "test"])
    parser.add_argument("--samples", type=int, default=16, help="responses sampled per problem (k of pass@k)")
    parser.add_argument("--problems", type=int, default=200, help="first N problems of each split")
    parser.add_argument("--n-validation", type=int, default=200, help="ArithmeticTask n_validation (as in the config)")
    parser.add_argument("--n-test", type=int, default=200, help="ArithmeticTask n_test (as in the config)")
    parser.add_argument("--difficulty", type=int, default=2, help="ArithmeticTask difficulty (as in the SFT config)")
    parser.add_argument("--task-seed", type=int, default=0, help="ArithmeticTask seed (as in the SFT config)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    model, tokenizer = Pretrained(path=args.policy, dtype=args.dtype).load()
    # The split sizes must match the SFT config: splits are de-duplicated against each other, so they shape each other.
    task = ArithmeticTask(
        args.difficulty, args.task_seed, n_train=0, n_validation=args.n_validation, n_test=args.n_test
    )
    results = []
    for split in args.splits:
        chosen = task.problems(split)[: args.problems]
        sampler = Sampler(model, tokenizer, temperature=1.0, seed=args.seed)
        start = time.perf_counter()
        out = sampler.complete([p.prompt for p in chosen], n=args.samples, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        counts = [sum(task.score(p, t) >= 1.0 for t in texts) for p, texts in zip(chosen, out.texts, strict=True)]
        greedy = sample_correct_counts(Sampler(model, tokenizer, temperature=0.0), task, chosen, 1, args.max_new_tokens)
        k = args.samples
        row = {
            "split": split,
            "problems": len(chosen),
            "samples": k,
            "pass@1": sum(pass_at_k(k, c, 1) for c in counts) / len(chosen),
            f"pass@{k}": sum(pass_at_k(k, c, k) for c in counts) / len(chosen),
            "greedy": sum(greedy) / len(chosen),
            "never_solved": sum(c == 0 for c in counts) / len(chosen),
            "always_solved": sum(c == k for c in counts) / len(chosen),
            "tokens_per_second": round(out.generated_tokens / seconds, 1),
            "solved_counts": counts,
        }
        results.append(row)
        print(
            f"{split:>10}: pass@1 {row['pass@1']:.3f}  pass@{k} {row[f'pass@{k}']:.3f}  greedy {row['greedy']:.3f}  "
            f"never {row['never_solved']:.2f}  always {row['always_solved']:.2f}  "
            f"({len(chosen)} problems x {k} samples, {row['tokens_per_second']} tok/s)"
        )
    if args.out:
        report = {"policy": args.policy, "difficulty": args.difficulty, "torch_threads": torch.get_num_threads()}
        Path(args.out).write_text(json.dumps({**report, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
