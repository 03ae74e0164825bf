"""``kill -9`` at several moments of ``pavlit label``, ``search``, ``fit`` and ``pipeline`` (real subprocesses).

Each test runs the command once without interruption for reference, then again in a fresh folder that it kills
(SIGKILL to the whole process group, as a job scheduler or a dying machine would) right after the first output
appears, after later outputs appear and at a seeded random moment, reruns the same command to completion and
asserts that the final outputs equal the uninterrupted run's. Leftovers of a crash (the temporary file of a write
that never finished) are planted where a kill could leave them and must be ignored.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from pavlit.cli import main
from pavlit.jobs.shards import ShardStore

REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from pavlit_toy_tasks import ALPHABET  # noqa: E402

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}
STARTUP_TIMEOUT = 240  # seconds until a subprocess's first output (importing torch + Lightning on a busy CPU)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURES), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _pavlit(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pavlit", *args]


def _interactive_signals() -> None:
    # A shell without job control starts background commands with SIGINT ignored (`nohup cmd &`), the child
    # inherits that, and pavlit rightly leaves an ignored signal ignored; these tests act as a terminal's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str], log: Path) -> subprocess.Popen:
    # Own process group: the kill takes the command and anything it started (DDP ranks, pipeline stages).
    with log.open("a") as out:
        return subprocess.Popen(
            command,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_interactive_signals,
        )


def _kill_when(command: list[str], log: Path, ready: Callable[[], bool], delay: float = 0.0) -> bool:
    """Start ``command``, SIGKILL it ``delay`` seconds after ``ready()`` first holds; True if it was still running."""
    process = _start(command, log)
    deadline = time.time() + STARTUP_TIMEOUT
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    alive = process.poll() is None
    if alive:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert alive or process.returncode == 0, f"exit {process.returncode}: {log.read_text()[-3000:]}"
    return alive


def _finish(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        done = subprocess.run(command, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()[-3000:]


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern)))


def _plant_crash_debris(folder: Path, shard: str, text: str) -> Path:
    """What a writer killed mid-write leaves: its temporary file (``atomic_write_text``'s name pattern), truncated."""
    debris = folder / f".{shard}.k1ll3d.tmp"
    debris.write_text(text[: len(text) // 2])
    return debris


def _records(folder: Path) -> list[dict]:
    return list(ShardStore(folder, json.loads((folder / "job.json").read_text())["settings"]).records())


# ------------------------------------------------------------------------------------------------ pavlit label


def _label_config(tmp_path: Path, out: Path) -> Path:
    config = {
        # ~1 ms per score: the whole job takes ~1 s however fast sampling is, so a signal lands mid-run.
        "task": {"class_path": "pavlit_toy_tasks.SevenTask", "init_args": {"n_problems": 24, "score_seconds": 0.001}},
        "policy": {"class_path": "TinyPolicy", "init_args": {**TINY, "alphabet": ALPHABET, "seed": 3}},
        "output_dir": str(out),
        "label": {"n_cov": 2, "n_mc": 8, "max_new_tokens": 12},
        "sampler": {"max_batch": 64},
        "chunk_size": 2,
        "seed": 5,
    }
    path = tmp_path / f"label_{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_label_killed_three_times_ends_with_the_uninterrupted_records(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    reference = tmp_path / "reference"
    assert main(["label", "--config", str(_label_config(tmp_path, reference))]) == 0
    n_chunks = _count(reference, "chunk-*.jsonl")
    assert n_chunks == 12

    out, log = tmp_path / "killed", tmp_path / "label.log"
    command = _pavlit(["label", "--config", str(_label_config(tmp_path, out))])
    # 1. Right after the first shard is committed.
    assert _kill_when(command, log, lambda: _count(out, "chunk-*.jsonl") >= 1)
    first = _count(out, "chunk-*.jsonl")
    assert 1 <= first < n_chunks, "the first kill should land mid-run"
    # 2. Right after two more shards.
    _kill_when(command, log, lambda: _count(out, "chunk-*.jsonl") >= first + 2)
    second = _count(out, "chunk-*.jsonl")
    assert second >= first + 2
    # 3. A crash mid-write leaves a truncated temporary file, never a truncated shard; plant one for a chunk that
    # is not done and one for a chunk that is, in both stores.
    pending = min(set(range(n_chunks)) - _done(out))
    text = (reference / f"chunk-{pending:06d}.jsonl").read_text()
    debris = [
        _plant_crash_debris(out, f"chunk-{pending:06d}.jsonl", text),
        _plant_crash_debris(out, "chunk-000000.jsonl", text),
        _plant_crash_debris(out / "rollouts", f"chunk-{pending:06d}.jsonl", text),
    ]
    # What a reader sees between two runs: exactly the reference records of the committed chunks.
    assert _records(out) == [r for r in _records(reference) if _chunk_of(r) in _done(out)]
    # 4. At a seeded random moment after the job has started working.
    delay = random.Random(8).uniform(0.0, 1.5)
    _kill_when(command, log, lambda: _count(out, "chunk-*.jsonl") > second, delay=delay)

    before_last_run = _leftover_tmp(out)  # a kill can land mid-write and leave its own debris: that is allowed
    _finish(command, log)
    assert _records(out) == _records(reference)
    assert _records(out / "rollouts") == _records(reference / "rollouts")
    assert (out / "trl_prm.jsonl").read_text() == (reference / "trl_prm.jsonl").read_text()
    metrics, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (out, reference))
    assert {k: v for k, v in metrics.items() if k != "this_run"} == {
        k: v for k, v in expected.items() if k != "this_run"
    }
    # The debris was never read (the records above are exact) and the rerun left no temporary files of its own.
    assert set(debris) <= before_last_run
    assert _leftover_tmp(out) == before_last_run


def _leftover_tmp(folder: Path) -> set[Path]:
    return set(folder.rglob("*.tmp"))


def _done(folder: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.jsonl")}


def _chunk_of(record: dict) -> int:
    return int(record["problem_id"].split("-")[1]) // 2  # SevenTask ids are "<split>-<i>"; 2 problems per chunk


# ----------------------------------------------------------------------------------------------- pavlit search


def _export_untrained_orm(folder: Path) -> Path:
    from pavlit.modules.orm import ORMModule
    from pavlit.policy.sources import TinyPolicy
    from pavlit.tasks.arithmetic import ALPHABET as ARITHMETIC

    if not (folder / "pavlit_verifier.json").exists():
        ORMModule(source=TinyPolicy(**TINY, max_position=128, alphabet=ARITHMETIC)).save_pretrained(folder)
    return folder


def _search_config(tmp_path: Path, out: Path, orm: Path) -> Path:
    config = {
        "task": {"class_path": "ArithmeticTask", "init_args": {"n_train": 0, "n_validation": 0, "n_test": 24}},
        "policy": {"class_path": "TinyPolicy", "init_args": {**TINY, "max_position": 128}},
        "methods": [
            {
                "name": "orm_bon",
                "search": {"class_path": "BestOfN"},
                "reward": {"class_path": "ORMReward", "init_args": {"verifier": str(orm)}},
            },
            {"name": "majority", "search": {"class_path": "BestOfN", "init_args": {"pick": "majority"}}},
        ],
        "output_dir": str(out),
        "budgets": [1, 4],
        "max_new_tokens": 24,
        "chunk_size": 2,
        "bootstrap": 50,
    }
    path = tmp_path / f"search_{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_search_killed_twice_ends_with_the_uninterrupted_results(tmp_path):
    orm = _export_untrained_orm(tmp_path / "orm")
    reference = tmp_path / "reference"
    assert main(["search", "--config", str(_search_config(tmp_path, reference, orm))]) == 0
    n_units = _count(reference, "chunk-*.jsonl")
    assert n_units == 2 * 12  # 2 methods x 12 chunks of 2 problems

    out, log = tmp_path / "killed", tmp_path / "search.log"
    command = _pavlit(["search", "--config", str(_search_config(tmp_path, out, orm))])
    assert _kill_when(command, log, lambda: _count(out, "chunk-*.jsonl") >= 1)
    first = _count(out, "chunk-*.jsonl")
    assert 1 <= first < n_units, "the first kill should land mid-run"
    assert _records(out) == [r for r in _records(reference) if r in _records(out)]  # a prefix of whole units
    pending = min(set(range(n_units)) - _done(out))
    debris = _plant_crash_debris(out, f"chunk-{pending:06d}.jsonl", (reference / "chunk-000000.jsonl").read_text())
    _kill_when(command, log, lambda: _count(out, "chunk-*.jsonl") > first, delay=random.Random(9).uniform(0.0, 1.0))

    before_last_run = _leftover_tmp(out)  # the random kill may leave its own half-written temporary file
    _finish(command, log)
    assert _records(out) == _records(reference)
    results, expected = (json.loads((folder / "results.json").read_text()) for folder in (out, reference))
    assert results["points"] == expected["points"]
    assert results["settings"]["methods"] == expected["settings"]["methods"]
    assert debris in before_last_run and _leftover_tmp(out) == before_last_run


# -------------------------------------------------------------------------------------------------- pavlit fit

FIT_CONFIG = """\
seed_everything: 0
model:
  class_path: pavlit.modules.pav.PAVModule
  init_args:
    source: {{class_path: pavlit.policy.sources.TinyPolicy, init_args: {{n_layer: 1, n_embd: 32, n_head: 2}}}}
    lr: 0.01
    warmup_steps: 2
data:
  class_path: pavlit.data.step_labels.StepLabelDataModule
  init_args: {{path: {labels}, batch_size: 4, val_fraction: 0.2}}
trainer:
  default_root_dir: {root}
  accelerator: cpu
  devices: 1
  max_steps: 60
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 5
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/bce, mode: min, save_top_k: 1}}
resume:
  every_n_train_steps: 5
"""


def _fit_config(tmp_path: Path, root: Path, labels: Path) -> Path:
    path = tmp_path / f"fit_{root.name}.yaml"
    path.write_text(FIT_CONFIG.format(labels=labels, root=root))
    return path


def _step_labels(folder: Path) -> Path:
    from test_step_labels import synthetic_labels, write_jsonl

    write_jsonl(folder / "chunk-000000.jsonl", synthetic_labels(12, 3))
    return folder


def _weights(verifier: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(verifier.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_fit_killed_three_times_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    labels = _step_labels(tmp_path / "labels")
    reference = tmp_path / "reference"
    assert main(["fit", "--config", str(_fit_config(tmp_path, reference, labels))]) == 0
    assert not (reference / "checkpoints" / "resume.ckpt").exists()  # a finished fit leaves no resume checkpoint

    root, log = tmp_path / "killed", tmp_path / "fit.log"
    config = _fit_config(tmp_path, root, labels)
    command = _pavlit(["fit", "--config", str(config)])
    resume = root / "checkpoints" / "resume.ckpt"

    def saved_after(previous: int) -> Callable[[], bool]:
        return lambda: resume.exists() and resume.stat().st_mtime_ns != previous

    def step() -> int:
        return torch.load(resume, map_location="cpu", weights_only=True)["global_step"]

    # 1. Right after the first resume checkpoint; 2. right after a later one; 3. at a seeded random moment.
    assert _kill_when(command, log, saved_after(0))
    first = step()
    assert 5 <= first < 60, "the first kill should land mid-run"
    assert _kill_when(command, log, saved_after(resume.stat().st_mtime_ns))
    second = step()
    assert second > first
    _kill_when(command, log, saved_after(resume.stat().st_mtime_ns), delay=random.Random(10).uniform(0.0, 2.0))

    # A rerun with other settings would mix two runs: refused, naming the change, and the checkpoint is kept.
    if resume.exists():
        capsys.readouterr()
        assert main(["fit", "--config", str(config), "--model.init_args.lr", "0.02"]) == 1
        assert "changed: model.init_args.lr" in capsys.readouterr().err
        assert resume.exists()

    # Interrupted mid-run: the rerun resumes it. A run that finished first (or was killed in its teardown, after
    # its exports) is not rerun: that would be a second fit from scratch.
    if resume.exists() or not (root / "metrics.json").exists():
        _finish(command, log)
    assert "resuming the interrupted run" in log.read_text()
    assert not resume.exists()
    got, expected = _weights(root / "verifier"), _weights(reference / "verifier")
    assert got.keys() == expected.keys() and len(got) > 2
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    metrics, want = (json.loads((folder / "metrics.json").read_text()) for folder in (root, reference))
    assert metrics["global_step"] == want["global_step"] == 60
    assert metrics["metrics"] == pytest.approx(want["metrics"], abs=1e-6)
    # The best checkpoint survives the interruptions and is the one exported, as in the uninterrupted run.
    assert Path(metrics["exported"]["checkpoint"]).name == Path(want["exported"]["checkpoint"]).name
    assert metrics["exported"]["score"] == pytest.approx(want["exported"]["score"], abs=1e-6)


# --------------------------------------------------------------------------------------------- pavlit pipeline


def _pipeline_config(tmp_path: Path, run: Path) -> Path:
    """label (SevenTask) -> PAV fit on the labels -> search with the PAV's Q (PQV) and majority vote."""
    run.mkdir(parents=True)
    policy = {"class_path": "TinyPolicy", "init_args": {**TINY, "alphabet": ALPHABET, "seed": 3}}
    task = {"class_path": "pavlit_toy_tasks.SevenTask", "init_args": {"n_problems": 12}}
    label = {
        "task": task,
        "policy": policy,
        "output_dir": str(run / "labels"),
        "label": {"n_cov": 2, "n_mc": 8, "max_new_tokens": 12},
        "chunk_size": 2,
        "seed": 5,
    }
    fit = yaml.safe_load(FIT_CONFIG.format(labels=run / "labels", root=run / "pav"))
    fit["model"]["init_args"]["source"] = {"class_path": "pavlit.policy.sources.TinyPolicy", **policy}
    fit["trainer"].update(max_steps=30, callbacks=None)
    search = {
        "task": task,
        "policy": policy,
        "methods": [
            {
                "name": "pqv_bon",
                "search": {"class_path": "BestOfN"},
                "reward": {"class_path": "PQVReward", "init_args": {"verifier": str(run / "pav" / "verifier")}},
            },
            {"name": "majority", "search": {"class_path": "BestOfN", "init_args": {"pick": "majority"}}},
        ],
        "output_dir": str(run / "search"),
        "budgets": [1, 4],
        "max_new_tokens": 12,
        "chunk_size": 2,
        "bootstrap": 50,
    }
    for name, config in {"label": label, "pav": fit, "search": search}.items():
        (run / f"{name}.yaml").write_text(yaml.safe_dump(config))
    pipeline = {
        "run_dir": str(run),
        "stages": [
            {"name": "label", "command": ["label", "--config", str(run / "label.yaml")],
             "output": str(run / "labels" / "metrics.json")},
            {"name": "pav", "command": ["fit", "--config", str(run / "pav.yaml")],
             "output": str(run / "pav" / "verifier" / "pavlit_verifier.json")},
            {"name": "search", "command": ["search", "--config", str(run / "search.yaml")],
             "output": str(run / "search" / "results.json")},
        ],
    }  # fmt: skip
    path = tmp_path / f"pipeline_{run.name}.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; a stage dies with its pipeline on Linux only")
def test_pipeline_killed_in_every_stage_ends_with_the_uninterrupted_outputs(tmp_path):
    reference = tmp_path / "reference"
    _finish(_pavlit(["pipeline", "--config", str(_pipeline_config(tmp_path, reference))]), tmp_path / "reference.log")

    run, log = tmp_path / "killed", tmp_path / "pipeline.log"
    command = _pavlit(["pipeline", "--config", str(_pipeline_config(tmp_path, run))])
    kill_points = [
        lambda: _count(run / "labels", "chunk-*.jsonl") >= 1,
        lambda: (run / "pav" / "checkpoints" / "resume.ckpt").exists(),
        lambda: _count(run / "search", "chunk-*.jsonl") >= 1,
    ]
    for ready in kill_points:
        # Only the pipeline process is killed: its running stage must die with it, not race the rerun.
        process = _start(command, log)
        deadline = time.time() + STARTUP_TIMEOUT * 3
        while not ready() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        stages = _children(process.pid)
        assert process.poll() is None and stages, log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.time() + 30
        while any(_alive(pid) for pid in stages) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in stages), "a stage outlived its killed pipeline"
    assert len(list((run / "logs").glob("*.running"))) == 1  # the search stage, interrupted

    _finish(command, log)
    text = log.read_text()
    assert "interrupted last time" in text and "resuming the interrupted run" in text
    assert not list((run / "logs").glob("*.running"))
    assert _records(run / "labels") == _records(reference / "labels")
    got, expected = _weights(run / "pav" / "verifier"), _weights(reference / "pav" / "verifier")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert _records(run / "search") == _records(reference / "search")
    results, want = (json.loads((folder / "search" / "results.json").read_text()) for folder in (run, reference))
    assert results["points"] == want["points"]
    assert (run / "report.md").exists()


# ------------------------------------------------------------------------------------------------------- load


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the benchmark reads /proc and wait4's peak RSS")
def test_label_memory_does_not_grow_with_the_number_of_problems(tmp_path):
    results = tmp_path / "load.json"
    command = [sys.executable, str(REPO / "benchmarks" / "load.py"), "--problems", "100", "400"]
    command += ["--commands", "label", "--out", str(tmp_path / "load"), "--json", str(results)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    small, large = json.loads(results.read_text())
    assert (small["problems"], large["problems"]) == (100, 400)
    # 4x the problems: the peak stays within allocator noise (a job keeping ~1 KiB per record would add megabytes).
    assert large["peak_rss_mib"] - small["peak_rss_mib"] < 16
    assert large["growth_mib_per_1000_problems"] is not None and large["growth_mib_per_1000_problems"] < 8
