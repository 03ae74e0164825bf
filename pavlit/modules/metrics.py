"""Validation metrics of the verifiers: AUROC that is undefined (not 0) on one class, calibration against soft
labels, and the best constant predictor every verifier is reported beside."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat

__all__ = ["ConstantBaseline", "DefinedAUROC", "SoftCalibrationError", "defined_metrics"]


class DefinedAUROC(BinaryAUROC):
    """Binary AUROC that is ``None`` when the (synced) targets hold one class only.

    AUROC is undefined then; torchmetrics returns 0 with a warning, which reads as "ranks every pair wrong". A
    verifier trained on labels that are all 0 (a policy that solves nothing) would report exactly that.
    """

    def compute(self) -> torch.Tensor | None:  # type: ignore[override]
        target = dim_zero_cat(self.target) if isinstance(self.target, list) else self.target
        if target.numel() == 0 or bool((target == target.flatten()[0]).all()):
            return None
        return super().compute()


def defined_metrics(values: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``values`` without the undefined (``None``) ones, as float tensors for ``log_dict``."""
    return {name: value.float() for name, value in values.items() if value is not None}


class SoftCalibrationError(Metric):
    """Expected calibration error against **soft** labels: ``Σ_b (n_b / N) · |mean σ in bin b − mean q in bin b|``.

    torchmetrics' ``BinaryCalibrationError`` compares confidences with 0/1 targets; a Q-model's targets are MC
    fractions, so here each equal-width bin of predictions is compared with the mean MC label that falls in it.

    Args:
        n_bins: Equal-width bins over [0, 1].
    """

    full_state_update = False

    def __init__(self, n_bins: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        for name in ("pred_sum", "target_sum", "count"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.detach().flatten().double(), target.detach().flatten().double()
        bins = (preds * self.n_bins).long().clamp(0, self.n_bins - 1)
        self.pred_sum.index_add_(0, bins, preds)
        self.target_sum.index_add_(0, bins, target)
        self.count.index_add_(0, bins, torch.ones_like(preds))

    def compute(self) -> torch.Tensor:
        total = self.count.sum().clamp(min=1.0)
        return ((self.pred_sum - self.target_sum).abs().sum() / total).float()


class ConstantBaseline(Metric):
    """The best constant predictor of the labels it sees (their mean ``q̄``): its BCE, MSE and accuracy.

    ``BCE = −(q̄ log q̄ + (1 − q̄) log(1 − q̄))`` (mean BCE of the constant ``q̄`` against labels whose mean is
    ``q̄``), ``MSE = mean(q²) − q̄²``, accuracy (for 0/1 labels) ``max(q̄, 1 − q̄)``. Using the evaluation set's own
    mean makes it the strongest constant a verifier has to beat.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_sq", "count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target: torch.Tensor) -> None:
        target = target.detach().flatten().double()
        self.total += target.sum()
        self.total_sq += (target**2).sum()
        self.count += target.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1.0)
        mean = self.total / n
        eps = 1e-12
        bce = -(mean * torch.log(mean.clamp(min=eps)) + (1 - mean) * torch.log((1 - mean).clamp(min=eps)))
        return {
            "mean": mean.float(),
            "bce": bce.float(),
            "mse": (self.total_sq / n - mean**2).clamp(min=0).float(),
            "accuracy": torch.maximum(mean, 1 - mean).float(),
        }
