"""LoRA and 4-bit / 8-bit quantization in one import: re-exports the option groups and the functions that map
them to peft and bitsandbytes (``pavlit.models.adapters.LoRAArgs`` and friends keep working).

Every module that can train or load a language model (the policy loader, SFT, the PAV and ORM verifiers,
RL) takes the same two groups and goes through these functions, so that "what does ``quant.mode: nf4`` mean"
has one answer:

1. :func:`check_compatible` rejects contradictory combinations up front (:mod:`pavlit.models.adapter_args`,
   with :class:`LoRAArgs` and :class:`QuantArgs`).
2. :func:`load_quantized` loads a Hugging Face model with bitsandbytes quantization and picks each 4-bit layer's
   CPU kernel (:mod:`pavlit.models.quantization`).
3. :func:`apply_lora` wraps it with peft, scoring heads passed as ``modules_to_save`` train fully, and
   :func:`save_adapter` / :func:`load_adapter` write and read only the adapter (:mod:`pavlit.models.lora`).
"""

from pavlit.models.adapter_args import LoRAArgs, QuantArgs, check_compatible
from pavlit.models.lora import apply_lora, count_parameters, load_adapter, save_adapter
from pavlit.models.quantization import (
    cpu_4bit_kernels,
    from_pretrained_kwargs,
    load_quantized,
    quantization_config,
    quantized_bits,
)

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
