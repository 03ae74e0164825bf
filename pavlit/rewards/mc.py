"""The oracle composition ``mc``: ``Q^π`` and ``Q^μ`` by direct Monte-Carlo rollouts instead of a verifier.

docs/method.md §5 scores beam candidates with a trained verifier; this composition estimates the same quantities by
sampling ``n_rollouts`` completions of every prefix from π and checking them (the paper's open question 2).
It is expensive (its rollouts are counted as ``reward_tokens``, apart from the search's own tokens) and it uses
the task's checker, so it is an oracle, not a deployable verifier; it is exact up to sampling error, which makes
it the check on what a trained verifier loses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pavlit.interfaces import Problem, Prover, Reward, RewardScores, Sampler, Task
from pavlit.values import effective_reward

__all__ = ["MCReward"]


class MCReward(Reward):
    """Effective reward from rollouts: ``Q̂^π = c / n`` and ``Q̂^μ`` from the same rollouts.

    With a :class:`~pavlit.provers.best_of_k.BestOfK` prover, ``Q̂^μ`` is the unbiased Best-of-K estimate from the
    counts, ``1 − C(n − c, K) / C(n, K)`` (no independence assumption); any other prover gets ``Q̂^π`` and the
    prefixes (a planted prover answers exactly), except a
    :class:`~pavlit.provers.checkpoint.CheckpointProver` with a ``policy``: its ``Q̂^μ`` is the success rate of
    ``n_rollouts`` completions of the prover's own model from the same prefixes (the Monte-Carlo oracle of a
    fixed-checkpoint prover; its tokens count as compute too). A finished prefix is a complete response: its value
    is its own score, without rollouts. Rollouts are cached per ``(problem id, prefix)`` for the life of a search, so a
    parent scored at one depth is not rolled out again at the next.

    Args:
        n_rollouts: Completions sampled from each prefix.
        alpha: Weight α of the prover advantage (0: ``Q̂^π`` alone).
        prover: Default ``BestOfK(4)``; needs ``n_rollouts >= k``.
        max_new_tokens: Cap on a completion's tokens (default: the sampler's).
    """

    def __init__(
        self, n_rollouts: int = 16, alpha: float = 0.5, prover: Prover | None = None, max_new_tokens: int | None = None
    ) -> None:
        from pavlit.provers.best_of_k import BestOfK

        if n_rollouts < 1:
            raise ValueError(f"n_rollouts must be >= 1, got {n_rollouts}")
        prover = BestOfK(4) if prover is None else prover
        if isinstance(prover, BestOfK) and prover.k > n_rollouts:
            raise ValueError(f"BestOfK(k={prover.k}) needs n_rollouts >= {prover.k}, got {n_rollouts}")
        self.n_rollouts = n_rollouts
        self.alpha = float(alpha)
        self.prover = prover
        self.max_new_tokens = max_new_tokens
        self._task: Task | None = None
        self._sampler: Sampler | None = None
        self._counts: dict[tuple[str, tuple[str, ...]], tuple[int, int]] = {}
        self._counts_mu: dict[tuple[str, tuple[str, ...]], tuple[int, int]] = {}
        self._mu_sampler: Sampler | None = None

    def bind(self, task: Task, sampler: Sampler) -> None:
        """Use ``sampler`` (π) and ``task`` (the checker); forget the rollouts of any earlier search."""
        from pavlit.provers.checkpoint import CheckpointProver

        self._task, self._sampler = task, sampler
        self._counts, self._counts_mu = {}, {}
        self._mu_sampler = None
        if isinstance(self.prover, CheckpointProver) and self.prover.policy is not None:
            self._mu_sampler = self.prover.rollout_sampler(task)

    def score(
        self, problems: Sequence[Problem], prefixes: Sequence[Sequence[str]], finished: Sequence[bool] | None = None
    ) -> RewardScores:
        if self._task is None or self._sampler is None:
            raise RuntimeError("MCReward needs bind(task, sampler) before score()")
        task = self._task
        finished = [False] * len(prefixes) if finished is None else list(finished)
        steps = [tuple(s) for s in prefixes]
        tokens = [0] * len(steps)
        calls = [0] * len(steps)
        # Exact values for finished responses; everything else (children and their parents) is rolled out once.
        todo: dict[tuple[str, tuple[str, ...]], tuple[Problem, int]] = {}
        for i, (problem, prefix, done) in enumerate(zip(problems, steps, finished)):
            key = (problem.id, prefix)
            if done:
                if key not in self._counts:
                    correct = int(task.score(problem, "".join(prefix)) >= 0.5)
                    self._counts[key] = (correct * self.n_rollouts, self.n_rollouts)
            elif key not in self._counts and key not in todo:
                todo[key] = (problem, i)
            parent = (problem.id, prefix[:-1])
            if prefix and self.alpha != 0.0 and parent not in self._counts and parent not in todo:
                todo[parent] = (problem, i)
        self._rollout(self._sampler, todo, self._counts, tokens, calls)
        q_pi = torch.tensor([self._q_pi(p.id, s) for p, s in zip(problems, steps)], dtype=torch.float32)
        if self.alpha == 0.0:
            return RewardScores(reward=q_pi.clone(), value=q_pi, calls=calls, tokens=tokens)
        if self._mu_sampler is not None:
            # The prover's own rollouts from the same children and parents; a finished response is its own score.
            todo_mu: dict[tuple[str, tuple[str, ...]], tuple[Problem, int]] = {}
            for i, (problem, prefix, done) in enumerate(zip(problems, steps, finished)):
                key, parent = (problem.id, prefix), (problem.id, prefix[:-1])
                if done:
                    self._counts_mu.setdefault(key, self._counts[key])
                elif key not in self._counts_mu:
                    todo_mu.setdefault(key, (problem, i))
                if prefix and parent not in self._counts_mu:
                    todo_mu.setdefault(parent, (problem, i))
            self._rollout(self._mu_sampler, todo_mu, self._counts_mu, tokens, calls)
        q_mu = self._q_mu(problems, steps)
        q_mu_parent = self._q_mu(problems, [s[:-1] for s in steps])
        has_parent = torch.tensor([len(s) > 0 for s in steps])
        a_mu = torch.where(has_parent, q_mu - q_mu_parent, torch.zeros_like(q_mu))
        reward = effective_reward(q_pi, a_mu.clamp(-1.0, 1.0), self.alpha)
        return RewardScores(reward=reward, value=q_pi, calls=calls, tokens=tokens)

    def _rollout(
        self,
        sampler: Sampler,
        todo: dict[tuple[str, tuple[str, ...]], tuple[Problem, int]],
        counts: dict[tuple[str, tuple[str, ...]], tuple[int, int]],
        tokens: list[int],
        calls: list[int],
    ) -> None:
        """Complete every prefix of ``todo`` ``n_rollouts`` times with ``sampler``; store the success counts and
        charge the tokens and completions to the prefix's owner."""
        if not todo:
            return
        task = self._task
        keys = list(todo)
        heads = ["".join(prefix) for _, prefix in keys]
        out = sampler.complete(
            [todo[key][0].prompt + head for key, head in zip(keys, heads)],
            n=self.n_rollouts,
            max_new_tokens=self.max_new_tokens,
            delimiter=task.step_delimiter,
        )
        for key, head, texts, ids in zip(keys, heads, out.texts, out.token_ids):
            problem, owner = todo[key]
            counts[key] = (sum(int(task.score(problem, head + text) >= 0.5) for text in texts), self.n_rollouts)
            tokens[owner] += sum(len(t) for t in ids)
            calls[owner] += self.n_rollouts

    def _q_pi(self, problem_id: str, prefix: tuple[str, ...]) -> float:
        n_correct, n = self._counts[(problem_id, prefix)]
        return n_correct / n

    def _q_mu(self, problems: Sequence[Problem], steps: Sequence[tuple[str, ...]]) -> torch.Tensor:
        from pavlit.provers.best_of_k import BestOfK

        if self._mu_sampler is not None:
            mu = torch.tensor([self._counts_mu[(p.id, s)] for p, s in zip(problems, steps)], dtype=torch.float64)
            return (mu[:, 0] / mu[:, 1]).float()
        counts = torch.tensor([self._counts[(p.id, s)] for p, s in zip(problems, steps)], dtype=torch.long)
        if isinstance(self.prover, BestOfK):
            return self.prover.from_counts(counts[:, 0], counts[:, 1]).float()
        q_pi = (counts[:, 0].double() / counts[:, 1].double()).float()
        return self.prover.q_values(q_pi, [list(s) for s in steps], [p.prompt for p in problems]).float()

    def __repr__(self) -> str:
        return f"MCReward(n_rollouts={self.n_rollouts}, alpha={self.alpha}, prover={self.prover!r})"
