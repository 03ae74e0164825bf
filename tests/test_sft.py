import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch import Trainer

from pavlit.cli import RUN_DIR_ENV, main
from pavlit.data.sft import IGNORE_INDEX, SFTDataModule, SFTExample, collate_sft, encode_example, read_rollouts
from pavlit.models.adapters import LoRAArgs
from pavlit.modules.losses import causal_lm_loss
from pavlit.modules.optim import warmup_cosine
from pavlit.modules.sft import SFTModule, export_policy, pass_at_k
from pavlit.policy.sources import Pretrained, TinyPolicy
from pavlit.policy.tokenizer import build_char_tokenizer
from pavlit.tasks.arithmetic import ALPHABET, ArithmeticTask

REPO = Path(__file__).parents[1]
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "max_position": 128, "alphabet": ALPHABET}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


@pytest.fixture
def task():
    return ArithmeticTask(difficulty=1, seed=0, n_train=24, n_validation=6, n_test=4)


def _datamodule(task, tokenizer, **kwargs):
    data = SFTDataModule(task, **kwargs)
    data.tokenizer = tokenizer
    return data


def _trainer(tmp_path, **kwargs):
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
    }
    return Trainer(**{**options, **kwargs})


# --- pure functions ------------------------------------------------------------------------------------------


def test_encode_example_masks_exactly_the_prompt(tokenizer):
    example = encode_example(tokenizer, "Compute 1+2.\n", "1+2=3\nAnswer: 3\n")
    ids = lambda text: [tokenizer.convert_tokens_to_ids(c) for c in text]  # noqa: E731
    prompt = [tokenizer.bos_token_id, *ids("Compute 1+2.\n")]
    response = [*ids("1+2=3\nAnswer: 3\n"), tokenizer.eos_token_id]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response


def test_collate_pads_right():
    batch = collate_sft([SFTExample([5, 6, 7], [-100, 6, 7]), SFTExample([8], [-100])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_causal_lm_loss_hand_computed():
    # Vocabulary of 2; position t predicts label t+1. Only the last position's target (token 1) counts.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    loss, n_tokens = causal_lm_loss(logits, labels)
    assert n_tokens.item() == 1
    assert loss.item() == pytest.approx(-math.log(3 / 4))
    # Two targets: token 0 from uniform logits (log 2) and token 1 at p = 3/4.
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, n_tokens = causal_lm_loss(logits, labels)
    assert n_tokens.item() == 2 and loss.item() == pytest.approx((math.log(2) - math.log(3 / 4)) / 2)


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_binomials(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_warmup_cosine_hand_computed():
    values = [warmup_cosine(step, warmup_steps=4, total_steps=12) for step in range(13)]
    assert values[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert values[8] == pytest.approx(0.5) and values[6] == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))
    assert values[12] == 0.0 and all(a >= b for a, b in zip(values[3:], values[4:]))
    assert warmup_cosine(0, warmup_steps=100, total_steps=1) == 1.0  # warm-up cut to a 1-step run


# --- data ----------------------------------------------------------------------------------------------------


def test_datamodule_batch_masks_prompt_and_padding(task, tokenizer):
    data = _datamodule(task, tokenizer, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    problems = task.problems("validation")[:4]
    for row, problem in enumerate(problems):
        n_prompt = 1 + len(problem.prompt)  # <bos> + one token per character
        n_response = len("".join(problem.reference_steps)) + 1  # + <eos>
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n_prompt + n_response :] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt : n_prompt + n_response], ids[n_prompt : n_prompt + n_response])
        assert tokenizer.decode(ids[n_prompt : n_prompt + n_response]) == "".join(problem.reference_steps) + "<eos>"
        assert batch["attention_mask"][row].sum() == n_prompt + n_response


