"""A key/value cache whose buffers are allocated once per batch, for eval.generate's decoding loop.

transformers' ``DynamicCache`` concatenates every layer's keys and values at every step (a
fresh ``[rows, heads, length, head_dim]`` tensor per layer per token, and a copy of all that
came before); ``StaticCache`` writes in place but hands the attention the whole
``max_cache_len`` buffer each step, so every step attends over (and masks out) the slots
not yet written.  :class:`PreallocatedCache` writes in place too and returns a view of the
slots written so far: no allocation, no copy and no attention over empty slots.  The model's
attention reads it through the ordinary ``Cache.update`` call, so any model whose layers use
that (Llama, Qwen2, GPT-2, Mistral, ...) takes it unchanged.

Needs transformers' layered cache API (``CacheLayerMixin``, 4.56+); :func:`preallocated_cache`
returns None where it is missing and the caller lets the model build its own cache.
"""
from __future__ import annotations

import torch

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # an older transformers without per-layer cache objects
    Cache = CacheLayerMixin = None


if CacheLayerMixin is not None:

    class PreallocatedLayer(CacheLayerMixin):
        """One layer's keys and values: ``[rows, heads, capacity, head_dim]`` buffers filled left to right."""

        is_compileable = False
        is_sliding = False

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            rows, heads = key_states.shape[:2]
            self.device = key_states.device
            self.dtype = key_states.dtype
            self.keys = key_states.new_empty((rows, heads, self.capacity, key_states.shape[-1]))
            self.values = value_states.new_empty((rows, heads, self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"preallocated KV cache holds {self.capacity} positions, asked for {end}")
            self.keys[:, :, self.length:end].copy_(key_states)
            self.values[:, :, self.length:end].copy_(value_states)
            self.length = end
            return self.keys[:, :, :end], self.values[:, :, :end]

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            # Asked before update (like DynamicLayer): the keys will be what is cached plus the query.
            return self.length + query_length, 0

        def get_max_length(self) -> int:
            return self.capacity

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            # A copy of the kept rows (only when many rows have finished: see eval.generate).
            if self.is_initialized:
                self.keys = self.keys[indices]
                self.values = self.values[indices]

        def reset(self) -> None:
            self.length = 0

        def crop(self, max_length: int) -> None:
            raise NotImplementedError("the preallocated KV cache is not cropped")

    class PreallocatedCache(Cache):
        """A ``Cache`` of :class:`PreallocatedLayer`, one per attention layer (created on first use)."""

        def __init__(self, capacity: int):
            super().__init__(layer_class_to_replicate=lambda: PreallocatedLayer(capacity))
            self.capacity = capacity


def preallocated_cache(capacity: int):
    """A cache for ``capacity`` positions (prompt width plus new tokens), or None without the layered API."""
    if CacheLayerMixin is None:
        return None
    return PreallocatedCache(capacity)
