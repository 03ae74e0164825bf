"""PAVModule and ORMModule: losses and metrics (exact), training, inference API, export, LoRA/QLoRA, DDP, FSDP2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_step_labels import BAD, GOOD, synthetic_labels, write_jsonl

from pavlit.data.outcomes import OutcomeDataModule
from pavlit.data.step_labels import StepLabelDataModule
from pavlit.models.adapters import LoRAArgs, QuantArgs
from pavlit.models.scoring import likelihood_features, token_logprobs
from pavlit.modules.losses import balance_weights, masked_bce_with_logits
from pavlit.modules.metrics import ConstantBaseline, SoftCalibrationError
from pavlit.modules.optim import warmup_cosine
from pavlit.modules.orm import ORMModule
from pavlit.modules.pav import PAVModule
from pavlit.policy.sources import Pretrained, TinyPolicy
from pavlit.provers.best_of_k import BestOfK
from pavlit.steps import pad_step_batch, step_end_token_indices
from pavlit.values import best_of_k

REPO = Path(__file__).parents[1]
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}


def tiny() -> TinyPolicy:
    return TinyPolicy(**TINY)


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "accelerator": "cpu",
        "devices": 1,
    }
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labels")
    write_jsonl(folder / "chunk-000000.jsonl", synthetic_labels(12, 3))
    return folder


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def assert_all_changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = dict(module.named_parameters())
    unchanged = [name for name, value in before.items() if torch.equal(value, after[name].detach())]
    assert not unchanged, f"parameters did not change after one step: {unchanged}"


# --- pure helpers (exact values) ------------------------------------------------------------------------------


def test_masked_bce_uses_soft_labels_and_weights_exactly():
    logits = torch.tensor([0.0, math.log(3.0), 2.0])
    q = torch.tensor([0.3, 0.75, 1.0])
    mask = torch.tensor([True, True, False])
    # bce(0, 0.3) = log 2; bce(log 3, 0.75) = -(0.75 log 0.75 + 0.25 log 0.25)
    b0, b1 = math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert masked_bce_with_logits(logits, q, mask).item() == pytest.approx((b0 + b1) / 2)
    weight = torch.tensor([3.0, 1.0, 100.0])
    assert masked_bce_with_logits(logits, q, mask, weight).item() == pytest.approx((3 * b0 + b1) / 4)
    none = masked_bce_with_logits(logits.requires_grad_(), q, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()  # an all-masked batch is a no-op, not a NaN


def test_balance_weights_and_schedule_exact():
    assert balance_weights(3, 1) == pytest.approx((4 / 6, 2.0))
    assert balance_weights(0, 5) == (1.0, 1.0)
    assert [warmup_cosine(s, 3, 7) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])  # the SFT schedule
    assert warmup_cosine(3, 3, 7) == 1.0
    assert warmup_cosine(5, 3, 7) == pytest.approx(0.5)
    assert warmup_cosine(7, 3, 7) == pytest.approx(0.0) and warmup_cosine(9, 3, 7) == pytest.approx(0.0)


def test_soft_calibration_error_exact():
    metric = SoftCalibrationError(n_bins=2)
    # bin 0: preds 0.2, 0.4 vs labels 0.0, 0.2 -> |0.6 - 0.2|; bin 1: pred 0.9 vs label 0.5 -> |0.4|
    metric.update(torch.tensor([0.2, 0.4, 0.9]), torch.tensor([0.0, 0.2, 0.5]))
    assert metric.compute().item() == pytest.approx((0.4 + 0.4) / 3)
    perfect = SoftCalibrationError()
    perfect.update(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7]))
    assert perfect.compute().item() == pytest.approx(0.0)


def test_constant_baseline_exact():
    metric = ConstantBaseline()
    metric.update(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    out = metric.compute()
    assert out["mean"].item() == pytest.approx(0.75)
    assert out["bce"].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert out["mse"].item() == pytest.approx(0.1875)
    assert out["accuracy"].item() == pytest.approx(0.75)


# --- PAV ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pav() -> PAVModule:
    return PAVModule(source=tiny(), lr=1e-2, warmup_steps=0, export=False)


def test_pav_parameters_change_after_one_step(labels_dir, tmp_path):
    module = PAVModule(source=tiny(), lr=1e-2, warmup_steps=0, export=False)
    before = snapshot(module)
    assert (
        any(name.startswith("verifier.backbone.") for name in before) and "verifier.value_head.linear.weight" in before
    )
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    assert_all_changed(before, module)


def test_token_head_trains_the_backbone_and_its_bias(labels_dir, tmp_path):
    module = PAVModule(source=tiny(), head_type="token", score_token="+", lr=1e-2, warmup_steps=0, export=False)
    assert module.verifier.value_head.token_id == module.tokenizer.convert_tokens_to_ids("+")
    before = snapshot(module)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    assert_all_changed(before, module)
    with pytest.raises(ValueError, match="not one token"):
        PAVModule(source=tiny(), head_type="token", score_token="<nope>")


def test_score_prefixes_scores_every_prefix_in_one_pass(pav):
    prompts = ["Qa:", "Qbb:", "Qc:"]
    steps = [[GOOD, BAD, GOOD], [GOOD], []]
    scores = pav.score_prefixes(prompts, steps, batch_size=2)
    assert [s.shape for s in scores] == [(4,), (2,), (1,)]
    assert all(((s > 0) & (s < 1)).all() for s in scores)
    # Batching and padding change nothing; each value is the score at the prefix's end token of the full text.
    for prompt, item, score in zip(prompts, steps, scores):
        assert torch.allclose(pav.score_prefixes([prompt], [item])[0], score, atol=1e-6)
    ids = torch.tensor([pav.tokenizer("Qa:ok\nno\nok\n")["input_ids"]])
    manual = torch.sigmoid(pav(ids, torch.ones_like(ids), torch.tensor([[3, 6, 9, 12]])))[0]
    assert torch.allclose(manual, scores[0], atol=1e-6)
    # Causal: a prefix's value does not depend on the steps after it.
    assert torch.allclose(pav.score_prefixes(["Qa:"], [[GOOD, BAD]])[0], scores[0][:3], atol=1e-6)


def test_likelihood_features_match_a_per_token_loop(pav):
    prompts, steps = ["Qa:", "Qbb:"], [[GOOD, BAD, GOOD], [BAD]]
    batch = pad_step_batch([step_end_token_indices(p, s, pav.tokenizer) for p, s in zip(prompts, steps)], 0)
    with torch.no_grad():
        hidden = pav.verifier.backbone.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        hidden = hidden.last_hidden_state
        full = torch.log_softmax(pav.verifier.backbone(input_ids=batch.input_ids).logits.float(), -1)
    # Sliced projection (2 positions at a time here) equals one full log-softmax.
    sliced = token_logprobs(pav.verifier.backbone, hidden, batch.input_ids, max_values=2 * 2 * full.shape[-1])
    reference = full[:, :-1].gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    assert torch.allclose(sliced[:, 1:], reference, atol=1e-5) and (sliced[:, 0] == 0).all()
    features = likelihood_features(
        pav.verifier.backbone, hidden, batch.input_ids, batch.prefix_positions, batch.prompt_end
    )
    assert features.shape == (2, 4, 4)
    for row in range(2):
        ends = batch.prefix_positions[row].tolist()
        start = int(batch.prompt_end[row])
        for k in range(len(steps[row]) + 1):
            prefix = sliced[row, start + 1 : ends[k] + 1]
            last = sliced[row, (ends[k - 1] if k else start) + 1 : ends[k] + 1]
            expected = [v.min() if len(v) else 0.0 for v in (prefix,)] + [prefix.sum()]
            expected += [last.min() if len(last) else 0.0, last.sum()]
            assert torch.allclose(features[row, k], torch.tensor([float(v) for v in expected]), atol=1e-5)
        # Padded steps past the response carry no features.
        assert (features[row, len(steps[row]) + 1 :] == 0).all()


def test_likelihood_head_trains_scores_causally_and_reloads(labels_dir, tmp_path):
    L.seed_everything(0)
    module = PAVModule(source=tiny(), head_type="likelihood", lr=1e-2, warmup_steps=0, export=True)
    before = snapshot(module)
    frozen = {k: v.clone() for k, v in module.verifier.reference.state_dict().items()}
    assert frozen and not any(p.requires_grad for p in module.verifier.reference.parameters())
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    assert_all_changed(before, module)
    # The reference is the starting policy and stays it; it is never in training mode.
    assert all(torch.equal(v, module.verifier.reference.state_dict()[k]) for k, v in frozen.items())
    module.train()
    module.score_prefixes(["Qa:"], [[GOOD]])
    module.train()
    ids = torch.tensor([module.tokenizer("Qa:ok\n")["input_ids"]])
    module(ids, torch.ones_like(ids), torch.tensor([[2, 5]]))
    assert not any(m.training for m in module.verifier.reference.modules())
    scores = module.score_prefixes(["Qa:", "Qb:"], [[GOOD, BAD, GOOD], [BAD]])
    assert torch.allclose(module.score_prefixes(["Qa:"], [[GOOD, BAD]])[0], scores[0][:3], atol=1e-6)
    reloaded = PAVModule.from_pretrained(tmp_path / "verifier")
    assert isinstance(reloaded.verifier.value_head, type(module.verifier.value_head))
    again = reloaded.score_prefixes(["Qa:", "Qb:"], [[GOOD, BAD, GOOD], [BAD]])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again, scores))
    orm = ORMModule(source=tiny(), head_type="likelihood", lr=1e-2, warmup_steps=0, export=False)
    before = snapshot(orm)
    data = OutcomeDataModule(str(labels_dir), batch_size=8)
    trainer(tmp_path / "orm", max_steps=2, limit_val_batches=0).fit(orm, data)
    assert_all_changed(before, orm)
    together = orm.score_responses(["Qa:", "Qbb:"], ["ok\nno\n", "no\n"])
    assert torch.allclose(orm.score_responses(["Qbb:"], ["no\n"]), together[1:], atol=1e-6)


def test_verifiers_refuse_to_return_nan_scores():
    pav = PAVModule(source=tiny(), export=False)
    orm = ORMModule(source=tiny(), export=False)
    for module in (pav, orm):
        with torch.no_grad():
            module.verifier.value_head.linear.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="process verifier returned NaN"):
        pav.score_prefixes(["Qa:"], [[GOOD]])
    with pytest.raises(FloatingPointError, match="outcome verifier returned NaN"):
        orm.score_responses(["Qa:"], ["ok\n"])


def test_q_and_advantages_with_best_of_k(pav):
    steps = [[GOOD, BAD, GOOD], [BAD]]
    q_pi, q_mu, a_mu = pav.q_and_advantages(["Qa:", "Qb:"], steps, BestOfK(4))
    for q, qm, a, item in zip(q_pi, q_mu, a_mu, steps):
        assert torch.allclose(qm, best_of_k(q, 4))
        assert torch.allclose(a, qm[1:] - qm[:-1]) and a.shape == (len(item),)

    class Recorder(BestOfK):
        seen = None
        prompts = None

        def q_values(self, q, prefixes=None, prompts=None):
            Recorder.seen, Recorder.prompts = prefixes, prompts
            return super().q_values(q, prefixes, prompts)

    pav.q_and_advantages(["Qa:", "Qb:"], steps, Recorder(1))
    assert Recorder.seen == [[], [GOOD], [GOOD, BAD], [GOOD, BAD, GOOD], [], [BAD]]
    assert Recorder.prompts == ["Qa:"] * 4 + ["Qb:"] * 2


def test_pav_learns_to_beat_the_constant_mean(labels_dir, tmp_path):
    folder = tmp_path / "labels"
    write_jsonl(folder / "chunk-000000.jsonl", synthetic_labels(30, 3, seed=1))
    L.seed_everything(0)
    module = PAVModule(source=tiny(), lr=5e-3, warmup_steps=3, export=False)
    data = StepLabelDataModule(str(folder), val_fraction=0.25, batch_size=8)
    fit = trainer(tmp_path, max_steps=40, check_val_every_n_epoch=100, num_sanity_val_steps=0)
    fit.fit(module, data)
    (metrics,) = fit.validate(module, data, verbose=False)
    assert metrics["val/bce"] < metrics["val/baseline_bce"] - 0.1, metrics
    assert metrics["val/mse"] < 0.5 * metrics["val/baseline_mse"], metrics
    assert metrics["val/auroc"] > 0.8, metrics


def test_pav_export_and_checkpoint_reload(labels_dir, tmp_path):
    L.seed_everything(0)
    module = PAVModule(source=tiny(), lr=1e-2, warmup_steps=0, export=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(
        tmp_path,
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    fit.fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    prompts, steps = ["Qa:", "Qb:"], [[GOOD, BAD], [GOOD]]
    expected = module.score_prefixes(prompts, steps)

    export = tmp_path / "verifier"
    assert (export / "config.json").is_file() and (export / "value_head.safetensors").is_file()
    meta = json.loads((export / "pavlit_verifier.json").read_text())
    assert meta["kind"] == "pav" and meta["backbone"] == "full"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "val/bce" in metrics["metrics"] and metrics["data"]["train_rollouts"] > 0
    reloaded = PAVModule.from_pretrained(export)
    for a, b in zip(reloaded.score_prefixes(prompts, steps), expected):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="not a 'orm'"):
        ORMModule.from_pretrained(export)

    raw = torch.load(checkpoint.last_model_path, weights_only=True)
    assert raw["hyper_parameters"]["source"]["class_path"] == "pavlit.policy.sources.TinyPolicy"
    restored = PAVModule.load_from_checkpoint(checkpoint.last_model_path, weights_only=True)
    for a, b in zip(restored.score_prefixes(prompts, steps), expected):
        assert torch.allclose(a, b, atol=1e-6)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_mid_epoch_gives_the_same_weights(labels_dir, tmp_path):
    def run(root: Path, ckpt_path: str | None = None, stop: int | None = None) -> PAVModule:
        L.seed_everything(0)
        module = PAVModule(source=tiny(), lr=1e-2, warmup_steps=2, export=False)
        data = StepLabelDataModule(str(labels_dir), val_fraction=0.2, batch_size=4)
        callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)]
        callbacks += [StopAt(stop)] if stop else []
        # 10 steps over epochs of 7 batches: resume at step 3 (mid-epoch), then cross into the next epoch.
        fit = trainer(root, max_steps=10, limit_val_batches=0, enable_checkpointing=True, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit.fit(module, data, ckpt_path=ckpt_path)
        assert fit.num_training_batches == 7
        return module

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=3)
    (ckpt,) = (tmp_path / "b").glob("*.ckpt")
    resumed = run(tmp_path / "c", ckpt_path=str(ckpt))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --- ORM ------------------------------------------------------------------------------------------------------


def test_orm_parameters_change_after_one_step_and_scores(labels_dir, tmp_path):
    module = ORMModule(source=tiny(), lr=1e-2, warmup_steps=0, export=True)
    before = snapshot(module)
    data = OutcomeDataModule(str(labels_dir), val_fraction=0.25, batch_size=8)
    fit = trainer(tmp_path, max_steps=1, val_check_interval=1, limit_val_batches=1)
    fit.fit(module, data)
    assert_all_changed(before, module)
    scores = module.score_responses(["Qa:", "Qb:", "Qa:"], ["ok\nok\n", "no\n", "ok\n"], batch_size=2)
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    single = module.score_responses(["Qb:"], ["no\n"])
    assert torch.allclose(single, scores[1:2], atol=1e-6)
    # One validation batch of one class here: AUROC is undefined and left out (DefinedAUROC).
    assert {"val/bce", "val/accuracy", "val/baseline_bce"} <= set(fit.callback_metrics)
    reloaded = ORMModule.from_pretrained(tmp_path / "verifier")
    assert torch.allclose(
        reloaded.score_responses(["Qa:", "Qb:", "Qa:"], ["ok\nok\n", "no\n", "ok\n"]), scores, atol=1e-5
    )


# --- CLI ------------------------------------------------------------------------------------------------------

CLI_CONFIG = """\
model:
  class_path: {model}
  init_args:
    source:
      class_path: pavlit.policy.sources.TinyPolicy
      init_args: {{n_layer: 1, n_embd: 32, n_head: 2}}
    warmup_steps: 1
