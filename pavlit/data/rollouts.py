"""Step labels as rollouts (pure): grouping prefix records by seed rollout, the problem split, truncation.

See :mod:`pavlit.data.step_labels` for the choices (dedupe and pooling, split by problem, cut at a step boundary).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pavlit.data.reading import BadRecords
from pavlit.steps import StepTokens

__all__ = ["Rollout", "group_rollouts", "is_validation_problem", "split_problems", "truncate_at_step"]


@dataclass
class Rollout:
    """The labelled prefixes of one seed rollout.

    Attributes:
        problem_id: The problem.
        prompt: The question text.
        steps: The deepest prefix's steps (the rollout as far as it was labelled).
        labels: ``h → (n_correct, n_rollouts)`` for the prefixes that carry a label.
        outcome: The seed rollout's final outcome (0/1).
        where: ``h → file:line`` of each label's record, for error messages.
    """

    problem_id: str
    prompt: str
    steps: list[str]
    labels: dict[int, tuple[int, int]]
    outcome: float
    where: dict[int, str]


def group_rollouts(
    records: Sequence[tuple[str, Mapping[str, Any]]], bad: BadRecords, dedupe: bool = True
) -> tuple[list[Rollout], Counter]:
    """Group prefix records by seed rollout ``(problem_id, policy, source, seed_index)``; pool identical prefixes.

    Returns:
        The rollouts (sorted by key, so the result does not depend on file order) and counts
        (``duplicates``: records repeated within a rollout; ``pooled``: labels merged into an earlier identical
        prefix of another rollout).
    """
    stats: Counter = Counter()
    groups: dict[tuple, dict[int, tuple[str, Mapping[str, Any]]]] = defaultdict(dict)
    for where, record in records:
        key = (record["problem_id"], record["policy"], record.get("source", "seed"), int(record.get("seed_index", 0)))
        h = record["step_index"]
        if h in groups[key]:
            earlier_where, earlier = groups[key][h]
            same_prefix = list(earlier["steps"]) == list(record["steps"]) and earlier["prompt"] == record["prompt"]
            counts = (record["n_correct"], record["n_rollouts"])
            earlier_counts = (earlier["n_correct"], earlier["n_rollouts"])
            if same_prefix and counts == earlier_counts:
                stats["duplicates"] += 1
            elif same_prefix:
                bad(
                    where,
                    f"the same rollout's prefix {h} appears earlier with other labels ({earlier_where}: "
                    f"{earlier_counts[0]}/{earlier_counts[1]} correct, here {counts[0]}/{counts[1]}); two label jobs "
                    "mixed? give each output folder once",
                )
            else:
                bad(where, f"another record of the same rollout and step_index {h} differs ({earlier_where})")
            continue
        groups[key][h] = (where, record)

    rollouts: list[Rollout] = []
    for key in sorted(groups):
        by_h = groups[key]
        deepest_where, deepest = by_h[max(by_h)]
        steps = list(deepest["steps"])
        rollout = Rollout(key[0], deepest["prompt"], steps, {}, float(deepest["seed_outcome"]), {})
        for h in sorted(by_h):
            where, record = by_h[h]
            if record["prompt"] != deepest["prompt"] or list(record["steps"]) != steps[:h]:
                bad(where, f"its steps are not a prefix of the same rollout's deepest record ({deepest_where})")
                continue
            rollout.labels[h] = (record["n_correct"], record["n_rollouts"])
            rollout.where[h] = where
        if rollout.labels:
            rollouts.append(rollout)

    if dedupe:
        owner: dict[tuple, tuple[int, int]] = {}
        for index, rollout in enumerate(rollouts):
            for h in sorted(rollout.labels):
                prefix = (rollout.problem_id, rollout.prompt, tuple(rollout.steps[:h]))
                if prefix not in owner:
                    owner[prefix] = (index, h)
                    continue
                first, first_h = owner[prefix]
                c, n = rollout.labels.pop(h)
                c0, n0 = rollouts[first].labels[first_h]
                rollouts[first].labels[first_h] = (c0 + c, n0 + n)
                stats["pooled"] += 1
        rollouts = [r for r in rollouts if r.labels]
    return rollouts, stats


def is_validation_problem(problem_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether ``problem_id`` belongs to validation: ``sha256(f"{seed}:{problem_id}")`` as a fraction in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_problems(problem_ids: Sequence[str], val_fraction: float, seed: int = 0) -> set[str]:
    """The validation problems: :func:`is_validation_problem`, plus the lowest-hash problem when that picks none.

    The fallback keeps a small dataset (a test, a smoke run) from ending with an empty validation set whenever
    ``val_fraction > 0`` and there are at least two problems.
    """
    unique = sorted(set(problem_ids))
    val = {p for p in unique if is_validation_problem(p, val_fraction, seed)}
    if not val and val_fraction > 0 and len(unique) >= 2:
        val = {min(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())}
    if len(val) == len(unique) and len(unique) >= 2:
        val.discard(max(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest()))
    return val


def truncate_at_step(tokens: StepTokens, max_length: int) -> StepTokens | None:
    """Cut ``tokens`` after the last prefix end that fits in ``max_length`` tokens; None if even the prompt does not.

    The cut keeps ``input_ids[: end + 1]`` of the deepest prefix that fits, so every kept label still sits on its
    step's own end token.
    """
    if len(tokens.input_ids) <= max_length:
        return tokens
    if tokens.prompt_end >= max_length:
        return None
    kept = [end for end in tokens.step_ends if end < max_length]
    cut = (kept[-1] if kept else tokens.prompt_end) + 1
    if cut <= 0:
        return None
    return StepTokens(tokens.input_ids[:cut], tokens.prompt_end, kept)