def test_too_long_examples_are_skipped_with_a_count_or_refused(task, tokenizer, caplog):
    lengths = [1 + len(p.prompt) + len("".join(p.reference_steps)) + 1 for p in task.problems("train")]
    limit = sorted(lengths)[len(lengths) // 2]
    data = _datamodule(task, tokenizer, max_length=limit)
    data.setup("fit")
    expected = sum(length > limit for length in lengths)
    assert 0 < expected < len(lengths)
    assert data.skipped["train"] == expected and len(data.train_examples) == len(lengths) - expected
    assert f"skipped {expected} of {len(lengths)} train examples" in caplog.text
    with pytest.raises(ValueError, match="over max_length"):
        _datamodule(task, tokenizer, max_length=limit, on_too_long="error").setup("fit")


def test_rft_keeps_only_correct_rollouts(task, tokenizer, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = [
        {"problem_id": "a", "prompt": "Compute 1+2.\n", "response": "1+2=3\nAnswer: 3\n", "correct": True},
        {"problem_id": "b", "prompt": "Compute 2+2.\n", "response": "2+2=5\nAnswer: 5\n", "correct": False},
        {"problem_id": "c", "prompt": "Compute 3+3.\n", "response": "3+3=6\nAnswer: 6\n", "correct": 1},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    data = _datamodule(task, tokenizer, response_source="rollouts", rollouts_path=str(path))
    data.setup("fit")
    texts = [tokenizer.decode(example.input_ids, skip_special_tokens=True) for example in data.train_examples]
    assert texts == [rows[0]["prompt"] + rows[0]["response"], rows[2]["prompt"] + rows[2]["response"]]
    assert len(data.val_examples) == 6  # validation still uses the task's reference solutions


def test_rollouts_folder_reads_every_chunk_in_name_order(tmp_path):
    folder = tmp_path / "rollouts"
    folder.mkdir()
    for index, name in enumerate(["chunk-000001.jsonl", "chunk-000000.jsonl"]):
        row = {"problem_id": f"p{1 - index}", "prompt": "q", "response": "r", "correct": index == 0}
        (folder / name).write_text(json.dumps(row) + "\n")
    (folder / "notes.txt").write_text("not a rollout")
    assert [r.problem_id for r in read_rollouts(folder)] == ["p0", "p1"]
    with pytest.raises(ValueError, match="needs \\*.jsonl files"):
        read_rollouts(tmp_path)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"problem_id": "x", "prompt": "p", "response": "r"}', "missing key"),
        ('{"problem_id": "x", "prompt": "p", "response": "r", "correct": "yes"}', "'correct' must be"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_malformed_rollout_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "rollouts.jsonl"
    good = json.dumps({"problem_id": "a", "prompt": "p", "response": "r", "correct": True})
    path.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(ValueError, match=f"{path}:3: {message}"):
        read_rollouts(path)


def test_rollouts_path_needed_exactly_for_rft(task):
    with pytest.raises(ValueError, match="rollouts_path"):
        SFTDataModule(task, response_source="rollouts")
    with pytest.raises(ValueError, match="rollouts_path"):
        SFTDataModule(task, rollouts_path="x.jsonl")


# --- module --------------------------------------------------------------------------------------------------


def test_one_step_changes_every_parameter_and_export_reloads(task, tmp_path):
    module = SFTModule(source=TinyPolicy(**TINY), warmup_steps=1, export=False)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    _trainer(tmp_path).fit(module, SFTDataModule(task, batch_size=8))
    unchanged = [name for name, p in module.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []

    paths = export_policy(module.model, module.tokenizer, tmp_path)
    model, tokenizer = Pretrained(path=paths["policy"]).load()
    prompt = task.problems("validation")[0].prompt
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == module.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, module.model.eval()(ids).logits, atol=1e-6)


def test_lora_trains_adapters_only_and_exports_adapter_and_merged_policy(task, tmp_path):
    module = SFTModule(source=TinyPolicy(**TINY), lora=LoRAArgs(enabled=True, r=2, dropout=0.0), warmup_steps=1)
    frozen = {name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad}
    _trainer(tmp_path).fit(module, SFTDataModule(task, batch_size=8))
    assert all(torch.equal(p, frozen[name]) for name, p in module.named_parameters() if name in frozen)
    assert (tmp_path / "policy_adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["adapter"] == str(tmp_path / "policy_adapter")
    merged, _ = Pretrained(path=str(tmp_path / "policy")).load()
    ids = torch.tensor([module.tokenizer("Compute 1+2.\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, module.model.eval()(ids).logits, atol=1e-5)


def test_fit_fast_dev_run_through_the_cli_exports_a_reloadable_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    source = "--model.init_args.source.init_args."
    task_args = "--data.init_args.task.init_args."
    argv = ["fit", "--config", str(REPO / "configs/tiny/sft.yaml"), "--trainer.fast_dev_run=true"]
    argv += ["--trainer.default_root_dir", str(tmp_path / "run")]
    argv += [f"{source}n_layer=1", f"{source}n_embd=32", f"{source}n_head=2"]
    argv += ["--model.init_args.eval_problems=3", "--model.init_args.eval_max_new_tokens=8"]
    argv += [f"{task_args}n_train=16", f"{task_args}n_validation=4", "--data.init_args.batch_size=4"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val/loss", "val/pass@1", "val/pass@4"} <= set(metrics) and metrics["global_step"] == 1
    assert 0.0 <= metrics["val/pass@1"] <= metrics["val/pass@4"] <= 1.0
    model, tokenizer = Pretrained(path=metrics["policy"]).load()
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert tokenizer.decode(tokenizer("Compute 1+2.\n")["input_ids"], skip_special_tokens=True) == "Compute 1+2.\n"
