"""bitsandbytes 4-bit / 8-bit loading: :func:`quantization_config`, :func:`from_pretrained_kwargs` and
:func:`load_quantized`, plus which 4-bit CPU kernel each layer runs (:func:`cpu_4bit_kernels`) and
:func:`quantized_bits`.

Which 4-bit CPU kernel runs. bitsandbytes (>= 0.49) has two CPU paths for 4-bit layers: a generic one that
dequantises the weight for each matmul (in ``compute_dtype``), and, on CPUs with AVX512-BF16 (``has_avx512bf16()``,
e.g. Sapphire Rapids and later Xeons), a fused kernel that the layer switches to on its first inference forward by
repacking its weight *in place* into another layout. That kernel computes in bfloat16, is inference-only (a layer
repacked once fails in the next training forward, and bitsandbytes' way back to the normal layout rounds the
quantization constants to bfloat16), and its layout needs the input width to be a multiple of the 4-bit block size
(64) and the output width a multiple of 32 (smaller layers crash while repacking). So pavlit decides per layer
(:func:`cpu_4bit_kernels`): a model being trained (:func:`~pavlit.models.lora.apply_lora`,
``load_adapter(trainable=True)``) uses
the generic kernel everywhere; a model loaded for inference (:func:`load_quantized`) uses the fused kernel where
bitsandbytes offers it, ``compute_dtype`` is ``bfloat16`` and the layer's shape fits, and the generic one
elsewhere, with one log line saying how many layers took which. (Measured with bitsandbytes 0.50.2 on a
Sapphire Rapids core, nf4, a 4-layer 1024-wide Llama: the fused kernel is 4.9x faster than the generic one for a
one-token decode step and 2.1x for 8 rows, but 6x slower for 4 x 128 tokens at once, so pavlit's verifiers, which
score whole prefixes, lose nothing by training and scoring on the generic kernel.)

bitsandbytes is the ``quant`` extra and is imported only when quantization is used.
"""

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pavlit._optional import require
from pavlit.models.adapter_args import QuantArgs

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

__all__ = ["cpu_4bit_kernels", "from_pretrained_kwargs", "load_quantized", "quantization_config", "quantized_bits"]

log = logging.getLogger(__name__)

# Output rows per tile of bitsandbytes' AVX512-BF16 4-bit CPU layout (``_convert_weight_packed_for_cpu``'s block_n).
_CPU_PACK_BLOCK_N = 32


def quantization_config(quant: QuantArgs, skip_modules: Sequence[str] | None = None) -> "BitsAndBytesConfig | None":
    """The ``transformers.BitsAndBytesConfig`` for ``quant``, or None when ``quant.mode == "none"``.

    Args:
        quant: The quantization group.
        skip_modules: Module names to leave unquantized (e.g. a value head that is part of the loaded model).
            When None, transformers keeps its default (the output embedding stays unquantized).

    Raises:
        ImportError: bitsandbytes is not installed ("pip install 'pavlit[quant]'").
    """
    if not quant.enabled:
        return None
    require("bitsandbytes", extra="quant")
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules) if skip_modules is not None else None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_compute_dtype=quant.torch_compute_dtype,
        bnb_4bit_use_double_quant=quant.double_quant,
        llm_int8_skip_modules=skip,
    )


