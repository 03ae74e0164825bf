"""Reward compositions (``pavlit.rewards``): exact values against hand-computed and planted (exact-Q) cases."""

from __future__ import annotations

import math

import pytest
import torch

from pavlit.interfaces import Problem, Reward
from pavlit.policy.sampler import SamplerOutput
from pavlit.provers.best_of_k import BestOfK
from pavlit.provers.planted import PlantedProver
from pavlit.rewards import MCReward, ORMReward, PAVReward, PQVReward, PrefixScorer, ResponseScorer, load_verifier
from pavlit.tasks.planted import PlantedTask
from pavlit.values import best_of_k_from_counts

PROBLEM = Problem(id="p0", prompt="Q:", answer="7")


class TableVerifier:
    """A process verifier whose ``Q^π`` of a prefix is read from a table keyed by the prefix's steps."""

    def __init__(self, table: dict[tuple[str, ...], float]) -> None:
        self.table = table
        self.calls: list[tuple[list[str], list[list[str]]]] = []

    def score_prefixes(self, prompts, steps, batch_size=64):
        self.calls.append((list(prompts), [list(s) for s in steps]))
        return [torch.tensor([self.table[tuple(s[:h])] for h in range(len(s) + 1)]) for s in steps]


class FakeORM:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def score_responses(self, prompts, responses, batch_size=64):
        self.seen += list(zip(prompts, responses))
        return torch.tensor([len(r) / 10 for r in responses])


def test_fakes_satisfy_the_documented_protocols():
    assert isinstance(TableVerifier({}), PrefixScorer)
    assert isinstance(FakeORM(), ResponseScorer)
    assert issubclass(PAVReward, Reward) and issubclass(MCReward, Reward) and issubclass(ORMReward, Reward)


def test_orm_scores_the_joined_text_and_value_equals_reward():
    orm = FakeORM()
    reward = ORMReward(orm)
    scores = reward.score([PROBLEM, PROBLEM], [["a\n", "bc\n"], []])
    assert orm.seen == [("Q:", "a\nbc\n"), ("Q:", "")]
    assert torch.allclose(scores.reward, torch.tensor([0.5, 0.0]))
    assert torch.equal(scores.reward, scores.value)


def test_pav_effective_reward_hand_computed_with_best_of_2():
    # Q^pi: root 0.2, after "a" 0.5. BoK(2): Q^mu = 1-(1-q)^2 -> 0.36 (root), 0.75 ("a"). A = 0.39.
    verifier = TableVerifier({(): 0.2, ("a\n",): 0.5})
    reward = PAVReward(verifier, alpha=0.5, prover=BestOfK(2))
    scores = reward.score([PROBLEM, PROBLEM], [["a\n"], []])
    assert scores.reward.tolist() == pytest.approx([0.5 + 0.5 * (0.75 - 0.36), 0.2])
    assert scores.value.tolist() == pytest.approx([0.5, 0.2])
    assert len(verifier.calls) == 1  # one batched pass for both prefixes (parent values come with it)


def test_pqv_is_q_pi_alone_and_pav_alpha_zero_equals_it():
    verifier = TableVerifier({(): 0.9, ("a\n",): 0.3})
    pqv = PQVReward(verifier).score([PROBLEM], [["a\n"]])
    pav0 = PAVReward(verifier, alpha=0.0).score([PROBLEM], [["a\n"]])
    assert pqv.reward.tolist() == pytest.approx([0.3]) and pav0.reward.tolist() == pytest.approx([0.3])


def test_checkpoint_prover_supplies_q_mu_from_its_own_q_model():
    from pavlit.provers.checkpoint import CheckpointProver

    pi = TableVerifier({(): 0.2, ("a\n",): 0.5})
    mu = TableVerifier({(): 0.6, ("a\n",): 0.4})
    prover = CheckpointProver(verifier_path="unused")
    prover._verifier = mu  # the prover's Q-model, already in memory
    scores = PAVReward(pi, alpha=1.0, prover=prover).score([PROBLEM], [["a\n"]])
    assert scores.reward.tolist() == pytest.approx([0.5 + (0.4 - 0.6)])
    assert mu.calls == [(["Q:"], [["a\n"]])]  # parent and prefix in one pass


