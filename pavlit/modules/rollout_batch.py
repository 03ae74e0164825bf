"""A batch of scored RL rollouts and the pure steps between sampling and the loss (docs/method.md §6).

:class:`Rollouts` holds ``prompt + response`` sequences, the response-token and step layout of
:mod:`pavlit.policy_gradient` and each rollout's outcome and process term; :func:`collate_rollouts` builds it from
sampled token ids. The other functions are what :class:`~pavlit.modules.policy_rl.PolicyRLModule` computes on it
without its models: the process term from ``Q^μ``, the per-token targets ``R + α·process``, the response tokens'
log-probabilities and the logged metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pavlit.interfaces import Problem
from pavlit.modules.sft import pass_at_k
from pavlit.policy_gradient import (
    KLEstimator,
    broadcast_to_tokens,
    effective_step_rewards,
    kl_penalty,
    masked_mean,
    response_step_ends,
)
from pavlit.steps import pad_id_of
from pavlit.values import advantages as consecutive_differences

__all__ = [
    "Rollouts",
    "at_response_tokens",
    "collate_rollouts",
    "pass_at_k_sums",
    "process_terms",
    "reference_kl",
    "response_logprobs",
    "rollout_metrics",
    "token_targets",
]


@dataclass
class Rollouts:
    """One batch of scored rollouts, ``B = prompts × samples_per_prompt`` rows (a prompt's samples adjacent).

    Sequences are ``prompt + response`` right-padded to ``L``; per-token tensors are indexed by response token
    ``t < T``, and ``positions[b, t]`` is the sequence position whose logits predict response token ``t``.
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, T]
    tokens: torch.Tensor  # [B, T] the response token ids
    token_mask: torch.Tensor  # [B, T]
    step_ends: torch.Tensor  # [B, H]
    step_mask: torch.Tensor  # [B, H]
    outcome: torch.Tensor  # [B]
    process: torch.Tensor  # [B, H] Â^μ (or Q^μ) of each step, 0 without a source
    samples_per_prompt: int
    old_logp: torch.Tensor | None = None  # [B, T] set at the first update on these rollouts

    def to(self, device: torch.device) -> Rollouts:
        moved = {name: value.to(device) if torch.is_tensor(value) else value for name, value in vars(self).items()}
        return Rollouts(**moved)


def collate_rollouts(
    problems: Sequence[Problem],
    response_ids: Sequence[Sequence[int]],
    steps: Sequence[Sequence[str]],
    outcomes: Sequence[float],
    process: Sequence[torch.Tensor],
    tokenizer: Any,
    samples_per_prompt: int,
) -> Rollouts:
    """Tokenise and pad scored rollouts (a prompt's ``samples_per_prompt`` rows adjacent), on the CPU.

    Args:
        problems: The problem of each rollout.
        response_ids: The sampled token ids of each response (EOS included when generated).
        steps: Each response's steps.
        outcomes: Each rollout's verified outcome ``R``.
        process: Each rollout's process term per step ``[H]`` (``Â^μ``, ``Q^μ`` or zeros).
        tokenizer: The policy's tokenizer (encodes the prompts; its pad id, else its eos, pads).
        samples_per_prompt: Rollouts per prompt (the leave-one-out baseline groups rows by it).
    """
    prompt_ids = [tokenizer(p.prompt, add_special_tokens=True)["input_ids"] for p in problems]
    ends = [
        response_step_ends(p.prompt, pids, rids, item, tokenizer)
        for p, pids, rids, item in zip(problems, prompt_ids, response_ids, steps)
    ]
    rows, width = len(problems), max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    n_tokens = max(max(len(r) for r in response_ids), 1)
    n_steps = max(max(len(e) for e in ends), 1)
    pad = pad_id_of(tokenizer)
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, n_tokens), dtype=torch.long)
    tokens = torch.full((rows, n_tokens), pad, dtype=torch.long)
    token_mask = torch.zeros((rows, n_tokens), dtype=torch.bool)
    step_ends = torch.zeros((rows, n_steps), dtype=torch.long)
    step_mask = torch.zeros((rows, n_steps), dtype=torch.bool)
    process_values = torch.zeros((rows, n_steps))
    for row, (pids, rids, row_ends, values) in enumerate(zip(prompt_ids, response_ids, ends, process)):
        sequence = torch.tensor([*pids, *rids], dtype=torch.long)
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        positions[row, : len(rids)] = torch.arange(len(rids)) + len(pids) - 1
        tokens[row, : len(rids)] = torch.tensor(rids, dtype=torch.long)
        token_mask[row, : len(rids)] = True
        if not row_ends:  # an empty response: one step owning whatever tokens there are (EOS)
            row_ends, values = [max(len(rids) - 1, 0)], torch.zeros(1)
        step_ends[row, : len(row_ends)] = torch.tensor(row_ends)
        step_mask[row, : len(row_ends)] = True
        process_values[row, : len(row_ends)] = values.float()
    return Rollouts(
        input_ids,
        attention_mask,
        positions,
        tokens,
        token_mask,
        step_ends,
        step_mask,
        torch.tensor(outcomes, dtype=torch.float32),
        process_values,
        samples_per_prompt,
    )


