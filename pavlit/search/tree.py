"""Step-level tree search batched across problems: beam search (docs/method.md §5) and DVTS.

One engine, :class:`TreeSearch`, runs every problem of a batch in lockstep: at each depth the active states of
*all* problems and all their subtrees are expanded by **one** ``sampler.next_step`` call (``C`` children per state,
each state's prefix prefilled once and shared by its children) and scored by **one** ``reward.score`` call, then
each subtree keeps its own top children. The strategies differ only in how the budget is cut into subtrees:

* :class:`BeamSearch`: one subtree of width ``B`` per problem, ``C`` children per state (default 3);
* :class:`DVTS` (diverse verifier tree search, Beeching et al. 2024): ``N / M`` independent subtrees of width 1,
  ``M`` children per state, so the budget buys diversity instead of one wide beam.

Rules (each a documented choice, docs/method.md §5 where it is explicit):

* Children are ranked by the composition's ``reward`` (the effective reward for ``pav``); a subtree keeps its
  global top-``slots`` children (ties: the earlier child).
* A child is **finished** when π wrote EOS, when its last step is a final-answer step (``task.is_final_step``),
  when it reached ``max_steps`` steps, or when a step hit ``max_step_tokens`` without ending. A kept finished
  child leaves the beam and holds its slot for good: a subtree of width ``W`` with ``f`` finished candidates
  continues with ``W − f`` states and ends when all ``W`` slots are finished.
* The final answer is the finished candidate with the highest ``value`` (``Q̂^π``: the process verifier used as
  an outcome verifier), over all subtrees of the problem; with ``final_reward`` (e.g. the ORM), the one with the
  highest value under that composition instead. The ``oracle`` pick (a correct finished candidate if
  any, by the task's checker) is the search's own ceiling, as Pass@N is best-of-N's.
* Two counters per problem say where the composition mattered: ``contested``, the (subtree, depth) selections
  that had more children than free slots (elsewhere every child is kept, whatever the reward), and ``reranked``,
  those among them whose kept set differs from the top children by ``Q̂^π`` alone (always 0 for ``pqv``; for
  ``pav``, the selections the advantage term changed).
* ``start="root"`` (default, the paper's literal reading): each subtree starts from the question alone and grows
  ×C per depth until it is ``W`` wide. ``start="samples"``: it starts from ``W`` copies of the question, so the
  first depth already samples ``W·C`` first steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pavlit.interfaces import Problem, Reward, Sampler, Search, Task
from pavlit.policy.sampler import STOP_EOS, STOP_LENGTH
from pavlit.search.picks import argmax_first, oracle_pick

__all__ = ["DVTS", "BeamSearch", "TreeSearch"]

STARTS = ("root", "samples")


@dataclass
class _Candidate:
    steps: tuple[str, ...]
    reward: float
    value: float
    depth: int


@dataclass
class _Subtree:
    width: int
    active: list[tuple[str, ...]]
    finished: list[_Candidate] = field(default_factory=list)

    @property
    def slots(self) -> int:
        return self.width - len(self.finished)


def _add_costs(stats: list[dict[str, int]], owners: Sequence[int], scores: Any) -> None:
    """Charge each scored prefix's verifier calls and reward tokens to the problem ``owners[i]`` it belongs to."""
    for i, p in enumerate(owners):
        stats[p]["verifier_calls"] += 1 if scores.calls is None else scores.calls[i]
        stats[p]["reward_tokens"] += 0 if scores.tokens is None else scores.tokens[i]


