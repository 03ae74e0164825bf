"""The γ-prover ``μ_γ`` of the planted-subsequence task (docs/method.md §7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pavlit.interfaces import Prover
from pavlit.tasks.planted import PlantedTask, TokenPrefix

__all__ = ["PlantedProver"]


class PlantedProver(Prover):
    """Put weight γ on the next target token and weight 1 on every other token.

    In match state ``k < len(target)`` (the longest ``k`` such that the last ``k`` tokens equal ``target[:k]``)
    the next token is ``target[k]`` with probability ``γ / (γ + V − 1)`` and any other token, EOS included,
    with probability ``1 / (γ + V − 1)``; EOS is an ordinary one of the ``V`` tokens, and writing it before the
    target ends the sequence unrewarded. **[pavlit]** Once the target has been found the prover is uniform over
    all ``V`` tokens (it no longer matters for the reward). Larger γ is a stronger prover; γ = 1 is uniform.

    Because the prover depends on the prefix only through its match state, its values are exact: a dynamic
    programme over (position, match state), computed once in ``__init__``.

    Args:
        gamma: Weight γ ≥ 0 of the next target token.
        task: The planted task it proves for (default: the paper's, ``PlantedTask()``).
    """

    def __init__(self, gamma: float = 10.0, task: PlantedTask | None = None) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.task = task if task is not None else PlantedTask()
        self._probs_by_state = self._make_probs_by_state()
        self._values = self.task.automaton_values(self._probs_by_state)

    def _make_probs_by_state(self) -> torch.Tensor:
        m, vocab = len(self.task.target), self.task.vocab_size
        weights = torch.ones(m + 1, vocab, dtype=torch.float64)
        weights[torch.arange(m), torch.tensor(self.task.target)] = self.gamma
        return weights / weights.sum(dim=-1, keepdim=True)

    @property
    def probs_by_state(self) -> torch.Tensor:
        """``[m + 1, V]`` next-token probabilities in each match state (row ``m``, found, is uniform)."""
        return self._probs_by_state.clone()

    @property
    def values(self) -> torch.Tensor:
        """``[length + 1, m + 1]`` exact ``Q^μ`` after ``i`` tokens in match state ``k`` (no EOS yet)."""
        return self._values.clone()

    def next_token_probs(self, prefix_tokens: TokenPrefix) -> torch.Tensor:
        """``[V]`` float64 next-token distribution after ``prefix_tokens`` (ids, a tensor, or step strings)."""
        k, _ = self.task.match_state(prefix_tokens)
        return self._probs_by_state[k].clone()

    def sample(
        self, n: int, generator: torch.Generator | None = None, prefix: TokenPrefix | None = None
    ) -> torch.Tensor:
        """Draw ``n`` sequences of ``length`` tokens, continuing ``prefix`` when given.

        Positions after the first EOS are filled with EOS (they are masked by the task anyway).

        Returns:
            ``LongTensor[n, length]``, with the prefix's tokens at the start of every row.
        """
        task = self.task
        start = task.to_tokens(prefix) if prefix is not None else []
        if len(start) > task.length:
            raise ValueError(f"prefix has {len(start)} tokens, more than length {task.length}")
        tokens = torch.full((n, task.length), task.eos, dtype=torch.long)
        tokens[:, : len(start)] = torch.tensor(start, dtype=torch.long)
        states = task.match_states(tokens[:, : len(start)])[:, -1]
        done = (tokens[:, : len(start)] == task.eos).any(dim=1)
        m = len(task.target)
        transitions = torch.cat([task.transitions, torch.full((1, task.vocab_size), m)], dim=0)
        probs = self._probs_by_state.to(torch.get_default_dtype())
        for i in range(len(start), task.length):
            drawn = torch.multinomial(probs[states], 1, generator=generator).squeeze(1)
            drawn = torch.where(done, torch.full_like(drawn, task.eos), drawn)
            tokens[:, i] = drawn
            done |= drawn == task.eos
            states = transitions[states, drawn]
        return tokens

    def q_value(self, prefix: TokenPrefix) -> float:
        """Exact ``Q^μ`` of one prefix."""
        return self.task.automaton_q(prefix, self._values)

    def q_values(
        self,
        q_pi: torch.Tensor,
        prefixes: Sequence[Sequence[str]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Exact ``Q^μ`` of each prefix (``q_pi`` only gives the output's shape, dtype and device).

        Args:
            q_pi: Any shape; ``q_pi.numel()`` must equal ``len(prefixes)``.
            prefixes: Prefixes as step strings (``["3 ", "6 "]``) or token ids, in ``q_pi.flatten()`` order.
            prompts: Unused (the planted task has no question).
        """
        if prefixes is None:
            raise ValueError("PlantedProver needs the prefixes themselves to compute exact values")
        if len(prefixes) != q_pi.numel():
            raise ValueError(f"got {len(prefixes)} prefixes for {q_pi.numel()} values")
        dtype = q_pi.dtype if q_pi.is_floating_point() else torch.get_default_dtype()
        q = torch.tensor([self.q_value(prefix) for prefix in prefixes], dtype=dtype, device=q_pi.device)
        return q.reshape(q_pi.shape)

    def __repr__(self) -> str:
        return f"PlantedProver(gamma={self.gamma}, target={list(self.task.target)})"
