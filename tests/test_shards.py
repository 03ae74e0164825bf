import errno
import json
import logging
import os
import subprocess
import sys

import pytest

from pavlit.jobs import lock as lock_module
from pavlit.jobs.atomic import atomic_write_text
from pavlit.jobs.lock import LOCK_FILE, output_lock
from pavlit.jobs.shards import ShardStore, chunks_for_rank
from pavlit.labeling.records import StepLabel, read_jsonl, to_trl_prm, validate_record


def _label(problem_id="p0", steps=("a\n",), n=4, c=1, **kw):
    return StepLabel(
        problem_id=problem_id,
        prompt="Q\n",
        steps=list(steps),
        step_index=len(steps),
        n_rollouts=n,
        n_correct=c,
        q_mc=c / n,
        policy="pi",
        seed_outcome=1.0,
        answer="7",
        **kw,
    ).to_dict()


def test_commit_and_read_back_in_chunk_order(tmp_path):
    store = ShardStore(tmp_path, {"n_mc": 4})
    store.commit(2, [_label("p2")])
    store.commit(0, [_label("p0"), _label("p0b")])
    assert store.done_chunks() == {0, 2}
    assert [r["problem_id"] for r in store.records()] == ["p0", "p0b", "p2"]


def test_leftover_temp_file_of_a_killed_writer_is_never_read(tmp_path):
    store = ShardStore(tmp_path, {"n_mc": 4})
    (tmp_path / ".chunk-000001.jsonl.abc.tmp").write_text('{"truncated": ')
    assert not store.is_done(1)
    assert list(store.records()) == []


def test_resume_with_other_settings_is_refused_naming_the_change(tmp_path):
    ShardStore(tmp_path, {"n_mc": 4, "seed": 0})
    ShardStore(tmp_path, {"n_mc": 4, "seed": 0})  # same settings resume fine
    with pytest.raises(ValueError, match="changed: n_mc"):
        ShardStore(tmp_path, {"n_mc": 8, "seed": 0})


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_chunks_split_round_robin_and_cover_everything():
    parts = [chunks_for_rank(7, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError):
        chunks_for_rank(7, 3, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"q_mc": 1.5, "n_correct": 6}, "n_correct"),
        ({"q_mc": float("nan")}, "q_mc must be in"),
        ({"q_mc": 0.5}, "!= n_correct / n_rollouts"),
        ({"n_rollouts": 0}, "n_rollouts > 0"),
        ({"steps": ["a\n", "  "], "step_index": 2}, "empty step"),
        ({"step_index": 3}, "step_index 3 != len"),
        ({"prompt": None}, "'prompt' should be str"),
        ({"n_correct": True}, "'n_correct' should be int"),
    ],
)
def test_bad_records_are_named(change, message):
    record = _label()
    record.update(change)
    with pytest.raises(ValueError, match=message):
        validate_record(record, "labels.jsonl:3")


def test_missing_field_is_named():
    record = _label()
    del record["answer"]
    with pytest.raises(ValueError, match=r"labels.jsonl:3: missing field 'answer'"):
        validate_record(record, "labels.jsonl:3")


def test_read_jsonl_names_file_and_line_of_a_truncated_record(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(_label()) + "\n" + '{"problem_id": "p1", "pro')
    with pytest.raises(ValueError, match=r"labels.jsonl:2: not valid JSON"):
        list(read_jsonl(path))


def test_trl_prm_export_groups_prefixes_of_one_rollout():
    records = [
        _label("p0", (), n=4, c=2),
        _label("p0", ("s1\n",), n=4, c=3),
        _label("p0", ("s1\n", "s2\n"), n=4, c=0),
        _label("p1", ("t1\n",), n=2, c=2),
    ]
    rows = to_trl_prm(records)
    assert rows == [
        {"prompt": "Q\n", "completions": ["s1\n", "s2\n"], "labels": [0.75, 0.0]},
        {"prompt": "Q\n", "completions": ["t1\n"], "labels": [1.0]},
    ]


# --- integrity of committed shards ------------------------------------------------------------------------------


def _break_zero_bytes(store, chunk):
    store.shard_path(chunk).write_bytes(b"")


def _break_truncate(store, chunk):
    path = store.shard_path(chunk)
    path.write_bytes(path.read_bytes()[:-20])


def _break_drop_a_record(store, chunk):
    path = store.shard_path(chunk)
    path.write_text(path.read_text().splitlines(keepends=True)[0])


def _break_no_meta(store, chunk):
    store.meta_path(chunk).unlink()


def _break_copied_from_another_job(store, chunk):
    other = ShardStore(store.root.parent / "other", {"n_mc": 8})
    other.commit(chunk, [_label("x"), _label("y")])
    store.shard_path(chunk).write_bytes(other.shard_path(chunk).read_bytes())
    store.meta_path(chunk).write_bytes(other.meta_path(chunk).read_bytes())


def _break_edit_a_label(store, chunk):
    path = store.shard_path(chunk)
    path.write_text(path.read_text().replace('"n_correct": 1', '"n_correct": 3'))


