"""PAV-RL vs ORM-RL at LM scale on the embedded default (docs/method.md §6, issue 6 item 3).

The pipelines run the comparison as ``pavlit compare --config configs/tiny/rl_compare.yaml`` (each run a
``pavlit fit`` of the shipped ``configs/tiny/rl.yaml`` / ``rl_orm.yaml``). This script is the measurement the
README's RL numbers came from: it builds the modules itself from its own flags, evaluates on the **test** split
(``pavlit compare`` reads the configs' validation split) and adds Pass@N before and after RL.

Both methods start from the same policy (the RFT/SFT export), see the same prompts and draw the same number of
rollouts per iteration; they differ only in the per-step weight: ``R + α·Â^μ − b`` with ``Â^μ`` from the frozen PAV
through the Best-of-K prover (PAV-RL) or ``R − b`` (ORM-RL, α = 0). Accuracy (unbiased pass@1 from
``--eval-samples`` samples per problem) on the first ``--eval-problems`` problems of the **test** split is measured
every ``--eval-every`` iterations, for ``--seeds`` seeds, with the same evaluation draws for every run.

    OMP_NUM_THREADS=1 python benchmarks/rl_compare.py --policy runs/tiny/sft/policy \\
        --verifier runs/tiny/pav/verifier --out runs/tiny/rl_compare

Each finished run is kept in ``--out/runs/<method>-<seed>.json`` with the settings it ran under, so an interrupted
comparison resumes, and ``--methods`` / ``--first-seed`` split one comparison over several processes (one core
each) that write into the same folder; the report covers every seed with both methods finished under the same
settings. Writes ``report.md``, ``results.json`` and ``accuracy_vs_iterations.png`` into ``--out``: accuracy vs
iterations (mean and min–max over seeds), the sample-efficiency ratio (iterations ORM-RL needs to reach its final
accuracy ÷ iterations PAV-RL needs to reach the same, on the seed-mean curves and per seed), the final accuracy
gap, and Pass@N on the test problems before and after RL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from pavlit.advantages import PAVAdvantages  # noqa: E402
from pavlit.compare import sample_efficiency  # noqa: E402
from pavlit.data.prompts import PromptDataModule  # noqa: E402
from pavlit.modules.policy_rl import PolicyRLModule  # noqa: E402
from pavlit.modules.sft import pass_at_k  # noqa: E402
from pavlit.policy.sources import Pretrained  # noqa: E402
from pavlit.provers.best_of_k import BestOfK  # noqa: E402
from pavlit.tasks.arithmetic import ArithmeticTask  # noqa: E402

METHODS = ("pav", "orm")
LABELS = {"pav": "PAV-RL", "orm": "ORM-RL"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="runs/tiny/sft/policy", help="the initial (RFT/SFT) policy folder")
    parser.add_argument("--verifier", default="runs/tiny/pav/verifier", help="the PAV folder")
    parser.add_argument("--out", default="runs/tiny/rl_compare")
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds, from --first-seed on")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="run only these")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--pass-n", type=int, default=16, help="N of Pass@N before/after RL")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=4, help="Best-of-K prover")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--kl-coef", type=float, default=0.001)
    parser.add_argument("--baseline", choices=("value_head", "leave_one_out", "none"), default="value_head")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--difficulty", type=int, default=2, help="ArithmeticTask (as the SFT/PAV configs)")
    parser.add_argument("--task-seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    return parser.parse_args(argv)


def make_task(args: argparse.Namespace) -> ArithmeticTask:
    return ArithmeticTask(
        difficulty=args.difficulty, seed=args.task_seed, n_train=args.n_train, n_validation=200, n_test=args.n_test
    )


#: Arguments that do not change what a run computes (where it goes, which runs this process does).
NOT_SETTINGS = ("out", "seeds", "first_seed", "methods")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a finished run must have been run with to be reused."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def load_run(path: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run from an earlier invocation, or ``None``; a run made with other settings is an error."""
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    changed = sorted(k for k in wanted if run.get("settings", {}).get(k) != wanted[k])
    if changed:
        diffs = ", ".join(
            f"--{k.replace('_', '-')} {run.get('settings', {}).get(k)!r} vs {wanted[k]!r}" for k in changed
        )
        raise SystemExit(f"{path} was run with other settings ({diffs}): use another --out or delete it")
    return run


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader (another process of the same comparison) never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class PrintEvaluations(Callback):
    """One line per evaluation, so a long comparison shows where it is."""

    def __init__(self, label: str, iterations: int) -> None:
        self.label, self.iterations = label, iterations
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Trainer, module: PolicyRLModule) -> None:
        if module.history and not trainer.sanity_checking:
            row = module.history[-1]
            elapsed = time.perf_counter() - self.start
            print(
                f"  {self.label}: iteration {row['step']}/{self.iterations} accuracy {row['accuracy']:.3f} "
                f"({elapsed:.0f} s)",
                flush=True,
            )


