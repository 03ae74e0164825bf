"""The Best-of-K prover ``BoK(π)`` of PAPER.md §2, in its analytic form."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pavlit.interfaces import Prover
from pavlit.values import best_of_k

__all__ = ["BestOfK"]


class BestOfK(Prover):
    """Sample K completions from π and succeed if any does: ``Q^{BoK} = 1 − (1 − Q^π)^K``.

    Treating the K outcomes as independent Bernoulli(``Q^π``) draws lets one model of ``Q^π`` serve every K;
    K = 4 is the paper's best prover for a medium policy, and K → ∞ drives advantages to 0.

    Args:
        k: Number of completions K (≥ 1; K = 1 is π itself).
    """

    def __init__(self, k: int = 4) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k}")
        self.k = int(k)

    def q_values(self, q_pi: torch.Tensor, prefixes: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """``1 − (1 − Q^π)^K`` elementwise; ``prefixes`` is not needed."""
        return best_of_k(q_pi, self.k)

    def __repr__(self) -> str:
        return f"BestOfK(k={self.k})"
