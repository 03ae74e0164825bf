"""Argument checks shared by the LightningModules: each bad setting ends in one error naming the field."""

from __future__ import annotations

import math
from typing import Any


def check_optimisation(owner: str, lr: float, weight_decay: float, warmup_steps: int) -> None:
    """``lr`` finite and > 0, ``weight_decay`` finite and >= 0, ``warmup_steps`` a count >= 0."""
    if isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{owner}.lr must be a finite number > 0, got {lr}")
    if isinstance(weight_decay, bool) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{owner}.weight_decay must be a finite number >= 0, got {weight_decay}")
    if isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"{owner}.warmup_steps must be >= 0, got {warmup_steps}")


def check_validation_data(datamodule: Any, examples: Any, fix: str) -> None:
    """``pavlit validate`` on a dataset without validation examples is an error, not a run that validates nothing.

    Args:
        datamodule: The DataModule whose ``val_dataloader`` is being built.
        examples: Its validation examples.
        fix: What gives it some (e.g. "raise data.val_fraction").
    """
    trainer = getattr(datamodule, "trainer", None)
    state = getattr(getattr(trainer, "state", None), "fn", None)
    if str(getattr(state, "value", state)) == "validate" and not examples:
        path = getattr(datamodule, "path", None)
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}no validation examples for `pavlit validate`; expected some: {fix}")
