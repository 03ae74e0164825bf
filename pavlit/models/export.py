"""The exported-verifier folder: write it, check it, rebuild from it.

::

    <path>/config.json, model.safetensors, tokenizer files   # full fine-tune: a plain Hugging Face folder
    <path>/adapter_config.json, adapter_model.safetensors    # LoRA: only the adapter (+ tokenizer files)
    <path>/value_head.safetensors                            # the scoring head
    <path>/reference.safetensors                             # the frozen reference of a "likelihood" head
    <path>/pavlit_verifier.json                              # kind, head, backbone kind, source, lora, quant

A full fine-tune reloads its backbone from the folder itself (``Pretrained(path)``); a LoRA export reloads the
base from the recorded source (a local folder, the seeded tiny model, Gemma 3 270M) and puts the adapter on it.
``pavlit_verifier.json`` is written last and atomically: its presence means the folder is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pavlit.jobs.atomic import atomic_write_text
from pavlit.models.backbone import SourceFromFile, source_to_dict
from pavlit.policy.sources import Pretrained

__all__ = [
    "EXPORT_FILE",
    "EXPORT_VERSION",
    "HEAD_FILE",
    "REFERENCE_FILE",
    "export_init_args",
    "load_export_weights",
    "read_export",
    "save_verifier",
]

EXPORT_FILE = "pavlit_verifier.json"
HEAD_FILE = "value_head.safetensors"
REFERENCE_FILE = "reference.safetensors"
EXPORT_VERSION = 1


def save_verifier(
    path: str | Path,
    kind: str,
    backbone: nn.Module,
    tokenizer: Any,
    head: nn.Module,
    settings: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
    reference: nn.Module | None = None,
) -> Path:
    """Write a verifier folder (see the module docstring).

    Args:
        path: Output folder (created).
        kind: ``"pav"`` or ``"orm"``.
        backbone: The causal LM, a peft model when trained with LoRA.
        tokenizer: Saved beside it.
        head: The scoring head.
        settings: Plain-typed constructor settings (``head_type``, ``score_token``, ``source``, ``lora``, ``quant``).
        state_dict: A full state dict of the LightningModule (keys ``backbone.*``, ``value_head.*``) when the live
            parameters are sharded (FSDP); None reads the modules themselves.
        reference: A :class:`FrozenReference`, saved as ``reference.safetensors``.

    Returns:
        The folder.
    """
    from peft import PeftModel
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    backbone_state = head_state = None
    if state_dict is not None:
        backbone_state = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        head_state = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
    if head_state is None:
        head_state = head.state_dict()
    adapter = isinstance(backbone, PeftModel)
    if adapter:
        from peft import get_peft_model_state_dict

        if backbone_state is not None:
            backbone_state = get_peft_model_state_dict(backbone, state_dict=backbone_state)
        backbone.save_pretrained(str(out), safe_serialization=True, state_dict=backbone_state)
    else:
        backbone.save_pretrained(str(out), safe_serialization=True, state_dict=backbone_state)
    tokenizer.save_pretrained(str(out))
    save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, str(out / HEAD_FILE))
    if reference is not None:
        # Cloned: tied input/output embeddings share storage, which safetensors refuses.
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in reference.state_dict().items()}
        save_file(weights, str(out / REFERENCE_FILE))
    dtype = str(next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32))
    meta = {
        "format_version": EXPORT_VERSION,
        "kind": kind,
        "backbone": "adapter" if adapter else "full",
        "dtype": dtype.removeprefix("torch."),
        "reference": reference is not None,
        **dict(settings),
    }
    # Written last and atomically: its presence means the folder is complete (the pipeline's "done" file).
    atomic_write_text(out / EXPORT_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    return out


def read_export(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The ``pavlit_verifier.json`` of an exported folder, checked to be a ``kind`` verifier (None: either)."""
    if "://" in str(path):
        raise ValueError(
            f"verifier {str(path)!r} is a URL; an exported verifier is a local folder (nothing is downloaded)"
        )
    folder = Path(path).expanduser()
    meta_path = folder / EXPORT_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {EXPORT_FILE}; export a verifier with save_pretrained(path)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{meta_path}: not UTF-8 text; is it a pavlit export?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}:{err.lineno}: not valid JSON ({err.msg}); is the export truncated?") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if kind is None and meta.get("kind") not in ("pav", "orm"):
        raise ValueError(f"{meta_path}: 'kind' must be 'pav' or 'orm', got {meta.get('kind')!r}")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r} verifier, not a {kind!r} one")
    if meta.get("format_version") != EXPORT_VERSION:
        raise ValueError(f"{folder}: unsupported verifier format version {meta.get('format_version')!r}")
    return meta


def export_init_args(path: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments that rebuild an exported verifier's architecture (weights are loaded separately)."""
    folder = Path(path).expanduser()
    lora = dict(meta["lora"])
    if meta["backbone"] == "full":
        # The folder itself is the fine-tuned backbone; a full fine-tune never had adapters.
        dtype = meta.get("dtype", "float32")
        source: dict[str, Any] = source_to_dict(
            Pretrained(str(folder), dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32")
        )
        lora["enabled"] = False
    else:
        # What the file says the base model was; as_model_source holds it to what a file may ask for.
        source = SourceFromFile(meta["source"], str(folder / EXPORT_FILE))
    return {
        "source": source,
        "head_type": meta["head_type"],
        "score_token": meta.get("score_token"),
        "lora": lora,
        "quant": dict(meta["quant"]),
    }


def load_export_weights(
    path: str | Path,
    meta: Mapping[str, Any],
    backbone: nn.Module,
    head: nn.Module,
    reference: nn.Module | None = None,
) -> None:
    """Put an exported folder's head weights (and LoRA adapter, for an adapter export; and the frozen reference of
    a ``"likelihood"`` head) into freshly built modules."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    if meta.get("reference"):
        if reference is None:
            raise ValueError(f"{folder}: the export has a reference model but the rebuilt verifier has no slot for it")
        reference.load_state_dict(load_file(str(folder / REFERENCE_FILE)))
    if meta["backbone"] == "adapter":
        from peft import set_peft_model_state_dict

        weights = load_file(str(folder / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(backbone, weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"{folder}: adapter weights {missing[:3]} do not fit the rebuilt backbone")
