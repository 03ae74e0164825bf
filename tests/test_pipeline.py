"""`pavlit pipeline`: stages run in order, finished stages are reused, failures name the stage and its log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pavlit.cli import main


def _write(path: Path, text: str) -> str:
    make_parent = "p.parent.mkdir(parents=True, exist_ok=True)"
    return f"import pathlib; p = pathlib.Path({str(path)!r}); {make_parent}; p.write_text({text!r})"


def _config(tmp_path: Path, stages: list[dict]) -> Path:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": stages}))
    return config


def test_stages_run_in_order_and_are_reused_on_rerun(tmp_path, capsys):
    first = tmp_path / "run" / "a" / "metrics.json"
    second = tmp_path / "run" / "b" / "report.md"
    counter = tmp_path / "count.txt"
    bump = (
        f"import pathlib; c = pathlib.Path({str(counter)!r}); c.write_text(c.read_text() + 'x' if c.exists() else 'x')"
    )
    stages = [
        {"name": "a", "command": ["python", "-c", _write(first, json.dumps({"accuracy": 0.5}))], "output": str(first)},
        {
            "name": "b",
            "command": ["python", "-c", f"{bump}; " + _write(second, "# B\n\n![plot](plot.png)\n")],
            "output": str(second),
        },
    ]
    config = _config(tmp_path, stages)
    assert main(["pipeline", "--config", str(config)]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert '"accuracy": 0.5' in report and "## b" in report
    assert "![plot](b/plot.png)" in report  # stage reports' image links re-anchored to the combined report
    assert counter.read_text() == "x"
    assert main(["pipeline", "--config", str(config)]) == 0
    assert counter.read_text() == "x"  # stage b was finished: not run again
    assert "done already" in capsys.readouterr().out
    assert "| b | reused (ran in " in (tmp_path / "run" / "report.md").read_text()  # its first run's time is kept


def test_a_failing_stage_stops_the_pipeline_naming_its_log(tmp_path, capsys):
    never = tmp_path / "never.txt"
    stages = [
        {"name": "broken", "command": ["python", "-c", "raise SystemExit(3)"], "output": str(tmp_path / "x")},
        {"name": "after", "command": ["python", "-c", _write(never, "ran")], "output": str(never)},
    ]
    assert main(["pipeline", "--config", str(_config(tmp_path, stages))]) == 1
    err = capsys.readouterr().err
    assert "stage 'broken' failed (exit 3)" in err and "broken.log" in err
    assert not never.exists()


def test_a_stage_that_writes_no_output_is_an_error(tmp_path, capsys):
    stages = [{"name": "silent", "command": ["python", "-c", "pass"], "output": str(tmp_path / "missing.json")}]
    assert main(["pipeline", "--config", str(_config(tmp_path, stages))]) == 1
    assert "did not write" in capsys.readouterr().err


def test_parallel_stages_run_together_and_split_the_cores(tmp_path, capsys):
    """Each of the two parallel stages waits for the other's file: run one after the other, both would time out."""
    left, right, after = tmp_path / "left.json", tmp_path / "right.json", tmp_path / "after.txt"
    meet = tmp_path / "meet.py"
    meet.write_text(
        "import json, os, pathlib, sys, time\n"
        "mine, theirs = map(pathlib.Path, sys.argv[1:])\n"
        "mine.write_text(json.dumps(os.environ['OMP_NUM_THREADS']))\n"
        "deadline = time.monotonic() + 60\n"
        "while not theirs.exists():\n"
        "    assert time.monotonic() < deadline, 'the partner stage never started'\n"
        "    time.sleep(0.05)\n"
        "pathlib.Path(str(mine) + '.done').write_text('ok')\n"
    )
    stages = [
        {"name": "orm", "command": ["python", str(meet), str(left), str(right)], "output": f"{left}.done"},
        {
            "name": "pav",
            "command": ["python", str(meet), str(right), str(left)],
            "output": f"{right}.done",
            "parallel": True,
        },
        {"name": "after", "command": ["python", "-c", _write(after, "ran")], "output": str(after)},
    ]
    assert main(["pipeline", "--config", str(_config(tmp_path, stages))]) == 0
    threads = json.dumps(str(max(1, (os.cpu_count() or 1) // 2)))
    assert left.read_text() == right.read_text() == threads
    assert after.read_text() == "ran"
    out = capsys.readouterr().out
    assert "beside other stages" in out and "[2/3] pav: finished" in out


def test_a_failing_parallel_stage_lets_its_partner_finish(tmp_path, capsys):
    partner = tmp_path / "partner.txt"
    stages = [
        {"name": "partner", "command": ["python", "-c", _write(partner, "kept")], "output": str(partner)},
        {
            "name": "broken",
            "command": ["python", "-c", "raise SystemExit(2)"],
            "output": str(tmp_path / "x"),
            "parallel": True,
        },
    ]
    assert main(["pipeline", "--config", str(_config(tmp_path, stages))]) == 1
    assert partner.read_text() == "kept"
    assert "stage 'broken' failed (exit 2)" in capsys.readouterr().err
    # The finished partner is reused on the rerun; only the broken stage runs again.
    assert not (tmp_path / "run" / "logs" / "partner.running").exists()
    assert (tmp_path / "run" / "logs" / "broken.running").exists()


def test_shipped_pipeline_configs_name_files_that_exist(capsys):
    """Every stage of the shipped pipelines parses, and the configs and scripts it names are in the repository."""
    repo = Path(__file__).resolve().parents[1]
    for config in sorted((repo / "configs").glob("*/pipeline*.yaml")):
        with pytest.raises(SystemExit) as printed:  # --print_config prints, then exits
            main(["pipeline", "--config", str(config), "--print_config"])
        assert printed.value.code in (0, None), config
        stages = yaml.safe_load(capsys.readouterr().out)["stages"]
        for stage in stages:
            command = [str(arg) for arg in stage["command"]]
            named = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--config"]
            named += [arg for arg in command if arg.endswith(".py")]
            for path in named:
                assert (repo / path).is_file(), f"{config.name}: stage {stage['name']} names missing {path}"


def test_a_pipeline_that_runs_itself_through_another_pipeline_is_refused(tmp_path, capsys):
    """A → B → A: B's stage names A's config, which only the inherited stack of running pipelines reveals."""
    outer, inner = tmp_path / "outer.yaml", tmp_path / "inner.yaml"
    for this, other in ((outer, inner), (inner, outer)):
        stage = {"name": "nested", "command": ["pipeline", "--config", str(other)], "output": str(tmp_path / "x")}
        this.write_text(yaml.safe_dump({"run_dir": str(tmp_path / this.stem), "stages": [stage]}))
    assert main(["pipeline", "--config", str(outer)]) == 1
    err = capsys.readouterr().err
    assert "stage 'nested' failed" in err and "PAVLIT_PIPELINE_STACK" not in os.environ
    log = (tmp_path / "outer/logs/nested.log").read_text()
    assert f"stage 'nested' runs the pipeline config {outer} that it is part of" in log
    assert not (tmp_path / "inner/logs/nested.log").exists()  # refused before running anything


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "", "a..b"])
def test_stage_names_must_be_plain(tmp_path, capsys, name):
    config = _config(tmp_path, [{"name": name, "command": ["plugins"], "output": str(tmp_path / "done")}])
    assert main(["pipeline", "--config", str(config)]) == 1
    assert "must be a plain name" in capsys.readouterr().err
    assert not any(tmp_path.parent.glob("*.running")) and not (tmp_path / "run/logs").exists()


def test_run_dir_stands_for_the_pipelines_folder(tmp_path):
    done = "${run_dir}/a/done.txt"
    stage = {"name": "a", "command": ["python", "-c", _write(Path("${run_dir}/a/done.txt"), "x")], "output": done}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "here"), "stages": [stage]}))
    assert main(["pipeline", "--config", str(config)]) == 0
    assert (tmp_path / "here" / "a" / "done.txt").read_text() == "x"
    assert f"`{tmp_path / 'here' / 'a' / 'done.txt'}`" in (tmp_path / "here" / "report.md").read_text()


