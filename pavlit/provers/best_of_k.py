"""The Best-of-K prover ``BoK(π)`` of docs/method.md §2: analytic from ``Q^π``, or estimated from real rollouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pavlit.interfaces import Problem, Prover, Task
from pavlit.values import best_of_k, best_of_k_from_counts

if TYPE_CHECKING:
    from pavlit.policy.sampler import Sampler

__all__ = ["BestOfK"]


class BestOfK(Prover):
    """Sample K completions from π and succeed if any does: ``Q^{BoK} = 1 − (1 − Q^π)^K``.

    Treating the K outcomes as independent Bernoulli(``Q^π``) draws lets one model of ``Q^π`` serve every K;
    K = 4 is the paper's best prover for a medium policy, and K → ∞ drives advantages to 0.

    Three ways to get ``Q^{BoK}``, from cheapest to most direct:

    * :meth:`q_values`: the analytic transform of a verifier's ``Q^π`` (what search and RL use);
    * :meth:`from_counts`: the unbiased estimate from ``n`` Monte-Carlo rollouts of π with ``c`` correct,
      ``1 − C(n−c, K) / C(n, K)`` — the average over every K-subset of the rollouts a labeling run drew;
    * :meth:`estimate`: draw ``n_groups`` fresh groups of K completions per prefix and count the groups with a
      correct completion (no modelling assumption at all; the oracle check of the other two).

    Args:
        k: Number of completions K (≥ 1; K = 1 is π itself).
    """

    def __init__(self, k: int = 4) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k}")
        self.k = int(k)

    def q_values(
        self,
        q_pi: torch.Tensor,
        prefixes: Sequence[Sequence[str]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``1 − (1 − Q^π)^K`` elementwise; ``prefixes`` and ``prompts`` are not needed."""
        return best_of_k(q_pi, self.k)

    def from_counts(self, n_correct: torch.Tensor, n_rollouts: torch.Tensor) -> torch.Tensor:
        """Unbiased ``Q^{BoK}`` from π's Monte-Carlo counts (needs ``n_rollouts >= K``)."""
        return best_of_k_from_counts(n_correct, n_rollouts, self.k)

    def estimate(
        self,
        sampler: Sampler,
        task: Task,
        problem: Problem,
        prefixes: Sequence[Sequence[str]],
        n_groups: int = 16,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """``Q^{BoK}`` of each prefix by drawing ``n_groups`` groups of K completions from π.

        Args:
            sampler: Samples from π.
            task: Scores the completed responses.
            problem: The problem the prefixes belong to.
            prefixes: Steps so far, one list per prefix.
            n_groups: Independent groups of K completions per prefix.
            max_new_tokens: Cap on a completion's tokens (default: the sampler's).
            seed: Seed of the draws.

        Returns:
            A float tensor ``[len(prefixes)]``: the fraction of groups in which some completion is correct.
        """
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        heads = ["".join(steps) for steps in prefixes]
        out = sampler.complete(
            [problem.prompt + head for head in heads],
            n=n_groups * self.k,
            max_new_tokens=max_new_tokens,
            delimiter=task.step_delimiter,
            seed=seed,
        )
        correct = torch.tensor(
            [[task.score(problem, head + c) >= 0.5 for c in completions] for head, completions in zip(heads, out.texts)]
        )
        return correct.view(len(heads), n_groups, self.k).any(dim=-1).float().mean(dim=-1)

    def __repr__(self) -> str:
        return f"BestOfK(k={self.k})"
