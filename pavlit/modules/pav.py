"""``PAVModule``: the process verifier, a model of ``Q^π(prefix)`` trained on Monte-Carlo step labels (method.md §4).

Every Best-of-K prover's values and advantages follow from this one model (``Q^μ = 1 − (1 − Q^π)^K``, advantages
as consecutive differences), so search and RL call :meth:`PAVModule.score_prefixes` and
:meth:`PAVModule.q_and_advantages`.

Training reads batches from :class:`pavlit.data.step_labels.StepLabelDataModule`: one row per seed rollout, the
soft label ``q_mc`` at each prefix's end token. The loss is binary cross-entropy against the **soft** label
(class-balance weights from the DataModule); validation logs ``val/bce``, ``val/mse``, ``val/calibration`` (ECE
against the MC labels), ``val/auroc`` (each prefix's score predicting its rollout's final outcome) and the
best constant predictor's ``val/baseline_bce`` / ``val/baseline_mse``, so "beats the constant mean" is in the logs.

Scale-out: DDP as usual; ``strategy: fsdp`` on GPUs; on CPU, ``ModelParallelStrategy(data_parallel_size=N)``
shards with FSDP2 in :meth:`configure_model`. Multi-node: ``--trainer.num_nodes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric, MeanSquaredError

from pavlit.interfaces import Prover
from pavlit.models.adapters import LoRAArgs, QuantArgs, check_compatible
from pavlit.modules.checks import check_optimisation
from pavlit.policy.sources import ModelSource, TinyPolicy
from pavlit.steps import StepTokens, pad_step_batch, step_end_token_indices
from pavlit.values import advantages
from pavlit.verifier import (
    ConstantBaseline,
    DefinedAUROC,
    SoftCalibrationError,
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
        lr: Peak learning rate (AdamW; Adam when ``weight_decay`` is 0).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay over the rest of training.
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
        check_optimisation("PAVModule", lr, weight_decay, warmup_steps)
        super().__init__()
        self.save_hyperparameters()
        source, lora, quant = as_model_source(source), as_group(lora, LoRAArgs), as_group(quant, QuantArgs)
        # Plain types only, so that checkpoints load with torch.load(weights_only=True).
        self.hparams.update(
            source=source_to_dict(source), lora=dataclasses.asdict(lora), quant=dataclasses.asdict(quant)
        )
        self.lora, self.quant = lora, quant
        self.backbone, self.tokenizer = load_backbone(source, lora, quant)
        self.value_head = build_head(head_type, self.backbone.config.hidden_size, self.tokenizer, score_token)
        self.reference = build_reference(self.backbone, head_type)
        self.val_bce = MeanMetric()
        self.val_mse = MeanSquaredError()
        self.val_calibration = SoftCalibrationError()
        self.val_auroc = DefinedAUROC()
        self.val_baseline = ConstantBaseline()
        self._sharded = False

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the backbone is configured for (the DataModule caps ``max_length`` at it)."""
        return getattr(self.backbone.config, "max_position_embeddings", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` logits of ``Q^π`` at the token ``positions`` (``σ(logit)`` is the predicted value)."""
        return score_positions(
            self.backbone, self.value_head, input_ids, attention_mask, positions, reference=self.reference
        )

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
            export_on_train_end(self, "pav")

    # --- inference API (search, RL) ----------------------------------------------------------------------------

    @torch.no_grad()
    def score_prefixes(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]], batch_size: int = 64
    ) -> list[torch.Tensor]:
        """``Q^π`` of every prefix ``h = 0..H`` of each response, one forward pass per response.

        Args:
            prompts: The questions.
            steps: Each response's steps (as :func:`pavlit.steps.split_steps` returns them; may be empty).
            batch_size: Responses per forward pass.

        Returns:
            One float32 CPU tensor ``[H_i + 1]`` per response: column 0 the question-only prefix, column ``h``
            the prefix that ends with step ``h``.
        """
        if len(prompts) != len(steps):
            raise ValueError(f"got {len(prompts)} prompts but {len(steps)} step lists")
        tokens = [self._tokenise(prompt, list(item)) for prompt, item in zip(prompts, steps)]
        scores = self._score_tokens(tokens, batch_size)
        return [row[: len(item) + 1] for row, item in zip(scores, steps)]

    def q_and_advantages(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]], prover: Prover, batch_size: int = 64
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(Q^π, Q^μ, A^μ)`` per response: values ``[H + 1]``, prover values ``[H + 1]``, advantages ``[H]``.

        ``Q^μ`` comes from ``prover.q_values`` (the analytic Best-of-K transform for ``BestOfK``), called once on
        every prefix of every response (flattened, with the prefixes' steps and prompts for provers that need them);
        ``A^μ = Q^μ[1:] − Q^μ[:-1]`` (:func:`pavlit.values.advantages`).
        """
        q_pi = self.score_prefixes(prompts, steps, batch_size)
        if not q_pi:
            return [], [], []
        prefixes = [list(item[:h]) for item in steps for h in range(len(item) + 1)]
        prefix_prompts = [prompt for prompt, item in zip(prompts, steps) for _ in range(len(item) + 1)]
        q_mu_flat = prover.q_values(torch.cat(q_pi), prefixes, prefix_prompts)
        q_mu = list(torch.split(q_mu_flat, [len(q) for q in q_pi]))
        return q_pi, q_mu, [advantages(q) for q in q_mu]

    def _tokenise(self, prompt: str, steps: list[str]) -> StepTokens:
        tokens = step_end_token_indices(prompt, steps, self.tokenizer)
        if tokens.prompt_end < 0:
            raise ValueError("the question-only prefix has no token (empty prompt and no BOS); it cannot be scored")
        limit = self.max_positions
        if limit is not None and len(tokens.input_ids) > limit:
            raise ValueError(f"a response is {len(tokens.input_ids)} tokens, more than the model's {limit} positions")
        return tokens

    def _score_tokens(self, tokens: list[StepTokens], batch_size: int) -> list[torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i].input_ids))  # less padding per batch
        results: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = pad_step_batch([tokens[i] for i in rows], pad, side="right")
                logits = self(
                    batch.input_ids.to(self.device),
                    batch.attention_mask.to(self.device),
                    batch.prefix_positions.to(self.device),
                )
                values = torch.sigmoid(logits).float().cpu()
                if not torch.isfinite(values).all():
                    raise FloatingPointError("the process verifier returned NaN scores (are its weights finite?)")
                for row, index in enumerate(rows):
                    results[index] = values[row]
        finally:
            self.train(was_training)
        return results

    # --- export ------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write a Hugging Face folder (backbone, or LoRA adapter) + ``value_head.safetensors`` +
        ``pavlit_verifier.json``; :meth:`from_pretrained` reloads it.

        Args:
            path: Output folder.
            state_dict: A full state dict of this module when its parameters are sharded (FSDP).
        """
        settings = {
            "head_type": self.hparams.head_type,
            "score_token": self.hparams.score_token,
            "source": self.hparams.source,
            "lora": self.hparams.lora,
            "quant": self.hparams.quant,
        }
        return save_verifier(
            path, "pav", self.backbone, self.tokenizer, self.value_head, settings, state_dict, self.reference
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> PAVModule:
        """Reload a folder written by :meth:`save_pretrained`, in eval mode.

        Args:
            path: The folder.
            **overrides: Constructor arguments to change (e.g. ``lr`` to keep training).
        """
        meta = read_export(path, "pav")
        module = cls(**{**export_init_args(path, meta), **overrides})
        load_export_weights(path, meta, module.backbone, module.value_head, module.reference)
        return module.eval()
