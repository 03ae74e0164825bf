"""The decode loop of :class:`~pavlit.policy.sampler.Sampler`, one function per phase.

:func:`decode_batch` decodes the samples of a few prompts together: :func:`prefill` runs each prompt once through
the model, :func:`expand` gives every sample its row (sharing the prompt's KV: the grouped decoder of
:mod:`pavlit.policy.fast_decode`, or the Hugging Face cache of :mod:`pavlit.policy.kv_cache` with rows repeated),
then per token :func:`stop` marks rows that just hit EOS or their step limit, :func:`compact` drops finished rows
once they are a large enough share of the batch, and :func:`step` runs the next forward. All randomness is one
:func:`~pavlit.policy.sampling.sample_tokens` draw per token, so the loop's structure leaves samples unchanged.
With the compiled extension (:mod:`pavlit.policy.native`) the sampling side of a token - the draw, the sample,
recording it and :func:`stop`'s rule - is one call without the GIL (``sample_and_record``, or ``record_rows``
after a top-p or greedy draw); only a multi-character delimiter, confirmed on decoded text, keeps :func:`stop`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from pavlit.policy import native
from pavlit.policy.fast_decode import CacheBuffers, DecodeWeights, GroupedDecoder
from pavlit.policy.kv_cache import new_cache
from pavlit.policy.records import STOP_EOS, STOP_LENGTH, Request
from pavlit.policy.sampling import sample_tokens, token_logprobs

if TYPE_CHECKING:
    from pavlit.policy.sampler import Sampler

# Per-row stop codes while decoding.
RUNNING, STOPPED_EOS, STOPPED_STEPS = 0, 1, 2


def forward_kwargs(model: PreTrainedModel) -> tuple[str, str | None]:
    """The keyword names this model's forward uses for the cache and for "logits of the last k positions"."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)
    return cache_kw, keep_kw


@dataclass
class Job:
    """``count`` samples of prompt ``prompt_index`` decoded in one batch."""

    prompt_index: int
    count: int