def _default_device() -> str:
    # One full model per process: under DDP each rank loads onto its own GPU, never device_map="auto".
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def from_pretrained_kwargs(
    quant: QuantArgs,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    skip_modules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The keyword arguments for ``from_pretrained`` that realise ``quant`` (the one place they are built).

    Args:
        quant: The quantization group.
        device: Where the whole model goes (``device_map={"": device}``); default ``cuda:$LOCAL_RANK`` when CUDA
            is available, else ``cpu``. Only used when quantizing (bitsandbytes places weights while loading).
        dtype: dtype of the unquantized weights; default ``quant.compute_dtype`` when quantizing, else left to
            transformers (the checkpoint's dtype rules).
        skip_modules: See :func:`quantization_config`.
    """
    kwargs: dict[str, Any] = {}
    config = quantization_config(quant, skip_modules)
    if config is not None:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": str(device) if device is not None else _default_device()}
        dtype = dtype if dtype is not None else quant.torch_compute_dtype
    if dtype is not None:
        kwargs[_dtype_kwarg()] = dtype
    return kwargs


def _dtype_kwarg() -> str:
    # transformers 4.56 renamed ``torch_dtype`` to ``dtype``; the old name warns on 5.x.
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_quantized(
    path: str | os.PathLike,
    quant: QuantArgs,
    model_class: type | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    skip_modules: Sequence[str] | None = None,
    **from_pretrained: Any,
) -> "PreTrainedModel":
    """Load a local Hugging Face model folder, quantized as ``quant`` says (plain load when ``mode == "none"``).

    bitsandbytes quantizes while loading, so a model built in code (the tiny from-scratch policy) has to be
    saved with ``save_pretrained`` and loaded back through here to be quantized.

    Args:
        path: A folder written by ``save_pretrained``.
        quant: The quantization group.
        model_class: The class whose ``from_pretrained`` is called; default ``AutoModelForCausalLM``.
        device: See :func:`from_pretrained_kwargs`.
        dtype: See :func:`from_pretrained_kwargs`.
        skip_modules: See :func:`quantization_config`.
        **from_pretrained: Passed through to ``from_pretrained`` (override the computed kwargs).

    Returns:
        The loaded model, in eval mode as transformers returns it.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs = from_pretrained_kwargs(quant, device=device, dtype=dtype, skip_modules=skip_modules)
    kwargs.update(from_pretrained)
    kwargs.pop("local_files_only", None)
    # A folder, never a Hub name: nothing is downloaded, so no remote code can arrive.
    model = model_class.from_pretrained(str(path), local_files_only=True, **kwargs)
    if quant.enabled:
        log.info("Loaded %s with %s quantization (%d-bit)", path, quant.mode, quant.bits)
        _select_cpu_4bit_kernels(model, training=False)
    return model


def _linear4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__module__.startswith("bitsandbytes") and hasattr(module, "support_avx512bf16_for_cpu")
    ]


def _is_cpu_packed(module: nn.Module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def _fused_kernel_obstacle(module: nn.Module) -> str | None:
    """Why bitsandbytes' AVX512-BF16 CPU kernel cannot serve this 4-bit layer, or None when it can."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return "its weight is not quantized yet"
    if module.compute_dtype != torch.bfloat16:
        return f"compute_dtype is {str(module.compute_dtype).removeprefix('torch.')} (the kernel computes in bfloat16)"
    out_features, in_features = (int(n) for n in state.shape)
    if in_features % state.blocksize:
        return f"input width {in_features} is not a multiple of the 4-bit block size {state.blocksize}"
    if out_features % _CPU_PACK_BLOCK_N:
        return f"output width {out_features} is not a multiple of {_CPU_PACK_BLOCK_N}"
    return None


def _select_cpu_4bit_kernels(model: nn.Module, training: bool) -> None:
    """Turn bitsandbytes' in-place AVX512-BF16 repacking off where it cannot work (see the module docstring).

    bitsandbytes sets ``support_avx512bf16_for_cpu`` on each ``Linear4bit`` from ``has_avx512bf16()``; this only
    ever switches it off: for every layer when ``training``, and for the layers whose dtype or shape the fused
    kernel does not take otherwise.

    Raises:
        ValueError: ``training`` and a layer has already been repacked by an inference forward.
    """
    offered = [(name, m) for name, m in _linear4bit_layers(model) if m.support_avx512bf16_for_cpu]
    if not offered:
        return
    # The flag only matters for CPU inputs, but it is switched off on every layer (a model may move to the CPU
    # later); only a model on the CPU logs the choice.
    on_cpu = any(m.weight.device.type == "cpu" for _, m in offered)
    if training:
        packed = [name for name, m in offered if _is_cpu_packed(m)]
        if packed:
            raise ValueError(
                f"{len(packed)} 4-bit layers (e.g. {packed[0]!r}) were already run for inference in bitsandbytes' "
                "AVX512-BF16 CPU layout, which cannot be trained nor converted back exactly; load the model again "
                "with pavlit.models.adapters.load_quantized before training it"
            )
        for _, module in offered:
            module.support_avx512bf16_for_cpu = False
        if on_cpu:
            log.info(
                "4-bit training on CPU: all %d layers use bitsandbytes' generic kernel (its AVX512-BF16 kernel is "
                "inference-only)",
                len(offered),
            )
        return
    refused = []
    for name, module in offered:
        reason = None if _is_cpu_packed(module) else _fused_kernel_obstacle(module)
        if reason is not None:
            module.support_avx512bf16_for_cpu = False
            refused.append((name, reason))
    if not on_cpu:
        return
    if refused:
        name, reason = refused[0]
        log.info(
            "4-bit inference on CPU: %d of %d layers use bitsandbytes' AVX512-BF16 kernel, %d its generic kernel "
            "(e.g. %s: %s)",
            len(offered) - len(refused),
            len(offered),
            len(refused),
            name,
            reason,
        )
    else:
        log.info("4-bit inference on CPU: all %d layers use bitsandbytes' AVX512-BF16 kernel", len(offered))


def cpu_4bit_kernels(model: nn.Module) -> dict[str, str]:
    """Which bitsandbytes CPU kernel each 4-bit layer of ``model`` on the CPU runs: ``"avx512-bf16"`` or
    ``"generic"`` (layers on another device are left out).

    ``"avx512-bf16"`` means the layer's weight is, or will be at its first inference forward, repacked for
    bitsandbytes' fused AVX512-BF16 kernel; every layer of a model being trained is ``"generic"``.
    """
    return {
        name: "avx512-bf16" if module.support_avx512bf16_for_cpu or _is_cpu_packed(module) else "generic"
        for name, module in _linear4bit_layers(model)
        if module.weight.device.type == "cpu"
    }


def quantized_bits(model: nn.Module) -> int | None:
    """4 or 8 when ``model`` holds bitsandbytes quantized linear layers, else None (detected from the modules)."""
    bits = None
    for module in model.modules():
        if not type(module).__module__.startswith("bitsandbytes"):
            continue
        name = type(module).__name__
        if name.startswith("Linear4bit") or name in ("LinearFP4", "LinearNF4"):
            return 4
        if name.startswith("Linear8bit"):
            bits = 8
    return bits
