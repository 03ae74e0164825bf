"""The LoRA and quantization option groups, :class:`LoRAArgs` and :class:`QuantArgs`, and :func:`check_compatible`.

Every module that can train or load a language model takes these two groups; :func:`check_compatible` rejects
contradictory combinations (with the trainer's precision) up front, with a message that says what to change,
instead of a peft / bitsandbytes / autograd error mid-run. What the groups do is in
:mod:`pavlit.models.quantization` (loading with bitsandbytes) and :mod:`pavlit.models.lora` (peft).
"""

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["LoRAArgs", "QuantArgs", "check_compatible"]

_LORA_BIAS = ("none", "all", "lora_only")
_QUANT_MODES = ("none", "nf4", "fp4", "int8")
_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
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
