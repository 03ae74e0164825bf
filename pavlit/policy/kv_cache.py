"""The Hugging Face path's KV cache: a ``DynamicCache`` whose layers write into a preallocated buffer.

Used by the sampler's decode loop (:mod:`pavlit.policy.decode`) for the prefill (every model) and for decoding
models the grouped decoder does not support.
"""

from __future__ import annotations

from typing import Any

import torch


def _preallocated_layer_class() -> type | None:
    """A ``DynamicLayer`` that writes into a preallocated buffer instead of concatenating every token.

    HF's ``DynamicLayer`` runs ``torch.cat`` over the whole cache for every new token (quadratic copying, and
    the largest cost of small-model decoding on CPU). This subclass keeps the same semantics (keys/values are
    views of exactly the tokens seen, so masks are sized as usual) on top of a buffer that grows by doubling.
    ``None`` on transformers versions without the layered cache API.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int = 0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.capacity = capacity
            self.length = 0

        def _views(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def _reallocate(self, rows: torch.Tensor | None, capacity: int) -> None:
            keys, values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
            if rows is not None:
                keys, values = keys[rows], values[rows]
            shape = list(keys.shape)
            shape[2] = capacity
            self.key_buffer = keys.new_empty(shape)
            self.value_buffer = values.new_empty(shape[:3] + [values.shape[-1]])
            self.key_buffer[:, :, : self.length] = keys
            self.value_buffer[:, :, : self.length] = values
            self.capacity = capacity
            self._views()

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            new = key_states.shape[-2]
            if not self.is_initialized:
                self.device = key_states.device
                self.is_initialized = True
                self.length = 0
                capacity = max(self.capacity, new)
                self.key_buffer = key_states.new_empty(key_states.shape[:2] + (capacity, key_states.shape[-1]))
                self.value_buffer = value_states.new_empty(value_states.shape[:2] + (capacity, value_states.shape[-1]))
                self.capacity = capacity
            elif self.length + new > self.capacity:
                self._reallocate(None, max(2 * self.capacity, self.length + new))
            self.key_buffer[:, :, self.length : self.length + new] = key_states
            self.value_buffer[:, :, self.length : self.length + new] = value_states
            self.length += new
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._reallocate(indices, self.capacity)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                rows = torch.arange(self.key_buffer.shape[0], device=self.key_buffer.device)
                self._reallocate(rows.repeat_interleave(repeats), self.capacity)

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            if self.is_initialized and tokens_to_remove:
                self.length = max(0, self.length + tokens_to_remove)
                self._views()

    return PreallocatedLayer


_PREALLOCATED_LAYER = _preallocated_layer_class()


def new_cache(config: Any, capacity: int) -> Any:
    """A ``DynamicCache`` for ``config`` whose plain layers preallocate ``capacity`` tokens (``None`` before
    transformers 4.36, where the model builds its own tuples)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()
    if _PREALLOCATED_LAYER is not None and getattr(cache, "layers", None):
        cache.layers = [
            _PREALLOCATED_LAYER(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
    return cache
