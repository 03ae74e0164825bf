"""The maths of online RL with dense process rewards (docs/method.md §6), as pure tensor functions.

REINFORCE weights every token of step ``h`` of a rollout with

    w_h = R + α · Â^μ(s_h, a_h) − b(s_h)

where ``R ∈ {0, 1}`` is the rollout's verified outcome (the Monte-Carlo return, an unbiased ``Q^π(s_h, a_h)``),
``Â^μ`` the step's advantage under a prover μ (:mod:`pavlit.advantages`) and ``b`` a baseline. α = 0 is
outcome-only RL (ORM-RL); the paper's failure-mode ablation replaces ``Â^μ`` with the prover's value ``Q^μ(s_h, a_h)``.

Token layout: a rollout's **response tokens** are the ones the sampler generated (EOS included); ``step_ends[h-1]``
is the index, among them, of the last token of step ``h`` (:func:`response_step_ends`, through
:mod:`pavlit.steps`). Step ``h`` owns the tokens after the end of step ``h − 1`` up to and including its own end;
tokens after the last step's end (EOS, text a step-aware stop cut off) take the last step's weight.

Used by :class:`pavlit.modules.policy_rl.PolicyRLModule` and the didactic :mod:`pavlit.didactic.training`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from pavlit.steps import step_end_token_indices
from pavlit.values import effective_reward

__all__ = [
    "KLEstimator",
    "broadcast_to_tokens",
    "effective_step_rewards",
    "kl_penalty",
    "leave_one_out_baseline",
    "masked_mean",
    "policy_gradient_loss",
    "response_step_ends",
    "step_ends_from_token_starts",
    "token_step_index",
]

KLEstimator = Literal["k1", "k2", "k3"]


# --- step ↔ token --------------------------------------------------------------------------------------------


def token_step_index(step_ends: torch.Tensor, step_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The step (0-based) each response token belongs to.

    Token ``t`` belongs to the first step whose end is at or after ``t`` (the number of real step ends strictly
    before ``t``); tokens after the last real end belong to the last real step.

    Args:
        step_ends: ``[B, H]`` response-token index of each step's last token, non-decreasing over real steps.
        step_mask: ``[B, H]`` True for real steps; every row needs at least one.
        n_tokens: ``T``, the padded number of response tokens.

    Returns:
        ``[B, T]`` long tensor of step indices in ``[0, n_steps_b − 1]``.
    """
    n_steps = step_mask.sum(dim=1)
    if bool((n_steps == 0).any()):
        raise ValueError("every rollout needs at least one step (treat an empty response as one step)")
    positions = torch.arange(n_tokens, device=step_ends.device)
    before = (step_ends[:, None, :] < positions[None, :, None]) & step_mask[:, None, :]
    return torch.minimum(before.sum(dim=-1), (n_steps - 1)[:, None])


