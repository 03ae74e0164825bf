"""SIGTERM and SIGINT end every command with one line and status 128 + signal, keeping the finished work.

Each test starts a real ``pavlit`` subprocess on a tiny config, sends the signal once the command has committed
some work (SIGINT to the whole process group, as Ctrl-C in a terminal does; SIGTERM to the process alone, as a
scheduler's ``kill`` does), and checks: the exit status is ``128 + signum``; stderr ends with the one
``interrupted by SIG...`` line and holds no traceback; what was committed is still there and nothing half-done
was exported; rerunning the same command resumes and ends with the uninterrupted run's outputs (the same
guarantee as after ``kill -9``, see ``tests/test_interrupts.py``, whose helpers these tests share).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_interrupts import (
    FIXTURES,
    STARTUP_TIMEOUT,
    _count,
    _export_untrained_orm,
    _fit_config,
    _label_config,
    _pavlit,
    _pipeline_config,
    _records,
    _search_config,
    _start,
    _step_labels,
    _weights,
)

from pavlit.cli import main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _committed(folder: Path) -> int:
    """Shards with their integrity record (a shard alone is redone on resume, see pavlit.jobs.shards)."""
    return _count(folder, "chunk-*.meta.json")


def _interrupt_when(command: list[str], log: Path, ready: Callable[[], bool], signum: int) -> int:
    """Start ``command``, send ``signum`` once ``ready()`` holds, and return its exit status."""
    process = _start(command, log)
    deadline = time.time() + STARTUP_TIMEOUT
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"finished before the signal (exit {process.returncode}): {log.read_text()[-3000:]}"
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)  # Ctrl-C: the terminal signals the whole foreground process group
    else:
        process.send_signal(signum)
    try:
        return process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _assert_one_line_report(log: Path, signum: int, command: str) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    name = signal.Signals(signum).name
    expected = f"pavlit {command}: interrupted by {name}"
    assert text.count(expected) == 1, text[-3000:]
    # The report is the last thing written (progress bars are closed before it), one line.
    last = [line for line in re.split(r"[\r\n]", text) if line.strip()][-1]
    assert last.startswith(expected) and "rerunning the same command resumes" in last, text[-3000:]


# ------------------------------------------------------------------------------------------------ pavlit label


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_label_interrupted_keeps_its_shards_and_resumes(tmp_path, monkeypatch, signum):
    monkeypatch.syspath_prepend(str(FIXTURES))
    reference = tmp_path / "reference"
    assert main(["label", "--config", str(_label_config(tmp_path, reference))]) == 0

    out, log = tmp_path / "interrupted", tmp_path / "label.log"
    config = _label_config(tmp_path, out)
    status = _interrupt_when(_pavlit(["label", "--config", str(config)]), log, lambda: _committed(out) >= 1, signum)
    assert status == 128 + signum
    _assert_one_line_report(log, signum, "label")
    assert 1 <= _committed(out) < _committed(reference), "the signal should land mid-run"
    assert not (out / "metrics.json").exists()  # written only by a finished job
    kept = _records(out)
    assert kept and all(record in _records(reference) for record in kept)

    assert main(["label", "--config", str(config)]) == 0
    assert _records(out) == _records(reference)
    assert (out / "trl_prm.jsonl").read_text() == (reference / "trl_prm.jsonl").read_text()


# -------------------------------------------------------------------------------------------------- pavlit fit


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_fit_interrupted_exits_non_zero_exports_nothing_and_resumes(tmp_path, monkeypatch, signum):
    # SIGTERM used to end `pavlit fit` with exit 0 and no export: a supervisor took the run for a success.
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    labels = _step_labels(tmp_path / "labels")
    root, log = tmp_path / "interrupted", tmp_path / "fit.log"
    config = _fit_config(tmp_path, root, labels)
    resume = root / "checkpoints" / "resume.ckpt"
    args = ["fit", "--config", str(config), "--trainer.max_steps=20"]
    status = _interrupt_when(_pavlit(args), log, resume.exists, signum)
    assert status == 128 + signum
    _assert_one_line_report(log, signum, "fit")
    assert not (root / "verifier").exists() and not (root / "metrics.json").exists()
    step = torch.load(resume, map_location="cpu", weights_only=True)["global_step"]
    assert 5 <= step < 20

    assert main(args) == 0
    assert not resume.exists()
    assert (root / "verifier" / "pavlit_verifier.json").is_file()
    assert (root / "metrics.json").read_text().count('"global_step": 20') == 1


@pytest.mark.slow
def test_fit_interrupted_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    labels = _step_labels(tmp_path / "labels")
    reference = tmp_path / "reference"
    assert main(["fit", "--config", str(_fit_config(tmp_path, reference, labels))]) == 0
    root, log = tmp_path / "interrupted", tmp_path / "fit.log"
    config = _fit_config(tmp_path, root, labels)
    resume = root / "checkpoints" / "resume.ckpt"
    assert _interrupt_when(_pavlit(["fit", "--config", str(config)]), log, resume.exists, signal.SIGTERM) == 143
    assert main(["fit", "--config", str(config)]) == 0
    got, expected = _weights(root / "verifier"), _weights(reference / "verifier")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], value) for name, value in expected.items())


# ----------------------------------------------------------------------------------------------- pavlit search


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_search_interrupted_keeps_its_units_and_resumes(tmp_path, signum):
    orm = _export_untrained_orm(tmp_path / "orm")
    reference = tmp_path / "reference"
    assert main(["search", "--config", str(_search_config(tmp_path, reference, orm))]) == 0
    out, log = tmp_path / "interrupted", tmp_path / "search.log"
    config = _search_config(tmp_path, out, orm)
    status = _interrupt_when(_pavlit(["search", "--config", str(config)]), log, lambda: _committed(out) >= 1, signum)
    assert status == 128 + signum
    _assert_one_line_report(log, signum, "search")
    assert not (out / "results.json").exists()
    kept = _records(out)
    assert kept and all(record in _records(reference) for record in kept)
    assert main(["search", "--config", str(config)]) == 0
    assert _records(out) == _records(reference)


# --------------------------------------------------------------------------------------------- pavlit pipeline


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="a stage dies with its pipeline on Linux only")
def test_pipeline_sigterm_ends_it_and_its_stage_and_resumes(tmp_path):
    run, log = tmp_path / "interrupted", tmp_path / "pipeline.log"
    config = _pipeline_config(tmp_path, run)
    command = _pavlit(["pipeline", "--config", str(config)])
    status = _interrupt_when(command, log, lambda: _committed(run / "labels") >= 1, signal.SIGTERM)
    assert status == 143
    text = log.read_text()
    assert "Traceback" not in text and text.count("pavlit pipeline: interrupted by SIGTERM") == 1, text[-3000:]
    assert len(list((run / "logs").glob("*.running"))) == 1  # the label stage, interrupted
    time.sleep(1.0)
    before = _committed(run / "labels")
    time.sleep(1.0)
    assert _committed(run / "labels") == before, "the stage kept running after its pipeline ended"
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": f"{FIXTURES}:{Path(__file__).parents[1]}"},
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted last time" in done.stdout + done.stderr
    assert (run / "search" / "results.json").exists()
