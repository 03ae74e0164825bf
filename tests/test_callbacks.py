"""Numerical guards: FiniteGuard stops a fit at the first NaN/inf loss or gradient, naming the step and quantity;
``pavlit fit`` adds it by default (once, and it can be turned off); same seed → same labels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from pavlit import registry
from pavlit.callbacks import FiniteGuard, NonFiniteError
from pavlit.cli import RUN_DIR_ENV, main

REPO = Path(__file__).parents[1]

# A regression whose loss (or one gradient) turns non-finite at a chosen optimizer step. `mode`: "nan_loss",
# "inf_loss", or "nan_grad" (finite loss, NaN gradient of the parameter `fragile`, via sqrt of a negative number
# behind a where, the classic silent-NaN pattern).
BROKEN_MODULE = """\
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset


class BreaksAtStep(LightningModule):
    def __init__(self, mode: str = "nan_loss", at_step: int = 2) -> None:
        super().__init__()
        self.mode, self.at_step = mode, at_step
        self.linear = torch.nn.Linear(2, 1)
        self.fragile = torch.nn.Parameter(torch.tensor(-1.0))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)
        broken = self.global_step >= self.at_step
        if broken and self.mode == "nan_loss":
            loss = loss * float("nan")
        elif broken and self.mode == "inf_loss":
            loss = loss + float("inf")
        if broken and self.mode == "nan_grad":
            # Adds 0 to the loss, but the where's backward multiplies 0 by d sqrt(x)/dx at x = -1: NaN.
            loss = loss + torch.where(torch.tensor(False), torch.sqrt(self.fragile), 0.0)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Pairs(LightningDataModule):
    def train_dataloader(self):
        x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=2)
"""

CONFIG = """\
model:
  class_path: {module}.BreaksAtStep
  init_args: {{mode: {mode}, at_step: 2}}
data:
  class_path: {module}.Pairs
