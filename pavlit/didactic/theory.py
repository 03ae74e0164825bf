"""Theorem 3.1 quantities of candidate γ-provers for a planted-task policy, and a prover recommendation.

For a policy π and a prover μ, the improvement of one natural-policy-gradient step on ``Q^π + α·A^μ`` is bounded
below by (a multiple of) **distinguishability** ``E_s Var_{a~π}[A^μ(s, a)]`` plus **alignment**
``E_s E_{a~π}[A^μ(s, a) · A^π(s, a)]`` (docs/method.md §2). :func:`prover_quantities` computes both for every γ at the
states that π's own rollouts visit (each non-ended prefix of ``n_rollouts`` samples), summing over **all**
actions weighted by π's probabilities:

* ``A^μ(s, a)`` is exact: the γ-prover's values are a table over (position, match state).
* ``A^π(s, a) = Q^π(s, a) − Σ_a' π(a'|s) Q^π(s, a')`` needs ``Q^π`` of a policy that depends on the whole prefix,
  where exact enumeration costs ``vocab_size ** remaining`` leaves. **[pavlit]** ``Q^π(s, a)`` is therefore a
  Monte-Carlo mean over ``n_mc`` completions of ``s + a`` (exact where the outcome is already decided: the target
  was found, EOS was written, or the sequence is full). Alignment is linear in ``A^π`` and ``A^μ`` is exact, so
  the estimate is unbiased; its noise shrinks with ``n_rollouts × n_mc``. ``A^π`` does not depend on γ, so it is
  computed once for all provers.

:func:`recommend_prover` ranks the γ by ``distinguishability + alignment`` (the bound with NPG step size and
α set to 1) before any RL is run — something the paper leaves open.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pavlit import values
from pavlit.didactic.policy import MLPPolicy, action_mask
from pavlit.provers.planted import PlantedProver

__all__ = [
    "format_table",
    "policy_action_advantages",
    "prover_action_advantages",
    "prover_quantities",
    "recommend_prover",
]


def prover_action_advantages(prover: PlantedProver, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Exact ``A^μ(s, a)`` of every action in states given by (tokens written, match state).

    Args:
        prover: The γ-prover.
        positions: ``LongTensor[S]`` tokens written so far (< ``length``), no EOS among them.
        states: ``LongTensor[S]`` match states (``len(target)``: found).

    Returns:
        ``[S, vocab_size]`` float64.
    """
    task = prover.task
    m = len(task.target)
    table = prover.values
    transitions = torch.cat([task.transitions, torch.full((1, task.vocab_size), m)])
    next_states = transitions[states]  # [S, V]
    next_values = table[(positions + 1)[:, None].expand_as(next_states), next_states]
    eos_fails = torch.zeros_like(next_values, dtype=torch.bool)
    eos_fails[:, task.eos] = states < m
    next_values = torch.where(eos_fails, torch.zeros_like(next_values), next_values)
    return next_values - table[positions, states][:, None]