def make_module(method: str, seed: int, args: argparse.Namespace) -> PolicyRLModule:
    advantages = PAVAdvantages(args.verifier, prover=BestOfK(args.k)) if method == "pav" else None
    return PolicyRLModule(
        policy=Pretrained(path=args.policy),
        advantages=advantages,
        alpha=args.alpha if method == "pav" else 0.0,
        samples_per_prompt=args.samples_per_prompt,
        baseline=args.baseline,
        kl_coef=args.kl_coef,
        lr=args.lr,
        warmup_steps=args.warmup,
        max_new_tokens=args.max_new_tokens,
        max_steps=args.max_steps,
        eval_samples=args.eval_samples,
        seed=seed,
        export=False,
    )


def pass_at_n(module: PolicyRLModule, task: ArithmeticTask, args: argparse.Namespace) -> dict[str, float]:
    """Unbiased pass@1 and pass@N on the evaluated test problems (N samples each, fixed seed)."""
    problems = list(task.problems("test"))[: args.eval_problems]
    module.task = task
    with torch.no_grad():
        out = module.sampler().complete(
            [p.prompt for p in problems],
            n=args.pass_n,
            max_new_tokens=args.max_new_tokens,
            max_steps=args.max_steps,
            temperature=1.0,
            delimiter=task.step_delimiter,
            seed=12345,
        )
    counts = [sum(task.score(p, t) >= 1.0 for t in texts) for p, texts in zip(problems, out.texts)]
    n = args.pass_n
    return {
        "pass@1": statistics.fmean(pass_at_k(n, c, 1) for c in counts),
        f"pass@{n}": statistics.fmean(pass_at_k(n, c, n) for c in counts),
    }


