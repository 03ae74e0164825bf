"""The autoregressive MLP policy of the didactic planted task (PAPER.md §7).

The state after ``i`` tokens is encoded as the one-hot of every token written so far at its own position, the
positions not yet written left at zero: a ``length × vocab_size`` vector. The number of written positions is
therefore visible to the network, and the policy may depend on the whole prefix (unlike the γ-prover, which
depends only on the match state), so its values are not a small dynamic programme.

Rollouts stop at EOS: the positions after the first EOS are filled with EOS and are not actions.
"""

from __future__ import annotations

import torch
from torch import nn

from pavlit.tasks.planted import PlantedTask

__all__ = ["MLPPolicy", "action_mask"]


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


class MLPPolicy(nn.Module):
    """An MLP mapping a (position-padded one-hot) prefix to next-token logits.

    Args:
        task: The planted task (gives ``length``, ``vocab_size`` and ``eos``).
        hidden_size: Width of every hidden layer.
        n_layers: Number of hidden layers (Linear + ReLU each) before the output layer; PAPER.md §7: 3 × 128.
    """

    def __init__(self, task: PlantedTask | None = None, hidden_size: int = 128, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or hidden_size < 1:
            raise ValueError("n_layers and hidden_size must be at least 1")
        self.task = task if task is not None else PlantedTask()
        self.length, self.vocab_size, self.eos = self.task.length, self.task.vocab_size, self.task.eos
        layers: list[nn.Module] = []
        width = self.length * self.vocab_size
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        layers.append(nn.Linear(width, self.vocab_size))
        self.net = nn.Sequential(*layers)

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
        one_hot = nn.functional.one_hot(padded, self.vocab_size).to(self.net[0].weight.dtype)
        return (one_hot * written[..., None]).flatten(1)

    def forward(self, tokens: torch.Tensor, n_written: torch.Tensor | int) -> torch.Tensor:
        """Next-token logits ``[B, vocab_size]`` after the first ``n_written`` tokens of each row."""
        return self.net(self.encode(tokens, n_written))

    def sequence_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, vocab_size]`` of the token at every position ``i`` given ``tokens[:, :i]``, in one pass."""
        n_rows, n_cols = tokens.shape
        one_hot = nn.functional.one_hot(tokens, self.vocab_size).to(self.net[0].weight.dtype)  # [B, L, V]
        # Row i of the strictly lower-triangular mask keeps the tokens before position i.
        before = torch.ones(n_cols, n_cols, dtype=torch.bool, device=tokens.device).tril(-1)
        inputs = one_hot[:, None, :, :] * before[None, :, :, None]  # [B, L(i), L(j), V]
        if n_cols < self.length:
            inputs = nn.functional.pad(inputs, (0, 0, 0, self.length - n_cols))
        return self.net(inputs.flatten(2))

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` log-probability of each token given the tokens before it (differentiable)."""
        logits = self.sequence_logits(tokens)
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)

    @torch.no_grad()
    def next_token_probs(self, prefix: list[int] | torch.Tensor) -> torch.Tensor:
        """``[vocab_size]`` float64 next-token distribution after one prefix (what ``PlantedTask.exact_q`` calls)."""
        tokens = torch.as_tensor(list(prefix) if not isinstance(prefix, torch.Tensor) else prefix, dtype=torch.long)
        device = self.net[0].weight.device
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
        device = self.net[0].weight.device
        return self.complete(
            torch.full((n, self.length), self.eos, dtype=torch.long, device=device), 0, generator, greedy
        )
