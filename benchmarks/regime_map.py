"""Is a policy in the regime where process advantages can decide anything? Cheap measurements on countdown.

Three sub-commands, each printing one table and optionally writing JSON:

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

``grid POLICY --values ... --temperatures ...``
    When do advantages help? For every (sampling temperature) × (value source) cell, a ``pavlit search`` job on
    the same *validation* problems (never test) runs a PQV beam (α = 0) and a PAV beam (α > 0, Best-of-K prover)
    and reports the paired accuracy difference PAV − PQV with its paired bootstrap 95% CI
    (:func:`pavlit.search.paired.paired_differences`), the problems whose response differs, and the PAV beam's
    contested / reranked selections per problem (:func:`pavlit.search.report.tree_decisions`: selections
    the advantage term could change / did change). Value sources: ``mc:N``, the Monte-Carlo oracle with ``N``
    rollouts per prefix (``MCReward``; rollouts at the cell's temperature, so it values the policy being
    searched), and ``pav:PATH``, a trained PAV verifier folder (``PQVReward`` vs ``PAVReward``). Each cell is its
    own search folder under ``--output`` (``T<temperature>_<source>/``): a killed grid resumes cell by cell
    (finished cells are reused without searching, a half-done one resumes its chunks). Writes ``grid.json``,
    ``grid.md`` and ``grid.png`` (PAV − PQV with CIs over temperature, one line per value source; the
    contested-selection rate below).

Usage::

    python benchmarks/regime_map.py pilot runs/countdown/sft/policy --difficulty 2 --problems 100
    python benchmarks/regime_map.py labels runs/countdown/labels
    python benchmarks/regime_map.py grid runs/countdown/sft/policy --values mc:4 mc:16 mc:64 \\
        pav:runs/countdown/pav/verifier --temperatures 0.7 1.0 1.3 --problems 48 --output runs/countdown/regime_map
"""

from __future__ import annotations

import argparse
import json
import math
import re
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


# ------------------------------------------------------------------------------------------------------- grid

PQV, PAV = "pqv_beam", "pav_beam"
GRID_SPLIT = "validation"  # the grid informs a choice (α > 0 or not): it never looks at the test split


def _fail(message: str) -> None:
    raise SystemExit(f"regime_map grid: {message}")


def parse_value_source(text: str, k: int) -> dict:
    """``mc:N`` or ``pav:PATH`` as ``{"label", "kind", "n_rollouts" | "verifier"}``; a one-line error otherwise."""
    kind, sep, rest = text.partition(":")
    if kind == "mc" and sep:
        if not rest.isdigit() or int(rest) < 1:
            _fail(f"--values: {text!r}: mc:N needs a positive integer N (rollouts per prefix)")
        if int(rest) < k:
            _fail(f"--values: {text!r}: the Best-of-{k} prover needs N >= --k {k} rollouts per prefix")
        return {"label": f"mc:{int(rest)}", "kind": "mc", "n_rollouts": int(rest)}
    if kind == "pav" and sep:
        folder = Path(rest).expanduser()
        if not rest or not folder.is_dir():
            _fail(f"--values: {text!r}: verifier folder {rest!r} does not exist (a PAVModule.save_pretrained folder)")
        return {"label": f"pav:{rest}", "kind": "pav", "verifier": str(folder)}
    _fail(f"--values: {text!r} is not a value source; use mc:N (Monte-Carlo oracle) or pav:PATH (trained verifier)")


def _slug(source: dict) -> str:
    if source["kind"] == "mc":
        return f"mc{source['n_rollouts']}"
    return "pav_" + (re.sub(r"[^A-Za-z0-9]+", "_", source["label"][4:]).strip("_") or "verifier")


def cell_folder(output: Path, temperature: float, source: dict) -> Path:
    """``T<temperature>_<source>``: the cell's own ``pavlit search`` output folder."""
    return output / f"T{temperature:g}_{_slug(source)}"


def _methods(source: dict, args: argparse.Namespace) -> list:
    from pavlit.provers.best_of_k import BestOfK
    from pavlit.rewards import MCReward, PAVReward, PQVReward
    from pavlit.search.job import Method
    from pavlit.search.tree import BeamSearch

    def beam() -> BeamSearch:
        return BeamSearch(
            children=args.children, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens, dedupe=True,
            start="samples",
        )  # fmt: skip

    if source["kind"] == "mc":
        n = source["n_rollouts"]
        pqv = MCReward(n_rollouts=n, alpha=0.0, prover=BestOfK(args.k))
        pav = MCReward(n_rollouts=n, alpha=args.alpha, prover=BestOfK(args.k))
    else:
        pqv = PQVReward(verifier=source["verifier"])
        pav = PAVReward(verifier=source["verifier"], alpha=args.alpha, prover=BestOfK(args.k))
    return [Method(PQV, beam(), pqv), Method(PAV, beam(), pav)]


