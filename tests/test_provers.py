"""Built-in provers: analytic Best-of-K and the planted task's γ-prover with exact values."""

from __future__ import annotations

import pytest
import torch

from pavlit.interfaces import Prover
from pavlit.provers.best_of_k import BestOfK
from pavlit.provers.planted import PlantedProver
from pavlit.tasks.planted import PlantedTask
from pavlit.values import advantages, alignment, distinguishability

PROVER = PlantedProver(gamma=10.0)
TASK = PROVER.task
UNIFORM_TABLE = TASK.automaton_values(torch.full((5, 15), 1 / 15, dtype=torch.float64))

# Prefixes with 2 or 3 tokens left: partial matches, broken matches, found targets and EOS.
SHORT_PREFIXES = [
    [1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 3, 6],
    [1, 1, 1, 1, 3, 6, 0],
    [9, 3, 6, 0, 3, 6, 0],
    [1, 1, 1, 1, 1, 3, 6, 0],
    [3, 6, 0, 3, 6, 0, 3, 5],
    [1, 2, 14, 4, 4, 4, 4],
    [3, 6, 0, 3, 5, 1, 1],
    [1, 1, 1, 1, 1, 1, 3, 6, 0, 3],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
]


def test_best_of_k() -> None:
    prover = BestOfK(k=4)
    assert isinstance(prover, Prover)
    q_pi = torch.tensor([[0.0, 0.5], [0.1, 1.0]])
    assert torch.allclose(prover.q_values(q_pi), 1 - (1 - q_pi) ** 4)
    assert torch.allclose(BestOfK(k=1).q_values(q_pi, [["a"]] * 4), q_pi)
    assert BestOfK().k == 4
    for bad in (0, 2.5, -1):
        with pytest.raises(ValueError):
            BestOfK(k=bad)


def test_gamma_prover_next_token_probs() -> None:
    assert isinstance(PROVER, Prover)
    empty = PROVER.next_token_probs([])
    assert empty[3].item() == pytest.approx(10 / 24) and empty[14].item() == pytest.approx(1 / 24)
    assert empty.sum().item() == pytest.approx(1.0)
    assert PROVER.next_token_probs(["3 ", "6 "])[0].item() == pytest.approx(10 / 24)
    assert PROVER.next_token_probs([3, 6, 0, 3])[5].item() == pytest.approx(10 / 24)
    assert PROVER.next_token_probs([3, 6, 0, 3, 6])[0].item() == pytest.approx(10 / 24)  # back to k = 2
    assert torch.allclose(PROVER.next_token_probs([3, 6, 0, 3, 5]), torch.full((15,), 1 / 15, dtype=torch.float64))
    assert torch.allclose(PlantedProver(gamma=1.0).probs_by_state, torch.full((6, 15), 1 / 15, dtype=torch.float64))
    with pytest.raises(ValueError):
        PlantedProver(gamma=-1.0)


@pytest.mark.parametrize("prefix", SHORT_PREFIXES)
def test_exact_values_equal_brute_force(prefix: list[int]) -> None:
    expected = TASK.exact_q(prefix, PROVER.next_token_probs)
    assert PROVER.q_value(prefix) == pytest.approx(expected, abs=1e-12)


def test_exact_values_of_a_custom_task_from_the_start() -> None:
    prover = PlantedProver(gamma=3.0, task=PlantedTask(target=(1, 1, 2), length=6, vocab_size=4, eos=3))
    assert prover.q_value([]) == pytest.approx(prover.task.exact_q([], prover.next_token_probs), abs=1e-12)


def test_values_are_a_martingale_under_the_prover() -> None:
    # E_{a~μ}[Q^μ(s + a)] = Q^μ(s): the prover's own advantages average to zero at every state.
    generator = torch.Generator().manual_seed(1)
    rows = PROVER.sample(40, generator)
    for row in rows.tolist():
        for h in range(TASK.length):
            k, ended = TASK.match_state(row[:h])
            if ended:
                break
            probs = PROVER.next_token_probs(row[:h])
            mean = sum(probs[t].item() * PROVER.q_value(row[:h] + [t]) for t in range(15))
            assert mean == pytest.approx(PROVER.q_value(row[:h]), abs=1e-12)


def test_monte_carlo_agrees_with_exact_values() -> None:
    generator = torch.Generator().manual_seed(0)
    n = 20000
    for prefix in ([], [3, 6, 0], [1, 3, 6, 0, 3, 3]):
        samples = PROVER.sample(n, generator, prefix=prefix)
        assert (samples[:, : len(prefix)] == torch.tensor(prefix, dtype=torch.long)).all()
        q = PROVER.q_value(prefix)
        estimate = TASK.reward(samples).mean().item()
        assert abs(estimate - q) < 4 * (q * (1 - q) / n) ** 0.5 + 1e-9


def test_sample_shape_determinism_and_eos_fill() -> None:
    first = PROVER.sample(500, torch.Generator().manual_seed(3))
    second = PROVER.sample(500, torch.Generator().manual_seed(3))
    assert first.shape == (500, 10) and first.dtype == torch.long and torch.equal(first, second)
    ended = (first == 14).cumsum(dim=1) > 0
    assert (first[ended] == 14).all()  # after the first EOS every position is EOS
    frequency = torch.bincount(first[:, 0], minlength=15).double() / 500
    assert abs(frequency[3].item() - 10 / 24) < 0.1
    with pytest.raises(ValueError):
        PROVER.sample(2, prefix=[1] * 11)


