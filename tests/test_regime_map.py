"""``benchmarks/regime_map.py grid``: PAV − PQV beams over temperature × value source, one search job per cell.

A tiny random countdown policy and an untrained PAV verifier run the real grid end to end (files, pairing, the
paired difference and its CI, reuse of finished cells, resuming a killed one); the per-cell summary is checked by
hand on records where the two beams differ; bad inputs are one-line errors naming the option.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regime_map():
    spec = importlib.util.spec_from_file_location("regime_map", ROOT / "benchmarks" / "regime_map.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["regime_map"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny random policy (printable-ASCII characters, countdown's alphabet) and an untrained PAV."""
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.backends import save_merged
    from pavlit.policy.sources import TinyPolicy

    root = tmp_path_factory.mktemp("regime_map")
    source = TinyPolicy(n_layer=1, n_embd=16, n_head=2, max_position=256, seed=0)
    model, tokenizer = source.load()
    save_merged(model, tokenizer, root / "policy")
    PAVModule(source=source).save_pretrained(root / "pav")
    return root


def _argv(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [
        "grid", str(tiny / "policy"),
        "--values", "mc:4", f"pav:{tiny / 'pav'}",
        "--temperatures", "0.7", "1.3",
        "--problems", "3", "--budget", "2", "--children", "2", "--max-steps", "2", "--max-step-tokens", "4",
        "--max-new-tokens", "8", "--chunk-size", "2", "--bootstrap", "50", "--k", "2",
        "--n-validation", "6", "--n-test", "6",
        "--output", str(out),
        *extra,
    ]  # fmt: skip


def test_grid_runs_every_cell_on_the_same_problems_and_reuses_finished_cells(regime_map, tiny, tmp_path, monkeypatch):
    import pavlit.search.job

    out = tmp_path / "grid"
    assert regime_map.main(_argv(tiny, out)) == 0
    result = json.loads((out / "grid.json").read_text())
    assert (out / "grid.png").stat().st_size > 0
    markdown = (out / "grid.md").read_text()
    cells = result["cells"]
    assert [(c["temperature"], c["value"]) for c in cells] == [
        (t, v) for t in (0.7, 1.3) for v in ("mc:4", f"pav:{tiny / 'pav'}")
    ]
    problem_ids = cells[0]["problem_ids"]
    assert len(problem_ids) == 3
    for cell in cells:
        folder = Path(cell["folder"])
        records = [
            json.loads(line) for f in sorted(folder.glob("chunk-*.jsonl")) for line in f.read_text().split("\n") if line
        ]
        # Both beams, at the one budget, on the same first three validation problems in every cell.
        by_method = {m: sorted(r["problem_id"] for r in records if r["method"] == m) for m in ("pqv_beam", "pav_beam")}
        assert by_method["pqv_beam"] == by_method["pav_beam"] == problem_ids == cell["problem_ids"]
        assert {r["budget"] for r in records} == {2}
        for method, key in (("pqv_beam", "pqv_accuracy"), ("pav_beam", "pav_accuracy")):
            assert cell[key] == pytest.approx(sum(r["correct"] for r in records if r["method"] == method) / 3)
        assert cell["difference"] == pytest.approx(cell["pav_accuracy"] - cell["pqv_accuracy"])
        assert cell["ci_low"] <= cell["difference"] <= cell["ci_high"]
        assert 0 <= cell["different_answers"] <= cell["problems"] == 3
        assert cell["reranked_per_problem"] <= cell["contested_per_problem"]
        assert cell["pqv_reranked_per_problem"] == 0  # α = 0 keeps exactly what Q̂^π ranks first
        settings = json.loads((folder / "results.json").read_text())["settings"]
        assert settings["split"] == "validation" and settings["num_problems"] == 3
        assert settings["sampler"]["temperature"] == cell["temperature"]
        rewards = [m["reward"] for m in settings["methods"]]
        if cell["value"] == "mc:4":
            # The MC oracle's rollouts cost reward tokens; the verifier's do not.
            assert "MCReward" in str(rewards) and cell["cost_per_problem"]["pav_beam"]["reward_tokens"] > 0
        else:
            assert "PQVReward" in str(rewards[0]) and "PAVReward" in str(rewards[1])
        assert f"| {cell['temperature']:g} | `{cell['value']}` | {cell['pqv_accuracy']:.3f} |" in markdown
    assert not any(c["reused"] for c in cells)

    # A rerun reuses every finished cell: no search at all, the same table.
    def no_search(**kwargs):
        raise AssertionError(f"search ran again for {kwargs['output_dir']}")

    monkeypatch.setattr(pavlit.search.job, "search", no_search)
    assert regime_map.main(_argv(tiny, out)) == 0
    again = json.loads((out / "grid.json").read_text())["cells"]
    assert all(c["reused"] for c in again)
    drop = ("reused", "seconds")
    assert [{k: v for k, v in c.items() if k not in drop} for c in again] == [
        {k: v for k, v in c.items() if k not in drop} for c in cells
    ]

    # A cell killed mid-way resumes: only its missing chunk is searched again, the finished chunk is kept.
    monkeypatch.undo()
    folder = Path(cells[1]["folder"])
    marker = json.loads((folder / "cell.json").read_text())
    (folder / "cell.json").write_text(json.dumps(marker | {"finished": False}))
    (folder / "results.json").unlink()
    shards = sorted(folder.glob("chunk-*.jsonl"))
    kept, lost = shards[0].stat().st_mtime_ns, shards[-1].read_text()
    shards[-1].unlink()
    assert regime_map.main(_argv(tiny, out)) == 0
    resumed = json.loads((out / "grid.json").read_text())["cells"]
    assert [c["reused"] for c in resumed] == [True, False, True, True]
    assert shards[0].stat().st_mtime_ns == kept and shards[-1].read_text() == lost
    assert resumed[1]["difference"] == cells[1]["difference"]

    # Another setting in the same output folder is refused, naming what changed.
    with pytest.raises(SystemExit, match=r"other settings \(alpha\)"):
        regime_map.main(_argv(tiny, out, "--alpha", "1.0"))


def _record(method: str, problem: str, correct: bool, answer: str, contested: int, reranked: int) -> dict:
    return {
        "method": method, "budget": 4, "problem_id": problem, "correct": correct, "answer": answer,
        "response": f"Answer: {answer}", "tokens": 10, "step_samples": 6, "verifier_calls": 6, "reward_tokens": 0,
        "candidates": 2, "contested": contested, "reranked": reranked,
    }  # fmt: skip


def test_summarise_cell_hand_computed(regime_map):
    pqv = [("a", True, "1"), ("b", False, "2"), ("c", False, "3"), ("d", True, "4")]
    pav = [("a", True, "1"), ("b", True, "5"), ("c", True, "6"), ("d", False, "7")]
    records = [_record("pqv_beam", p, c, a, 2, 0) for p, c, a in pqv]
    records += [_record("pav_beam", p, c, a, contested, reranked) for (p, c, a), contested, reranked in
                zip(pav, (3, 1, 0, 4), (1, 1, 0, 0))]  # fmt: skip
    cell = regime_map.summarise_cell(records, budget=4, bootstrap=200, seed=0)
    assert cell["pqv_accuracy"] == 0.5 and cell["pav_accuracy"] == 0.75
    assert cell["difference"] == pytest.approx(0.25)
    assert cell["ci_low"] <= 0.25 <= cell["ci_high"] and cell["ci_low"] < cell["ci_high"]
    assert cell["different_answers"] == 3 and cell["different_responses"] == 3
    assert cell["contested_per_problem"] == 2.0 and cell["reranked_per_problem"] == 0.5
    assert cell["problems_reranked"] == 0.5
    with pytest.raises(ValueError, match="different problems"):
        regime_map.summarise_cell(records[:-1], budget=4, bootstrap=200, seed=0)


def test_grid_table_counts_different_responses_not_answers(regime_map):
    # Countdown: every response ends on the target, so answers agree even where the beams' responses (and
    # correctness) differ; the table's "differ" column must count responses.
    records = [_record("pqv_beam", p, c, "24", 2, 0) for p, c in (("a", True), ("b", False))]
    records += [_record("pav_beam", p, c, "24", 2, 1) for p, c in (("a", True), ("b", True))]
    records[-1]["response"] = "8*3=24 (left: 24)\nAnswer: 24"
    cell = regime_map.summarise_cell(records, budget=4, bootstrap=50, seed=0)
    assert cell["different_answers"] == 0 and cell["different_responses"] == 1
    settings = {"policy": "p", "task": {"difficulty": 1}, "problems": 2, "split": "validation", "seed": 0,
                "budget": 4, "beam": {"children": 3}, "alpha": 0.5, "k": 4, "bootstrap": 50}  # fmt: skip
    markdown = regime_map.render_grid({"settings": settings, "cells": [{"temperature": 1.0, "value": "mc:4"} | cell]})
    assert "| 1/2 |" in markdown and "| 0/2 |" not in markdown


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--values", "beam:3"], "--values: 'beam:3' is not a value source; use mc:N"),
        (["--values", "mc:x"], "mc:N needs a positive integer N"),
        (["--values", "mc:1"], "needs N >= --k 2"),
        (["--values", "pav:/no/such/verifier"], "verifier folder '/no/such/verifier' does not exist"),
        (["--values", "mc:4", "mc:4"], "--values must be distinct"),
        (["--temperatures", "0"], "--temperatures must be finite and > 0"),
        (["--temperatures", "1", "1"], "--temperatures must be distinct"),
        (["--alpha", "0"], "--alpha must be a finite number > 0"),
        (["--problems", "0"], "--problems must be >= 1"),
        (["--problems", "7"], "exceeds the validation split's --n-validation 6"),
        (["--budget", "0"], "--budget must be >= 1"),
        (["--bootstrap", "5"], "--bootstrap must be >= 10"),
        (["--difficulty", "9"], "task: difficulty must be one of"),
    ],
)
def test_bad_grid_inputs_are_one_line_errors(regime_map, tiny, tmp_path, change, message):
    with pytest.raises(SystemExit) as error:
        regime_map.main(_argv(tiny, tmp_path / "bad", *change))
    text = str(error.value.code)
    assert message in text and "\n" not in text and text.startswith("regime_map grid: ")
    assert not (tmp_path / "bad").exists()


def test_missing_policy_folder_is_named(regime_map, tiny, tmp_path):
    argv = _argv(tiny, tmp_path / "bad")
    argv[1] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="policy folder .*nowhere.* does not exist"):
        regime_map.main(argv)
