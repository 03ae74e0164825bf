"""The countdown task: generator, exact solver, step checker, splits and reference-solution sampling."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from pavlit.steps import split_steps
from pavlit.tasks.countdown import CountdownTask, check, format_prompt, solutions, solvable


@pytest.fixture(scope="module")
def task():
    return CountdownTask(difficulty=2, seed=0, n_train=300, n_validation=60, n_test=60)


def brute_force_solvable(numbers, target):
    """Independent of the solver: every way to combine the numbers, as a set of reachable values."""

    def reach(values):
        if len(values) == 1:
            return {values[0]}
        out = set()
        for i, j in itertools.combinations(range(len(values)), 2):
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            a, b = values[i], values[j]
            results = {a + b, a * b, abs(a - b)}
            if b and a % b == 0:
                results.add(a // b)
            if a and b % a == 0:
                results.add(b // a)
            for r in results:
                if 0 < r <= 999:
                    out |= reach([r, *rest])
        return out

    return target in reach(list(numbers))


def test_every_generated_problem_is_solvable_and_its_reference_scores_1(task):
    for split in ("train", "validation", "test"):
        for problem in task.problems(split):
            numbers, target = problem.metadata["numbers"], problem.metadata["target"]
            assert len(numbers) == 4 and all(1 <= n <= 10 for n in numbers) and 10 <= target <= 99
            assert problem.prompt == format_prompt(numbers, target)
            assert brute_force_solvable(numbers, target)
            response = "".join(problem.reference_steps)
            assert task.score(problem, response) == 1.0, (problem.prompt, response)
            assert task.extract_answer(response) == problem.answer == str(target)
            assert len(problem.reference_steps) == len(numbers)  # n - 1 operations, then the answer line
            assert task.is_final_step(problem.reference_steps[-1])
            assert not any(task.is_final_step(step) for step in problem.reference_steps[:-1])
            assert split_steps(response, task.step_delimiter) == list(problem.reference_steps)


def test_solver_agrees_with_brute_force_on_unsolvable_draws():
    # Targets 1..120 from two fixed number sets: the solver's verdict must match exhaustive search everywhere.
    for numbers in ([2, 3, 7, 7], [1, 5, 9, 10]):
        for target in range(1, 121):
            assert solvable(numbers, target) == brute_force_solvable(numbers, target), (numbers, target)
            assert bool(solutions(numbers, target)) == solvable(numbers, target)


def test_every_solution_of_the_solver_is_valid_and_distinct():
    found = solutions([8, 3, 5, 2], 29)
    assert len(found) == len(set(found)) >= 2
    for steps in found:
        assert check([8, 3, 5, 2], 29, "".join(steps) + "Answer: 29\n").solved


@pytest.mark.parametrize(
    ("response", "line", "why"),
    [
        ("8*3=25 (left: 25 5 2)\n25+2=27 (left: 27 5)\n27+2=29 (left: 29)\nAnswer: 29\n", 0, "is 24, not 25"),
        ("8+5=13 (left: 13 3 2)\n13*7=91 (left: 91 3)\nAnswer: 91\n", 1, "7 is not among"),
        ("8+5=13 (left: 13 3 2)\n13/2=6 (left: 6 3)\n6*3=18 (left: 18)\nAnswer: 18\n", 1, "not a non-negative integer"),
        ("8+5=13 (left: 13 3 2)\n2-3=-1 (left: -1 13)\n", 1, "not a non-negative integer"),
        ("8+5=13 (left: 13 3 2)\n13*2=26 (left: 26 3)\n26+3=29 (left: 29)\nAnswer: 30\n", 3, "target 29"),
        ("8+5=13 (left: 13 3 2)\n13*2=26 (left: 26 3)\n26+2=28 (left: 28)\nAnswer: 28\n", 2, "2 is not among"),
        ("8+5=13 (left: 13 3 2)\n13*2=26 (left: 26 3)\n26+3=29 (left: 29)\n", 3, "no 'Answer:' line"),
        ("8+5=13 (left: 13 3 2)\n13*2=26 (left: 26 3)\nAnswer: 26\n", 2, "numbers 3 26 are left"),
        ("8+5=13 (left: 13 3)\n13*2=26 (left: 26 3)\n26+3=29 (left: 29)\nAnswer: 29\n", 0, "numbers left are 2 3 13"),
        ("8+5=13 left 13 3 2\n", 0, "not of the form"),
        ("8+5=13 (left: 13 3-2)\n", 0, "not numbers separated by spaces"),
        ("8+5=13 (left: 13 3 2)\n13*2=26 (left: 26 3)\n26+3=29 (left: 29)\nAnswer: 29\n1+1=2 (left: 2)\n", 4, "after"),
    ],
)
def test_invalid_responses_score_0_and_name_the_first_bad_line(response, line, why):
    task = CountdownTask(n_train=0, n_validation=0, n_test=0)
    from pavlit.interfaces import Problem

    problem = Problem(id="p", prompt=format_prompt([8, 3, 5, 2], 29), answer="29", metadata={})
    assert task.score(problem, response) == 0.0  # metadata missing: numbers and target come from the prompt
    result = check([8, 3, 5, 2], 29, response)
    assert not result.solved
    assert result.first_invalid == line
    assert why in result.reason and f"line {line + 1}" in result.reason


def test_a_correct_response_in_another_operand_and_list_order_scores_1():
    response = "5+8=13 (left: 2 3 13)\n2*13=26 (left: 3 26)\n3+26=29 (left: 29)\nAnswer: 29"
    assert check([8, 3, 5, 2], 29, response).solved


def test_splits_are_disjoint_and_deterministic(task):
    keys = {
        split: [(tuple(sorted(p.metadata["numbers"])), p.metadata["target"]) for p in task.problems(split)]
        for split in ("train", "validation", "test")
    }
    assert [len(keys[s]) for s in ("train", "validation", "test")] == [300, 60, 60]
    for a, b in itertools.combinations(keys.values(), 2):
        assert not set(a) & set(b)
    assert all(len(set(k)) == len(k) for k in keys.values())
    # Same settings, same problems (a smaller training set is a prefix of a larger one).
    again = CountdownTask(difficulty=2, seed=0, n_train=40, n_validation=60, n_test=60)
    assert again.problems("train") == task.problems("train")[:40]
    assert again.problems("test") == task.problems("test")
    # Another seed gives other problems.
    assert CountdownTask(difficulty=2, seed=1, n_train=0, n_validation=0, n_test=60).problems("test") != task.problems(
        "test"
    )


def test_reference_solutions_are_drawn_uniformly_among_distinct_solutions(task):
    positions, normalised = Counter(), []
    for problem in task.problems("train"):
        found = solutions(problem.metadata["numbers"], problem.metadata["target"])
        assert problem.metadata["n_solutions"] == len(found)
        if len(found) > 1:
            index = found.index(tuple(problem.reference_steps[:-1]))
            positions["first" if index == 0 else "last" if index == len(found) - 1 else "middle"] += 1
            normalised.append(index / (len(found) - 1))
    # Not one canonical solution (the solver's first or last in sorted order): a uniform draw's position among the
    # sorted solutions averages 1/2 (over ~250 problems its standard error is ~0.02).
    assert min(positions.values()) > 10, positions
    assert 0.4 < sum(normalised) / len(normalised) < 0.6
    # Many different opening moves are taught, not one per multiset of numbers.
    first_steps = Counter(p.reference_steps[0].split("=")[0] for p in task.problems("train"))
    assert len(first_steps) > 50


def test_bad_settings_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        CountdownTask(difficulty=9)
    with pytest.raises(ValueError, match="min_target <= max_target"):
        CountdownTask(min_target=50, max_target=10)
    with pytest.raises(ValueError, match="unknown split"):
        CountdownTask(n_train=0, n_validation=0, n_test=1).problems("dev")
    with pytest.raises(ValueError, match="could not draw"):
        # Three numbers up to 2 reach few targets: 60 distinct problems do not exist.
        CountdownTask(
            n_numbers=3, max_number=2, min_target=1, max_target=8, n_train=0, n_validation=0, n_test=60
        ).problems("test")


def test_the_tiny_tokenizer_covers_every_character(task):
    from pavlit.policy.sources import DEFAULT_ALPHABET

    text = "".join(p.prompt + "".join(p.reference_steps) for p in task.problems("train"))
    assert set(text) <= set(DEFAULT_ALPHABET)


def test_the_plugin_is_registered():
    from pavlit import registry

    assert registry.load("pavlit.tasks", "countdown") is CountdownTask
