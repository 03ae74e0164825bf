"""MixtureProver: hand-computed values, the unbiased count estimate, the split of its advantages."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pavlit.provers.best_of_k import BestOfK
from pavlit.rewards import PAVReward
from pavlit.values import advantages

from pavlit_example.provers import MixtureProver


def test_hand_computed_values():
    # k=2, mix=0.5 at q = 0, 0.5, 1: Best-of-2 is 0, 0.75, 1; the mixture 0, (0.75 + 0.5)/2, 1.
    assert torch.equal(
        MixtureProver(k=2, mix=0.5).q_values(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 0.625, 1.0])
    )
    # k=4, mix=0.25 at q = 0.5: 0.25 * (1 - 1/16) + 0.75 * 0.5 = 0.234375 + 0.375.
    assert MixtureProver(k=4, mix=0.25).q_values(torch.tensor(0.5)).item() == pytest.approx(0.609375)
    # Integer and batched inputs keep their shape.
    q = MixtureProver(k=3, mix=1.0).q_values(torch.tensor([[0, 1], [1, 0]]))
    assert q.shape == (2, 2) and q.dtype == torch.get_default_dtype() and q.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_endpoints_are_pi_and_best_of_k():
    q = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
    assert torch.equal(MixtureProver(k=8, mix=0.0).q_values(q), q)
    assert torch.equal(MixtureProver(k=8, mix=1.0).q_values(q), BestOfK(8).q_values(q))
    assert MixtureProver(k=4, mix=0.5).mean_attempts() == 2.5
    assert MixtureProver(k=1, mix=0.7).mean_attempts() == 1.0


@given(
    q=st.floats(0.0, 1.0),
    k=st.integers(1, 32),
    low=st.floats(0.0, 1.0),
    high=st.floats(0.0, 1.0),
)
def test_between_pi_and_best_of_k_and_monotone_in_mix(q, k, low, high):
    low, high = sorted((low, high))
    q_pi = torch.tensor(q, dtype=torch.float64)
    weak, strong = MixtureProver(k, low).q_values(q_pi), MixtureProver(k, high).q_values(q_pi)
    q_bok = BestOfK(k).q_values(q_pi)
    assert q_pi - 1e-12 <= weak
    assert weak <= strong + 1e-12
    assert strong <= q_bok + 1e-12


def test_advantages_split_between_best_of_k_and_pi():
    # A^mu = mix * A^BoK + (1 - mix) * A^pi on one trajectory of prefix values (the module docstring's claim).
    values = torch.tensor([0.2, 0.5, 0.4, 0.9, 1.0], dtype=torch.float64)
    mix, k = 0.3, 4
    a_mu = advantages(MixtureProver(k, mix).q_values(values))
    expected = mix * advantages(BestOfK(k).q_values(values)) + (1 - mix) * advantages(values)
    assert torch.allclose(a_mu, expected, atol=1e-12)
    # By hand for the first step: BoK(4) values 1 - 0.8^4 = 0.5904 and 1 - 0.5^4 = 0.9375.
    assert a_mu[0].item() == pytest.approx(0.3 * (0.9375 - 0.5904) + 0.7 * 0.3)


def test_from_counts_hand_case_and_bounds():
    prover = MixtureProver(k=2, mix=0.5)
    # 1 of 4 rollouts correct: Best-of-2 estimate 1 - C(3,2)/C(4,2) = 0.5; MC 0.25; mixture 0.375.
    assert prover.from_counts(torch.tensor(1), torch.tensor(4)).item() == pytest.approx(0.375)
    got = prover.from_counts(torch.tensor([0, 4]), torch.tensor([4, 4]))
    assert got.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="k must lie in"):
        MixtureProver(k=5).from_counts(torch.tensor(1), torch.tensor(4))


@pytest.mark.parametrize(("n", "k", "mix", "p"), [(6, 3, 0.4, 0.3), (4, 4, 0.9, 0.55), (5, 1, 0.5, 0.8)])
def test_from_counts_is_unbiased(n, k, mix, p):
    # Exact expectation over the binomial number of correct rollouts equals the analytic Q^mu at Q^pi = p.
    prover = MixtureProver(k, mix)
    counts = torch.arange(n + 1)
    pmf = torch.tensor([math.comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)], dtype=torch.float64)
    estimates = prover.from_counts(counts, torch.full_like(counts, n)).double()
    expected = prover.q_values(torch.tensor(p, dtype=torch.float64))
    assert (pmf * estimates).sum().item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1, got 0"),
        ({"k": 2.5}, "k must be an integer >= 1, got 2.5"),
        ({"mix": 1.5}, r"mix must be a probability in \[0, 1\], got 1.5"),
        ({"mix": float("nan")}, "mix must be a probability"),
        ({"mix": True}, "mix must be a probability"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"MixtureProver: {message}"):
        MixtureProver(**kwargs)


def test_values_outside_probabilities_are_rejected():
    with pytest.raises(ValueError, match=r"q must lie in \[0.0, 1.0\]"):
        MixtureProver().q_values(torch.tensor([0.5, 1.2]))


class TableVerifier:
    """A process-verifier double: ``Q^π`` of each prefix read from a table keyed by the prefix text."""

    def __init__(self, q: dict[str, float]) -> None:
        self.q = q

    def score_prefixes(self, prompts, steps, batch_size=64):
        return [torch.tensor([self.q["".join(s[:h])] for h in range(len(s) + 1)]) for s in steps]


def test_plugs_into_pavlits_own_pav_reward():
    from pavlit.interfaces import Problem

    problem = Problem(id="p", prompt="Q\n", answer="1")
    reward = PAVReward(TableVerifier({"": 0.5, "A\n": 0.8}), alpha=1.0, prover=MixtureProver(k=2, mix=0.5))
    scores = reward.score([problem], [["A\n"]])
    # Q^mu: 0.5*(1 - 0.5^2) + 0.5*0.5 = 0.625 (parent); 0.5*(1 - 0.2^2) + 0.5*0.8 = 0.88; reward 0.8 + 0.255.
    assert scores.reward.item() == pytest.approx(1.055)
    assert scores.value.item() == pytest.approx(0.8)
