"""Scoring a backbone at token positions: build a head, one forward pass, one logit per position.

The decoder gives the last hidden state and only the requested rows go through the head (the vocabulary-sized
output layer runs only for the ``"likelihood"`` head's features, which a :class:`FrozenReference` supplies).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pavlit.models.heads import HEAD_TYPES, LikelihoodHead, TokenHead, ValueHead

__all__ = [
    "FrozenReference",
    "build_head",
    "build_reference",
    "decoder_of",
    "likelihood_features",
    "reference_features",
    "score_positions",
    "token_logprobs",
]


def build_head(head_type: str, hidden_size: int, tokenizer: Any, score_token: str | None) -> nn.Module:
    """A :class:`ValueHead` (``"linear"``), :class:`LikelihoodHead` (``"likelihood"``) or :class:`TokenHead`
    (``"token"``, ``score_token`` or EOS)."""
    if head_type == "linear":
        return ValueHead(hidden_size)
    if head_type == "likelihood":
        return LikelihoodHead(hidden_size)
    if head_type != "token":
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    token = score_token if score_token is not None else tokenizer.eos_token
    ids = tokenizer.convert_tokens_to_ids([token]) if token is not None else [None]
    if token is None or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"score_token {token!r} is not one token of the tokenizer's vocabulary")
    return TokenHead(int(ids[0]))


def decoder_of(backbone: nn.Module) -> nn.Module:
    """The decoder stack (no LM head) of a causal LM, through a peft wrapper if there is one."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return base.get_decoder()


def score_positions(
    backbone: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    response_start: torch.Tensor | None = None,
    reference: nn.Module | None = None,
) -> torch.Tensor:
    """One logit per requested token position, from one forward pass of the backbone.

    The decoder (without the LM head) gives the last hidden state; only the ``positions`` rows go through the head,
    so a 262k-vocabulary output layer is never computed (except by a :class:`LikelihoodHead`, which needs every
    token's log-probability).

    Args:
        backbone: A Hugging Face causal LM (optionally a peft model).
        head: A :class:`ValueHead`, :class:`LikelihoodHead` or :class:`TokenHead`.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        positions: ``[B, K]`` token positions (e.g. ``StepBatch.prefix_positions``).
        response_start: ``[B]`` position of the question's last token (``StepBatch.prompt_end``); the likelihood
            features cover the tokens after it. Default: ``positions[:, 0]`` (the question-only prefix, as in
            ``prefix_positions``).
        reference: The frozen model whose likelihoods a :class:`LikelihoodHead` reads (:class:`FrozenReference`);
            ``None`` reads them from the backbone with its LoRA adapters switched off.

    Returns:
        ``[B, K]`` float32 logits.
    """
    from pavlit.steps import gather_positions

    hidden = decoder_of(backbone)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = gather_positions(hidden, positions)
    if isinstance(head, LikelihoodHead):
        start = positions[:, 0] if response_start is None else response_start
        features = reference_features(backbone, reference, input_ids, attention_mask, positions, start)
        return head(picked, features).float()
    output_weight = backbone.get_output_embeddings().weight if isinstance(head, TokenHead) else None
    return head(picked, output_weight).float()


class FrozenReference(nn.Module):
    """A frozen copy of the policy the verifier starts from: the source of a :class:`LikelihoodHead`'s features.

    Fine-tuning the backbone without a language-model loss wrecks its next-token distribution within a hundred
    steps, and features read from it lose their signal (measured on the tiny default: val AUROC 0.63 with features
    from the live backbone vs 0.88 from this copy). The copy never trains and stays in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenReference:
        return super().train(False)


def build_reference(backbone: nn.Module, head_type: str) -> FrozenReference | None:
    """The :class:`FrozenReference` a ``"likelihood"`` head needs, or ``None`` (other heads; LoRA backbones, whose
    base model is the reference once the adapters are switched off)."""
    import copy

    from peft import PeftModel

    if head_type != "likelihood" or isinstance(backbone, PeftModel):
        return None
    return FrozenReference(copy.deepcopy(backbone))


@torch.no_grad()
def reference_features(
    backbone: nn.Module,
    reference: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    response_start: torch.Tensor,
) -> torch.Tensor:
    """:func:`likelihood_features` under the reference model (one extra forward pass without gradient)."""
    import contextlib

    if reference is not None:
        model = reference.model if isinstance(reference, FrozenReference) else reference
        if model.training:  # Lightning restores train/eval flags module by module, bypassing train()
            model.eval()
        context: Any = contextlib.nullcontext()
    elif hasattr(backbone, "disable_adapter"):
        model, context = backbone, backbone.disable_adapter()
    else:
        raise ValueError("a 'likelihood' head needs a reference model (build_reference) or a LoRA backbone")
    with context:
        hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return likelihood_features(model, hidden.last_hidden_state, input_ids, positions, response_start)


@torch.no_grad()
def token_logprobs(
    backbone: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, max_values: int = 1 << 25
) -> torch.Tensor:
    """``[B, T]`` log-probability of each token given the ones before it (column 0, which has none, is 0).

    The output projection runs in slices of the sequence so that ``B × slice × vocab`` stays under ``max_values``.
    """
    output = backbone.get_output_embeddings()
    rows, width = input_ids.shape
    result = torch.zeros(rows, width, dtype=torch.float32, device=input_ids.device)
    vocab = output.weight.shape[0]
    step = max(1, max_values // max(1, rows * vocab))
    for begin in range(0, width - 1, step):
        end = min(width - 1, begin + step)
        logits = output(hidden[:, begin:end]).float()
        targets = input_ids[:, begin + 1 : end + 1]
        picked = logits.gather(-1, targets[..., None]).squeeze(-1)
        result[:, begin + 1 : end + 1] = picked - logits.logsumexp(-1)
    return result


def likelihood_features(
    backbone: nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    response_start: torch.Tensor,
) -> torch.Tensor:
    """``[B, K, 4]`` features of the response tokens up to each position (no gradient).

    For the prefix ending at ``positions[:, k]``: the min and the sum of token log-probs over the response tokens
    ``(response_start, positions[:, k]]``, then the same over its last segment ``(positions[:, k-1],
    positions[:, k]]`` (``(response_start, positions[:, 0]]`` for ``k = 0``). Empty ranges (the question-only
    prefix, padded steps) give 0.
    """
    logprobs = token_logprobs(backbone, hidden, input_ids)  # [B, T]
    index = torch.arange(input_ids.shape[1], device=input_ids.device)[None, None, :]
    end = positions[..., None]
    start = response_start.to(positions.device)[:, None, None]
    previous = torch.cat([response_start.to(positions.device)[:, None], positions[:, :-1]], dim=1)[..., None]
    values = logprobs[:, None, :]
    features = []
    for low in (start, torch.maximum(previous, start)):
        inside = (index > low) & (index <= end)
        masked = torch.where(inside, values, torch.zeros_like(values))
        features += [masked.amin(-1), masked.sum(-1)]
    return torch.stack(features, dim=-1)