def test_configs_run_dir_runs_copies_of_stage_configs_in_the_run_folder(tmp_path, monkeypatch):
    stage_config = tmp_path / "stage.yaml"
    stage_config.write_text("# pavlit-command: label\noutput_dir: runs/tiny/labels\npolicy: {path: runs/tiny/sft}\n")
    done = tmp_path / "seen.yaml"
    copy = "import shutil, sys; shutil.copy(sys.argv[2], sys.argv[3])"
    stage = {
        "name": "s",
        "command": ["python", "-c", copy, "--config", str(stage_config), str(done)],
        "output": str(done),
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": "runs/x", "configs_run_dir": "runs/tiny", "stages": [stage]}))
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--config", str(config)]) == 0
    assert yaml.safe_load(done.read_text()) == {"output_dir": "runs/x/labels", "policy": {"path": "runs/x/sft"}}
    assert done.read_text().startswith(f"# Written by pavlit from {stage_config}")
    assert "runs/tiny" in stage_config.read_text()  # the shipped config itself is left alone


def test_an_unknown_variable_is_named(tmp_path, capsys):
    stage = {"name": "a", "command": ["python", "-c", "pass"], "output": "${runs}/x"}
    assert main(["pipeline", "--config", str(_config(tmp_path, [stage]))]) == 1
    assert "stage 'a': '${runs}/x': the only variable a pipeline knows is ${run_dir}" in capsys.readouterr().err


def test_shipped_pipelines_run_pavlit_commands_only():
    """`benchmarks/` is never a stage: what a pipeline runs is a pavlit command on a shipped config."""
    repo = Path(__file__).resolve().parents[1]
    for config in sorted((repo / "configs").glob("*/pipeline*.yaml")):
        for stage in yaml.safe_load(config.read_text())["stages"]:
            assert stage["command"][0] in {"fit", "label", "search", "compare"}, f"{config}: {stage['name']}"


def _fake_run(root: Path, search_baseline: list[float]) -> list:
    """The files the tiny pipeline's stages write, with made-up numbers (no training)."""
    from pavlit.pipeline import Stage

    def put(path: str, data) -> None:
        file = root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(data if isinstance(data, str) else json.dumps(data))

    put("sft/policy/config.json", {})
    put("sft/metrics.json", {"val/pass@1": 0.31, "val/pass@4": 0.55, "val/loss": 0.9, "global_step": 1000})
    put("labels/metrics.json", {"problems": 200, "records": 950, "seed_rollouts": 200, "seed_accuracy": 0.3,
                                "fraction_q_strictly_between_0_and_1": 0.42, "mean_q_mc": 0.35})  # fmt: skip
    put("labels/trl_prm.jsonl", '{"labels": [0.5, 0.2, 0.6]}\n{"labels": [1.0]}\n{"labels": [1.0, 1.0]}\n')
    for kind in ("orm", "pav"):
        put(f"{kind}/verifier/pavlit_verifier.json", {})
        metrics = {"val/bce": 0.5, "val/baseline_bce": 0.6, "val/auroc": 0.71, "train/loss": 0.4}
        put(f"{kind}/metrics.json", {"kind": kind, "metrics": metrics, "data": {}})
    budgets = [1, 4, 16]
    points = [
        {"line": line, "budget": b, "accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1, "tokens": 100.0 * b}
        for line, accs in (("orm_bon", search_baseline), ("pav_beam", [0.3, 0.4, 0.5]))
        for b, acc in zip(budgets, accs)
    ]
    efficiency = {"baseline": "orm_bon", "target": "pav_beam", "baseline_budget": 16,
                  "baseline_accuracy": search_baseline[-1], "ratio": 4.0, "ratio_vs_first_reach": 2.0}  # fmt: skip
    paired = [
        {"first": f, "second": "pav_beam", "budget": b, "difference": d, "ci_low": lo, "ci_high": hi}
        for f, b, d, lo, hi in (("orm_bon", 4, 0.3, 0.1, 0.5), ("orm_bon", 16, 0.1, -0.05, 0.25),
                                ("pqv_beam", 16, 0.05, 0.01, 0.09))
    ]  # fmt: skip
    put("search/results.json", {"paired": paired, "points": points, "efficiency": efficiency})
    put("search/report.md", "# Test-time search\n\n| method | 95% CI |\n\n![plot](accuracy_vs_compute.png)\n")
    put("search/accuracy_vs_compute.png", "png")
    curves = {
        name: {"label": label, "config": f"configs/tiny/{name}.yaml", "iterations": [0, 6, 12], "mean": mean,
               "min": [m - 0.02 for m in mean], "max": [m + 0.02 for m in mean]}
        for name, label, mean in (("pav", "PAV-RL", [0.3, 0.4, 0.45]), ("orm", "ORM-RL", [0.3, 0.33, 0.36]))
    }  # fmt: skip
    put("rl_compare/results.json", {"curves": curves, "seeds": [0], "baseline": "orm", "target": "pav",
                                    "final_gap": 0.09, "sample_efficiency": {"ratio": 2.0}})  # fmt: skip
    put("rl_compare/report.md", "# Evaluation curves over seeds\n\n![accuracy](accuracy_vs_iterations.png)\n")
    outputs = {
        "sft": "sft/policy/config.json",
        "label": "labels/metrics.json",
        "orm": "orm/verifier/pavlit_verifier.json",
        "pav": "pav/verifier/pavlit_verifier.json",
        "search": "search/results.json",
        "rl": "rl_compare/results.json",
        "rft": "rft/policy/config.json",  # never run
    }
    return [Stage(name, ["fit"], str(root / path)) for name, path in outputs.items()]


def test_the_report_fills_every_stage_section(tmp_path):
    from pavlit.pipeline_report import write_report

    stages = _fake_run(tmp_path, search_baseline=[0.2, 0.3, 0.4])
    report = write_report(tmp_path, stages, {"sft": 12.0}).read_text()
    summary = report.split("\n")[2]
    assert summary.startswith("Shown: SFT/RFT policy: pass@1 0.310, pass@4 0.550")
    assert "950 step labels, 42% strictly inside (0, 1)" in summary
    assert "PAV: validation BCE 0.5000, below the constant predictor's 0.6000" in summary
    assert "(95% CIs overlap: not shown to differ)" in summary  # 0.4 ± 0.1 vs 0.5 ± 0.1
    assert "compute-efficiency ratio 4.00× at the largest budget, 2.00× against where" in summary
    assert "RL (1 seed): final accuracy PAV-RL 0.450 [0.430–0.470], ORM-RL 0.360 [0.340–0.380], gap +0.090;" in summary
    assert "sample efficiency 2.00×" in summary and "not shown to differ)" not in summary.split("RL (")[1]
    assert "Not shown: rft." in summary
    paired = "search, paired on the same problems: `pav_beam` − `orm_bon` +0.100 [-0.050, +0.250] at budget 16 "
    assert paired + "(contains 0), `pav_beam` − `pqv_beam` +0.050 [+0.010, +0.090] at budget 16 (excludes 0)" in summary
    sft = report.split("## sft")[1].split("## label")[0]
    assert "| val/pass@1 | 0.3100 |" in sft and "| val/pass@4 | 0.5500 |" in sft
    label = report.split("## label")[1].split("## orm")[0]
    assert "| share of labels strictly inside (0, 1) | 0.4200 |" in label
    assert "| mean \\|ΔQ̂\\| between consecutive steps | 0.2333 (3 step pairs) |" in label  # (.3 + .4 + 0) / 3
    orm = report.split("## orm")[1].split("## pav")[0]
    assert "| bce | 0.5000 | 0.6000 |" in orm and "| auroc | 0.7100 | 0.5000 |" in orm
    search = report.split("## search")[1].split("## rl")[0]
    assert "### Test-time search" in search and "![plot](search/accuracy_vs_compute.png)" in search
    assert "![accuracy](rl_compare/accuracy_vs_iterations.png)" in report
    assert "Not run: `" in report.split("## rft")[1]


def test_the_summary_quotes_no_ratio_against_a_baseline_that_degrades(tmp_path):
    from pavlit.pipeline_report import write_report

    stages = _fake_run(tmp_path, search_baseline=[0.45, 0.4, 0.35])
    summary = write_report(tmp_path, stages, {}).read_text().split("\n")[2]
    assert "`orm_bon` degrades with budget (best 0.450 at 1), so no compute-efficiency ratio is quoted" in summary
    assert "4.00×" not in summary


def test_the_summary_says_when_the_search_baseline_solves_nothing(tmp_path):
    from pavlit.pipeline_report import write_report

    stages = _fake_run(tmp_path, search_baseline=[0.0, 0.0, 0.0])
    results = json.loads((tmp_path / "search" / "results.json").read_text())
    results["efficiency"].update(baseline_solves_nothing=True, ratio=None)
    (tmp_path / "search" / "results.json").write_text(json.dumps(results))
    summary = write_report(tmp_path, stages, {}).read_text().split("\n")[2]
    assert "`orm_bon` solves nothing at its largest budget: no compute-efficiency ratio" in summary
