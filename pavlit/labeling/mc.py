"""Monte-Carlo step labels for one chunk of problems (docs/method.md §3).

For every problem: ``n_cov`` seed rollouts from π give coverage of prefixes; every distinct prefix of every seed
(the question-only prefix included) gets ``n_mc`` completions, and its label is the fraction that end correct.
Optionally, first-pit seeding adds prefixes from incorrect rollouts that start in high-value states, up to the
first step where the value drops to 0, labelled with more completions.

All sampling of a chunk goes through one :class:`~pavlit.policy.sampler.Sampler` call per phase, so prefixes of
many problems share batches, and every call is seeded from ``(seed, chunk, phase)``: a chunk's records do not
depend on which rank computes it or on whether the run was interrupted before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pavlit.interfaces import Problem, Task
from pavlit.jobs.seeds import phase_seed
from pavlit.labeling.records import StepLabel
from pavlit.policy.sampler import Sampler
from pavlit.steps import split_steps
from pavlit.values import first_pit


@dataclass
class LabelArgs:
    """How many rollouts to spend where (docs/method.md §3).

    Args:
        n_cov: Seed rollouts per problem (coverage of prefixes).
        n_mc: Completions sampled from every prefix to estimate its value.
        max_steps: Longest seed rollout, in steps; prefixes deeper than this are not labelled.
        max_new_tokens: Cap on the tokens of one rollout or completion.
        first_pit: Add first-pit seeding on top of the coverage seeds.
        pit_threshold: A prefix with ``q_mc >= pit_threshold`` counts as a high-value state.
        pit_states: High-value states used per problem (the highest-valued first).
        pit_rollouts: Incorrect continuations followed from each high-value state.
        pit_n_cheap: Completions per prefix used to locate the pit (cheap MC).
        pit_n_mc: Completions per prefix used to label the prefixes up to the pit.
    """

    n_cov: int = 4
    n_mc: int = 16
    max_steps: int = 16
    max_new_tokens: int = 256
    first_pit: bool = False
    pit_threshold: float = 0.5
    pit_states: int = 2
    pit_rollouts: int = 1
    pit_n_cheap: int = 4
    pit_n_mc: int = 32

    def __post_init__(self) -> None:
        for name in ("n_cov", "n_mc", "max_steps", "max_new_tokens", "pit_states", "pit_rollouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"LabelArgs.{name} must be >= 1, got {getattr(self, name)}")
        if self.first_pit and (self.pit_n_cheap < 1 or self.pit_n_mc < 1):
            raise ValueError("LabelArgs.pit_n_cheap and pit_n_mc must be >= 1 when first_pit is on")
        if not 0.0 < self.pit_threshold <= 1.0:
            raise ValueError(f"LabelArgs.pit_threshold must be in (0, 1], got {self.pit_threshold}")


@dataclass
class ChunkResult:
    """What labeling one chunk produced."""

    labels: list[dict[str, Any]] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    generated_tokens: int = 0
    n_completions: int = 0


class _Prefixes:
    """Distinct prefixes of one chunk, each sampled once however many rollouts share it."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, tuple[str, ...]]] = []
        self.index: dict[tuple[int, tuple[str, ...]], int] = {}

    def add(self, problem_index: int, steps: Sequence[str]) -> int:
        key = (problem_index, tuple(steps))
        if key not in self.index:
            self.index[key] = len(self.keys)
            self.keys.append(key)
        return self.index[key]


def _estimate(
    sampler: Sampler,
    task: Task,
    problems: Sequence[Problem],
    prefixes: Sequence[tuple[int, tuple[str, ...]]],
    n: int,
    args: LabelArgs,
    seed: int,
) -> tuple[list[int], list[list[str]], int]:
    """``n`` completions of each prefix: (number correct, completion texts, generated tokens)."""
    if not prefixes:
        return [], [], 0
    texts = [problems[p].prompt + "".join(steps) for p, steps in prefixes]
    out = sampler.complete(texts, n=n, max_new_tokens=args.max_new_tokens, delimiter=task.step_delimiter, seed=seed)
    n_correct = []
    for (p, steps), completions in zip(prefixes, out.texts):
        head = "".join(steps)
        n_correct.append(sum(int(task.score(problems[p], head + c) >= 0.5) for c in completions))
    return n_correct, out.texts, out.generated_tokens


