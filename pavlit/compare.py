"""``pavlit compare``: run fit configs over seeds, each a real ``pavlit fit``, and compare their evaluation curves.

The RL comparison of the method (PAV-RL vs ORM-RL) is the shipped ``configs/tiny/rl.yaml`` and ``rl_orm.yaml``,
each fitted once per seed (``configs/tiny/rl_compare.yaml``: ``methods: [{name: pav, label: PAV-RL, config:
configs/tiny/rl.yaml}, ...]``, ``seeds: [0, 1, 2]``, ``baseline: orm``, ``target: pav``).

Every run is ``pavlit fit --config <config> <method's args> <args> <method_args> --seed_everything S
--model.init_args.seed S --data.init_args.seed S --trainer.default_root_dir <output_dir>/runs/<name>-<S>`` (the keys
of ``seed_keys``), in its own process and run folder, so what is compared is exactly what the configs train. Its
evaluation curve is the ``history`` the module writes into the run's ``metrics.json``
(:class:`~pavlit.modules.policy_rl.PolicyRLModule` logs ``val/accuracy`` every ``trainer.val_check_interval`` iterations
and keeps each evaluation there); with ``initial_eval`` a ``pavlit validate`` of the same command line first
measures iteration 0 (the initial policy, on the same evaluation draws as the fit's evaluations of that seed).

Resuming: a finished run (``compare.json`` says ``finished`` and its ``metrics.json`` exists) is kept and skipped;
an interrupted fit resumes from its own ``resume.ckpt``; a run folder whose recorded command line differs from
the one now asked for is refused, naming both. ``only`` (method names) and ``seeds`` split one comparison over
several processes writing into the same ``output_dir``; the report covers every seed finished by every method.

Writes ``results.json`` (per method: the iterations, the seed-mean, min and max accuracy, every seed's curve; the
final accuracies and gap; the sample efficiency), ``report.md`` and ``accuracy_vs_iterations.png``. Sample
efficiency (Setlur et al. §6) = iterations ``baseline`` needs to reach its final accuracy ÷ iterations ``target``
needs to reach the same, on the seed-mean curves and per seed.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pavlit.jobs.atomic import atomic_write_text
from pavlit.pipeline import die_with_parent, rebase_config

__all__ = ["CompareMethod", "compare", "compare_command", "first_reaching", "sample_efficiency", "summarise"]

#: A command-line argument as YAML reads it (``12`` in a flow list is a number; it is passed on as text).
Arg = str | int | float
PLOT_NAME = "accuracy_vs_iterations.png"
RECORD = "compare.json"


@dataclass
class CompareMethod:
    """One line of the comparison.

    Args:
        name: Short plain name (names the run folders ``<name>-<seed>``).
        config: The ``pavlit fit`` config it runs.
        label: Name in the report and plot (default: ``name``).
        args: Extra ``pavlit fit`` arguments for this method only (after the comparison's shared ``args``).
    """

    name: str
    config: str
    label: str | None = None
    args: list[Arg] = field(default_factory=list)


def compare(
    output_dir: str,
    methods: list[CompareMethod],
    seeds: list[int] = [0],  # noqa: B006 - jsonargparse reads the default; never mutated
    args: list[Arg] = [],  # noqa: B006
    method_args: dict[str, list[Arg]] = {},  # noqa: B006
    seed_keys: list[str] = ["seed_everything", "model.init_args.seed", "data.init_args.seed"],  # noqa: B006
    only: list[str] | None = None,
    baseline: str | None = None,
    target: str | None = None,
    initial_eval: bool = True,
    metric: str = "accuracy",
    rebase: dict[str, str] = {},  # noqa: B006
) -> dict[str, Any]:
    """Fit every method's config once per seed (finished runs kept), then write the comparison.

    Args:
        output_dir: Folder of the run folders (``runs/<name>-<seed>``) and the comparison's report.
        methods: The configs compared.
        seeds: Seeds each method runs with.
        args: ``pavlit fit`` arguments appended for every method (e.g. shorter runs).
        method_args: More arguments for some methods, by name, after theirs (e.g. the PAV of this run, from a
            pipeline: ``{pav: [--model.init_args.advantages.init_args.verifier_path, <folder>]}``).
        seed_keys: Config keys set to the seed (``--<key> <seed>`` each).
        only: Run only these methods in this process (the report still covers every finished run).
        baseline: Method whose final accuracy the sample efficiency matches (e.g. ORM-RL).
        target: Method whose iterations to reach it are counted (e.g. PAV-RL).
        initial_eval: Measure iteration 0 with ``pavlit validate`` on the same command line.
        metric: Key of the ``history`` rows compared (``accuracy``: the module's ``val/accuracy``).
        rebase: Run folders to move (``{runs/tiny: runs/pipeline}``): each fit then runs a copy of its config,
            ``<output_dir>/configs/<name>.yaml``, with every path under a key moved under its value (what
            ``pavlit pipeline`` sets when its stage configs name another run folder).

    Returns:
        The ``results.json`` content (``{}`` when no seed is finished by every method yet).
    """
    names = [m.name for m in methods]
    if not methods:
        raise ValueError("methods: list at least one {name, config}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods: names must be unique, got {names}")
    for method in methods:
        if not method.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"methods: name {method.name!r} must be letters, digits, '_' or '-' (it names folders)")
        if not Path(method.config).is_file():
            raise ValueError(f"methods: {method.name}: config {method.config} does not exist")
    named = [("baseline", baseline), ("target", target), *(("only", o) for o in only or [])]
    for key, value in [*named, *(("method_args", name) for name in method_args)]:
        if value is not None and value not in names:
            raise ValueError(f"{key}: {value!r} is not one of the methods {names}")
    if (baseline is None) != (target is None):
        raise ValueError("baseline and target: give both (the sample efficiency compares two methods) or neither")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct integers, got {seeds}")
    out = Path(output_dir)
    start = time.perf_counter()
    runnable = methods
    if rebase:
        runnable = [
            replace(m, config=rebase_config(m.config, rebase, out / "configs" / f"{m.name}.yaml")) for m in methods
        ]
    for seed in seeds:
        for method in runnable:
            if only is None or method.name in only:
                run_method(out, method, seed, [*args, *method_args.get(method.name, [])], seed_keys, initial_eval)
    results = summarise(out, methods, baseline, target, metric)
    if results:
        results["wall_s"] = time.perf_counter() - start
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        plot(out / PLOT_NAME, results)
        atomic_write_text(out / "report.md", render_report(results))
    return results


def fit_command(method: CompareMethod, seed: int, args: list[Arg], seed_keys: list[str], root: Path) -> list[str]:
    """The ``pavlit`` command line (after ``pavlit``) of one run; ``fit`` is swapped for ``validate`` at iteration 0.

    ``args`` (the comparison's shared arguments, then the ``method_args`` of this method) come after the method's
    own ``args``, so a pipeline can repoint any method's paths.
    """
    seeded = [item for key in seed_keys for item in (f"--{key}", str(seed))]
    extra = [str(arg) for arg in (*method.args, *args)]
    return ["fit", "--config", method.config, *extra, *seeded, "--trainer.default_root_dir", str(root)]


def run_method(
    out: Path, method: CompareMethod, seed: int, args: list[Arg], seed_keys: list[str], initial_eval: bool
) -> dict[str, Any]:
    """Run (or reuse) one method at one seed; returns its record (``history`` of the run's evaluations)."""
    root = out / "runs" / f"{method.name}-{seed}"
    command = fit_command(method, seed, args, seed_keys, root)
    record_path = root / RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("command") != command:
            raise ValueError(
                f"{root} was run as `pavlit {' '.join(record.get('command', []))}`, not `pavlit {' '.join(command)}`:"
                " use another output_dir or delete that run folder"
            )
        if record.get("finished") and (root / "metrics.json").exists():
            print(f"{method.name} seed {seed}: done already ({root})", flush=True)
            return record
    record = {"method": method.name, "seed": seed, "command": command, "finished": False}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    start = time.perf_counter()
    initial = None
    if initial_eval:
        initial = _initial_evaluation(root, command)
    print(f"{method.name} seed {seed}: pavlit {' '.join(command)}", flush=True)
    _run(command, root / "fit.log")
    metrics = root / "metrics.json"
    if not metrics.exists():
        raise RuntimeError(f"{method.name} seed {seed}: the fit wrote no {metrics} (its log: {root / 'fit.log'})")
    history = json.loads(metrics.read_text(encoding="utf-8")).get("history")
    if not history:
        raise RuntimeError(
            f"{metrics} has no evaluation history: compare needs a module that keeps one (PolicyRLModule) and a "
            "trainer that validates during the fit (trainer.val_check_interval)"
        )
    record.update(initial=initial, finished=True, wall_s=time.perf_counter() - start)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def _initial_evaluation(root: Path, command: list[str]) -> dict[str, Any]:
    """``pavlit validate`` on the run's command line, into ``<root>/initial``; its logged ``val/*`` metrics."""
    folder = root / "initial"
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}})
    validate = ["validate", *command[1:-1], str(folder), "--trainer.logger", logger]
    _run(validate, root / "initial.log")
    found = sorted(folder.rglob("metrics.csv"))
    if not found:
        raise RuntimeError(f"the initial evaluation logged no metrics.csv under {folder} (its log: {root}/initial.log)")
    import csv

    values: dict[str, Any] = {"step": 0, "samples": 0}
    with found[-1].open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            values.update({k.removeprefix("val/"): float(v) for k, v in row.items() if k.startswith("val/") and v})
    if len(values) == 2:
        raise RuntimeError(f"the initial evaluation logged no val/ metric into {found[-1]}")
    return values


def _run(command: list[str], log: Path) -> None:
    """``python -m pavlit <command>``; its output to ``log`` (and the terminal); a failure names the log."""
    with log.open("a", encoding="utf-8") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "pavlit", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Killed with this process (as pipeline stages are), so a rerun never races a leftover fit.
            preexec_fn=functools.partial(die_with_parent, os.getpid()) if sys.platform == "linux" else None,
        )
        assert process.stdout is not None
        for line in process.stdout:
            f.write(line)
            sys.stderr.write(line)
        if process.wait() != 0:
            raise RuntimeError(
                f"`pavlit {' '.join(command[:3])} ...` failed (exit {process.returncode}); its log: {log}"
            )


