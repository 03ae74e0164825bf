"""The didactic RL sweep of docs/method.md §7: γ × α × seeds with Adam (and a smaller plain-SGD diagnostic).

Every run fine-tunes the MLP policy on the γ = 5 prover (identical for all runs of one seed), then runs REINFORCE
on ``R + α·A^μ_γ`` through :class:`pavlit.didactic.training.DidacticRLModule` and a Lightning ``Trainer``. α = 0
does not depend on γ, so it runs once per seed. Before any RL, the Theorem 3.1 quantities of every γ are computed
for each seed's SFT policy (:func:`pavlit.didactic.theory.recommend_prover`) and compared with the measured speed.

A run lasts up to ``--iterations`` and stops early once its accuracy has held ≥ ``--hold-threshold`` at every
evaluation of the last ``--hold`` iterations (and it has run ``--min-iterations``); the report says which runs
stopped so, and curves are carried forward at their last evaluation after a stop.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/didactic_sweep.py --out runs/didactic_masked --docs docs

Every finished run is appended to ``runs.jsonl`` at once (and each seed's SFT/Theorem 3.1 row to ``sft.jsonl``),
so an interrupted sweep resumes where it stopped when started again with the same ``--out`` and settings
(``--fresh`` starts over). Writes ``report.md``, ``results.json`` and the plots ``accuracy_vs_iterations.png``,
``gamma_dependence.png`` and ``pass_at_n.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from lightning.pytorch import Callback, Trainer  # noqa: E402

from pavlit.didactic.theory import recommend_prover  # noqa: E402
from pavlit.didactic.training import DidacticRLModule  # noqa: E402

GAMMAS = (1, 3, 5, 8, 10, 15, 25, 50, 100)
# (metric, threshold) pairs whose first crossing is recorded per run.
CROSSINGS = (("accuracy", 0.5), ("accuracy", 0.9), ("pass@8", 0.9), ("pass@64", 0.9))
# Settings that change what a run measures: a resumed sweep must agree on them.
RUN_SETTINGS = (
    "iterations",
    "min_iterations",
    "hold",
    "hold_threshold",
    "lr",
    "advantage_source",
    "mc_rollouts",
    "baseline",
    "eval_every",
    "eval_rollouts",
    "sgd_lr",
    "sgd_iterations",
    "head",
    "theory_rollouts",
    "theory_mc",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/didactic")
    parser.add_argument("--gammas", type=float, nargs="+", default=[float(g) for g in GAMMAS])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3000, help="most RL iterations of a run")
    parser.add_argument("--min-iterations", type=int, default=300, help="no early stop before this")
    parser.add_argument("--hold", type=int, default=200, help="stop once accuracy held the threshold this long")
    parser.add_argument("--hold-threshold", type=float, default=0.9)
    parser.add_argument("--head", choices=("masked", "per_position", "shared"), default="masked")
    parser.add_argument("--no-alpha0", action="store_true", help="skip the α = 0 runs")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--advantage-source", choices=("exact", "mc"), default="exact")
    parser.add_argument("--mc-rollouts", type=int, default=100)
    parser.add_argument("--baseline", choices=("none", "batch_mean"), default="none")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-rollouts", type=int, default=512)
    parser.add_argument("--sgd-gammas", type=float, nargs="*", default=[5.0, 10.0, 50.0], help="empty: no SGD")
    parser.add_argument("--sgd-lr", type=float, default=1.0)
    parser.add_argument("--sgd-seeds", type=int, default=2)
    parser.add_argument("--sgd-iterations", type=int, default=1500)
    parser.add_argument("--theory-rollouts", type=int, default=32)
    parser.add_argument("--theory-mc", type=int, default=32)
    parser.add_argument("--fresh", action="store_true", help="discard the runs already in --out")
    parser.add_argument("--docs", default=None, help="also copy the plots here (didactic_accuracy.png, ...)")
    return parser.parse_args(argv)


class HoldStop(Callback):
    """Stop a run once every evaluation of the last ``hold`` iterations reached ``threshold``."""

    def __init__(self, threshold: float, hold: int, min_iterations: int) -> None:
        self.threshold, self.hold, self.min_iterations = threshold, hold, min_iterations
        self.stopped_at: int | None = None

    def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        history = module.history
        if not history or trainer.global_step < max(self.min_iterations, self.hold):
            return
        last = int(history[-1]["iteration"])
        window = [row for row in history if row["iteration"] >= last - self.hold]
        if window[0]["iteration"] <= last - self.hold and all(r["accuracy"] >= self.threshold for r in window):
            trainer.should_stop = True
            self.stopped_at = trainer.global_step


def run_key(gamma: float, alpha: float, seed: int, optimizer: str) -> str:
    return f"{optimizer}|{0.0 if alpha == 0 else gamma:g}|{alpha:g}|{seed}"


def run_one(gamma: float, alpha: float, seed: int, optimizer: str, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    if optimizer == "adam":
        factory, iterations = functools.partial(torch.optim.Adam, lr=args.lr), args.iterations
    else:
        factory, iterations = functools.partial(torch.optim.SGD, lr=args.sgd_lr), args.sgd_iterations
    module = DidacticRLModule(
        gamma=gamma,
        alpha=alpha,
        advantage_source=args.advantage_source,
        mc_rollouts=args.mc_rollouts,
        baseline=args.baseline,
        iterations=iterations,
        optimizer=factory,
        head=args.head,
        eval_every=args.eval_every,
        eval_rollouts=args.eval_rollouts,
        seed=seed,
    )
    stopper = HoldStop(args.hold_threshold, args.hold, args.min_iterations)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[stopper],
            default_root_dir=folder,
        )
        trainer.fit(module)
    history = module.history
    greedy = module.policy.sample(1, greedy=True)
    run = {
        "gamma": gamma,
        "alpha": alpha,
        "seed": seed,
        "optimizer": optimizer,
        "head": args.head,
        "iterations_cap": iterations,
        "iterations_run": int(history[-1]["iteration"]),
        "stopped_early": stopper.stopped_at is not None,
        "sft": module.sft_metrics,
        "history": history,
        "final_accuracy": statistics.fmean(row["accuracy"] for row in history[-3:]),
        "final_mode_share": history[-1]["mode_share"],
        "final_distinct_correct": history[-1]["distinct_correct"],
        "greedy_rollout": greedy[0].tolist(),
        "greedy_correct": float(module.task.reward(greedy)[0]),
        "wall_s": time.perf_counter() - start,
    }
    for metric, threshold in CROSSINGS:
        run[f"iters_{metric}_{threshold:g}"] = first_reaching(history, threshold, metric)
    return run


def first_reaching(history: list[dict[str, float]], threshold: float, metric: str = "accuracy") -> int | None:
    return next((int(row["iteration"]) for row in history if row.get(metric, -1.0) >= threshold), None)


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [r["final_accuracy"] for r in runs]
    summary: dict[str, Any] = {
        "n_seeds": len(runs),
        "final_mean": statistics.fmean(finals),
        "final_min": min(finals),
        "final_max": max(finals),
        "stopped_early": sum(r["stopped_early"] for r in runs),
        "iterations_cap": max(r["iterations_cap"] for r in runs),
        "mode_share_median": statistics.median(r["final_mode_share"] for r in runs),
        "distinct_correct_median": statistics.median(r["final_distinct_correct"] for r in runs),
        "greedy_correct": sum(r["greedy_correct"] for r in runs),
    }
    for metric, threshold in CROSSINGS:
        key = f"iters_{metric}_{threshold:g}"
        summary[key] = spread([r[key] for r in runs if r[key] is not None])
    return summary


def fmt_iters(entry: dict[str, Any], n_seeds: int, cap: int) -> str:
    if not entry["n"]:
        return f"> {cap} (0/{n_seeds})"
    return f"{entry['median']:g} [{entry['min']}–{entry['max']}] ({entry['n']}/{n_seeds})"


def ratios(orm: list[dict[str, Any]], pav: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per seed (same SFT start): α = 0's iterations to the crossing ÷ α = 1's. Where α = 0 never crossed, the
    ratio is a lower bound (its cap ÷ α = 1's), counted apart."""
    by_seed = {r["seed"]: r for r in orm}
    exact, lower = [], []
    for run in pav:
        base = by_seed.get(run["seed"])
        if base is None or run[key] is None or run[key] == 0:
            continue
        if base[key] is None:
            lower.append(base["iterations_cap"] / run[key])
        else:
            exact.append(base[key] / run[key])
    return {**spread(exact), "lower_bounds": lower}


