"""Checks a model and its tokenizer must pass before pavlit samples from or trains them.

Each check turns a model that would otherwise run and give silently wrong results (random weights, ``<unk>``
prompts, positions past the context, a 160 TB buffer) into one error that names the folder, file or field and
what was expected:

* :func:`load_causal_lm`: a model folder's weights load as a causal LM with **no** missing or newly initialised
  weights (a BERT folder, or a ``config.json`` declaring more layers than the weights hold, would otherwise load
  with random weights), a corrupt or truncated weights file names the file, and the tokenizer's vocabulary fits
  the model's embedding. ``PAVLIT_ALLOW_NEW_WEIGHTS=1`` accepts newly initialised weights (with a warning) for the
  rare folder that is meant to be trained from a partial checkpoint.
* :func:`check_tiny_sizes`: the in-code model's sizes are positive and consistent.
* :func:`check_prompts`: the tokenizer covers every character of the prompts (no ``<unk>``), each prompt leaves
  room in the context, and ``max_new_tokens`` is within the context.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ALLOW_NEW_WEIGHTS_ENV = "PAVLIT_ALLOW_NEW_WEIGHTS"
#: Cap on ``max_new_tokens`` for a model that does not declare its context (``max_position_embeddings``).
MAX_NEW_TOKENS_WITHOUT_CONTEXT = 1 << 16


def check_tiny_sizes(n_layer: int, n_embd: int, n_head: int, max_position: int) -> None:
    """Refuse sizes of the in-code model that cannot build a model (or build one that cannot hold a prompt)."""
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("max_position", max_position)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TinyPolicy.{name} must be a positive integer, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"TinyPolicy.n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if (n_embd // n_head) % 2:
        raise ValueError(
            f"TinyPolicy.n_embd / n_head = {n_embd // n_head} must be even (rotary positions rotate pairs of "
            "dimensions)"
        )


def _allow_new_weights() -> bool:
    return os.environ.get(ALLOW_NEW_WEIGHTS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def load_causal_lm(folder: Path, tokenizer: Any, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)``, refusing a folder that does not hold that model.

    Raises:
        ValueError: The weights file is corrupt or truncated (the file is named), the folder's ``config.json`` is
            not a causal LM or declares weights the folder does not hold (missing / newly initialised weights are
            listed), or the tokenizer has ids beyond the model's embedding.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers' own load report (a table of missing keys, as a warning) would precede the one error below.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # Local files only, whatever the caller passed: nothing is downloaded, so no remote code can arrive.
        local = {key: value for key, value in kwargs.items() if key != "local_files_only"}
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True, local_files_only=True, **local
        )
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        if "safetensor" not in f"{type(err).__module__}.{type(err).__name__}".lower():
            raise
        raise ValueError(f"{_weights_file(folder)}: cannot read the weights ({err}); is the file truncated?") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        architectures = getattr(model.config, "architectures", None) or ["?"]
        shown = ", ".join((missing + mismatched)[:4]) + (
            f" and {len(missing) + len(mismatched) - 4} more" if len(missing) + len(mismatched) > 4 else ""
        )
        message = (
            f"{folder / 'config.json'}: the weights in {folder} do not hold this model (architectures "
            f"{architectures}, loaded as {type(model).__name__}): {len(missing) + len(mismatched)} weight(s) would "
            f"be newly initialised at random ({shown}); expected a causal-LM folder written by save_pretrained "
            "whose config.json matches its weights"
        )
        if not _allow_new_weights():
            raise ValueError(f"{message} (set {ALLOW_NEW_WEIGHTS_ENV}=1 to accept random weights)")
        log.warning("%s; accepted because %s is set", message, ALLOW_NEW_WEIGHTS_ENV)
    check_vocabulary(model, tokenizer, str(folder))
    return model


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if found else folder


def check_vocabulary(model: Any, tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's input embedding (an index error mid-forward)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        return
    if len(tokenizer) > rows:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding holds {rows} "
            "(config.json vocab_size); expected the tokenizer saved with this model"
        )


def check_prompts(problems: Iterable[Any], model: Any, tokenizer: Any, max_new_tokens: int | None = None) -> None:
    """Refuse prompts the policy cannot read or continue, and a ``max_new_tokens`` past its context.

    * a prompt with characters outside the tokenizer's vocabulary (they would all become ``<unk>``; the missing
      characters are named);
    * a prompt that alone fills the context (``max_position_embeddings``): sampling past the positions a model was
      built for fails deep inside the model (learned positions) or silently produces garbage (rotary positions);
    * ``max_new_tokens`` above the context (or above :data:`MAX_NEW_TOKENS_WITHOUT_CONTEXT` for a model that does
      not declare one): a response can never use them, and the sampler would allocate a buffer that large.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_new_tokens is not None:
        cap = limit or MAX_NEW_TOKENS_WITHOUT_CONTEXT
        if max_new_tokens > cap:
            what = "the policy's context (max_position_embeddings)" if limit else "pavlit's cap for a model without one"
            raise ValueError(f"max_new_tokens must be at most {cap}, {what}; got {max_new_tokens}")
    unk = getattr(tokenizer, "unk_token_id", None)
    # Byte-level tokenizers (GPT-2 style) reuse their eos as "unk" and never produce it from text.
    if unk in {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}:
        unk = None
    for problem in problems:
        ids = tokenizer(problem.prompt)["input_ids"]
        source = (getattr(problem, "metadata", None) or {}).get("source")
        where = f"problem {problem.id!r}" + (f" (from {source})" if source else "")
        if unk is not None and unk in ids and unk in tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]:
            missing = _unknown_characters(problem.prompt, tokenizer, unk)
            raise ValueError(
                f"{where}: its prompt has characters the policy's tokenizer does not know ({missing}), which would "
                "all become <unk>; expected a tokenizer covering the task's text (e.g. add them to TinyPolicy.alphabet)"
            )
        if limit and len(ids) >= limit:
            raise ValueError(
                f"{where}: its prompt is {len(ids)} tokens, but the policy's context holds {limit} positions "
                "(max_position_embeddings), leaving no room for a step; shorten or drop the problem, or use a policy "
                "with a longer context"
            )


def _unknown_characters(text: str, tokenizer: Any, unk: int) -> str:
    missing = [c for c in sorted(set(text)) if unk in tokenizer(c, add_special_tokens=False)["input_ids"]]
    shown = "".join(missing[:20]) + ("..." if len(missing) > 20 else "")
    return repr(shown) if missing else "some sequence of characters"
