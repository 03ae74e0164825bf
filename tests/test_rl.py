import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer

from pavlit.advantages import MCAdvantages, PAVAdvantages
from pavlit.cli import RUN_DIR_ENV, main
from pavlit.data.prompts import PromptBatch, PromptBatches, PromptDataModule
from pavlit.interfaces import AdvantageSource, Problem, Task
from pavlit.modules.pav import PAVModule
from pavlit.modules.policy_rl import PolicyRLModule
from pavlit.modules.rollout_batch import pass_at_k_sums, reference_kl, response_logprobs
from pavlit.policy.sources import Pretrained, TinyPolicy
from pavlit.policy.tokenizer import build_char_tokenizer
from pavlit.policy_gradient import (
    broadcast_to_tokens,
    effective_step_rewards,
    kl_penalty,
    leave_one_out_baseline,
    policy_gradient_loss,
    response_step_ends,
    step_ends_from_token_starts,
    token_step_index,
)
from pavlit.provers.best_of_k import BestOfK
from pavlit.steps import split_steps, step_end_token_indices
from pavlit.tasks.arithmetic import ALPHABET, ArithmeticTask
from pavlit.values import best_of_k

REPO = Path(__file__).parents[1]
TOY_ALPHABET = "ab\n"
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "max_position": 64, "alphabet": TOY_ALPHABET}


class TwoArmedTask(Task):
    """One prompt; a response is correct iff its first character is ``a`` (the other arm, ``b``, never is)."""

    def problems(self, split: str) -> list[Problem]:
        return [Problem(id=f"{split}-{i}", prompt="ab\n", answer="a") for i in range(4)]

    def score(self, problem: Problem, response: str) -> float:
        return float(response.startswith("a"))


