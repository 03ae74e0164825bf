import json

import pytest

from pavlit.labeling.records import StepLabel, read_jsonl, to_trl_prm, validate_record
from pavlit.labeling.shards import ShardStore, atomic_write_text, chunks_for_rank


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
