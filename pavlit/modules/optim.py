"""Optimizers and the one learning-rate schedule of every pavlit LightningModule.

Each module takes ``optimizer`` (an ``OptimizerCallable``) and ``lr_scheduler`` (an ``LRSchedulerCallable``),
as LightningCLI injects them from a config::

    model:
      init_args:
        optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}
        lr_scheduler: {class_path: torch.optim.lr_scheduler.ConstantLR, init_args: {factor: 1.0}}

Left unset, a module builds what the paper uses (docs/method.md §4): AdamW at its ``lr`` with ``weight_decay`` on
matrices only (Adam when it is 0), and :func:`warmup_cosine` stepped every optimizer step over the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

__all__ = ["LRSchedulerCallable", "OptimizerCallable", "configure_optimization", "decay_groups", "warmup_cosine"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup_steps`` steps, then cosine down to 0.

    Step ``s < warmup_steps`` gets ``(s + 1) / warmup_steps`` (the first update is not wasted at lr 0); after it
    the multiplier is ``0.5 * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps)))``, and 0 from
    ``total_steps`` on. A warm-up longer than the run is cut to the run's length.
    """
    warmup_steps = min(warmup_steps, total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with ``weight_decay`` on matrices and none on biases, norms and the scalar heads."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def configure_optimization(module: Any, params: Iterable[nn.Parameter] | None = None) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: the injected optimizer and schedule, or AdamW + :func:`warmup_cosine`.

    Reads the module's ``optimizer_factory`` / ``scheduler_factory`` (its ``optimizer`` / ``lr_scheduler``
    arguments) and ``hparams.lr``, ``hparams.weight_decay``, ``hparams.warmup_steps``.

    Args:
        module: The LightningModule (its trainer sizes the default schedule).
        params: The parameters to train (default: all of the module's; frozen ones are skipped).

    Raises:
        ValueError: The default schedule on a run with no finite length.
    """
    hp = module.hparams
    params = [p for p in (module.parameters() if params is None else params) if p.requires_grad]
    if module.optimizer_factory is None:
        optimizer = torch.optim.AdamW(decay_groups(params, hp.weight_decay), lr=hp.lr)
    else:
        optimizer = module.optimizer_factory(params)
    if module.scheduler_factory is not None:
        schedule = module.scheduler_factory(optimizer)
    else:
        total = module.trainer.estimated_stepping_batches if module._trainer is not None else 1
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a finite run: set trainer.max_steps or trainer.max_epochs")
        total, warmup = max(int(total), 1), hp.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