def test_q_values_api() -> None:
    q_pi = torch.zeros(2, 2, dtype=torch.float64)
    prefixes = [[], ["3 ", "6 "], [3, 6, 0, 3, 5], ["1 ", "14 "]]
    q = PROVER.q_values(q_pi, prefixes)
    assert q.shape == (2, 2) and q.dtype == torch.float64
    table = PROVER.values
    assert q.flatten().tolist() == pytest.approx([table[0, 0].item(), table[2, 2].item(), 1.0, 0.0])
    with pytest.raises(ValueError, match="prefixes"):
        PROVER.q_values(q_pi)
    with pytest.raises(ValueError):
        PROVER.q_values(q_pi, prefixes[:3])


def test_advantages_of_the_prover_along_a_trajectory() -> None:
    trajectory = [1, 3, 6, 0, 3, 6, 0, 3, 5, 2]
    prefixes = [TASK.tokens_to_steps(trajectory[:h]) for h in range(len(trajectory) + 1)]
    values = PROVER.q_values(torch.zeros(len(prefixes), dtype=torch.float64), prefixes)
    adv = advantages(values)
    assert adv.sum().item() == pytest.approx(1.0 - values[0].item())
    # Matching the next target token is progress; breaking a match loses value; after success nothing changes.
    assert (adv[1:4] > 0).all() and adv[4] > 0
    assert adv[5] < 0  # [3, 6, 0, 3] + 6 falls back to [3, 6]
    assert (adv[6:9] > 0).all() and adv[9] == 0.0
    expected = [values[h + 1].item() - values[h].item() for h in range(len(trajectory))]
    assert adv.tolist() == pytest.approx(expected)


def test_distinguishability_and_alignment_by_brute_force() -> None:
    """γ-prover vs a uniform base policy π, at states with 2–3 tokens left, every action enumerated."""
    states = [s for s in SHORT_PREFIXES if not TASK.match_state(s)[1] and len(s) < TASK.length]

    def uniform(prefix: list[int]) -> list[float]:
        return [1 / 15] * 15

    brute_variance, brute_alignment = 0.0, 0.0
    a_mu_rows, a_pi_rows = [], []
    for state in states:
        q_mu = [TASK.exact_q(state + [a], PROVER.next_token_probs) for a in range(15)]
        q_pi = [TASK.exact_q(state + [a], uniform) for a in range(15)]
        v_mu = sum(p * q for p, q in zip(PROVER.next_token_probs(state).tolist(), q_mu))
        a_mu = [q - v_mu for q in q_mu]
        a_pi = [q - sum(q_pi) / 15 for q in q_pi]
        mean = sum(a_mu) / 15
        brute_variance += sum((a - mean) ** 2 for a in a_mu) / 15 / len(states)
        brute_alignment += sum(a * b for a, b in zip(a_mu, a_pi)) / 15 / len(states)
        # The same quantities from the dynamic programme, through values.advantages.
        values_mu = PROVER.q_values(torch.zeros(16, dtype=torch.float64), [state] + [state + [a] for a in range(15)])
        values_pi = torch.tensor([TASK.automaton_q(state + [a], UNIFORM_TABLE) for a in range(15)], dtype=torch.float64)
        v_pi = TASK.automaton_q(state, UNIFORM_TABLE)
        a_mu_rows.append(advantages(torch.stack([values_mu[:1].expand(15), values_mu[1:]], dim=-1))[:, 0])
        a_pi_rows.append(values_pi - v_pi)
    a_mu_t, a_pi_t = torch.stack(a_mu_rows), torch.stack(a_pi_rows)
    assert distinguishability(a_mu_t).item() == pytest.approx(brute_variance, abs=1e-12)
    assert alignment(a_mu_t, a_pi_t).item() == pytest.approx(brute_alignment, abs=1e-12)
    assert brute_variance > 0 and brute_alignment > 0
    # With γ = 1 the prover is the uniform π itself, so its advantages are π's.
    same = PlantedProver(gamma=1.0)
    a_same = torch.stack(
        [
            torch.tensor([same.q_value(s + [a]) - same.q_value(s) for a in range(15)], dtype=torch.float64)
            for s in states
        ]
    )
    assert torch.allclose(a_same, a_pi_t, atol=1e-12)


def test_checkpoint_prover_scores_prefix_chains_like_its_verifier(tmp_path):
    """Q^μ from a checkpoint prover equals its Q-model's per-prefix scores, whatever the grouping of prefixes."""
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy
    from pavlit.provers.checkpoint import CheckpointProver

    verifier = PAVModule(source=TinyPolicy(n_layer=1, n_embd=32, n_head=2, seed=1))
    verifier.save_pretrained(tmp_path / "mu")
    prover = CheckpointProver(verifier_path=str(tmp_path / "mu"))
    prompts = ["Compute 1+2.\n", "Compute 3+4.\n"]
    responses = [["1+2=3\n", "Answer: 3\n"], ["3+4=8\n"]]
    expected = verifier.score_prefixes(prompts, responses)
    prefixes = [r[:h] for r in responses for h in range(len(r) + 1)]
    prefix_prompts = [p for p, r in zip(prompts, responses) for _ in range(len(r) + 1)]
    q = prover.q_values(torch.zeros(len(prefixes)), prefixes, prefix_prompts)
    assert torch.allclose(q, torch.cat(expected), atol=1e-5)
    # Shuffled order (no chains to share): same values, one forward pass per prefix.
    order = [4, 0, 2, 1, 3]
    shuffled = prover.q_values(torch.zeros(5), [prefixes[i] for i in order], [prefix_prompts[i] for i in order])
    assert torch.allclose(shuffled, torch.cat(expected)[order], atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        prover.q_values(torch.zeros(5), prefixes, None)
    with pytest.raises(ValueError, match="verifier_path"):
        CheckpointProver()