def test_pav_with_the_planted_prover_matches_exact_values():
    task = PlantedTask()
    pi = PlantedProver(gamma=3.0, task=task)  # the "policy": exact Q^pi from the automaton
    mu = PlantedProver(gamma=10.0, task=task)

    class ExactVerifier:
        def score_prefixes(self, prompts, steps, batch_size=64):
            return [torch.tensor([pi.q_value(list(s[:h])) for h in range(len(s) + 1)]) for s in steps]

    prefixes = [["3 "], ["3 ", "6 "], ["3 ", "7 "], ["9 "], []]
    scores = PAVReward(ExactVerifier(), alpha=0.5, prover=mu).score([PROBLEM] * len(prefixes), prefixes)
    for prefix, got in zip(prefixes, scores.reward.tolist()):
        q = pi.q_value(prefix)
        advantage = mu.q_value(prefix) - mu.q_value(prefix[:-1]) if prefix else 0.0
        assert got == pytest.approx(q + 0.5 * advantage, abs=1e-6)
    # Progress toward the target is rewarded, a slip is punished, relative to Q alone.
    assert scores.reward[1] > scores.value[1] and scores.reward[2] < scores.value[2]


class CountingSampler:
    """``complete`` returns, for a prompt ending in steps, ``k`` correct ("=7") and ``n - k`` wrong completions,
    where ``k`` is read from a table keyed by the text after the question."""

    def __init__(self, correct_by_head: dict[str, int]) -> None:
        self.correct_by_head = correct_by_head
        self.prompts: list[str] = []

    def complete(self, prompts, n=1, max_new_tokens=None, delimiter=None, **kwargs):
        self.prompts += list(prompts)
        texts, ids = [], []
        for prompt in prompts:
            k = self.correct_by_head[prompt[len(PROBLEM.prompt) :]]
            row = ["=7"] * k + ["=1"] * (n - k)
            texts.append(row)
            ids.append([[0] * (3 + j) for j in range(n)])
        n_tokens = sum(len(t) for row in ids for t in row)
        return SamplerOutput(texts, [[True] * n for _ in prompts], [["eos"] * n for _ in prompts], ids, n_tokens, 0)


class AnswerTask(PlantedTask):
    """Correct iff the response ends with "=7"."""

    step_delimiter = "\n"

    def score(self, problem, response):
        return float(response.endswith("=7"))

    def is_final_step(self, step):
        return step.startswith("=")


def test_mc_reward_counts_best_of_k_and_caching():
    sampler = CountingSampler({"": 2, "a\n": 6})
    reward = MCReward(n_rollouts=8, alpha=0.5, prover=BestOfK(4))
    reward.bind(AnswerTask(), sampler)
    first = reward.score([PROBLEM], [["a\n"]])
    q_mu = best_of_k_from_counts(torch.tensor([6, 2]), 8, 4).tolist()
    assert first.value.tolist() == pytest.approx([6 / 8])
    assert first.reward.tolist() == pytest.approx([6 / 8 + 0.5 * (q_mu[0] - q_mu[1])])
    # Child and parent rolled out once each, in one call; tokens are the completions' own lengths.
    assert sampler.prompts == ["Q:a\n", "Q:"]
    assert first.tokens == [2 * sum(3 + j for j in range(8))] and first.calls == [16]
    again = reward.score([PROBLEM], [["a\n"]])
    assert sampler.prompts == ["Q:a\n", "Q:"] and again.tokens == [0] and again.calls == [0]
    assert torch.equal(again.reward, first.reward)


def test_mc_reward_scores_finished_responses_exactly_without_rollouts():
    sampler = CountingSampler({"": 4})
    reward = MCReward(n_rollouts=4, alpha=1.0, prover=BestOfK(2))
    reward.bind(AnswerTask(), sampler)
    scores = reward.score([PROBLEM, PROBLEM], [["=7"], ["=3"]], finished=[True, True])
    assert scores.value.tolist() == [1.0, 0.0]
    # Parent Q^pi = 4/4 -> BoK = 1; finished child BoK = 1 or 0.
    assert scores.reward.tolist() == pytest.approx([1.0 + (1.0 - 1.0), 0.0 + (0.0 - 1.0)])
    assert sampler.prompts == ["Q:"]


