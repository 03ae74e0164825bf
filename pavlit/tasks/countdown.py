"""Countdown: combine a few numbers with + - * / into a target, one operation per line.

A problem gives numbers and a target; each step combines two of the numbers still left into a new one and shows
what is left, and the response ends with the target as its answer::

    prompt    "Make 29 from 8 3 5 2.\\n"
    response  "8+5=13 (left: 13 3 2)\\n13*2=26 (left: 26 3)\\n26+3=29 (left: 29)\\nAnswer: 29\\n"

Why this task (issue 15): on :mod:`pavlit.tasks.arithmetic` every step is forced, so the policy is confident, beams
hold copies of one path and the advantage term never decides anything. Here **steps are choices**: at every state
there are several valid next steps, some of which keep the target reachable and some of which walk into dead
ends, which is the situation in which progress (the change in the chance of success under a prover) carries
information that the value of the state alone does not rank.

Rules (what :func:`check` enforces, and so what :meth:`CountdownTask.score` rewards):

* A step is ``a op b=c (left: ...)`` with ``op`` one of ``+ - * /``; ``a`` and ``b`` must be among the numbers
  left (two different entries; a number listed twice may be used twice), ``c`` must be exactly ``a op b``, a
  non-negative integer (``-`` needs ``a >= b``; ``/`` needs ``b > 0`` dividing ``a``), and the ``left`` list must
  be the numbers left after the step (any order).
* **Every number is used exactly once**, so a solution has ``len(numbers) - 1`` steps, and the last number left
  must be the target; then the final line ``Answer: <target>``. Reward 1 iff all of that holds.

Problems come from an exact solver (:func:`solutions`, depth-first over the multiset of numbers left): numbers
and a target are drawn uniformly, and only solvable draws are kept. The solver writes commutative operations
with the larger operand first, skips steps whose result is 0 or above ``max_value`` (the checker still accepts
them), and shows the result first in the ``left`` list followed by the untouched numbers in their order. The
reference solution of a problem (the SFT target) is drawn **uniformly among its distinct solutions**, so the
policy learns several ways to start, not one canonical order.

Measured with the tiny policy (4 layers, width 128, 1000 SFT steps of batch 32 on 4,000 problems; README
"Countdown"): at ``difficulty=1`` pass@1 0.17, pass@16 0.81, 5.7 distinct first steps among 8 samples with 61% of
states offering both a reachable and a dead-end one; at ``difficulty=2`` pass@1 0.01 (it picks openings about as a
random valid step would, then fakes the last line's arithmetic to land on the target).

``difficulty`` sets the count of numbers, their range and the target range (each can be overridden):

========== ======= ========= ========== ====================
difficulty numbers each in   target in  steps (with Answer:)
========== ======= ========= ========== ====================
1          3       1..15     5..50      3
2          4       1..10     10..99     4
3          4       1..20     10..199    4
4          5       1..20     10..199    5
========== ======= ========= ========== ====================
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from pavlit.interfaces import SPLITS, Problem, Task
from pavlit.tasks.answers import extract_answer, normalize_answer

__all__ = ["CheckResult", "CountdownTask", "check", "format_prompt", "format_step", "numbers_left", "solutions"]

#: ``difficulty -> (count of numbers, largest number, smallest target, largest target)``.
DIFFICULTIES = {1: (3, 15, 5, 50), 2: (4, 10, 10, 99), 3: (4, 20, 10, 199), 4: (5, 20, 10, 199)}
_PROMPT_TEMPLATE = "Make {target} from {numbers}.\n"
_ANSWER_TEMPLATE = "Answer: {answer}\n"
_ANSWER_LINE = re.compile(r"^\s*Answer:")
_STEP = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*\(\s*left:([-\d\s]*)\)\s*$")
_INTEGER = re.compile(r"-?\d+")
_PROMPT = re.compile(r"^Make (\d+) from ((?:\d+ ?)+)\.\s*$")


def format_prompt(numbers: Sequence[int], target: int) -> str:
    """The prompt ``"Make <target> from <n1> <n2> ....\\n"`` (ends with the step delimiter)."""
    return _PROMPT_TEMPLATE.format(target=target, numbers=" ".join(map(str, numbers)))


def format_step(a: int, op: str, b: int, result: int, left: Sequence[int]) -> str:
    """One step line, ``"a op b=result (left: ...)\\n"``."""
    return f"{a}{op}{b}={result} (left: {' '.join(map(str, left))})\n"


def _apply(a: int, op: str, b: int) -> int | None:
    """``a op b`` when it is a non-negative integer, else ``None``."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a >= b else None
    return a // b if b > 0 and a % b == 0 else None


