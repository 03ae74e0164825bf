"""Search strategies, the report and the ``pavlit search`` job.

Beam search is checked against enumeration on hand-built trees (the paper's Q-vs-advantage example) and against a
plain per-problem reference on the planted task with exact Q values; compute counts against the real sampler.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from pavlit.interfaces import Problem, RewardScores
from pavlit.policy.sampler import SamplerOutput
from pavlit.provers.best_of_k import BestOfK
from pavlit.provers.planted import PlantedProver
from pavlit.rewards import PAVReward
from pavlit.search import DVTS, BeamSearch, BestOfN, report
from pavlit.search.picks import argmax_first, majority_vote, oracle_pick, weighted_vote
from pavlit.tasks.planted import PlantedTask

# ------------------------------------------------------------------------------------------------ test doubles


def _output(texts, reasons):
    ids = [[[0] * max(1, len(t)) for t in row] for row in texts]  # one token per character (at least one)
    total = sum(len(i) for row in ids for i in row)
    return SamplerOutput(texts, [[r == "eos" for r in row] for row in reasons], reasons, ids, total, 0)


class TreeSampler:
    """``next_step`` reads children from a table: text after the prompt → list of next steps (cycled over n)."""

    def __init__(self, prompt: str, tree: dict[str, list[str]]) -> None:
        self.prompt, self.tree = prompt, tree
        self.calls: list[tuple[list[str], int]] = []

    def next_step(self, prefixes, n=1, delimiter=None, max_new_tokens=None, seed=None, **kwargs):
        self.calls.append((list(prefixes), n))
        texts = [[self.tree[p[len(self.prompt) :]][j % len(self.tree[p[len(self.prompt) :]])] for j in range(n)]
                 for p in prefixes]  # fmt: skip
        return _output(texts, [["delimiter"] * n for _ in prefixes])


class TableReward:
    """``Q^π`` from a table keyed by the whole text; effective reward with Q^μ = Q^π (prover = π, K = 1)."""

    def __init__(self, q: dict[str, float], alpha: float) -> None:
        self.q, self.alpha = q, alpha

    def bind(self, task, sampler):
        pass

    def score(self, problems, prefixes, finished=None):
        value = torch.tensor([self.q["".join(s)] for s in prefixes])
        parent = torch.tensor([self.q["".join(s[:-1])] for s in prefixes])
        return RewardScores(reward=value + self.alpha * (value - parent), value=value)


class LineTask(PlantedTask):
    step_delimiter = "\n"

    def score(self, problem, response):
        return float(response.rstrip().endswith("ok"))

    def extract_answer(self, response):
        return response.strip().split("\n")[-1] or None

    def is_final_step(self, step):
        return step.startswith("ans")


PROBLEM = Problem(id="p", prompt="Q\n", answer="ok")

# The paper's example: A is a high-value first step, B a weak one. After A, both children lose value; after B,
# B1 gains a lot. Q alone keeps A's children; the advantage keeps B1.
TOY_TREE = {"": ["A\n", "B\n"], "A\n": ["a1\n", "a2\n"], "B\n": ["b1\n", "b2\n"]}
for _head in ("A\na1\n", "A\na2\n", "B\nb1\n", "B\nb2\n"):
    TOY_TREE[_head] = ["ans ok\n" if _head.startswith("B\nb1") else "ans no\n"]
TOY_Q = {"": 0.5, "A\n": 0.9, "B\n": 0.3, "A\na1\n": 0.7, "A\na2\n": 0.65, "B\nb1\n": 0.6, "B\nb2\n": 0.1}
TOY_Q.update({h + ("ans ok\n" if h == "B\nb1\n" else "ans no\n"): float(h == "B\nb1\n") for h in list(TOY_Q)[3:]})


@pytest.mark.parametrize(("alpha", "kept"), [(0.0, {"A\na1\n", "A\na2\n"}), (1.0, {"B\nb1\n", "A\na1\n"})])
def test_beam_q_alone_vs_advantage_on_the_papers_two_step_example(alpha, kept):
    # Enumerate depth 2 by hand: rewards Q + alpha*(Q - Q_parent); keep the top 2 of the 4 children.
    depth2 = [h for h in TOY_Q if h.count("\n") == 2]
    rank = sorted(depth2, key=lambda h: -(TOY_Q[h] + alpha * (TOY_Q[h] - TOY_Q[h[: h.index("\n") + 1]])))
    assert set(rank[:2]) == kept
    sampler = TreeSampler(PROBLEM.prompt, TOY_TREE)
    # Each depth-2 state has one answer line, sampled twice: dedupe keeps one copy per state.
    [result] = BeamSearch(children=2, max_steps=5, dedupe=True).run(
        [PROBLEM], 2, task=LineTask(), sampler=sampler, reward=TableReward(TOY_Q, alpha)
    )
    finished = [c["response"] for c in result["pool"]]
    assert sorted(finished) == sorted(h + TOY_TREE[h][0] for h in kept)
    assert result["response"] == ("B\nb1\nans ok\n" if alpha else "A\na1\nans no\n")
    # The oracle pick is the search's ceiling: Q alone never finished a correct candidate.
    assert result["picks"] == {"oracle": result["response"]}
    # The root grows x2 to width 2, then stays there: 1, 2, 2 states expanded, 2 children each.
    assert [len(prefixes) for prefixes, _ in sampler.calls] == [1, 2, 2]
    assert result["step_samples"] == 2 + 4 + 4 and result["verifier_calls"] == 2 + 4 + 2
    # Only depth 2 has more children (4) than slots (2); there the advantage changes the kept set, Q alone cannot.
    assert (result["contested"], result["reranked"]) == (1, int(alpha > 0))
    # Without dedupe (the paper's literal rule) the two copies of the best answer fill both slots.
    [literal] = BeamSearch(children=2, max_steps=5).run(
        [PROBLEM], 2, task=LineTask(), sampler=TreeSampler(PROBLEM.prompt, TOY_TREE), reward=TableReward(TOY_Q, alpha)
    )
    best_state = "B\nb1\n" if alpha else "A\na1\n"
    assert [c["response"] for c in literal["pool"]] == [best_state + TOY_TREE[best_state][0]] * 2


class ContainsReward:
    """A final-pick composition: value 1 for a candidate whose text contains ``needle``, else 0."""

    def __init__(self, needle: str) -> None:
        self.needle, self.bound = needle, False

    def bind(self, task, sampler):
        self.bound = True

    def score(self, problems, prefixes, finished=None):
        value = torch.tensor([float(self.needle in "".join(s)) for s in prefixes])
        return RewardScores(reward=value, value=value)


def test_beam_final_reward_picks_among_the_same_finished_candidates():
    run = dict(task=LineTask(), reward=TableReward(TOY_Q, 1.0))
    [plain] = BeamSearch(children=2, max_steps=5, dedupe=True).run(
        [PROBLEM], 2, sampler=TreeSampler(PROBLEM.prompt, TOY_TREE), **run
    )
    final = ContainsReward("a1")
    [picked] = BeamSearch(children=2, max_steps=5, dedupe=True, final_reward=final).run(
        [PROBLEM], 2, sampler=TreeSampler(PROBLEM.prompt, TOY_TREE), **run
    )
    # Same search, same pool; Q̂^π picks the correct B-branch answer, the final composition the A-branch one.
    assert [c["response"] for c in picked["pool"]] == [c["response"] for c in plain["pool"]]
    assert plain["response"] == "B\nb1\nans ok\n" and picked["response"] == "A\na1\nans no\n"
    assert final.bound and picked["verifier_calls"] == plain["verifier_calls"] + len(plain["pool"])
    assert picked["picks"] == plain["picks"]  # the ceiling does not depend on the pick


def test_beam_start_from_samples_expands_b_copies_of_the_root():
    sampler = TreeSampler(PROBLEM.prompt, TOY_TREE)
    BeamSearch(children=2, max_steps=5, start="samples").run(
        [PROBLEM], 2, task=LineTask(), sampler=sampler, reward=TableReward(TOY_Q, 0.0)
    )
    assert len(sampler.calls[0][0]) == 2  # two copies of the question, 2 children each


def test_dvts_runs_independent_greedy_subtrees():
    sampler = TreeSampler(PROBLEM.prompt, TOY_TREE)
    [result] = DVTS(children=2, max_steps=5).run(
        [PROBLEM], 4, task=LineTask(), sampler=sampler, reward=TableReward(TOY_Q, 1.0)
    )
    # 2 subtrees of width 1: each keeps its best child per depth; the table is deterministic so both agree.
    # Greedy: A (1.3) beats B (0.1) at depth 1, so the gain B -> b1 is never seen.
    assert [len(prefixes) for prefixes, _ in sampler.calls] == [2, 2, 2]
    assert result["response"] == "A\na1\nans no\n" and result["candidates"] == 2


# ---------------------------------------------------------------------------- planted task, exact Q values


class PlantedSampler:
    """π = a γ-prover on the planted task; child j of a prefix is a deterministic draw keyed by (text, j).

    Prompts are ``"#<i>|"`` so several problems have different trees.
    """

    def __init__(self, policy: PlantedProver) -> None:
        self.policy = policy
        self.generated = 0

    def child(self, text: str, j: int) -> str:
        tokens = self.policy.task.parse(text.split("|", 1)[1])
        probs = self.policy.next_token_probs(tokens).tolist()
        rng = random.Random(f"{text}#{j}")
        return f"{rng.choices(range(len(probs)), weights=probs)[0]} "

    def next_step(self, prefixes, n=1, delimiter=None, max_new_tokens=None, seed=None, **kwargs):
        texts = [[self.child(p, j) for j in range(n)] for p in prefixes]
        out = _output(texts, [["delimiter"] * n for _ in prefixes])
        self.generated += out.generated_tokens
        return out


def reference_beam(sampler, prompt, width, children, alpha, pi, mu, max_steps):
    """Beam search written plainly for one problem, with exact values computed here."""
    task = pi.task
    active, finished = [()], []
    for depth in range(1, max_steps + 1):
        if not active:
            break
        kids = []
        for steps in active:
            for j in range(children):
                step = sampler.child(prompt + "".join(steps), j)
                child = (*steps, step)
                value = pi.q_value(list(child))
                reward = value + alpha * (mu.q_value(list(child)) - mu.q_value(list(steps)))
                done = task.is_final_step(step) or depth == max_steps
                kids.append((reward, len(kids), child, value, done))
        kids.sort(key=lambda k: (-k[0], k[1]))
        active = []
        for _, _, child, value, done in kids[: width - len(finished)]:
            if done:
                finished.append((child, value))
            else:
                active.append(child)
    best = max(range(len(finished)), key=lambda i: (finished[i][1], -i))
    return "".join(finished[best][0]), sorted("".join(c) for c, _ in finished)


@pytest.mark.parametrize("width", [1, 2, 4, 50])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_batched_beam_matches_a_plain_reference_on_the_planted_task(width, alpha):
    task = PlantedTask(length=6, target=(3, 1), vocab_size=6, eos=5)
    pi, mu = PlantedProver(gamma=2.0, task=task), PlantedProver(gamma=6.0, task=task)

    class ExactVerifier:
        def score_prefixes(self, prompts, steps, batch_size=64):
            return [torch.tensor([pi.q_value(list(s[:h])) for h in range(len(s) + 1)]) for s in steps]

    problems = [Problem(id=f"p{i}", prompt=f"#{i}|", answer="3 1") for i in range(4)]
    sampler = PlantedSampler(pi)
    reward = PAVReward(ExactVerifier(), alpha=alpha, prover=mu)
    results = BeamSearch(children=3, max_steps=task.length).run(
        problems, width, task=task, sampler=sampler, reward=reward
    )
    for problem, result in zip(problems, results):
        best, pool = reference_beam(sampler, problem.prompt, width, 3, alpha, pi, mu, task.length)
        assert result["response"] == best
        assert sorted(c["response"] for c in result["pool"]) == pool
    assert sum(r["tokens"] for r in results) == sampler.generated


def test_wide_beam_enumerates_the_tree_and_picks_its_best_leaf():
    # Width >= every leaf: nothing is pruned, so the pool is the whole sampled tree and the pick its best leaf.
    task = PlantedTask(length=3, target=(1, 2), vocab_size=4, eos=3)
    pi = PlantedProver(gamma=3.0, task=task)

    class ExactVerifier:
        def score_prefixes(self, prompts, steps, batch_size=64):
            return [torch.tensor([pi.q_value(list(s[:h])) for h in range(len(s) + 1)]) for s in steps]

    sampler = PlantedSampler(pi)
    problem = Problem(id="p", prompt="#0|", answer="1 2")
    [result] = BeamSearch(children=2, max_steps=3).run(
        [problem], 64, task=task, sampler=sampler, reward=PAVReward(ExactVerifier(), alpha=0.0)
    )
    leaves, frontier = [], [()]
    while frontier:
        steps = frontier.pop(0)
        for j in range(2):
            child = (*steps, sampler.child(problem.prompt + "".join(steps), j))
            (leaves if len(child) == 3 or task.is_final_step(child[-1]) else frontier).append(child)
    assert sorted(c["response"] for c in result["pool"]) == sorted("".join(c) for c in leaves)
    assert result["value"] == max(pi.q_value(list(c)) for c in leaves)
    assert result["value"] == task.score(problem, result["response"])


# --------------------------------------------------------------------------------------------------- best-of-N


class ListSampler:
    """``complete`` returns fixed responses per prompt (the first n of them)."""

    def __init__(self, responses: list[str]) -> None:
        self.responses = responses

    def complete(self, prompts, n=1, **kwargs):
        texts = [self.responses[:n] for _ in prompts]
        return _output(texts, [["eos"] * n for _ in prompts])


class LengthReward:
    def bind(self, task, sampler):
        pass

    def score(self, problems, prefixes, finished=None):
        values = torch.tensor([{"x": 0.9, "ok": 0.2, "y": 0.5}["".join(s).split("\n")[-2]] for s in prefixes])
        return RewardScores(values, values)


def test_best_of_n_picks_and_nested_budgets_hand_computed():
    # answers:          x    ok   ok   y    ok
    # values:           .9   .2   .2   .5   .2
    sampler = ListSampler(["1\nx\n", "2\nok\n", "3\nok\n", "4\ny\n", "5\nok\n"])
    out = BestOfN().run_budgets([PROBLEM], [1, 2, 5], task=LineTask(), sampler=sampler, reward=LengthReward())
    assert out[1][0]["response"] == "1\nx\n" and out[1][0]["picks"]["oracle"] == "1\nx\n"
    assert out[2][0]["picks"]["majority"] == "1\nx\n"  # 1-1 tie: the answer seen first
    assert out[5][0]["response"] == "1\nx\n"  # highest value
    assert out[5][0]["picks"] == {"majority": "2\nok\n", "oracle": "2\nok\n", "weighted": "1\nx\n"}
    # weighted: ok has 0.6 < x 0.9
    assert [out[b][0]["tokens"] for b in (1, 2, 5)] == [4, 9, sum(len(r) for r in sampler.responses)]
    assert out[5][0]["step_samples"] == 10 and out[5][0]["verifier_calls"] == 5


def test_picks_hand_cases():
    assert argmax_first([0.1, 0.5, 0.5]) == 1
    assert majority_vote([None, "a", "b", "b", "a"]) == 1  # 2-2: "a" seen first
    assert majority_vote([None, None]) == 0
    assert weighted_vote(["a", "b", "b"], [0.9, 0.5, 0.5]) == 1
    assert weighted_vote(["a", "b", "b"], [0.9, 0.4, 0.4]) == 0
    assert weighted_vote([None, None], [0.1, 0.3]) == 1
    assert oracle_pick([False, True, True]) == 1 and oracle_pick([False]) == 0


# --------------------------------------------------------------------------------- real sampler: token counts


@pytest.fixture(scope="module")
def tiny_sampler():
    from pavlit.policy.sampler import Sampler
    from pavlit.policy.sources import TinyPolicy
    from pavlit.tasks.arithmetic import ALPHABET

    model, tokenizer = TinyPolicy(n_layer=1, n_embd=16, n_head=2, max_position=128, alphabet=ALPHABET).load()
    return Sampler(model, tokenizer, max_new_tokens=12, delimiter="\n")


class Recording:
    def __init__(self, sampler) -> None:
        self.sampler, self.generated = sampler, 0
        self.device = sampler.device

    def next_step(self, *args, **kwargs):
        out = self.sampler.next_step(*args, **kwargs)
        self.generated += out.generated_tokens
        return out

    def complete(self, *args, **kwargs):
        out = self.sampler.complete(*args, **kwargs)
        self.generated += out.generated_tokens
        return out


class ConstantReward:
    def bind(self, task, sampler):
        pass

    def score(self, problems, prefixes, finished=None):
        values = torch.tensor([len("".join(s)) % 7 / 7 for s in prefixes])
        return RewardScores(values, values)


@pytest.mark.parametrize("strategy", [BeamSearch(max_steps=3), DVTS(children=2, max_steps=3), BestOfN()])
def test_token_counts_equal_the_samplers(tiny_sampler, strategy):
    from pavlit.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(n_train=0, n_validation=0, n_test=3)
    sampler = Recording(tiny_sampler)
    results = strategy.run(list(task.problems("test")), 4, task=task, sampler=sampler, reward=ConstantReward(), seed=3)
    assert sum(r["tokens"] for r in results) == sampler.generated > 0
    again = strategy.run(list(task.problems("test")), 4, task=task, sampler=sampler, reward=ConstantReward(), seed=3)
    assert [r["response"] for r in again] == [r["response"] for r in results]  # seeded


# ------------------------------------------------------------------------------------------------------ report


def _point(line, budget, accuracy, tokens, pick=None):
    return report.Point(line, line, pick, budget, 10, accuracy, accuracy, accuracy, tokens, 0, 0, 0)


def test_bootstrap_ci_exact_cases():
    assert report.bootstrap_ci(torch.ones(20)) == (1.0, 1.0)
    assert report.bootstrap_ci(torch.tensor([1.0])) == (1.0, 1.0)
    low, high = report.bootstrap_ci(torch.tensor([0.0, 1.0] * 50), n_resamples=2000)
    assert low < 0.5 < high and high - low == pytest.approx(0.2, abs=0.04)  # ±1.96·sqrt(.25/100)


def test_compute_efficiency_interpolates_on_log_compute():
    points = [_point("orm", 1, 0.2, 100), _point("orm", 64, 0.5, 6400)]
    points += [_point("pav", 1, 0.3, 300), _point("pav", 4, 0.4, 1200), _point("pav", 16, 0.6, 4800)]
    e = report.compute_efficiency(points, "orm", "pav")
    # 0.5 lies halfway between 0.4 (1200) and 0.6 (4800) -> geometric mean 2400 tokens.
    assert e["target_tokens_to_match"] == pytest.approx(2400)
    assert e["ratio"] == pytest.approx(6400 / 2400)
    assert e["target_accuracy_at_baseline_tokens"] is None  # 6400 is beyond pav's measured range
    assert e["ratio_vs_first_reach"] == pytest.approx(6400 / 2400)  # orm improves up to its last budget
    # A baseline flat from N = 16 on: the paper's ratio counts N = 64's tokens, the other one N = 16's.
    flat = [_point("orm", 1, 0.2, 100), _point("orm", 16, 0.5, 1600), _point("orm", 64, 0.5, 6400)]
    e = report.compute_efficiency(flat + points[2:], "orm", "pav")
    assert e["ratio"] == pytest.approx(6400 / 2400) and e["ratio_vs_first_reach"] == pytest.approx(1600 / 2400)
    assert "first reaches that accuracy at 1,600 tokens" in report.render_markdown(flat + points[2:], e)
    weak = [p for p in points if p.line == "orm"] + [_point("pav", 1, 0.1, 50), _point("pav", 2, 0.3, 7000)]
    e = report.compute_efficiency(weak, "orm", "pav")
    assert e["ratio"] is None and e["target_best_accuracy"] == 0.3
    fraction = math.log(6400 / 50) / math.log(7000 / 50)  # where 6400 sits between 50 and 7000 on log-compute
    assert e["target_accuracy_at_baseline_tokens"] == pytest.approx(0.1 + 0.2 * fraction)
    assert "does **not reach**" in report.render_markdown(weak, e)


def test_no_efficiency_ratio_against_a_baseline_that_solves_nothing():
    """Any line "reaches" accuracy 0 at its smallest budget; that is no evidence of efficiency (seen on Gemma)."""
    points = [_point("orm", 1, 0.0, 127), _point("orm", 4, 0.0, 450)]
    points += [_point("pav", 1, 0.0, 198), _point("pav", 4, 0.125, 526)]
    e = report.compute_efficiency(points, "orm", "pav")
    assert e["ratio"] is None and e["baseline_solves_nothing"]
    text = report.render_markdown(points, e)
    assert "solves no problem" in text and "more compute-efficient" not in text


def test_summarise_and_render_from_a_tiny_results_set(tmp_path):
    records = [
        {
            "method": "m",
            "budget": b,
            "problem_id": f"p{i}",
            "correct": i < b,
            "tokens": 10 * b,
            "picks": {"oracle": True},
        }
        for b in (1, 2)
        for i in range(4)
    ]
    points = report.summarise(records, n_resamples=100)
    assert [(p.line, p.budget, p.accuracy, p.tokens) for p in points] == [
        ("m", 1, 0.25, 10.0),
        ("m", 2, 0.5, 20.0),
        ("m [pass@N]", 1, 1.0, 10.0),
        ("m [pass@N]", 2, 1.0, 20.0),
    ]
    text = report.render_markdown(points, header={"task": "toy"}, plot_name="plot.png")
    assert "| m | 2 | 0.500 |" in text and "![accuracy vs generated tokens](plot.png)" in text
    png = report.plot_accuracy_vs_compute(points, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_differences_hand_computed():
    from pavlit.search.paired import paired_differences, render_paired

    def rec(method, budget, pid, correct, response="r"):
        return {"method": method, "budget": budget, "problem_id": pid, "correct": correct, "response": response}

    records = [rec("a", 1, f"p{i}", c) for i, c in enumerate([1, 0, 0, 1])]
    records += [rec("b", 1, f"p{i}", c, "s" if i < 2 else "r") for i, c in enumerate([1, 1, 0, 1])]
    records += [rec("b", 2, "p0", True)]  # a budget only b ran: no row
    (row,) = paired_differences(records, n_resamples=200)
    assert (row["first"], row["second"], row["budget"], row["problems"]) == ("a", "b", 1, 4)
    assert row["difference"] == pytest.approx(0.25) and row["different_responses"] == 2
    assert 0.0 <= row["ci_low"] <= 0.25 <= row["ci_high"] <= 0.75  # per-problem differences are 0, 1, 0, 0
    same = paired_differences([r for r in records if r["method"] == "a"] + [{**r, "method": "c"} for r in records[:4]])
    assert same[0]["difference"] == 0.0 and same[0]["ci_low"] == same[0]["ci_high"] == 0.0
    text = "\n".join(render_paired(paired_differences(records, n_resamples=200)))
    assert "| `b` − `a` | 1 | 4 | 2 | 0.750 vs 0.500 | +0.250 [" in text


def test_tree_decisions_average_the_counters_and_skip_best_of_n():
    records = [
        {"method": "beam", "budget": 4, "candidates": 2, "contested": 3, "reranked": 1},
        {"method": "beam", "budget": 4, "candidates": 4, "contested": 1, "reranked": 0},
        {"method": "bon", "budget": 4, "candidates": 4},
    ]
    [row] = report.tree_decisions(records)
    assert row == {
        "method": "beam",
        "budget": 4,
        "problems": 2,
        "candidates": 3.0,
        "contested": 2.0,
        "reranked": 0.5,
        "problems_reranked": 0.5,
    }
    text = report.render_markdown([], decisions=[row])
    assert "| beam | 4 | 3.0 | 2.00 | 0.50 | 50% |" in text


# ------------------------------------------------------------------------------------------ pavlit search (CLI)


@pytest.fixture(scope="module")
def search_setup(tmp_path_factory):
    from pavlit.modules.orm import ORMModule
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy
    from pavlit.tasks.arithmetic import ALPHABET

    root = tmp_path_factory.mktemp("search")
    source = TinyPolicy(n_layer=1, n_embd=16, n_head=2, max_position=128, alphabet=ALPHABET)
    PAVModule(source=source).save_pretrained(root / "pav")
    ORMModule(source=source).save_pretrained(root / "orm")
    config = f"""