data:
  class_path: {data}
  init_args:
    path: {path}
    batch_size: 8
trainer:
  default_root_dir: {root}
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ("pavlit.modules.pav.PAVModule", "pavlit.data.step_labels.StepLabelDataModule"),
        ("pavlit.modules.orm.ORMModule", "pavlit.data.outcomes.OutcomeDataModule"),
    ],
)
def test_fast_dev_run_through_the_cli(labels_dir, tmp_path, monkeypatch, model, data):
    from pavlit.cli import main

    monkeypatch.setattr(sys, "argv", ["pavlit"])
    config = tmp_path / "fit.yaml"
    root = tmp_path / "run"
    config.write_text(CLI_CONFIG.format(model=model, data=data, path=labels_dir, root=root))
    assert main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"]) == 0
    assert (root / "verifier" / "pavlit_verifier.json").is_file()


# --- LoRA and QLoRA -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_backbone")
    model, tokenizer = tiny().load()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lora_trains_adapters_and_head_only_and_exports_the_adapter(labels_dir, tmp_path):
    module = PAVModule(source=tiny(), lora=LoRAArgs(enabled=True, r=4, alpha=8), lr=1e-2, warmup_steps=0, export=True)
    trainable = snapshot(module)
    assert trainable and all("lora_" in name or name.startswith("verifier.value_head.") for name in trainable)
    assert any(name.startswith("verifier.value_head.") for name in trainable)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    assert_all_changed({k: v for k, v in trainable.items() if "lora_B" in k or "value_head" in k}, module)
    export = tmp_path / "verifier"
    assert (export / "adapter_config.json").is_file() and not (export / "model.safetensors").exists()
    expected = module.score_prefixes(["Qa:"], [[GOOD, BAD]])[0]
    assert torch.allclose(PAVModule.from_pretrained(export).score_prefixes(["Qa:"], [[GOOD, BAD]])[0], expected)