class FixedValues(AdvantageSource):
    """Q^μ of prefix h is ``values[h]`` (a test double that records what it was asked)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.calls: list[list[list[str]]] = []

    def prefix_values(self, problems, steps, *, task, sampler, seed=None):
        self.calls.append([list(s) for s in steps])
        return [torch.tensor([self.values[min(h, len(self.values) - 1)] for h in range(len(s) + 1)]) for s in steps]


def _module(**kwargs) -> PolicyRLModule:
    options = {"policy": TinyPolicy(**TINY), "task": TwoArmedTask(), "kl_coef": 0.0, "export": False}
    return PolicyRLModule(**{**options, **kwargs})


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
    }
    return Trainer(**{**options, **kwargs})


def _ids(tokenizer, text: str, eos: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if eos else ids


# --- pure functions ------------------------------------------------------------------------------------------


def test_token_step_index_owns_tokens_after_the_previous_end_up_to_its_own():
    step_ends = torch.tensor([[2, 5, 7], [1, 3, 0]])
    step_mask = torch.tensor([[True, True, True], [True, True, False]])
    index = token_step_index(step_ends, step_mask, n_tokens=10)
    assert index.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="at least one step"):
        token_step_index(step_ends, torch.zeros_like(step_mask), 4)


def test_broadcast_to_tokens_zero_on_padding():
    values = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    ends = torch.tensor([[1, 3], [2, 0]])
    step_mask = torch.tensor([[True, True], [True, False]])
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    out = broadcast_to_tokens(values, ends, step_mask, token_mask)
    assert out.tolist() == [[1.0, 1.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 0.0, 0.0]]


def test_step_ends_from_token_starts_follows_the_steps_rule():
    # Steps "ab\n" (0-2), "cd\n" (3-5), "e" (6); tokens start at 0, 2, 4, 6: the token at 2 ("\nc") starts in step 1.
    assert step_ends_from_token_starts([0, 2, 4, 6], [3, 3, 1]) == [1, 2, 3]
    # A step no token starts in shares the previous end; a first step without tokens gets -1.
    assert step_ends_from_token_starts([0, 5], [2, 2, 3]) == [0, 0, 1]
    assert step_ends_from_token_starts([4], [2, 3]) == [-1, 0]


def test_response_step_ends_match_steps_module_on_the_sampled_tokens():
    tokenizer = build_char_tokenizer(ALPHABET)
    prompt, response = "Compute 1+2.\n", "1+2=3\nAnswer: 3\n"
    steps = split_steps(response)
    prompt_ids = tokenizer(prompt)["input_ids"]
    ends = response_step_ends(prompt, prompt_ids, _ids(tokenizer, response), steps, tokenizer)
    reference = step_end_token_indices(prompt, steps, tokenizer)
    assert ends == [end - len(prompt_ids) for end in reference.step_ends] == [5, 15]
    # The sampler's ids differ from a re-tokenisation (here: an <unk> the text decodes without): character offsets.
    odd = [tokenizer.unk_token_id, *_ids(tokenizer, response)]
    assert response_step_ends(prompt, prompt_ids, odd, steps, tokenizer) == [6, 16]


def test_effective_step_rewards_and_leave_one_out_hand_computed():
    outcome = torch.tensor([1.0, 0.0])
    process = torch.tensor([[0.25, -0.5], [0.125, 9.0]])  # 9.0 sits on a padded step and must be ignored
    mask = torch.tensor([[True, True], [True, False]])
    assert effective_step_rewards(outcome, process, mask, alpha=2.0).tolist() == [[1.5, 0.0], [0.25, 0.0]]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    expected = [[1 / 3, 2 / 3, 2 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3, 0.0]]
    assert torch.allclose(leave_one_out_baseline(rewards), torch.tensor(expected))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(torch.ones(3, 1))


def test_kl_penalty_estimators_hand_computed():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.4)])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([math.log(2), math.log(0.5)]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * torch.tensor([math.log(2), math.log(0.5)]) ** 2)
    # k3 = r − 1 − log r with r = ref / π: r = 0.5 → 0.5 − 1 + log 2; r = 2 → 1 − log 2.
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([math.log(2) - 0.5, 1 - math.log(2)]))


def test_reference_kl_puts_k1_into_the_weights_and_k2_into_the_loss():
    logp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    penalty, loss, kl = reference_kl(logp, ref, mask, 0.1, "k1")
    assert torch.allclose(penalty, torch.tensor([[0.05, 0.0, -0.25]])) and float(loss) == 0.0
    assert math.isclose(float(kl), 0.25)  # mean log-ratio over the two real tokens
    penalty, loss, kl = reference_kl(logp, ref, mask, 0.1, "k2")
    assert torch.equal(penalty, torch.zeros(1, 3)) and math.isclose(float(kl), 0.25)
    assert math.isclose(float(loss), 0.1 * (0.5 * 0.5**2 + 0.0) / 2, rel_tol=1e-6)


def test_pass_at_k_sums_of_an_evaluation_batch():
    # 4 samples per problem with 0, 2 and 4 correct: pass@1 = c/4, pass@4 = 1 unless none is correct.
    assert pass_at_k_sums([0, 2, 4], 4).tolist() == [3.0, 1.5, 2.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-8, 0), min_size=1, max_size=8), st.lists(st.floats(-8, 0), min_size=1, max_size=8))
def test_k3_is_never_negative_and_zero_only_at_the_reference(logp, ref):
    n = min(len(logp), len(ref))
    logp, ref = torch.tensor(logp[:n], dtype=torch.float64), torch.tensor(ref[:n], dtype=torch.float64)
    assert bool((kl_penalty(logp, ref, "k3") >= 0).all())
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(n, dtype=torch.float64))


def test_policy_gradient_loss_normalisations_and_clipping():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0], [3.0, 7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss = policy_gradient_loss(logp, weights, mask)
    assert loss.item() == pytest.approx((1.0 + 4.0 + 1.5) / 3)
    assert policy_gradient_loss(logp, weights, mask, normalization="responses").item() == pytest.approx(6.5 / 2)
    # At ratio 1 the clipped surrogate has REINFORCE's gradient.
    (grad_plain,) = torch.autograd.grad(policy_gradient_loss(logp, weights, mask), logp)
    (grad_clip,) = torch.autograd.grad(policy_gradient_loss(logp, weights, mask, logp.detach(), clip=0.2), logp)
    assert torch.allclose(grad_plain, grad_clip)
    # A token pushed past 1 + ε with a positive weight gets no more gradient; one inside keeps it.
    old = logp.detach() - torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    (grad,) = torch.autograd.grad(policy_gradient_loss(logp, weights, mask, old, clip=0.2), logp)
    assert grad[0, 0] == 0 and grad[0, 1] != 0
    with pytest.raises(ValueError, match="old_logp"):
        policy_gradient_loss(logp, weights, mask, clip=0.2)


# --- the module's weights and gradients ------------------------------------------------------------------------


def _hand_rollouts(module: PolicyRLModule):
    """Two samples of one prompt: "a\\nb\\n<eos>" (correct, 2 steps) and "b<eos>" (wrong, 1 step)."""
    tokenizer = module.tokenizer
    problem = TwoArmedTask().problems("train")[0]
    texts = ["a\nb\n", "b"]
    steps = [split_steps(t) for t in texts]
    response_ids = [_ids(tokenizer, t) for t in texts]
    return problem, texts, steps, response_ids


def test_per_step_weights_on_a_hand_built_rollout_equal_the_formula():
    module = _module(alpha=2.0, baseline="leave_one_out", samples_per_prompt=2)
    problem, _, steps, response_ids = _hand_rollouts(module)
    q_mu = [torch.tensor([0.25, 0.5, 1.0]), torch.tensor([0.25, 0.0])]
    process = [q[1:] - q[:-1] for q in q_mu]
    batch = module.build_rollouts([problem, problem], response_ids, steps, [1.0, 0.0], process)
    module.rollout_loss(batch)
    # Row 0: R = 1, b = 0 (the other sample's outcome); tokens "a" "\n" are step 1 (A = 0.25), "b" "\n" <eos> step 2
    # (A = 0.5, EOS after the last step's end takes its weight). Row 1: R = 0, b = 1, one step "b" <eos> (A = −0.25).
    w1, w2, w3 = 1 + 2 * 0.25 - 0, 1 + 2 * 0.5 - 0, 0 + 2 * -0.25 - 1
    assert module.last_weights.tolist() == [[w1, w1, w2, w2, w2], [w3, w3, 0.0, 0.0, 0.0]]

    head = _module(alpha=2.0, baseline="value_head", samples_per_prompt=2)
    torch.nn.init.constant_(head.value_head.bias, 0.25)
    _, metrics = head.rollout_loss(head.build_rollouts([problem, problem], response_ids, steps, [1.0, 0.0], process))
    targets = torch.tensor([[1.5, 1.5, 2.0, 2.0, 2.0], [-0.5, -0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    assert torch.allclose(head.last_weights, torch.where(mask, targets - 0.25, torch.zeros(())))
    assert metrics["value_loss"].item() == pytest.approx(float(((targets - 0.25)[mask] ** 2).mean()))


def _reinforce_gradient(model, tokenizer, problem, response_ids, outcomes) -> dict[str, torch.Tensor]:
    """Plain REINFORCE on the outcome, written out: −Σ_r R_r Σ_t log π(a_t | s_t) / (number of response tokens)."""
    model.zero_grad()
    prompt_ids = tokenizer(problem.prompt)["input_ids"]
    n_tokens = sum(len(ids) for ids in response_ids)
    total = 0.0
    for ids, outcome in zip(response_ids, outcomes):
        sequence = torch.tensor([prompt_ids + ids])
        log_probs = model(input_ids=sequence).logits[0, :-1].log_softmax(-1)
        taken = log_probs[len(prompt_ids) - 1 :].gather(1, torch.tensor(ids)[:, None]).sum()
        total = total - outcome * taken
    (total / n_tokens).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_alpha_zero_gradient_is_plain_reinforce_and_kl_to_itself_is_zero(kl_estimator):
    module = _module(
        alpha=0.0, baseline="none", advantages=FixedValues([0.0, 1.0]), kl_coef=0.5, kl_estimator=kl_estimator
    )
    problem, _, steps, response_ids = _hand_rollouts(module)
    process = [torch.tensor([0.7, -0.3]), torch.tensor([0.9])]  # ignored: α = 0
    batch = module.build_rollouts([problem, problem], response_ids, steps, [1.0, 0.0], process)
    module.zero_grad()
    loss, metrics = module.rollout_loss(batch)
    loss.backward()
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)  # the reference is a copy of the policy
    got = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    expected = _reinforce_gradient(module.model, module.tokenizer, problem, response_ids, [1.0, 0.0])
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-6), name


def test_rollouts_ask_the_source_for_every_prefix_and_take_differences():
    source = FixedValues([0.25, 0.5, 0.125, 1.0])
    module = _module(advantages=source, samples_per_prompt=3, max_new_tokens=6, max_steps=3)
    problems = TwoArmedTask().problems("train")[:2]
    batch = module.rollouts(problems)
    assert module.model.training  # generation ran in eval mode and handed the model back in train mode
    assert batch.input_ids.shape[0] == 6 and len(source.calls[0]) == 6
    for row, steps in enumerate(source.calls[0]):
        n = max(len(steps), 1)
        expected = [[0.25, 0.5, 0.125, 1.0][h + 1] - [0.25, 0.5, 0.125, 1.0][h] for h in range(len(steps))] or [0.0]
        assert torch.allclose(batch.process[row, :n], torch.tensor(expected))
        assert batch.outcome[row].item() == float("".join(steps).startswith("a"))
    ablation = _module(advantages=source, reward_form="q_mu", samples_per_prompt=2, max_new_tokens=6, max_steps=3)
    batch = ablation.rollouts(problems[:1])
    for row, steps in enumerate(source.calls[-1]):
        assert batch.process[row, : len(steps)].tolist() == [0.5, 0.125, 1.0][: len(steps)]


def test_policy_on_a_two_armed_toy_learns_the_right_arm(tmp_path):
    torch.manual_seed(0)
    module = _module(baseline="leave_one_out", samples_per_prompt=8, max_new_tokens=1, lr=0.03, warmup_steps=1)
    prompt_ids = torch.tensor([module.tokenizer("ab\n")["input_ids"]])
    a_id = module.tokenizer.convert_tokens_to_ids("a")

    def p_right() -> float:
        with torch.no_grad():
            return module.model.eval()(input_ids=prompt_ids).logits[0, -1].softmax(-1)[a_id].item()

    before = p_right()
    data = PromptDataModule(TwoArmedTask(), batch_size=2, eval_problems=0)
    _trainer(tmp_path, max_steps=25).fit(module, data)
    after = p_right()
    assert before < 0.2 and after > 0.8, (before, after)


def test_one_step_changes_the_policy_and_the_value_head_not_the_reference(tmp_path):
    module = _module(kl_coef=0.01, samples_per_prompt=2, max_new_tokens=4, warmup_steps=1, lr=0.01)
    torch.nn.init.constant_(module.value_head.bias, 0.5)  # a nonzero baseline makes every rollout's weight nonzero
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    _trainer(tmp_path).fit(module, PromptDataModule(TwoArmedTask(), batch_size=2, eval_problems=0))
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}
    assert {name for name in before if name.startswith(("model.", "value_head."))} <= changed
    assert not any(name.startswith("reference_model.") for name in changed)


# --- advantage sources -----------------------------------------------------------------------------------------


def test_pav_advantages_are_best_of_k_of_the_verifier(tmp_path):
    verifier = PAVModule(source=TinyPolicy(**TINY))
    verifier.save_pretrained(tmp_path / "pav")
    source = PAVAdvantages(str(tmp_path / "pav"), prover=BestOfK(4))
    module = _module()
    problem = TwoArmedTask().problems("train")[0]
    steps = [["a\n", "b\n"], []]
    q_mu = source.prefix_values([problem, problem], steps, task=module.task, sampler=module.sampler())
    q_pi = PAVModule.from_pretrained(tmp_path / "pav").score_prefixes([problem.prompt] * 2, steps)
    assert [q.shape[0] for q in q_mu] == [3, 1]
    for got, q in zip(q_mu, q_pi):
        assert torch.allclose(got, best_of_k(q, 4), atol=1e-6)


def test_mc_advantages_roll_out_each_prefix_once_per_problem():
    module = _module(max_new_tokens=3)
    source = MCAdvantages(k=2, n_groups=3, max_new_tokens=3)
    problems = TwoArmedTask().problems("train")[:2]
    steps = [["a\n"], ["b\n", "a"], ["a\n"]]
    values = source.prefix_values(
        [problems[0], problems[0], problems[1]], steps, task=module.task, sampler=module.sampler(), seed=0
    )
    assert [v.shape[0] for v in values] == [2, 3, 2]
    assert values[0][0] == values[1][0]  # the question-only prefix of one problem is estimated once
    assert all(bool(((v * 3) == (v * 3).round()).all()) for v in values)  # fractions of 3 groups
    assert values[0][1] == 1.0 and values[2][1] == 1.0  # "a\n" already starts right: every group succeeds


# --- prompts -----------------------------------------------------------------------------------------------------


def test_prompt_batches_shard_an_epoch_over_ranks_and_reshuffle(monkeypatch):
    problems = [Problem(id=str(i), prompt=f"{i}\n", answer="") for i in range(11)]
    seen = []
    for rank in range(2):
        monkeypatch.setattr("pavlit.data.prompts._rank_and_world", lambda rank=rank: (rank, 2))
        batches = PromptBatches(problems, batch_size=2, split="train", seed=3)
        assert len(batches) == 2
        first = [tuple(p.id for p in b.problems) for b in batches]
        second = [tuple(p.id for p in b.problems) for b in batches]
        assert len(first) == 2 and all(len(b) == 2 for b in first) and first != second
        seen.append({i for b in first for i in b})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_prompt_datamodule_eval_keeps_every_problem_in_order():
    task = ArithmeticTask(difficulty=1, seed=0, n_train=8, n_validation=5, n_test=3)
    data = PromptDataModule(task, batch_size=4, eval_problems=None, eval_batch_size=2)
    batches = list(data.val_dataloader())
    assert isinstance(batches[0], PromptBatch) and [len(b) for b in batches] == [2, 2, 1]
    assert [p.id for b in batches for p in b.problems] == [p.id for p in task.problems("validation")]
    assert [len(b) for b in data.train_dataloader()] == [4, 4]


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_fit_fast_dev_run_through_the_cli_with_a_pav(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tiny = {"n_layer": 1, "n_embd": 16, "n_head": 2, "max_position": 128, "alphabet": ALPHABET}
    PAVModule(source=TinyPolicy(**tiny)).save_pretrained(tmp_path / "pav")
    policy = json.dumps({"class_path": "TinyPolicy", "init_args": tiny})
    task_args = "--data.init_args.task.init_args."
    argv = ["fit", "--config", str(REPO / "configs/tiny/rl.yaml"), "--trainer.fast_dev_run=true"]
    argv += ["--trainer.default_root_dir", str(tmp_path / "run"), f"--model.init_args.policy={policy}"]
    argv += [f"--model.init_args.advantages.init_args.verifier_path={tmp_path / 'pav'}"]
    argv += ["--model.init_args.max_new_tokens=12", "--model.init_args.samples_per_prompt=2"]
    argv += [f"{task_args}n_train=8", f"{task_args}n_validation=2", "--data.init_args.batch_size=2"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 1 and metrics["samples"] == 4
    assert {"train/accuracy", "train/reward/process", "train/kl", "train/entropy", "val/accuracy"} <= set(metrics)
    model, _ = Pretrained(path=metrics["policy"]).load()
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 16


def test_training_log_probs_are_the_samplers_behaviour_log_probs():
    """On-policy means on-policy: re-scoring sampled rollouts in the training forward pass (re-tokenised prompt,
    padding, steps) gives back the log-probabilities the sampler drew them with."""
    module = _module(policy=TinyPolicy(n_layer=2, n_embd=32, n_head=2, max_position=128), task=ArithmeticTask())
    task = module._task()
    problems = list(task.problems("train"))[:3]
    out = module.sampler().complete(
        [p.prompt for p in problems], n=2, max_new_tokens=40, temperature=1.0, seed=5, return_logprobs=True
    )
    rows = [
        (p, t, i, lp)
        for p, ts, ids, lps in zip(problems, out.texts, out.token_ids, out.logprobs)
        for t, i, lp in zip(ts, ids, lps)
    ]
    steps = [split_steps(t, task.step_delimiter) for _, t, _, _ in rows]
    batch = module.build_rollouts(
        [p for p, *_ in rows],
        [i for _, _, i, _ in rows],
        steps,
        [0.0] * len(rows),
        [torch.zeros(len(s)) for s in steps],
    )
    module.eval()
    with torch.no_grad():
        logits, _ = module(batch.input_ids, batch.attention_mask)
        logp, _ = response_logprobs(logits, batch, module.hparams.temperature)
    for row, (_, _, ids, behaviour) in enumerate(rows):
        assert int(batch.token_mask[row].sum()) == len(ids)
        assert torch.allclose(logp[row, : len(ids)], torch.tensor(behaviour), atol=1e-4)
