"""LoRA and 4-bit / 8-bit quantization: typed option groups mapped to peft and bitsandbytes in one place.

Every module that can train or load a language model (the policy loader, SFT, the PAV and ORM verifiers,
RL) takes the same two groups, :class:`LoRAArgs` and :class:`QuantArgs`, and goes through the functions here,
so that "what does ``quant.mode: nf4`` mean" has one answer:

1. :func:`check_compatible` rejects contradictory combinations (with the trainer's precision) up front,
   with a message that says what to change, instead of a peft / bitsandbytes / autograd error mid-run.
2. :func:`load_quantized` (kwargs from :func:`from_pretrained_kwargs` and :func:`quantization_config`)
   loads a Hugging Face model with bitsandbytes quantization.
3. :func:`apply_lora` wraps it with peft; scoring heads passed as ``modules_to_save`` train fully.
4. :func:`save_adapter` / :func:`load_adapter` write and read only the adapter (safetensors).

Which 4-bit CPU kernel runs. bitsandbytes (>= 0.49) has two CPU paths for 4-bit layers: a generic one that
dequantises the weight for each matmul (in ``compute_dtype``), and, on CPUs with AVX512-BF16 (``has_avx512bf16()``,
e.g. Sapphire Rapids and later Xeons), a fused kernel that the layer switches to on its first inference forward by
repacking its weight *in place* into another layout. That kernel computes in bfloat16, is inference-only (a layer
repacked once fails in the next training forward, and bitsandbytes' way back to the normal layout rounds the
quantization constants to bfloat16), and its layout needs the input width to be a multiple of the 4-bit block size
(64) and the output width a multiple of 32 (smaller layers crash while repacking). So pavlit decides per layer
(:func:`cpu_4bit_kernels`): a model being trained (:func:`apply_lora`, ``load_adapter(trainable=True)``) uses
the generic kernel everywhere; a model loaded for inference (:func:`load_quantized`) uses the fused kernel where
bitsandbytes offers it, ``compute_dtype`` is ``bfloat16`` and the layer's shape fits, and the generic one
elsewhere, with one log line saying how many layers took which. (Measured with bitsandbytes 0.50.2 on a
Sapphire Rapids core, nf4, a 4-layer 1024-wide Llama: the fused kernel is 4.9x faster than the generic one for a
one-token decode step and 2.1x for 8 rows, but 6x slower for 4 x 128 tokens at once, so pavlit's verifiers, which
score whole prefixes, lose nothing by training and scoring on the generic kernel.)

How a verifier keeps its head fully trainable. A verifier is a backbone plus a small scoring head. Either

* apply LoRA to the backbone alone and keep the head outside the peft model (the head then trains like any
  parameter of the LightningModule, and Lightning's checkpoint holds it), or
* wrap the whole ``nn.Module`` and name the head's attribute path, e.g.
  ``apply_lora(verifier, lora, quant, modules_to_save=["value_head"])``: peft then trains a full copy of the
  head and :func:`save_adapter` stores it beside the LoRA weights, so the adapter folder alone restores the
  verifier. A name matches a module whose dotted path is, or ends with, ``.`` + that name. Do not call the
  attribute plain ``head`` next to a causal LM: peft matches these names by string suffix, so ``head`` would
  also fully train ``lm_head`` (:func:`apply_lora` refuses such a name).

Either way the head must not be quantized: :func:`load_quantized` only quantizes the model it loads, and
:func:`apply_lora` rejects a ``modules_to_save`` module that holds bitsandbytes weights.

peft is a core dependency; bitsandbytes is the ``quant`` extra and is imported only when quantization is used.
"""

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from pavlit._optional import require

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

__all__ = [
    "LoRAArgs",
    "QuantArgs",
    "apply_lora",
    "check_compatible",
    "count_parameters",
    "cpu_4bit_kernels",
    "from_pretrained_kwargs",
    "load_adapter",
    "load_quantized",
    "quantization_config",
    "quantized_bits",
    "save_adapter",
]