def label_chunk(
    sampler: Sampler,
    task: Task,
    problems: Sequence[Problem],
    args: LabelArgs,
    chunk: int,
    seed: int = 0,
    policy_name: str = "pi",
    provers: Mapping[str, Sampler] | None = None,
) -> ChunkResult:
    """Seed rollouts, Monte-Carlo labels (and optionally first-pit seeding) for ``problems``.

    Args:
        sampler: Samples from the base policy π (seeds and π's labels).
        task: Scores responses and defines the step delimiter.
        problems: The chunk's problems.
        args: Rollout budgets.
        chunk: The chunk's number (part of every sampling seed).
        seed: The job's seed.
        policy_name: Name recorded in ``policy`` for π's labels.
        provers: Other policies (name → sampler) whose own completions from the same prefixes are labelled too,
            e.g. a fixed checkpoint prover; Best-of-K provers need none (they follow from π's counts).

    Returns:
        A :class:`ChunkResult` with one label record per (seed rollout, prefix) and the seed rollouts.
    """
    result = ChunkResult()
    delimiter = task.step_delimiter
    seeds = sampler.complete(
        [p.prompt for p in problems],
        n=args.n_cov,
        max_new_tokens=args.max_new_tokens,
        max_steps=args.max_steps,
        delimiter=delimiter,
        seed=phase_seed(seed, chunk, "seeds"),
    )
    result.generated_tokens += seeds.generated_tokens
    result.n_completions += seeds.num_samples

    prefixes = _Prefixes()
    seed_rows: list[tuple[int, int, list[str], float, list[int]]] = []  # (problem, seed index, steps, outcome, ids)
    for p, (problem, responses) in enumerate(zip(problems, seeds.texts)):
        for s, response in enumerate(responses):
            steps = split_steps(response, delimiter)[: args.max_steps]
            if not "".join(steps).strip():
                steps = []  # a blank response has no step to label; its question-only prefix still counts
            outcome = float(task.score(problem, "".join(steps)) >= 0.5)
            result.rollouts.append(
                {"problem_id": problem.id, "prompt": problem.prompt, "response": "".join(steps), "correct": outcome}
            )
            seed_rows.append((p, s, steps, outcome, [prefixes.add(p, steps[:h]) for h in range(len(steps) + 1)]))

    policies: dict[str, Sampler] = {policy_name: sampler, **(provers or {})}
    counts: dict[str, list[int]] = {}
    completions_pi: list[list[str]] = []
    for name, policy_sampler in policies.items():
        n_correct, completions, tokens = _estimate(
            policy_sampler, task, problems, prefixes.keys, args.n_mc, args, phase_seed(seed, chunk, f"mc:{name}")
        )
        counts[name] = n_correct
        result.generated_tokens += tokens
        result.n_completions += len(prefixes.keys) * args.n_mc
        if name == policy_name:
            completions_pi = completions

    for p, s, steps, outcome, prefix_ids in seed_rows:
        for name, n_correct in counts.items():
            for h, prefix_id in enumerate(prefix_ids):
                result.labels.append(
                    _record(problems[p], steps[:h], args.n_mc, n_correct[prefix_id], name, outcome, s, "seed")
                )

    if args.first_pit:
        _first_pit(
            sampler,
            task,
            problems,
            args,
            chunk,
            seed,
            policy_name,
            prefixes,
            counts[policy_name],
            completions_pi,
            result,
        )
    return result


