"""The step-label data contract (DESIGN.md "Data contract for step labels").

One record per prefix. Raw counts are kept next to the mean so that later stages can re-estimate, merge
labels from several runs, or apply an unbiased Best-of-K estimate (:func:`pavlit.values.best_of_k_from_counts`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pavlit.jobs.jsonl import json_objects

#: Fields every step-label record carries, with the type a reader checks.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "problem_id": str,
    "prompt": str,
    "steps": list,
    "step_index": int,
    "n_rollouts": int,
    "n_correct": int,
    "q_mc": (float, int),
    "policy": str,
    "seed_outcome": (float, int),
    "answer": str,
}


@dataclass
class StepLabel:
    """The Monte-Carlo label of one prefix.

    Args:
        problem_id: The problem's id within its task and split.
        prompt: The question text.
        steps: The steps up to and including this one (empty for the question-only prefix, ``step_index == 0``).
        step_index: ``len(steps)``; 0 is the question-only prefix.
        n_rollouts: Completions sampled from this prefix.
        n_correct: How many of them ended with the right answer.
        q_mc: ``n_correct / n_rollouts``.
        policy: Which policy rolled out the completions (``"pi"`` or a prover's name).
        seed_outcome: Outcome (0/1) of the seed rollout this prefix comes from.
        answer: The task's reference answer.
        seed_index: Which seed rollout of the problem this prefix belongs to.
        source: ``"seed"`` for the ``n_cov`` coverage seeds, ``"first_pit"`` for first-pit seeding.
        meta: Free-form extras (e.g. tokens spent).
    """

    problem_id: str
    prompt: str
    steps: list[str]
    step_index: int
    n_rollouts: int
    n_correct: int
    q_mc: float
    policy: str
    seed_outcome: float
    answer: str
    seed_index: int = 0
    source: str = "seed"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_record(record: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` (e.g. ``"labels.jsonl:12"``) if ``record`` breaks the contract."""
    for name, expected in REQUIRED_FIELDS.items():
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r} (a step-label record needs {sorted(REQUIRED_FIELDS)})")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ValueError(f"{where}: field {name!r} should be {_type_name(expected)}, got {value!r}")
    steps = record["steps"]
    if not all(isinstance(s, str) for s in steps):
        raise ValueError(f"{where}: field 'steps' should be a list of strings")
    if any(not s.strip() for s in steps):
        raise ValueError(f"{where}: field 'steps' holds an empty step")
    if record["step_index"] != len(steps):
        raise ValueError(f"{where}: step_index {record['step_index']} != len(steps) {len(steps)}")
    n, c = record["n_rollouts"], record["n_correct"]
    if n <= 0 or not 0 <= c <= n:
        raise ValueError(f"{where}: need n_rollouts > 0 and 0 <= n_correct <= n_rollouts, got {c}/{n}")
    q = float(record["q_mc"])
    if math.isnan(q) or not 0.0 <= q <= 1.0:
        raise ValueError(f"{where}: q_mc must be in [0, 1], got {q}")
    if abs(q - c / n) > 1e-6:
        raise ValueError(f"{where}: q_mc {q} != n_correct / n_rollouts = {c}/{n}")


def _type_name(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return expected.__name__


def read_jsonl(path: str | Path, validate: bool = True) -> Iterator[dict[str, Any]]:
    """Stream records from one JSONL file, with errors that name the file and line."""
    for where, record in json_objects(Path(path), invalid="not valid JSON ({msg}); is the file truncated?"):
        if validate:
            validate_record(record, where)
        yield record


def to_trl_prm(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group prefix records by seed rollout into TRL's stepwise-supervision (PRM) schema.

    Each output row is ``{"prompt", "completions": [step, ...], "labels": [q_mc, ...]}`` for one seed rollout,
    labels kept as floats (soft MC labels; TRL casts to int only if asked). The question-only prefix has no
    completion of its own and is dropped here.
    """
    groups: dict[tuple[str, str, int, str], dict[int, Mapping[str, Any]]] = defaultdict(dict)
    prompts: dict[tuple[str, str, int, str], str] = {}
    for record in records:
        key = (record["problem_id"], record.get("source", "seed"), record.get("seed_index", 0), record["policy"])
        groups[key][record["step_index"]] = record
        prompts[key] = record["prompt"]
    rows = []
    for key in sorted(groups):
        by_index = groups[key]
        deepest = by_index[max(by_index)]
        steps = list(deepest["steps"])
        labels = []
        for h in range(1, len(steps) + 1):
            if h not in by_index:
                break
            labels.append(float(by_index[h]["q_mc"]))
        if labels:
            rows.append({"prompt": prompts[key], "completions": steps[: len(labels)], "labels": labels})
    return rows