@torch.no_grad()
def policy_action_advantages(
    policy: MLPPolicy,
    prefixes: torch.Tensor,
    positions: torch.Tensor,
    n_mc: int = 32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """π's next-token probabilities and Monte-Carlo ``Â^π(s, a)`` of every action at the given states.

    Args:
        policy: The policy π.
        prefixes: ``LongTensor[S, length]``; row s's first ``positions[s]`` tokens are the state (no EOS among them).
        positions: ``LongTensor[S]`` tokens written.
        n_mc: Completions of π per (state, action).
        generator: Random generator.

    Returns:
        ``(probs, a_pi)``, both ``[S, vocab_size]`` float64; ``a_pi`` is computed from ``Q̂^π`` and
        ``V̂^π(s) = Σ_a π(a|s) Q̂^π(s, a)``, so it has mean exactly 0 under π at every state.
    """
    task = policy.task
    n_states, vocab = prefixes.shape[0], task.vocab_size
    probs = torch.softmax(policy(prefixes, positions).double(), dim=-1)
    q_pi = torch.zeros(n_states, vocab, dtype=torch.float64)
    for position in positions.unique().tolist():  # same-length prefixes complete in one batch from that position
        rows = (positions == position).nonzero().squeeze(1)
        starts = prefixes[rows].repeat_interleave(vocab, dim=0)
        starts[:, position] = torch.arange(vocab).repeat(len(rows))
        for chunk in torch.split(torch.arange(starts.shape[0]), max(1, 16384 // n_mc)):
            completed = policy.complete(starts[chunk].repeat_interleave(n_mc, dim=0), position + 1, generator)
            q_pi.view(-1)[(rows[:, None] * vocab + torch.arange(vocab)).flatten()[chunk]] = (
                task.reward(completed).double().reshape(-1, n_mc).mean(dim=1)
            )
    a_pi = q_pi - (probs * q_pi).sum(dim=-1, keepdim=True)
    return probs, a_pi


def prover_quantities(
    policy: MLPPolicy,
    gammas: Sequence[float],
    n_rollouts: int = 32,
    n_mc: int = 32,
    generator: torch.Generator | None = None,
) -> list[dict[str, float]]:
    """Distinguishability and alignment of each γ-prover at the states π's rollouts visit.

    Args:
        policy: The policy π (e.g. the SFT'd policy, before RL).
        gammas: Candidate prover strengths.
        n_rollouts: π rollouts whose non-ended prefixes are the states.
        n_mc: π completions per (state, action) for ``Q̂^π``.
        generator: Random generator.

    Returns:
        One row per γ (in the given order): ``gamma``, ``distinguishability``, ``alignment``, ``score`` (their
        sum), ``correlation`` (alignment ÷ √(distinguishability · E_s Var_π[A^π]), a scale-free alignment),
        ``a_mu_abs`` (mean ``|A^μ|`` under π), ``prover_accuracy`` (``V^μ`` of the empty prefix) and
        ``n_states``.
    """
    task = policy.task
    tokens = policy.sample(n_rollouts, generator)
    states_all = task.match_states(tokens)[:, :-1]  # state before each action
    acting = action_mask(tokens, task.eos)  # the state before action h is a real, non-ended state
    rollout, position = acting.nonzero(as_tuple=True)
    prefixes = torch.where(torch.arange(task.length)[None, :] < position[:, None], tokens[rollout], task.eos)
    probs, a_pi = policy_action_advantages(policy, prefixes, position, n_mc, generator)
    a_pi = a_pi.clamp(-1.0, 1.0)
    a_pi_spread = float(values.distinguishability(a_pi, probs))  # E_s Var_π[Â^π], shared by every γ
    rows = []
    for gamma in gammas:
        prover = PlantedProver(gamma, task)
        a_mu = prover_action_advantages(prover, position, states_all[rollout, position])
        rows.append(
            {
                "gamma": float(gamma),
                "distinguishability": float(values.distinguishability(a_mu, probs)),
                "alignment": float(values.alignment(a_mu, a_pi, probs)),
                "a_mu_abs": float((probs * a_mu.abs()).sum(dim=-1).mean()),
                "prover_accuracy": float(prover.values[0, 0]),
                "n_states": float(len(position)),
            }
        )
        row = rows[-1]
        row["score"] = row["distinguishability"] + row["alignment"]
        # Scale-free alignment: how well A^μ points where A^π does, whatever the size of A^μ.
        row["correlation"] = row["alignment"] / max(math.sqrt(row["distinguishability"] * a_pi_spread), 1e-300)
    return rows


def recommend_prover(
    policy: MLPPolicy, gammas: Sequence[float], n_rollouts: int = 32, n_mc: int = 32, seed: int = 0
) -> list[dict[str, float]]:
    """Rank candidate γ-provers for ``policy`` by ``distinguishability + alignment``, best first (adds ``rank``)."""
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    rows = sorted(prover_quantities(policy, gammas, n_rollouts, n_mc, generator), key=lambda r: -r["score"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def format_table(rows: Sequence[dict[str, float]]) -> str:
    """A Markdown table of :func:`prover_quantities` / :func:`recommend_prover` rows."""
    header = "| γ | distinguishability | alignment | score | correlation | mean abs A^μ | prover accuracy |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['gamma']:g} | {row['distinguishability']:.2e} | {row['alignment']:.2e} | {row['score']:.2e} "
            f"| {row['correlation']:.3f} | {row['a_mu_abs']:.2e} | {row['prover_accuracy']:.3f} |"
        )
    return "\n".join(lines)
