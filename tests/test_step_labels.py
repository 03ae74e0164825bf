"""Step-label and outcome DataModules: reading, validation, grouping, dedupe, split, balance, truncation."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pavlit.data.outcomes import OutcomeDataModule
from pavlit.data.step_labels import (
    ResumableSampler,
    StepLabelDataModule,
    is_validation_problem,
    iter_records,
    split_problems,
    truncate_at_step,
)
from pavlit.policy.sources import DEFAULT_ALPHABET
from pavlit.policy.tokenizer import build_char_tokenizer
from pavlit.steps import StepTokens

GOOD, BAD = "ok\n", "no\n"


def label(problem: str, steps: list[str], n_correct: int, outcome: int, seed: int = 0, n: int = 10, **extra) -> dict:
    record = {
        "problem_id": problem,
        "prompt": f"Q{problem}:",
        "steps": steps,
        "step_index": len(steps),
        "n_rollouts": n,
        "n_correct": n_correct,
        "q_mc": n_correct / n,
        "policy": "pi",
        "seed_outcome": outcome,
        "answer": "1",
        "seed_index": seed,
        "source": "seed",
    }
    record.update(extra)
    return record


def synthetic_labels(n_problems: int = 12, n_seeds: int = 3, seed: int = 0) -> list[dict]:
    """Rollouts of GOOD/BAD steps; Q is 0.8 until the first BAD step, 0.1 after it, 0.5 for the bare question."""
    rng = random.Random(seed)
    records = []
    for p in range(n_problems):
        for s in range(n_seeds):
            steps = [GOOD if rng.random() < 0.6 else BAD for _ in range(rng.randint(2, 4))]
            outcome = int(BAD not in steps)
            for h in range(len(steps) + 1):
                c = 5 if h == 0 else (1 if BAD in steps[:h] else 8)
                records.append(label(f"p{p}", steps[:h], c, outcome, seed=s))
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(DEFAULT_ALPHABET)


def prepared(path: Path, tokenizer, **kwargs) -> StepLabelDataModule:
    dm = StepLabelDataModule(str(path), **kwargs)
    dm.prepare(tokenizer)
    return dm


# --- reading --------------------------------------------------------------------------------------------------


def test_reads_shards_jsonl_parquet_and_save_to_disk_alike(tmp_path):
    records = synthetic_labels(3, 2)
    shards = tmp_path / "shards"
    write_jsonl(shards / "chunk-000001.jsonl", records[5:])
    write_jsonl(shards / "chunk-000000.jsonl", records[:5])
    (shards / "job.json").write_text("{}")
    read = list(iter_records(shards))
    assert [r for _, r in read] == records  # chunk order, not file-system order
    assert read[0][0].endswith("chunk-000000.jsonl:1") and read[5][0].endswith("chunk-000001.jsonl:1")

    import datasets

    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(str(tmp_path / "labels.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "labels.parquet", tmp_path / "saved"):
        assert [r for _, r in iter_records(source)] == records
    assert next(iter(iter_records(tmp_path / "labels.parquet")))[0].endswith("labels.parquet:row 0")


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot read a step-label dataset"):
        list(iter_records(tmp_path / "nowhere"))


# --- bad records ----------------------------------------------------------------------------------------------


BAD_LINES = [
    ({k: v for k, v in label("p0", [GOOD], 8, 1).items() if k != "q_mc"}, "missing field 'q_mc'"),
    (label("p0", [GOOD], 8, 1) | {"q_mc": 1.5}, "q_mc"),
    (label("p0", [GOOD], 8, 1) | {"q_mc": float("nan")}, "q_mc"),
    (label("p0", ["  "], 8, 1), "empty step"),
    (label("p0", [GOOD], 8, 1) | {"seed_outcome": 3}, "seed_outcome"),
    ('{"problem_id": "p0", "prompt": ', "not valid JSON"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
def test_bad_record_errors_name_file_and_line_or_are_counted(tmp_path, tokenizer, bad, message):
    path = write_jsonl(tmp_path / "labels.jsonl", [*synthetic_labels(4, 2), bad])
    n_lines = len(path.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"labels\.jsonl:{n_lines}: .*{message}"):
        prepared(path, tokenizer)
    dm = prepared(path, tokenizer, on_bad_record="skip")
    assert dm.stats["bad_records"] == 1
    assert dm.stats["records"] == n_lines


def test_prompt_longer_than_max_length_is_a_bad_record(tmp_path, tokenizer):
    records = synthetic_labels(4, 2) + [label("long", [GOOD], 8, 1) | {"prompt": "x" * 40}]
    path = write_jsonl(tmp_path / "labels.jsonl", records)
    with pytest.raises(ValueError, match="longer than max_length=20"):
        prepared(path, tokenizer, max_length=20)
    assert prepared(path, tokenizer, max_length=20, on_bad_record="skip").stats["bad_records"] == 1


def test_mixed_policies_need_a_choice(tmp_path, tokenizer):
    records = synthetic_labels(4, 1) + [label("p0", [], 5, 1) | {"policy": "bo4"}]
    path = write_jsonl(tmp_path / "labels.jsonl", records)
    with pytest.raises(ValueError, match="several policies"):
        prepared(path, tokenizer)
    dm = prepared(path, tokenizer, policy="bo4", val_fraction=0.0)
    assert dm.stats["train_labels"] == 1 and dm.stats["other_policy"] == len(records) - 1


# --- examples -------------------------------------------------------------------------------------------------


def test_one_example_per_rollout_with_labels_on_step_ends(tmp_path, tokenizer):
    steps = [GOOD, BAD, GOOD]
    records = [label("a", steps[:h], c, 0) for h, c in zip(range(4), [5, 8, 1, 1])]
    # Only prefix 2 of a second problem is labelled: the others stay masked.
    records.append(label("b", [GOOD, GOOD], 7, 1))
    dm = prepared(write_jsonl(tmp_path / "l.jsonl", records), tokenizer, val_fraction=0.0, balance=False)
    assert len(dm.train_examples) == 2
    batch = dm.train_dataloader().collate_fn(sorted(dm.train_examples, key=lambda e: e.problem_id))
    # <bos> Q a : o k \n n o \n o k \n  -> the prompt ends at 3, the steps at 6, 9, 12
    assert batch["positions"][0].tolist() == [3, 6, 9, 12]
    assert batch["input_ids"][0, 4:7].tolist() == tokenizer("ok\n", add_special_tokens=False)["input_ids"]
    assert batch["label_mask"].tolist() == [[True, True, True, True], [False, False, True, False]]
    assert batch["q"][0].tolist() == pytest.approx([0.5, 0.8, 0.1, 0.1])
    assert batch["q"][1, 2].item() == pytest.approx(0.7)
    assert batch["outcome"].tolist() == [[0.0] * 4, [1.0] * 4]
    assert batch["attention_mask"].sum(1).tolist() == [13, 10]


def test_dedupe_pools_identical_prefixes_and_drops_repeats(tmp_path, tokenizer):
    records = [
        label("a", [], 4, 1, seed=0),
        label("a", [GOOD], 3, 1, seed=0),
        label("a", [GOOD, GOOD], 9, 1, seed=0),
        label("a", [], 6, 0, seed=1),
        label("a", [GOOD], 5, 0, seed=1),
        label("a", [GOOD, BAD], 0, 0, seed=1),
    ]
    records.append(records[1])  # a re-run shard repeats a record
    path = write_jsonl(tmp_path / "l.jsonl", records)
    dm = prepared(path, tokenizer, val_fraction=0.0, balance=False)
    first, second = dm.train_examples
    assert first.q == pytest.approx([10 / 20, 8 / 20, 0.9])  # raw counts pooled: (4+6)/20, (3+5)/20
    assert math.isnan(second.q[0]) and math.isnan(second.q[1]) and second.q[2] == 0.0
    assert dm.stats["duplicates"] == 1 and dm.stats["pooled"] == 2
    no_dedupe = prepared(path, tokenizer, val_fraction=0.0, balance=False, dedupe=False)
    assert [q for e in no_dedupe.train_examples for q in e.q] == pytest.approx([0.4, 0.3, 0.9, 0.6, 0.5, 0.0])


def test_class_balance_weights_give_each_class_half_the_loss(tmp_path, tokenizer):
    # Labels 0.5, 0.8, 0.8 (high) and 0.1 (low): w_low = 4 / 2 = 2, w_high = 4 / 6.
    records = [label("a", [GOOD, BAD][:h], c, 0) for h, c in zip(range(3), [5, 8, 1])]
    records.append(label("b", [GOOD], 8, 1))
    dm = prepared(write_jsonl(tmp_path / "l.jsonl", records), tokenizer, val_fraction=0.0)
    assert dm.weights == pytest.approx((2.0, 2 / 3))
    batch = dm.train_dataloader().collate_fn(sorted(dm.train_examples, key=lambda e: e.problem_id))
    weight = batch["weight"][batch["label_mask"]]
    q = batch["q"][batch["label_mask"]]
    assert weight[q < 0.5].sum().item() == pytest.approx(weight[q >= 0.5].sum().item())
    assert (batch["weight"][~batch["label_mask"]] == 0).all()


def test_too_long_rollouts_are_cut_at_a_step_boundary(tmp_path, tokenizer):
    steps = [GOOD, GOOD, GOOD]
    records = [label("a", steps[:h], 8, 1) for h in range(4)]
    dm = prepared(write_jsonl(tmp_path / "l.jsonl", records), tokenizer, val_fraction=0.0, max_length=11)
    (example,) = dm.train_examples
    assert example.tokens.input_ids == tokenizer("Qa:ok\nok\n")["input_ids"]
    assert example.tokens.step_ends == [6, 9] and len(example.q) == 3
    assert dm.stats["truncated"] == 1 and dm.stats["labels_truncated"] == 1


def test_truncate_at_step_exact():
    tokens = StepTokens(list(range(10)), prompt_end=2, step_ends=[4, 7, 9])
    assert truncate_at_step(tokens, 10) is tokens
    assert truncate_at_step(tokens, 8) == StepTokens(list(range(8)), 2, [4, 7])
    assert truncate_at_step(tokens, 5) == StepTokens(list(range(5)), 2, [4])
    assert truncate_at_step(tokens, 4) == StepTokens(list(range(3)), 2, [])
    assert truncate_at_step(tokens, 2) is None


# --- split ----------------------------------------------------------------------------------------------------


def test_split_is_by_problem_with_no_leakage(tmp_path, tokenizer):
    dm = prepared(write_jsonl(tmp_path / "l.jsonl", synthetic_labels(30, 3)), tokenizer, val_fraction=0.3)
    train = {e.problem_id for e in dm.train_examples}
    val = {e.problem_id for e in dm.val_examples}
    assert train and val and not train & val
    train_prompts = {tuple(e.tokens.input_ids[: e.tokens.prompt_end + 1]) for e in dm.train_examples}
    assert not any(tuple(e.tokens.input_ids[: e.tokens.prompt_end + 1]) in train_prompts for e in dm.val_examples)
    again = prepared(write_jsonl(tmp_path / "m.jsonl", synthetic_labels(30, 3)[::-1]), tokenizer, val_fraction=0.3)
    assert {e.problem_id for e in again.val_examples} == val  # file order does not matter


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=40, unique=True), seed=st.integers(0, 5))
@example(ids=["00=0", "0000000"], seed=5)  # both hash into validation: one must stay for training
def test_split_problems_properties(ids, seed):
    val = split_problems(ids, 0.2, seed)
    assert val and val < set(ids)  # never empty, never everything
    assert split_problems(list(reversed(ids)), 0.2, seed) == val
    threshold = {p for p in ids if is_validation_problem(p, 0.2, seed)}
    if not threshold:  # the fallback adds exactly one problem
        assert len(val) == 1
    elif threshold == set(ids):  # everything hashed into validation: exactly one problem is kept for training
        assert val < threshold and len(threshold - val) == 1
    else:
        assert val == threshold


def test_hash_split_fraction_is_close():
    n = sum(is_validation_problem(f"problem-{i}", 0.1) for i in range(5000))
    assert 400 < n < 600


# --- sampler --------------------------------------------------------------------------------------------------


def test_resumable_sampler_skips_once_and_shards_ranks():
    data = list(range(10))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    full = list(sampler)
    sampler.skip(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full and len(sampler) == 10
    ranks = [list(ResumableSampler(data, 2, r, shuffle=True, seed=3)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == data
    sampler.set_epoch(1)
    assert list(sampler) != full


# --- outcomes -------------------------------------------------------------------------------------------------


def test_outcomes_from_step_labels_and_outcome_records(tmp_path, tokenizer):
    records = synthetic_labels(6, 2)
    records.append(label("p0", [BAD], 0, 0, seed=9) | {"source": "first_pit"})
    dm = OutcomeDataModule(str(write_jsonl(tmp_path / "l.jsonl", records)), val_fraction=0.0)
    dm.prepare(tokenizer)
    assert len(dm.train_examples) == 12 and dm.stats["not_seed"] == 1
    rows = [
        {"problem_id": "x", "prompt": "Qx:", "response": "ok\nok\n", "correct": 1},
        {"problem_id": "x", "prompt": "Qx:", "response": "no\n", "correct": False},
        {"problem_id": "x", "prompt": "Qx:", "response": "no\n", "correct": 0},
        {"problem_id": "y", "prompt": "Qy:", "response": "ok\n", "correct": 0.5},
    ]
    path = write_jsonl(tmp_path / "o.jsonl", rows)
    with pytest.raises(ValueError, match=r"o\.jsonl:4: field 'correct'"):
        OutcomeDataModule(str(path), val_fraction=0.0).prepare(tokenizer)
    dm = OutcomeDataModule(str(path), val_fraction=0.0, on_bad_record="skip")
    dm.prepare(tokenizer)
    assert dm.stats["duplicates"] == 1 and dm.stats["bad_records"] == 1
    batch = dm.train_dataloader().collate_fn(dm.train_examples)
    # The score sits on the response's last token: <bos> Q x : o k \n o k \n -> 9; <bos> Q x : n o \n -> 6
    assert batch["positions"].tolist() == [[9], [6]]
    assert batch["label"].tolist() == [1.0, 0.0]
    assert batch["weight"].tolist() == [1.0, 1.0]
    assert torch.equal(batch["input_ids"][1, :7], torch.tensor(tokenizer("Qx:no\n")["input_ids"]))
