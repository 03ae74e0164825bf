"""Policies: loading causal LMs, the in-code character tokenizer, and the step-aware sampler.

Loading: ``loading.py`` (models, dtypes, GGUF conversion), ``sources.py`` (config-selectable model sources),
``precision.py``, ``tokenizer.py``, ``checks.py``. Sampling: ``sampler.py`` (:class:`Sampler`), ``records.py`` (its
settings, per-call ``Request``, ``SamplerOutput``, the ``complete``/``next_step`` front), ``sampling.py`` (token
draws), ``decode.py`` (prefill / expand / stop / compact / step), ``kv_cache.py`` and ``fast_decode.py`` (the two
KV layouts; ``decode_weights.py`` is the grouped decoder's view of a model, ``native.py`` + ``native_decode.cpp`` its
compiled step), ``vllm_sampler.py`` and ``backends.py`` (which engine a job samples with).
"""

from pavlit.policy.loading import Policy, gemma3_270m, load_policy, tiny_policy
from pavlit.policy.sampler import Sampler, SamplerOutput, VLLMSampler, sample_tokens
from pavlit.policy.tokenizer import build_char_tokenizer

__all__ = [
    "Policy",
    "Sampler",
    "SamplerOutput",
    "VLLMSampler",
    "build_char_tokenizer",
    "gemma3_270m",
    "load_policy",
    "sample_tokens",
    "tiny_policy",
]
