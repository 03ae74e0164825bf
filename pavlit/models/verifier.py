"""``Verifier``: the inference model of a process (``"pav"``) or outcome (``"orm"``) verifier.

Backbone + scoring head (+ the frozen reference a ``"likelihood"`` head reads), a plain ``nn.Module``: search,
rewards, provers and RL advantages load it with :meth:`Verifier.from_pretrained` and never import training code.
:class:`pavlit.modules.pav.PAVModule` and :class:`pavlit.modules.orm.ORMModule` wrap one for training (loss,
metrics, optimizer) and export it with :meth:`Verifier.save_pretrained` (format: :mod:`pavlit.models.export`).

Scoring (docs/method.md §4): a PAV scores every prefix ``h = 0..H`` of a response in one forward pass, reading
``σ(logit)`` at each step's last token; an ORM scores the response's last token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pavlit.interfaces import Prover
from pavlit.models.adapters import LoRAArgs, QuantArgs
from pavlit.models.backbone import as_group, as_model_source, load_backbone, source_to_dict
from pavlit.models.export import export_init_args, load_export_weights, read_export, save_verifier
from pavlit.models.scoring import build_head, build_reference, score_positions
from pavlit.policy.sources import ModelSource
from pavlit.steps import StepTokens, outcome_tokens, pad_id_of, pad_step_batch, step_end_token_indices
from pavlit.values import advantages

__all__ = ["KINDS", "Verifier"]

KINDS = ("pav", "orm")


class Verifier(nn.Module):
    """A verifier's backbone and head, scoring prefixes (PAV) or whole responses (ORM).

    Build one with :meth:`build` (from a model source, for training) or :meth:`from_pretrained` (an exported
    folder, for inference).

    Args:
        kind: ``"pav"`` (values of step prefixes) or ``"orm"`` (P(correct) of a full response).
        backbone: A Hugging Face causal LM (a peft model when trained with LoRA).
        tokenizer: Its tokenizer.
        value_head: The scoring head (:mod:`pavlit.models.heads`).
        reference: The frozen reference of a ``"likelihood"`` head, or None.
        settings: Plain-typed settings the export records (``head_type``, ``score_token``, ``source``, ``lora``,
            ``quant``).
    """

    def __init__(
        self,
        kind: str,
        backbone: nn.Module,
        tokenizer: Any,
        value_head: nn.Module,
        reference: nn.Module | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        super().__init__()
        self.kind = kind
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.value_head = value_head
        self.reference = reference
        self.settings = dict(settings or {})

    @classmethod
    def build(
        cls,
        kind: str,
        source: ModelSource | Mapping[str, Any],
        head_type: Literal["linear", "token", "likelihood"] = "linear",
        score_token: str | None = None,
        lora: LoRAArgs | Mapping[str, Any] | None = None,
        quant: QuantArgs | Mapping[str, Any] | None = None,
    ) -> Verifier:
        """A fresh verifier: the backbone from ``source`` (with LoRA / 4-bit), a new head, a reference if needed."""
        source, lora, quant = as_model_source(source), as_group(lora, LoRAArgs), as_group(quant, QuantArgs)
        backbone, tokenizer = load_backbone(source, lora, quant)
        head = build_head(head_type, backbone.config.hidden_size, tokenizer, score_token)
        settings = {
            "head_type": head_type,
            "score_token": score_token,
            "source": source_to_dict(source),
            "lora": dataclasses.asdict(lora),
            "quant": dataclasses.asdict(quant),
        }
        return cls(kind, backbone, tokenizer, head, build_reference(backbone, head_type), settings)

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return next(self.parameters()).device

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
        """``[B, K]`` logits at the token ``positions`` (``σ(logit)`` is the score).

        ``prompt_end`` ``[B]`` (the question's last token) is where the response starts; only the ``"likelihood"``
        head needs it (default: ``positions[:, 0]``).
        """
        return score_positions(
            self.backbone, self.value_head, input_ids, attention_mask, positions, prompt_end, self.reference
        )

    # --- process verifier ----------------------------------------------------------------------------------------

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
        tokens = [self._prefix_tokens(prompt, list(item)) for prompt, item in zip(prompts, steps)]
        scores = self._score(tokens, batch_size, last_only=False)
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

    # --- outcome verifier ----------------------------------------------------------------------------------------

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
        for item in tokens:
            if item.prefix_ends[-1] < 0:
                raise ValueError("an empty prompt and response with no BOS token cannot be scored")
            self._check_length(item)
        scores = self._score(tokens, batch_size, last_only=True)
        return torch.stack(scores) if scores else torch.empty(0)

    # --- shared ----------------------------------------------------------------------------------------------

    def _prefix_tokens(self, prompt: str, steps: list[str]) -> StepTokens:
        tokens = step_end_token_indices(prompt, steps, self.tokenizer)
        if tokens.prompt_end < 0:
            raise ValueError("the question-only prefix has no token (empty prompt and no BOS); it cannot be scored")
        self._check_length(tokens)
        return tokens

    def _check_length(self, tokens: StepTokens) -> None:
        limit = self.max_positions
        if limit is not None and len(tokens.input_ids) > limit:
            raise ValueError(f"a response is {len(tokens.input_ids)} tokens, more than the model's {limit} positions")

    def _score(self, tokens: list[StepTokens], batch_size: int, last_only: bool) -> list[torch.Tensor]:
        """σ(logits) per item, in eval mode, shortest first (less padding per batch): every prefix's score, or
        (``last_only``) the score at the last step end, as a 0-d tensor."""
        pad = pad_id_of(self.tokenizer)
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i].input_ids))
        results: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
        was_training, device = self.training, self.device
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = pad_step_batch([tokens[i] for i in rows], pad, side="right")
                positions = batch.prefix_positions
                if last_only:
                    last = torch.tensor([len(tokens[i].step_ends) for i in rows])
                    positions = positions.gather(1, last[:, None])
                logits = self(
                    batch.input_ids.to(device),
                    batch.attention_mask.to(device),
                    positions.to(device),
                    batch.prompt_end.to(device) if last_only else None,
                )
                values = torch.sigmoid(logits).float().cpu()
                if not torch.isfinite(values).all():
                    name = "outcome" if self.kind == "orm" else "process"
                    raise FloatingPointError(f"the {name} verifier returned NaN scores (are its weights finite?)")
                for row, index in enumerate(rows):
                    results[index] = values[row, 0] if last_only else values[row]
        finally:
            self.train(was_training)
        return results

    # --- export ------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write the verifier folder (:mod:`pavlit.models.export`); :meth:`from_pretrained` reloads it.

        Args:
            path: Output folder.
            state_dict: A full state dict of this module (keys ``backbone.*``, ``value_head.*``) when its
                parameters are sharded (FSDP); None reads the modules themselves.
        """
        return save_verifier(
            path, self.kind, self.backbone, self.tokenizer, self.value_head, self.settings, state_dict, self.reference
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, kind: str | None = None, device: torch.device | str | None = None, **overrides: Any
    ) -> Verifier:
        """Reload a folder written by :meth:`save_pretrained`, in eval mode with gradients off.

        Args:
            path: The folder.
            kind: ``"pav"`` or ``"orm"`` to insist on one (a clear error names the folder otherwise); None takes
                what the folder holds.
            device: Where to put it (default: CPU).
            **overrides: :meth:`build` arguments to change, e.g. ``source=Pretrained(path, trust_remote_code=True)``.
        """
        meta = read_export(path, kind)
        verifier = cls.build(meta["kind"], **{**export_init_args(path, meta), **overrides})
        load_export_weights(path, meta, verifier.backbone, verifier.value_head, verifier.reference)
        verifier.requires_grad_(False)
        if device is not None:
            verifier.to(device)
        return verifier.eval()