def process_terms(q_mu: Sequence[torch.Tensor], reward_form: Literal["advantage", "q_mu"]) -> list[torch.Tensor]:
    """Each rollout's process term per step from ``Q^μ`` of its prefixes ``[H + 1]``: ``Â^μ`` (consecutive
    differences, the method) or, for ``reward_form="q_mu"`` (the collapse ablation), ``Q^μ`` of each step."""
    if reward_form == "q_mu":
        return [q[1:] for q in q_mu]
    return [consecutive_differences(q) for q in q_mu]


def token_targets(batch: Rollouts, alpha: float) -> torch.Tensor:
    """``[B, T]`` every response token's ``R + α·process`` of its step (0 at padding): the weight before baseline
    and KL, and the value head's regression target."""
    step_rewards = effective_step_rewards(batch.outcome, batch.process, batch.step_mask, alpha)
    return broadcast_to_tokens(step_rewards, batch.step_ends, batch.step_mask, batch.token_mask)


def at_response_tokens(per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` per-position outputs (logits, hidden states) → ``[B, T, D]`` at the positions that predict the
    response tokens (``Rollouts.positions``)."""
    index = positions[..., None].expand(*positions.shape, per_position.shape[-1])
    return per_position.gather(1, index)


def response_logprobs(
    logits: torch.Tensor, batch: Rollouts, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` log-probabilities of the response tokens under ``softmax(logits / temperature)`` (the sampling
    distribution), and with ``with_entropy`` its entropy at each token (no grad)."""
    log_probs = (at_response_tokens(logits, batch.positions).float() / temperature).log_softmax(-1)
    logp = log_probs.gather(2, batch.tokens[..., None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def reference_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float, estimator: KLEstimator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KL penalty toward the reference policy, as :class:`~pavlit.modules.policy_rl.PolicyRLModule` applies it.

    Args:
        logp: ``[B, T]`` the trained policy's log-probabilities of the response tokens.
        ref_logp: ``[B, T]`` the reference's.
        mask: ``[B, T]`` True for real response tokens.
        kl_coef: Weight of the penalty.
        estimator: ``"k1"`` subtracts ``kl_coef·k1`` (detached) from each token's weight; ``"k2"`` / ``"k3"`` add
            ``kl_coef·mean(k)`` to the loss (:func:`pavlit.policy_gradient.kl_penalty`).

    Returns:
        ``(weight_penalty, kl_loss, kl)``: ``[B, T]`` to subtract from the token weights (0 unless ``k1``), the loss
        term (0 with ``k1``) and the mean ``log π − log π_ref`` over real tokens (logged as ``kl``).
    """
    kl = masked_mean((logp - ref_logp).detach(), mask)
    if estimator == "k1":
        return kl_coef * kl_penalty(logp.detach(), ref_logp, "k1"), torch.zeros_like(kl), kl
    return torch.zeros_like(logp.detach()), kl_coef * masked_mean(kl_penalty(logp, ref_logp, estimator), mask), kl


def pass_at_k_sums(counts: Sequence[int], k: int) -> torch.Tensor:
    """``[problems, Σ pass@1, Σ pass@k]`` (float64) of problems with ``counts[i]`` correct of ``k`` samples each:
    what one evaluation batch adds (summed over batches and ranks, divided by the number of problems)."""
    return torch.tensor(
        [len(counts), sum(pass_at_k(k, c, 1) for c in counts), sum(pass_at_k(k, c, k) for c in counts)],
        dtype=torch.float64,
    )


def rollout_metrics(
    batch: Rollouts, weights: torch.Tensor, entropy: torch.Tensor, alpha: float, **losses: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a training step logs (``train/`` + name): the ``losses`` given (detached), accuracy, mean outcome and
    process reward, entropy, mean token weight (``advantage``), steps and tokens per response."""
    mask = batch.token_mask
    return {name: value.detach() for name, value in losses.items()} | {
        "accuracy": batch.outcome.mean(),
        "reward/outcome": batch.outcome.mean(),
        "reward/process": alpha * masked_mean(batch.process, batch.step_mask),
        "entropy": masked_mean(entropy, mask),
        "advantage": masked_mean(weights, mask),
        "steps": batch.step_mask.sum(dim=1).float().mean(),
        "tokens": mask.sum(dim=1).float().mean(),
    }
