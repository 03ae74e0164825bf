"""The autoregressive MLP policy of the didactic planted task (docs/method.md §7): :class:`MLPPolicy`.

The state after ``i`` tokens is encoded as the one-hot of every token written so far at its own position, the
positions not yet written left at zero: a ``length × vocab_size`` vector. The number of written positions is
therefore visible to the network, and the policy may depend on the whole prefix (unlike the γ-prover, which
depends only on the match state), so its values are not a small dynamic programme.

Three output heads (``head``), all measured by ``benchmarks/didactic_sweep.py`` (README, *RL, didactic task*):

* ``"masked"`` (default): a masked autoregressive MLP (MADE, Germain et al. 2015). One pass over the whole
  sequence gives every position's logits; each hidden unit has a degree ``d ∈ [1, L − 1]`` and sees only positions
  ``< d``, and the output block of position ``i`` (``V`` rows of its own) sees only hidden units of degree ``≤ i``
  (position 0: its bias alone). Measured: at every γ α = 1 reaches 90% in ~100 iterations while α = 0 needs
  ~1,000 or more, and the policy stays diverse (accuracy plateaus at ~0.95 with hundreds of distinct correct
  sequences), as the paper reports.
* ``"per_position"``: the hidden layers see the whole (zero-padded) prefix and are shared; the output layer is
  ``Linear(width, L·V)`` and the logits of position ``i`` are its block ``i``. Measured: faster (90% in ~50
  iterations) but it collapses onto one sequence, α = 0 takes off after ~200 iterations, and ~3% of runs stall at
  accuracy 0 (π(5) driven to 0 at one position before the match state that needs it is visited there).
* ``"shared"``: one ``Linear(width, V)`` serves every position (position is only implicit in the zero padding).
  **This fails on the planted task with a strong prover, and is kept as an ablation**
  (``configs/didactic/rl_shared_head.yaml``). Token 5 (the last target token) has a positive prover advantage
  only in match state 4 (after ``3 6 0 3``), a state the SFT policy visits in ~0.01–0.02% of its steps; in every
  other state writing 5 wastes a step and gets a negative ``A^μ`` that grows with γ. With one output row per
  token, ``π(5 | k = 4)`` is tied to ``π(5)`` everywhere, so a strong prover pushes it to 0 and the target can
  never be completed: the policy climbs the remaining positive advantages (``3 6 0 3 6 0 …``) at accuracy 0.
  This was the "γ ≥ 10 collapse" once reported as the paper's prover-strength band.

Rollouts stop at EOS: the positions after the first EOS are filled with EOS and are not actions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pavlit.tasks.planted import PlantedTask

__all__ = ["HEADS", "MLPPolicy", "action_mask"]

HEADS = ("per_position", "masked", "shared")
Head = Literal["per_position", "masked", "shared"]


def action_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Which positions of ``tokens`` are actions: every position up to and including the first EOS.

    Args:
        tokens: ``LongTensor[B, L]``.
        eos: The end-of-sequence token.

    Returns:
        ``BoolTensor[B, L]``.
    """
    is_eos = (tokens == eos).long()
    # The number of EOS strictly before a position is 0 exactly up to (and including) the first EOS.
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return eos_before == 0