task: {{class_path: ArithmeticTask, init_args: {{n_train: 4, n_validation: 3, n_test: 4}}}}
policy: {{class_path: TinyPolicy, init_args: {{n_layer: 1, n_embd: 16, n_head: 2, max_position: 128}}}}
methods:
  - name: orm_bon
    search: {{class_path: BestOfN}}
    reward: {{class_path: ORMReward, init_args: {{verifier: {root / "orm"}}}}}
  - name: pqv_beam
    search: {{class_path: BeamSearch, init_args: {{max_steps: 2}}}}
    reward: {{class_path: PQVReward, init_args: {{verifier: {root / "pav"}}}}}
  - name: pav_beam
    search: {{class_path: BeamSearch, init_args: {{max_steps: 2}}}}
    reward: {{class_path: PAVReward, init_args: {{verifier: {root / "pav"}, alpha: 0.5}}}}
budgets: [1, 2]
max_new_tokens: 8
chunk_size: 2
bootstrap: 50
alpha_sweep: {{method: pav_beam, alphas: [0.0, 1.0], budgets: [2]}}
"""
    (root / "search.yaml").write_text(config)
    return root


def test_pavlit_search_end_to_end_and_resume(search_setup, tmp_path, capsys):
    from pavlit.cli import main

    out = tmp_path / "run"
    args = ["search", "--config", str(search_setup / "search.yaml"), "--output_dir", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    lines = {p["line"] for p in results["points"]}
    assert {"orm_bon", "orm_bon [pass@N]", "orm_bon [majority]", "pqv_beam", "pav_beam"} <= lines
    assert results["alpha_sweep"]["chosen"] in (0.0, 1.0)
    assert results["efficiency"]["baseline"] == "orm_bon" and results["efficiency"]["target"] == "pav_beam"
    assert (out / "accuracy_vs_compute.png").stat().st_size > 0 and (out / "config.yaml").exists()
    markdown = (out / "report.md").read_text()
    assert "| pav_beam | 2 |" in markdown
    # The paired differences come first and match the per-method accuracies on the same problems.
    assert markdown.index("## Paired differences") < markdown.index("| method | N / B |")
    accuracy = {(p["line"], p["budget"]): p["accuracy"] for p in results["points"]}
    pairs = {(r["first"], r["second"]) for r in results["paired"]}
    assert {("orm_bon", "pqv_beam"), ("orm_bon", "pav_beam"), ("pqv_beam", "pav_beam")} <= pairs
    for row in results["paired"]:
        assert row["problems"] == 4 and row["ci_low"] <= row["difference"] <= row["ci_high"]
        want = accuracy[(row["second"], row["budget"])] - accuracy[(row["first"], row["budget"])]
        assert row["difference"] == pytest.approx(want)
    shards = sorted(out.glob("chunk-*.jsonl"))
    assert len(shards) == 3 * 2  # 3 methods x 2 chunks of 2 problems
    # Kill-and-resume: a lost shard is recomputed, identical; finished ones are not rerun.
    lost = shards[3].read_text()
    shards[3].unlink()
    kept = shards[0].stat().st_mtime_ns
    assert main(args) == 0
    assert shards[3].read_text() == lost and shards[0].stat().st_mtime_ns == kept
    assert json.loads((out / "results.json").read_text())["points"] == results["points"]
    capsys.readouterr()
    assert main([*args, "--budgets", "[1, 4]"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_the_tiny_config_parses_through_the_real_command():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from pavlit import registry
    from pavlit.search.job import search

    registry.load_all()
    parser = ArgumentParser(parser_mode="yaml")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(search, fail_untyped=True)
    config = Path(__file__).parents[1] / "configs" / "tiny" / "search.yaml"
    init = parser.instantiate(parser.parse_args(["--config", str(config)]))
    names = [m.name for m in init.methods]
    assert names[:3] == ["orm_bon", "pqv_beam", "pav_beam"]
    assert isinstance(init.methods[2].reward, PAVReward) and isinstance(init.methods[2].reward.prover, BestOfK)
    assert init.alpha_sweep.alphas == [round(0.1 * i, 1) for i in range(11)] and init.alpha_sweep.split == "validation"
