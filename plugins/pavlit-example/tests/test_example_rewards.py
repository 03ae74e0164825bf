"""PAVMinReward: hand-computed scores, agreement with pavlit's ``pav`` on one step, and a beam search it changes."""

from __future__ import annotations

import pytest
import torch
from pavlit.interfaces import Problem, Prover, Task
from pavlit.policy.sampler import SamplerOutput
from pavlit.provers.best_of_k import BestOfK
from pavlit.rewards import PAVReward
from pavlit.search import BeamSearch

from pavlit_example.provers import MixtureProver
from pavlit_example.rewards import PAVMinReward

PROBLEM = Problem(id="p", prompt="Q\n", answer="ok")

# One response A, B, C whose second step loses value: Q^π of the prefixes "", A, AB, ABC.
Q = {"": 0.5, "A\n": 0.8, "A\nB\n": 0.4, "A\nB\nC\n": 0.9}


class TableVerifier:
    """A process-verifier double: ``Q^π`` of each prefix read from a table keyed by the prefix text."""

    def __init__(self, q: dict[str, float]) -> None:
        self.q = q
        self.calls = 0

    def score_prefixes(self, prompts, steps, batch_size=64):
        self.calls += 1
        return [torch.tensor([self.q["".join(s[:h])] for h in range(len(s) + 1)]) for s in steps]


class RecordingProver(Prover):
    """π as its own prover (Q^μ = Q^π) that records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[float], list[list[str]], list[str]]] = []

    def q_values(self, q_pi, prefixes=None, prompts=None):
        self.calls.append((q_pi.tolist(), [list(p) for p in prefixes], list(prompts)))
        return q_pi.clone()


class RefusingProver(Prover):
    def q_values(self, q_pi, prefixes=None, prompts=None):
        raise AssertionError("the prover must not be called when alpha = 0")


def test_hand_computed_with_pi_as_prover():
    prover = RecordingProver()
    reward = PAVMinReward(TableVerifier(Q), alpha=1.0, prover=prover)
    scores = reward.score([PROBLEM] * 3, [["A\n", "B\n", "C\n"], ["A\n"], []])
    # Steps of ABC: 0.8 + (0.8 - 0.5) = 1.1; 0.4 + (0.4 - 0.8) = 0.0; 0.9 + (0.9 - 0.4) = 1.4 -> min 0.0.
    # Prefix A alone: 1.1. The question alone: its own Q^π, 0.5.
    assert scores.reward.tolist() == pytest.approx([0.0, 1.1, 0.5])
    assert scores.value.tolist() == pytest.approx([0.9, 0.8, 0.5])
    # One prover call over every prefix of every response, in order, with its prompt.
    [(q_pi, prefixes, prompts)] = prover.calls
    assert q_pi == pytest.approx([0.5, 0.8, 0.4, 0.9, 0.5, 0.8, 0.5])
    assert prefixes == [[], ["A\n"], ["A\n", "B\n"], ["A\n", "B\n", "C\n"], [], ["A\n"], []]
    assert prompts == ["Q\n"] * 7


def test_hand_computed_with_best_of_2_and_mixture_provers():
    # Best-of-2: Q^μ = 1 - (1 - q)^2 = 0.75, 0.96, 0.64, 0.99. Steps: 0.8 + 0.5*0.21 = 0.905,
    # 0.4 + 0.5*(-0.32) = 0.24, 0.9 + 0.5*0.35 = 1.075 -> min 0.24.
    scores = PAVMinReward(TableVerifier(Q), alpha=0.5, prover=BestOfK(2)).score([PROBLEM], [["A\n", "B\n", "C\n"]])
    assert scores.reward.item() == pytest.approx(0.24)
    # The mixture with mix = 0.5 averages the two provers' values, so each advantage is the average of
    # BoK(2)'s (0.21, -0.32, 0.35) and π's (0.3, -0.4, 0.5): the middle step 0.4 + 0.5*(-0.36) = 0.22.
    mixed = PAVMinReward(TableVerifier(Q), alpha=0.5, prover=MixtureProver(k=2, mix=0.5))
    assert mixed.score([PROBLEM], [["A\n", "B\n", "C\n"]]).reward.item() == pytest.approx(0.22)


def test_default_prover_is_best_of_4():
    assert repr(PAVMinReward("some/folder").prover) == "BestOfK(k=4)"


def test_alpha_zero_is_the_minimum_of_q_pi_and_skips_the_prover():
    reward = PAVMinReward(TableVerifier(Q), alpha=0.0, prover=RefusingProver())
    scores = reward.score([PROBLEM] * 2, [["A\n", "B\n", "C\n"], ["A\n"]])
    assert scores.reward.tolist() == pytest.approx([0.4, 0.8])


@pytest.mark.parametrize("prover", [BestOfK(4), MixtureProver(k=8, mix=0.3)])
def test_equals_pav_on_one_step_prefixes_and_at_most_pav_on_longer_ones(prover):
    verifier = TableVerifier(Q)
    mine, builtin = PAVMinReward(verifier, 0.7, prover), PAVReward(verifier, 0.7, prover)
    one_step = [["A\n"], []]
    assert torch.allclose(mine.score([PROBLEM] * 2, one_step).reward, builtin.score([PROBLEM] * 2, one_step).reward)
    longer = [["A\n", "B\n"], ["A\n", "B\n", "C\n"]]
    # pav scores the last step only; the minimum over all steps can only be lower.
    assert bool((mine.score([PROBLEM] * 2, longer).reward <= builtin.score([PROBLEM] * 2, longer).reward).all())


def test_verifier_returning_the_wrong_number_of_values_is_an_error():
    class Short(TableVerifier):
        def score_prefixes(self, prompts, steps, batch_size=64):
            return [v[:-1] for v in super().score_prefixes(prompts, steps, batch_size)]

    with pytest.raises(ValueError, match="returned 2 values for prefix 0, which has 2 steps"):
        PAVMinReward(Short(Q), alpha=1.0).score([PROBLEM], [["A\n", "B\n"]])


def test_bad_arguments():
    with pytest.raises(ValueError, match="PAVMinReward: alpha must be a finite number"):
        PAVMinReward("v", alpha=float("inf"))
    with pytest.raises(ValueError, match="PAVMinReward: batch_size must be >= 1"):
        PAVMinReward("v", batch_size=0)
    with pytest.raises(ValueError, match="got 2 problems but 1 prefixes"):
        PAVMinReward(TableVerifier(Q)).score([PROBLEM] * 2, [[]])
    assert PAVMinReward(TableVerifier(Q)).score([], []).reward.shape == (0,)


# ------------------------------------------------------------------------------------ inside pavlit's beam search


class TreeSampler:
    """``next_step`` reads each state's children from a table: text after the prompt → next steps (cycled)."""

    device = "cpu"

    def __init__(self, tree: dict[str, list[str]]) -> None:
        self.tree = tree

    def next_step(self, prefixes, n=1, delimiter=None, max_new_tokens=None, seed=None, **kwargs):
        texts = [[self.tree[p[len(PROBLEM.prompt) :]][j % 2] for j in range(n)] for p in prefixes]
        ids = [[[0] * len(t) for t in row] for row in texts]
        reasons = [["delimiter"] * n for _ in prefixes]
        return SamplerOutput(texts, [[False] * n for _ in prefixes], reasons, ids, sum(map(len, sum(texts, []))))


