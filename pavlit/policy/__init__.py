"""Policies: loading causal LMs, the in-code character tokenizer, and the step-aware sampler."""

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