def _moves(numbers: tuple[int, ...], max_value: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every distinct canonical step from ``numbers``: ``(step text, numbers left)``, in a fixed order."""
    seen: dict[str, tuple[int, ...]] = {}
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            a, b = max(numbers[i], numbers[j]), min(numbers[i], numbers[j])
            rest = tuple(x for k, x in enumerate(numbers) if k not in (i, j))
            for op in "+-*/":
                result = _apply(a, op, b)
                if result is None or result == 0 or result > max_value:
                    continue
                left = (result, *rest)
                seen.setdefault(format_step(a, op, b, result, left), left)
    return list(seen.items())


def solutions(numbers: Sequence[int], target: int, max_value: int = 10_000) -> list[tuple[str, ...]]:
    """Every distinct solution (tuple of step lines, without the answer line) the solver can write, sorted.

    Two solutions are distinct when their texts differ: another pair, another operation, or the same operations
    in another order. Commutative operations are written larger operand first, so ``3+5`` and ``5+3`` are one.

    Args:
        numbers: The numbers to combine (all must be used).
        target: The number the last step must produce.
        max_value: Steps whose result exceeds this are not explored.
    """
    found: set[tuple[str, ...]] = set()
    memo: dict[tuple[int, ...], list[tuple[str, ...]]] = {}

    def search(state: tuple[int, ...]) -> list[tuple[str, ...]]:
        if len(state) == 1:
            return [()] if state[0] == target else []
        if state in memo:
            return memo[state]
        out = []
        for step, left in _moves(state, max_value):
            out.extend((step, *tail) for tail in search(left))
        memo[state] = out
        return out

    found.update(search(tuple(numbers)))
    return sorted(found)


def solvable(numbers: Sequence[int], target: int, max_value: int = 10_000) -> bool:
    """Whether some solution exists (stops at the first one found)."""
    memo: dict[tuple[int, ...], bool] = {}

    def search(state: tuple[int, ...]) -> bool:
        if len(state) == 1:
            return state[0] == target
        key = tuple(sorted(state))
        if key not in memo:
            memo[key] = any(search(left) for _, left in _moves(state, max_value))
        return memo[key]

    return search(tuple(numbers))


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check` found in a response.

    Attributes:
        solved: Every step valid, every number used, the target reached and stated on the answer line.
        first_invalid: Index (0-based, in the response's lines) of the first line at fault, or ``None`` when
            solved; a missing answer line or unused numbers point at the line after the last one.
        reason: Why it failed, naming the line (empty when solved).
    """

    solved: bool
    first_invalid: int | None = None
    reason: str = ""


def check(numbers: Sequence[int], target: int, response: str) -> CheckResult:
    """Check a response step by step against the rules in the module docstring.

    Args:
        numbers: The problem's numbers.
        target: The problem's target.
        response: The steps and the final answer line, one per line (blank lines are ignored).
    """
    lines = [line for line in response.split("\n") if line.strip()]
    left = Counter(numbers)
    for index, line in enumerate(lines):
        if _ANSWER_LINE.match(line):
            if sum(left.values()) != 1:
                unused = " ".join(map(str, sorted(left.elements())))
                return CheckResult(False, index, f"line {index + 1} ({line.strip()!r}): numbers {unused} are left")
            (last,) = left.elements()
            stated = extract_answer(line, style="answer")
            if last != target or stated is None or normalize_answer(stated) != str(target):
                return CheckResult(False, index, f"line {index + 1} ({line.strip()!r}): {last} left, target {target}")
            if index != len(lines) - 1:
                return CheckResult(False, index + 1, f"line {index + 2}: text after the answer line")
            return CheckResult(True)
        fail = _check_step(line, left)
        if fail:
            return CheckResult(False, index, f"line {index + 1} ({line.strip()!r}): {fail}")
    return CheckResult(False, len(lines), f"line {len(lines) + 1}: no 'Answer:' line")


def numbers_left(numbers: Sequence[int], steps: Sequence[str]) -> list[int] | None:
    """The numbers left after ``steps`` (step lines, no answer line), sorted; ``None`` if a step is invalid."""
    left = Counter(numbers)
    for line in steps:
        if line.strip() and _check_step(line, left):
            return None
    return sorted(left.elements())


def _check_step(line: str, left: Counter) -> str:
    """Apply one step to ``left`` in place; the reason it is invalid, or ``""``."""
    match = _STEP.match(line)
    if match is None:
        return "not of the form 'a op b=c (left: ...)'"
    a, op, b, c = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
    if not all(_INTEGER.fullmatch(x) for x in match.group(5).split()):
        return "the 'left' list is not numbers separated by spaces"
    shown = Counter(int(x) for x in match.group(5).split())
    needed = Counter([a, b])
    if any(left[x] < k for x, k in needed.items()):
        missing = a if left[a] < needed[a] else b
        return f"{missing} is not among the numbers left ({' '.join(map(str, sorted(left.elements())))})"
    result = _apply(a, op, b)
    if result is None:
        return f"{a}{op}{b} is not a non-negative integer"
    if result != c:
        return f"{a}{op}{b} is {result}, not {c}"
    left.subtract(needed)
    left[result] += 1
    for key in [k for k, v in left.items() if v <= 0]:
        del left[key]
    if shown != left:
        return f"the numbers left are {' '.join(map(str, sorted(left.elements())))}"
    return ""


class CountdownTask(Task):
    """Countdown problems solved one operation per line (see the module docstring for rules and design).

    Splits come from independent random streams per ``(seed, split)`` and are de-duplicated by the pair
    (multiset of numbers, target) in the order test, validation, train: the test set depends only on the
    generator settings and ``n_test``, so growing the training set never changes what a model is evaluated on.

    Args:
        difficulty: Preset for the count of numbers, their range and the target range (1-4, module docstring).
        seed: Seed of the problem generator (and of the reference-solution draws).
        n_train: Number of training problems.
        n_validation: Number of validation problems.
        n_test: Number of test problems.
        n_numbers: Override the preset's count of numbers (>= 2).
        max_number: Override the preset's largest number (numbers are drawn from ``1..max_number``).
        min_target: Override the preset's smallest target.
        max_target: Override the preset's largest target.
        max_value: Largest intermediate result the solver explores (the checker accepts any).
    """

    def __init__(
        self,
        difficulty: int = 2,
        seed: int = 0,
        n_train: int = 2000,
        n_validation: int = 200,
        n_test: int = 200,
        n_numbers: int | None = None,
        max_number: int | None = None,
        min_target: int | None = None,
        max_target: int | None = None,
        max_value: int = 999,
    ) -> None:
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty}")
        if min(n_train, n_validation, n_test) < 0:
            raise ValueError("split sizes must be non-negative")
        preset = DIFFICULTIES[difficulty]
        self.difficulty = difficulty
        self.seed = seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.n_numbers = preset[0] if n_numbers is None else n_numbers
        self.max_number = preset[1] if max_number is None else max_number
        self.min_target = preset[2] if min_target is None else min_target
        self.max_target = preset[3] if max_target is None else max_target
        self.max_value = max_value
        if self.n_numbers < 2:
            raise ValueError(f"n_numbers must be >= 2, got {self.n_numbers}")
        if self.max_number < 1:
            raise ValueError(f"max_number must be >= 1, got {self.max_number}")
        if not 0 <= self.min_target <= self.max_target:
            raise ValueError(f"need 0 <= min_target <= max_target, got {self.min_target}..{self.max_target}")
        self._splits: dict[str, tuple[Problem, ...]] | None = None

    def problems(self, split: str) -> Sequence[Problem]:
        """The problems of ``split``; generated once per task object and cached."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self._splits is None:
            self._splits = self._generate()
        return self._splits[split]

    def check(self, problem: Problem, response: str) -> CheckResult:
        """:func:`check` with the problem's numbers and target: which line fails first, and why."""
        if "numbers" in problem.metadata and "target" in problem.metadata:
            return check(problem.metadata["numbers"], problem.metadata["target"], response)
        match = _PROMPT.match(problem.prompt)
        if match is None:
            raise ValueError(f"problem {problem.id}: prompt {problem.prompt!r} is not 'Make <target> from <numbers>.'")
        return check([int(x) for x in match.group(2).split()], int(match.group(1)), response)

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff every step is valid, every number is used and the answer line states the target."""
        return float(self.check(problem, response).solved)

    def extract_answer(self, response: str) -> str | None:
        """The normalised value of the last ``Answer:`` line, or ``None``."""
        answer = extract_answer(response, style="answer")
        return None if answer is None else normalize_answer(answer)

    def is_final_step(self, step: str) -> bool:
        """A step is final when it is the ``Answer:`` line."""
        return _ANSWER_LINE.match(step) is not None

    def _generate(self) -> dict[str, tuple[Problem, ...]]:
        seen: set[tuple[tuple[int, ...], int]] = set()
        splits = {}
        for split in ("test", "validation", "train"):
            # A string seed is hashed with SHA-512 by ``random``: stable across runs and PYTHONHASHSEED.
            rng = random.Random(
                f"pavlit-countdown:{self.seed}:{self.n_numbers}:{self.max_number}:{self.min_target}:"
                f"{self.max_target}:{self.max_value}:{split}"
            )
            problems = []
            attempts = 0
            while len(problems) < self.sizes[split]:
                attempts += 1
                if attempts > 200 * self.sizes[split] + 2000:
                    raise ValueError(f"could not draw {self.sizes[split]} distinct solvable {split} problems")
                numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
                target = rng.randint(self.min_target, self.max_target)
                key = (tuple(sorted(numbers)), target)
                if key in seen or not solvable(numbers, target, self.max_value):
                    continue
                seen.add(key)
                found = solutions(numbers, target, self.max_value)
                steps = (*rng.choice(found), _ANSWER_TEMPLATE.format(answer=target))
                problems.append(
                    Problem(
                        id=f"{split}-{len(problems):05d}",
                        prompt=format_prompt(numbers, target),
                        answer=str(target),
                        reference_steps=steps,
                        metadata={
                            "numbers": tuple(numbers),
                            "target": target,
                            "n_solutions": len(found),
                            "difficulty": self.difficulty,
                        },
                    )
                )
            splits[split] = tuple(problems)
        return splits
