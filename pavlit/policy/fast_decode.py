"""A plain-torch decoding step for Llama-architecture models with grouped shared-prefix attention.

The sampler's workload is ``G`` prompts x ``n`` samples each, one token per step. Through the Hugging Face
forward, every step pays the model's Python layers (decorators, kwargs plumbing, mask construction) and an
attention over a KV cache in which each prompt's keys were copied ``n`` times. :class:`GroupedDecoder` does the
same arithmetic more directly:

* the prompt KV (computed once by the HF prefill) stays **one copy per prompt**; a step attends to it with one
  matrix product per prompt and head for all of that prompt's samples (a real GEMM instead of ``n`` GEMVs), and
  to each sample's own generated tokens separately; the two score blocks share one softmax, so the result is
  exactly attention over ``prefix + suffix``;
* the decoder layers are called as plain tensor code on the model's own parameters (no copies): RMSNorm,
  rotary embedding (the model's own module, so every RoPE scaling type is honoured), projections, SwiGLU MLP;
* keys are stored transposed (``[.., head_dim, tokens]``) so the per-sample score product reads them
  contiguously.

Projections that are not plain ``nn.Linear`` (LoRA, 4-bit) are called as modules, so adapters apply. Models it
does not recognise use the sampler's Hugging Face path; :func:`supports_fast_decode` says which.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_fast_decode(model: nn.Module) -> bool:
    """Whether :class:`GroupedDecoder` computes exactly this model's forward (Llama architecture, no sliding window)."""
    inner = _base_model(model)
    if type(inner).__name__ not in SUPPORTED_ARCHITECTURES:
        return False
    config = inner.config
    if getattr(config, "sliding_window", None) or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return False
    backbone = getattr(inner, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if backbone is None or not all(hasattr(backbone, name) for name in needed):
        return False
    layer = backbone.layers[0]
    return all(hasattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )


def _projection(module: nn.Module) -> Any:
    """A callable equal to ``module`` that skips ``nn.Module.__call__`` for plain linear layers."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    """One decoder layer's callables and shapes."""

    def __init__(self, layer: nn.Module, heads: int, kv_heads: int) -> None:
        attention = layer.self_attn
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = (
            _projection(attention.q_proj),
            _projection(attention.k_proj),
            _projection(attention.v_proj),
            _projection(attention.o_proj),
        )
        self.gate, self.up, self.down = (
            _projection(layer.mlp.gate_proj),
            _projection(layer.mlp.up_proj),
            _projection(layer.mlp.down_proj),
        )
        self.act = layer.mlp.act_fn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.heads, self.kv_heads = heads, kv_heads


class GroupedDecoder:
    """Decode ``rows`` samples of ``G`` prefilled prompts, one token per :meth:`step`.

    Args:
        model: The Llama-architecture causal LM the prefill ran on (peft-wrapped or not).
        prefix_keys: Per layer, the prefill's keys ``[G, kv_heads, width, head_dim]`` (rotary applied).
        prefix_values: Per layer, the prefill's values, same shape.
        prefix_mask: ``[G, width]``, 1 for real prompt tokens, 0 for left padding; ``None`` when nothing is padded.
        counts: ``[G]`` samples per prompt; rows are ordered prompt by prompt.
        capacity: Most tokens any row will generate.
    """

    def __init__(
        self,
        model: nn.Module,
        prefix_keys: list[torch.Tensor],
        prefix_values: list[torch.Tensor],
        prefix_mask: torch.Tensor | None,
        counts: torch.Tensor,
        capacity: int,
    ) -> None:
        inner = _base_model(model)
        backbone = inner.model
        config = inner.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.embed = backbone.embed_tokens
        self.rotary = backbone.rotary_emb
        self.final_norm = backbone.norm
        self.lm_head = _projection(inner.lm_head)
        self.layers = [_Layer(layer, heads, kv_heads) for layer in backbone.layers]
        self.rep = heads // kv_heads

        first = prefix_keys[0]
        groups, _, width, head_dim = first.shape
        self.dtype, self.device = first.dtype, first.device
        # Prefix keys transposed once: [G, kv, d, width].
        self.prefix_keys_t = [keys.transpose(-1, -2).contiguous() for keys in prefix_keys]
        self.prefix_values = [values.contiguous() for values in prefix_values]
        bias = torch.zeros((groups, width), dtype=torch.float32, device=self.device)
        if prefix_mask is not None:
            bias = bias.masked_fill(prefix_mask[:, :width] == 0, float("-inf"))
        self.prefix_bias = bias[:, None, None, :]  # [G, 1, 1, width]: broadcast over kv heads and query rows

        # Static RoPE types give the same cos/sin for a position whatever else is in the batch: tabulate them once
        # for every position this decode can reach; others (dynamic, longrope) are recomputed per step like HF does.
        self.rope_table = None
        if getattr(self.rotary, "rope_type", "default") in STATIC_ROPE_TYPES:
            reach = width + capacity + 1
            probe = first.new_zeros((1, reach, 1))
            cos, sin = self.rotary(probe, torch.arange(reach, device=self.device)[None])
            self.rope_table = (cos[0], sin[0])  # [reach, head_dim]

        rows = int(counts.sum())
        self.suffix_keys_t = [first.new_empty((rows, kv_heads, head_dim, capacity)) for _ in self.layers]
        self.suffix_values = [first.new_empty((rows, kv_heads, capacity, head_dim)) for _ in self.layers]
        self.length = 0
        self._set_groups(torch.repeat_interleave(torch.arange(groups, device=self.device), counts.to(self.device)))

    def _set_groups(self, group: torch.Tensor) -> None:
        """Row -> group index (nondecreasing), and the padded (group, slot) layout used by the prefix GEMMs."""
        _, inverse, sizes = torch.unique_consecutive(group, return_inverse=True, return_counts=True)
        starts = torch.cumsum(sizes, 0) - sizes
        self.group = inverse
        self.slot = torch.arange(group.shape[0], device=group.device) - starts[inverse]
        self.groups = int(sizes.shape[0])
        self.width = int(sizes.max())
        self.uniform = bool((sizes == self.width).all())
        self.row_bias = self.prefix_bias[self.group]  # [rows, 1, 1, width]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (increasing indices); prompts left without rows are dropped as well."""
        kept_groups = torch.unique_consecutive(self.group[keep])
        if kept_groups.shape[0] != self.groups:
            self.prefix_keys_t = [keys[kept_groups] for keys in self.prefix_keys_t]
            self.prefix_values = [values[kept_groups] for values in self.prefix_values]
            self.prefix_bias = self.prefix_bias[kept_groups]
        self.suffix_keys_t = [keys[keep] for keys in self.suffix_keys_t]
        self.suffix_values = [values[keep] for values in self.suffix_values]
        self._set_groups(self.group[keep])

    def _to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, kv, rep, k]`` -> ``[G, kv, width*rep, k]`` (zero rows where a group has fewer samples)."""
        rows, kv, rep, k = x.shape
        if self.uniform:
            grouped = x.view(self.groups, self.width, kv, rep, k)
        else:
            grouped = x.new_zeros((self.groups, self.width, kv, rep, k))
            grouped[self.group, self.slot] = x
        return grouped.permute(0, 2, 1, 3, 4).reshape(self.groups, kv, self.width * rep, k)

    def _from_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_groups`: ``[G, kv, width*rep, k]`` -> ``[rows, kv, rep, k]``."""
        groups, kv, _, k = x.shape
        per_slot = x.view(groups, kv, self.width, self.rep, k).permute(0, 2, 1, 3, 4)
        if self.uniform:
            return per_slot.reshape(groups * self.width, kv, self.rep, k)
        return per_slot[self.group, self.slot]

    def _attention(self, index: int, layer: _Layer, q: torch.Tensor, t: int) -> torch.Tensor:
        """Attention of one query per row over its prompt's prefix and its own first ``t`` generated tokens."""
        rows = q.shape[0]
        q = q.view(rows, layer.kv_heads, self.rep, layer.head_dim)
        prefix_scores = self._from_groups(self._to_groups(q) @ self.prefix_keys_t[index])  # [rows, kv, rep, W]
        suffix_scores = q @ self.suffix_keys_t[index][..., :t]  # [rows, kv, rep, t]
        prefix_scores = prefix_scores.float() * layer.scaling + self.row_bias
        scores = torch.cat((prefix_scores, suffix_scores.float() * layer.scaling), dim=-1).softmax(dim=-1)
        width = prefix_scores.shape[-1]
        probs = scores.to(q.dtype)
        out = self._from_groups(self._to_groups(probs[..., :width].contiguous()) @ self.prefix_values[index])
        out = out + probs[..., width:] @ self.suffix_values[index][:, :, :t]
        return out.reshape(rows, layer.heads * layer.head_dim)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at ``positions`` (``[rows]`` or ``[rows, 1]``); return ``[rows, vocab]`` logits."""
        rows = tokens.shape[0]
        hidden = self.embed(tokens.view(rows, 1))  # [rows, 1, hidden]
        if self.rope_table is not None:
            where = positions.view(rows)
            cos, sin = self.rope_table[0][where], self.rope_table[1][where]
        else:
            cos, sin = self.rotary(hidden, positions.view(rows, 1))  # [rows, 1, head_dim]
        hidden = hidden.view(rows, -1)
        cos, sin = cos.view(rows, 1, -1), sin.view(rows, 1, -1)
        t = self.length
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_norm(hidden)
            q = layer.q(x).view(rows, layer.heads, layer.head_dim)
            k = layer.k(x).view(rows, layer.kv_heads, layer.head_dim)
            v = layer.v(x).view(rows, layer.kv_heads, layer.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.suffix_keys_t[index][..., t] = k
            self.suffix_values[index][:, :, t] = v
            hidden = residual + layer.o(self._attention(index, layer, q, t + 1))
            x = layer.post_norm(hidden)
            hidden = hidden + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        self.length = t + 1
        return self.lm_head(self.final_norm(hidden))
