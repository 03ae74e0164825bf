"""pavlit.jobs: the one JSONL reader, the job spec and its settings fingerprint, the chunk loop."""

import json
from collections import Counter

import pytest

from pavlit.interfaces import Problem
from pavlit.jobs.args import SamplerArgs
from pavlit.jobs.chunks import ChunkProgress, JobSpec, run_chunks
from pavlit.jobs.jsonl import json_lines, json_objects
from pavlit.jobs.settings import fingerprint


class ThreeProblems:
    """A stand-in task: only ``problems`` is used by the job spec."""

    def __init__(self) -> None:
        self.size = 3

    def problems(self, split):
        return [Problem(id=f"{split}-{i}", prompt="Q\n", answer="1") for i in range(self.size)]


class Source:
    def __init__(self, path: str) -> None:
        self.path = path


def test_json_lines_skips_blank_lines_and_hands_back_the_error_of_a_line_that_is_not_json(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{not json\n[1]\n', encoding="utf-8")
    rows = list(json_lines(path))
    assert [where for where, _ in rows] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert rows[0][1] == {"a": 1} and isinstance(rows[1][1], json.JSONDecodeError) and rows[2][1] == [1]


def test_json_objects_raises_the_callers_own_messages_naming_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.jsonl:2: corrupt shard \(Expecting property name"):
        list(json_objects(path, invalid="corrupt shard ({msg})"))
    path.write_text('{"a": 1}\n\n"text"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.jsonl:3: expected a JSON object, got str"):
        list(json_objects(path))
    assert [value for _, value in json_objects(path, not_object=None)] == [{"a": 1}, "text"]
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        list(json_objects(path))


def test_job_spec_checks_its_settings_and_cuts_its_problems():
    with pytest.raises(ValueError, match="split must be one of"):
        JobSpec(ThreeProblems(), Source("p"), "dev")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        JobSpec(ThreeProblems(), Source("p"), "train", chunk_size=0)
    with pytest.raises(ValueError, match="num_problems must be >= 1"):
        JobSpec(ThreeProblems(), Source("p"), "train", num_problems=0)
    job = JobSpec(ThreeProblems(), Source("p"), "train", num_problems=2)
    assert [p.id for p in job.problems()] == ["train-0", "train-1"]
    assert [p.id for p in job.problems("validation", None)] == ["validation-0", "validation-1", "validation-2"]
    job.task.size = 0
    with pytest.raises(ValueError, match="no problems in split 'train'"):
        job.problems()


def test_the_settings_fingerprint_of_a_job_is_what_it_was_before_pavlit_jobs_existed():
    # Computed with pavlit.labeling.job._settings before the move: a folder written then must still resume.
    job = JobSpec(ThreeProblems(), Source("runs/sft/policy"), "train", None, SamplerArgs(max_batch=64), 4, 7)
    settings = job.settings(split="train", num_problems=None, label={"n_mc": 8}, provers={})
    keys = ["task", "policy", "split", "num_problems", "label", "provers", "sampler", "chunk_size", "seed"]
    assert sorted(settings) == sorted(keys)
    assert settings["task"] == {"class": "test_jobs.ThreeProblems", "size": 3}
    assert settings["sampler"] == {"temperature": 1.0, "top_p": 1.0, "max_batch": 64}
    assert fingerprint(settings) == "6542544158082930"


def test_run_chunks_sums_the_counts_of_every_chunk_and_times_only_a_run_that_did_work():
    done = []

    def run_chunk(chunk):
        done.append(chunk)
        return {"chunks": 1, "problems": chunk + 1}

    progress = ChunkProgress("label", "chunk", rank=1, world=2, total=6)  # rank 1: no progress bar
    stats = run_chunks([1, 3, 5], run_chunk, Counter(chunks=0, problems=0), progress, lambda c, s, t: {})
    assert done == [1, 3, 5] and stats["chunks"] == 3 and stats["problems"] == 2 + 4 + 6 and stats["seconds"] >= 0
    idle = run_chunks([], run_chunk, {"chunks": 0}, progress, lambda c, s, t: {})
    assert idle == {"chunks": 0} and done == [1, 3, 5]