@pytest.mark.parametrize("fused", [False, True], ids=["generic-cpu", "avx512bf16-cpu"])
def test_qlora_nf4_fast_dev_run_on_cpu(labels_dir, tiny_folder, tmp_path, monkeypatch, fused):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("bitsandbytes")
    from test_adapters import force_bnb_cpu_kernel

    # Both bitsandbytes CPU branches, whatever this CPU has: the tiny backbone's 32-wide layers are narrower than
    # a 4-bit block, which bitsandbytes' AVX512-BF16 repacking cannot hold, and fast_dev_run validates in eval mode.
    force_bnb_cpu_kernel(monkeypatch, fused)
    quant = QuantArgs(mode="nf4", compute_dtype="float32")
    with pytest.raises(ValueError, match="lora.enabled=true"):
        PAVModule(source=Pretrained(str(tiny_folder)), quant=quant)
    with pytest.raises(ValueError, match="needs a Pretrained source"):
        PAVModule(source=tiny(), lora=LoRAArgs(enabled=True), quant=quant)
    module = PAVModule(source=Pretrained(str(tiny_folder)), lora=LoRAArgs(enabled=True, r=4), quant=quant, lr=1e-2)
    before = snapshot(module)
    fit = trainer(tmp_path, fast_dev_run=True, precision="32-true")
    fit.fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    assert_all_changed({k: v for k, v in before.items() if "lora_B" in k or "value_head" in k}, module)
    reloaded = PAVModule.from_pretrained(tmp_path / "verifier")
    assert reloaded.quant.mode == "nf4"
    expected = module.score_prefixes(["Qa:"], [[GOOD]])[0]
    assert torch.allclose(reloaded.score_prefixes(["Qa:"], [[GOOD]])[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="precision='64-true' cannot be combined"):
        trainer(tmp_path, fast_dev_run=True, precision="64-true").fit(
            module, StepLabelDataModule(str(labels_dir), batch_size=8)
        )


# --- scale-out (separate processes) ---------------------------------------------------------------------------


def run_python(code: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("PAVLIT_RUN_DIR", None)
    # A script file, not `python -c`: Lightning's DDP launcher starts the other ranks by re-running sys.argv.
    script = cwd / "run_ranks.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_ddp_two_cpu_processes_through_the_cli(labels_dir, tmp_path):
    config = tmp_path / "fit.yaml"
    root = tmp_path / "run"
    config.write_text(
        CLI_CONFIG.format(
            model="pavlit.modules.pav.PAVModule",
            data="pavlit.data.step_labels.StepLabelDataModule",
            path=labels_dir,
            root=root,
        )
    )
    args = [
        "fit",
        "--config",
        str(config),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--model.init_args.head_type=likelihood",  # the tiny default: its frozen reference must not upset DDP
    ]
    code = f"""
        import sys
        from pavlit.cli import main
        sys.exit(main({args!r}))
    """
    run_python(code, tmp_path)
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and "val/bce" in metrics["metrics"]
    assert PAVModule.from_pretrained(root / "verifier").score_prefixes(["Qa:"], [[GOOD]])[0].shape == (2,)


@pytest.mark.slow
def test_fsdp2_sharded_training_on_cpu(labels_dir, tmp_path):
    code = f"""
        import torch, lightning as L
        from lightning.pytorch.strategies import ModelParallelStrategy
        from pavlit.data.step_labels import StepLabelDataModule
        from pavlit.modules.pav import PAVModule
        from pavlit.policy.sources import TinyPolicy

        L.seed_everything(0)
        module = PAVModule(source=TinyPolicy(n_layer=2, n_embd=32, n_head=2), head_type="likelihood", lr=1e-2,
                           warmup_steps=0)
        initial = {{k: v.clone() for k, v in module.verifier.backbone.state_dict().items()}}
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, limit_val_batches=1,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, default_root_dir={str(tmp_path)!r})
        trainer.fit(module, StepLabelDataModule({str(labels_dir)!r}, batch_size=4))
        from torch.distributed.tensor import DTensor
        assert any(isinstance(p, DTensor) for p in module.parameters())
        if trainer.is_global_zero:
            reloaded = PAVModule.from_pretrained({str(tmp_path / "verifier")!r})
            changed = [k for k, v in reloaded.verifier.backbone.state_dict().items() if not torch.equal(v, initial[k])]
            assert changed, "the exported backbone did not train"
            print("OK", len(changed))
    """
    assert "OK" in run_python(code, tmp_path).stdout


def test_export_uses_the_best_monitored_checkpoint_not_the_last_step(labels_dir, tmp_path):
    """With ModelCheckpoint(monitor="val/bce"), the exported verifier is the best validation checkpoint."""
    L.seed_everything(0)
    module = PAVModule(source=tiny(), lr=2.0, warmup_steps=0, export=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/bce", mode="min", save_top_k=1)
    fit = trainer(
        tmp_path,
        max_steps=10,
        val_check_interval=2,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    fit.fit(module, StepLabelDataModule(str(labels_dir), batch_size=8))
    best_checkpoint = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    assert best_checkpoint["global_step"] < fit.global_step, "the scenario needs a best step before the last one"
    best = best_checkpoint["state_dict"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["exported"]["checkpoint"] == checkpoint.best_model_path
    assert metrics["exported"]["score"] == pytest.approx(float(checkpoint.best_model_score))
    exported = PAVModule.from_pretrained(tmp_path / "verifier")
    for name, value in exported.verifier.value_head.state_dict().items():
        assert torch.equal(value, best[f"verifier.value_head.{name}"])


def test_auroc_is_left_out_when_validation_holds_one_class():
    """All-zero labels (a policy that solves nothing) make AUROC undefined: no number rather than a wrong 0."""
    from pavlit.modules.metrics import DefinedAUROC, defined_metrics

    metric = DefinedAUROC()
    metric.update(torch.tensor([0.2, 0.7, 0.4]), torch.tensor([0, 0, 0]))
    assert metric.compute() is None
    assert defined_metrics({"val/auroc": metric.compute(), "val/bce": torch.tensor(0.5)}) == {
        "val/bce": torch.tensor(0.5)
    }
    metric.update(torch.tensor([0.9]), torch.tensor([1]))
    assert float(metric.compute()) == pytest.approx(1.0)
