"""The didactic replication: MLP policy, exact/MC prover advantages, REINFORCE weights, Theorem 3.1 quantities."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pavlit import values
from pavlit.didactic.policy import HEADS, MLPPolicy, action_mask
from pavlit.didactic.theory import (
    format_table,
    policy_action_advantages,
    prover_action_advantages,
    recommend_prover,
)
from pavlit.didactic.training import (
    DidacticRLModule,
    evaluate_policy,
    mc_prover_prefix_values,
    prover_prefix_values,
    reinforce_loss,
    step_weights,
)
from pavlit.provers.planted import PlantedProver
from pavlit.tasks.planted import PlantedTask

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "didactic" / "rl.yaml"
EOS = 14


def small_policy(seed: int = 0, head: str = "per_position") -> MLPPolicy:
    torch.manual_seed(seed)
    return MLPPolicy(PlantedTask(), hidden_size=16, n_layers=2, head=head)  # type: ignore[arg-type]


def test_action_mask_keeps_steps_up_to_the_first_eos() -> None:
    tokens = torch.tensor([[1, 2, EOS, EOS, 3], [1, 2, 3, 4, 5], [EOS, 1, EOS, 2, 2]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(action_mask(tokens, EOS), expected)


@pytest.mark.parametrize("head", HEADS)
def test_sequence_logits_equal_one_prefix_at_a_time(head: str) -> None:
    policy = small_policy(head=head)
    tokens = policy.sample(5, torch.Generator().manual_seed(0))
    batched = policy.sequence_logits(tokens)
    for i in range(tokens.shape[1]):
        torch.testing.assert_close(batched[:, i], policy(tokens, i))
        torch.testing.assert_close(batched[:, i], policy(tokens, torch.full((5,), i)))  # per-row positions
    # Autoregressive: changing the token at position 4 changes no logits at positions 0..4, and some after it.
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % EOS
    difference = (policy.sequence_logits(changed) - batched).abs().amax(dim=(0, 2))
    assert float(difference[:5].max()) == 0.0 and float(difference[5:].min()) > 0.0


@pytest.mark.parametrize("head", ["per_position", "masked"])
def test_each_position_has_output_parameters_of_its_own(head: str) -> None:
    policy = small_policy(1, head)
    tokens = policy.sample(8, torch.Generator().manual_seed(0))
    before = policy.sequence_logits(tokens)
    for position in (0, 4, 9):
        weight, bias = policy.output_block(position)
        with torch.no_grad():
            weight.add_(torch.randn_like(weight))
            bias.add_(1.0 + torch.rand_like(bias))
        after = policy.sequence_logits(tokens)
        moved = (after - before).abs().amax(dim=(0, 2))
        assert float(moved[position]) > 0.1
        assert float(torch.cat([moved[:position], moved[position + 1 :]]).max()) == 0.0
        before = after


def test_the_shared_head_ties_every_position() -> None:
    # The ablation: one output layer for all positions, so changing "position 4's" block moves every position.
    policy = small_policy(1, "shared")
    tokens = policy.sample(8, torch.Generator().manual_seed(0))
    before = policy.sequence_logits(tokens)
    weight, bias = policy.output_block(4)
    with torch.no_grad():
        bias.add_(torch.arange(15.0))
    assert float((policy.sequence_logits(tokens) - before).abs().amax(dim=(0, 2)).min()) > 0.1
    assert sum(p.numel() for p in small_policy(head="per_position").head.parameters()) == 10 * (
        sum(p.numel() for p in policy.head.parameters())
    )


def test_sampled_rollouts_are_eos_padded_and_continue_their_prefix() -> None:
    policy = small_policy()
    prefix = torch.tensor([[3, 6, 0, EOS, EOS, EOS, EOS, EOS, EOS, EOS]]).repeat(50, 1)
    completed = policy.complete(prefix, 3, torch.Generator().manual_seed(1))
    assert torch.equal(completed[:, :3], prefix[:, :3])
    tokens = policy.sample(200, torch.Generator().manual_seed(2))
    after_eos = ~action_mask(tokens, EOS)
    assert bool((tokens[after_eos] == EOS).all())


def test_exact_prover_advantages_are_differences_of_prover_values() -> None:
    prover = PlantedProver(10.0)
    rollouts = [
        [3, 6, 0, 3, 5, 1, 2, 3, 4, 5],  # found at position 5
        [3, 6, 0, 3, 6, 0, 3, 3, 3, 3],  # falls back to k = 2 then loses it
        [3, 6, EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS],  # EOS after two target tokens
        [1, 3, 6, 0, 3, 5, EOS, EOS, EOS, EOS],  # found, then EOS (still correct)
    ]
    tokens = torch.tensor(rollouts)
    prefix_values = prover_prefix_values(prover, tokens)
    for row, rollout in enumerate(rollouts):
        mask = action_mask(tokens[row : row + 1], EOS)[0]
        for i in range(len(rollout) + 1):
            if i == 0 or mask[i - 1]:  # prefixes up to and including the first EOS
                assert prefix_values[row, i].item() == pytest.approx(prover.q_value(rollout[:i]), abs=1e-12)
    mask = action_mask(tokens, EOS)
    a_mu = values.advantages(prefix_values, mask)
    # Brute force: the prover's own value of each prefix (enumerating every continuation) for a late step.
    late = rollouts[1][:8]
    brute = prover.task.exact_q(late, prover.next_token_probs) - prover.task.exact_q(late[:7], prover.next_token_probs)
    assert a_mu[1, 7].item() == pytest.approx(brute, abs=1e-12)
    assert a_mu[2, 2].item() == pytest.approx(-prover.q_value([3, 6]), abs=1e-12)  # EOS loses all the value
    assert float(a_mu[0, 5:].abs().max()) == 0.0  # after the target is found nothing matters
    assert float(a_mu[2, 3:].abs().max()) == 0.0  # masked after EOS
    # The advantages of a finished rollout telescope to its outcome minus the start value.
    outcome = prover.task.reward(tokens).double()
    torch.testing.assert_close(a_mu.sum(1), outcome - prover.values[0, 0])


def test_mc_prover_values_match_exact_within_noise() -> None:
    prover = PlantedProver(25.0)
    tokens = torch.tensor([[3, 6, 0, 3, 1, 3, 6, 0, 2, 2], [3, 6, EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS]])
    exact = prover_prefix_values(prover, tokens)
    n = 4000
    estimate = mc_prover_prefix_values(prover, tokens, n, torch.Generator().manual_seed(0))
    decided = (exact == 0) | (exact == 1)
    assert torch.equal(estimate[decided], exact[decided])
    bound = 5 * torch.sqrt(exact * (1 - exact) / n) + 1e-9
    assert bool(((estimate - exact).abs() <= bound).all())


def test_step_weights_on_a_hand_built_rollout() -> None:
    outcome = torch.tensor([1.0, 0.0])
    a_mu = torch.tensor([[0.1, 0.2, -0.3], [0.05, -0.5, 0.7]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    weights = step_weights(outcome, a_mu, mask, alpha=0.5, baseline=0.25)
    expected = torch.tensor(
        [[1 + 0.05 - 0.25, 1 + 0.1 - 0.25, 0.0], [0 + 0.025 - 0.25, 0 - 0.25 - 0.25, 0 + 0.35 - 0.25]]
    )
    torch.testing.assert_close(weights, expected)
    per_rollout = step_weights(outcome, a_mu, mask, alpha=0.0, baseline=torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(per_rollout, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_alpha_zero_gradient_is_plain_reinforce_on_the_outcome() -> None:
    policy = small_policy(3)
    task = policy.task
    tokens = torch.tensor(
        [[3, 6, 0, 3, 5, 1, 1, 1, 1, 1], [2, 2, EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS], [1, 3, 6, 0, 3, 5, 0, 0, 0, 0]]
    )
    outcome = task.reward(tokens)
    assert outcome.tolist() == [1.0, 0.0, 1.0]
    mask = action_mask(tokens, EOS)
    a_mu = values.advantages(prover_prefix_values(PlantedProver(10.0), tokens), mask).float()
    loss = reinforce_loss(policy.log_probs(tokens), step_weights(outcome, a_mu, mask, alpha=0.0), mask)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    # Hand-written surrogate: -(1/B) Σ_b R_b Σ_{h ≤ first EOS} log π(a_bh | s_bh), one prefix at a time.
    surrogate = 0.0
    for b in range(tokens.shape[0]):
        for h in range(tokens.shape[1]):
            if h > 0 and tokens[b, h - 1] == EOS:
                break
            log_p = torch.log_softmax(policy(tokens[b : b + 1], h), dim=-1)[0, tokens[b, h]]
            surrogate = surrogate - outcome[b] * log_p / tokens.shape[0]
    expected = torch.autograd.grad(surrogate, list(policy.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_reinforce_improves_a_two_armed_bandit() -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    probs_arm_1 = []
    for _ in range(30):
        arms = torch.multinomial(torch.softmax(logits.detach(), -1).expand(64, 2), 1, generator=generator)
        reward = (arms[:, 0] == 1).float()  # arm 1 pays 1, arm 0 pays 0
        log_probs = torch.log_softmax(logits, -1).expand(64, 2).gather(1, arms)
        mask = torch.ones_like(arms, dtype=torch.bool)
        loss = reinforce_loss(log_probs, step_weights(reward, torch.zeros(64, 1), mask, 0.0, reward.mean()), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        probs_arm_1.append(float(torch.softmax(logits.detach(), -1)[0, 1]))
    assert probs_arm_1[-1] > 0.9 > 0.5


def test_prover_advantages_raise_the_first_target_token() -> None:
    # A strong prover's advantage alone (α = 1, outcome almost always 0) must move π toward target[0] first.
    # (The default masked policy's first-position logits are its output biases alone, so they move slowly.)
    module = DidacticRLModule(gamma=50.0, alpha=1.0, hidden_size=32, n_layers=2, sft_iterations=0)
    optimizer = torch.optim.Adam(module.policy.parameters(), lr=0.1)
    before = float(module.policy.next_token_probs([])[3])
    for _ in range(40):
        tokens = module.policy.sample(64, module.generator)
        mask = action_mask(tokens, EOS)
        weights = step_weights(module.task.reward(tokens), module.prover_advantages(tokens, mask), mask, 1.0)
        loss = reinforce_loss(module.policy.log_probs(tokens), weights, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(module.policy.next_token_probs([])[3]) > before + 0.2


def test_prover_action_advantages_at_the_empty_state() -> None:
    prover = PlantedProver(10.0)
    table = prover.values
    a_mu = prover_action_advantages(prover, torch.tensor([0]), torch.tensor([0]))[0]
    start = float(table[0, 0])
    for token in range(15):
        expected = {3: float(table[1, 1]) - start, EOS: -start}.get(token, float(table[1, 0]) - start)
        assert a_mu[token].item() == pytest.approx(expected, abs=1e-12)
    # Distinguishability under a uniform π at this one state: the population variance, by hand.
    uniform = torch.full((1, 15), 1 / 15, dtype=torch.float64)
    mean = sum(a_mu.tolist()) / 15
    variance = sum((a - mean) ** 2 for a in a_mu.tolist()) / 15
    assert float(values.distinguishability(a_mu[None], uniform)) == pytest.approx(variance, rel=1e-12)
    # A found state gives every action zero advantage.
    assert float(prover_action_advantages(prover, torch.tensor([6]), torch.tensor([5])).abs().max()) == 0.0


def test_policy_advantages_match_brute_force_at_a_late_state() -> None:
    policy = small_policy(1)
    task = policy.task
    prefix = [1, 1, 1, 1, 1, 3, 6, 0]  # 8 tokens in match state 3: two tokens remain after the action
    prefixes = torch.tensor([prefix + [EOS, EOS]])
    probs, a_pi = policy_action_advantages(policy, prefixes, torch.tensor([8]), 3000, torch.Generator().manual_seed(0))
    exact_q = torch.tensor(
        [task.exact_q(prefix + [a], policy.next_token_probs) for a in range(15)], dtype=torch.float64
    )
    torch.testing.assert_close(probs[0], policy.next_token_probs(prefix))
    exact_a = exact_q - (probs[0] * exact_q).sum()
    assert float((a_pi[0] - exact_a).abs().max()) < 0.03
    assert float((probs[0] * a_pi[0]).sum().abs()) < 1e-12  # A^π has mean 0 under π by construction


def test_recommend_prover_ranks_by_score() -> None:
    policy = small_policy(2)
    rows = recommend_prover(policy, [1.0, 10.0, 50.0], n_rollouts=4, n_mc=4, seed=0)
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert all(rows[i]["score"] >= rows[i + 1]["score"] for i in range(2))
    by_gamma = {row["gamma"]: row for row in rows}
    assert by_gamma[50.0]["distinguishability"] > by_gamma[1.0]["distinguishability"] > 0
    for row in rows:
        assert row["score"] == pytest.approx(row["distinguishability"] + row["alignment"])
        assert abs(row["correlation"]) <= 1 + 1e-9  # Cauchy–Schwarz, since A^π has mean 0 under π
    assert format_table(rows).count("\n") == 4


def test_evaluate_policy_reports_pass_at_k() -> None:
    metrics = evaluate_policy(small_policy(), 64, torch.Generator().manual_seed(0), pass_at=(8, 64, 128))
    assert set(metrics) == {"accuracy", "greedy", "pass@8", "pass@64", "mode_share", "distinct_correct"}
    assert 0.0 <= metrics["accuracy"] <= metrics["pass@8"] <= metrics["pass@64"] <= 1.0
    assert metrics["pass@64"] == (1.0 if metrics["accuracy"] > 0 else 0.0)


def test_module_step_changes_parameters_and_logs_history(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    module = DidacticRLModule(gamma=10.0, sft_iterations=5, iterations=3, eval_every=2, eval_rollouts=32)
    sft = module.run_sft()
    assert set(sft) >= {"loss", "accuracy", "pass@8"} and bool(module.sft_done)
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(module)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))
    assert [row["iteration"] for row in module.history] == [0, 2, 3]
    assert all(not math.isnan(row["accuracy"]) for row in module.history)


def fit_accuracy(gamma: float, alpha: float, seed: int, tmp_path: Path, iterations: int = 150) -> float:
    """Accuracy (512 samples) after SFT + ``iterations`` RL iterations through the real module and Trainer."""
    from lightning.pytorch import Trainer

    module = DidacticRLModule(
        gamma=gamma, alpha=alpha, iterations=iterations, eval_every=iterations, eval_rollouts=512, seed=seed
    )
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert module.history[0]["accuracy"] < 0.01  # the SFT start is mediocre: the RL has to find the target
    return module.history[-1]["accuracy"]


# Seed 1: its α = 0 run never reaches 50% in 3,000 iterations (over the sweep's 5 seeds α = 0 reaches it at 310,
# 1,070, 1,150 and 2,620, README), so 150 iterations separate α = 1 from α = 0 on this seed; on seed 0 (310)
# they would too, though with less room.
RL_SEED = 1


@pytest.mark.parametrize("gamma", [5.0, 10.0, 50.0])
def test_effective_reward_learns_the_planted_task(gamma: float, tmp_path: Path) -> None:
    assert fit_accuracy(gamma, 1.0, RL_SEED, tmp_path) >= 0.5


def test_outcome_only_rl_has_not_learned_it_in_the_same_budget(tmp_path: Path) -> None:
    assert fit_accuracy(10.0, 0.0, RL_SEED, tmp_path) < 0.5


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="head"):
        DidacticRLModule(head="tied")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="advantage_source"):
        DidacticRLModule(advantage_source="guess")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_rollouts"):
        mc_prover_prefix_values(PlantedProver(5.0), torch.zeros(1, 10, dtype=torch.long), 0)


def test_fit_from_config_fast_dev_run(tmp_path: Path) -> None:
    from pavlit.cli import main

    status = main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.init_args.sft_iterations=2",
            "--model.init_args.eval_rollouts=16",
        ]
    )
    assert status == 0