log = logging.getLogger(__name__)

_LORA_BIAS = ("none", "all", "lora_only")
_QUANT_MODES = ("none", "nf4", "fp4", "int8")
_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Output rows per tile of bitsandbytes' AVX512-BF16 4-bit CPU layout (``_convert_weight_packed_for_cpu``'s block_n).
_CPU_PACK_BLOCK_N = 32
# Lightning's shorthand precision values, spelled out the way Lightning itself resolves them.
_PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


@dataclass
class LoRAArgs:
    """Low-rank adapters (peft ``LoraConfig``).

    Args:
        enabled: Wrap the model with LoRA adapters; when False the model trains (or is used) as is.
        r: Rank of the low-rank update.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input, in ``[0, 1)``.
        target_modules: Module names (or a regex over full dotted names) that get adapters; ``"all-linear"``
            means every linear layer except a language model's output layer and any ``modules_to_save``.
        bias: Which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (those of adapted layers).
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAArgs.r must be a positive integer (the adapter rank), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int) or self.alpha <= 0:
            raise ValueError(
                f"LoRAArgs.alpha must be a positive integer (the update is scaled by alpha / r), got {self.alpha!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAArgs.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in _LORA_BIAS:
            raise ValueError(f"LoRAArgs.bias must be one of {_LORA_BIAS}, got {self.bias!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("LoRAArgs.target_modules must not be empty; use 'all-linear' or a list of names")
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise ValueError(
                    f"LoRAArgs.target_modules must be 'all-linear', a regex, or a non-empty list of module names, "
                    f"got {self.target_modules!r}"
                )


@dataclass
class QuantArgs:
    """bitsandbytes weight quantization applied when a model is loaded (needs ``pip install 'pavlit[quant]'``).

    Args:
        mode: ``"none"``, 4-bit ``"nf4"`` / ``"fp4"`` (QLoRA), or 8-bit ``"int8"`` (LLM.int8()).
        compute_dtype: dtype the 4-bit layers dequantize to for their matmuls, and the dtype of the layers left
            unquantized when loading. ``float16`` is for GPUs without bfloat16 (T4, V100). For ``int8``
            bitsandbytes always multiplies in float16 and only the unquantized layers follow this.
        double_quant: Also quantize the 4-bit quantization constants (saves ~0.4 bit per weight); 4-bit only,
            ignored for ``int8``.
    """

    mode: Literal["none", "nf4", "fp4", "int8"] = "none"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _QUANT_MODES:
            raise ValueError(f"QuantArgs.mode must be one of {_QUANT_MODES}, got {self.mode!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"QuantArgs.compute_dtype must be one of {_COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantArgs.double_quant must be a bool, got {self.double_quant!r}")

    @property
    def enabled(self) -> bool:
        """Whether any quantization is requested."""
        return self.mode != "none"

    @property
    def bits(self) -> int | None:
        """4, 8, or None when not quantized."""
        return {"none": None, "int8": 8}.get(self.mode, 4)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        """``compute_dtype`` as a ``torch.dtype``."""
        return getattr(torch, self.compute_dtype)


def _normalize_precision(precision: str | int | None) -> str | None:
    if precision is None:
        return None
    text = str(precision)
    return _PRECISION_ALIASES.get(text, text)


def check_compatible(
    lora: LoRAArgs,
    quant: QuantArgs,
    precision: str | int | None = None,
    training: bool = True,
    accelerator: str | None = None,
) -> None:
    """Reject combinations of LoRA, quantization and trainer precision that cannot work, before loading anything.

    Each rule is something peft, bitsandbytes or Lightning would otherwise refuse late, or silently do
    differently from what the config says:

    * training a 4/8-bit model without LoRA: quantized weights carry no gradient, so "fine-tuning" would only
      move the few unquantized tensors (norms, embeddings);
    * ``64-true`` or ``transformer-engine`` precision with quantization: the first asks for float64 matmuls
      that the 4/8-bit layers never do, the second swaps the same linear layers for its own;
    * ``16-mixed`` with quantization on CPU: CPU AMP has no float16 (Lightning quietly switches to
      ``bf16-mixed``), and the bitsandbytes 8-bit backward fails under CPU float16 autocast;
    * a float16 precision with a bfloat16 ``compute_dtype`` or the reverse: two different 16-bit formats, the
      4-bit matmuls and the rest of the network would disagree on the activation dtype.

    Args:
        lora: The LoRA group.
        quant: The quantization group.
        precision: The Lightning ``Trainer(precision=...)`` value, or None when unknown (precision rules skipped).
        training: Whether the model will be trained (False for sampling, labelling, scoring).
        accelerator: ``"cpu"``, ``"gpu"``/``"cuda"``, ... or None when unknown (device rules skipped).

    Raises:
        ValueError: naming the conflicting fields and what to change.
    """
    if not quant.enabled:
        return
    if training and not lora.enabled:
        raise ValueError(
            f"quant.mode={quant.mode!r} with training but lora.enabled=False: quantized weights cannot be "
            "fine-tuned directly. Set lora.enabled=true (QLoRA) or quant.mode='none' for full fine-tuning."
        )
    resolved = _normalize_precision(precision)
    if resolved is None:
        return
    if resolved.startswith("64") or resolved.startswith("transformer-engine"):
        raise ValueError(
            f"precision={precision!r} cannot be combined with quant.mode={quant.mode!r}: bitsandbytes layers "
            "compute in their own 16/32-bit dtype. Use precision '32-true', 'bf16-mixed' or 'bf16-true', or "
            "quant.mode='none'."
        )
    if resolved == "16-mixed" and accelerator == "cpu":
        raise ValueError(
            f"precision={precision!r} with quant.mode={quant.mode!r} on CPU: CPU mixed precision has no float16 "
            "(Lightning would switch to bf16-mixed) and bitsandbytes' 8-bit backward fails under CPU float16 "
            "autocast. Use precision='bf16-mixed' (or '32-true') on CPU."
        )
    if quant.bits == 4:
        half = "float16" if resolved.startswith("16") else "bfloat16" if resolved.startswith("bf16") else None
        if half is not None and quant.compute_dtype != "float32" and quant.compute_dtype != half:
            raise ValueError(
                f"precision={precision!r} computes in {half} but quant.compute_dtype={quant.compute_dtype!r}: the "
                f"4-bit layers and the rest of the model would use two different 16-bit formats. Set "
                f"quant.compute_dtype={half!r} or choose a precision that matches {quant.compute_dtype!r}."
            )


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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, counting packed 4-bit weights as the values they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            # Two 4-bit values per byte of storage.
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _module_matches(path: str, name: str) -> bool:
    return path == name or path.endswith(f".{name}")


def _nested_output_layers(model: nn.Module) -> list[str]:
    """Dotted paths of the output embedding of every Hugging Face model nested inside ``model``.

    peft's "all-linear" skips the output layer only when the wrapped model itself is a ``PreTrainedModel``;
    a verifier that holds one as a backbone would otherwise get an adapter on its (often unused) LM head.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return []
    paths = []
    for path, module in model.named_modules():
        if path and isinstance(module, PreTrainedModel):
            output = module.get_output_embeddings()
            if output is not None:
                paths += [f"{path}.{sub}" for sub, m in module.named_modules() if m is output and sub]
    return paths


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf_model is None:
        raise ValueError(f"gradient_checkpointing=True but {type(model).__name__} holds no Hugging Face model")
    # Non-reentrant checkpointing needs no ``enable_input_require_grads`` hack, so frozen embeddings are fine.
    checkpoint_kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is not the user's to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(
    model: nn.Module,
    lora: LoRAArgs,
    quant: QuantArgs | None = None,
    modules_to_save: Sequence[str] | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft), freezing everything except the adapters and ``modules_to_save``.

    A quantized model first goes through peft's ``prepare_model_for_kbit_training`` (freezes the base and
    upcasts its unquantized 16-bit tensors to float32 so that they are numerically safe for training).

    Args:
        model: A Hugging Face model, or any ``nn.Module`` holding one (e.g. a backbone plus a scoring head).
        lora: The LoRA group; when ``lora.enabled`` is False the model is returned unchanged.
        quant: The quantization group the model was loaded with; checked against the model's layers.
        modules_to_save: Names of modules that train fully and are saved with the adapter, e.g. a verifier's
            ``["value_head"]``. They never receive adapters themselves and must not be quantized.
        gradient_checkpointing: Turn on (non-reentrant) activation checkpointing in the Hugging Face model.

    Returns:
        A ``peft.PeftModel`` (or ``model`` unchanged when LoRA is disabled).

    Raises:
        ValueError: ``quant`` and the model disagree, or a module to save is quantized or missing.
    """
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    bits = quantized_bits(model)
    if quant is not None and quant.bits != bits:
        raise ValueError(
            f"quant.mode={quant.mode!r} but the model holds {f'{bits}-bit' if bits else 'no'} bitsandbytes layers; "
            "load it with pavlit.models.adapters.load_quantized(path, quant) using the same QuantArgs"
        )
    save = list(modules_to_save or [])
    named = dict(model.named_modules())
    for name in save:
        matches = [path for path in named if _module_matches(path, name)]
        if not matches:
            raise ValueError(f"modules_to_save entry {name!r} names no module of {type(model).__name__}")
        # peft picks modules to save by plain string suffix, so "head" would also fully train "backbone.lm_head".
        overmatched = [path for path in named if path.endswith(name) and path not in matches]
        if overmatched:
            raise ValueError(
                f"modules_to_save entry {name!r} would also make {overmatched} fully trainable (peft matches these "
                "names by plain suffix); give the head an attribute name no other module path ends with, such as "
                "'value_head' or 'score'"
            )
        for path in matches:
            if quantized_bits(named[path]) is not None:
                raise ValueError(
                    f"modules_to_save entry {name!r} ({path}) is quantized and cannot train fully; leave it out of "
                    "quantization (load_quantized(..., skip_modules=[...]))"
                )
    if bits is not None:
        _select_cpu_4bit_kernels(model, training=True)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    exclude = _nested_output_layers(model) if lora.target_modules == "all-linear" else []
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=save or None,
        exclude_modules=exclude or None,
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%d on %s%s: %d trainable of %d parameters (%.2f%%)",
        lora.r,
        lora.alpha,
        lora.target_modules,
        f" (+ full {save})" if save else "",
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return peft_model


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write only the adapter weights (and ``modules_to_save``) plus ``adapter_config.json`` as safetensors.

    Args:
        model: A model returned by :func:`apply_lora` with LoRA enabled.
        path: Output folder (created).

    Returns:
        The folder.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a peft model from apply_lora, got {type(model).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def load_adapter(base_model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Attach an adapter written by :func:`save_adapter` to a freshly loaded base model.

    The base must be the same architecture (and, for a verifier wrapper, the same module names) as when the
    adapter was trained; a quantized base comes from :func:`load_quantized`.

    Args:
        base_model: The base model, without adapters.
        path: The folder :func:`save_adapter` wrote.
        trainable: Keep training the adapter (and ``modules_to_save``); False loads it frozen for inference.

    Returns:
        A ``peft.PeftModel``.
    """
    from peft import PeftModel, prepare_model_for_kbit_training

    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json; write it with save_adapter")
    if trainable and quantized_bits(base_model) is not None:
        _select_cpu_4bit_kernels(base_model, training=True)
        prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    with _quiet_peft():
        return PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)