class TreeSearch(Search):
    """Batched step-level tree search; see the module docstring for the rules.

    Args:
        children: Next steps sampled per state (``C``).
        max_steps: Deepest response, in steps; a child at this depth is finished.
        max_step_tokens: Cap on one step's tokens (default: the sampler's ``max_new_tokens``).
        start: ``"root"`` or ``"samples"`` (see the module docstring).
        dedupe: Drop a child whose steps equal another child's of the same subtree before ranking (off in the
            paper; on, a confident policy's identical samples stop filling the beam with copies).
        final_reward: Pick the answer among the finished candidates by this composition's ``value`` (e.g. an
            ``ORMReward``) instead of the search reward's ``Q̂^π`` (``None``, the paper); its calls are counted.
    """

    def __init__(
        self,
        children: int = 3,
        max_steps: int = 16,
        max_step_tokens: int | None = None,
        start: str = "root",
        dedupe: bool = False,
        final_reward: Reward | None = None,
    ) -> None:
        if children < 1:
            raise ValueError(f"children must be >= 1, got {children}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        self.children = children
        self.max_steps = max_steps
        self.max_step_tokens = max_step_tokens
        self.start = start
        self.dedupe = dedupe
        self.final_reward = final_reward

    def subtrees(self, budget: int) -> tuple[int, int]:
        """``(number of subtrees, width of each)`` per problem for ``budget``."""
        return 1, budget

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
        if reward is None:
            raise ValueError(f"{type(self).__name__} needs a reward composition")
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        n_subtrees, width = self.subtrees(budget)
        reward.bind(task, sampler)
        n_roots = width if self.start == "samples" else 1
        trees = [[_Subtree(width, [()] * n_roots) for _ in range(n_subtrees)] for _ in problems]
        stats = [
            {"tokens": 0, "step_samples": 0, "verifier_calls": 0, "reward_tokens": 0, "contested": 0, "reranked": 0}
            for _ in problems
        ]
        depth = 0
        while depth < self.max_steps:
            states = [
                (p, t, steps)
                for p, subtrees in enumerate(trees)
                for t, tree in enumerate(subtrees)
                for steps in tree.active
            ]
            if not states:
                break
            depth += 1
            out = sampler.next_step(
                [problems[p].prompt + "".join(steps) for p, _, steps in states],
                n=self.children,
                delimiter=task.step_delimiter,
                max_new_tokens=self.max_step_tokens,
                seed=seed if depth == 1 else None,  # one seed per search; later depths continue its stream
            )
            # Children grouped by subtree, in state order then sample order (the tie-break order).
            kids: dict[tuple[int, int], list[tuple[tuple[str, ...], bool]]] = {}
            for (p, t, steps), texts, reasons, ids in zip(states, out.texts, out.stop_reasons, out.token_ids):
                stats[p]["tokens"] += sum(len(i) for i in ids)
                stats[p]["step_samples"] += len(texts)
                group = kids.setdefault((p, t), [])
                for text, reason in zip(texts, reasons):
                    child = (*steps, text) if text else steps
                    done = (
                        reason in (STOP_EOS, STOP_LENGTH)
                        or task.is_final_step(text)
                        or len(child) >= self.max_steps
                        or depth >= self.max_steps
                    )
                    if self.dedupe and any(child == other for other, _ in group):
                        continue
                    group.append((child, done))
            flat = [(key, child, done) for key, group in kids.items() for child, done in group]
            scores = reward.score(
                [problems[key[0]] for key, _, _ in flat], [c for _, c, _ in flat], [d for *_, d in flat]
            )
            rewards, values = scores.reward.tolist(), scores.value.tolist()
            _add_costs(stats, [p for (p, _), _, _ in flat], scores)
            offset = 0
            for (p, t), group in kids.items():
                tree = trees[p][t]
                ranked = sorted(range(len(group)), key=lambda j: (-rewards[offset + j], j))[: tree.slots]
                if len(group) > tree.slots:  # the ranking dropped someone: here the composition decides
                    stats[p]["contested"] += 1
                    by_value = sorted(range(len(group)), key=lambda j: (-values[offset + j], j))[: tree.slots]
                    stats[p]["reranked"] += set(by_value) != set(ranked)
                tree.active = []
                for j in ranked:  # best first
                    child, done = group[j]
                    if done:
                        tree.finished.append(_Candidate(child, rewards[offset + j], values[offset + j], depth))
                    else:
                        tree.active.append(child)
                offset += len(group)
        finals = self._final_values(problems, trees, stats, task, sampler)
        results = []
        for p, subtrees in enumerate(trees):
            candidates = [c for tree in subtrees for c in tree.finished]
            if not candidates:
                raise RuntimeError("tree search ended without a finished candidate")  # max_steps finishes every child
            best = candidates[argmax_first(finals[p] if finals is not None else [c.value for c in candidates])]
            correct = [task.score(problems[p], "".join(c.steps)) >= 0.5 for c in candidates]
            oracle = candidates[oracle_pick(correct)]
            results.append(
                {
                    "response": "".join(best.steps),
                    "steps": list(best.steps),
                    "value": best.value,
                    "candidates": len(candidates),
                    "depth": depth,
                    **stats[p],
                    "picks": {"oracle": "".join(oracle.steps)},  # the search's ceiling: any finished candidate
                    "pool": [{"response": "".join(c.steps), "reward": c.reward, "value": c.value} for c in candidates],
                }
            )
        return results

    def _final_values(
        self, problems: Sequence[Problem], trees: list[list[_Subtree]], stats: list[dict], task: Task, sampler: Sampler
    ) -> list[list[float]] | None:
        """Each problem's finished candidates scored by ``final_reward`` in one call, or ``None`` without it."""
        if self.final_reward is None:
            return None
        self.final_reward.bind(task, sampler)
        flat = [(p, c) for p, subtrees in enumerate(trees) for tree in subtrees for c in tree.finished]
        scores = self.final_reward.score([problems[p] for p, _ in flat], [c.steps for _, c in flat], [True] * len(flat))
        _add_costs(stats, [p for p, _ in flat], scores)
        values: list[list[float]] = [[] for _ in problems]
        for (p, _), value in zip(flat, scores.value.tolist()):
            values[p].append(value)
        return values


class BeamSearch(TreeSearch):
    """Step-level beam search of width ``B`` (the budget), ``C`` children per state, global top-B (docs/method.md §5).

    Args:
        children: Next steps sampled per state (``C``, paper: 3).
        max_steps: Deepest response, in steps.
        max_step_tokens: Cap on one step's tokens (default: the sampler's).
        start: ``"root"`` (grow ×C from the question until width B) or ``"samples"`` (start from B copies).
        dedupe: Drop duplicate children before ranking.
        final_reward: Composition that picks the answer among finished candidates (``None``: ``Q̂^π``, the paper).
    """

    def __repr__(self) -> str:
        final = "" if self.final_reward is None else f", final_reward={type(self.final_reward).__name__}"
        return f"BeamSearch(children={self.children}, start={self.start!r}{final})"


class DVTS(TreeSearch):
    """Diverse verifier tree search: ``max(1, N // M)`` independent greedy subtrees, ``M`` children per state.

    Each subtree keeps only its best child per depth, so at budget N the search follows N / M diverse paths
    instead of one beam; it costs about N step samples per depth where beam search of width N costs C·N.

    Args:
        children: ``M``, next steps sampled per state of a subtree (search-and-learn's default: 4).
        max_steps: Deepest response, in steps.
        max_step_tokens: Cap on one step's tokens (default: the sampler's).
        dedupe: Drop duplicate children before ranking.
        final_reward: Composition that picks the answer among finished candidates (``None``: ``Q̂^π``).
    """

    def __init__(
        self,
        children: int = 4,
        max_steps: int = 16,
        max_step_tokens: int | None = None,
        dedupe: bool = False,
        final_reward: Reward | None = None,
    ) -> None:
        super().__init__(
            children=children,
            max_steps=max_steps,
            max_step_tokens=max_step_tokens,
            dedupe=dedupe,
            final_reward=final_reward,
        )

    def subtrees(self, budget: int) -> tuple[int, int]:
        return max(1, budget // self.children), 1

    def __repr__(self) -> str:
        final = "" if self.final_reward is None else f", final_reward={type(self.final_reward).__name__}"
        return f"DVTS(children={self.children}{final})"
