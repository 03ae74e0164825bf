"""Online RL with dense process rewards (docs/method.md §6): the maths as pure tensor functions, and advantage sources.

REINFORCE weights every token of step ``h`` of a rollout with

    w_h = R + α · Â^μ(s_h, a_h) − b(s_h)

where ``R ∈ {0, 1}`` is the rollout's verified outcome (the Monte-Carlo return, an unbiased ``Q^π(s_h, a_h)``),
``Â^μ`` the step's advantage under a prover μ and ``b`` a baseline. α = 0 is outcome-only RL (ORM-RL); the
paper's failure-mode ablation replaces ``Â^μ`` with the prover's value ``Q^μ(s_h, a_h)``.

Token layout: a rollout's **response tokens** are the ones the sampler generated (EOS included); ``step_ends[h-1]``
is the index, among them, of the last token of step ``h`` (:func:`response_step_ends`, through
:mod:`pavlit.steps`). Step ``h`` owns the tokens after the end of step ``h − 1`` up to and including its own end;
tokens after the last step's end (EOS, text a step-aware stop cut off) take the last step's weight.

Advantage sources (``advantages:`` in a config, chosen with ``class_path``) give ``Q^μ`` of every prefix of every
rollout; the module takes consecutive differences (:func:`pavlit.values.advantages`):

* :class:`PAVAdvantages` — a frozen, trained process verifier and a prover transform (Best-of-K by default);
* :class:`MCAdvantages` — direct Monte-Carlo rollouts of the Best-of-K prover of the current policy, or of a fixed
  model (docs/method.md §6, open question 2).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from pavlit.interfaces import Problem, Prover, Task
from pavlit.provers.best_of_k import BestOfK
from pavlit.steps import step_end_token_indices
from pavlit.values import effective_reward

if TYPE_CHECKING:
    from pavlit.policy.sampler import Sampler
    from pavlit.policy.sources import ModelSource

__all__ = [
    "AdvantageSource",
    "MCAdvantages",
    "PAVAdvantages",
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


# --- advantage sources ----------------------------------------------------------------------------------------


class AdvantageSource(ABC):
    """Where ``Q^μ`` (and so ``Â^μ``) of the steps of RL rollouts comes from."""

    @abstractmethod
    def prefix_values(
        self,
        problems: Sequence[Problem],
        steps: Sequence[Sequence[str]],
        *,
        task: Task,
        sampler: Sampler,
        seed: int | None = None,
    ) -> list[torch.Tensor]:
        """``Q^μ`` of every prefix ``h = 0..H`` of each rollout.

        Args:
            problems: The problem of each rollout.
            steps: Each rollout's steps.
            task: Scores completions (Monte-Carlo sources).
            sampler: The current policy's sampler (its ``device`` is where models go).
            seed: Seed for sources that sample.

        Returns:
            One float tensor ``[H_i + 1]`` per rollout, values in [0, 1], column 0 the question-only prefix.
        """


class PAVAdvantages(AdvantageSource):
    """``Q^μ`` from a frozen process verifier (``PAVModule``) through a prover (docs/method.md §6, the paper's setup).

    Args:
        verifier_path: A folder written by ``PAVModule.save_pretrained`` (e.g. ``runs/tiny/pav/verifier``).
        prover: Turns the verifier's ``Q^π`` into ``Q^μ``: ``BestOfK(k)`` (analytic), or a ``CheckpointProver``.
        batch_size: Rollouts per verifier forward pass.
    """

    def __init__(self, verifier_path: str, prover: Prover = BestOfK(4), batch_size: int = 64) -> None:  # noqa: B008
        self.verifier_path = verifier_path
        self.prover = prover
        self.batch_size = batch_size
        self._verifier: Any = None

    def verifier(self, device: torch.device | str = "cpu") -> Any:
        """The verifier, loaded on first use (frozen, eval mode) and kept on ``device``."""
        if self._verifier is None:
            from pavlit.modules.pav import PAVModule

            self._verifier = PAVModule.from_pretrained(self.verifier_path).requires_grad_(False)
        if self._verifier.device != torch.device(device):
            self._verifier = self._verifier.to(device)
        return self._verifier

    def prefix_values(
        self,
        problems: Sequence[Problem],
        steps: Sequence[Sequence[str]],
        *,
        task: Task,
        sampler: Sampler,
        seed: int | None = None,
    ) -> list[torch.Tensor]:
        verifier = self.verifier(sampler.device)
        prompts = [problem.prompt for problem in problems]
        _, q_mu, _ = verifier.q_and_advantages(prompts, steps, self.prover, batch_size=self.batch_size)
        return [q.float().cpu() for q in q_mu]

    def __repr__(self) -> str:
        return f"PAVAdvantages(verifier_path={self.verifier_path!r}, prover={self.prover!r})"


class MCAdvantages(AdvantageSource):
    """``Q^μ`` of the Best-of-K prover by direct Monte-Carlo rollouts (no verifier; expensive, near-exact).

    Each distinct prefix gets ``n_groups`` groups of ``k`` completions; its value is the fraction of groups with a
    correct completion (:meth:`pavlit.provers.best_of_k.BestOfK.estimate`). The prefixes shared by a prompt's
    samples (the question-only one at least) are rolled out once.

    Args:
        k: Completions per group (``k = 1`` with a fixed ``prover`` model is that model itself).
        n_groups: Groups per prefix.
        prover: The model μ rolls out of; ``None``: the current policy (``BoK(π)`` tracks π as it trains).
        max_new_tokens: Cap on a completion's tokens (default: the sampler's).
    """

    def __init__(
        self, k: int = 4, n_groups: int = 4, prover: ModelSource | None = None, max_new_tokens: int | None = None
    ) -> None:
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.best_of_k = BestOfK(k)
        self.n_groups = n_groups
        self.prover = prover
        self.max_new_tokens = max_new_tokens
        self._sampler: Sampler | None = None

    def _prover_sampler(self, sampler: Sampler) -> Sampler:
        if self.prover is None:
            return sampler
        if self._sampler is None:
            from pavlit.policy.sampler import Sampler

            model, tokenizer = self.prover.load()
            model = model.to(sampler.device).requires_grad_(False)
            self._sampler = Sampler(model, tokenizer, max_new_tokens=sampler.max_new_tokens, seed=1)
        return self._sampler

    def prefix_values(
        self,
        problems: Sequence[Problem],
        steps: Sequence[Sequence[str]],
        *,
        task: Task,
        sampler: Sampler,
        seed: int | None = None,
    ) -> list[torch.Tensor]:
        prover_sampler = self._prover_sampler(sampler)
        unique: dict[str, tuple[Problem, dict[tuple[str, ...], int]]] = {}
        for problem, item in zip(problems, steps):
            prefixes = unique.setdefault(problem.id, (problem, {}))[1]
            for h in range(len(item) + 1):
                prefixes.setdefault(tuple(item[:h]), len(prefixes))
        values: dict[tuple[str, tuple[str, ...]], float] = {}
        for offset, (problem, prefixes) in enumerate(unique.values()):
            estimate = self.best_of_k.estimate(
                prover_sampler,
                task,
                problem,
                [list(prefix) for prefix in prefixes],
                n_groups=self.n_groups,
                max_new_tokens=self.max_new_tokens,
                seed=None if seed is None else seed + offset,
            )
            values.update({(problem.id, prefix): float(estimate[i]) for prefix, i in prefixes.items()})
        return [
            torch.tensor([values[(problem.id, tuple(item[:h]))] for h in range(len(item) + 1)])
            for problem, item in zip(problems, steps)
        ]

    def __repr__(self) -> str:
        return f"MCAdvantages(k={self.best_of_k.k}, n_groups={self.n_groups}, prover={self.prover!r})"
