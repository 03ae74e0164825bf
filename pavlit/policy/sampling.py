"""Sampling maths: one token per row from logits (temperature, top-p, CDF inversion) and its log-probability."""

from __future__ import annotations

from types import ModuleType

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    kernel: ModuleType | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (``[rows, vocab]``) with temperature and nucleus (top-p) sampling.

    ``temperature == 0`` is greedy. Sampling inverts the cumulative distribution with one uniform draw per row
    (``u ~ U[0, total)``, the first token whose cumulative mass exceeds ``u``), summed in float64 so rounding
    moves no token's probability by more than ~1e-16 over any vocabulary. It needs one random number per row
    (the exponential race ``argmax_i p_i / E_i`` needs one per vocabulary entry, and drawing those was a quarter
    of SmolLM2's decode time on CPU), no sort unless ``top_p < 1``, and no host sync.

    Args:
        logits: Unnormalised scores, any float dtype.
        temperature: Softmax temperature; 0 means argmax.
        top_p: Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one token).
        generator: Source of randomness (on the logits' device).
        kernel: The compiled step (:mod:`pavlit.policy.native`): CPU rows without top-p are then drawn by its
            ``sample_rows``, the same rule and the same draws with the float64 sums taken per block of 64 tokens
            instead of one dependent chain over the vocabulary (the same tokens but where a draw falls within
            ~1e-16 of a boundary).

    Returns:
        ``[rows]`` long tensor of token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if kernel is not None and top_p >= 1.0 and logits.device.type == "cpu":
        draw = torch.rand((logits.shape[0], 1), dtype=torch.float64, device=logits.device, generator=generator)
        return kernel.sample_rows(logits, draw, float(temperature))
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    order = None
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: the top token has 0 < top_p, so at least one token always survives.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    else:
        probs = logits.softmax(dim=-1)
    probs = probs.double()
    # Cumulative mass before the last token (so the index found is at most vocab - 1), then the total.
    cdf = probs[:, :-1].cumsum(dim=-1)
    total = probs[:, -1:] + (cdf[:, -1:] if cdf.shape[1] else 0.0)
    draw = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device, generator=generator)
    picked = torch.searchsorted(cdf, draw * total, right=True).squeeze(-1)  # right=True skips zero-mass tokens
    return picked if order is None else order.gather(-1, picked[:, None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[rows]`` log-probability of ``tokens`` under the raw ``logits`` (temperature 1, no top-p): the behaviour
    policy's log-probs that RL needs, whatever the sampling settings were."""
    return logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