def broadcast_to_tokens(
    step_values: torch.Tensor, step_ends: torch.Tensor, step_mask: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """Give every response token the value of its step (:func:`token_step_index`); 0 at padded tokens.

    Args:
        step_values: ``[B, H]`` one value per step.
        step_ends: ``[B, H]`` response-token index of each step's last token.
        step_mask: ``[B, H]`` True for real steps.
        token_mask: ``[B, T]`` True for real response tokens.

    Returns:
        ``[B, T]``.
    """
    index = token_step_index(step_ends, step_mask, token_mask.shape[1])
    values = step_values.gather(1, index)
    return torch.where(token_mask.bool(), values, torch.zeros_like(values))


def step_ends_from_token_starts(token_starts: Sequence[int], step_lengths: Sequence[int]) -> list[int]:
    """End token of every step, from the character offset at which each response token starts.

    The rule of :mod:`pavlit.steps`: a token belongs to the segment its first character is in, and a step ends at
    the last token that starts before the step's last character is passed. A step no token starts in shares the
    end of the step before it (index -1 when it is the first: it owns no token).

    Args:
        token_starts: Non-decreasing start offset of each response token in the response text.
        step_lengths: Character length of each step (``len(step)``), in order.
    """
    ends, cursor, last = [], 0, -1
    bound = 0
    for length in step_lengths:
        bound += length
        while cursor < len(token_starts) and token_starts[cursor] < bound:
            last = cursor
            cursor += 1
        ends.append(last)
    return ends


def response_step_ends(
    prompt: str, prompt_ids: Sequence[int], response_ids: Sequence[int], steps: Sequence[str], tokenizer: Any
) -> list[int]:
    """End token of every step among the *sampled* response tokens.

    The policy gradient must use the token ids that were sampled, not a re-tokenisation of the text. When
    tokenising ``prompt + steps`` (:func:`pavlit.steps.step_end_token_indices`) reproduces the sampled ids (always
    for character tokenizers, nearly always for BPE) its step ends are used; otherwise the ends come from the
    character offsets at which the sampled tokens start (:func:`step_ends_from_token_starts`).

    Args:
        prompt: The question text.
        prompt_ids: Its token ids as the sampler encoded them (special tokens included).
        response_ids: The sampled token ids (EOS included when generated).
        steps: The response's steps (:func:`pavlit.steps.split_steps` of the decoded text).
        tokenizer: The policy's tokenizer.

    Returns:
        ``H`` indices into ``response_ids``, clamped to ``[0, len(response_ids) − 1]``.
    """
    if not steps:
        return []
    last = max(len(response_ids) - 1, 0)
    tokens = step_end_token_indices(prompt, steps, tokenizer)
    n_prompt = len(prompt_ids)
    body = list(response_ids[: len(tokens.input_ids) - n_prompt])
    if tokens.input_ids[:n_prompt] == list(prompt_ids) and tokens.input_ids[n_prompt:] == body:
        return [min(max(end - n_prompt, 0), last) for end in tokens.step_ends]
    starts = [len(tokenizer.decode(list(response_ids[:i]), skip_special_tokens=True)) for i in range(len(response_ids))]
    return [min(max(end, 0), last) for end in step_ends_from_token_starts(starts, [len(s) for s in steps])]


# --- weights, baselines, losses ------------------------------------------------------------------------------


def effective_step_rewards(
    outcome: torch.Tensor, process: torch.Tensor, step_mask: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``R + α · process_h`` at every real step (0 at padded steps): the part of the weight before the baseline.

    Args:
        outcome: ``[B]`` verified outcomes in [0, 1].
        process: ``[B, H]`` the process term: ``Â^μ(s_h, a_h)`` (default) or ``Q^μ(s_h, a_h)`` (the ablation).
        step_mask: ``[B, H]`` True for real steps.
        alpha: Weight of the process term (0: ORM-RL).

    Returns:
        ``[B, H]``.
    """
    process = torch.where(step_mask, process, torch.zeros_like(process))
    rewards = effective_reward(outcome[:, None].expand_as(process), process, alpha)
    return torch.where(step_mask, rewards, torch.zeros_like(rewards))


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """For ``[P, n]`` rewards of ``n ≥ 2`` samples per prompt: each sample's mean over the *other* samples.

    Independent of the sample's own actions, so subtracting it leaves the policy gradient unbiased (RLOO).
    """
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
    return (rewards.sum(dim=-1, keepdim=True) - rewards) / (n - 1)


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from the log-probabilities of tokens sampled from π.

    * ``k1 = log π − log π_ref``: unbiased, can be negative; pavlit subtracts ``kl_coef · k1`` (detached) from each
      token's weight (the KL penalty folded into the reward).
    * ``k2 = ½ (log π − log π_ref)²``: as a loss, its gradient ``(log π − log π_ref) ∇log π`` is the per-token
      reverse-KL gradient on-policy.
    * ``k3 = r − 1 − log r`` with ``r = π_ref / π``: unbiased, never negative (Schulman's estimator, GRPO's loss).

    All three (and the gradients of k2, k3) are exactly 0 where ``logp == logp_ref``.
    """
    log_ratio = logp - logp_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def policy_gradient_loss(
    logp: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    clip: float | None = None,
    normalization: Literal["tokens", "responses"] = "tokens",
) -> torch.Tensor:
    """The REINFORCE surrogate ``−Σ w_t log π(a_t | s_t)`` (weights are constants), optionally PPO-clipped.

    With ``clip`` the term is PPO's ``−min(ρ_t w_t, clip(ρ_t, 1 − ε, 1 + ε) w_t)``, ``ρ_t = π / π_old``; its
    gradient equals REINFORCE's while ``ρ`` stays inside the clip range (always at the first update on fresh
    rollouts) and vanishes for tokens pushed outside it.

    Args:
        logp: ``[B, T]`` log-probabilities of the sampled tokens under the policy being trained.
        weights: ``[B, T]`` per-token weights (detached here).
        mask: ``[B, T]`` True for real response tokens.
        old_logp: ``[B, T]`` the behaviour policy's log-probabilities (needed with ``clip``).
        clip: PPO's ε; ``None`` is plain REINFORCE (the paper).
        normalization: Divide the sum by the number of real tokens (``"tokens"``) or of responses
            (``"responses"``: the textbook Monte-Carlo estimate of the sequence-level gradient).

    Returns:
        A scalar loss.
    """
    weights = weights.detach()
    mask = mask.to(logp.dtype)
    if clip is None:
        per_token = -weights * logp
    else:
        if old_logp is None:
            raise ValueError("PPO clipping needs the behaviour policy's log-probabilities (old_logp)")
        ratio = torch.exp(logp - old_logp.detach())
        per_token = -torch.minimum(ratio * weights, ratio.clamp(1.0 - clip, 1.0 + clip) * weights)
    total = (per_token * mask).sum()
    if normalization == "tokens":
        return total / mask.sum().clamp(min=1)
    if normalization == "responses":
        return total / logp.shape[0]
    raise ValueError(f"normalization must be 'tokens' or 'responses', got {normalization!r}")
