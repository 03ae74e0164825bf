"""Any `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ dataset as a pavlit task.

reasoning-gym generates verifiable problems procedurally (``create_dataset(name, size, seed, **config)``); each
item has ``question``, ``answer`` and ``metadata``, and each dataset scores an **answer string** with its own
``score_answer(answer, entry)``. A policy writes a whole solution, so :meth:`ReasoningGymTask.score` first
extracts the final answer from the response (:func:`pavlit.tasks.answers.extract_answer`: the last ``#### x``,
``\\boxed{x}``, ``Answer: x`` or ``<answer>x</answer>``; failing those, the last non-blank line) and then asks the
dataset. reasoning-gym gives partial credit (``gsm_symbolic`` returns 0.01 for a wrong number); ``Rex`` is
binary, so only a score of at least ``success_threshold`` (default 1.0) counts as correct.

Items whose metadata carry a chain of thought (``gsm_symbolic``'s ``answer_cot``, GSM8K-style lines ending in
``#### n``) get it as ``reference_steps``; others have none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pavlit.interfaces import SPLITS, Problem, Task
from pavlit.tasks.answers import extract_answer, has_final_answer, normalize_answer, split_solution

__all__ = ["ReasoningGymTask"]


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as error:  # pragma: no cover - reasoning-gym is a core dependency
        raise ImportError("ReasoningGymTask needs the `reasoning-gym` package: pip install reasoning-gym") from error
    return reasoning_gym


def _split_seed(seed: int, split: str) -> int:
    # Hashing keeps the three streams apart for every seed (seed + offset would make seed 0's validation set
    # seed 1's training set).
    digest = hashlib.sha256(f"pavlit-reasoning-gym:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class ReasoningGymTask(Task):
    """Problems from one reasoning-gym dataset, split three ways and scored by the dataset itself.

    Each split is drawn with its own seed (derived from ``seed`` and the split name) and de-duplicated by question
    in the order test, validation, train, so no question appears in two splits (or twice in one).

    Args:
        dataset: A registered reasoning-gym dataset name (``gsm_symbolic``, ``chain_sum``, ``basic_arithmetic``,
            ...).
        config: Keyword arguments for the dataset's config (e.g. ``{"difficulty": 1.0}``), besides ``size`` and
            ``seed``.
        seed: Seed from which the three split seeds are derived.
        n_train: Number of training problems.
        n_validation: Number of validation problems.
        n_test: Number of test problems.
        success_threshold: The dataset score at or above which a response counts as correct.
    """

    def __init__(
        self,
        dataset: str = "gsm_symbolic",
        config: dict[str, Any] | None = None,
        seed: int = 0,
        n_train: int = 2000,
        n_validation: int = 200,
        n_test: int = 200,
        success_threshold: float = 1.0,
    ) -> None:
        if min(n_train, n_validation, n_test) < 0:
            raise ValueError("split sizes must be non-negative")
        self.dataset = dataset
        self.config = dict(config or {})
        self.seed = seed
        self.sizes = {"train": n_train, "validation": n_validation, "test": n_test}
        self.success_threshold = success_threshold
        self._splits: dict[str, tuple[Problem, ...]] | None = None
        self._score_answer: Callable[[str | None, Mapping[str, Any]], float] | None = None

    def problems(self, split: str) -> Sequence[Problem]:
        """The problems of ``split``; generated once per task object and cached."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self._splits is None:
            self._splits = self._generate()
        return self._splits[split]

    def score(self, problem: Problem, response: str) -> float:
        """1.0 iff the dataset scores the response's final answer at least ``success_threshold``.

        The answer is offered both as written and normalised (``"1,234"`` -> ``"1234"``): some datasets parse only
        plain numbers, and both strings say the same thing.
        """
        answer = self._answer_text(response)
        if answer is None:
            return 0.0
        if self._score_answer is None:
            self._score_answer = self._create(size=1, seed=0).score_answer
        entry = problem.metadata["entry"]
        candidates = dict.fromkeys((answer, normalize_answer(answer)))
        best = max(float(self._score_answer(candidate, entry) or 0.0) for candidate in candidates)
        return float(best >= self.success_threshold)

    def extract_answer(self, response: str) -> str | None:
        """The normalised final answer of ``response`` (see the module docstring), or ``None``."""
        answer = self._answer_text(response)
        return None if answer is None else normalize_answer(answer)

    def is_final_step(self, step: str) -> bool:
        """A step is final when it carries an answer marker (``####``, ``\\boxed``, ``Answer:``, ``<answer>``)."""
        return has_final_answer(step)

    @staticmethod
    def _answer_text(response: str) -> str | None:
        answer = extract_answer(response)
        if answer is None:
            lines = [line.strip() for line in response.splitlines() if line.strip()]
            answer = lines[-1] if lines else None
        return answer

    def _create(self, size: int, seed: int) -> Any:
        reasoning_gym = _import_reasoning_gym()
        try:
            return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config)
        except TypeError as error:
            raise ValueError(
                f"bad config {self.config!r} for reasoning-gym dataset {self.dataset!r}: {error}"
            ) from error

    def _generate(self) -> dict[str, tuple[Problem, ...]]:
        seen: set[str] = set()
        splits = {}
        for split in ("test", "validation", "train"):
            wanted = self.sizes[split]
            size = wanted + wanted // 10 + 10
            while True:
                # Some generators repeat questions; on a shortfall redraw the split larger from scratch.
                items = self._create(size=size, seed=_split_seed(self.seed, split))
                taken = set(seen)
                problems: list[Problem] = []
                for index in range(len(items)):
                    if len(problems) == wanted:
                        break
                    item = items[index]
                    if item["question"] not in taken:
                        taken.add(item["question"])
                        problems.append(self._problem(split, index, item))
                if len(problems) == wanted:
                    break
                if size >= 20 * wanted + 1000:
                    raise ValueError(
                        f"reasoning-gym dataset {self.dataset!r} gave only {len(problems)} distinct {split} "
                        f"questions out of {size} draws; ask for fewer problems"
                    )
                size *= 2
            seen = taken
            splits[split] = tuple(problems)
        return splits

    def _problem(self, split: str, index: int, item: Mapping[str, Any]) -> Problem:
        entry = {"question": item["question"], "answer": item["answer"], "metadata": dict(item["metadata"])}
        cot = entry["metadata"].get("answer_cot")
        steps = split_solution(cot, self.step_delimiter) if isinstance(cot, str) else ()
        return Problem(
            id=f"{self.dataset}-{split}-{index:05d}",
            prompt=item["question"].rstrip() + self.step_delimiter,
            answer=str(item["answer"]),
            reference_steps=steps or None,
            metadata={"dataset": self.dataset, "entry": entry},
        )