def fmt_ratio(entry: dict[str, Any]) -> str:
    if not entry["n"] and not entry["lower_bounds"]:
        return "—"
    text = f"{entry['median']:.1f}× [{entry['min']:.1f}–{entry['max']:.1f}] (n = {entry['n']})" if entry["n"] else ""
    if entry["lower_bounds"]:
        text += f"; ≥ {min(entry['lower_bounds']):.1f}× in {len(entry['lower_bounds'])} seed(s) where α = 0 never did"
    return text


def curve(run: dict[str, Any], steps: list[int], metric: str = "accuracy") -> list[float]:
    """The run's metric at ``steps``: the latest evaluation at or before each step (carried after a stop)."""
    history, out, j = run["history"], [], 0
    for step in steps:
        while j + 1 < len(history) and history[j + 1]["iteration"] <= step:
            j += 1
        out.append(history[j].get(metric, math.nan))
    return out


def plot(out: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    adam = [r for r in results["runs"] if r["optimizer"] == "adam"]
    orm = [r for r in adam if r["alpha"] == 0]
    gammas = sorted({r["gamma"] for r in adam if r["alpha"] != 0})
    horizon = max(r["iterations_run"] for r in adam)
    if orm:
        reached = [r[k] for r in orm for k in ("iters_accuracy_0.5", "iters_accuracy_0.9") if r[k] is not None]
        horizon = min(horizon, int(1.15 * max(reached)) + settings["eval_every"]) if reached else horizon
    horizon = max(horizon, settings["min_iterations"])
    steps = list(range(0, horizon + 1, settings["eval_every"]))
    written = []

    n_cols = 3
    n_rows = math.ceil(len(gammas) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(13, 3.0 * n_rows), sharex=True, sharey=True, squeeze=False)
    for ax, gamma in zip(axes.flat, gammas):
        for run in orm:
            ax.plot(steps, curve(run, steps), color="0.6", lw=0.8)
        for run in [r for r in adam if r["alpha"] != 0 and r["gamma"] == gamma]:
            ax.plot(steps, curve(run, steps), color="C0", lw=0.9)
        ax.set_title(f"γ = {gamma:g}: α = 1 (blue) vs α = 0 (grey)", fontsize=9)
        ax.set_ylim(-0.03, 1.03)
    for ax in axes.flat[len(gammas) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("RL iteration (64 rollouts each)")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"accuracy ({settings['eval_rollouts']} samples)")
    fig.suptitle(f"Didactic RL, Adam, {settings['head']} head: one line per seed ({len(orm)} seeds)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_iterations.png", dpi=110)
    plt.close(fig)
    written.append("accuracy_vs_iterations.png")

    summary = results["summary"]["adam"]
    theory = results["theory_mean"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label, color in (("iters_accuracy_0.9", "90%", "C0"), ("iters_accuracy_0.5", "50%", "C1")):
        for gamma in gammas:
            values_ = [r[key] for r in adam if r["alpha"] != 0 and r["gamma"] == gamma and r[key] is not None]
            axes[0].scatter([gamma] * len(values_), values_, color=color, s=10, alpha=0.5)
        medians = [summary["alpha=1"][str(g)][key]["median"] for g in gammas]
        axes[0].plot(gammas, [m if m is not None else math.nan for m in medians], color=color, marker="o", label=label)
        if "alpha=0" in summary and summary["alpha=0"][key]["median"] is not None:
            entry = summary["alpha=0"][key]
            axes[0].axhline(entry["median"], color=color, ls="--", lw=1)
            axes[0].axhspan(entry["min"], entry["max"], color=color, alpha=0.08)
    axes[0].set(xscale="log", yscale="log", xlabel="prover γ", ylabel="iterations to reach (α = 1; dots: seeds)")
    axes[0].set_title("Iterations to 50% / 90% accuracy vs γ (dashed, band: α = 0 median, range)", fontsize=9)
    axes[0].legend()
    for key, marker in (("distinguishability", "o"), ("alignment", "s"), ("score", "^")):
        axes[1].plot(gammas, [max(theory[str(g)][key], 1e-12) for g in gammas], marker=marker, label=key)
    axes[1].set(xscale="log", yscale="log", xlabel="prover γ", title="Theorem 3.1 quantities of the SFT policy")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "gamma_dependence.png", dpi=110)
    plt.close(fig)
    written.append("gamma_dependence.png")

    if orm:
        best = min(gammas, key=lambda g: summary["alpha=1"][str(g)]["iters_accuracy_0.9"]["median"] or math.inf)
        shown = sorted({best, 10.0} & set(gammas))
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for metric, style in (("accuracy", "-"), ("pass@8", "--"), ("pass@64", ":")):
            for group, color, label in [(orm, "k", "α = 0")] + [
                ([r for r in adam if r["alpha"] != 0 and r["gamma"] == g], f"C{i}", f"α = 1, γ = {g:g}")
                for i, g in enumerate(shown)
            ]:
                table = list(zip(*[curve(r, steps, metric) for r in group]))
                ax.plot(steps, [statistics.median(c) for c in table], color=color, ls=style, label=f"{label}, {metric}")
        ax.set(xlabel="RL iteration", ylabel="median over seeds", title="Pass@N over iterations (Adam)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "pass_at_n.png", dpi=110)
        plt.close(fig)
        written.append("pass_at_n.png")
    return written


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values_: list[float]) -> list[float]:
        order = sorted(range(len(values_)), key=lambda i: values_[i])
        out = [0.0] * len(values_)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values_[order[j + 1]] == values_[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else math.nan


def write_report(out: Path, results: dict[str, Any]) -> None:
    settings, summary = results["settings"], results["summary"]
    lines = [
        "# Didactic RL sweep (docs/method.md §7)",
        "",
        f"Planted task (length 10, vocab 15, target [3, 6, 0, 3, 5]); MLP 3 × 128 with a **{settings['head']}** "
        f"output head; SFT 50 Adam steps (lr 1e-3, batch 64) on 3,200 γ = 5 prover samples; RL: up to "
        f"{settings['iterations']} iterations × 64 rollouts (SGD: {settings['sgd_iterations']}), REINFORCE on "
        f"`R + α·A^μ` ({settings['advantage_source']} A^μ, baseline {settings['baseline']}), Adam lr {settings['lr']}"
        f". Accuracy = fraction correct of {settings['eval_rollouts']} fresh samples every {settings['eval_every']} "
        f"iterations (one standard error ≤ {0.5 / math.sqrt(settings['eval_rollouts']):.3f}); final = mean of the "
        f"last 3 evaluations. A run stops early once every evaluation of the last {settings['hold']} iterations "
        f"reached {settings['hold_threshold']} (not before iteration {settings['min_iterations']}). Wall time of "
        f"the runs {results['wall_s'] / 60:.1f} min on 1 core.",
        "",
        "## Start (SFT policy, per seed)",
        "",
        "| seed | SFT NLL | accuracy | pass@64 | greedy correct |",
        "|---:|---:|---:|---:|---:|",
    ]
    for seed, sft in results["sft"].items():
        lines.append(
            f"| {seed} | {sft['loss']:.3f} | {sft['accuracy']:.4f} | {sft.get('pass@64', math.nan):.3f} "
            f"| {sft['greedy']:.0f} |"
        )
    for optimizer in summary:
        lr = settings["lr"] if optimizer == "adam" else settings["sgd_lr"]
        lines += [
            "",
            f"## {optimizer.upper()} (lr {lr}): iterations to 50% / 90% accuracy, median [min–max] (seeds that "
            "reached it / seeds)",
            "",
            "| α | γ | final accuracy mean [min–max] | iters to 50% | iters to 90% | iters to pass@64 ≥ 0.9 "
            "| stopped early | mode share (median) | distinct correct (median) | greedy correct |",
            "|---:|---:|---|---|---|---|---:|---:|---:|---:|",
        ]
        entries = [("0", "—", summary[optimizer]["alpha=0"])] if "alpha=0" in summary[optimizer] else []
        entries += [("1", g, s) for g, s in sorted(summary[optimizer]["alpha=1"].items(), key=lambda kv: float(kv[0]))]
        for alpha, gamma, s in entries:
            n, cap = s["n_seeds"], s["iterations_cap"]
            lines.append(
                f"| {alpha} | {gamma if gamma == '—' else f'{float(gamma):g}'} | {s['final_mean']:.3f} "
                f"[{s['final_min']:.3f}–{s['final_max']:.3f}] | {fmt_iters(s['iters_accuracy_0.5'], n, cap)} "
                f"| {fmt_iters(s['iters_accuracy_0.9'], n, cap)} | {fmt_iters(s['iters_pass@64_0.9'], n, cap)} "
                f"| {s['stopped_early']}/{n} | {s['mode_share_median']:.2f} | {s['distinct_correct_median']:g} "
                f"| {s['greedy_correct']:.0f}/{n} |"
            )
    if results["efficiency"]:
        lines += [
            "",
            "## Sample efficiency: α = 0's iterations ÷ α = 1's, per seed (same SFT start), median [min–max]",
            "",
            "| γ | to 90% accuracy | to 50% accuracy | to pass@64 ≥ 0.9 |",
            "|---:|---|---|---|",
        ]
        for gamma, entry in sorted(results["efficiency"].items(), key=lambda kv: float(kv[0])):
            lines.append(
                f"| {float(gamma):g} | {fmt_ratio(entry['iters_accuracy_0.9'])} | "
                f"{fmt_ratio(entry['iters_accuracy_0.5'])} | {fmt_ratio(entry['iters_pass@64_0.9'])} |"
            )
    theory = results["theory_mean"]
    ranked = sorted(theory, key=lambda g: -theory[g]["score"])
    adam1 = summary.get("adam", {}).get("alpha=1", {})
    lines += [
        "",
        "## Theorem 3.1 quantities of the SFT policy (before RL; mean over seeds), next to the measured speed",
        "",
        "Exact `A^μ` over all 15 actions weighted by π at the states of "
        f"{settings['theory_rollouts']} π rollouts; `A^π` from {settings['theory_mc']} π completions per "
        "(state, action). Score = distinguishability + alignment; rank 1 = recommended before RL.",
        "",
        "| γ | distinguishability | alignment | score | rank | correlation | median iters to 90% (α = 1) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in sorted(theory, key=float):
        row = theory[g]
        median = adam1.get(g, {}).get("iters_accuracy_0.9", {}).get("median")
        lines.append(
            f"| {float(g):g} | {row['distinguishability']:.2e} | {row['alignment']:.2e} | {row['score']:.2e} "
            f"| {ranked.index(g) + 1} | {row['correlation']:.3f} | {'—' if median is None else f'{median:g}'} |"
        )
    lines += ["", f"Spearman(score, −median iters to 90%) over γ: {results['theory_vs_speed']:.2f}."]
    lines += ["", "## Greedy rollout at the end (seed 0, Adam)", "", "| α | γ | greedy tokens | correct |"]
    lines += ["|---:|---:|---|---:|"]
    for run in results["runs"]:
        if run["seed"] == 0 and run["optimizer"] == "adam":
            gamma = "—" if run["alpha"] == 0 else f"{run['gamma']:g}"
            lines.append(f"| {run['alpha']:g} | {gamma} | {run['greedy_rollout']} | {run['greedy_correct']:.0f} |")
    lines += ["", "![accuracy](accuracy_vs_iterations.png)", "", "![gamma](gamma_dependence.png)", ""]
    lines += ["![pass@N](pass_at_n.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that run is redone
                continue
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path, runs_path, sft_path = out / "settings.json", out / "runs.jsonl", out / "sft.jsonl"
    run_settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    if args.fresh:
        for path in (settings_path, runs_path, sft_path):
            path.unlink(missing_ok=True)
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        changed = {k: (previous.get(k), v) for k, v in run_settings.items() if previous.get(k) != v}
        if changed:
            sys.exit(f"error: {settings_path} was written with other settings {changed} (old, new); use --fresh")
    settings_path.write_text(json.dumps(run_settings, indent=1))

    start = time.perf_counter()
    seeds = list(range(args.seeds))
    plan = [] if args.no_alpha0 else [(args.gammas[0], 0.0, s, "adam") for s in seeds]
    plan += [(g, 1.0, s, "adam") for g in args.gammas for s in seeds]
    if args.sgd_gammas:
        sgd_seeds = seeds[: args.sgd_seeds]
        plan += [] if args.no_alpha0 else [(args.sgd_gammas[0], 0.0, s, "sgd") for s in sgd_seeds]
        plan += [(g, 1.0, s, "sgd") for g in args.sgd_gammas for s in sgd_seeds]

    sft_rows = {row["seed"]: row for row in load_jsonl(sft_path)}
    for seed in seeds:  # Theorem 3.1 quantities of each seed's SFT policy, before any RL
        if seed in sft_rows and {r["gamma"] for r in sft_rows[seed]["theory"]} >= set(args.gammas):
            continue
        module = DidacticRLModule(seed=seed, eval_rollouts=args.eval_rollouts, head=args.head)
        metrics = module.run_sft()
        rows = recommend_prover(module.policy, args.gammas, args.theory_rollouts, args.theory_mc, seed=seed)
        sft_rows[seed] = {"seed": seed, "sft": metrics, "theory": rows}
        with open(sft_path, "a") as log:
            log.write(json.dumps(sft_rows[seed]) + "\n")
        print(f"seed {seed}: SFT {metrics}; recommended γ {rows[0]['gamma']:g}", flush=True)

    done = {run_key(r["gamma"], r["alpha"], r["seed"], r["optimizer"]): r for r in load_jsonl(runs_path)}
    if done:
        print(f"resuming: {len(done)} runs already in {runs_path}", flush=True)
    runs = []
    for gamma, alpha, seed, name in plan:
        key = run_key(gamma, alpha, seed, name)
        if key in done:
            runs.append(done[key])
            continue
        run = run_one(gamma, alpha, seed, name, args)
        runs.append(run)
        with open(runs_path, "a") as log:  # every finished run survives an interruption
            log.write(json.dumps(run) + "\n")
        print(
            f"{name} γ={gamma:g} α={alpha:g} seed={seed}: final {run['final_accuracy']:.3f}, 50% at "
            f"{run['iters_accuracy_0.5']}, 90% at {run['iters_accuracy_0.9']}, ran {run['iterations_run']}"
            f"{' (stopped: held)' if run['stopped_early'] else ''}, greedy {run['greedy_rollout']} "
            f"({run['wall_s']:.1f} s)",
            flush=True,
        )

    summary: dict[str, Any] = {}
    for name in ("adam", "sgd"):
        chosen = [r for r in runs if r["optimizer"] == name]
        if not chosen:
            continue
        summary[name] = {"alpha=1": {}}
        if any(r["alpha"] == 0 for r in chosen):
            summary[name]["alpha=0"] = summarise([r for r in chosen if r["alpha"] == 0])
        for gamma in sorted({r["gamma"] for r in chosen if r["alpha"] != 0}):
            summary[name]["alpha=1"][str(gamma)] = summarise(
                [r for r in chosen if r["alpha"] != 0 and r["gamma"] == gamma]
            )
    adam = [r for r in runs if r["optimizer"] == "adam"]
    orm = [r for r in adam if r["alpha"] == 0]
    efficiency = {}
    if orm:
        for gamma in args.gammas:
            pav = [r for r in adam if r["alpha"] != 0 and r["gamma"] == gamma]
            efficiency[str(gamma)] = {f"iters_{m}_{t:g}": ratios(orm, pav, f"iters_{m}_{t:g}") for m, t in CROSSINGS}
    theory_mean = {
        str(float(g)): {
            key: statistics.fmean(next(r[key] for r in sft_rows[s]["theory"] if r["gamma"] == float(g)) for s in seeds)
            for key in ("distinguishability", "alignment", "score", "correlation", "a_mu_abs", "prover_accuracy")
        }
        for g in args.gammas
    }
    medians = {
        g: summary.get("adam", {}).get("alpha=1", {}).get(g, {}).get("iters_accuracy_0.9", {}) for g in theory_mean
    }
    known = [g for g in theory_mean if medians[g].get("median") is not None]
    results = {
        "settings": {**vars(args), "seeds": seeds},
        "sft": {str(s): sft_rows[s]["sft"] for s in seeds},
        "theory": {str(s): sft_rows[s]["theory"] for s in seeds},
        "theory_mean": theory_mean,
        "theory_vs_speed": spearman([theory_mean[g]["score"] for g in known], [-medians[g]["median"] for g in known])
        if len(known) > 2
        else math.nan,
        "runs": runs,
        "summary": summary,
        "efficiency": efficiency,
        "wall_s": sum(r["wall_s"] for r in runs),
        "this_invocation_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    written = plot(out, results) if "adam" in summary else []
    write_report(out, results)
    if args.docs:
        docs = Path(args.docs)
        names = {
            "accuracy_vs_iterations.png": "accuracy",
            "gamma_dependence.png": "gamma",
            "pass_at_n.png": "pass_at_n",
        }
        for name in written:
            (docs / f"didactic_{names[name]}.png").write_bytes((out / name).read_bytes())
    print(f"wrote {out}/report.md, results.json and {written} ({results['wall_s'] / 60:.1f} min of runs)", flush=True)
    return results


if __name__ == "__main__":
    main()