def _cell_spec(args: argparse.Namespace, temperature: float, source: dict) -> dict:
    """Everything a cell's result depends on: a finished cell is reused only under the same spec."""
    spec = {
        "policy": str(args.policy),
        "task": {key: value for key, value in vars(_task(args)).items() if key != "_splits"},
        "split": GRID_SPLIT,
        "problems": args.problems,
        "temperature": temperature,
        "value": source,
        "alpha": args.alpha,
        "k": args.k,
        "budget": args.budget,
        "beam": {
            "children": args.children,
            "max_steps": args.max_steps,
            "max_step_tokens": args.max_step_tokens,
            "dedupe": True,
            "start": "samples",
        },  # fmt: skip
        "max_new_tokens": args.max_new_tokens,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "bootstrap": args.bootstrap,
    }
    return json.loads(json.dumps(spec))  # as cell.json reads back (tuples as lists)


def _cell_records(folder: Path) -> list[dict]:
    from pavlit.jobs.jsonl import json_objects
    from pavlit.jobs.shards import check_job_folder

    check_job_folder(folder)
    return [record for file in sorted(folder.glob("chunk-*.jsonl")) for _, record in json_objects(file)]


def summarise_cell(records: list[dict], budget: int, bootstrap: int, seed: int) -> dict:
    """PAV − PQV on one cell's search records: paired difference and CI, differing answers, selections, cost.

    Raises:
        ValueError: If the two beams did not answer the same problems at ``budget``.
    """
    from pavlit.search.paired import by_method_and_budget, paired_differences
    from pavlit.search.report import tree_decisions

    grouped = by_method_and_budget(records)
    pqv, pav = grouped.get((PQV, budget), {}), grouped.get((PAV, budget), {})
    if not pqv or set(pqv) != set(pav):
        raise ValueError(
            f"{PQV} and {PAV} answered different problems at B = {budget} ({len(pqv)} vs {len(pav)} records)"
        )
    paired = paired_differences(records, [(PQV, PAV)], n_resamples=bootstrap, seed=seed)
    (row,) = [r for r in paired if r["budget"] == budget]
    decisions = {r["method"]: r for r in tree_decisions(records) if r["budget"] == budget}

    def cost(by_problem: dict) -> dict:
        n = len(by_problem)
        keys = ("tokens", "step_samples", "verifier_calls", "reward_tokens")
        return {key: sum(r.get(key, 0) for r in by_problem.values()) / n for key in keys}

    return {
        "problems": row["problems"],
        "problem_ids": sorted(pqv),
        "pqv_accuracy": row["accuracy_first"],
        "pav_accuracy": row["accuracy_second"],
        "difference": row["difference"],
        "ci_low": row["ci_low"],
        "ci_high": row["ci_high"],
        "different_answers": sum(pqv[p].get("answer") != pav[p].get("answer") for p in pqv),
        "different_responses": row["different_responses"],
        "contested_per_problem": decisions[PAV]["contested"],
        "reranked_per_problem": decisions[PAV]["reranked"],
        "problems_reranked": decisions[PAV]["problems_reranked"],
        "pqv_reranked_per_problem": decisions[PQV]["reranked"],
        "cost_per_problem": {PQV: cost(pqv), PAV: cost(pav)},
    }


def _run_cell(args: argparse.Namespace, temperature: float, source: dict, folder: Path) -> tuple[dict, bool]:
    """Run (or resume, or reuse) one cell; returns its summary and whether it was reused."""
    from pavlit.jobs.args import LaunchArgs, SamplerArgs
    from pavlit.jobs.atomic import atomic_write_text
    from pavlit.policy.sources import Pretrained
    from pavlit.search.job import search

    spec = _cell_spec(args, temperature, source)
    marker = folder / "cell.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous["spec"] != spec:
            changed = sorted(k for k in spec.keys() | previous["spec"].keys() if spec.get(k) != previous["spec"].get(k))
            _fail(f"{folder} was run with other settings ({', '.join(changed)}); use another --output")
        if previous.get("finished") and (folder / "results.json").exists():
            summary = summarise_cell(_cell_records(folder), args.budget, args.bootstrap, args.seed)
            return summary | {"seconds": previous.get("seconds")}, True
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"spec": spec, "finished": False}, indent=1) + "\n")
    start = time.perf_counter()
    search(
        task=_task(args),
        policy=Pretrained(path=str(args.policy)),
        methods=_methods(source, args),
        output_dir=str(folder),
        split=GRID_SPLIT,
        num_problems=args.problems,
        budgets=[args.budget],
        max_new_tokens=args.max_new_tokens,
        sampler=SamplerArgs(temperature=temperature, max_batch=args.max_batch),
        chunk_size=args.chunk_size,
        seed=args.seed,
        bootstrap=args.bootstrap,
        trainer=LaunchArgs(accelerator=args.accelerator),
    )
    seconds = round(time.perf_counter() - start, 1)
    atomic_write_text(marker, json.dumps({"spec": spec, "finished": True, "seconds": seconds}, indent=1) + "\n")
    return summarise_cell(_cell_records(folder), args.budget, args.bootstrap, args.seed) | {"seconds": seconds}, False


