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
