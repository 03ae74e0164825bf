"""Training losses and label weights of the verifiers (docs/method.md §4) and the SFT policy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pavlit.data.sft import IGNORE_INDEX

__all__ = ["balance_weights", "causal_lm_loss", "masked_bce_with_logits"]


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean of binary cross-entropy with **soft** targets over the masked positions.

    ``sum(w · bce(logit, q)) / sum(w)`` over positions where ``mask`` is True; ``bce(l, q) = −q log σ(l) − (1 − q)
    log(1 − σ(l))``, so a target of 0.3 is a soft label, never rounded. Returns 0 (with a gradient path) when no
    position is selected, so an all-masked batch is a no-op rather than a NaN.

    Args:
        logits: ``[...]`` scores.
        targets: ``[...]`` labels in [0, 1] (anything at masked positions).
        mask: ``[...]`` bool, True where a label exists.
        weight: ``[...]`` non-negative per-position weights (class balance); None means 1.
    """
    mask = mask.bool()
    w = mask.to(logits.dtype) if weight is None else weight.to(logits.dtype) * mask
    safe_targets = torch.where(mask, targets.to(logits.dtype), torch.zeros_like(logits))
    losses = F.binary_cross_entropy_with_logits(logits, safe_targets, reduction="none")
    total = w.sum()
    return (losses * w).sum() / total.clamp(min=torch.finfo(logits.dtype).tiny)


def balance_weights(n_low: int, n_high: int) -> tuple[float, float]:
    """Per-label weights that give the two classes (q < 0.5, q ≥ 0.5) equal total weight (docs/method.md §4).

    ``w_c = N / (2 · n_c)``: the weights average to 1 over the data, and each class then carries half of the loss,
    which is what class-balanced sampling gives in expectation. A class that is absent leaves both weights at 1.
    """
    if n_low < 0 or n_high < 0:
        raise ValueError("class counts must be non-negative")
    if n_low == 0 or n_high == 0:
        return 1.0, 1.0
    total = n_low + n_high
    return total / (2 * n_low), total / (2 * n_high)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the positions whose label is not ``IGNORE_INDEX``.

    Args:
        logits: ``[batch, seq, vocab]``; position ``t`` predicts token ``t + 1``.
        labels: ``[batch, seq]`` token ids, ``IGNORE_INDEX`` where no loss is wanted (prompt, padding).

    Returns:
        ``(loss, n_tokens)``: the mean over counted target tokens (0 when there are none) and their number.
    """
    targets = labels[:, 1:]
    n_tokens = (targets != IGNORE_INDEX).sum()
    token_losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return token_losses / n_tokens.clamp(min=1), n_tokens