trainer:
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
"""


@pytest.fixture
def broken(make_module, monkeypatch, tmp_path):
    """The module name of BREAKING_MODULE (importable in this process), with a clean CLI environment."""
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    monkeypatch.setattr(registry, "discover", lambda: [])
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    return make_module(f"finite_guard_probe_{tmp_path.name.replace('-', '_')}", BROKEN_MODULE)


def _config(tmp_path: Path, module: str, mode: str, extra: str = "") -> Path:
    path = tmp_path / f"{mode}.yaml"
    path.write_text(CONFIG.format(module=module, mode=mode, root=tmp_path / "run") + extra)
    return path


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("nan_loss", "global step 2 (epoch 0): the training loss is nan"),
        ("inf_loss", "global step 2 (epoch 0): the training loss is inf"),
        ("nan_grad", "global step 2 (epoch 0): the gradient of parameter 'fragile' holds NaN"),
    ],
)
def test_guard_stops_at_the_first_bad_step_before_the_weights_change(broken, mode, message, tmp_path):
    module = sys.modules.get(broken) or __import__(broken)
    model = module.BreaksAtStep(mode=mode, at_step=2)
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[FiniteGuard()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteError, match="^" + re.escape(message)):
        trainer.fit(model, datamodule=module.Pairs())
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no NaN reached the weights"


def test_without_the_guard_the_same_run_silently_trains_on_nan(broken, tmp_path):
    # The failure the guard exists for: Lightning alone finishes "successfully" with NaN weights.
    module = __import__(broken)
    model = module.BreaksAtStep(mode="nan_loss", at_step=2)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=module.Pairs())
    assert trainer.global_step == 6 and torch.isnan(model.linear.weight).all()


def test_pavlit_fit_adds_the_guard_and_exits_non_zero_naming_the_step(broken, tmp_path, capsys):
    assert main(["fit", "--config", str(_config(tmp_path, broken, "nan_loss"))]) == 1
    err = capsys.readouterr().err
    assert "pavlit fit: error: NonFiniteError: global step 2 (epoch 0): the training loss is nan" in err
    assert "Traceback" not in err


def test_the_guard_can_be_turned_off(broken, tmp_path):
    config = _config(tmp_path, broken, "nan_loss")
    assert main(["fit", "--config", str(config), "--finite_guard.enabled", "false"]) == 0


def test_a_listed_guard_replaces_the_default_one(broken, tmp_path):
    from pavlit.cli import PavlitCLI

    listed = "  callbacks:\n    - class_path: pavlit.callbacks.FiniteGuard\n      init_args: {check_gradients: false}\n"
    cli = PavlitCLI(args=["--config", str(_config(tmp_path, broken, "nan_grad", listed))], run=False)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, FiniteGuard)]
    assert len(guards) == 1 and guards[0].check_gradients is False
    # The user's guard checks the loss only: the NaN gradient goes through, as they asked.
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6

    default = PavlitCLI(args=["--config", str(_config(tmp_path, broken, "nan_loss"))], run=False)
    assert sum(isinstance(c, FiniteGuard) for c in default.trainer.callbacks) == 1
    off = PavlitCLI(args=["--config", str(_config(tmp_path, broken, "nan_loss")), "--finite_guard.enabled=false"],
                    run=False)  # fmt: skip
    assert not any(isinstance(c, FiniteGuard) for c in off.trainer.callbacks)


def test_real_pavlit_process_exits_1_with_the_message_and_no_traceback(tmp_path):
    (tmp_path / "guard_probe_subprocess.py").write_text(textwrap.dedent(BROKEN_MODULE))
    config = _config(tmp_path, "guard_probe_subprocess", "nan_grad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop(RUN_DIR_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "pavlit", "fit", "--config", str(config)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "global step 2 (epoch 0): the gradient of parameter 'fragile' holds NaN" in done.stderr
    assert "Traceback" not in done.stderr


# --- reproducibility ---------------------------------------------------------------------------------------------


def test_same_seed_same_labels_and_another_seed_other_labels(tmp_path):
    """tests/test_labeling.py compares 1 rank with 2 ranks at one seed; here: two runs of one seed are identical,
    and the seed matters (a different seed gives other labels, so the equality is not vacuous)."""
    from pavlit.jobs.args import SamplerArgs
    from pavlit.jobs.shards import ShardStore
    from pavlit.labeling.job import label
    from pavlit.labeling.mc import LabelArgs
    from pavlit.policy.sources import TinyPolicy
    from pavlit.tasks.arithmetic import ArithmeticTask

    def records(name: str, seed: int) -> list[dict]:
        out = tmp_path / name
        label(
            task=ArithmeticTask(n_train=3, n_validation=1, n_test=1),
            policy=TinyPolicy(n_layer=1, n_embd=16, n_head=2),
            output_dir=str(out),
            label=LabelArgs(n_cov=2, n_mc=4, max_new_tokens=16),
            sampler=SamplerArgs(max_batch=64),
            chunk_size=2,
            seed=seed,
        )
        return list(ShardStore(out, json.loads((out / "job.json").read_text())["settings"]).records())

    first, again, other = records("a", 7), records("b", 7), records("c", 8)
    assert first == again and len(first) > 3
    assert first != other


# --- checkpoint files: complete and weights-only, or one line naming them ------------------------------------------


def test_check_checkpoint_catches_every_kind_of_damage(tmp_path):
    from pavlit.callbacks import atomic_save_checkpoint, check_checkpoint, load_checkpoint

    good = tmp_path / "good.ckpt"
    atomic_save_checkpoint({"state_dict": {"w": torch.arange(4096.0)}, "global_step": 3}, good)
    check_checkpoint(good)
    assert torch.equal(load_checkpoint(good)["state_dict"]["w"], torch.arange(4096.0))
    data = good.read_bytes()
    damaged = {
        "truncated": data[: len(data) * 2 // 3],
        "empty": b"",
        # bytes flipped inside the tensor data: the zip still opens and torch.load(mmap=True) still succeeds
        "bit-flipped": data[: len(data) // 2]
        + bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
        + data[len(data) // 2 + 64 :],
        "text": b"not a checkpoint\n",
    }
    for kind, content in damaged.items():
        path = tmp_path / f"{kind}.ckpt"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(path))) as err:
            check_checkpoint(path, "the resume checkpoint")
        assert "\n" not in str(err.value) and str(err.value).startswith("the resume checkpoint"), kind