def _first_pit(
    sampler: Sampler,
    task: Task,
    problems: Sequence[Problem],
    args: LabelArgs,
    chunk: int,
    seed: int,
    policy_name: str,
    prefixes: _Prefixes,
    n_correct: Sequence[int],
    completions: Sequence[Sequence[str]],
    result: ChunkResult,
) -> None:
    """First-pit seeding: from high-value states, follow incorrect continuations down to the first 0-value step."""
    delimiter = task.step_delimiter
    by_problem: dict[int, list[int]] = {}
    for prefix_id, (p, _) in enumerate(prefixes.keys):
        if n_correct[prefix_id] / args.n_mc >= args.pit_threshold:
            by_problem.setdefault(p, []).append(prefix_id)

    # Each candidate: (problem, state steps, continuation steps) for an incorrect completion of a high-value state.
    candidates: list[tuple[int, tuple[str, ...], list[str]]] = []
    for p, prefix_ids in sorted(by_problem.items()):
        best = sorted(prefix_ids, key=lambda i: (-n_correct[i], i))[: args.pit_states]
        for prefix_id in best:
            _, state = prefixes.keys[prefix_id]
            wrong = [c for c in completions[prefix_id] if task.score(problems[p], "".join(state) + c) < 0.5]
            for completion in wrong[: args.pit_rollouts]:
                continuation = split_steps(completion, delimiter)[: max(0, args.max_steps - len(state))]
                if continuation:
                    candidates.append((p, state, continuation))
    if not candidates:
        return

    # Cheap MC on every prefix along every candidate, in one batched call; then the first prefix valued 0.
    probe = _Prefixes()
    along: list[list[int]] = []
    for p, state, continuation in candidates:
        along.append([probe.add(p, state + tuple(continuation[:j])) for j in range(1, len(continuation) + 1)])
    cheap, _, tokens = _estimate(
        sampler, task, problems, probe.keys, args.pit_n_cheap, args, phase_seed(seed, chunk, "pit:cheap")
    )
    result.generated_tokens += tokens
    result.n_completions += len(probe.keys) * args.pit_n_cheap

    depth = max(len(ids) for ids in along)
    q = torch.zeros(len(candidates), depth + 1)
    mask = torch.zeros(len(candidates), depth + 1, dtype=torch.bool)
    for row, ids in enumerate(along):
        q[row, 0] = 1.0  # the high-value state itself (never a pit)
        mask[row, : len(ids) + 1] = True
        for j, prefix_id in enumerate(ids, start=1):
            q[row, j] = cheap[prefix_id] / args.pit_n_cheap
    pits = first_pit(q, mask=mask)

    final = _Prefixes()
    rows: list[tuple[int, int, list[int], tuple[str, ...]]] = []
    for row, (p, state, continuation) in enumerate(candidates):
        pit = int(pits[row])
        if pit < 0:
            continue  # never reached 0 on the cheap estimate: no pit on this path
        steps = state + tuple(continuation[:pit])
        rows.append((row, p, [final.add(p, steps[:h]) for h in range(len(steps) + 1)], steps))
    labelled, _, tokens = _estimate(
        sampler, task, problems, final.keys, args.pit_n_mc, args, phase_seed(seed, chunk, "pit:mc")
    )
    result.generated_tokens += tokens
    result.n_completions += len(final.keys) * args.pit_n_mc
    for row, p, prefix_ids, steps in rows:
        for h, prefix_id in enumerate(prefix_ids):
            result.labels.append(
                _record(problems[p], steps[:h], args.pit_n_mc, labelled[prefix_id], policy_name, 0.0, row, "first_pit")
            )


def _record(
    problem: Problem,
    steps: Sequence[str],
    n_rollouts: int,
    n_correct: int,
    policy: str,
    seed_outcome: float,
    seed_index: int,
    source: str,
) -> dict[str, Any]:
    return StepLabel(
        problem_id=problem.id,
        prompt=problem.prompt,
        steps=list(steps),
        step_index=len(steps),
        n_rollouts=n_rollouts,
        n_correct=n_correct,
        q_mc=n_correct / n_rollouts,
        policy=policy,
        seed_outcome=seed_outcome,
        answer=problem.answer,
        seed_index=seed_index,
        source=source,
    ).to_dict()
