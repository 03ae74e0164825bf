"""Which engine a job samples with, chosen in its config (``backend:``), injected like any other collaborator.

``pavlit label``, ``pavlit search`` and :class:`~pavlit.modules.policy_rl.PolicyRLModule` build their sampler through a
:class:`SamplerBackend`. The default, :class:`PavlitBackend`, is pavlit's own :class:`~pavlit.policy.sampler.Sampler`
(CPU or GPU, bit-reproducible under a seed); :class:`VLLMBackend` serves the same calls from vLLM on a GPU::

    backend:
      class_path: pavlit.policy.backends.VLLMBackend
      init_args: {dtype: bfloat16, gpu_memory_utilization: 0.5, tensor_parallel_size: 1}

Both return the same :class:`~pavlit.policy.sampler.SamplerOutput` records (a step ends at the task's delimiter,
token counts over the generated tokens, ``finished`` only at EOS); vLLM seeds every request, but its samples are
reproducible only best-effort (batch composition and GPU kernels can change them).
"""

from __future__ import annotations

import logging
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pavlit.policy.loading import Policy
from pavlit.policy.records import SamplingSettings
from pavlit.policy.sources import ModelSource

log = logging.getLogger(__name__)


class SamplerBackend(ABC):
    """Builds the sampler a job draws from: an object with ``complete``, ``next_step``, ``tokenizer``, ``device``."""

    @abstractmethod
    def build(self, policy: ModelSource | Policy, settings: SamplingSettings, device: torch.device | str) -> Any:
        """A sampler for ``policy``.

        Args:
            policy: A model source (label, search: the sampler owns its model) or a loaded ``Policy`` (RL: the
                sampler must follow the weights being trained; see :meth:`refresh`).
            settings: Temperature, budgets, the step delimiter.
            device: Where the job runs.
        """

    def refresh(self, sampler: Any, model: torch.nn.Module) -> None:  # noqa: B027 - a no-op for in-place samplers
        """Make ``sampler`` sample from ``model``'s current weights (RL calls this before each rollout batch)."""


class PavlitBackend(SamplerBackend):
    """pavlit's own :class:`~pavlit.policy.sampler.Sampler` (the default).

    Args:
        share_prefix: Prefill each prompt once for all its samples.
        fast_decode: Grouped decoder for Llama-architecture models (``None``: whenever supported).
        threads: Batches decoded concurrently, one thread each (``Sampler(threads=...)``); on a CPU, the cores
            one job has (e.g. ``2`` on 2 cores with one process). Part of the seeding, like ``max_batch``.
    """

    def __init__(self, share_prefix: bool = True, fast_decode: bool | None = None, threads: int = 1) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"PavlitBackend.threads must be an integer >= 1, got {threads!r}")
        self.share_prefix = share_prefix
        self.fast_decode = fast_decode
        self.threads = threads

    def build(self, policy: ModelSource | Policy, settings: SamplingSettings, device: torch.device | str) -> Any:
        from pavlit.policy.sampler import Sampler

        model, tokenizer = policy.load() if isinstance(policy, ModelSource) else policy
        return Sampler(
            model.to(device),
            tokenizer,
            share_prefix=self.share_prefix,
            device=device,
            fast_decode=self.fast_decode,
            threads=self.threads,
            **asdict(settings),
        )


class VLLMBackend(SamplerBackend):
    """vLLM (paged attention, prefix caching, ``n > 1`` sampling per request) behind the same sampler calls.

    vLLM loads a model folder itself: a source's :meth:`~pavlit.policy.sources.ModelSource.local_folder` when it
    has one, otherwise the loaded model (adapters merged) saved once to a temporary folder. In RL the engine's
    weights are replaced by the trained ones before every rollout batch and its prefix cache is reset.

    Args:
        dtype: Engine dtype (``bfloat16`` on GPUs; ``auto`` is pavlit's rule, bf16 on CUDA).
        gpu_memory_utilization: Fraction of GPU memory vLLM reserves (weights + KV cache). Leave room for the
            job's own models: verifiers in search, the trained policy, its reference and optimizer state in RL.
        tensor_parallel_size: GPUs one engine shards the model over.
        enable_prefix_caching: Reuse the KV of shared prefixes across requests (Monte-Carlo completions of one
            prefix, beam children).
        max_model_len: Context the engine reserves KV for (``None``: the model's).
        enforce_eager: Skip CUDA graph capture (faster start-up, slower decoding).
        max_num_seqs: Sequences vLLM schedules at once (``None``: the job's ``max_batch``).
        llm_kwargs: Anything else for ``vllm.LLM``.
    """

    def __init__(
        self,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        max_num_seqs: int | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMBackend.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"VLLMBackend.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.max_num_seqs = max_num_seqs
        self.llm_kwargs = dict(llm_kwargs or {})

    def build(self, policy: ModelSource | Policy, settings: SamplingSettings, device: torch.device | str) -> Any:
        from pavlit.policy.loading import resolve_dtype
        from pavlit.policy.vllm_sampler import VLLMSampler

        folder = policy.local_folder() if isinstance(policy, ModelSource) else None
        if folder is None:
            model, tokenizer = policy.load() if isinstance(policy, ModelSource) else policy
            folder = save_merged(model, tokenizer, Path(tempfile.mkdtemp(prefix="pavlit-vllm-")))
        dtype = self.dtype if self.dtype != "auto" else str(resolve_dtype("auto")).removeprefix("torch.")
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager,
            "max_num_seqs": self.max_num_seqs or settings.max_batch,
            **self.llm_kwargs,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        log.info("vLLM engine on %s (%s)", folder, ", ".join(f"{k}={v}" for k, v in kwargs.items()))
        return VLLMSampler(folder, settings, device=device, **kwargs)

    def refresh(self, sampler: Any, model: torch.nn.Module) -> None:
        sampler.load_weights(merged_state_dict(model))


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain (adapter-free) weights of ``model`` as a Hugging Face state dict; LoRA adapters merged in.

    A peft model has its adapters merged, the merged weights copied and the adapters unmerged again (the module's
    outputs change by float round-off only). A plain model's tensors are returned as they are, not copied.
    """
    if not hasattr(model, "merge_adapter"):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    model.merge_adapter()
    try:
        base = model.get_base_model()
        state = {
            name.replace(".base_layer.", "."): tensor.detach().clone()
            for name, tensor in base.state_dict().items()
            if "lora_" not in name
        }
    finally:
        model.unmerge_adapter()
    return state


def save_merged(model: torch.nn.Module, tokenizer: Any, folder: Path) -> str:
    """Save ``model`` (adapters merged) and ``tokenizer`` as a plain Hugging Face folder; returns its path."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    folder.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(folder, state_dict=merged_state_dict(model))
    tokenizer.save_pretrained(folder)
    return str(folder)


def backend_fingerprint(backend: SamplerBackend | None) -> dict[str, Any]:
    """``{"backend": ...}`` for a job's settings fingerprint, or ``{}`` for the default engine.

    A run made with the default keeps the fingerprint it had before backends existed, so it still resumes; any
    other engine (or engine setting) gives other samples and so another fingerprint.
    """
    if backend is None:
        return {}
    description = _description(backend)
    if description == _description(PavlitBackend()):
        return {}
    return {"backend": description}


def _description(backend: SamplerBackend) -> dict[str, Any]:
    description = {"class": f"{type(backend).__module__}.{type(backend).__qualname__}", **vars(backend)}
    if isinstance(backend, PavlitBackend) and backend.threads == 1:
        del description["threads"]  # one thread samples as before the setting existed: old runs still resume
    return description