def _curve(out: Path, method: str, seed: int, metric: str) -> list[tuple[int, float]] | None:
    root = out / "runs" / f"{method}-{seed}"
    record_path, metrics = root / RECORD, root / "metrics.json"
    if not record_path.exists() or not metrics.exists():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if not record.get("finished"):
        return None
    rows = [r for r in json.loads(metrics.read_text(encoding="utf-8")).get("history", []) if r.get("split") != "test"]
    if record.get("initial") and metric in record["initial"]:
        rows = [record["initial"], *rows]
    return [(int(r["step"]), float(r[metric])) for r in rows if metric in r]


def summarise(
    out: Path, methods: list[CompareMethod], baseline: str | None, target: str | None, metric: str = "accuracy"
) -> dict[str, Any]:
    """The comparison of every seed that every method has finished in ``out/runs`` (``{}`` when none)."""
    found: dict[str, dict[int, list[tuple[int, float]]]] = {m.name: {} for m in methods}
    for path in sorted((out / "runs").glob(f"*/{RECORD}")) if (out / "runs").exists() else []:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("method") in found:
            curve = _curve(out, record["method"], int(record["seed"]), metric)
            if curve:
                found[record["method"]][int(record["seed"])] = curve
    seeds = sorted(set.intersection(*(set(found[m.name]) for m in methods)))
    if not seeds:
        print(f"no seed is finished by every method in {out / 'runs'} yet: no report", flush=True)
        return {}
    steps = [s for s, _ in found[methods[0].name][seeds[0]]]
    curves: dict[str, Any] = {}
    for method in methods:
        for seed in seeds:
            if [s for s, _ in found[method.name][seed]] != steps:
                raise ValueError(
                    f"{method.name} seed {seed} was evaluated at iterations {[s for s, _ in found[method.name][seed]]}"
                    f", {methods[0].name} seed {seeds[0]} at {steps}: the curves cannot be compared"
                )
        columns = list(zip(*[[v for _, v in found[method.name][seed]] for seed in seeds]))
        curves[method.name] = {
            "label": method.label or method.name,
            "config": method.config,
            "iterations": steps,
            "mean": [statistics.fmean(c) for c in columns],
            "min": [min(c) for c in columns],
            "max": [max(c) for c in columns],
            "per_seed": {str(seed): [v for _, v in found[method.name][seed]] for seed in seeds},
        }
    final = {name: c["mean"][-1] for name, c in curves.items()}
    results: dict[str, Any] = {"metric": metric, "seeds": seeds, "curves": curves, "final": final}
    if baseline is not None and target is not None:
        results["baseline"], results["target"] = baseline, target
        results["final_gap"] = final[target] - final[baseline]
        results["sample_efficiency"] = sample_efficiency(steps, curves[baseline]["mean"], curves[target]["mean"])
        results["per_seed_efficiency"] = {
            str(seed): sample_efficiency(
                steps, curves[baseline]["per_seed"][str(seed)], curves[target]["per_seed"][str(seed)]
            )
            for seed in seeds
        }
    return results


