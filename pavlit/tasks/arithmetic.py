"""The embedded default task: procedurally generated multi-step arithmetic with step-by-step solutions.

A problem is a chain of operations applied left to right to a starting number, written with the fewest
parentheses that keep ordinary precedence equal to the chain order::

    prompt    "Compute (17+25)*3-8+46.\\n"
    response  "17+25=42\\n42*3=126\\n126-8=118\\n118+46=164\\nAnswer: 164\\n"

Why this design (the method, docs/method.md, needs a policy that is mediocre, with headroom for search and RL):

* **Every step can go wrong and errors propagate.** Each line is one multi-digit addition or subtraction (carries,
  borrows) or a small multiplication, and its left operand is the previous line's result, so one slip makes every
  later line and the answer wrong. That is what makes Monte-Carlo values ``Q^π`` fall at a specific step, i.e.
  what gives advantages something to measure.
* **Learnable by a tiny character-level model.** Every operand and intermediate result is a non-negative number
  of at most two digits (three from ``difficulty=3`` on), multipliers are single digits, and the text uses a
  32-character :data:`ALPHABET`. Measured on 2 shared CPU cores: a 3-layer, 64-wide char transformer trained 4
  minutes (~870 steps of batch 32) on the default (``difficulty=2``) learns the format at once and the arithmetic
  partly: pass@1 5%, greedy 6%, pass@16 36%, with the loss still falling fast, so a somewhat longer run lands in
  the 15-60% band with clear pass@N headroom. With three-digit numbers (3 operations) the same run got pass@1
  0.6%, pass@16 9%: digit count, more than operation count, is what makes the task hard.
* **Steps are lines.** Each step ends in ``"\\n"`` (the task's ``step_delimiter``), the final answer line
  included, so ``"".join(reference_steps)`` is the SFT target and a step-aware sampler stops at the same places.
  The prompt ends in ``"\\n"`` too, so the first step starts on a fresh line (:func:`format_prompt`).

``difficulty`` sets the number of operations and the largest number (every operand and intermediate result):

========== ========== =========== ============================
difficulty operations largest     steps (with ``Answer:``)
========== ========== =========== ============================
1          3          99          4
2          4          99          5
3          4          999         5
d >= 4     d + 1      999         d + 2
========== ========== =========== ============================
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from pavlit.interfaces import SPLITS, Problem, Task
from pavlit.tasks.answers import answers_match, extract_answer, normalize_answer

__all__ = ["ALPHABET", "ArithmeticTask", "format_prompt", "solve"]

#: The largest number any problem contains (operands, intermediate results, answers), at any difficulty.
MAX_VALUE = 999
_PROMPT_TEMPLATE = "Compute {expression}.\n"
_ANSWER_TEMPLATE = "Answer: {answer}\n"
_ANSWER_LINE = re.compile(r"^\s*Answer:")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}

#: Every character that any prompt or reference solution of :class:`ArithmeticTask` contains (sorted), for
#: building a character-level tokenizer.
ALPHABET = "".join(
    sorted(set("0123456789+-*()=" + _PROMPT_TEMPLATE.format(expression="") + _ANSWER_TEMPLATE.format(answer="")))
)


def format_prompt(expression: str) -> str:
    """The prompt for ``expression``: ``"Compute <expression>.\\n"`` (ends with the step delimiter)."""
    return _PROMPT_TEMPLATE.format(expression=expression)


def _apply(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right


def solve(start: int, ops: Sequence[str], operands: Sequence[int]) -> tuple[str, list[str], int]:
    """Write a chain ``start op_1 x_1 op_2 x_2 ...`` (evaluated left to right) as an expression and steps.

    Args:
        start: The starting number.
        ops: The operations, each ``"+"``, ``"-"`` or ``"*"``.
        operands: The right operand of each operation.

    Returns:
        ``(expression, steps, answer)``: the expression with minimal parentheses, the reference steps (one
        ``a op b=c`` line per operation, then ``Answer: c``, each ending in ``"\\n"``), and the value.
    """
    expression, top_op, value = str(start), None, start
    steps = []
    for op, operand in zip(ops, operands, strict=True):
        # Left-to-right order needs parentheses only where a lower-precedence chain feeds a multiplication.
        if top_op is not None and _PRECEDENCE[top_op] < _PRECEDENCE[op]:
            expression = f"({expression})"
        expression = f"{expression}{op}{operand}"
        result = _apply(value, op, operand)
        steps.append(f"{value}{op}{operand}={result}\n")
        value, top_op = result, op
    steps.append(_ANSWER_TEMPLATE.format(answer=value))
    return expression, steps, value


class ArithmeticTask(Task):
    """Multi-step arithmetic chains with one computation per line (see the module docstring for the design).

    Splits come from independent random streams per ``(seed, split)`` and are de-duplicated by prompt in the
    order test, validation, train: the test set depends only on ``seed``, ``difficulty`` and ``n_test``, so
    growing the training set never changes what a model is evaluated on.

    Args:
        difficulty: Number of operations and size of numbers (>= 1; see the module docstring's table): 1 and 2
            keep every number below 100 with 3 and 4 operations, 3 allows three-digit numbers, each level above
            adds an operation.
        seed: Seed of the problem generator.
        n_train: Number of training problems.
        n_validation: Number of validation problems.
        n_test: Number of test problems.
    """

    def __init__(
        self, difficulty: int = 2, seed: int = 0, n_train: int = 2000, n_validation: int = 200, n_test: int = 200
    ) -> None:
        if difficulty < 1:
            raise ValueError(f"difficulty must be >= 1, got {difficulty}")
        if min(n_train, n_validation, n_test) < 0:
            raise ValueError("split sizes must be non-negative")
        self.difficulty = difficulty
        self.seed = seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.n_ops = difficulty + 2 if difficulty <= 2 else difficulty + 1
        self.max_value = 99 if difficulty <= 2 else MAX_VALUE
        self._splits: dict[str, tuple[Problem, ...]] | None = None

    def problems(self, split: str) -> Sequence[Problem]:
        """The problems of ``split``; generated once per task object and cached."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self._splits is None:
            self._splits = self._generate()
        return self._splits[split]

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the last ``Answer:`` line of ``response`` equals the problem's answer."""
        return float(answers_match(extract_answer(response, style="answer"), problem.answer))

    def extract_answer(self, response: str) -> str | None:
        """The normalised value of the last ``Answer:`` line, or ``None``."""
        answer = extract_answer(response, style="answer")
        return None if answer is None else normalize_answer(answer)

    def is_final_step(self, step: str) -> bool:
        """A step is final when it is the ``Answer:`` line."""
        return _ANSWER_LINE.match(step) is not None

    def _random_chain(self, rng: random.Random) -> tuple[int, list[str], list[int]]:
        """A start value and ``n_ops`` operations whose every intermediate result lies in ``[0, max_value]``."""
        low = 2
        start = value = rng.randint(10, self.max_value)
        ops, operands = [], []
        for _ in range(self.n_ops):
            feasible = []
            if value + low <= self.max_value:
                feasible.append("+")
            if value >= low:
                feasible.append("-")
            if 2 * value <= self.max_value and value >= 2:
                feasible.append("*")
            op = rng.choice(feasible)
            if op == "+":
                operand = rng.randint(low, self.max_value - value)
            elif op == "-":
                operand = rng.randint(low, value)
            else:
                operand = rng.randint(2, min(9, self.max_value // value))
            ops.append(op)
            operands.append(operand)
            value = _apply(value, op, operand)
        return start, ops, operands

    def _generate(self) -> dict[str, tuple[Problem, ...]]:
        seen: set[str] = set()
        splits = {}
        for split in ("test", "validation", "train"):
            # A string seed is hashed with SHA-512 by ``random``: stable across runs and PYTHONHASHSEED.
            rng = random.Random(f"pavlit-arithmetic:{self.seed}:{self.difficulty}:{split}")
            problems = []
            attempts = 0
            while len(problems) < self.sizes[split]:
                attempts += 1
                if attempts > 100 * self.sizes[split] + 1000:
                    raise ValueError(f"could not draw {self.sizes[split]} distinct {split} problems")
                expression, steps, answer = solve(*self._random_chain(rng))
                prompt = format_prompt(expression)
                if prompt in seen:
                    continue
                seen.add(prompt)
                problems.append(
                    Problem(
                        id=f"{split}-{len(problems):05d}",
                        prompt=prompt,
                        answer=str(answer),
                        reference_steps=tuple(steps),
                        metadata={"expression": expression, "difficulty": self.difficulty, "n_ops": self.n_ops},
                    )
                )
            splits[split] = tuple(problems)
        return splits
