"""LoRA with peft: :func:`apply_lora` wraps a model (scoring heads passed as ``modules_to_save`` train fully),
:func:`save_adapter` / :func:`load_adapter` write and read only the adapter (safetensors), and
:func:`count_parameters`.

How a verifier keeps its head fully trainable. A verifier is a backbone plus a small scoring head. Either

* apply LoRA to the backbone alone and keep the head outside the peft model (the head then trains like any
  parameter of the LightningModule, and Lightning's checkpoint holds it), or
* wrap the whole ``nn.Module`` and name the head's attribute path, e.g.
  ``apply_lora(verifier, lora, quant, modules_to_save=["value_head"])``: peft then trains a full copy of the
  head and :func:`save_adapter` stores it beside the LoRA weights, so the adapter folder alone restores the
  verifier. A name matches a module whose dotted path is, or ends with, ``.`` + that name. Do not call the
  attribute plain ``head`` next to a causal LM: peft matches these names by string suffix, so ``head`` would
  also fully train ``lm_head`` (:func:`apply_lora` refuses such a name).

Either way the head must not be quantized: :func:`~pavlit.models.quantization.load_quantized` only quantizes
the model it loads, and :func:`apply_lora` rejects a ``modules_to_save`` module that holds bitsandbytes weights.

peft is a core dependency.
"""

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch import nn

from pavlit.models.adapter_args import LoRAArgs, QuantArgs
from pavlit.models.quantization import _select_cpu_4bit_kernels, quantized_bits

__all__ = ["apply_lora", "count_parameters", "load_adapter", "save_adapter"]

log = logging.getLogger(__name__)


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
