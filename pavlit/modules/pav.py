"""``PAVModule``: trains the process verifier, a model of ``Q^π(prefix)`` on Monte-Carlo step labels (method.md §4).

The model is a :class:`pavlit.models.verifier.Verifier` (``self.verifier``): what search, rewards, provers and
RL load from the export. Every Best-of-K prover's values and advantages follow from it (``Q^μ = 1 − (1 − Q^π)^K``,
advantages as consecutive differences; :meth:`score_prefixes`, :meth:`q_and_advantages`).

Training reads batches from :class:`pavlit.data.step_labels.StepLabelDataModule`: one row per seed rollout, the
soft label ``q_mc`` at each prefix's end token. The loss is binary cross-entropy against the **soft** label
(class-balance weights from the DataModule); validation logs ``val/bce``, ``val/mse``, ``val/calibration`` (ECE
against the MC labels), ``val/auroc`` (each prefix's score predicting its rollout's final outcome) and the
best constant predictor's ``val/baseline_bce`` / ``val/baseline_mse``, so "beats the constant mean" is in the logs.

Scale-out: DDP as usual; ``strategy: fsdp`` on GPUs; on CPU, ``ModelParallelStrategy(data_parallel_size=N)``
shards with FSDP2 in :meth:`configure_model`. Multi-node: ``--trainer.num_nodes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric, MeanSquaredError

from pavlit.interfaces import Prover
from pavlit.models.adapters import LoRAArgs, QuantArgs
from pavlit.modules.checks import check_optimisation
from pavlit.modules.losses import masked_bce_with_logits
from pavlit.modules.metrics import ConstantBaseline, DefinedAUROC, SoftCalibrationError, defined_metrics
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

__all__ = ["PAVModule"]


class PAVModule(LightningModule):
    """A process (Q-value) verifier: backbone + scoring head, BCE against soft Monte-Carlo labels.

    Args:
        source: Where the backbone comes from (the tiny in-code model, a local folder such as the SFT'd policy, or
            Gemma 3 270M).
        head_type: ``"linear"`` (a linear head on the last hidden state at each step end), ``"token"`` (the
            paper's scoring-token logit read from the LM head) or ``"likelihood"`` (the linear head plus the
            backbone's own token log-likelihoods of the prefix; see :mod:`pavlit.models.heads`).
        score_token: The scoring token for ``head_type="token"`` (default: the tokenizer's EOS token).
        lora: LoRA adapters on the backbone (the head always trains fully).
        quant: 4/8-bit loading of the backbone (needs LoRA and a local-folder source).
        lr: Peak learning rate of the default optimizer (AdamW; Adam when ``weight_decay`` is 0).
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: Linear warm-up steps before the default cosine decay over the rest of training.
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
        check_optimisation("PAVModule", lr, weight_decay, warmup_steps)
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        init_verifier_module(self, "pav", source, head_type, score_token, lora, quant)
        self.val_bce = MeanMetric()
        self.val_mse = MeanSquaredError()
        self.val_calibration = SoftCalibrationError()
        self.val_auroc = DefinedAUROC()
        self.val_baseline = ConstantBaseline()

    @property
    def tokenizer(self) -> Any:
        """The verifier's tokenizer."""
        return self.verifier.tokenizer

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the backbone is configured for (the DataModule caps ``max_length`` at it)."""
        return self.verifier.max_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` logits of ``Q^π`` at the token ``positions`` (``σ(logit)`` is the predicted value)."""
        return self.verifier(input_ids, attention_mask, positions)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["positions"])
        loss = masked_bce_with_logits(logits, batch["q"], batch["label_mask"], batch["weight"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["positions"])
        mask = batch["label_mask"]
        logits, q, outcome = logits[mask], batch["q"][mask], batch["outcome"][mask]
        q_hat = torch.sigmoid(logits)
        self.val_bce.update(F.binary_cross_entropy_with_logits(logits, q, reduction="none"))
        self.val_mse.update(q_hat, q)
        self.val_calibration.update(q_hat, q)
        self.val_auroc.update(q_hat, outcome.long())
        self.val_baseline.update(q)

    def on_validation_epoch_end(self) -> None:
        metrics = [self.val_bce, self.val_mse, self.val_calibration, self.val_auroc, self.val_baseline]
        baseline = self.val_baseline.compute()
        if float(self.val_baseline.count) > 0:
            bce = self.val_bce.compute()
            values = {
                "val/bce": bce,
                "val/mse": self.val_mse.compute(),
                "val/calibration": self.val_calibration.compute(),
                "val/auroc": self.val_auroc.compute(),
                "val/baseline_bce": baseline["bce"],
                "val/baseline_mse": baseline["mse"],
                "val/bce_gain": baseline["bce"] - bce,
            }
            self.log_dict(defined_metrics(values), prog_bar=False)
        for metric in metrics:
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self)

    def setup(self, stage: str) -> None:
        check_setup(self, stage)

    def configure_model(self) -> None:
        shard_verifier(self)

    def on_train_end(self) -> None:
        if self.hparams.export:
            export_on_train_end(self, "pav")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_state_dict(checkpoint)

    # --- scoring, through the Verifier -----------------------------------------------------------------------

    def score_prefixes(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]], batch_size: int = 64
    ) -> list[torch.Tensor]:
        """:meth:`pavlit.models.verifier.Verifier.score_prefixes` of the model being trained."""
        return self.verifier.score_prefixes(prompts, steps, batch_size)

    def q_and_advantages(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]], prover: Prover, batch_size: int = 64
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`pavlit.models.verifier.Verifier.q_and_advantages` of the model being trained."""
        return self.verifier.q_and_advantages(prompts, steps, prover, batch_size)

    # --- export ------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Export the verifier (:meth:`pavlit.models.verifier.Verifier.save_pretrained`).

        Args:
            path: Output folder.
            state_dict: A full state dict of this module when its parameters are sharded (FSDP).
        """
        return self.verifier.save_pretrained(path, verifier_state_dict(state_dict))

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> PAVModule:
        """Rebuild the module from an exported folder to train it further, in eval mode; for inference load a
        :class:`pavlit.models.verifier.Verifier` instead.

        Args:
            path: The folder.
            **overrides: Constructor arguments to change (e.g. ``lr``).
        """
        return load_verifier_module(cls, "pav", path, overrides)
