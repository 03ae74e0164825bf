"""Advantage sources for online RL (docs/method.md §6): where ``Q^μ`` of the steps of RL rollouts comes from.

A source (``advantages:`` in a config, chosen with ``class_path``, short names work) implements
:class:`pavlit.interfaces.AdvantageSource`: it gives ``Q^μ`` of every prefix of every rollout, and
:class:`~pavlit.modules.policy_rl.PolicyRLModule` takes consecutive differences (:func:`pavlit.values.advantages`):

* :class:`PAVAdvantages` — a frozen, trained process verifier and a prover transform (Best-of-K by default);
* :class:`MCAdvantages` — direct Monte-Carlo rollouts of the Best-of-K prover of the current policy, or of a fixed
  model (docs/method.md §6, open question 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pavlit.interfaces import AdvantageSource, Problem, Prover, Task
from pavlit.provers.best_of_k import BestOfK

if TYPE_CHECKING:
    from pavlit.policy.sampler import Sampler
    from pavlit.policy.sources import ModelSource

__all__ = ["AdvantageSource", "MCAdvantages", "PAVAdvantages"]


class PAVAdvantages(AdvantageSource):
    """``Q^μ`` from a frozen process verifier (a ``Verifier``) through a prover (docs/method.md §6, the paper's setup).

    Args:
        verifier_path: A folder written by ``PAVModule.save_pretrained`` (e.g. ``runs/tiny/pav/verifier``).
        prover: Turns the verifier's ``Q^π`` into ``Q^μ``: ``BestOfK(k)`` (analytic), or a ``CheckpointProver``.
        batch_size: Rollouts per verifier forward pass.
    """

    def __init__(self, verifier_path: str, prover: Prover = BestOfK(4), batch_size: int = 64) -> None:  # noqa: B008
        self.verifier_path = verifier_path
        self.prover = prover
        self.batch_size = batch_size
        self._verifier: Any = None

    def verifier(self, device: torch.device | str = "cpu") -> Any:
        """The verifier, loaded on first use (frozen, eval mode) and kept on ``device``."""
        if self._verifier is None:
            from pavlit.models.verifier import Verifier

            self._verifier = Verifier.from_pretrained(self.verifier_path, kind="pav")
        if self._verifier.device != torch.device(device):
            self._verifier = self._verifier.to(device)
        return self._verifier

    def prefix_values(
        self,
        problems: Sequence[Problem],
        steps: Sequence[Sequence[str]],
        *,
        task: Task,
        sampler: Sampler,
        seed: int | None = None,
    ) -> list[torch.Tensor]:
        verifier = self.verifier(sampler.device)
        prompts = [problem.prompt for problem in problems]
        _, q_mu, _ = verifier.q_and_advantages(prompts, steps, self.prover, batch_size=self.batch_size)
        return [q.float().cpu() for q in q_mu]

    def __repr__(self) -> str:
        return f"PAVAdvantages(verifier_path={self.verifier_path!r}, prover={self.prover!r})"


class MCAdvantages(AdvantageSource):
    """``Q^μ`` of the Best-of-K prover by direct Monte-Carlo rollouts (no verifier; expensive, near-exact).

    Each distinct prefix gets ``n_groups`` groups of ``k`` completions; its value is the fraction of groups with a
    correct completion (:meth:`pavlit.provers.best_of_k.BestOfK.estimate`). The prefixes shared by a prompt's
    samples (the question-only one at least) are rolled out once.

    Args:
        k: Completions per group (``k = 1`` with a fixed ``prover`` model is that model itself).
        n_groups: Groups per prefix.
        prover: The model μ rolls out of; ``None``: the current policy (``BoK(π)`` tracks π as it trains).
        max_new_tokens: Cap on a completion's tokens (default: the sampler's).
    """

    def __init__(
        self, k: int = 4, n_groups: int = 4, prover: ModelSource | None = None, max_new_tokens: int | None = None
    ) -> None:
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.best_of_k = BestOfK(k)
        self.n_groups = n_groups
        self.prover = prover
        self.max_new_tokens = max_new_tokens
        self._sampler: Sampler | None = None

    def _prover_sampler(self, sampler: Sampler) -> Sampler:
        if self.prover is None:
            return sampler
        if self._sampler is None:
            from pavlit.policy.sampler import Sampler

            model, tokenizer = self.prover.load()
            model = model.to(sampler.device).requires_grad_(False)
            self._sampler = Sampler(model, tokenizer, max_new_tokens=sampler.max_new_tokens, seed=1)
        return self._sampler

    def prefix_values(
        self,
        problems: Sequence[Problem],
        steps: Sequence[Sequence[str]],
        *,
        task: Task,
        sampler: Sampler,
        seed: int | None = None,
    ) -> list[torch.Tensor]:
        prover_sampler = self._prover_sampler(sampler)
        unique: dict[str, tuple[Problem, dict[tuple[str, ...], int]]] = {}
        for problem, item in zip(problems, steps):
            prefixes = unique.setdefault(problem.id, (problem, {}))[1]
            for h in range(len(item) + 1):
                prefixes.setdefault(tuple(item[:h]), len(prefixes))
        values: dict[tuple[str, tuple[str, ...]], float] = {}
        for offset, (problem, prefixes) in enumerate(unique.values()):
            estimate = self.best_of_k.estimate(
                prover_sampler,
                task,
                problem,
                [list(prefix) for prefix in prefixes],
                n_groups=self.n_groups,
                max_new_tokens=self.max_new_tokens,
                seed=None if seed is None else seed + offset,
            )
            values.update({(problem.id, prefix): float(estimate[i]) for prefix, i in prefixes.items()})
        return [
            torch.tensor([values[(problem.id, tuple(item[:h]))] for h in range(len(item) + 1)])
            for problem, item in zip(problems, steps)
        ]

    def __repr__(self) -> str:
        return f"MCAdvantages(k={self.best_of_k.k}, n_groups={self.n_groups}, prover={self.prover!r})"