@pytest.mark.parametrize(
    "breaks, reason",
    [
        (_break_zero_bytes, "does not match its integrity record (0 bytes"),
        (_break_truncate, "does not match its integrity record"),
        (_break_drop_a_record, "does not match its integrity record"),
        (_break_no_meta, "has no integrity record chunk-000001.meta.json"),
        (_break_copied_from_another_job, "written by a job with other settings"),
        (_break_edit_a_label, "does not match its integrity record"),
    ],
    ids=["zero-bytes", "truncated", "record-dropped", "no-integrity-record", "from-another-job", "edited"],
)
def test_a_shard_that_fails_its_integrity_check_is_redone_not_trusted(tmp_path, caplog, breaks, reason):
    store = ShardStore(tmp_path / "job", {"n_mc": 4})
    store.commit(0, [_label("p0")])
    store.commit(1, [_label("p1"), _label("p1b")])
    breaks(store, 1)

    resumed = ShardStore(tmp_path / "job", {"n_mc": 4})  # a rerun: a fresh store over the same folder
    with caplog.at_level(logging.WARNING, logger="pavlit.jobs.shards"):
        assert resumed.is_done(0) and not resumed.is_done(1)
    assert reason in caplog.text and "redoing the chunk" in caplog.text
    # Set aside, so that neither this store nor a reader of the folder (`pavlit fit` globs chunk-*.jsonl) sees it.
    assert not resumed.shard_path(1).exists() and (tmp_path / "job/chunk-000001.jsonl.rejected").exists()
    assert [r["problem_id"] for r in resumed.records()] == ["p0"]
    resumed.commit(1, [_label("p1"), _label("p1b")])
    assert [r["problem_id"] for r in ShardStore(tmp_path / "job", {"n_mc": 4}).records()] == ["p0", "p1", "p1b"]


def test_a_stray_shard_outside_the_jobs_chunks_is_left_out_of_the_records(tmp_path):
    store = ShardStore(tmp_path, {"n_mc": 4})
    store.commit(0, [_label("p0")])
    (tmp_path / "chunk-000042.jsonl").write_text(json.dumps(_label("stray")) + "\n")
    assert [r["problem_id"] for r in ShardStore(tmp_path, {"n_mc": 4}).records()] == ["p0"]
    assert store.done_chunks() == {0}


def test_the_integrity_record_counts_and_hashes_the_shard(tmp_path):
    store = ShardStore(tmp_path, {"n_mc": 4})
    store.commit(3, [_label("a"), _label("b"), _label("c")])
    meta = json.loads(store.meta_path(3).read_text())
    data = store.shard_path(3).read_bytes()
    assert meta["records"] == 3 and meta["bytes"] == len(data) and meta["chunk"] == 3
    assert meta["fingerprint"] == store.fingerprint
    assert store.check(3) is None


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as excinfo:
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert excinfo.value.errno == errno.ENOSPC and excinfo.value.filename == str(tmp_path / "metrics.json")
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed


# --- the output folder lock -------------------------------------------------------------------------------------


def test_a_second_job_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": lock_module.socket.gethostname()}))
        with pytest.raises(ValueError, match=rf"another pavlit job is writing here \(pid {holder.pid}"):
            with output_lock(tmp_path):
                pass
        assert (tmp_path / LOCK_FILE).exists()  # the refused job leaves the holder's lock alone
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": lock_module.socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="pavlit.jobs.lock"):
        with output_lock(tmp_path) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock of pid {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_job_fails(tmp_path):
    with pytest.raises(RuntimeError), output_lock(tmp_path):
        raise RuntimeError("boom")
    with output_lock(tmp_path):  # free again
        pass


def test_ranks_launched_by_the_job_write_under_its_lock(tmp_path, monkeypatch):
    with output_lock(tmp_path):
        monkeypatch.setenv("LOCAL_RANK", "1")
        with output_lock(tmp_path):  # a launched rank does not take (or fight over) the lock
            pass
        assert (tmp_path / LOCK_FILE).exists()


def test_check_unlocked_refuses_a_live_holder_and_passes_a_stale_one(tmp_path):
    from pavlit.jobs.lock import check_unlocked

    check_unlocked(tmp_path)  # no lock
    host = lock_module.socket.gethostname()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with pytest.raises(ValueError, match=rf"another pavlit job is writing here \(pid {os.getppid()}"):
        check_unlocked(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": host}))
    check_unlocked(tmp_path)


def test_a_reader_trusts_a_checked_folder_refuses_a_broken_shard_and_reads_a_legacy_one(tmp_path):
    from pavlit.jobs.shards import check_job_folder

    store = ShardStore(tmp_path / "job", {"n_mc": 4})
    store.commit(0, [_label("p0")])
    store.commit(1, [_label("p1")])
    check_job_folder(store.root)
    _break_zero_bytes(store, 1)
    with pytest.raises(ValueError, match=r"chunk-000001\.jsonl: not trusted: its content does not match"):
        check_job_folder(store.root)
    for meta in store.root.glob("chunk-*.meta.json"):  # as an older pavlit wrote it: no integrity records at all
        meta.unlink()
    check_job_folder(store.root)
