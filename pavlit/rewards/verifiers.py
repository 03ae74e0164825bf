"""Reward compositions backed by trained verifiers: ``orm``, ``pqv`` and ``pav`` (docs/method.md §4–§5).

A verifier is named by the folder its module exported (``PAVModule.save_pretrained`` /
``ORMModule.save_pretrained``) and loaded lazily, once per process and device, however many compositions name
it (``pqv`` and ``pav`` usually share one). Instead of a path, any object with the verifier's inference method
may be passed (a test double, a model already in memory): see :class:`PrefixScorer` and :class:`ResponseScorer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pavlit.interfaces import Problem, Prover, Reward, RewardScores, Sampler, Task
from pavlit.values import effective_reward

__all__ = ["ORMReward", "PAVReward", "PQVReward", "PrefixScorer", "ResponseScorer", "load_verifier"]


@runtime_checkable
class PrefixScorer(Protocol):
    """What ``pqv``/``pav`` need from a process verifier (:class:`~pavlit.models.verifier.Verifier` has it)."""

    def score_prefixes(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]], batch_size: int = 64
    ) -> list[torch.Tensor]:
        """``Q^π`` of every prefix ``h = 0..H`` of each response: one tensor ``[H_i + 1]`` per response."""
        ...


@runtime_checkable
class ResponseScorer(Protocol):
    """What ``orm`` needs from an outcome verifier (:class:`~pavlit.models.verifier.Verifier` has it)."""

    def score_responses(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """P(correct) of each full response, ``[N]``."""
        ...


_LOADED: dict[tuple[str, str, str], Any] = {}


def load_verifier(kind: str, path: str, device: torch.device | str = "cpu") -> Any:
    """The verifier exported at ``path`` (``kind`` ``"pav"`` or ``"orm"``), in eval mode on ``device``.

    Loaded once per ``(kind, path, device)`` in a process: compositions sharing a verifier share its weights.
    """
    key = (kind, str(Path(path).resolve()), str(device))
    if key not in _LOADED:
        if kind not in ("pav", "orm"):
            raise ValueError(f"kind must be 'pav' or 'orm', got {kind!r}")
        from pavlit.models.verifier import Verifier

        _LOADED[key] = Verifier.from_pretrained(path, kind=kind, device=device)
    return _LOADED[key]


def _device(sampler: Sampler) -> torch.device:
    return torch.device(getattr(sampler, "device", "cpu"))


class ORMReward(Reward):
    """``orm``: the outcome verifier's P(correct) of the whole text so far (best-of-N's baseline scorer).

    On a partial prefix it scores the partial text as if it were a response; ``reward`` and ``value`` are equal.

    Args:
        verifier: A folder written by ``ORMModule.save_pretrained``, or an object with ``score_responses``.
        batch_size: Responses per verifier forward pass.
    """

    def __init__(self, verifier: str | ResponseScorer, batch_size: int = 64) -> None:
        self.verifier = verifier
        self.batch_size = batch_size
        self._model: Any = None if isinstance(verifier, str) else verifier

    def bind(self, task: Task, sampler: Sampler) -> None:
        if self._model is None:
            self._model = load_verifier("orm", str(self.verifier), _device(sampler))

    def score(
        self, problems: Sequence[Problem], prefixes: Sequence[Sequence[str]], finished: Sequence[bool] | None = None
    ) -> RewardScores:
        if self._model is None:
            self.bind(None, None)  # type: ignore[arg-type]
        if not prefixes:
            return RewardScores(torch.zeros(0), torch.zeros(0))
        scores = self._model.score_responses(
            [p.prompt for p in problems], ["".join(steps) for steps in prefixes], batch_size=self.batch_size
        )
        scores = scores.detach().float().cpu().reshape(-1)
        return RewardScores(reward=scores, value=scores.clone())

    def __repr__(self) -> str:
        return f"ORMReward(verifier={self.verifier!r})"


class PAVReward(Reward):
    """``pav``: the effective reward ``Q̂^π(s) + α·(Q̂^μ(s) − Q̂^μ(parent))`` of each prefix ``s`` (docs/method.md §2, §5).

    ``Q̂^π`` of the prefix and of its parent (the prefix without its last step) come from one forward pass of
    the process verifier. ``Q̂^μ`` is the prover's value (``prover.q_values`` on the parent and the prefix): by
    default the Best-of-K transform of ``Q̂^π`` (``BestOfK(4)``, the paper's best prover for a medium policy); a
    ``CheckpointProver(verifier_path=...)`` reads it from a Q-model trained on a fixed model's own rollouts. The
    question-only prefix has no parent and no advantage. ``value`` is ``Q̂^π`` of the prefix.

    Args:
        verifier: A folder written by ``PAVModule.save_pretrained``, or an object with ``score_prefixes``.
        alpha: Weight α of the prover advantage (0 gives ``pqv``; paper: 0.5 for 2B/9B, 0.2 for 27B).
        prover: Maps ``Q̂^π`` (and the prefixes and prompts) to ``Q̂^μ``; default ``BestOfK(k=4)``.
        batch_size: Responses per verifier forward pass.
    """

    def __init__(
        self,
        verifier: str | PrefixScorer,
        alpha: float = 0.5,
        prover: Prover | None = None,
        batch_size: int = 64,
    ) -> None:
        if not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) == float("inf"):
            raise ValueError(f"alpha must be a finite number, got {alpha}")
        if prover is None:
            from pavlit.provers.best_of_k import BestOfK

            prover = BestOfK(4)
        self.verifier = verifier
        self.alpha = float(alpha)
        self.prover = prover
        self.batch_size = batch_size
        self._model: Any = None if isinstance(verifier, str) else verifier

    def bind(self, task: Task, sampler: Sampler) -> None:
        if self._model is None:
            self._model = load_verifier("pav", str(self.verifier), _device(sampler))

    def score(
        self, problems: Sequence[Problem], prefixes: Sequence[Sequence[str]], finished: Sequence[bool] | None = None
    ) -> RewardScores:
        if self._model is None:
            self.bind(None, None)  # type: ignore[arg-type]
        if not prefixes:
            return RewardScores(torch.zeros(0), torch.zeros(0))
        prompts = [p.prompt for p in problems]
        steps = [list(s) for s in prefixes]
        values = self._model.score_prefixes(prompts, steps, batch_size=self.batch_size)
        q_pi = torch.stack([v[-1] for v in values]).float().cpu()
        has_parent = torch.tensor([len(s) > 0 for s in steps])
        if self.alpha == 0.0:
            return RewardScores(reward=q_pi.clone(), value=q_pi)
        # Parent value from the same pass: column -2 is Q^π of the prefix without its last step.
        q_parent_pi = torch.stack([v[-2] if len(v) > 1 else v[-1] for v in values]).float().cpu()
        both = torch.stack([q_parent_pi, q_pi], dim=1)  # [n, 2]; (parent, prefix) pairs, flattened row-major
        both_prefixes = [p for s in steps for p in (s[:-1], s)]
        both_prompts = [p for p in prompts for _ in range(2)]
        q_mu_both = self.prover.q_values(both, both_prefixes, both_prompts).float().cpu()
        q_mu_parent, q_mu = q_mu_both[:, 0], q_mu_both[:, 1]
        a_mu = torch.where(has_parent, q_mu - q_mu_parent, torch.zeros_like(q_mu))
        return RewardScores(reward=effective_reward(q_pi, a_mu.clamp(-1.0, 1.0), self.alpha), value=q_pi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(verifier={self.verifier!r}, alpha={self.alpha}, prover={self.prover!r})"


class PQVReward(PAVReward):
    """``pqv`` ("PRM Q^π"): the process verifier's ``Q̂^π`` alone, the standard PRM baseline (α = 0).

    Args:
        verifier: A folder written by ``PAVModule.save_pretrained``, or an object with ``score_prefixes``.
        batch_size: Responses per verifier forward pass.
    """

    def __init__(self, verifier: str | PrefixScorer, batch_size: int = 64) -> None:
        super().__init__(verifier, alpha=0.0, batch_size=batch_size)
