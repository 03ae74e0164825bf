"""The pipeline's ``<run_dir>/report.md``: a summary of what was and was not shown, then one section per stage.

Each section reads what its stage wrote into its report folder, recognised by content, not by stage name:

- a policy fit (SFT/RFT: ``metrics.json`` with ``val/pass@1``): pass@1 and pass@k on the validation problems;
- labels (``metrics.json`` with ``records``): records, seed accuracy, the share of labels strictly inside (0, 1),
  the mean label and the mean ``|ΔQ̂|`` between consecutive steps (from its ``trl_prm.jsonl``);
- a verifier fit (``metrics.json`` with ``kind`` and ``metrics``): every validation metric beside the constant
  predictor's (``val/baseline_*``);
- a search (``results.json`` with ``points``): its own ``report.md`` (accuracy with bootstrap CIs per budget first,
  then the compute-efficiency ratio against both reference points), numbers as ``pavlit search`` computed them;
- a comparison (``results.json`` with ``curves``, ``pavlit compare``): its ``report.md`` (curves, sample
  efficiency, final gap).

Anything else gets its ``metrics.json`` (flattened) and ``report.md``. PNG plots are embedded with links relative
to the combined report. The summary never headlines a compute-efficiency ratio against a baseline whose accuracy
falls with budget (the ratio then rewards the baseline's degradation, not the target).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pavlit.jobs.jsonl import json_objects

__all__ = ["write_report"]


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _embed(folder: Path, root: Path) -> list[str]:
    """The stage's own ``report.md`` (headings demoted, image links re-anchored), then its other PNGs."""
    lines: list[str] = []
    sub_report = folder / "report.md"
    text = sub_report.read_text(encoding="utf-8") if sub_report.exists() else ""
    if text:
        rel = os.path.relpath(folder, root)
        text = text.replace("](", f"]({rel}/").replace(f"]({rel}/http", "](http")
        lines.append("\n".join("##" + line if line.startswith("#") else line for line in text.splitlines()))
    for png in sorted(folder.glob("*.png")):
        if png.name not in text:
            lines += ["", f"![{png.stem}]({os.path.relpath(png, root)})"]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def _policy_section(metrics: dict[str, Any]) -> tuple[list[str], str]:
    keys = sorted(k for k in metrics if k.startswith("val/pass@"))
    ks = sorted(keys, key=lambda k: int(k.removeprefix("val/pass@")))
    lines = ["| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {_fmt(metrics[k])} |" for k in [*ks, "val/loss", "global_step"] if k in metrics]
    top = ks[-1].removeprefix("val/") if ks else None
    summary = f"SFT/RFT policy: pass@1 {metrics['val/pass@1']:.3f}"
    if top and top != "pass@1":
        summary += f", {top} {metrics[ks[-1]]:.3f}"
    return lines, summary + " on its validation problems"


def _mean_step_change(path: Path) -> tuple[float | None, int]:
    """Mean ``|Q̂(s_h) − Q̂(s_{h−1})|`` over consecutive labelled steps of each seed rollout in ``trl_prm.jsonl``
    (from step 2: that file has no label for the question-only prefix), streamed line by line."""
    if not path.exists():
        return None, 0
    total, pairs = 0.0, 0
    for _, record in json_objects(path):
        labels = record.get("labels") or []
        total += sum(abs(b - a) for a, b in zip(labels, labels[1:]))
        pairs += max(len(labels) - 1, 0)
    return (total / pairs if pairs else None), pairs


def _label_section(metrics: dict[str, Any], folder: Path) -> tuple[list[str], str]:
    rows = [
        ("problems", metrics.get("problems")),
        ("step-label records", metrics.get("records")),
        ("seed rollouts", metrics.get("seed_rollouts")),
        ("seed accuracy", metrics.get("seed_accuracy")),
        ("share of labels strictly inside (0, 1)", metrics.get("fraction_q_strictly_between_0_and_1")),
        ("mean label Q̂", metrics.get("mean_q_mc")),
        ("Monte-Carlo rollouts for the labels", metrics.get("label_rollouts")),
    ]
    delta, pairs = _mean_step_change(folder / "trl_prm.jsonl")
    rows.append(
        (
            "mean \\|ΔQ̂\\| between consecutive steps",
            f"{delta:.4f} ({pairs} step pairs)" if delta is not None else "no trl_prm.jsonl with two-step rollouts",
        )
    )
    lines = ["| statistic | value |", "| --- | ---: |", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]
    inside = metrics.get("fraction_q_strictly_between_0_and_1")
    summary = f"labels: {metrics.get('records')} step labels"
    if isinstance(inside, float):
        summary += f", {inside:.0%} strictly inside (0, 1)"
    return lines, summary