def _check_grid_args(args: argparse.Namespace) -> list[dict]:
    if not Path(args.policy).expanduser().is_dir():
        _fail(f"policy folder {args.policy!r} does not exist")
    for name in ("problems", "budget", "k", "children", "max_steps", "max_step_tokens", "max_new_tokens", "chunk_size"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.alpha) or args.alpha <= 0:
        _fail(f"--alpha must be a finite number > 0 (the PAV beam; the PQV beam is α = 0), got {args.alpha}")
    if args.bootstrap < 10:
        _fail(f"--bootstrap must be >= 10 resamples for a 95% CI, got {args.bootstrap}")
    if args.problems > args.n_validation:
        _fail(f"--problems {args.problems} exceeds the validation split's --n-validation {args.n_validation}")
    for t in args.temperatures:
        if not math.isfinite(t) or t <= 0:
            _fail(f"--temperatures must be finite and > 0 (beam search samples its steps), got {t}")
    if len(set(args.temperatures)) != len(args.temperatures):
        _fail(f"--temperatures must be distinct, got {args.temperatures}")
    sources = [parse_value_source(v, args.k) for v in args.values]
    labels = [s["label"] for s in sources]
    if len(set(labels)) != len(labels):
        _fail(f"--values must be distinct, got {labels}")
    return sources


