"""Best-of-N (docs/method.md §5): N full samples from π, one picked by a reward, by vote, or by the oracle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pavlit.interfaces import Problem, Reward, Sampler, Search, Task
from pavlit.policy.sampler import STOP_EOS
from pavlit.search.picks import argmax_first, majority_vote, oracle_pick, weighted_vote
from pavlit.steps import split_steps

__all__ = ["PICKS", "BestOfN"]

PICKS = ("reward", "majority", "weighted", "oracle")


class BestOfN(Search):
    """Sample N responses per problem and choose one.

    The other picks of the same N candidates are returned too (``picks``), so one run reports ORM best-of-N, majority
    voting, reward-weighted voting and Pass@N side by side:

    * ``reward``: the highest ``value`` of the reward composition (ORM score, or ``Q̂^π`` of the whole response);
    * ``majority``: the most frequent final answer (``task.extract_answer``);
    * ``weighted``: the answer with the largest sum of ``value``;
    * ``oracle``: a correct candidate if any (Pass@N, the ceiling; uses the checker).

    Budgets nest: :meth:`run_budgets` draws the largest N once and reads budget ``n`` as its first ``n`` samples
    (compute is counted on those ``n`` only), so the curve over N has no sampling noise between points.

    Args:
        pick: Which pick is the ``response`` (the others are in ``picks``).
        max_new_tokens: Cap on a response's tokens (default: the sampler's).
        max_steps: Cap on a response's steps (default: none).
    """

    def __init__(self, pick: str = "reward", max_new_tokens: int | None = None, max_steps: int | None = None) -> None:
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
        self.pick = pick
        self.max_new_tokens = max_new_tokens
        self.max_steps = max_steps

    def run(
        self,
        problems: Sequence[Problem],
        budget: int,
        *,
        task: Task,
        sampler: Sampler,
        reward: Reward | None,
        seed: int = 0,
    ) -> list[dict[str, Any]]:
        return self.run_budgets(problems, [budget], task=task, sampler=sampler, reward=reward, seed=seed)[budget]

    def run_budgets(
        self,
        problems: Sequence[Problem],
        budgets: Sequence[int],
        *,
        task: Task,
        sampler: Sampler,
        reward: Reward | None,
        seed: int = 0,
    ) -> dict[int, list[dict[str, Any]]]:
        if not budgets or min(budgets) < 1:
            raise ValueError(f"budgets must be >= 1, got {list(budgets)}")
        if reward is None and self.pick in ("reward", "weighted"):
            raise ValueError(f"pick={self.pick!r} needs a reward composition")
        n_max = max(budgets)
        if not problems:
            return {b: [] for b in budgets}
        out = sampler.complete(
            [p.prompt for p in problems],
            n=n_max,
            max_new_tokens=self.max_new_tokens,
            max_steps=self.max_steps,
            delimiter=task.step_delimiter,
            seed=seed,
        )
        steps = [[split_steps(text, task.step_delimiter) for text in texts] for texts in out.texts]
        values: list[list[float]] = [[0.0] * n_max for _ in problems]
        calls: list[list[int]] = [[0] * n_max for _ in problems]
        reward_tokens: list[list[int]] = [[0] * n_max for _ in problems]
        if reward is not None:
            reward.bind(task, sampler)
            flat_problems = [p for p in problems for _ in range(n_max)]
            flat_steps = [s for per_problem in steps for s in per_problem]
            flat_finished = [
                reason == STOP_EOS or bool(s and task.is_final_step(s[-1]))
                for reasons, per_problem in zip(out.stop_reasons, steps)
                for reason, s in zip(reasons, per_problem)
            ]
            scores = reward.score(flat_problems, flat_steps, flat_finished)
            flat_values = scores.value.tolist()
            for i in range(len(problems)):
                for j in range(n_max):
                    k = i * n_max + j
                    values[i][j] = flat_values[k]
                    calls[i][j] = 1 if scores.calls is None else scores.calls[k]
                    reward_tokens[i][j] = 0 if scores.tokens is None else scores.tokens[k]
        results: dict[int, list[dict[str, Any]]] = {b: [] for b in budgets}
        for i, problem in enumerate(problems):
            texts = out.texts[i]
            answers = [task.extract_answer(t) for t in texts]
            correct = [task.score(problem, t) >= 0.5 for t in texts]
            lengths = [len(ids) for ids in out.token_ids[i]]
            for budget in budgets:
                first = slice(0, budget)
                chosen = {
                    "majority": majority_vote(answers[first]),
                    "oracle": oracle_pick(correct[first]),
                }
                if reward is not None:
                    chosen["reward"] = argmax_first(values[i][first])
                    chosen["weighted"] = weighted_vote(answers[first], values[i][first])
                main = chosen[self.pick]
                results[budget].append(
                    {
                        "response": texts[main],
                        "value": values[i][main] if reward is not None else None,
                        "tokens": sum(lengths[first]),
                        "step_samples": sum(len(s) for s in steps[i][first]),
                        "verifier_calls": sum(calls[i][first]),
                        "reward_tokens": sum(reward_tokens[i][first]),
                        "candidates": budget,
                        "picks": {name: texts[index] for name, index in chosen.items() if name != self.pick},
                    }
                )
        return results

    def __repr__(self) -> str:
        return f"BestOfN(pick={self.pick!r})"
