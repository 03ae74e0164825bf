"""A plain-torch decoding step for Llama-architecture models with grouped shared-prefix attention.

The sampler's workload is ``G`` prompts x ``n`` samples each, one token per step. Through the Hugging Face
forward, every step pays the model's Python layers (decorators, kwargs plumbing, mask construction) and an
attention over a KV cache in which each prompt's keys were copied ``n`` times. :class:`GroupedDecoder` does the
same arithmetic in about twenty tensor operations per layer:

* rows live in a **slot layout** ``[G, S]`` (group, sample slot): a group holds up to ``S`` samples of one
  prompt, and a prompt with more samples spans several groups (``S`` is chosen by :meth:`GroupedDecoder.slots_for`
  to trade holes against groups), so the layers run on one ``[G*S, hidden]`` matrix and attention needs no
  gather or scatter; a group with fewer live samples leaves *holes* (slots computed and ignored) until the next
  compaction re-packs the rows;
* the prompt KV (computed once by the HF prefill) stays **one copy per prompt** (groups of one prompt index the
  same tensors, copied once per re-packing): one batched GEMM per layer scores all ``S`` slots of every group
  against its prompt's prefix (with ``baddbmm`` adding the left-padding mask), and one
  batched product scores each sample's own generated tokens; both score blocks share one softmax, so the result
  is exactly attention over ``prefix + suffix``;
* q, k and v come from one fused projection and gate and up from another (:class:`DecodeWeights`, built once per
  weight version); the attention scale is folded into the query weights when that is exact or the model is
  float32; residual adds ride in ``addmm``; RoPE is one roll and two products with a sign-folded sine table,
  indexed once per prompt, not per sample;
* logits are computed only for real rows (holes are dropped before the output layer).

Projections that are not plain ``nn.Linear`` (LoRA, 4-bit) are called as modules, so adapters apply. Models it
does not recognise use the sampler's Hugging Face path; :func:`supports_fast_decode` says which.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone
GROUP_COST = 1.0  # a group's prefix products cost about one slot's layers (measured on the tiny policy)


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


def _plain(*modules: nn.Module) -> bool:
    """All plain ``nn.Linear`` of one dtype, with biases on all or none (so they can be concatenated)."""
    if not all(type(m) is nn.Linear for m in modules):
        return False
    return len({m.weight.dtype for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1


def _projection(module: nn.Module) -> Any:
    """A callable equal to ``module`` that skips ``nn.Module.__call__`` for plain linear layers."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _fused(modules: tuple[nn.Module, ...], scales: tuple[float, ...]) -> tuple[Any, torch.Tensor | None]:
    """One linear map computing ``cat([scale * m(x) for m in modules], -1)`` and its weight when the modules are
    bias-free (plain linears), or ``(None, None)``."""
    if not _plain(*modules):
        return None, None
    weight = torch.cat([m.weight.detach() * s if s != 1.0 else m.weight.detach() for m, s in zip(modules, scales)])
    bias = None
    if modules[0].bias is not None:
        bias = torch.cat([m.bias.detach() * s if s != 1.0 else m.bias.detach() for m, s in zip(modules, scales)])
    return (lambda x: F.linear(x, weight, bias)), (weight if bias is None else None)