def test_mc_reward_checks_its_settings():
    with pytest.raises(ValueError, match="n_rollouts >= 4"):
        MCReward(n_rollouts=2)
    with pytest.raises(RuntimeError, match="bind"):
        MCReward().score([PROBLEM], [[]])
    with pytest.raises(ValueError, match="alpha"):
        PAVReward(TableVerifier({}), alpha=math.nan)


@pytest.fixture(scope="module")
def tiny_verifiers(tmp_path_factory):
    from pavlit.modules.orm import ORMModule
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy
    from pavlit.tasks.arithmetic import ALPHABET

    root = tmp_path_factory.mktemp("verifiers")
    source = TinyPolicy(n_layer=1, n_embd=16, n_head=2, max_position=128, alphabet=ALPHABET)
    PAVModule(source=source).save_pretrained(root / "pav")
    ORMModule(source=source).save_pretrained(root / "orm")
    return root


def test_verifier_paths_load_lazily_once_and_match_the_module(tiny_verifiers):
    path = str(tiny_verifiers / "pav")
    a, b = PAVReward(path, alpha=0.5), PQVReward(path)
    assert a._model is None  # nothing loaded at construction (configs stay cheap to parse)
    a.bind(None, None)
    b.bind(None, None)
    assert a._model is b._model is load_verifier("pav", path)
    steps = [["1+2=3\n", "Answer: 3\n"], []]
    values = a._model.score_prefixes(["Compute 1+2.\n"] * 2, steps)
    scores = a.score([Problem("x", "Compute 1+2.\n", "3")] * 2, steps)
    assert scores.value.tolist() == pytest.approx([float(values[0][-1]), float(values[1][-1])])
    orm = ORMReward(str(tiny_verifiers / "orm"))
    out = orm.score([Problem("x", "Compute 1+2.\n", "3")], [steps[0]])
    assert out.value.shape == (1,) and 0.0 < float(out.value[0]) < 1.0


def test_mc_reward_rolls_out_a_checkpoint_prover_from_the_same_prefixes():
    from pavlit.provers.checkpoint import CheckpointProver

    pi = CountingSampler({})
    mu = CountingSampler({"": 1, "a\n": 2, "b\n": 3})
    prover = CheckpointProver(policy=TinyPolicyStub())
    prover._sampler = mu  # the prover's own model, already built (rollout_sampler returns it)
    reward = MCReward(n_rollouts=4, alpha=1.0, prover=prover)
    reward.bind(AnswerTask(), pi)
    # Two siblings: Q^pi ranks "a" above "b", the prover's advantages rank them the other way (0.25 vs 0.5), which a
    # Best-of-K prover, monotone in Q^pi, never could.
    pi.correct_by_head = {"": 1, "a\n": 3, "b\n": 2}
    scores = reward.score([PROBLEM, PROBLEM], [["a\n"], ["b\n"]])
    assert scores.value.tolist() == pytest.approx([3 / 4, 2 / 4])
    a_mu = [2 / 4 - 1 / 4, 3 / 4 - 1 / 4]
    assert scores.reward.tolist() == pytest.approx([3 / 4 + a_mu[0], 2 / 4 + a_mu[1]])
    # pi and mu each completed both children and the shared parent once; mu's completions count as compute too.
    assert sorted(pi.prompts) == sorted(mu.prompts) == ["Q:", "Q:a\n", "Q:b\n"]
    assert sum(scores.calls) == 2 * 3 * 4
    # A finished response is its own score under mu as well; cached prefixes are not rolled out again.
    done = reward.score([PROBLEM], [["a\n", "=7"]], finished=[True])
    assert mu.prompts.count("Q:a\n") == 1 and done.reward.tolist() == pytest.approx([1.0 + (1.0 - 2 / 4)])


class TinyPolicyStub:
    """Stands in for the prover's model source; never loaded because the test hands the prover its sampler."""

    def load(self):  # pragma: no cover - a loaded stub would be a bug in the test
        raise AssertionError("the prover's sampler was given; nothing should load")