class LineTask(Task):
    def problems(self, split):
        return [PROBLEM]

    def score(self, problem, response):
        return float(response.endswith("good\n"))


# Path A first loses value (0.5 -> 0.2), then A1 jumps up (0.75); path B gains a little at every step.
TREE = {"": ["A\n", "B\n"], "A\n": ["A1 good\n", "A2\n"], "B\n": ["B1 good\n", "B2\n"]}
TREE_Q = {"": 0.5, "A\n": 0.2, "B\n": 0.6, "A\nA1 good\n": 0.75, "A\nA2\n": 0.3, "B\nB1 good\n": 0.7, "B\nB2\n": 0.62}


@pytest.mark.parametrize(("reward_class", "expected"), [(PAVReward, "A\nA1 good\n"), (PAVMinReward, "B\nB1 good\n")])
def test_beam_search_keeps_the_path_without_a_setback(reward_class, expected):
    # Width 2, 2 children per state, 2 steps. At depth 2, with α = 1 and π as its own prover:
    #   pav:     A1 0.75 + 0.55 = 1.3, A2 0.4, B1 0.8, B2 0.64 -> keeps A1, B1; picks A1 (Q^π 0.75 > 0.7).
    #   pav_min: A1 min(0.2 - 0.3, 1.3) = -0.1, A2 -0.1, B1 min(0.7, 0.8) = 0.7, B2 0.64 -> keeps B1, B2; picks B1.
    reward = reward_class(TableVerifier(TREE_Q), alpha=1.0, prover=BestOfK(1))
    [result] = BeamSearch(children=2, max_steps=2).run(
        [PROBLEM], 2, task=LineTask(), sampler=TreeSampler(TREE), reward=reward
    )
    assert result["response"] == expected
    assert sorted(c["response"] for c in result["pool"]) == (
        ["A\nA1 good\n", "B\nB1 good\n"] if reward_class is PAVReward else ["B\nB1 good\n", "B\nB2\n"]
    )
