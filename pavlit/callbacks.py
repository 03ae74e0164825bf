"""Lightning callbacks that ``pavlit fit`` adds to every run.

:class:`FiniteGuard` stops training at the first step whose loss or gradients are NaN or infinite, naming the step
and the quantity, instead of letting a run spend hours updating weights with NaN. ``PavlitCLI`` adds it to every
Lightning subcommand (``--finite_guard.enabled false`` turns it off; listing it in ``trainer.callbacks`` replaces the
default one, so it never runs twice).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["FiniteGuard", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the message names the step and the quantity."""


class FiniteGuard(Callback):
    """Stop training with :class:`NonFiniteError` on a NaN/inf loss (before its backward) or gradient (before the
    optimizer step), so the weights are never updated with it.

    Under fp16 mixed precision the gradient scaler already skips steps with infinite gradients and lowers its
    scale, so there only a NaN loss stops the run. With several processes the decision is reduced over all ranks,
    so every rank stops together rather than the others waiting forever in the next collective.

    Args:
        enabled: Off turns the guard into a no-op (``pavlit fit --finite_guard.enabled false``).
        check_gradients: Also check every parameter's gradient before each optimizer step (one reduction per
            step); off checks the loss only.
    """

    def __init__(self, enabled: bool = True, check_gradients: bool = True) -> None:
        self.enabled = enabled
        self.check_gradients = check_gradients

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        detached = loss.detach()
        bad = torch.isnan(detached) if _has_scaler(trainer) else ~torch.isfinite(detached)
        local = bool(bad.any())
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        if local:
            values = detached.flatten()[:4].tolist()
            shown = values[0] if detached.numel() == 1 else values
            raise NonFiniteError(f"{_where(trainer)}: the training loss is {shown} (not finite); {_HINT}")
        raise NonFiniteError(f"{_where(trainer)}: another rank's training loss is not finite; {_HINT}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not (self.enabled and self.check_gradients) or _has_scaler(trainer):
            return
        named = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(_local(grad)).all() for _, grad in named]) if named else None
        local = finite is not None and not bool(finite.all())
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        if local:
            bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            grad = _local(dict(named)[bad[0]])
            kind = "NaN" if torch.isnan(grad).any() else "inf"
            raise NonFiniteError(f"{_where(trainer)}: the gradient of parameter {bad[0]!r}{more} holds {kind}; {_HINT}")
        raise NonFiniteError(f"{_where(trainer)}: another rank holds a non-finite gradient; {_HINT}")


_HINT = (
    "training stopped before the weights were updated with it (lower the learning rate, clip gradients with "
    "--trainer.gradient_clip_val, or check the data for bad labels)"
)


def _where(trainer: Trainer) -> str:
    rank = f", rank {trainer.global_rank}" if trainer.world_size > 1 else ""
    return f"global step {trainer.global_step} (epoch {trainer.current_epoch}{rank})"


def _has_scaler(trainer: Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A sharded (FSDP2) gradient is a DTensor: each rank checks its own shard, and the ranks' answers are reduced.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
