"""Ways to choose one response among candidates: by score, by majority vote, by score-weighted vote, by oracle."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["argmax_first", "majority_vote", "oracle_pick", "weighted_vote"]


def argmax_first(scores: Sequence[float]) -> int:
    """Index of the highest score; the earliest one on ties (so a pick never depends on sort stability)."""
    if not scores:
        raise ValueError("no candidates to pick from")
    best = 0
    for i, score in enumerate(scores):
        if score > scores[best]:
            best = i
    return best


def majority_vote(answers: Sequence[str | None]) -> int:
    """Index of the first candidate whose final answer is the most frequent one.

    Candidates without an answer (``None``) do not vote; ties go to the answer seen first. With no answer at all,
    the first candidate.
    """
    return weighted_vote(answers, [1.0] * len(answers))


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> int:
    """Index of the best-weighted candidate of the answer with the largest total weight.

    Candidates without an answer do not vote; ties between answers go to the one seen first. With no answer at
    all, the candidate with the largest weight.
    """
    if len(answers) != len(weights):
        raise ValueError(f"got {len(answers)} answers but {len(weights)} weights")
    if not answers:
        raise ValueError("no candidates to pick from")
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(weight)
    if not totals:
        return argmax_first(weights)
    winner = max(totals, key=lambda a: (totals[a], -list(totals).index(a)))
    members = [i for i, answer in enumerate(answers) if answer == winner]
    return members[argmax_first([weights[i] for i in members])]


def oracle_pick(correct: Sequence[bool]) -> int:
    """Index of the first correct candidate, else 0: the Pass@N ceiling."""
    for i, ok in enumerate(correct):
        if ok:
            return i
    if not correct:
        raise ValueError("no candidates to pick from")
    return 0