def first_reaching(steps: list[int], accuracy: list[float], target: float) -> int | None:
    """The first iteration whose accuracy reaches ``target`` (``None``: never)."""
    return next((step for step, value in zip(steps, accuracy) if value >= target - 1e-12), None)


def sample_efficiency(steps: list[int], baseline: list[float], target: list[float]) -> dict[str, Any]:
    """Iterations ``baseline`` needs to reach its final accuracy ÷ iterations ``target`` needs to reach the same.

    ``ratio`` is ``None`` (with a ``note``) when the baseline never improved on its first evaluation or the target
    never reaches it. A target that reaches it at the first evaluation after iteration 0 is counted at that
    evaluation's iteration (the ratio is then a lower bound set by the evaluation spacing).
    """
    goal = baseline[-1]
    base_iters, target_iters = first_reaching(steps, baseline, goal), first_reaching(steps, target, goal)
    result: dict[str, Any] = {"goal": goal, "baseline_iterations": base_iters, "target_iterations": target_iters}
    if goal <= baseline[0]:
        result["note"] = f"the baseline did not improve on its first evaluation ({baseline[0]:.3f} → {goal:.3f})"
        result["ratio"] = None
    elif target_iters is None:
        result["note"] = f"the target never reached the baseline's final accuracy {goal:.3f}"
        result["ratio"] = None
    else:
        spacing = next((s for s in steps if s > 0), 1)
        result["ratio"] = base_iters / max(target_iters, spacing)
        result["lower_bound"] = target_iters <= spacing
    return result


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in results["curves"].values():
        ax.plot(curve["iterations"], curve["mean"], marker="o", label=curve["label"])
        ax.fill_between(curve["iterations"], curve["min"], curve["max"], alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"val/{results['metric']}")
    ax.set_title(f"mean and min–max over {len(results['seeds'])} seed(s)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_report(results: dict[str, Any]) -> str:
    """The comparison's ``report.md``: the curves table, the sample efficiency and the final gap, the plot."""
    curves = results["curves"]
    names = list(curves)
    lines = [
        "# Evaluation curves over seeds",
        "",
        f"`val/{results['metric']}` at each evaluation (on the datamodule's `validation_split`; mean [min–max] over "
        f"seeds {results['seeds']}), each run a `pavlit fit` of "
        + ", ".join(f"`{c['config']}` ({c['label']})" for c in curves.values())
        + ".",
        "",
        "| iteration | " + " | ".join(f"{curves[n]['label']} mean [min–max]" for n in names) + " |",
        "| ---: | " + " | ".join("---" for _ in names) + " |",
    ]
    for i, step in enumerate(curves[names[0]]["iterations"]):
        cells = [f"{curves[n]['mean'][i]:.3f} [{curves[n]['min'][i]:.3f}–{curves[n]['max'][i]:.3f}]" for n in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("")
    if "sample_efficiency" in results:
        base, tgt = curves[results["baseline"]]["label"], curves[results["target"]]["label"]
        e = results["sample_efficiency"]
        if e["ratio"] is None:
            ratio = f"n/a ({e['note']})"
        else:
            ratio = f"**{e['ratio']:.2f}×**" + (" (a lower bound: reached at the first evaluation)" * e["lower_bound"])
        lines += [
            f"- **Sample efficiency** of {tgt} over {base} (seed-mean curves): {ratio}; {base} reaches its final "
            f"{results['metric']} {e['goal']:.3f} at iteration {e['baseline_iterations']}, {tgt} at "
            f"{e['target_iterations']}.",
            "- Per seed: "
            + ", ".join(
                f"seed {s}: {'n/a' if r['ratio'] is None else format(r['ratio'], '.2f') + '×'}"
                for s, r in results["per_seed_efficiency"].items()
            ),
            f"- **Final gap** ({tgt} − {base}): {results['final_gap']:+.3f} ({tgt} "
            f"{results['final'][results['target']]:.3f}, {base} {results['final'][results['baseline']]:.3f}).",
            "",
        ]
    lines += [f"![{results['metric']} vs iterations]({PLOT_NAME})", ""]
    return "\n".join(lines)


def compare_command(argv: list[str]) -> int:
    """Fit configs over seeds (each a resumable ``pavlit fit``) and compare their evaluation curves."""
    from pavlit.commands import parse_job

    try:
        kwargs = parse_job("pavlit compare", compare, argv, "configs/tiny/rl_compare.yaml")
        results = compare(**kwargs)
    except (RuntimeError, ValueError) as err:
        print(f"pavlit compare: error: {err}", file=sys.stderr)
        return 1
    if results:
        print(render_report(results))
    return 0