def _verifier_section(data: dict[str, Any]) -> tuple[list[str], str]:
    metrics = {k.removeprefix("val/"): v for k, v in data["metrics"].items() if k.startswith("val/")}
    names = sorted(k for k in metrics if not k.startswith("baseline_") and k != "bce_gain")
    lines = ["| validation metric | verifier | constant predictor |", "| --- | ---: | ---: |"]
    for name in names:
        constant = metrics.get(f"baseline_{name}", 0.5 if name == "auroc" else None)
        lines.append(f"| {name} | {_fmt(metrics[name])} | {_fmt(constant)} |")
    lines += [
        "",
        (
            "The constant predictor predicts the validation labels' own mean for every input (the strongest constant; "
            "AUROC 0.5). A metric without a constant column has none logged."
        ),
    ]
    kind = str(data.get("kind", "verifier")).upper()
    if "bce" in metrics and "baseline_bce" in metrics:
        verdict = "below" if metrics["bce"] < metrics["baseline_bce"] else "not below"
        constant = metrics["baseline_bce"]
        summary = f"{kind}: validation BCE {metrics['bce']:.4f}, {verdict} the constant predictor's {constant:.4f}"
    else:
        summary = f"{kind}: no validation BCE logged"
    return lines, summary


def _paired_summary(results: dict[str, Any], target: str | None) -> str:
    """``second − first`` with its paired CI at each pair's largest budget, for the pairs with the target in them
    (all pairs when there is no target)."""
    largest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in results.get("paired") or []:
        if target is None or target in (row["first"], row["second"]):
            key = (row["first"], row["second"])
            if key not in largest or row["budget"] > largest[key]["budget"]:
                largest[key] = row
    parts = []
    for row in largest.values():
        verdict = "excludes 0" if row["ci_low"] > 0 or row["ci_high"] < 0 else "contains 0"
        parts.append(
            f"`{row['second']}` − `{row['first']}` {row['difference']:+.3f} [{row['ci_low']:+.3f}, "
            f"{row['ci_high']:+.3f}] at budget {row['budget']} ({verdict})"
        )
    return "search, paired on the same problems: " + ", ".join(parts) if parts else ""


def _search_summary(results: dict[str, Any]) -> str:
    eff = results.get("efficiency")
    points = results.get("points") or []
    paired = _paired_summary(results, eff["target"] if eff else None)
    if not eff:
        return paired or "search: no efficiency comparison (its baseline or target line is missing)"
    base = sorted((p for p in points if p["line"] == eff["baseline"]), key=lambda p: p["budget"])
    tgt = {p["budget"]: p for p in points if p["line"] == eff["target"]}
    text = (paired + "; " if paired else "search: ") + (
        f"at the largest budget {eff['baseline_budget']}, `{eff['baseline']}` {eff['baseline_accuracy']:.3f}"
    )
    top_tgt = tgt.get(eff["baseline_budget"])
    if top_tgt is not None:
        top_base = base[-1]
        overlap = top_tgt["ci_low"] <= top_base["ci_high"] and top_base["ci_low"] <= top_tgt["ci_high"]
        text += (
            f" [{top_base['ci_low']:.3f}, {top_base['ci_high']:.3f}] vs `{eff['target']}` {top_tgt['accuracy']:.3f} "
            f"[{top_tgt['ci_low']:.3f}, {top_tgt['ci_high']:.3f}]"
            + (" (95% CIs overlap: not shown to differ)" if overlap else " (95% CIs do not overlap)")
        )
    degrades = bool(base) and base[-1]["accuracy"] < max(p["accuracy"] for p in base) - 1e-12
    if degrades:
        best = max(base, key=lambda p: p["accuracy"])
        text += (
            f"; `{eff['baseline']}` degrades with budget (best {best['accuracy']:.3f} at {best['budget']}), so no "
            "compute-efficiency ratio is quoted here (see the search section for both)"
        )
    elif eff.get("baseline_solves_nothing"):
        text += f"; `{eff['baseline']}` solves nothing at its largest budget: no compute-efficiency ratio"
    elif eff.get("ratio") is None:
        text += f"; `{eff['target']}` does not reach `{eff['baseline']}`'s final accuracy: no compute-efficiency ratio"
    else:
        first = eff.get("ratio_vs_first_reach")
        text += f"; compute-efficiency ratio {eff['ratio']:.2f}× at the largest budget" + (
            f", {first:.2f}× against where `{eff['baseline']}` first reaches that accuracy" if first else ""
        )
    return text