def _rms_norm_weight(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """A float32 ``LlamaRMSNorm``'s weight and epsilon (what the native step computes), else ``None``."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__ == "LlamaRMSNorm" and weight is not None and weight.dtype == torch.float32:
        return weight.detach(), float(eps)
    return None


def _bias_free_weight(module: nn.Module) -> torch.Tensor | None:
    return module.weight.detach() if type(module) is nn.Linear and module.bias is None else None


def _residual(module: nn.Module) -> Any:
    """``f(residual, x) = residual + module(x)``, in one ``addmm`` for a bias-free plain linear."""
    if type(module) is nn.Linear and module.bias is None:
        weight_t = module.weight.t()
        return lambda residual, x: torch.addmm(residual, x, weight_t)
    return lambda residual, x: residual + module(x)


def _norm(module: nn.Module) -> Any:
    """The layer's RMSNorm; ``F.rms_norm`` (one kernel, same arithmetic) for float32 ``LlamaRMSNorm``."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__ == "LlamaRMSNorm" and weight is not None and eps is not None:
        if weight.dtype == torch.float32:
            shape = (weight.shape[0],)
            return lambda x: F.rms_norm(x, shape, weight, eps)
    return module


def _activation(act: nn.Module) -> Any:
    return F.silu if type(act).__name__ in ("SiLU", "SiLUActivation") else act


class _Layer:
    """One decoder layer's callables and shapes."""

    def __init__(self, layer: nn.Module, heads: int, kv_heads: int) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.head_dim = attention.head_dim
        self.heads, self.kv_heads = heads, kv_heads
        self.input_norm = _norm(layer.input_layernorm)
        self.post_norm = _norm(layer.post_attention_layernorm)
        scaling = float(attention.scaling)
        dtype = attention.q_proj.weight.dtype if hasattr(attention.q_proj, "weight") else None
        # Folding the scale into W_q is exact for a power of two; in float32 it moves results by an ulp or so.
        exact = math.frexp(scaling)[0] == 0.5
        fold = exact or dtype == torch.float32
        self.qkv, qkv_weight = _fused(
            (attention.q_proj, attention.k_proj, attention.v_proj), (scaling if fold else 1.0, 1.0, 1.0)
        )
        self.q_scale = 1.0 if self.qkv is not None and fold else scaling
        if self.qkv is None:
            q, k, v = (_projection(m) for m in (attention.q_proj, attention.k_proj, attention.v_proj))
            self.qkv = lambda x: torch.cat((q(x), k(x), v(x)), dim=-1)
        self.o = _residual(attention.o_proj)
        self.gate_up, gate_up_weight = _fused((mlp.gate_proj, mlp.up_proj), (1.0, 1.0))
        if self.gate_up is None:
            gate, up = _projection(mlp.gate_proj), _projection(mlp.up_proj)
            self.gate_up = lambda x: torch.cat((gate(x), up(x)), dim=-1)
        self.intermediate = mlp.gate_proj.out_features
        self.act = _activation(mlp.act_fn)
        self.down = _residual(mlp.down_proj)
        # What the native step (pavlit.policy.native) takes, when this layer is what it computes: float32
        # RMSNorms, bias-free plain projections with the attention scale folded into W_q, SiLU.
        norms = (_rms_norm_weight(layer.input_layernorm), _rms_norm_weight(layer.post_attention_layernorm))
        weights = (qkv_weight, _bias_free_weight(attention.o_proj), gate_up_weight, _bias_free_weight(mlp.down_proj))
        self.native: tuple[list[torch.Tensor], float] | None = None
        if (
            None not in norms
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu" for w in weights)
            and self.q_scale == 1.0
            and self.act is F.silu
            and norms[0][1] == norms[1][1]
        ):
            self.native = ([norms[0][0], norms[1][0], *weights], norms[0][1])


_UNTRACKED = itertools.count()


def _version(tensor: torch.Tensor) -> int:
    """The in-place update counter; inference tensors have none, so they get a fresh number each time (the fused
    copies are then rebuilt for every batch: safe, if slower)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1 - next(_UNTRACKED)


class DecodeWeights:
    """The decoder's view of a model: fused projections and plain callables, rebuilt when a weight changes.

    Built once per :class:`~pavlit.policy.sampler.Sampler` and reused by every batch; :meth:`current` rebuilds
    the fused copies when any parameter was replaced or updated in place (an RL step), detected through the
    parameters' identities and version counters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key: tuple | None = None
        self._build()

    def _fingerprint(self) -> tuple:
        return tuple((id(p), p.data_ptr(), _version(p)) for p in self.model.parameters())

    def _build(self) -> None:
        inner = _base_model(self.model)
        backbone, config = inner.model, inner.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        with torch.no_grad():
            self.layers = [_Layer(layer, heads, kv_heads) for layer in backbone.layers]
        embed = backbone.embed_tokens
        self.embed = (lambda ids: F.embedding(ids, embed.weight)) if type(embed) is nn.Embedding else embed
        self.rotary = backbone.rotary_emb
        self.final_norm = _norm(backbone.norm)
        self.lm_head = _projection(inner.lm_head)
        self.heads, self.kv_heads = heads, kv_heads
        # The native step's flat weight list (6 per layer) and epsilon, when every layer qualifies.
        # Then the embedding, final norm and output layer too: [embedding, final norm, output layer] + 6 per layer.
        self.native_weights: list[torch.Tensor] | None = None
        self.native_eps = 0.0
        final = _rms_norm_weight(backbone.norm)
        ends = (embed.weight.detach() if type(embed) is nn.Embedding else None, _bias_free_weight(inner.lm_head))
        epsilons = {layer.native[1] for layer in self.layers if layer.native is not None}
        if (
            all(layer.native is not None for layer in self.layers)
            and final is not None
            and all(w is not None and w.dtype == torch.float32 and w.device.type == "cpu" for w in ends)
            and epsilons == {final[1]}
        ):
            self.native_weights = [ends[0], final[0], ends[1]] + [w for layer in self.layers for w in layer.native[0]]
            self.native_eps = final[1]
        self._key = self._fingerprint()

    def current(self) -> DecodeWeights:
        """Itself, rebuilt first if the model's weights changed since the last build."""
        if self._fingerprint() != self._key:
            self._build()
        return self


class GroupedDecoder:
    """Decode the samples of ``G`` prefilled prompts, one token per :meth:`step`.

    Rows (the samples, prompt by prompt, as the sampler orders them) sit in ``S`` slots per prompt; ``step``
    takes and returns real rows only.

    Args:
        weights: The model's :class:`DecodeWeights`.
        prefix_keys: Per layer, the prefill's keys ``[G, kv_heads, width, head_dim]`` (rotary applied).
        prefix_values: Per layer, the prefill's values, same shape.
        prefix_mask: ``[G, width]``, 1 for real prompt tokens, 0 for left padding; ``None`` when nothing is padded.
        counts: ``[G]`` samples per prompt.
        capacity: Most tokens any row will generate.
        native: Run the layers through the compiled step (:mod:`pavlit.policy.native`) when the model, dtype
            and machine allow; ``False``: always the plain-torch layers.
    """

    def __init__(
        self,
        weights: DecodeWeights,
        prefix_keys: list[torch.Tensor],
        prefix_values: list[torch.Tensor],
        prefix_mask: torch.Tensor | None,
        counts: torch.Tensor,
        capacity: int,
        native: bool = True,
    ) -> None:
        self.w = weights
        first = prefix_keys[0]
        prompts, kv, width, head_dim = first.shape
        self.kv, self.rep, self.head_dim = kv, weights.heads // kv, head_dim
        self.width, self.capacity = width, capacity
        self.dtype, self.device = first.dtype, first.device
        # Per prompt: [P, kv, d, W] keys (transposed once) and [P, kv, W, d] values; each layout indexes them by
        # group (a group is a prompt, or a share of a prompt's samples when that packs the slots tighter).
        self.prompt_keys_t = [keys.transpose(-1, -2).contiguous() for keys in prefix_keys]
        self.prompt_values = [values.contiguous() for values in prefix_values]
        self.prompt_bias = None  # [P, 1, W] additive padding mask
        if prefix_mask is not None:
            real = prefix_mask[:, :width] != 0
            bias = torch.zeros(real.shape, dtype=self.dtype, device=self.device).masked_fill(~real, float("-inf"))
            self.prompt_bias = bias[:, None]
            lengths = real.sum(-1)
        else:
            lengths = torch.full((prompts,), width, device=self.device)
        self.prompt_base = lengths.to(device=self.device, dtype=torch.long)  # position of the first new token

        # Static RoPE types give cos/sin as a function of the position: tabulate [cos, sign-folded sin] once.
        self.rope_table = None
        if getattr(weights.rotary, "rope_type", "default") in STATIC_ROPE_TYPES:
            reach = width + capacity + 1
            cos, sin = weights.rotary(first.new_zeros((1, reach, 1)), torch.arange(reach, device=self.device)[None])
            self.rope_table = torch.stack((cos[0], self._fold_sign(sin[0])), dim=1)  # [reach, 2, d]

        counts = counts.to(self.device)
        self.row_prompt = torch.repeat_interleave(torch.arange(prompts, device=self.device), counts)
        self.group_prompt = None
        self._set_layout(self.row_prompt)
        shape = (self.groups, kv, self.slots, capacity, head_dim)  # group-major, like the prefix products' rows
        self.suffix_keys = [first.new_empty(shape) for _ in weights.layers]
        self.suffix_values = [first.new_empty(shape) for _ in weights.layers]
        self.length = 0
        # The layers as one compiled call per token where the model and machine allow (pavlit.policy.native).
        self.native = None
        eligible = weights.native_weights is not None and self.rope_table is not None
        if native and eligible and self.device.type == "cpu":
            from pavlit.policy import native

            self.native = native.load() if self.dtype == torch.float32 else None

    @staticmethod
    def _fold_sign(sin: torch.Tensor) -> torch.Tensor:
        """``rotate_half(x) * sin == roll(x, d/2) * cat(-sin[:d/2], sin[d/2:])``, exactly."""
        half = sin.shape[-1] // 2
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    @staticmethod
    def slots_for(counts: list[int], group_cost: float | None = None) -> int:
        """Slots per group that minimise the slots computed (holes included) plus ``group_cost`` per group
        (default: :data:`GROUP_COST`).

        A prompt with ``c`` samples takes ``ceil(c / S)`` groups of ``S`` slots; small ``S`` leaves fewer holes,
        large ``S`` makes fewer, larger prefix products.
        """
        group_cost = GROUP_COST if group_cost is None else group_cost
        best, best_cost = 1, math.inf
        for slots in range(max(counts), 0, -1):
            groups = sum(-(-count // slots) for count in counts)
            cost = groups * slots + group_cost * groups
            if cost < best_cost:
                best, best_cost = slots, cost
        return best

    def _set_layout(self, row_prompt: torch.Tensor) -> torch.Tensor:
        """Place rows (prompt ids, nondecreasing) into groups of slots; returns each group's first row."""
        device = self.device
        prompts, inverse, sizes = torch.unique_consecutive(row_prompt, return_inverse=True, return_counts=True)
        slots = self.slots_for(sizes.tolist())
        chunks = (sizes + slots - 1) // slots
        group_prompt = torch.repeat_interleave(prompts, chunks)
        group_start = torch.cumsum(chunks, 0) - chunks
        rank = torch.arange(row_prompt.shape[0], device=device) - (torch.cumsum(sizes, 0) - sizes)[inverse]
        row_group = group_start[inverse] + torch.div(rank, slots, rounding_mode="floor")
        self.groups, self.slots = int(group_prompt.shape[0]), slots
        self.row_group, self.row_slot = row_group, row_group * slots + rank % slots
        self.holes = row_prompt.shape[0] != self.groups * slots  # every slot real: no scatter or gather needed
        if self.group_prompt is None or not torch.equal(group_prompt, self.group_prompt):
            self.group_prompt = group_prompt
            identity = torch.equal(group_prompt, torch.arange(len(self.prompt_keys_t[0]), device=device))
            kv, d, w = self.kv, self.head_dim, self.width

            def per_group(x: torch.Tensor) -> torch.Tensor:
                return x if identity else x[group_prompt]

            # [G*kv, d, W] keys and [G*kv, W, d] values for the batched prefix products.
            self.prefix_keys_t = [per_group(k).view(-1, d, w) for k in self.prompt_keys_t]
            self.prefix_values = [per_group(v).view(-1, w, d) for v in self.prompt_values]
            self.base = self.prompt_base[group_prompt]
            self.bias = None
            if self.prompt_bias is not None:  # [G*kv, 1, W] for baddbmm
                bias = self.prompt_bias[group_prompt][:, None].expand(self.groups, kv, 1, w)
                self.bias = bias.reshape(-1, 1, w)
        return (rank % slots == 0).nonzero().squeeze(-1)

    @property
    def rows(self) -> int:
        """Real rows (samples still decoded)."""
        return self.row_slot.shape[0]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (increasing indices); groups are re-packed around the rows left."""
        old_slot, old_slots = self.row_slot[keep], self.slots
        self.row_prompt = self.row_prompt[keep]
        group_first = self._set_layout(self.row_prompt)
        source = old_slot[group_first].repeat_interleave(self.slots)  # holes copy their group's first row
        source[self.row_slot] = old_slot
        t, groups, slots = self.length, self.groups, self.slots
        source_group, source_slot = source // old_slots, source % old_slots
        for caches in (self.suffix_keys, self.suffix_values):
            for index, cache in enumerate(caches):
                _, kv, _, capacity, d = cache.shape
                fresh = cache.new_empty((groups, kv, slots, capacity, d))
                gathered = cache[source_group, :, source_slot, :t]  # [G'*S', kv, t, d]
                fresh[:, :, :, :t] = gathered.view(groups, slots, kv, t, d).transpose(1, 2)
                caches[index] = fresh

    def _rope(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[G, 1, 1, d]`` cos and sign-folded sin of each prompt's current position."""
        positions = self.base + self.length
        if self.rope_table is not None:
            table = self.rope_table[positions]  # [G, 2, d]
            return table[:, None, None, 0], table[:, None, None, 1]
        cos, sin = self.w.rotary(hidden, positions[:, None])  # [G, 1, d]
        return cos[:, None], self._fold_sign(sin)[:, None]

    def _attention(self, index: int, q: torch.Tensor, t: int) -> torch.Tensor:
        """``q`` ``[G, S, H, d]`` (scaled) over each prompt's prefix and each row's first ``t`` own tokens."""
        groups, slots, kv, rep, d, width = self.groups, self.slots, self.kv, self.rep, self.head_dim, self.width
        rows, cells = groups * slots, groups * kv * slots  # cells: one (prompt, kv head, slot) each
        grouped = q.reshape(groups, slots, kv, rep, d).permute(0, 2, 1, 3, 4).reshape(groups * kv, slots * rep, d)
        keys_t = self.prefix_keys_t[index]
        if self.bias is not None:
            prefix = torch.baddbmm(self.bias, grouped, keys_t)  # [G*kv, S*rep, W], padding masked
        else:
            prefix = torch.bmm(grouped, keys_t)
        own_keys = self.suffix_keys[index].view(cells, self.capacity, d)[:, :t]
        suffix = torch.bmm(grouped.reshape(cells, rep, d), own_keys.transpose(1, 2))  # [cells, rep, t]
        scores = torch.cat((prefix.reshape(cells, rep, width), suffix), dim=-1)
        probs = scores.float().softmax(dim=-1).to(q.dtype)  # [cells, rep, W + t]
        out = torch.bmm(probs[..., :width].reshape(groups * kv, slots * rep, width), self.prefix_values[index])
        own_values = self.suffix_values[index].view(cells, self.capacity, d)[:, :t]
        out = torch.baddbmm(out.reshape(cells, rep, d), probs[..., width:], own_values)
        return out.view(groups, kv, slots, rep, d).permute(0, 2, 1, 3, 4).reshape(rows, kv * rep * d)

    def _native_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The whole step (embedding to logits of the real rows) in one call of the compiled step."""
        t = self.length
        self.length = t + 1
        return self.native.decode_step(
            tokens.view(-1),
            self.row_slot if self.holes else None,
            self.rope_table,
            self.base + t,
            self.w.native_weights,
            self.prefix_keys_t,
            self.prefix_values,
            self.bias,
            self.suffix_keys,
            self.suffix_values,
            t,
            self.groups,
            self.slots,
            self.w.heads,
            self.kv,
            self.w.native_eps,
        )

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per real row; return ``[rows, vocab]`` logits for the real rows."""
        if self.native is not None:
            return self._native_step(tokens)
        w, groups, slots = self.w, self.groups, self.slots
        rows = groups * slots
        if self.holes:
            tokens = tokens.new_zeros(rows).index_copy_(0, self.row_slot, tokens.view(-1))
        hidden = w.embed(tokens.view(rows))  # [rows, hidden]
        cos, sin = self._rope(hidden)
        t = self.length
        heads, kv, d = w.heads, self.kv, self.head_dim
        half = d // 2
        for index, layer in enumerate(w.layers):
            x = layer.input_norm(hidden)
            qkv = layer.qkv(x).view(groups, slots, heads + 2 * kv, d)
            qk = qkv[:, :, : heads + kv]
            qk = qk * cos + torch.roll(qk, half, dims=-1) * sin
            q = qk[:, :, :heads]
            if layer.q_scale != 1.0:
                q = q * layer.q_scale
            self.suffix_keys[index][:, :, :, t] = qk[:, :, heads:].transpose(1, 2)
            self.suffix_values[index][:, :, :, t] = qkv[:, :, heads + kv :].transpose(1, 2)
            hidden = layer.o(hidden, self._attention(index, q, t + 1))
            gate_up = layer.gate_up(layer.post_norm(hidden))
            size = layer.intermediate
            hidden = layer.down(hidden, layer.act(gate_up[:, :size]) * gate_up[:, size:])
        self.length = t + 1
        if self.holes:
            hidden = hidden.index_select(0, self.row_slot)
        return w.lm_head(w.final_norm(hidden))