def run_one(method: str, seed: int, task: ArithmeticTask, args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(seed, verbose=False)
    module = make_module(method, seed, args)
    data = PromptDataModule(
        task, batch_size=args.batch_size, validation_split="test", eval_problems=args.eval_problems, seed=seed
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.iterations,
        val_check_interval=args.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(Path(args.out) / f"{method}-{seed}"),
        callbacks=[PrintEvaluations(f"{LABELS[method]} seed {seed}", args.iterations)],
    )
    start = time.perf_counter()
    trainer.validate(module, data, verbose=False)  # iteration 0: the initial policy
    trainer.fit(module, data)
    wall = time.perf_counter() - start
    history = [
        {"iteration": row["step"], "samples": row["samples"], "accuracy": row["accuracy"]} for row in module.history
    ]
    after = pass_at_n(module, task, args)
    train = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return {
        "method": method,
        "seed": seed,
        "settings": settings(args),
        "history": history,
        "final_accuracy": history[-1]["accuracy"],
        "pass_after": after,
        "last_train_metrics": train,
        "wall_s": wall,
    }


def mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = [row["iteration"] for row in runs[0]["history"]]
    columns = list(zip(*[[row["accuracy"] for row in run["history"]] for run in runs]))
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot(out: Path, curves: dict[str, tuple]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, (steps, mean, low, high) in curves.items():
        ax.plot(steps, mean, marker="o", label=LABELS[method])
        ax.fill_between(steps, low, high, alpha=0.2)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("test accuracy (pass@1)")
    ax.set_title("PAV-RL vs ORM-RL (mean, min–max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "accuracy_vs_iterations.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_report(out: Path, results: dict[str, Any]) -> None:
    args, summary = results["args"], results["summary"]
    n = args["pass_n"]
    before, after = summary["pass_before"], summary["pass_after"]
    lines = [
        "# PAV-RL vs ORM-RL on the embedded tiny default",
        "",
        f"Initial policy `{args['policy']}`, PAV `{args['verifier']}` with the Best-of-{args['k']} prover, "
        f"α = {args['alpha']}; {args['seeds']} seeds × {args['iterations']} iterations of {args['batch_size']} "
        f"prompts × {args['samples_per_prompt']} samples; baseline `{args['baseline']}`, KL {args['kl_coef']}, "
        f"lr {args['lr']}. Accuracy: unbiased pass@1 from {args['eval_samples']} samples on the first "
        f"{args['eval_problems']} test problems. Wall time {results['wall_s'] / 60:.1f} min.",
        "",
        "![accuracy vs iterations](accuracy_vs_iterations.png)",
        "",
        "| iteration | " + " | ".join(f"{LABELS[m]} mean [min–max]" for m in METHODS) + " |",
        "| --- | " + " | ".join("---" for _ in METHODS) + " |",
    ]
    steps = summary["curves"]["orm"]["iterations"]
    for i, step in enumerate(steps):
        cells = []
        for m in METHODS:
            c = summary["curves"][m]
            cells.append(f"{c['mean'][i]:.3f} [{c['min'][i]:.3f}–{c['max'][i]:.3f}]")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    eff = summary["sample_efficiency"]
    ratio = "n/a" if eff["ratio"] is None else f"{eff['ratio']:.2f}×"
    lines += [
        "",
        f"- **Sample-efficiency ratio** (seed-mean curves): {ratio} — ORM-RL reaches its final accuracy "
        f"{eff['goal']:.3f} at iteration {eff['baseline_iterations']}, PAV-RL at {eff['target_iterations']}."
        + (f" {eff['note']}." if eff.get("note") else ""),
        "- Per seed: "
        + ", ".join(
            f"seed {s}: {'n/a' if r['ratio'] is None else format(r['ratio'], '.2f') + '×'}"
            for s, r in summary["per_seed_efficiency"].items()
        ),
        f"- **Final accuracy gap** (PAV-RL − ORM-RL): {summary['final_gap']:+.3f} "
        f"(PAV-RL {summary['final']['pav']:.3f}, ORM-RL {summary['final']['orm']:.3f}).",
        f"- **Pass@{n}** on the same test problems: before RL {before[f'pass@{n}']:.3f} "
        f"(pass@1 {before['pass@1']:.3f}); after PAV-RL {after['pav'][f'pass@{n}']:.3f} "
        f"(pass@1 {after['pav']['pass@1']:.3f}), after ORM-RL {after['orm'][f'pass@{n}']:.3f} "
        f"(pass@1 {after['orm']['pass@1']:.3f}) (seed means).",
        "- Paper (Gemma 2B/9B, docs/method.md §6): 5–6× sample efficiency and > 6 points over ORM-RL.",
        "",
        "Runs: " + "; ".join(f"{LABELS[r['method']]} seed {r['seed']} {r['wall_s']:.0f} s" for r in results["runs"]),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for path in (args.policy, args.verifier):
        if not Path(path).exists():
            raise SystemExit(f"{path} does not exist: run configs/tiny/sft.yaml, label.yaml and pav.yaml first")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*eval mode at the start of training.*")
    warnings.filterwarnings("ignore", ".*IterableDataset. has .__len__. defined.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = make_task(args)
    wanted = settings(args)
    initial_path = out / "runs" / "initial.json"
    initial_path.parent.mkdir(exist_ok=True)
    before = load_run(initial_path, wanted)
    if before is None:
        initial = make_module("orm", 0, args)
        before = {"settings": wanted, "pass": pass_at_n(initial, task, args)}
        del initial
        write_atomic(initial_path, before)
    pass_before = before["pass"]
    print(f"initial policy: {pass_before}", flush=True)

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in args.methods:
            path = out / "runs" / f"{method}-{seed}.json"
            run = load_run(path, wanted)
            if run is None:
                run = run_one(method, seed, task, args)
                write_atomic(path, run)
            print(
                f"{LABELS[method]} seed {seed}: "
                + " ".join(f"{row['iteration']}:{row['accuracy']:.3f}" for row in run["history"])
                + f" | pass@{args.pass_n} {run['pass_after'][f'pass@{args.pass_n}']:.3f} ({run['wall_s']:.0f} s)",
                flush=True,
            )

    # Every seed finished by both methods under these settings, whichever invocation ran it.
    found = {m: {} for m in METHODS}
    for path in sorted((out / "runs").glob("*-*.json")):
        run = load_run(path, wanted)
        found[run["method"]][run["seed"]] = run
    seeds = sorted(set(found["pav"]) & set(found["orm"]))
    if not seeds:
        print(f"no seed has both methods finished in {out / 'runs'} yet: no report", flush=True)
        return {}
    runs = [found[m][seed] for seed in seeds for m in METHODS]
    args.seeds = len(seeds)
    by_method = {m: [r for r in runs if r["method"] == m] for m in METHODS}
    curves = {m: mean_curve(by_method[m]) for m in METHODS}
    steps = curves["orm"][0]
    per_seed = {
        run_orm["seed"]: sample_efficiency(
            steps,
            [row["accuracy"] for row in run_orm["history"]],
            [row["accuracy"] for row in run_pav["history"]],
        )
        for run_orm, run_pav in zip(by_method["orm"], by_method["pav"])
    }
    final = {m: curves[m][1][-1] for m in METHODS}
    summary = {
        "curves": {m: dict(zip(("iterations", "mean", "min", "max"), curves[m])) for m in METHODS},
        "sample_efficiency": sample_efficiency(steps, curves["orm"][1], curves["pav"][1]),
        "per_seed_efficiency": per_seed,
        "final": final,
        "final_gap": final["pav"] - final["orm"],
        "pass_before": pass_before,
        "pass_after": {
            m: {key: statistics.fmean(r["pass_after"][key] for r in by_method[m]) for key in pass_before}
            for m in METHODS
        },
    }
    results = {"args": vars(args), "summary": summary, "runs": runs, "wall_s": time.perf_counter() - start}
    plot(out, curves)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)
    print((out / "report.md").read_text())
    return results


if __name__ == "__main__":
    main()