def _compare_summary(results: dict[str, Any]) -> str:
    curves = results["curves"]
    seeds = len(results.get("seeds", []))
    finals = ", ".join(
        f"{c['label']} {c['mean'][-1]:.3f} [{c['min'][-1]:.3f}–{c['max'][-1]:.3f}]" for c in curves.values()
    )
    text = f"RL ({seeds} seed{'s' * (seeds != 1)}): final {results.get('metric', 'accuracy')} {finals}"
    if "sample_efficiency" in results:
        text += f", gap {results['final_gap']:+.3f}"
        ranges = [curves[results[k]] for k in ("baseline", "target")]
        if ranges[0]["max"][-1] >= ranges[1]["min"][-1] and ranges[1]["max"][-1] >= ranges[0]["min"][-1]:
            text += " (inside the seeds' min–max: not shown to differ)"
        e = results["sample_efficiency"]
        text += "; sample efficiency " + ("n/a" if e["ratio"] is None else f"{e['ratio']:.2f}×")
    return text


def _stage_section(stage: Any, folder: Path, root: Path) -> tuple[list[str], str | None]:
    """The section body and the summary sentence (``None``: nothing the summary can say) of one stage."""
    metrics = _load(folder / "metrics.json")
    results = _load(folder / "results.json")
    if results is not None and "curves" in results:
        return _embed(folder, root), _compare_summary(results)
    if results is not None and "points" in results:
        return _embed(folder, root), _search_summary(results)
    if metrics is not None and "val/pass@1" in metrics:
        lines, summary = _policy_section(metrics)
        return [*lines, *_embed(folder, root)], summary
    if metrics is not None and "records" in metrics and "seed_accuracy" in metrics:
        lines, summary = _label_section(metrics, folder)
        return [*lines, *_embed(folder, root)], summary
    if metrics is not None and isinstance(metrics.get("metrics"), dict) and "kind" in metrics:
        lines, summary = _verifier_section(metrics)
        return [*lines, *_embed(folder, root)], summary
    lines = []
    if metrics is not None:
        lines += ["```json", json.dumps(_flat(metrics), indent=2)[:4000], "```"]
    return [*lines, *_embed(folder, root)], None


def _flat(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _flat(v) for k, v in data.items() if not isinstance(v, list) or len(v) <= 20}
    return data


def report_folder(stage: Any) -> Path:
    """The stage's ``report`` folder; by default the folder of its ``output``, or the one above when only that one
    holds a ``metrics.json`` / ``results.json`` / ``report.md`` (a fit writes them beside its ``policy`` or
    ``verifier`` export, whose file is the stage's ``output``)."""
    if stage.report:
        return Path(stage.report)
    folder = Path(stage.output).parent
    for candidate in (folder, folder.parent):
        if any((candidate / name).exists() for name in ("metrics.json", "results.json", "report.md")):
            return candidate
    return folder


def write_report(root: Path, stages: list[Any], timings: dict[str, Any]) -> Path:
    """Write ``<root>/report.md``: the summary paragraph, the stage table, one section per stage."""
    from pavlit.jobs.atomic import atomic_write_text

    sections: list[str] = []
    shown: list[str] = []
    missing: list[str] = []
    for stage in stages:
        folder = report_folder(stage)
        sections += ["", f"## {stage.name}", ""]
        if not Path(stage.output).exists():
            sections.append(f"Not run: `{stage.output}` does not exist.")
            missing.append(stage.name)
            continue
        body, summary = _stage_section(stage, folder, root)
        sections += body or ["This stage wrote no metrics.json, results.json or report.md."]
        if summary:
            shown.append(summary)
        else:
            missing.append(f"{stage.name} (no recognised metrics)")
    paragraph = "Shown: " + ("; ".join(shown) + "." if shown else "nothing (no stage wrote recognised metrics).")
    if missing:
        paragraph += " Not shown: " + ", ".join(missing) + "."
    paragraph += (
        " Differences are shown where their uncertainty is: the search's paired and per-method bootstrap 95% CIs "
        "and the RL seeds' min–max; a difference inside them is not shown to exist."
    )
    head = [
        "# pavlit pipeline report",
        "",
        paragraph,
        "",
        "| stage | status / seconds | output |",
        "| --- | --- | --- |",
    ]
    head += [f"| {s.name} | {timings.get(s.name, '?')} | `{s.output}` |" for s in stages]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(head + sections) + "\n")
    return path
