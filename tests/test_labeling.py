"""Monte-Carlo labeling: record consistency, agreement with an independent re-estimate, first pits,
and the `pavlit label` job's resume-after-kill and multi-rank guarantees (real subprocesses)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pavlit.jobs.args import LaunchArgs, SamplerArgs
from pavlit.jobs.shards import ShardStore
from pavlit.labeling.job import label
from pavlit.labeling.mc import LabelArgs, label_chunk
from pavlit.labeling.records import validate_record
from pavlit.policy.sampler import Sampler
from pavlit.policy.sources import TinyPolicy

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from pavlit_toy_tasks import ALPHABET, SevenTask  # noqa: E402

SOURCE = TinyPolicy(n_layer=1, n_embd=32, n_head=2, alphabet=ALPHABET, seed=3)


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    model, tokenizer = SOURCE.load()
    return Sampler(model, tokenizer, max_new_tokens=12, max_batch=512)


def test_every_prefix_of_every_seed_is_labelled_consistently(sampler):
    task = SevenTask(n_problems=3)
    args = LabelArgs(n_cov=3, n_mc=8, max_new_tokens=12)
    result = label_chunk(sampler, task, task.problems("train"), args, chunk=0, seed=1)

    assert len(result.rollouts) == 3 * 3
    by_seed: dict[tuple[str, int], list[dict]] = {}
    for i, record in enumerate(result.labels):
        validate_record(record, f"record {i}")
        by_seed.setdefault((record["problem_id"], record["seed_index"]), []).append(record)
    assert len(by_seed) == 9
    rollouts = {(r["problem_id"], i % 3): r for i, r in enumerate(result.rollouts)}
    for key, records in by_seed.items():
        response = rollouts[key]["response"]
        assert [r["step_index"] for r in records] == list(range(len(records)))
        assert records[0]["steps"] == []  # the question-only prefix is labelled too
        assert "".join(records[-1]["steps"]) == response
        assert all(r["seed_outcome"] == rollouts[key]["correct"] for r in records)
        for r in records:
            prefix = "".join(r["steps"])
            if "9" in prefix:
                assert r["q_mc"] == 0.0  # no completion can repair a 9
    # Identical prefixes (every seed's question-only prefix) share one estimate.
    roots = [r for r in result.labels if r["problem_id"] == "train-0" and r["step_index"] == 0]
    assert len({r["n_correct"] for r in roots}) == 1


def test_labels_agree_with_an_independent_reestimate(sampler):
    task = SevenTask(n_problems=4)
    args = LabelArgs(n_cov=2, n_mc=64, max_new_tokens=12)
    problems = task.problems("train")
    result = label_chunk(sampler, task, problems, args, chunk=0, seed=7)
    mixed = [r for r in result.labels if 0.1 < r["q_mc"] < 0.9][:4]
    assert mixed, "the toy task should give some prefixes mixed values"
    by_id = {p.id: p for p in problems}
    prefixes = [by_id[r["problem_id"]].prompt + "".join(r["steps"]) for r in mixed]
    fresh = sampler.complete(prefixes, n=1000, max_new_tokens=12, seed=12345)
    for record, completions in zip(mixed, fresh.texts):
        head = "".join(record["steps"])
        q_ref = sum(task.score(by_id[record["problem_id"]], head + c) for c in completions) / len(completions)
        sigma = math.sqrt(max(q_ref * (1 - q_ref), 1e-3) / record["n_rollouts"])
        assert abs(record["q_mc"] - q_ref) < 4.5 * sigma, (record["q_mc"], q_ref)


def test_first_pit_prefixes_end_at_a_zero_value_step(sampler):
    task = SevenTask(n_problems=4)
    args = LabelArgs(
        n_cov=4,
        n_mc=16,
        max_new_tokens=12,
        first_pit=True,
        pit_threshold=0.3,
        pit_states=3,
        pit_rollouts=2,
        pit_n_cheap=4,
        pit_n_mc=16,
    )
    result = label_chunk(sampler, task, task.problems("train"), args, chunk=0, seed=2)
    pits = [r for r in result.labels if r["source"] == "first_pit"]
    assert pits, "expected first-pit prefixes on the toy task"
    assert any("9" in r["steps"][-1] and r["q_mc"] == 0.0 for r in pits if r["steps"])
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in pits:
        groups.setdefault((r["problem_id"], r["seed_index"]), []).append(r)
    for records in groups.values():
        deepest = max(records, key=lambda r: r["step_index"])
        # The pit is where the cheap estimate (4 completions) first read 0: the precise label is low, and exactly
        # 0 where the pit step wrote a 9 (no completion can repair it).
        assert deepest["q_mc"] <= 0.5
        if "9" in deepest["steps"][-1]:
            assert deepest["q_mc"] == 0.0
        assert deepest["n_rollouts"] == 16
        assert [r["step_index"] for r in sorted(records, key=lambda r: r["step_index"])] == list(
            range(deepest["step_index"] + 1)
        )


def _config(tmp_path: Path, out: Path, n_problems: int, chunk_size: int) -> Path:
    config = {
        "task": {"class_path": "pavlit_toy_tasks.SevenTask", "init_args": {"n_problems": n_problems}},
        "policy": {
            "class_path": "TinyPolicy",
            "init_args": {"n_layer": 1, "n_embd": 32, "n_head": 2, "alphabet": ALPHABET, "seed": 3},
        },
        "output_dir": str(out),
        "label": {"n_cov": 2, "n_mc": 8, "max_new_tokens": 12},
        "sampler": {"max_batch": 64},
        "chunk_size": chunk_size,
        "seed": 5,
    }
    path = tmp_path / f"{out.name}.json"
    path.write_text(json.dumps(config))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURES), str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _records(out: Path) -> list[dict]:
    return list(ShardStore(out, json.loads((out / "job.json").read_text())["settings"]).records())


def test_killed_label_job_resumes_to_the_uninterrupted_records(tmp_path):
    reference = tmp_path / "reference"
    label(
        task=SevenTask(n_problems=24),
        policy=TinyPolicy(n_layer=1, n_embd=32, n_head=2, alphabet=ALPHABET, seed=3),
        output_dir=str(reference),
        label=LabelArgs(n_cov=2, n_mc=8, max_new_tokens=12),
        sampler=SamplerArgs(max_batch=64),
        chunk_size=2,
        seed=5,
    )
    out = tmp_path / "killed"
    config = _config(tmp_path, out, n_problems=24, chunk_size=2)
    command = [sys.executable, "-m", "pavlit", "label", "--config", str(config)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("chunk-*.jsonl")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(out.glob("chunk-*.jsonl")))
    assert 1 <= done_at_kill < 12, "the kill should land mid-run"

    finished = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert _records(out) == _records(reference)
    assert (out / "metrics.json").exists() and (out / "trl_prm.jsonl").exists()


def test_two_ranks_write_the_same_records_as_one(tmp_path):
    one = tmp_path / "one"
    label(
        task=SevenTask(n_problems=6),
        policy=TinyPolicy(n_layer=1, n_embd=32, n_head=2, alphabet=ALPHABET, seed=3),
        output_dir=str(one),
        label=LabelArgs(n_cov=2, n_mc=8, max_new_tokens=12),
        sampler=SamplerArgs(max_batch=64),
        chunk_size=2,
        seed=5,
        trainer=LaunchArgs(devices=1),
    )
    two = tmp_path / "two"
    config = _config(tmp_path, two, n_problems=6, chunk_size=2)
    run = subprocess.run(
        [sys.executable, "-m", "pavlit", "label", "--config", str(config), "--trainer.devices", "2"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list(two.glob("chunk-*.jsonl"))) == 3
    assert _records(two) == _records(one)
    summary = json.loads((two / "metrics.json").read_text())
    assert summary["records"] == len(_records(one))


def test_resuming_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "labels"
    kwargs = dict(
        task=SevenTask(n_problems=2),
        policy=TinyPolicy(n_layer=1, n_embd=32, n_head=2, alphabet=ALPHABET, seed=3),
        output_dir=str(out),
        label=LabelArgs(n_cov=1, n_mc=2, max_new_tokens=8),
    )
    label(**kwargs)
    with pytest.raises(ValueError, match="changed: label"):
        label(**{**kwargs, "label": LabelArgs(n_cov=1, n_mc=4, max_new_tokens=8)})


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="LabelArgs.n_mc"):
        LabelArgs(n_mc=0)
    with pytest.raises(ValueError, match="SamplerArgs.top_p"):
        SamplerArgs(top_p=0.0)
    assert torch.get_num_threads() >= 1


def test_best_of_k_estimates_agree_analytic_counts_and_direct_draws(sampler):
    """The three routes to Q^{BoK} (analytic from Q̂^π, unbiased from counts, fresh K-groups) agree within MC error."""
    from pavlit.provers.best_of_k import BestOfK

    task = SevenTask(n_problems=1)
    problem = task.problems("train")[0]
    prefixes = [[], ["1\n"], ["35\n"]]
    k = 3
    prover = BestOfK(k=k)
    heads = ["".join(p) for p in prefixes]
    mc = sampler.complete([problem.prompt + h for h in heads], n=600, max_new_tokens=12, seed=4)
    n_correct = torch.tensor([sum(task.score(problem, h + c) for c in cs) for h, cs in zip(heads, mc.texts)])
    n_rollouts = torch.full_like(n_correct, 600)
    analytic = prover.q_values(n_correct / n_rollouts)
    from_counts = prover.from_counts(n_correct, n_rollouts)
    direct = prover.estimate(sampler, task, problem, prefixes, n_groups=400, max_new_tokens=12, seed=9)
    assert torch.allclose(analytic, from_counts, atol=0.01)
    sigma = torch.sqrt(direct.clamp(0.05, 0.95) * (1 - direct.clamp(0.05, 0.95)) / 400)
    assert torch.all((direct - from_counts).abs() < 4.5 * sigma), (direct, from_counts)


def test_a_named_prover_policy_is_labelled_on_the_same_prefixes(sampler):
    task = SevenTask(n_problems=2)
    model, tokenizer = TinyPolicy(n_layer=1, n_embd=32, n_head=2, alphabet=ALPHABET, seed=11).load()
    prover = Sampler(model, tokenizer, max_new_tokens=12)
    args = LabelArgs(n_cov=2, n_mc=8, max_new_tokens=12)
    result = label_chunk(sampler, task, task.problems("train"), args, chunk=0, seed=1, provers={"weak": prover})
    pi = [r for r in result.labels if r["policy"] == "pi"]
    weak = [r for r in result.labels if r["policy"] == "weak"]
    assert len(pi) == len(weak) > 0
    assert [(r["problem_id"], r["steps"]) for r in pi] == [(r["problem_id"], r["steps"]) for r in weak]


def test_a_zero_byte_or_foreign_shard_is_redone_on_resume_not_trusted(tmp_path, caplog):
    kwargs = dict(
        task=SevenTask(n_problems=6),
        policy=TinyPolicy(n_layer=1, n_embd=32, n_head=2, alphabet=ALPHABET, seed=3),
        label=LabelArgs(n_cov=1, n_mc=4, max_new_tokens=8),
        chunk_size=2,
        seed=5,
    )
    reference, other, out = tmp_path / "reference", tmp_path / "other", tmp_path / "resumed"
    label(output_dir=str(reference), **kwargs)
    label(output_dir=str(other), **{**kwargs, "seed": 6})
    label(output_dir=str(out), **kwargs)
    (out / "chunk-000000.jsonl").write_bytes(b"")  # a commit that never reached the disk
    for name in ("chunk-000001.jsonl", "chunk-000001.meta.json"):  # a shard copied in from another job's folder
        (out / name).write_bytes((other / name).read_bytes())
    assert (out / "chunk-000001.jsonl").read_bytes() != (reference / "chunk-000001.jsonl").read_bytes()
    with caplog.at_level("WARNING", logger="pavlit.jobs.shards"):
        summary = label(output_dir=str(out), **kwargs)
    assert "chunk-000000.jsonl: not trusted" in caplog.text and "chunk-000001.jsonl: not trusted" in caplog.text
    assert summary["this_run"]["chunks"] == 2  # exactly the two untrusted chunks were redone
    assert _records(out) == _records(reference)
    assert (out / "trl_prm.jsonl").read_text() == (reference / "trl_prm.jsonl").read_text()


def test_bad_sampling_settings_are_named():
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="SamplerArgs.temperature must be finite and >= 0"):
            SamplerArgs(temperature=bad)
    assert SamplerArgs(temperature=0.0).temperature == 0.0  # 0 is documented: greedy


@pytest.mark.slow  # two `pavlit label` processes: ~25 s on a loaded machine, mostly imports
def test_a_second_label_job_into_a_folder_being_written_is_refused(tmp_path):
    out = tmp_path / "labels"
    config = _config(tmp_path, out, n_problems=12, chunk_size=1)
    command = [sys.executable, "-m", "pavlit", "label", "--config", str(config)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / ".pavlit.lock").exists():
            time.sleep(0.02)
        with pytest.raises(ValueError, match=rf"another pavlit job is writing here \(pid {process.pid}\b"):
            label(
                task=SevenTask(n_problems=12),
                policy=SOURCE,
                output_dir=str(out),
                label=LabelArgs(n_cov=1, n_mc=2, max_new_tokens=8),  # other settings: would mix two datasets
            )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The killed job's lock is stale now: the rerun takes it over and finishes the dataset.
    finished = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "taking over a stale lock of pid" in finished.stderr
    assert not (out / ".pavlit.lock").exists() and (out / "metrics.json").exists()
