"""A plain-torch decoding step for Llama-architecture models with grouped shared-prefix attention.

The sampler's workload is ``G`` prompts x ``n`` samples each, one token per step. Through the Hugging Face
forward, every step pays the model's Python layers (decorators, kwargs plumbing, mask construction) and an
attention over a KV cache in which each prompt's keys were copied ``n`` times. :class:`GroupedDecoder` does the
same arithmetic in about twenty tensor operations per layer:

* rows live in a **slot layout** ``[G, S]`` (group, sample slot): a group holds up to ``S`` samples of one
  prompt, and a prompt with more samples spans several groups (``S`` is chosen by :meth:`GroupedDecoder.slots_for`
  to trade holes against groups), so the layers run on one ``[G*S, hidden]`` matrix and attention needs no
  gather or scatter; a group with fewer live samples leaves *holes* (slots computed and ignored) until the next
  compaction re-packs the rows (the plain path copies each row's generated KV into the new layout; the compiled
  step keeps one cache row per sample for the whole decode and reaches it through a slot-to-row index, so
  compaction moves no KV there);
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

import math

import torch

from pavlit.policy.decode_weights import SUPPORTED_ARCHITECTURES, DecodeWeights, supports_fast_decode

__all__ = ["SUPPORTED_ARCHITECTURES", "CacheBuffers", "DecodeWeights", "GroupedDecoder", "supports_fast_decode"]

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position alone
GROUP_COST = 1.0  # a group's prefix products cost about one slot's layers (measured on the tiny policy)
REUSE_LIMIT_BYTES = 64 << 20  # own-KV caches up to this size are kept for the next batch (CacheBuffers)


class CacheBuffers:
    """Memory for the compiled step's own-KV caches, kept from one batch to the next.

    A fresh multi-megabyte tensor is fresh pages: the tiny policy's 64-row batch took ~3,600 page faults per
    call writing its 16 MB of caches, ~5% of the call. A :class:`~pavlit.policy.sampler.Sampler` keeps one of
    these per concurrent batch and hands it to each new decoder; caches larger than ``limit_bytes`` are
    allocated per batch (a large model's step dwarfs its page faults, and its caches are large to keep; default
    :data:`REUSE_LIMIT_BYTES`).
    Only one decoder may use a buffer at a time.
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = REUSE_LIMIT_BYTES if limit_bytes is None else limit_bytes
        self._flat: torch.Tensor | None = None

    def take(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """``count`` uninitialised contiguous tensors of ``shape``, from the kept memory when they fit in it."""
        numel = count * math.prod(shape)
        if numel * torch.empty((), dtype=dtype).element_size() > self.limit_bytes:
            return [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
        flat = self._flat
        if flat is None or flat.numel() < numel or flat.dtype != dtype or flat.device != torch.device(device):
            flat = self._flat = torch.empty(numel, dtype=dtype, device=device)
        return list(flat[:numel].view(count, *shape).unbind(0))


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
        buffers: Memory the compiled step's caches may reuse (:class:`CacheBuffers`, not shared with a decoder
            still in use); ``None``: fresh tensors.
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
        buffers: CacheBuffers | None = None,
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
        self.length = 0
        # The layers as one compiled call per token where the model and machine allow (pavlit.policy.native).
        self.native = None
        eligible = weights.native_weights is not None and self.rope_table is not None
        if native and eligible and self.device.type == "cpu":
            from pavlit.policy import native

            self.native = native.load() if self.dtype == torch.float32 else None
        if self.native is not None:
            # One cache row per sample for the whole decode, [rows, kv, capacity, d]: slots find theirs through
            # slot_cache (-1: a hole), so dropping finished rows re-packs the slots without moving any KV.
            shape = (self.rows, kv, capacity, head_dim)
            self.row_cache = torch.arange(self.rows, device=self.device)
            self._place_cache_rows()
            caches = (buffers or CacheBuffers(0)).take(2 * len(weights.layers), shape, self.dtype, self.device)
            self.suffix_keys, self.suffix_values = caches[0::2], caches[1::2]
        else:
            shape = (self.groups, kv, self.slots, capacity, head_dim)  # group-major, like the prefix products' rows
            self.suffix_keys = [first.new_empty(shape) for _ in weights.layers]
            self.suffix_values = [first.new_empty(shape) for _ in weights.layers]

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

    def _place_cache_rows(self) -> None:
        """The compiled step's ``slot_cache``: each slot's row of the own-KV caches, ``-1`` for a hole."""
        self.slot_cache = torch.full((self.groups * self.slots,), -1, dtype=torch.long, device=self.device)
        self.slot_cache[self.row_slot] = self.row_cache

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (increasing indices); groups are re-packed around the rows left (the plain
        path copies their KV into the new layout; the compiled step's caches stay where they are)."""
        old_slot, old_slots = self.row_slot[keep], self.slots
        self.row_prompt = self.row_prompt[keep]
        group_first = self._set_layout(self.row_prompt)
        if self.native is not None:
            self.row_cache = self.row_cache[keep]
            self._place_cache_rows()
            return
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
            self.slot_cache,
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
