"""A mixture prover: Best-of-K of π some of the time, π itself the rest (a ``pavlit.provers`` plugin).

The paper's provers come in integer steps of strength: π (K = 1), Bo2, Bo4, ... The mixture fills the gaps. At
each prefix the prover flips a coin once: with probability λ it runs Best-of-K of π from there (K completions,
success if any succeeds), otherwise it runs π once. With the K outcomes independent Bernoulli(``Q^π``), as for
:class:`pavlit.provers.BestOfK`::

    Q^μ = λ · (1 − (1 − Q^π)^K) + (1 − λ) · Q^π

Q^μ is linear in the two component values, so its advantages are too:
``A^μ = λ · A^{BoK} + (1 − λ) · A^π``. In the effective reward ``Q^π + α·A^μ`` the mixture therefore splits α
between the Best-of-K advantage (weight αλ) and π's own advantage (weight α(1 − λ)), and λ moves the prover
continuously from π (λ = 0; docs/method.md §2: no signal beyond the outcome in RL) to Best-of-K (λ = 1). It costs
1 + λ(K − 1) attempts on average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pavlit.interfaces import Prover
from pavlit.values import best_of_k, best_of_k_from_counts, mc_estimate

__all__ = ["MixtureProver"]


class MixtureProver(Prover):
    """With probability ``mix`` run Best-of-K of π, else π: ``Q^μ = mix·(1 − (1 − Q^π)^K) + (1 − mix)·Q^π``.

    Args:
        k: Attempts K of the Best-of-K component (an integer ≥ 1).
        mix: Probability λ of running Best-of-K, in [0, 1] (0: the prover is π; 1: it is ``BestOfK(k)``).
    """

    def __init__(self, k: int = 4, mix: float = 0.5) -> None:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"MixtureProver: k must be an integer >= 1, got {k!r}")
        if isinstance(mix, bool) or not isinstance(mix, int | float) or not math.isfinite(mix) or not 0 <= mix <= 1:
            raise ValueError(f"MixtureProver: mix must be a probability in [0, 1], got {mix!r}")
        self.k = int(k)
        self.mix = float(mix)

    def q_values(
        self,
        q_pi: torch.Tensor,
        prefixes: Sequence[Sequence[str]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``mix · (1 − (1 − Q^π)^K) + (1 − mix) · Q^π`` elementwise; ``prefixes`` and ``prompts`` are not needed."""
        q_pi = torch.as_tensor(q_pi)
        if not q_pi.is_floating_point():
            q_pi = q_pi.to(torch.get_default_dtype())
        q_bok = best_of_k(q_pi, self.k)  # also checks that q_pi holds probabilities
        return self.mix * q_bok + (1.0 - self.mix) * q_pi

    def from_counts(self, n_correct: torch.Tensor, n_rollouts: torch.Tensor) -> torch.Tensor:
        """Unbiased ``Q^μ`` from π's Monte-Carlo counts (needs ``n_rollouts >= K``).

        The mixture of two unbiased estimates: ``mix · (1 − C(n − c, K) / C(n, K)) + (1 − mix) · c / n``.
        """
        return self.mix * best_of_k_from_counts(n_correct, n_rollouts, self.k) + (1.0 - self.mix) * mc_estimate(
            n_correct, n_rollouts
        )

    def mean_attempts(self) -> float:
        """Completions of π the prover draws on average per prefix: ``1 + mix · (K − 1)``."""
        return 1.0 + self.mix * (self.k - 1)

    def __repr__(self) -> str:
        return f"MixtureProver(k={self.k}, mix={self.mix})"
