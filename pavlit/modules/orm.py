"""``ORMModule``: trains the outcome verifier, one score per full response (docs/method.md §4), used for best-of-N.

The model is a :class:`pavlit.models.verifier.Verifier` of kind ``"orm"`` (``self.verifier``): same backbone
family, heads, LoRA / 4-bit, scale-out and export format as :class:`pavlit.modules.pav.PAVModule`; the score
sits on the last token of the response and the loss is BCE against the 0/1 outcome. Validation logs
``val/bce``, ``val/auroc``, ``val/accuracy`` and the majority/constant baseline's ``val/baseline_bce`` and
``val/baseline_accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from pavlit.models.adapters import LoRAArgs, QuantArgs
from pavlit.modules.checks import check_optimisation
from pavlit.modules.losses import masked_bce_with_logits
from pavlit.modules.metrics import ConstantBaseline, DefinedAUROC, defined_metrics
from pavlit.modules.optim import LRSchedulerCallable, OptimizerCallable, configure_optimization
from pavlit.modules.verifier_fit import (
    check_setup,
    export_on_train_end,
    init_verifier_module,
    load_verifier_module,
    shard_verifier,
    upgrade_state_dict,
    verifier_state_dict,
)
from pavlit.policy.sources import ModelSource, TinyPolicy

__all__ = ["ORMModule"]


class ORMModule(LightningModule):
    """An outcome verifier: backbone + scoring head on the last token of (question, response), BCE vs 0/1.

    Args:
        source: Where the backbone comes from.
        head_type: ``"linear"``, ``"token"`` or ``"likelihood"`` (see :mod:`pavlit.models.heads`).
        score_token: The scoring token for ``head_type="token"`` (default: EOS).
        lora: LoRA adapters on the backbone (the head always trains fully).
        quant: 4/8-bit loading of the backbone (needs LoRA and a local-folder source).
        lr: Peak learning rate of the default optimizer (AdamW).
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: Linear warm-up steps before the default cosine decay.
        export: Write ``<default_root_dir>/verifier`` and ``metrics.json`` when training ends.
        optimizer: Builds another optimizer from the parameters (see :mod:`pavlit.modules.optim`).
        lr_scheduler: Builds another schedule from the optimizer, stepped every optimizer step.
    """

    def __init__(
        self,
        source: ModelSource = TinyPolicy(),  # noqa: B008 - an immutable description, not a model
        head_type: Literal["linear", "token", "likelihood"] = "linear",
        score_token: str | None = None,
        lora: LoRAArgs = LoRAArgs(),  # noqa: B008
        quant: QuantArgs = QuantArgs(),  # noqa: B008
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        export: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_optimisation("ORMModule", lr, weight_decay, warmup_steps)
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        init_verifier_module(self, "orm", source, head_type, score_token, lora, quant)
        self.val_bce = MeanMetric()
        self.val_auroc = DefinedAUROC()
        self.val_accuracy = BinaryAccuracy()
        self.val_baseline = ConstantBaseline()

    @property
    def tokenizer(self) -> Any:
        """The verifier's tokenizer."""
        return self.verifier.tokenizer

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the backbone is configured for."""
        return self.verifier.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        prompt_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B]`` logits of P(correct), read at ``positions`` ``[B, 1]`` (the response's last token).

        ``prompt_end`` ``[B]`` (the question's last token) is where the response starts; only the
        ``"likelihood"`` head needs it.
        """
        return self.verifier(input_ids, attention_mask, positions, prompt_end)[:, 0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["positions"], batch.get("prompt_end"))
        mask = torch.ones_like(batch["label"], dtype=torch.bool)
        loss = masked_bce_with_logits(logits, batch["label"], mask, batch["weight"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["positions"], batch.get("prompt_end"))
        label = batch["label"]
        self.val_bce.update(F.binary_cross_entropy_with_logits(logits, label, reduction="none"))
        self.val_auroc.update(torch.sigmoid(logits), label.long())
        self.val_accuracy.update(torch.sigmoid(logits), label.long())
        self.val_baseline.update(label)

    def on_validation_epoch_end(self) -> None:
        baseline = self.val_baseline.compute()
        if float(self.val_baseline.count) > 0:
            bce = self.val_bce.compute()
            values = {
                "val/bce": bce,
                "val/auroc": self.val_auroc.compute(),
                "val/accuracy": self.val_accuracy.compute(),
                "val/baseline_bce": baseline["bce"],
                "val/baseline_accuracy": baseline["accuracy"],
                "val/bce_gain": baseline["bce"] - bce,
            }
            self.log_dict(defined_metrics(values))
        for metric in (self.val_bce, self.val_auroc, self.val_accuracy, self.val_baseline):
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self)

    def setup(self, stage: str) -> None:
        check_setup(self, stage)

    def configure_model(self) -> None:
        shard_verifier(self)

    def on_train_end(self) -> None:
        if self.hparams.export:
            export_on_train_end(self, "orm")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_state_dict(checkpoint)

    def score_responses(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """:meth:`pavlit.models.verifier.Verifier.score_responses` of the model being trained."""
        return self.verifier.score_responses(prompts, responses, batch_size)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Export the verifier (same folder format as :meth:`PAVModule.save_pretrained`, kind ``"orm"``)."""
        return self.verifier.save_pretrained(path, verifier_state_dict(state_dict))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ORMModule:
        """Rebuild the module from an exported folder to train it further, in eval mode."""
        return load_verifier_module(cls, "orm", path, overrides)