def plan(encoded: list[list[int]], n: int, max_batch: int, parts: int = 1) -> list[list[Job]]:
    """Pack (prompt, samples) jobs into batches of at most ``max_batch`` rows, similar lengths together.

    With ``parts > 1`` (batches decoded concurrently), batches hold at most ``ceil(rows / parts)`` rows, so there
    are at least ``parts`` of them when there are that many rows.
    """
    if parts > 1:
        max_batch = min(max_batch, -(-len(encoded) * n // parts))
    jobs: list[Job] = []
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for i in order:
        remaining = n
        while remaining:
            count = min(remaining, max_batch)
            jobs.append(Job(i, count))
            remaining -= count
    batches: list[list[Job]] = []
    rows = 0
    for job in jobs:
        if not batches or rows + job.count > max_batch:
            batches.append([])
            rows = 0
        batches[-1].append(job)
        rows += job.count
    return batches


@dataclass
class Batch:
    """The model-side state of a decoding batch: next-token logits, KV, positions and padding masks, per row."""

    logits: torch.Tensor  # [rows, vocab]
    cache: Any  # the Hugging Face cache, or None when the grouped decoder holds the KV
    decoder: GroupedDecoder | None
    counts: torch.Tensor  # samples of each prefilled prompt
    mask2d: torch.Tensor  # [rows, width + max_new_tokens], 1 on real tokens
    position: torch.Tensor  # [rows, 1]: position id of the next token
    width: int  # prompt width (left-padded)
    padded: bool  # whether any prompt is padded (no mask is passed otherwise)
    mask4d: torch.Tensor | None = None  # a ready padding mask for one query token, when the model takes one


@dataclass
class Rows:
    """What each current row has generated; compacted with the batch, written out to the call's rows."""

    tokens: torch.Tensor  # [rows, max_new_tokens]
    lengths: torch.Tensor
    codes: torch.Tensor  # RUNNING (or ran out of tokens), STOPPED_EOS, STOPPED_STEPS
    logprobs: torch.Tensor | None
    steps_done: torch.Tensor | None  # delimiters so far (exact delimiter tables only)
    row_ids: torch.Tensor  # row of the call of each current row
    alive: torch.Tensor

    def write_to(self, out: Rows) -> None:
        """Copy each current row into its row of the call (``out``)."""
        out.tokens[self.row_ids] = self.tokens
        out.lengths[self.row_ids] = self.lengths
        out.codes[self.row_ids] = self.codes
        if out.logprobs is not None:
            out.logprobs[self.row_ids] = self.logprobs


def prefill(sampler: Sampler, prompts: list[list[int]], counts: torch.Tensor, max_new_tokens: int) -> Batch:
    """Run the left-padded prompts through the model once, filling a cache sized for the decode that follows."""
    lengths = [len(ids) for ids in prompts]
    width = max(lengths)
    padded = any(length != width for length in lengths)
    capacity = width + max_new_tokens

    input_ids = torch.full((len(prompts), width), sampler.pad_id, dtype=torch.long)
    mask2d = torch.zeros((len(prompts), capacity), dtype=torch.long)
    for k, ids in enumerate(prompts):
        input_ids[k, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask2d[k, width - len(ids) :] = 1  # generated positions are real tokens too
    input_ids, mask2d = input_ids.to(sampler.device), mask2d.to(sampler.device)
    positions = (mask2d[:, :width].cumsum(-1) - 1).clamp(min=0)

    cache = new_cache(sampler.model.config, width if sampler._fast_decode else capacity)
    kwargs: dict[str, Any] = {sampler._cache_kw: cache, "use_cache": True}
    if sampler._keep_kw is not None:
        kwargs[sampler._keep_kw] = 1
    prefill_mask = mask2d[:, :width] if padded else None
    out = sampler.model(input_ids=input_ids, attention_mask=prefill_mask, position_ids=positions, **kwargs)
    return Batch(out.logits[:, -1, :], cache, None, counts, mask2d, positions, width, padded)


def expand(sampler: Sampler, batch: Batch, max_new_tokens: int, buffers: CacheBuffers | None = None) -> None:
    """Give every sample its row; rows of the same prompt share the prefix's KV (in place on ``batch``); the
    grouped decoder's caches may reuse ``buffers``."""
    n_prompts, rows = batch.logits.shape[0], int(batch.counts.sum())
    expand_index = torch.repeat_interleave(torch.arange(n_prompts, device=sampler.device), batch.counts)
    cache = batch.cache
    if sampler._fast_decode and getattr(cache, "layers", None):
        # One copy of each prompt's KV, attended to by all its samples at once (pavlit.policy.fast_decode).
        if sampler._decode_weights is None:
            sampler._decode_weights = DecodeWeights(sampler.model)
        batch.decoder = GroupedDecoder(
            sampler._decode_weights.current(),
            [layer.keys for layer in cache.layers],
            [layer.values for layer in cache.layers],
            batch.mask2d[:, : batch.width] if batch.padded else None,
            batch.counts,
            max_new_tokens,
            native=sampler.native,
            buffers=buffers,
        )
        batch.cache = None  # the decoder holds the prompts' KV now
    elif n_prompts != rows:
        cache.batch_select_indices(expand_index)
    if n_prompts != rows:
        batch.logits = batch.logits[expand_index]
    batch.mask2d = batch.mask2d[expand_index]
    batch.position = batch.position[expand_index, -1:] + 1

    if batch.padded and sampler._mask_kind != "2d":
        # [rows, 1, 1, capacity]: a padding mask for one query token (causality is implicit when decoding).
        if sampler._mask_kind == "sdpa":
            batch.mask4d = batch.mask2d.bool()[:, None, None, :]
        else:
            dtype = sampler.model.dtype
            mask4d = torch.zeros(batch.mask2d.shape, dtype=dtype, device=sampler.device)
            batch.mask4d = mask4d.masked_fill(batch.mask2d == 0, torch.finfo(dtype).min)[:, None, None, :]


def stop(sampler: Sampler, rows: Rows, tokens: torch.Tensor, request: Request) -> None:
    """Mark rows whose new token is EOS or completes their ``max_steps``-th delimiter, and retire them."""
    eos = sampler.is_eos[tokens] & rows.alive
    stopped = eos
    if request.max_steps:
        table, exact = sampler._delimiter_table(request.delimiter)
        if exact:
            rows.steps_done += table[tokens] * rows.alive
            hit = (rows.steps_done >= request.max_steps) & rows.alive & ~eos
        else:
            candidates = (table[tokens] > 0) & rows.alive & ~eos
            hit = sampler._confirm_delimiter(
                candidates, rows.tokens, rows.lengths, request.delimiter, request.max_steps
            )
        stopped = stopped | hit
        rows.codes.masked_fill_(hit, STOPPED_STEPS)
    rows.codes.masked_fill_(eos, STOPPED_EOS)
    rows.alive &= ~stopped


def compact(rows: Rows, batch: Batch, keep: torch.Tensor) -> None:
    """Keep only rows ``keep`` of the batch (a copy of its KV) and of what they generated."""
    if batch.decoder is not None:
        batch.decoder.select(keep)
    else:
        batch.cache.batch_select_indices(keep)
    rows.row_ids, rows.alive = rows.row_ids[keep], rows.alive[keep]
    rows.tokens, rows.lengths, rows.codes = rows.tokens[keep], rows.lengths[keep], rows.codes[keep]
    if rows.logprobs is not None:
        rows.logprobs = rows.logprobs[keep]
    if rows.steps_done is not None:
        rows.steps_done = rows.steps_done[keep]
    batch.position, batch.mask2d = batch.position[keep], batch.mask2d[keep]
    if batch.mask4d is not None:
        batch.mask4d = batch.mask4d[keep]


def step(sampler: Sampler, batch: Batch, tokens: torch.Tensor, t: int) -> None:
    """Feed the ``t``-th generated token of every row through the model; ``batch.logits`` become the next ones."""
    if batch.decoder is not None:
        batch.logits = batch.decoder.step(tokens)
        return
    kv_length = batch.width + t + 1
    if not batch.padded:
        step_mask = None
    elif batch.mask4d is not None:
        step_mask = batch.mask4d[..., :kv_length]
    else:
        step_mask = batch.mask2d[:, :kv_length]
    kwargs: dict[str, Any] = {sampler._cache_kw: batch.cache, "use_cache": True}
    out = sampler.model(input_ids=tokens[:, None], attention_mask=step_mask, position_ids=batch.position, **kwargs)
    batch.logits = out.logits[:, -1, :]
    del out
    batch.position = batch.position + 1


def _decode_rows(sampler: Sampler, batch: Batch, n_rows: int, request: Request, generator: torch.Generator) -> Rows:
    """The token loop over an expanded batch: sample, record, stop, compact, step; the call's rows."""
    device, max_new_tokens = sampler.device, request.max_new_tokens
    # The call's rows; the loop's own rows are these very tensors until the first compaction, copies after it.
    out = Rows(
        tokens=torch.full((n_rows, max_new_tokens), sampler.pad_id, dtype=torch.long, device=device),
        lengths=torch.zeros(n_rows, dtype=torch.long, device=device),
        codes=torch.zeros(n_rows, dtype=torch.long, device=device),
        logprobs=torch.zeros((n_rows, max_new_tokens), device=device) if request.return_logprobs else None,
        steps_done=torch.zeros(n_rows, dtype=torch.long, device=device) if request.max_steps else None,
        row_ids=torch.arange(n_rows, device=device),
        alive=torch.ones(n_rows, dtype=torch.bool, device=device),
    )
    rows = Rows(**vars(out))
    compacted = False
    kernel = native.load() if sampler.native and device.type == "cpu" else None  # compiled sampling
    table, exact = sampler._delimiter_table(request.delimiter) if request.max_steps else (None, True)
    fused = kernel is not None and exact  # the compiled record-and-stop (a multi-token delimiter stays here)
    compiled_draw = fused and request.temperature > 0 and request.top_p >= 1.0  # and sample_rows' draws too
    for t in range(max_new_tokens):
        state = (t, rows.tokens, rows.lengths, rows.codes, rows.alive, sampler.is_eos)
        steps = (rows.steps_done, table, request.max_steps or 0)
        if compiled_draw:
            tokens, n_alive = kernel.sample_and_record(
                batch.logits, generator, float(request.temperature), *state, rows.logprobs, *steps
            )
        elif fused:
            tokens = sample_tokens(batch.logits, request.temperature, request.top_p, generator)
            n_alive = kernel.record_rows(tokens, *state, batch.logits, rows.logprobs, *steps)
        else:
            tokens = sample_tokens(batch.logits, request.temperature, request.top_p, generator, kernel)
            rows.tokens[:, t] = tokens
            if rows.logprobs is not None:
                rows.logprobs[:, t] = token_logprobs(batch.logits, tokens)
            rows.lengths += rows.alive
            stop(sampler, rows, tokens, request)
            n_alive = int(rows.alive.sum())  # the one host sync per token
        if n_alive == 0 or t == max_new_tokens - 1:
            break
        n_now = rows.alive.shape[0]
        stale = n_now - n_alive
        if stale and stale >= sampler.compact_fraction * n_now:
            # Drop finished rows once enough of the batch is dead weight (the plain paths copy their KV).
            if compacted:
                rows.write_to(out)
            compacted = True  # until the first drop, the loop's tensors are the call's own (nothing to write)
            keep = rows.alive.nonzero().squeeze(-1)
            compact(rows, batch, keep)
            tokens = tokens[keep]
        step(sampler, batch, tokens, t)
    if compacted:
        rows.write_to(out)
    return out


@torch.inference_mode()
def decode_batch(
    sampler: Sampler,
    prompts: list[list[int]],
    counts: list[int],
    request: Request,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[str], list[list[float]] | None, int]:
    """Decode ``counts[k]`` samples of ``prompts[k]`` together, every draw from ``generator`` (default: the
    sampler's).

    Returns per-row token ids, stop reasons and log-probs (or ``None``), and the prompt tokens prefilled.
    """
    device, max_new_tokens = sampler.device, request.max_new_tokens
    generator = sampler.generator if generator is None else generator
    counts_t = torch.tensor(counts, device=device)
    if not sampler.share_prefix:
        # Unshared: every sample prefills its own copy of the prompt.
        prompts = [ids for ids, count in zip(prompts, counts) for _ in range(count)]
        counts_t = torch.ones(len(prompts), dtype=torch.long, device=device)
    n_rows = int(counts_t.sum())
    batch = prefill(sampler, prompts, counts_t, max_new_tokens)
    buffers = sampler._take_buffers()
    try:
        expand(sampler, batch, max_new_tokens, buffers)
        out = _decode_rows(sampler, batch, n_rows, request, generator)
    finally:
        batch.decoder = None  # nothing may write to the buffers once they are back in the sampler's pool
        sampler._give_buffers(buffers)

    lengths = out.lengths.tolist()
    generated = out.tokens.tolist()
    ids = [generated[r][: lengths[r]] for r in range(n_rows)]
    reason_names = {RUNNING: STOP_LENGTH, STOPPED_EOS: STOP_EOS, STOPPED_STEPS: request.step_reason}
    reasons = [reason_names[code] for code in out.codes.tolist()]
    row_logprobs = None
    if out.logprobs is not None:
        logprob_list = out.logprobs.tolist()
        row_logprobs = [logprob_list[r][: lengths[r]] for r in range(n_rows)]
    return ids, reasons, row_logprobs, sum(len(ids) for ids in prompts)
