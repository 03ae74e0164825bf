"""The inference ``Verifier``: loaded without training code (the static check is in tests/test_layout.py), the
same scores as the modules that trained it, exports and checkpoints written before it existed still load, and
optimizers and schedules are injected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pavlit.models.verifier import Verifier
from pavlit.modules.orm import ORMModule
from pavlit.modules.pav import PAVModule
from pavlit.policy.sources import TinyPolicy

REPO = Path(__file__).parents[1]
OLD = REPO / "tests" / "fixtures" / "verifier_v1"  # written by the code before Verifier (commit 90b8a1b)
EXPECTED = json.loads((OLD / "expected.json").read_text())


def test_loading_a_verifier_loads_no_lightning_module():
    code = (
        "import sys; from pavlit.models.verifier import Verifier; "
        f"v = Verifier.from_pretrained({str(OLD / 'pav')!r}); "
        "import pavlit.rewards.verifiers, pavlit.provers.checkpoint, pavlit.search.job; "
        "print(sorted(m for m in sys.modules if m.startswith(('pavlit.modules', 'pavlit.data'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_exports_written_before_the_verifier_class_score_the_same():
    prompts, steps = EXPECTED["prompts"], EXPECTED["steps"]
    pav = Verifier.from_pretrained(OLD / "pav")
    assert pav.kind == "pav" and not pav.training and not any(p.requires_grad for p in pav.parameters())
    for got, want in zip(pav.score_prefixes(prompts, steps), EXPECTED["pav"]):
        assert got.tolist() == pytest.approx(want, abs=1e-5)
    orm = Verifier.from_pretrained(OLD / "orm", kind="orm")  # a "likelihood" head with its frozen reference
    responses = ["".join(s) for s in steps]
    assert orm.score_responses(prompts, responses).tolist() == pytest.approx(EXPECTED["orm"], abs=1e-5)
    with pytest.raises(ValueError, match="not a 'orm'"):
        Verifier.from_pretrained(OLD / "pav", kind="orm")


def test_old_lightning_checkpoints_load_into_the_new_modules():
    """Checkpoints kept ``backbone.*`` / ``value_head.*`` at the top; the modules now hold them under ``verifier.``."""
    restored = PAVModule.load_from_checkpoint(OLD / "pav_old_layout.ckpt", weights_only=True)
    for got, want in zip(restored.score_prefixes(EXPECTED["prompts"], EXPECTED["steps"]), EXPECTED["pav"]):
        assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_the_module_and_its_exported_verifier_agree(tmp_path):
    torch.manual_seed(0)
    module = ORMModule(source=TinyPolicy(n_layer=1, n_embd=32, n_head=2), export=False)
    torch.nn.init.normal_(module.verifier.value_head.linear.weight, std=0.5)
    module.save_pretrained(tmp_path / "orm")
    prompts, responses = ["Q1:", "Q2:", "Q3:"], ["ok\n", "", "no\nok\n"]
    loaded = Verifier.from_pretrained(tmp_path / "orm")
    assert isinstance(loaded, Verifier) and not isinstance(loaded, ORMModule)
    assert torch.allclose(loaded.score_responses(prompts, responses), module.score_responses(prompts, responses))


def test_optimizer_and_schedule_are_injected():
    module = PAVModule(
        source=TinyPolicy(n_layer=1, n_embd=32, n_head=2),
        export=False,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1),
    )
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert isinstance(schedule, torch.optim.lr_scheduler.StepLR)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in module.parameters() if p.requires_grad}
    # not in the hyperparameters: checkpoints hold plain types only
    assert "optimizer" not in module.hparams and "lr_scheduler" not in module.hparams


def test_default_optimizer_is_adamw_with_decay_on_matrices_and_warmup_cosine():
    module = PAVModule(
        source=TinyPolicy(n_layer=1, n_embd=32, n_head=2), export=False, lr=0.01, weight_decay=0.1, warmup_steps=2
    )
    configured = module.configure_optimizers()  # no trainer: a one-step schedule
    optimizer = configured["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    decays = {group["weight_decay"]: group["params"] for group in optimizer.param_groups}
    assert all(p.ndim >= 2 for p in decays[0.1]) and all(p.ndim < 2 for p in decays[0.0])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # warm-up cut to the 1-step run: (0 + 1) / 1


@pytest.mark.parametrize("config", ["sft", "orm", "pav", "rl"])
def test_a_config_injects_the_optimizer_through_the_cli(config):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pavlit",
            "fit",
            "--config",
            f"configs/tiny/{config}.yaml",
            "--model.optimizer",
            "torch.optim.SGD",
            "--model.optimizer.lr",
            "0.05",
            "--print_config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: torch.optim.SGD" in out.stdout and "lr: 0.05" in out.stdout
