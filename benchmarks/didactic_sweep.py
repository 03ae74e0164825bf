"""The didactic RL sweep of PAPER.md §7: γ × α × seeds with Adam (and a smaller plain-SGD comparison).

Every run fine-tunes the MLP policy on the γ = 5 prover (identical for all runs of one seed), then runs REINFORCE
on ``R + α·A^μ_γ`` through :class:`pavlit.didactic.rl.DidacticRLModule` and a Lightning ``Trainer``. α = 0 does
not depend on γ, so it runs once per seed. Before any RL, the Theorem 3.1 quantities of every γ are computed for
each seed's SFT policy (:func:`pavlit.didactic.theory.recommend_prover`) and reported next to the measured gains.

    OMP_NUM_THREADS=1 python benchmarks/didactic_sweep.py --out runs/didactic

Writes ``report.md``, ``results.json``, ``accuracy_vs_iterations.png`` and ``gamma_dependence.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from pavlit.didactic.rl import DidacticRLModule  # noqa: E402
from pavlit.didactic.theory import recommend_prover  # noqa: E402

GAMMAS = (1, 3, 5, 8, 10, 12, 15, 25, 50, 100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/didactic")
    parser.add_argument("--gammas", type=float, nargs="+", default=[float(g) for g in GAMMAS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--advantage-source", choices=("exact", "mc"), default="exact")
    parser.add_argument("--mc-rollouts", type=int, default=100)
    parser.add_argument("--baseline", choices=("none", "batch_mean"), default="none")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-rollouts", type=int, default=512)
    parser.add_argument(
        "--sgd-gammas", type=float, nargs="*", default=[5.0, 10.0, 15.0, 50.0], help="empty: no SGD runs"
    )
    parser.add_argument("--sgd-lr", type=float, default=1.0)
    parser.add_argument("--sgd-seeds", type=int, default=2)
    parser.add_argument("--theory-rollouts", type=int, default=32)
    parser.add_argument("--theory-mc", type=int, default=32)
    return parser.parse_args(argv)


def run_one(gamma: float, alpha: float, seed: int, optimizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lightning.pytorch import Trainer

    start = time.perf_counter()
    module = DidacticRLModule(
        gamma=gamma,
        alpha=alpha,
        advantage_source=args.advantage_source,
        mc_rollouts=args.mc_rollouts,
        baseline=args.baseline,
        iterations=args.iterations,
        optimizer=optimizer,
        eval_every=args.eval_every,
        eval_rollouts=args.eval_rollouts,
        seed=seed,
    )
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=folder,
        )
        trainer.fit(module)
    history = module.history
    accuracy = [row["accuracy"] for row in history]
    return {
        "gamma": gamma,
        "alpha": alpha,
        "seed": seed,
        "sft": module.sft_metrics,
        "history": history,
        "iters_to_50": first_reaching(history, 0.5),
        "iters_to_90": first_reaching(history, 0.9),
        "final_accuracy": statistics.fmean(accuracy[-3:]),
        "final_pass@64": statistics.fmean(row.get("pass@64", math.nan) for row in history[-3:]),
        "greedy_rollout": module.policy.sample(1, greedy=True)[0].tolist(),
        "wall_s": time.perf_counter() - start,
    }


def first_reaching(history: list[dict[str, float]], threshold: float) -> int | None:
    return next((int(row["iteration"]) for row in history if row["accuracy"] >= threshold), None)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [r["final_accuracy"] for r in runs]
    summary: dict[str, Any] = {
        "n_seeds": len(runs),
        "final_mean": statistics.fmean(finals),
        "final_min": min(finals),
        "final_max": max(finals),
        "pass64_mean": statistics.fmean(r["final_pass@64"] for r in runs),
    }
    for key in ("iters_to_50", "iters_to_90"):
        reached = [r[key] for r in runs if r[key] is not None]
        summary[key] = {
            "reached": len(reached),
            "mean": statistics.fmean(reached) if reached else None,
            "min": min(reached) if reached else None,
            "max": max(reached) if reached else None,
        }
    return summary


def fmt_iters(entry: dict[str, Any], n_seeds: int, iterations: int) -> str:
    if not entry["reached"]:
        return f"> {iterations} (0/{n_seeds})"
    return f"{entry['mean']:.0f} [{entry['min']}–{entry['max']}] ({entry['reached']}/{n_seeds})"


def curves(runs: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = [int(row["iteration"]) for row in runs[0]["history"]]
    table = [[row["accuracy"] for row in r["history"]] for r in runs]
    columns = list(zip(*table))
    return steps, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def sample_efficiency(orm: list[dict[str, Any]], pav: list[dict[str, Any]]) -> dict[str, Any]:
    """Iterations ORM-RL needs to reach its final accuracy ÷ iterations PAV-RL needs to reach the same (per seed)."""
    ratios, notes = [], []
    for orm_run, pav_run in zip(orm, pav):
        target, start = orm_run["final_accuracy"], orm_run["history"][0]["accuracy"]
        if target <= start:
            notes.append(f"seed {orm_run['seed']}: ORM-RL did not improve on its start ({start:.3f} → {target:.3f})")
            continue
        orm_iters, pav_iters = first_reaching(orm_run["history"], target), first_reaching(pav_run["history"], target)
        if pav_iters is None:
            notes.append(f"seed {orm_run['seed']}: PAV-RL never reached ORM-RL's final accuracy {target:.3f}")
        elif pav_iters > 0:
            ratios.append(orm_iters / pav_iters)
    return {"ratios": ratios, "mean": statistics.fmean(ratios) if ratios else None, "notes": notes}


def plot(out: Path, results: dict[str, Any], best_gamma: float | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, written = results["runs"], []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = [("α = 0 (outcome only)", [r for r in runs if r["alpha"] == 0 and r["optimizer"] == "adam"], "k")]
    if best_gamma is not None:
        best = [r for r in runs if r["alpha"] != 0 and r["gamma"] == best_gamma and r["optimizer"] == "adam"]
        groups.append((f"α = 1, γ = {best_gamma:g} (best final accuracy)", best, "C0"))
    for label, group, color in groups:
        steps, mean, low, high = curves(group)
        ax.plot(steps, mean, color=color, label=label)
        ax.fill_between(steps, low, high, color=color, alpha=0.2)
    ax.set_xlabel("RL iteration (64 rollouts each)")
    ax.set_ylabel("sampled accuracy (512 rollouts)")
    ax.set_title("Didactic RL, Adam: mean and min–max over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_iterations.png", dpi=120)
    plt.close(fig)
    written.append("accuracy_vs_iterations.png")

    summary = results["summary"]["adam"]
    gammas = sorted(float(g) for g in summary["alpha=1"])
    theory = results["theory_mean"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    finals = [summary["alpha=1"][str(g)]["final_mean"] for g in gammas]
    errors = [
        [f - summary["alpha=1"][str(g)]["final_min"] for g, f in zip(gammas, finals)],
        [summary["alpha=1"][str(g)]["final_max"] - f for g, f in zip(gammas, finals)],
    ]
    axes[0].errorbar(gammas, finals, yerr=errors, marker="o", capsize=3, label="α = 1")
    axes[0].axhline(summary["alpha=0"]["final_mean"], color="k", linestyle="--", label="α = 0")
    axes[0].set(xscale="log", xlabel="prover γ", ylabel="final accuracy", title="Final accuracy vs γ")
    axes[0].legend()
    iters90 = [summary["alpha=1"][str(g)]["iters_to_90"]["mean"] for g in gammas]
    axes[1].plot(
        [g for g, i in zip(gammas, iters90) if i is not None], [i for i in iters90 if i is not None], marker="o"
    )
    axes[1].set(xscale="log", xlabel="prover γ", ylabel="iterations to 90% (seeds that reached it)")
    axes[1].set_title(f"Iterations to 90% (missing: not reached in {results['settings']['iterations']})")
    for key, marker in (("distinguishability", "o"), ("alignment", "s")):
        axes[2].plot(gammas, [max(theory[str(g)][key], 1e-12) for g in gammas], marker=marker, label=key)
    axes[2].set(xscale="log", yscale="log", xlabel="prover γ", title="Theorem 3.1 quantities of the SFT policy")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "gamma_dependence.png", dpi=120)
    plt.close(fig)
    written.append("gamma_dependence.png")
    return written


def write_report(out: Path, results: dict[str, Any], best_gamma: float | None) -> None:
    settings, summary = results["settings"], results["summary"]
    n_iter = settings["iterations"]
    lines = [
        "# Didactic RL sweep (PAPER.md §7)",
        "",
        f"Planted task (length 10, vocab 15, target [3, 6, 0, 3, 5]); MLP 3 × 128; SFT 50 Adam steps (lr 1e-3, "
        f"batch 64) on 3,200 γ = 5 prover samples; RL: {n_iter} iterations × 64 rollouts, REINFORCE on "
        f"`R + α·A^μ` ({settings['advantage_source']} A^μ, baseline {settings['baseline']}), Adam lr {settings['lr']}"
        f"; accuracy = fraction correct of {settings['eval_rollouts']} fresh samples every "
        f"{settings['eval_every']} iterations; final = mean of the last 3 evaluations. Wall time "
        f"{results['wall_s'] / 60:.1f} min on 1 core.",
        "",
        "## Start (SFT policy, per seed)",
        "",
        "| seed | SFT NLL | accuracy | pass@8 | pass@64 | greedy correct |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, sft in results["sft"].items():
        lines.append(
            f"| {seed} | {sft['loss']:.3f} | {sft['accuracy']:.4f} | {sft.get('pass@8', math.nan):.3f} "
            f"| {sft.get('pass@64', math.nan):.3f} | {sft['greedy']:.0f} |"
        )
    for optimizer in summary:
        lr = settings["lr"] if optimizer == "adam" else settings["sgd_lr"]
        lines += [
            "",
            f"## {optimizer.upper()} (lr {lr}): iterations to 50% / 90% (mean [min–max] over seeds that reached it)",
            "",
            "| α | γ | final accuracy mean [min–max] | pass@64 | iters to 50% | iters to 90% |",
            "|---:|---:|---|---:|---|---|",
        ]
        entries = [("0", "—", summary[optimizer]["alpha=0"])]
        entries += [("1", g, s) for g, s in sorted(summary[optimizer]["alpha=1"].items(), key=lambda kv: float(kv[0]))]
        for alpha, gamma, s in entries:
            lines.append(
                f"| {alpha} | {gamma} | {s['final_mean']:.3f} [{s['final_min']:.3f}–{s['final_max']:.3f}] "
                f"| {s['pass64_mean']:.3f} | {fmt_iters(s['iters_to_50'], s['n_seeds'], n_iter)} "
                f"| {fmt_iters(s['iters_to_90'], s['n_seeds'], n_iter)} |"
            )
    efficiency = results["sample_efficiency"]
    lines += ["", "## Sample efficiency (best γ vs α = 0, Adam)", ""]
    if best_gamma is None:
        lines.append("No γ had a positive final accuracy.")
    else:
        lines.append(f"Best γ by mean final accuracy: **{best_gamma:g}**.")
        if efficiency["mean"] is not None:
            lines.append(f"Iterations ORM-RL needs for its final accuracy ÷ PAV-RL's: {efficiency['mean']:.1f}×.")
        for note in efficiency["notes"]:
            lines.append(f"- {note}")
    lines += [
        "",
        "## Theorem 3.1 quantities of the SFT policy (before RL; mean over seeds), next to the gains",
        "",
        "Exact `A^μ` over all 15 actions weighted by π at the states of "
        f"{settings['theory_rollouts']} π rollouts; `A^π` from {settings['theory_mc']} π completions per "
        "(state, action). Score = distinguishability + alignment; rank 1 = recommended before RL.",
        "",
        "| γ | distinguishability | alignment | score | rank | correlation | final accuracy α = 1 (Adam) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    theory = results["theory_mean"]
    ranked = sorted(theory, key=lambda g: -theory[g]["score"])
    for g in sorted(theory, key=float):
        row = theory[g]
        final = summary["adam"]["alpha=1"].get(g, {}).get("final_mean", math.nan)
        lines.append(
            f"| {float(g):g} | {row['distinguishability']:.2e} | {row['alignment']:.2e} | {row['score']:.2e} "
            f"| {ranked.index(g) + 1} | {row['correlation']:.3f} | {final:.3f} |"
        )
    lines += ["", "## Greedy rollout at the end (seed 0, Adam)", "", "| α | γ | greedy tokens | correct |"]
    lines += ["|---:|---:|---|---:|"]
    for run in results["runs"]:
        if run["seed"] == 0 and run["optimizer"] == "adam":
            gamma = "—" if run["alpha"] == 0 else f"{run['gamma']:g}"
            lines.append(f"| {run['alpha']:g} | {gamma} | {run['greedy_rollout']} | {run['greedy_correct']:.0f} |")
    lines += ["", "![accuracy](accuracy_vs_iterations.png)", "", "![gamma](gamma_dependence.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    adam = functools.partial(torch.optim.Adam, lr=args.lr)
    sgd = functools.partial(torch.optim.SGD, lr=args.sgd_lr)
    plan = [(args.gammas[0], 0.0, s, "adam") for s in seeds]
    plan += [(g, 1.0, s, "adam") for g in args.gammas for s in seeds]
    if args.sgd_gammas:
        sgd_seeds = seeds[: args.sgd_seeds]
        plan += [(args.sgd_gammas[0], 0.0, s, "sgd") for s in sgd_seeds]
        plan += [(g, 1.0, s, "sgd") for g in args.sgd_gammas for s in sgd_seeds]

    runs, sft, theory = [], {}, {}
    for seed in seeds:  # Theorem 3.1 quantities of each seed's SFT policy, before any RL
        module = DidacticRLModule(seed=seed, eval_rollouts=args.eval_rollouts)
        sft[seed] = module.run_sft()
        theory[seed] = recommend_prover(module.policy, args.gammas, args.theory_rollouts, args.theory_mc, seed=seed)
        print(f"seed {seed}: SFT {sft[seed]}; recommended γ {theory[seed][0]['gamma']:g}", flush=True)
    for gamma, alpha, seed, name in plan:
        run = run_one(gamma, alpha, seed, adam if name == "adam" else sgd, args)
        run["optimizer"] = name
        run["greedy_correct"] = float(DidacticRLModule().task.reward(torch.tensor([run["greedy_rollout"]])).item())
        runs.append(run)
        with open(out / "runs.jsonl", "a") as log:  # partial results survive a crash of the summary below
            log.write(json.dumps(run) + "\n")
        print(
            f"{name} γ={gamma:g} α={alpha:g} seed={seed}: final {run['final_accuracy']:.3f}, "
            f"50% at {run['iters_to_50']}, 90% at {run['iters_to_90']}, greedy {run['greedy_rollout']} "
            f"({run['wall_s']:.1f} s)",
            flush=True,
        )

    summary: dict[str, Any] = {}
    for name in ("adam", "sgd"):
        chosen = [r for r in runs if r["optimizer"] == name]
        if not chosen:
            continue
        summary[name] = {"alpha=0": summarise([r for r in chosen if r["alpha"] == 0]), "alpha=1": {}}
        for gamma in sorted({r["gamma"] for r in chosen if r["alpha"] != 0}):
            summary[name]["alpha=1"][str(gamma)] = summarise(
                [r for r in chosen if r["alpha"] != 0 and r["gamma"] == gamma]
            )
    adam_pav = summary["adam"]["alpha=1"]
    best_key = max(adam_pav, key=lambda g: (adam_pav[g]["final_mean"], -float(g)))
    best_gamma = float(best_key) if adam_pav[best_key]["final_mean"] > 0 else None
    orm_runs = [r for r in runs if r["optimizer"] == "adam" and r["alpha"] == 0]
    pav_runs = [r for r in runs if r["optimizer"] == "adam" and r["alpha"] != 0 and r["gamma"] == float(best_key)]
    theory_mean = {
        str(float(g)): {
            key: statistics.fmean(next(r[key] for r in theory[s] if r["gamma"] == float(g)) for s in seeds)
            for key in ("distinguishability", "alignment", "score", "correlation", "a_mu_abs", "prover_accuracy")
        }
        for g in args.gammas
    }
    results = {
        "settings": {**vars(args), "seeds": seeds},
        "sft": {str(s): m for s, m in sft.items()},
        "theory": {str(s): rows for s, rows in theory.items()},
        "theory_mean": theory_mean,
        "runs": runs,
        "summary": summary,
        "best_gamma": best_gamma,
        "sample_efficiency": sample_efficiency(orm_runs, pav_runs),
        "wall_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(out, results, best_gamma)
    write_report(out, results, best_gamma)
    print(f"wrote {out}/report.md, results.json and plots in {results['wall_s'] / 60:.1f} min", flush=True)
    return results


if __name__ == "__main__":
    main()
