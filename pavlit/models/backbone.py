"""Verifier backbones: load a causal LM (LoRA / 4-bit as configured) from a model source, and the plain-typed
form of sources and option groups that checkpoints and exports carry.

A dict source read from a file is held to what a file may ask for (:func:`as_model_source`): one of pavlit's own
sources, never ``trust_remote_code``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from pavlit.models.adapters import LoRAArgs, QuantArgs, apply_lora, check_compatible, load_quantized
from pavlit.policy.sources import ModelSource, Pretrained

__all__ = [
    "SOURCE_FIELD",
    "SourceFromFile",
    "as_group",
    "as_model_source",
    "load_backbone",
    "model_source_classes",
    "source_to_dict",
]

SOURCE_FIELD = "model.init_args.source.init_args.path"


def source_to_dict(source: ModelSource) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a model source: plain types, as LightningCLI writes them."""
    cls = type(source)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {p: getattr(source, p) for p in params}}


class SourceFromFile(dict):
    """A ``{"class_path", "init_args"}`` model source read from a file (an export's ``pavlit_verifier.json``),
    remembering which file, so that :func:`as_model_source` can name it."""

    def __init__(self, source: Mapping[str, Any], origin: str) -> None:
        super().__init__(source)
        self.origin = origin


def model_source_classes() -> dict[str, type[ModelSource]]:
    """pavlit's own model sources by full and short class path: the only classes a source given as a dict may name."""
    from pavlit.policy import sources

    found: dict[str, type[ModelSource]] = {}
    for value in vars(sources).values():
        if isinstance(value, type) and issubclass(value, ModelSource) and value.__module__ == sources.__name__:
            if not inspect.isabstract(value):
                found[f"{value.__module__}.{value.__qualname__}"] = found[value.__qualname__] = value
    return found


def as_model_source(source: ModelSource | Mapping[str, Any]) -> ModelSource:
    """A model source, or one built from the ``{"class_path", "init_args"}`` dict that :func:`source_to_dict` makes.

    A dict is the serialised form a file carries (an exported verifier's ``pavlit_verifier.json``, a checkpoint's
    ``hyper_parameters``), so it is held to what a file may ask for: its ``class_path`` must be one of pavlit's own
    sources (:func:`model_source_classes`; nothing else is imported), and it may not turn ``trust_remote_code`` on.
    A config or code that wants another source, or remote code, passes a ``ModelSource`` object (LightningCLI
    builds one from a config's ``class_path``).

    Raises:
        ValueError: the dict names another class, asks for remote code, or has arguments the class does not take.
        TypeError: ``source`` is neither a ModelSource nor such a dict.
    """
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, Mapping) and "class_path" in source:
        origin = getattr(source, "origin", None)
        where = f"{origin}: " if origin else ""
        class_path = str(source["class_path"])
        allowed = model_source_classes()
        cls = allowed.get(class_path)
        if cls is None:
            names = ", ".join(sorted(name for name in allowed if "." not in name))
            raise ValueError(
                f"{where}the model source's class_path {class_path!r} is not one of pavlit's model sources "
                f"({names}); a source read from a file may name only these (pass a ModelSource object for another)"
            )
        init_args = dict(source.get("init_args") or {})
        if init_args.get("trust_remote_code"):
            raise ValueError(
                f"{where}the model source asks for trust_remote_code: true ({init_args.get('path')!r}); pavlit never "
                "takes that from a file. If you trust that folder's code, pass the source yourself, e.g. "
                "from_pretrained(folder, source=Pretrained(path, trust_remote_code=True))"
            )
        try:
            return cls(**init_args)
        except TypeError as err:
            raise ValueError(f"{where}the model source {class_path} cannot be built from {init_args}: {err}") from None
    raise TypeError(f"source must be a ModelSource or a {{class_path, init_args}} dict, got {source!r}")


def as_group(value: Any, cls: type) -> Any:
    """A ``LoRAArgs`` / ``QuantArgs`` from an instance, a dict of its fields, or None (the defaults)."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        return cls(**dict(value))
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {value!r}")


def load_backbone(source: ModelSource, lora: LoRAArgs, quant: QuantArgs) -> tuple[nn.Module, Any]:
    """Load ``(causal LM, tokenizer)`` from ``source``, quantized and with LoRA as the groups say.

    Quantization needs a local folder (bitsandbytes quantizes while loading): a :class:`Pretrained` source. A
    source that already carries a LoRA adapter (``Pretrained(adapter_path=...)``) has it merged first, so that the
    verifier's own adapters sit on the policy it starts from.

    Raises:
        FileNotFoundError: A ``Pretrained`` path that holds no model; the message names the config field to set.
        ValueError: Contradictory groups (see :func:`pavlit.models.adapters.check_compatible`).
    """
    check_compatible(lora, quant, training=True)
    try:
        if quant.enabled:
            if not isinstance(source, Pretrained):
                raise ValueError(
                    f"quant.mode={quant.mode!r} needs a Pretrained source (a local folder): bitsandbytes quantizes "
                    f"while loading. Save the model with save_pretrained and point {SOURCE_FIELD} at it."
                )
            from transformers import AutoTokenizer

            if not (Path(source.path).expanduser() / "config.json").is_file():
                raise FileNotFoundError(f"no Hugging Face model folder at {source.path!r}")
            tokenizer = AutoTokenizer.from_pretrained(Path(source.path).expanduser(), local_files_only=True)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = load_quantized(Path(source.path).expanduser(), quant)
        else:
            model, tokenizer = source.load()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}\nset {SOURCE_FIELD} to a local checkpoint folder (e.g. a Gemma 2B Hugging Face folder)"
        ) from err
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    # Loaders hand models back in eval mode and Lightning keeps submodules' modes: without this, dropout of a
    # pretrained backbone would stay off during training.
    return apply_lora(model, lora, quant).train(), tokenizer
