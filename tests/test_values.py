"""Value maths (docs/method.md §2–§3): hand-computed cases and property checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pavlit.values import (
    advantages,
    alignment,
    best_of_k,
    best_of_k_from_counts,
    distinguishability,
    effective_reward,
    first_pit,
    mc_estimate,
)

NAN = float("nan")
probabilities = st.floats(0.0, 1.0)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> bool:
    return torch.allclose(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol)


# ---- Monte-Carlo estimates -----------------------------------------------------------------------------------------


def test_mc_estimate() -> None:
    assert close(mc_estimate(3, 4), 0.75)
    assert close(mc_estimate(torch.tensor([0, 2, 5]), torch.tensor([5, 4, 5])), [0.0, 0.5, 1.0])
    assert mc_estimate(torch.tensor([1]), 2).dtype == torch.get_default_dtype()


@pytest.mark.parametrize(("n_correct", "n_rollouts"), [(1, 0), (0, -2), (-1, 3), (4, 3)])
def test_mc_estimate_rejects_bad_counts(n_correct: int, n_rollouts: int) -> None:
    with pytest.raises(ValueError, match="n_"):
        mc_estimate(n_correct, n_rollouts)


# ---- Best-of-K -----------------------------------------------------------------------------------------------------


def test_best_of_k_hand_cases() -> None:
    assert close(best_of_k(0.5, 2), 0.75)
    assert close(best_of_k(torch.tensor([0.0, 0.2, 1.0]), 3), [0.0, 1 - 0.8**3, 1.0])
    assert close(best_of_k(torch.tensor([0.5, 0.5]), torch.tensor([1, 3])), [0.5, 0.875])


def test_best_of_k_gradient_is_finite_at_the_ends() -> None:
    q = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    best_of_k(q, 4).sum().backward()
    assert torch.isfinite(q.grad).all()
    assert close(q.grad, [4.0, 4 * 0.5**3, 0.0])


@pytest.mark.parametrize(("q", "k"), [(1.1, 2), (-0.1, 2), (NAN, 2), (0.5, 0), (0.5, 1.5)])
def test_best_of_k_rejects_bad_inputs(q: float, k: float) -> None:
    with pytest.raises(ValueError):
        best_of_k(q, k)


@given(q=probabilities, k=st.integers(1, 50))
@settings(deadline=None)
def test_best_of_k_monotone_in_k_and_identity_at_one(q: float, k: int) -> None:
    q_t = torch.tensor(q, dtype=torch.float64)
    assert best_of_k(q_t, 1).item() == pytest.approx(q)
    assert best_of_k(q_t, k + 1) >= best_of_k(q_t, k) >= q_t - 1e-12
    assert 0.0 <= best_of_k(q_t, k).item() <= 1.0


def test_best_of_k_from_counts_hand_cases() -> None:
    # 1 − C(3,2)/C(4,2) = 1 − 3/6; 1 − C(2,3)/C(4,3) = 1 − 0; no correct rollout → 0; k = 1 → c / n.
    assert close(best_of_k_from_counts(1, 4, 2), 0.5)
    assert close(best_of_k_from_counts(2, 4, 3), 1.0)
    assert close(best_of_k_from_counts(0, 7, 3), 0.0)
    assert close(best_of_k_from_counts(torch.tensor([0, 3, 5]), 5, 1), [0.0, 0.6, 1.0])
    # Broadcast per-element k: 1 − C(8,4)/C(10,4) = 1 − 70/210.
    assert close(best_of_k_from_counts(torch.tensor([2, 2]), 10, torch.tensor([1, 4])), [0.2, 1 - 70 / 210])


def test_best_of_k_from_counts_large_n_is_stable() -> None:
    # Factorials of 1000 overflow a float; the product form does not. 1 − C(990,20)/C(1000,20):
    expected = 1 - math.comb(990, 20) / math.comb(1000, 20)
    assert best_of_k_from_counts(10, 1000, 20).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("c", "n", "k"), [(1, 4, 5), (1, 4, 0), (5, 4, 2), (-1, 4, 2), (1, 0, 1), (1.5, 4, 2)])
def test_best_of_k_from_counts_rejects_bad_inputs(c: float, n: int, k: int) -> None:
    with pytest.raises(ValueError):
        best_of_k_from_counts(c, n, k)


@given(n=st.integers(1, 30), k_fraction=st.floats(0.0, 1.0), p=probabilities)
@settings(deadline=None, max_examples=60)
def test_best_of_k_from_counts_is_exactly_unbiased(n: int, k_fraction: float, p: float) -> None:
    k = 1 + min(n - 1, int(k_fraction * n))
    counts = torch.arange(n + 1)
    estimates = best_of_k_from_counts(counts, n, k).double()
    binomial = torch.tensor([math.comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)], dtype=torch.float64)
    assert (binomial * estimates).sum().item() == pytest.approx(1 - (1 - p) ** k, abs=1e-6)


# ---- advantages ----------------------------------------------------------------------------------------------------


def test_advantages_hand_case() -> None:
    assert close(advantages(torch.tensor([0.2, 0.5, 0.4, 1.0])), [0.3, -0.1, 0.6])
    assert advantages(torch.tensor([0.7])).shape == (0,)


def test_advantages_masks_over_values_and_over_steps_agree() -> None:
    values = torch.tensor([[0.2, 0.5, NAN, NAN], [0.1, 0.3, 0.6, 0.9]])
    value_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    step_mask = torch.tensor([[True, False, False], [True, True, True]])
    expected = [[0.3, 0.0, 0.0], [0.2, 0.3, 0.3]]
    for mask in (value_mask, step_mask, step_mask.float()):
        result = advantages(values, mask)
        assert not result.isnan().any()
        assert close(result, expected)


def test_advantages_gradient_ignores_nan_padding() -> None:
    values = torch.tensor([[0.2, 0.5, NAN]], requires_grad=True)
    advantages(values, torch.tensor([[True, False]])).sum().backward()
    assert close(values.grad, [[-1.0, 1.0, 0.0]])


def test_advantages_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="values"):
        advantages(torch.tensor([0.2, 1.5]))
    with pytest.raises(ValueError, match="values"):
        advantages(torch.tensor([0.2, NAN]))
    with pytest.raises(ValueError, match="mask"):
        advantages(torch.tensor([0.2, 0.3, 0.4]), torch.tensor([True]))


@given(
    rows=st.lists(st.lists(probabilities, min_size=1, max_size=8), min_size=1, max_size=5),
)
@settings(deadline=None)
def test_advantages_telescope(rows: list[list[float]]) -> None:
    width = max(len(row) for row in rows)
    values = torch.tensor([row + [NAN] * (width - len(row)) for row in rows], dtype=torch.float64)
    mask = torch.tensor([[i < len(row) for i in range(width)] for row in rows])
    result = advantages(values, mask)
    for row, total in zip(rows, result.sum(dim=-1)):
        assert total.item() == pytest.approx(row[-1] - row[0], abs=1e-12)


# ---- effective reward and first pit --------------------------------------------------------------------------------


def test_effective_reward() -> None:
    assert close(effective_reward(0.5, 0.2, 0.5), 0.6)
    assert close(effective_reward(torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 0.25]), 2.0), [0.0, 0.5])
    assert close(effective_reward(torch.tensor([1.0]), torch.tensor([-0.5]), torch.tensor([0.0])), [1.0])
    for bad in ((1.2, 0.0, 1.0), (0.5, -1.5, 1.0), (0.5, 0.0, float("inf"))):
        with pytest.raises(ValueError):
            effective_reward(*bad)


def test_first_pit() -> None:
    q = torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.5, 0.2, 0.1, 0.1], [0.0, 0.5, 0.0, 1.0]])
    assert first_pit(q).tolist() == [2, -1, 2]
    assert first_pit(q, threshold=0.15).tolist() == [2, 2, 2]
    step_mask = torch.tensor([[True, False, False], [True, True, True], [True, True, True]])
    assert first_pit(q, step_mask).tolist() == [-1, -1, 2]
    padded = torch.tensor([[0.5, 0.3, NAN]])
    assert first_pit(padded, torch.tensor([[True, True, False]])).tolist() == [-1]
    assert first_pit(torch.tensor([0.4])).item() == -1
    with pytest.raises(ValueError):
        first_pit(torch.tensor([0.5, 1.5]))


# ---- distinguishability and alignment ------------------------------------------------------------------------------


def test_distinguishability_and_alignment_hand_cases() -> None:
    a_mu = torch.tensor([[0.1, -0.1], [0.2, 0.2]])
    a_pi = torch.tensor([[0.5, 0.5], [-0.5, 1.0]])
    assert close(distinguishability(a_mu), 0.005)  # population variances 0.01 and 0
    assert close(alignment(a_mu, a_pi), 0.025)  # per state 0 and 0.05
    ragged = torch.tensor([[0.1, -0.1, NAN], [0.3, NAN, NAN]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert close(distinguishability(ragged, mask), 0.005)
    assert close(alignment(ragged, torch.ones(2, 3) * 0.5, mask), (0.0 + 0.15) / 2)
    # Float masks are weights (π's probabilities when a group enumerates actions): mean 0.25, variance 0.1875.
    assert close(distinguishability(torch.tensor([[0.5, -0.5]]), torch.tensor([[3.0, 1.0]])), 0.1875)
    # Leading batch dimensions are kept.
    assert distinguishability(torch.zeros(3, 4, 2)).shape == (3,)


def test_distinguishability_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        distinguishability(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    # A state without actions is skipped, not counted as zero.
    a_mu = torch.tensor([[0.1, -0.1], [NAN, NAN]])
    assert close(distinguishability(a_mu, torch.tensor([[True, True], [False, False]])), 0.01)
    with pytest.raises(ValueError, match="a_mu"):
        distinguishability(torch.tensor([[1.5, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        alignment(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[\.\.\., S, N\]"):
        distinguishability(torch.zeros(3))


@given(
    groups=st.lists(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=6), min_size=1, max_size=5),
)
@settings(deadline=None)
def test_distinguishability_is_mean_population_variance(groups: list[list[float]]) -> None:
    width = max(len(g) for g in groups)
    a_mu = torch.tensor([g + [NAN] * (width - len(g)) for g in groups], dtype=torch.float64)
    mask = torch.tensor([[i < len(g) for i in range(width)] for g in groups])
    expected = sum(torch.tensor(g, dtype=torch.float64).var(unbiased=False).item() for g in groups) / len(groups)
    assert distinguishability(a_mu, mask).item() == pytest.approx(expected, abs=1e-12)
    expected_alignment = sum(sum(x * x for x in g) / len(g) for g in groups) / len(groups)
    assert alignment(a_mu, a_mu, mask).item() == pytest.approx(expected_alignment, abs=1e-12)
