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
* **reproducible**: every draw comes from the sampler's seeded ``torch.Generator``;
* **multi-core**: with ``threads > 1`` the call's rows are split into that many batches, decoded concurrently
  (one thread each, the intra-op threads shared out), each batch drawing from its own generator seeded from the
  sampler's, so the samples depend on the seed and ``threads`` but not on how the threads are scheduled.

The parts live next to it: the call front and records in :mod:`pavlit.policy.records`, the sampling maths in
:mod:`pavlit.policy.sampling`, the decode loop in :mod:`pavlit.policy.decode` (with :mod:`~pavlit.policy.kv_cache`
and :mod:`~pavlit.policy.fast_decode`), and the vLLM engine in :mod:`pavlit.policy.vllm_sampler`; their public
names are importable from here as before.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pavlit.policy.decode import decode_batch, forward_kwargs, plan
from pavlit.policy.fast_decode import SUPPORTED_ARCHITECTURES, CacheBuffers, DecodeWeights, supports_fast_decode
from pavlit.policy.records import (
    STOP_DELIMITER,
    STOP_EOS,
    STOP_LENGTH,
    STOP_MAX_STEPS,
    Request,
    SamplerCalls,
    SamplerOutput,
    cut_after,
)
from pavlit.policy.sampling import sample_tokens
from pavlit.policy.vllm_sampler import VLLM_INSTALL_HINT, VLLMSampler
from pavlit.steps import pad_id_of

__all__ = [
    "STOP_DELIMITER",
    "STOP_EOS",
    "STOP_LENGTH",
    "STOP_MAX_STEPS",
    "VLLM_INSTALL_HINT",
    "Request",
    "Sampler",
    "SamplerOutput",
    "VLLMSampler",
    "cut_after",
    "sample_tokens",
]


