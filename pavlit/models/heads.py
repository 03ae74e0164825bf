"""Scoring heads: turn a backbone's last hidden state at chosen positions into one logit each.

Two ways to read a verifier score (docs/method.md §4), chosen by ``head_type`` of a
:class:`pavlit.models.verifier.Verifier` (``PAVModule`` / ``ORMModule`` in training):

* ``"linear"`` — :class:`ValueHead`, a fresh ``Linear(hidden, 1)`` on the last hidden state **[pavlit default]**.
* ``"token"`` — :class:`TokenHead`, the paper's scoring token: the logit the language-model head gives to a fixed
  token id, read at the same position. The paper appends the scoring token after the prefix and reads one logit;
  reading the *next-token* logit of that token at the step's last position is the same quantity without the extra
  token, so every prefix of a rollout still scores in one forward pass. Only the row of the output embedding for
  that token is used (never the full vocabulary projection), plus a learnable scalar bias so that the head trains
  even when the output embedding is frozen (LoRA leaves ``lm_head`` without adapters). Gemma's final logit
  soft-capping is not applied: the raw logit is the score.

* ``"likelihood"`` — :class:`LikelihoodHead`, the linear head plus a small MLP over the backbone's own token
  log-likelihoods of the response so far: min and sum over the whole prefix, and over its last step. A verifier
  initialised from the policy already "knows" which step it would not have written (on the tiny default the
  policy's log-likelihood of a response separates right from wrong answers with AUROC 0.92, while linear heads
  trained on 48k MC labels reach 0.68); this head hands that signal to the value estimate instead of leaving the
  fine-tuning to rediscover it. The features are read from the verifier's *current* backbone without gradient
  (:func:`pavlit.models.scoring.likelihood_features`); the MLP's output layer starts at zero, so training starts from
  the plain linear head. It costs one output-embedding projection per token (cheap for small vocabularies).

All heads are plain ``nn.Module``s kept outside any peft wrapper, so they always train fully.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HEAD_TYPES", "LIKELIHOOD_FEATURES", "LikelihoodHead", "TokenHead", "ValueHead"]

HEAD_TYPES = ("linear", "token", "likelihood")
LIKELIHOOD_FEATURES = 4  # min and sum of token log-probs over the prefix, then over its last step


class ValueHead(nn.Module):
    """A linear map from a hidden state to one logit.

    Args:
        hidden_size: Width of the backbone's hidden states.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # A random (not zero) weight: with a zero weight the backbone gets no gradient on the first steps.
        nn.init.normal_(self.linear.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor, output_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., D]`` hidden states → ``[...]`` logits (``output_weight`` is ignored; see :class:`TokenHead`)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class TokenHead(nn.Module):
    """The logit of a fixed scoring token from the backbone's own output embedding, plus a learnable bias.

    Args:
        token_id: Vocabulary id of the scoring token.
    """

    def __init__(self, token_id: int) -> None:
        super().__init__()
        if token_id < 0:
            raise ValueError(f"token_id must be a vocabulary id >= 0, got {token_id}")
        self.token_id = int(token_id)
        # Shape [1], not a scalar: FSDP shards parameters along dimension 0.
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, output_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., D]`` hidden states and the ``[V, D]`` output embedding weight → ``[...]`` logits."""
        if output_weight is None:
            raise ValueError("TokenHead needs the backbone's output embedding weight")
        if self.token_id >= output_weight.shape[0]:
            raise ValueError(f"scoring token id {self.token_id} is outside the vocabulary ({output_weight.shape[0]})")
        row = output_weight[self.token_id]
        return (hidden.to(row.dtype) * row).sum(-1) + self.bias[0].to(row.dtype)


class LikelihoodHead(nn.Module):
    """:class:`ValueHead` plus an MLP over likelihood features (see the module docstring).

    Args:
        hidden_size: Width of the backbone's hidden states.
        width: Hidden units of the feature MLP.
    """

    def __init__(self, hidden_size: int, width: int = 32) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.linear.bias)
        self.features = nn.Sequential(nn.Linear(LIKELIHOOD_FEATURES, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.features[2].weight)
        nn.init.zeros_(self.features[2].bias)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` hidden states and ``[..., 4]`` likelihood features → ``[...]`` logits.

        Log-likelihood sums grow with length; ``asinh`` keeps them on a log-like scale (linear near zero).
        """
        dtype = self.linear.weight.dtype
        scaled = torch.asinh(features.to(dtype))
        return (self.linear(hidden.to(dtype)) + self.features(scaled)).squeeze(-1)
