"""The planted-subsequence task (docs/method.md §7): reward, text API, automaton and exact values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pavlit.interfaces import Task
from pavlit.steps import split_steps
from pavlit.tasks.planted import PlantedTask

TASK = PlantedTask()


def contains_target(row: list[int], task: PlantedTask) -> bool:
    row = row[: row.index(task.eos)] if task.eos in row else row
    m = len(task.target)
    return any(tuple(row[i : i + m]) == task.target for i in range(len(row) - m + 1))


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([3, 6, 0, 3, 5, 0, 0, 0, 0, 0], 1.0),
        ([1, 1, 1, 1, 1, 3, 6, 0, 3, 5], 1.0),
        ([3, 6, 0, 3, 6, 0, 3, 5, 1, 1], 1.0),  # overlapping partial match
        ([3, 6, 0, 3, 14, 3, 6, 0, 3, 5], 0.0),  # the target after EOS is masked
        ([3, 6, 0, 3, 5, 14, 1, 1, 1, 1], 1.0),
        ([14, 3, 6, 0, 3, 5, 1, 1, 1, 1], 0.0),
        ([3, 6, 0, 3, 4, 3, 6, 0, 3, 1], 0.0),
    ],
)
def test_reward_hand_cases(tokens: list[int], expected: float) -> None:
    assert TASK.reward(torch.tensor([tokens])).tolist() == [expected]


def test_reward_matches_a_direct_search() -> None:
    generator = torch.Generator().manual_seed(0)
    # Bias toward target tokens so that matches and near-matches are common.
    probs = torch.full((15,), 0.2)
    probs[[3, 6, 0, 5]] = 3.0
    tokens = torch.multinomial(probs, 4000 * 10, replacement=True, generator=generator).reshape(4000, 10)
    expected = [float(contains_target(row, TASK)) for row in tokens.tolist()]
    assert TASK.reward(tokens).tolist() == expected
    assert 0 < sum(expected) < len(expected)
    assert TASK.reward(tokens[:, :4]).tolist() == [0.0] * 4000


def test_text_api() -> None:
    assert isinstance(TASK, Task) and TASK.step_delimiter == " "
    (problem,) = TASK.problems("train")
    assert (problem.prompt, problem.answer) == ("", "3 6 0 3 5")
    assert [p.id for p in PlantedTask(n_problems=3).problems("test")] == [f"planted-test-{i}" for i in range(3)]
    with pytest.raises(ValueError, match="split"):
        TASK.problems("dev")
    assert TASK.score(problem, "3 6 0 3 5") == 1.0
    assert TASK.score(problem, "1 3 6 0 3 5 14 2") == 1.0
    assert TASK.score(problem, "3 6 14 0 3 5") == 0.0
    assert TASK.score(problem, "3 6 0 3 x 5") == 0.0
    assert TASK.score(problem, "3 6 0 3 15") == 0.0
    assert TASK.score(problem, "1 1 1 1 1 1 3 6 0 3 5") == 0.0  # the target ends past length 10
    assert TASK.is_final_step("14") and TASK.is_final_step("14 ") and not TASK.is_final_step("4 ")


@given(tokens=st.lists(st.integers(0, 14), min_size=1, max_size=10))
@settings(deadline=None)
def test_steps_round_trip(tokens: list[int]) -> None:
    text = TASK.format_tokens(tokens)
    steps = split_steps(text, TASK.step_delimiter)
    assert steps == TASK.tokens_to_steps(tokens)
    assert TASK.to_tokens(steps) == tokens == TASK.parse(text) == TASK.to_tokens(torch.tensor(tokens))


def test_constructor_validates() -> None:
    for kwargs in ({"target": (3, 14)}, {"target": ()}, {"length": 4}, {"eos": 15}, {"target": (20,)}):
        with pytest.raises(ValueError):
            PlantedTask(**kwargs)


def test_transitions_hand_cases() -> None:
    table = TASK.transitions
    assert table[0, 3] == 1 and table[0, 6] == 0
    assert table[2, 0] == 3 and table[2, 3] == 1  # [3, 6] + 3 → [3]
    assert table[4, 5] == 5 and table[4, 6] == 2 and table[4, 3] == 1  # [3, 6, 0, 3] + 6 → [3, 6]


@given(tokens=st.lists(st.sampled_from([0, 3, 5, 6, 1, 14]), max_size=10))
@settings(deadline=None)
def test_match_states_agree_with_match_state(tokens: list[int]) -> None:
    states = TASK.match_states(torch.tensor([tokens], dtype=torch.long).reshape(1, -1))[0].tolist()
    eos_at = tokens.index(14) if 14 in tokens else None
    for i in range(len(tokens) + 1):
        k, ended = TASK.match_state(tokens[:i])
        assert ended == ((eos_at is not None and eos_at < i) or i == TASK.length)
        if eos_at is None or i <= eos_at:
            assert k == states[i]
        # The longest k with the last k tokens equal to target[:k], until the target is found.
        prefix = tokens[:i]
        if k < 5 and eos_at is None:
            longest = max(
                j for j in range(6) if j <= len(prefix) and tuple(prefix[len(prefix) - j :]) == TASK.target[:j]
            )
            assert k == longest


def _prefix_dependent_policy(vocab: int):
    """A policy whose next token depends on the whole prefix (not only on the match state)."""

    def probs(prefix: list[int]) -> list[float]:
        weights = [1.0 + ((sum(prefix) + 3 * t + len(prefix)) % 4) for t in range(vocab)]
        return [w / sum(weights) for w in weights]

    return probs


def test_exact_q_equals_enumeration_of_full_sequences() -> None:
    task = PlantedTask(target=(1, 1, 2), length=6, vocab_size=4, eos=3)
    policy = _prefix_dependent_policy(4)
    total = 0.0
    for row in itertools.product(range(4), repeat=6):
        end = row.index(3) + 1 if 3 in row else 6
        if any(t != 3 for t in row[end:]):
            continue  # positions after EOS are not drawn; count each sequence once
        probability = math.prod(policy(list(row[:i]))[row[i]] for i in range(end))
        total += probability * task.reward(torch.tensor([row])).item()
    assert task.exact_q([], policy) == pytest.approx(total, abs=1e-12)


def test_automaton_values_equal_brute_force() -> None:
    task = PlantedTask(target=(1, 1, 2), length=6, vocab_size=4, eos=3)
    probs_by_state = torch.tensor(
        [[0.1, 0.5, 0.2, 0.2], [0.3, 0.3, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64
    )
    table = task.automaton_values(probs_by_state)

    def policy(prefix: list[int]) -> list[float]:
        return probs_by_state[task.match_state(prefix)[0]].tolist() if task.match_state(prefix)[0] < 3 else [0.25] * 4

    for length in range(0, 7):
        for prefix in itertools.product(range(4), repeat=length):
            if length >= 3 or prefix == ():
                expected = task.exact_q(list(prefix), policy)
                assert task.automaton_q(list(prefix), table) == pytest.approx(expected, abs=1e-12)


def test_uniform_policy_values() -> None:
    uniform = torch.full((5, 15), 1 / 15)
    table = TASK.automaton_values(uniform)
    assert TASK.automaton_q([1, 1, 1, 1, 1, 3, 6, 0, 3], table) == pytest.approx(1 / 15)
    assert TASK.automaton_q([1, 1, 1, 1, 1, 1, 3, 6, 0, 3], table) == 0.0
    assert TASK.automaton_q([3, 6, 0, 3, 5], table) == 1.0
    assert TASK.automaton_q(["3 ", "14 "], table) == 0.0
    assert TASK.automaton_q([1, 1, 1, 1, 1, 1, 1], table) == pytest.approx(
        TASK.exact_q([1, 1, 1, 1, 1, 1, 1], lambda prefix: [1 / 15] * 15), abs=1e-12
    )
    with pytest.raises(ValueError, match="probability"):
        TASK.automaton_values(torch.ones(5, 15))
    with pytest.raises(ValueError, match="more than length"):
        TASK.match_state([1] * 11)