class Sampler(SamplerCalls):
    """Batched, KV-cached, step-aware sampling from a Hugging Face causal LM.

    The calls, :meth:`complete` and :meth:`next_step`, are :class:`~pavlit.policy.records.SamplerCalls`'; this
    class holds the model-side state the decode loop (:func:`pavlit.policy.decode.decode_batch`) reads.

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
        delimiter: Default step delimiter (docs/method.md §1: a step is a line).
        share_prefix: Prefill each prompt once and expand its KV cache ``n`` times (same distribution as
            ``n`` independent prefills, fewer FLOPs).
        device: Where to run; default: the model's device.
        fast_decode: Decode with :class:`~pavlit.policy.fast_decode.GroupedDecoder` (plain-torch layers, one
            KV copy per prompt shared by its samples) instead of the model's Hugging Face forward. ``None``
            (default): whenever the model's architecture is supported; ``False``: never.
        threads: Batches decoded at once, each in its own thread, the call's intra-op threads shared out among
            them (``torch.get_num_threads() // threads`` each, restored after the call). A small model's decode
            step is too small for intra-op parallelism to help, so on a CPU with ``c`` cores ``threads=c`` is the
            fast setting (see the README's sampler table); a call's rows are then split into at least
            ``threads`` batches. A model of 100M+ parameters is faster with 1: each batch streams all the
            weights every step. Part of the seeding: another value gives other (equally distributed) samples.
        native: Let the grouped decoder run its layers as one compiled call per token, and draw CPU tokens
            without top-p with its compiled sampling (:mod:`pavlit.policy.native`: the step for float32 on CPU,
            built once with the machine's C++ compiler; same tokens, log-probs to float32 rounding). ``False``,
            or ``PAVLIT_NATIVE=0``: plain torch only.

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
        threads: int = 1,
        native: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._set_defaults(temperature, top_p, max_new_tokens, delimiter)
        self.max_batch = max_batch
        self.threads = threads
        self.native = native
        self.share_prefix = share_prefix
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

        self.pad_id = pad_id_of(tokenizer)
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.vocab_size = max(len(tokenizer), model.get_output_embeddings().weight.shape[0])
        self.is_eos = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.is_eos[list(self.eos_ids)] = True
        self._cache_kw, self._keep_kw = forward_kwargs(model)
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
        self._concurrent = True  # threads > 1 decodes its batches in threads (False: in order, same samples)
        self._lock = threading.Lock()  # lazily built state and the tokenizer, when batches decode in threads
        self._free_buffers: list[CacheBuffers] = []  # cache memory of finished batches, for the next ones

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

    def _take_buffers(self) -> CacheBuffers:
        """Cache memory for one batch's decoder: a finished batch's, or new (:class:`CacheBuffers`)."""
        with self._lock:
            return self._free_buffers.pop() if self._free_buffers else CacheBuffers()

    def _give_buffers(self, buffers: CacheBuffers) -> None:
        """Return a batch's cache memory once its decoder is done with it."""
        with self._lock:
            self._free_buffers.append(buffers)

    def _delimiter_table(self, delimiter: str) -> tuple[torch.Tensor, bool]:
        """Per-token delimiter counts (exact) or candidate flags, and whether the counts are exact.

        For a one-character delimiter, the number of delimiters in a decoded text is the sum over its tokens of
        the count in each token's own text, so the stop test runs on the device. A longer delimiter can span
        tokens; then the table flags tokens containing its last character (the token that completes an
        occurrence must contain it) and the sampler confirms on the decoded text of just those rows.
        """
        table = self._delimiter_tables.get(delimiter)
        if table is None:
            with self._lock:
                table = self._build_delimiter_table(delimiter)
        return table

    def _build_delimiter_table(self, delimiter: str) -> tuple[torch.Tensor, bool]:
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

    def _run(self, prompts: Sequence[str], request: Request) -> SamplerOutput:
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not one string")
        n = request.n
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if request.seed is not None:
            self.generator.manual_seed(request.seed)
        if not prompts:
            return SamplerOutput([], [], [], [], 0, 0, [] if request.return_logprobs else None)

        encoded = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        if any(len(ids) == 0 for ids in encoded):
            raise ValueError("a prompt encodes to zero tokens and the tokenizer adds no <bos>: nothing to condition on")
        token_ids: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
        reasons: list[list[str]] = [[STOP_LENGTH] * n for _ in prompts]
        logprobs: list[list[list[float]]] = [[[] for _ in range(n)] for _ in prompts]
        prompt_tokens = 0
        sample_cursor = [0] * len(prompts)
        batches = plan(encoded, n, self.max_batch, parts=self.threads)
        for batch, (rows_ids, rows_reasons, rows_logprobs, batch_prompt_tokens) in zip(
            batches, self._decode_all(encoded, batches, request)
        ):
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
                    text = cut_after(text, request.delimiter, request.max_steps or 1)
                per_prompt.append(text)
            texts.append(per_prompt)
        finished = [[reason == STOP_EOS for reason in per_prompt] for per_prompt in reasons]
        generated = sum(len(ids) for ids in flat_ids)
        return SamplerOutput(
            texts, finished, reasons, token_ids, generated, prompt_tokens, logprobs if request.return_logprobs else None
        )

    def _decode_all(self, encoded: list[list[int]], batches: list, request: Request) -> list:
        """:func:`decode_batch` of every batch: in order from the sampler's generator with ``threads=1``;
        otherwise concurrently, each batch from its own generator seeded (in batch order) from the sampler's."""

        def decode(batch: list, generator: torch.Generator) -> tuple:
            prompts = [encoded[job.prompt_index] for job in batch]
            return decode_batch(self, prompts, [job.count for job in batch], request, generator)

        if self.threads == 1:
            return [decode(batch, self.generator) for batch in batches]
        seeds = torch.randint(0, 2**62, (len(batches),), generator=self.generator, device=self.device).tolist()
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        if self._fast_decode:
            with self._lock:  # build (or rebuild after a weight update) once, before the threads read it
                self._decode_weights = (self._decode_weights or DecodeWeights(self.model)).current()
        if request.max_steps:
            self._delimiter_table(request.delimiter)
        if not self._concurrent:  # the same batches and generators, one after another (tests compare the two)
            return [decode(batch, generator) for batch, generator in zip(batches, generators)]
        workers = min(self.threads, len(batches))
        intra_op = torch.get_num_threads()
        torch.set_num_threads(max(1, intra_op // workers))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pavlit-decode") as pool:
                return list(pool.map(decode, batches, generators))
        finally:
            torch.set_num_threads(intra_op)

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
            with self._lock:  # fast tokenizers refuse concurrent use ("Already borrowed")
                text = self.tokenizer.decode(generated[row, : int(gen_lengths[row])].tolist(), skip_special_tokens=True)
            if text.count(delimiter) >= target:
                hit[row] = True
        return hit
