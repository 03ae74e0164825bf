"""A user's own problems from JSON Lines files, in GSM8K or MATH format.

One JSON object per line. GSM8K rows (``{"question": ..., "answer": "...\\n#### 72"}``) carry a solution whose
last line is ``#### n``; its lines, with the ``<<48/2=24>>`` calculator annotations removed, become the reference
steps. MATH rows (``{"problem": ..., "solution": "... \\boxed{\\frac{1}{2}}."}``) carry a solution with a
``\\boxed{}`` answer; its non-blank lines become the reference steps. A row whose answer field is a single line
without any marker (``{"question": ..., "answer": "42"}``) is taken as the bare answer, with no reference steps.

Responses are scored by extracting their final answer in the same ``style`` and comparing it exactly
(:func:`pavlit.tasks.answers.answers_match`: numbers as fractions, other answers as normalised strings).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pavlit.interfaces import SPLITS, Problem, Task
from pavlit.jobs.jsonl import json_objects
from pavlit.tasks.answers import answers_match, extract_answer, has_final_answer, normalize_answer, split_solution

__all__ = ["JsonlTask"]

_CALCULATOR = re.compile(r"<<[^<>]*>>")
# The answer markers of each style: a solution holding one is never taken as a bare answer, even when it is empty.
_MARKERS = {
    "gsm8k": re.compile(r"####"),
    "math": re.compile(r"\\boxed|\\fbox"),
    "auto": re.compile(r"####|\\boxed|\\fbox|\banswer\s*(?::|is\b)|<answer>", re.IGNORECASE),
}
_QUESTION_FIELDS = ("question", "problem")
_ANSWER_FIELDS = {"gsm8k": ("answer",), "math": ("solution", "answer"), "auto": ("answer", "solution")}


class JsonlTask(Task):
    """Problems read from JSONL files, one file (or list of files) per split.

    Args:
        train_path: The training split's file(s).
        validation_path: The validation split's file(s), if any.
        test_path: The test split's file(s), if any.
        style: Where answers live: ``"gsm8k"`` (``#### n``), ``"math"`` (``\\boxed{}``) or ``"auto"`` (either,
            and ``Answer: n``; the last marker wins).
        question_field: The field holding the question; ``None`` takes the first of ``question``, ``problem``
            present in each row.
        answer_field: The field holding the solution or answer; ``None`` takes the first present of ``answer``
            (``gsm8k``), ``solution`` then ``answer`` (``math``), or ``answer`` then ``solution`` (``auto``).
        id_field: A field holding a unique problem id; ``None`` numbers rows ``<split>-<n>``.
    """

    def __init__(
        self,
        train_path: str | list[str],
        validation_path: str | list[str] | None = None,
        test_path: str | list[str] | None = None,
        style: Literal["gsm8k", "math", "auto"] = "auto",
        question_field: str | None = None,
        answer_field: str | None = None,
        id_field: str | None = None,
    ) -> None:
        if style not in _ANSWER_FIELDS:
            raise ValueError(f"style must be 'gsm8k', 'math' or 'auto', got {style!r}")
        self.paths = {"train": train_path, "validation": validation_path, "test": test_path}
        self.style = style
        self.question_field = question_field
        self.answer_field = answer_field
        self.id_field = id_field
        self._cache: dict[str, tuple[Problem, ...]] = {}

    def problems(self, split: str) -> Sequence[Problem]:
        """The problems of ``split``, read once and cached.

        Raises:
            ValueError: If the split has no file, or a file is empty or has a malformed line (the message names
                the file and line).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._cache:
            paths = self.paths[split]
            if paths is None:
                raise ValueError(f"JsonlTask has no {split} file: set {split}_path")
            self._cache[split] = self._read(split, [paths] if isinstance(paths, str) else list(paths))
        return self._cache[split]

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the final answer of ``response`` (in this task's ``style``) matches the problem's answer."""
        return float(answers_match(extract_answer(response, self.style), problem.answer))

    def extract_answer(self, response: str) -> str | None:
        """The normalised final answer of ``response``, or ``None``."""
        answer = extract_answer(response, self.style)
        return None if answer is None else normalize_answer(answer)

    def is_final_step(self, step: str) -> bool:
        """A step is final when it states an answer in this task's ``style``."""
        return has_final_answer(step, self.style)

    def _read(self, split: str, paths: list[str]) -> tuple[Problem, ...]:
        problems: list[Problem] = []
        ids: dict[str, str] = {}
        for path in paths:
            if not os.path.isfile(path):
                what = "a directory" if os.path.isdir(path) else "no such file"
                raise FileNotFoundError(f"JsonlTask {split}_path: {path!r} is {what}; expected a JSON Lines file")
            n_rows = 0
            rows = json_objects(path, invalid="invalid JSON ({msg}); expected one JSON object per line")
            for where, row in rows:
                problem = self._parse(split, len(problems), row, where)
                if problem.id in ids:
                    raise ValueError(f"{where}: duplicate id {problem.id!r} (first at {ids[problem.id]})")
                ids[problem.id] = where
                problems.append(problem)
                n_rows += 1
            if n_rows == 0:
                raise ValueError(f"{path}: empty file; expected one JSON object per line")
        return tuple(problems)

    def _field(self, row: Mapping[str, Any], configured: str | None, defaults: Sequence[str], where: str) -> str:
        names = (configured,) if configured is not None else tuple(defaults)
        for name in names:
            if name in row:
                value = row[name]
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise ValueError(f"{where}: field {name!r} should be a string, got {type(value).__name__}")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{where}: field {name!r} is {value} (a JSON NaN or Infinity); expected a string")
                return str(value)
        raise ValueError(f"{where}: missing field {' or '.join(map(repr, names))} (row has {sorted(row)})")

    def _parse(self, split: str, index: int, row: dict[str, Any], where: str) -> Problem:
        question = self._field(row, self.question_field, _QUESTION_FIELDS, where)
        if not question.strip():
            name = self.question_field or next(n for n in _QUESTION_FIELDS if n in row)
            raise ValueError(f"{where}: field {name!r} is empty; expected the problem's text")
        solution = self._field(row, self.answer_field, _ANSWER_FIELDS[self.style], where)
        solution = _CALCULATOR.sub("", solution)
        answer = extract_answer(solution, self.style)
        steps: tuple[str, ...] | None = split_solution(solution, self.step_delimiter)
        marked = _MARKERS[self.style].search(solution) is not None
        if answer is None and len(steps) == 1 and not marked:
            answer, steps = solution.strip(), None
        if answer is None and marked:
            raise ValueError(
                f"{where}: the solution's answer marker has no value ({solution.strip()[-40:]!r}); expected e.g. "
                "'#### 42' or \\boxed{42}"
            )
        if answer is None:
            expected = {"gsm8k": "a final '#### <answer>' line", "math": "a \\boxed{...} answer"}.get(
                self.style, "a '#### <answer>' line, a \\boxed{...} or an 'Answer: ...' line"
            )
            raise ValueError(f"{where}: no extractable answer in the solution; expected {expected}")
        problem_id = f"{split}-{index}" if self.id_field is None else self._field(row, self.id_field, (), where)
        return Problem(
            id=problem_id,
            prompt=question.rstrip() + self.step_delimiter,
            answer=answer,
            reference_steps=steps,
            metadata={"source": where.rsplit(":", 1)[0], "row": row},
        )