class _MaskedLinear(nn.Linear):
    """A ``Linear`` whose weight is multiplied by a fixed 0/1 mask (MADE)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MLPPolicy(nn.Module):
    """An MLP mapping a (position-padded one-hot) prefix to next-token logits.

    Args:
        task: The planted task (gives ``length``, ``vocab_size`` and ``eos``).
        hidden_size: Width of every hidden layer.
        n_layers: Number of hidden layers (Linear + ReLU each) before the output layer; docs/method.md §7: 3 × 128.
        head: ``"masked"`` (default), ``"per_position"`` or ``"shared"`` (the ablation that fails; see the module
            docstring).
    """

    def __init__(
        self, task: PlantedTask | None = None, hidden_size: int = 128, n_layers: int = 3, head: Head = "masked"
    ) -> None:
        super().__init__()
        if n_layers < 1 or hidden_size < 1:
            raise ValueError("n_layers and hidden_size must be at least 1")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.task = task if task is not None else PlantedTask()
        self.length, self.vocab_size, self.eos = self.task.length, self.task.vocab_size, self.task.eos
        self.head_kind = head
        length, vocab = self.length, self.vocab_size
        layers: list[nn.Module] = []
        if head == "masked":
            # Degrees: input block j (position j) has degree j + 1; hidden unit u has degree 1 + u mod (L − 1);
            # a unit sees the units of lower layers with degree ≤ its own; output block i sees hidden degree ≤ i.
            degree = torch.arange(length).repeat_interleave(vocab) + 1
            hidden_degree = torch.arange(hidden_size) % max(length - 1, 1) + 1
            for _ in range(n_layers):
                layers += [_MaskedLinear(hidden_degree[:, None] >= degree[None, :]), nn.ReLU()]
                degree = hidden_degree
            out_degree = torch.arange(length).repeat_interleave(vocab)
            self.head = _MaskedLinear(out_degree[:, None] >= degree[None, :])
        else:
            width = length * vocab
            for _ in range(n_layers):
                layers += [nn.Linear(width, hidden_size), nn.ReLU()]
                width = hidden_size
            self.head = nn.Linear(width, vocab if head == "shared" else length * vocab)
        self.trunk = nn.Sequential(*layers)

    @property
    def _weight(self) -> torch.Tensor:
        return self.head.weight

    def output_block(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The output weights ``[V, width]`` and biases ``[V]`` that give the logits at ``position`` (views of
        the head's parameters; with ``head="shared"`` every position returns the same ones)."""
        if not 0 <= position < self.length:
            raise ValueError(f"position must lie in [0, {self.length}), got {position}")
        if self.head_kind == "shared":
            return self.head.weight, self.head.bias
        rows = slice(position * self.vocab_size, (position + 1) * self.vocab_size)
        return self.head.weight[rows], self.head.bias[rows]

    def encode(self, tokens: torch.Tensor, n_written: torch.Tensor | int) -> torch.Tensor:
        """Inputs for prefixes: the first ``n_written`` tokens of each row, one-hot, zero elsewhere.

        Args:
            tokens: ``LongTensor[B, ≥ n_written]`` (later columns are ignored).
            n_written: Prefix length, an int or ``LongTensor[B]``.

        Returns:
            ``[B, length * vocab_size]`` float inputs.
        """
        n_rows = tokens.shape[0]
        padded = torch.zeros(n_rows, self.length, dtype=torch.long, device=tokens.device)
        width = min(tokens.shape[1], self.length)
        padded[:, :width] = tokens[:, :width]
        written = torch.arange(self.length, device=tokens.device)[None, :] < torch.as_tensor(n_written)[..., None]
        one_hot = nn.functional.one_hot(padded, self.vocab_size).to(self._weight.dtype)
        return (one_hot * written[..., None]).flatten(1)

    def forward(self, tokens: torch.Tensor, n_written: torch.Tensor | int) -> torch.Tensor:
        """Next-token logits ``[B, vocab_size]`` after the first ``n_written`` tokens of each row."""
        hidden = self.trunk(self.encode(tokens, n_written))
        if self.head_kind == "shared":
            return self.head(hidden)
        if isinstance(n_written, int):  # one block for the whole batch (sampling)
            weight, bias = self.output_block(n_written)
            if self.head_kind == "masked":
                weight = weight * self.head.mask[n_written * self.vocab_size : (n_written + 1) * self.vocab_size]
            return nn.functional.linear(hidden, weight, bias)
        position = torch.as_tensor(n_written, device=tokens.device).expand(tokens.shape[0])
        if bool((position < 0).any() or (position >= self.length).any()):
            raise ValueError(f"n_written must lie in [0, {self.length}) to ask for a next token")
        logits = self.head(hidden).view(-1, self.length, self.vocab_size)
        return logits[torch.arange(len(position), device=tokens.device), position]

    def sequence_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, vocab_size]`` of the token at every position ``i`` given ``tokens[:, :i]``, in one pass."""
        n_rows, n_cols = tokens.shape
        one_hot = nn.functional.one_hot(tokens, self.vocab_size).to(self._weight.dtype)  # [B, L, V]
        if self.head_kind == "masked":  # output block i depends only on positions < i: one pass suffices
            if n_cols < self.length:
                one_hot = nn.functional.pad(one_hot, (0, 0, 0, self.length - n_cols))
            logits = self.head(self.trunk(one_hot.flatten(1))).view(n_rows, self.length, self.vocab_size)
            return logits[:, :n_cols]
        # Row i of the strictly lower-triangular mask keeps the tokens before position i.
        before = torch.ones(n_cols, n_cols, dtype=torch.bool, device=tokens.device).tril(-1)
        inputs = one_hot[:, None, :, :] * before[None, :, :, None]  # [B, L(i), L(j), V]
        if n_cols < self.length:
            inputs = nn.functional.pad(inputs, (0, 0, 0, self.length - n_cols))
        hidden = self.trunk(inputs.flatten(2))  # [B, L(i), width]
        if self.head_kind == "shared":
            return self.head(hidden)
        weight = self.head.weight.view(self.length, self.vocab_size, -1)[:n_cols]  # [L, V, width]
        bias = self.head.bias.view(self.length, self.vocab_size)[:n_cols]
        return torch.einsum("ivh,bih->biv", weight, hidden) + bias

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` log-probability of each token given the tokens before it (differentiable)."""
        logits = self.sequence_logits(tokens)
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)

    @torch.no_grad()
    def next_token_probs(self, prefix: list[int] | torch.Tensor) -> torch.Tensor:
        """``[vocab_size]`` float64 next-token distribution after one prefix (what ``PlantedTask.exact_q`` calls)."""
        tokens = torch.as_tensor(list(prefix) if not isinstance(prefix, torch.Tensor) else prefix, dtype=torch.long)
        device = self._weight.device
        logits = self(tokens.reshape(1, -1).to(device), len(tokens))
        return torch.softmax(logits.double(), dim=-1)[0].cpu()

    @torch.no_grad()
    def complete(
        self,
        tokens: torch.Tensor,
        n_written: torch.Tensor | int,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> torch.Tensor:
        """Complete prefixes to full sequences by sampling from the policy.

        Args:
            tokens: ``LongTensor[B, length]``; the first ``n_written[b]`` tokens of row b are kept.
            n_written: Prefix length per row (an int or ``LongTensor[B]``).
            generator: Random generator (on the policy's device).
            greedy: Take the most likely token instead of sampling.

        Returns:
            ``LongTensor[B, length]``; positions after the first EOS hold EOS.
        """
        tokens = tokens.clone()
        n_written = torch.as_tensor(n_written, device=tokens.device).expand(tokens.shape[0])
        done = ((tokens == self.eos) & (torch.arange(self.length, device=tokens.device) < n_written[:, None])).any(1)
        for i in range(int(n_written.min()), self.length):
            logits = self(tokens, i)
            if greedy:
                drawn = logits.argmax(dim=-1)
            else:
                drawn = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator).squeeze(1)
            drawn = torch.where(done, torch.full_like(drawn, self.eos), drawn)
            write = n_written <= i
            tokens[:, i] = torch.where(write, drawn, tokens[:, i])
            done |= write & (drawn == self.eos)
        return tokens

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        """``n`` rollouts from the empty prefix: ``LongTensor[n, length]``."""
        device = self._weight.device
        return self.complete(
            torch.full((n, self.length), self.eos, dtype=torch.long, device=device), 0, generator, greedy
        )
