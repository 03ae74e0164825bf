"""``pav_min``: a prefix scored by its weakest step's effective reward (a ``pavlit.rewards`` plugin).

pavlit's ``pav`` composition scores a prefix by its *last* step only, ``Q̂^π(s) + α·(Q̂^μ(s) − Q̂^μ(parent))``
(docs/method.md §5). Process reward models are also commonly aggregated over the whole path by their minimum (a
solution is as good as its worst step). ``pav_min`` applies that aggregation to the effective reward: for a
prefix with steps ``a_1 … a_H`` and prefix values ``Q̂(s_0) … Q̂(s_H)`` (``s_0`` the question alone)::

    reward(s_H) = min_{h=1..H} [ Q̂^π(s_h) + α · (Q̂^μ(s_h) − Q̂^μ(s_{h−1})) ]        (H ≥ 1)
    reward(s_0) = Q̂^π(s_0)                                                              (the question alone)
    value(s_H)  = Q̂^π(s_H)

So in beam search a child inherits the worst step of its path: a path that once stalled or went backwards ranks
below one that made progress at every step, even when its last step looks good. On a one-step prefix it equals
``pav``; with α = 0 it is the minimum of ``Q̂^π`` over the path (PRM-min). ``value`` stays the process verifier's
``Q̂^π`` of the whole prefix, so the final pick of beam search and best-of-N ranking are those of ``pav``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pavlit.interfaces import Problem, Prover, RewardScores
from pavlit.rewards import PAVReward, PrefixScorer
from pavlit.values import advantages, effective_reward

__all__ = ["PAVMinReward"]


class PAVMinReward(PAVReward):
    """``pav_min``: ``min_h [Q̂^π(s_h) + α·A^μ(s_h)]`` over the steps of each prefix; ``value`` is ``Q̂^π``.

    One forward pass of the process verifier gives ``Q̂^π`` of every prefix of a response at once; the prover
    (default ``BestOfK(4)``, as for ``pav``) maps them to ``Q̂^μ`` in one call over all responses.

    Args:
        verifier: A folder written by ``PAVModule.save_pretrained``, or an object with ``score_prefixes``.
        alpha: Weight α of the prover advantage (0: the minimum of ``Q̂^π`` over the path).
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
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise ValueError(f"PAVMinReward: alpha must be a finite number, got {alpha!r}")
        if batch_size < 1:
            raise ValueError(f"PAVMinReward: batch_size must be >= 1, got {batch_size}")
        # Verifier loading (``bind``), the default ``BestOfK(4)`` prover and ``repr`` are pavlit's ``pav``'s.
        super().__init__(verifier, alpha=alpha, prover=prover, batch_size=batch_size)

    def score(
        self, problems: Sequence[Problem], prefixes: Sequence[Sequence[str]], finished: Sequence[bool] | None = None
    ) -> RewardScores:
        if len(problems) != len(prefixes):
            raise ValueError(f"PAVMinReward.score: got {len(problems)} problems but {len(prefixes)} prefixes")
        if not prefixes:
            return RewardScores(torch.zeros(0), torch.zeros(0))
        if self._model is None:
            self.bind(None, None)  # type: ignore[arg-type]  # used outside a search: load on the CPU
        prompts = [p.prompt for p in problems]
        steps = [list(s) for s in prefixes]
        q_pi = [
            v.detach().float().cpu().reshape(-1) for v in self._model.score_prefixes(prompts, steps, self.batch_size)
        ]
        for i, (values, item) in enumerate(zip(q_pi, steps)):
            if values.numel() != len(item) + 1:
                raise ValueError(
                    f"PAVMinReward: the verifier returned {values.numel()} values for prefix {i}, which has "
                    f"{len(item)} steps; expected one per prefix h = 0..{len(item)}"
                )
        q_mu = self._prover_values(q_pi, prompts, steps)
        rewards = []
        for values, prover_values in zip(q_pi, q_mu):
            if values.numel() == 1:  # the question alone: no step, no advantage
                rewards.append(values[0])
                continue
            a_mu = advantages(prover_values).clamp(-1.0, 1.0)
            rewards.append(effective_reward(values[1:], a_mu, self.alpha).min())
        return RewardScores(reward=torch.stack(rewards), value=torch.stack([v[-1] for v in q_pi]))

    def _prover_values(
        self, q_pi: list[torch.Tensor], prompts: list[str], steps: list[list[str]]
    ) -> list[torch.Tensor]:
        """``Q̂^μ`` of every prefix of every response, from one prover call over all of them."""
        if self.alpha == 0.0:  # the advantage term vanishes; spare the prover (a checkpoint prover runs a model)
            return [torch.zeros_like(v) for v in q_pi]
        flat_prefixes = [item[:h] for item in steps for h in range(len(item) + 1)]
        flat_prompts = [prompt for prompt, item in zip(prompts, steps) for _ in range(len(item) + 1)]
        flat = self.prover.q_values(torch.cat(q_pi), flat_prefixes, flat_prompts).float().cpu().reshape(-1)
        return list(torch.split(flat, [v.numel() for v in q_pi]))
