"""``ORMModule``: the outcome verifier, one score per full response (docs/method.md §4), used for best-of-N.

Same backbone family, heads, LoRA / 4-bit, scale-out and export format as :class:`pavlit.modules.pav.PAVModule`
(shared through :mod:`pavlit.verifier`); the score sits on the last token of the response and the loss is BCE
against the 0/1 outcome. Validation logs ``val/bce``, ``val/auroc``, ``val/accuracy`` and the majority/constant
baseline's ``val/baseline_bce`` and ``val/baseline_accuracy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from pavlit.data.outcomes import outcome_tokens
from pavlit.models.adapters import LoRAArgs, QuantArgs, check_compatible
from pavlit.modules.checks import check_optimisation
from pavlit.policy.sources import ModelSource, TinyPolicy
from pavlit.steps import pad_step_batch
from pavlit.verifier import (
    ConstantBaseline,
    DefinedAUROC,
    accelerator_name,
    as_group,
    as_model_source,
    build_head,
    build_reference,
    configure_adam_warmup_cosine,
    defined_metrics,
    export_init_args,
    export_on_train_end,
    load_backbone,
    load_export_weights,
    masked_bce_with_logits,
    read_export,
    save_verifier,
    score_positions,
    shard_fsdp2,
    source_to_dict,
)

__all__ = ["ORMModule"]


class ORMModule(LightningModule):
    """An outcome verifier: backbone + scoring head on the last token of (question, response), BCE vs 0/1.

    Args:
        source: Where the backbone comes from.
        head_type: ``"linear"``, ``"token"`` or ``"likelihood"`` (see :mod:`pavlit.models.heads`).
        score_token: The scoring token for ``head_type="token"`` (default: EOS).
        lora: LoRA adapters on the backbone (the head always trains fully).
        quant: 4/8-bit loading of the backbone (needs LoRA and a local-folder source).
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        export: Write ``<default_root_dir>/verifier`` and ``metrics.json`` when training ends.
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
    ) -> None:
        check_optimisation("ORMModule", lr, weight_decay, warmup_steps)
        super().__init__()
        self.save_hyperparameters()
        source, lora, quant = as_model_source(source), as_group(lora, LoRAArgs), as_group(quant, QuantArgs)
        self.hparams.update(
            source=source_to_dict(source), lora=dataclasses.asdict(lora), quant=dataclasses.asdict(quant)
        )
        self.lora, self.quant = lora, quant
        self.backbone, self.tokenizer = load_backbone(source, lora, quant)
        self.value_head = build_head(head_type, self.backbone.config.hidden_size, self.tokenizer, score_token)
        self.reference = build_reference(self.backbone, head_type)
        self.val_bce = MeanMetric()
        self.val_auroc = DefinedAUROC()
        self.val_accuracy = BinaryAccuracy()
        self.val_baseline = ConstantBaseline()
        self._sharded = False

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the backbone is configured for."""
        return getattr(self.backbone.config, "max_position_embeddings", None)

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
        return score_positions(
            self.backbone, self.value_head, input_ids, attention_mask, positions, prompt_end, self.reference
        )[:, 0]

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
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1
        return configure_adam_warmup_cosine(
            self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps, int(total)
        )

    def setup(self, stage: str) -> None:
        check_compatible(
            self.lora,
            self.quant,
            precision=self.trainer.precision,
            training=stage == "fit",
            accelerator=accelerator_name(self.trainer),
        )

    def configure_model(self) -> None:
        if self.device_mesh is None or self._sharded:
            return
        if self.quant.enabled:
            raise ValueError("FSDP2 sharding of a 4/8-bit backbone is not supported; use DDP with quant.mode")
        shard_fsdp2(self.backbone, self.value_head, self.device_mesh)
        self._sharded = True

    def on_train_end(self) -> None:
        if self.hparams.export:
            export_on_train_end(self, "orm")

    # --- inference API (best-of-N) ------------------------------------------------------------------------------

    @torch.no_grad()
    def score_responses(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """P(correct) of each full response, ``[N]`` float32 on CPU.

        Args:
            prompts: The questions.
            responses: The full responses (same length as ``prompts``).
            batch_size: Responses per forward pass.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        tokens = [outcome_tokens(p, r, self.tokenizer) for p, r in zip(prompts, responses)]
        limit = self.max_positions
        for item in tokens:
            if item.prefix_ends[-1] < 0:
                raise ValueError("an empty prompt and response with no BOS token cannot be scored")
            if limit is not None and len(item.input_ids) > limit:
                raise ValueError(f"a response is {len(item.input_ids)} tokens, more than the model's {limit} positions")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i].input_ids))
        scores = torch.empty(len(tokens))
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = pad_step_batch([tokens[i] for i in rows], pad, side="right")
                last = torch.tensor([len(tokens[i].step_ends) for i in rows])
                positions = batch.prefix_positions.gather(1, last[:, None])
                logits = self(
                    batch.input_ids.to(self.device),
                    batch.attention_mask.to(self.device),
                    positions.to(self.device),
                    batch.prompt_end.to(self.device),
                )
                scores[rows] = torch.sigmoid(logits).float().cpu()
                if not torch.isfinite(scores[rows]).all():
                    raise FloatingPointError("the outcome verifier returned NaN scores (are its weights finite?)")
        finally:
            self.train(was_training)
        return scores

    # --- export ------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the same folder format as :meth:`PAVModule.save_pretrained` (kind ``"orm"``)."""
        settings = {
            "head_type": self.hparams.head_type,
            "score_token": self.hparams.score_token,
            "source": self.hparams.source,
            "lora": self.hparams.lora,
            "quant": self.hparams.quant,
        }
        return save_verifier(
            path, "orm", self.backbone, self.tokenizer, self.value_head, settings, state_dict, self.reference
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ORMModule:
        """Reload a folder written by :meth:`save_pretrained`, in eval mode."""
        meta = read_export(path, "orm")
        module = cls(**{**export_init_args(path, meta), **overrides})
        load_export_weights(path, meta, module.backbone, module.value_head, module.reference)
        return module.eval()