def grid(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from pavlit.jobs.atomic import atomic_write_text

    sources = _check_grid_args(args)
    try:
        _task(args).problems(GRID_SPLIT)
    except ValueError as error:
        _fail(f"task: {error}")
    output = Path(args.output)
    cells = [(t, s) for t in args.temperatures for s in sources]
    rows = []
    progress = tqdm(cells, desc="regime map", unit="cell", file=sys.stderr)
    for i, (temperature, source) in enumerate(progress, start=1):
        folder = cell_folder(output, temperature, source)
        progress.set_postfix_str(f"T={temperature:g} {source['label']}")
        try:
            summary, reused = _run_cell(args, temperature, source, folder)
        except ValueError as error:
            _fail(f"cell T={temperature:g} {source['label']} ({folder}): {error}")
        rows.append({"temperature": temperature, "value": source["label"], "folder": str(folder)} | summary)
        rows[-1]["reused"] = reused
        progress.write(
            f"[{i}/{len(cells)}] T={temperature:g} {source['label']}: {'reused' if reused else 'ran'}"
            f" ({summary['seconds']} s)  PQV {summary['pqv_accuracy']:.3f}  PAV {summary['pav_accuracy']:.3f}"
            f"  diff {summary['difference']:+.3f} [{summary['ci_low']:+.3f}, {summary['ci_high']:+.3f}]"
        )
    settings = {k: v for k, v in _cell_spec(args, 0.0, {}).items() if k not in ("temperature", "value")}
    result = {"settings": settings, "temperatures": args.temperatures, "values": [s["label"] for s in sources],
              "cells": rows}  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    markdown = render_grid(result)
    atomic_write_text(output / "grid.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(output / "grid.md", markdown)
    plot_grid(result, output / "grid.png")
    print(markdown)
    return result


def render_grid(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Regime map: when does the advantage term help?",
        "",
        f"- **policy**: `{s['policy']}`; countdown difficulty {s['task']['difficulty']}, the first {s['problems']} "
        f"{s['split']} problems (the same in every cell), seed {s['seed']}",
        f"- **beams**: B = {s['budget']}, BeamSearch({', '.join(f'{k}={v!r}' for k, v in s['beam'].items())}); "
        f"PQV α = 0 vs PAV α = {s['alpha']:g}, Best-of-{s['k']} prover",
        "- **PAV − PQV**: paired accuracy difference with a paired bootstrap 95% CI over problems "
        f"({s['bootstrap']} resamples); **differ**: problems whose responses differ (on countdown every response "
        "states the target, so final answers, in grid.json, rarely tell methods apart); **contested**: PAV-beam "
        "selections per problem with more children than free slots (the advantage term could change them); "
        "**reranked**: those where it did change the kept set; **cost**: the PAV beam's policy tokens + reward "
        "(Monte-Carlo rollout) tokens per problem",
        "",
        "| temperature | value source | PQV acc | PAV acc | PAV − PQV [95% CI] | differ | contested / problem | "
        "reranked / problem | cost / problem |",
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["cells"]:
        cost = r["cost_per_problem"][PAV]
        excludes = " **(excludes 0)**" if r["ci_low"] > 0 or r["ci_high"] < 0 else ""
        lines.append(
            f"| {r['temperature']:g} | `{r['value']}` | {r['pqv_accuracy']:.3f} | {r['pav_accuracy']:.3f} | "
            f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]{excludes} | "
            f"{r['different_responses']}/{r['problems']} | {r['contested_per_problem']:.2f} | "
            f"{r['reranked_per_problem']:.2f} | {cost['tokens']:,.0f} + {cost['reward_tokens']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    temperatures, n_values = result["temperatures"], len(result["values"])
    # Sources side by side at each temperature, so their intervals do not hide each other.
    dodge = 0.012 * ((max(temperatures) - min(temperatures)) or 1.0)
    for i, value in enumerate(result["values"]):
        cells = sorted((c for c in result["cells"] if c["value"] == value), key=lambda c: c["temperature"])
        x = [c["temperature"] + dodge * (i - (n_values - 1) / 2) for c in cells]
        diff = [c["difference"] for c in cells]
        yerr = [[d - c["ci_low"] for d, c in zip(diff, cells)], [c["ci_high"] - d for d, c in zip(diff, cells)]]
        color = f"C{i}"
        top.errorbar(x, diff, yerr=yerr, marker="o", capsize=4, color=color, label=value)
        bottom.plot(x, [c["contested_per_problem"] for c in cells], marker="o", color=color, label=f"{value} contested")
        bottom.plot(x, [c["reranked_per_problem"] for c in cells], marker="x", linestyle=":", color=color,
                    label=f"{value} reranked")  # fmt: skip
    top.set_ylabel("PAV − PQV accuracy (95% CI)")
    top.set_title(f"Regime map: B = {result['settings']['budget']}, α = {result['settings']['alpha']:g}")
    top.legend(fontsize=8)
    bottom.set_xlabel("sampling temperature")
    bottom.set_ylabel("selections / problem")
    bottom.set_ylim(bottom=0)
    bottom.set_xticks(temperatures)
    if len(temperatures) == 1:
        bottom.set_xlim(temperatures[0] - 0.25, temperatures[0] + 0.25)
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_task_args(p: argparse.ArgumentParser, difficulty: int) -> None:
    p.add_argument("--difficulty", type=int, default=difficulty)
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--n-validation", type=int, default=200, help="CountdownTask n_validation (as in the config)")
    p.add_argument("--n-test", type=int, default=200, help="CountdownTask n_test (as in the config)")
    p.add_argument("--n-numbers", type=int)
    p.add_argument("--max-number", type=int)
    p.add_argument("--min-target", type=int)
    p.add_argument("--max-target", type=int)


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
    _add_task_args(p, difficulty=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the result as JSON here")
    lab = sub.add_parser("labels", help="statistics of pavlit label output")
    lab.add_argument("labels")
    lab.add_argument("--out")
    g = sub.add_parser("grid", help="PAV − PQV beam accuracy over temperature × value source (validation split)")
    g.add_argument("policy", help="the countdown policy folder (Pretrained)")
    g.add_argument("--values", nargs="+", required=True, help="value sources: mc:N (MC oracle) or pav:PATH")
    g.add_argument("--temperatures", nargs="+", type=float, default=[0.7, 1.0, 1.3])
    g.add_argument("--problems", type=int, default=48, help="the first validation problems")
    g.add_argument("--budget", type=int, default=4, help="beam width B")
    g.add_argument("--alpha", type=float, default=0.5, help="α of the PAV beam")
    g.add_argument("--k", type=int, default=4, help="Best-of-K prover")
    g.add_argument("--children", type=int, default=3, help="BeamSearch children per state")
    g.add_argument("--max-steps", type=int, default=8)
    g.add_argument("--max-step-tokens", type=int, default=40)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--max-batch", type=int, default=512)
    g.add_argument("--chunk-size", type=int, default=8)
    g.add_argument("--bootstrap", type=int, default=2000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    _add_task_args(g, difficulty=1)  # configs/countdown/*.yaml
    g.add_argument("--output", default="runs/countdown/regime_map")
    g.add_argument("--out", help="also write grid.json here")
    args = parser.parse_args(argv)
    result = {"pilot": pilot, "labels": labels, "grid": grid}[args.command](args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
