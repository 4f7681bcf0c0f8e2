"""A static, preallocated key/value cache (gpt-fast style).

One tensor pair holds every layer: ``keys`` / ``values`` of shape
``[layers, batch, kv_heads, max_length, dim_head]``, plus the :class:`TokenLayout` ids of every
written position so that the attention mask of a later chunk can be built from the same rule.

A forward over a chunk of ``c`` tokens with a cache either

- writes the chunk (``write=True``): its K/V land at ``[length, length + c)`` and ``length``
  advances by ``c`` at the end of the forward; or
- only reads (``write=False``): the chunk attends to the cached prefix plus itself and the cache's
  contents ``[0, length)``, its layout and ``length`` stay exactly as they were — every denoising step
  but the last. (Its K/V use the free slots after ``length`` as scratch space.)

CFG is a doubled batch inside the same cache (conditional rows first).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .._utils import check
from .masks import NO_BLOCK, PADDING, TokenLayout


class KVCache(nn.Module):
    def __init__(self, *, num_layers: int, batch_size: int, max_length: int, kv_heads: int, dim_head: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        check(min(num_layers, batch_size, max_length, kv_heads, dim_head) > 0,
              "KVCache sizes (num_layers, batch_size, max_length, kv_heads, dim_head) must all be positive")
        shape = (num_layers, batch_size, kv_heads, max_length, dim_head)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("segment_ids", torch.full((batch_size, max_length), PADDING, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("block_ids", torch.full((batch_size, max_length), NO_BLOCK, dtype=torch.long, device=device), persistent=False)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def layout(self) -> TokenLayout:
        """Layout of the written positions ``[0, length)``."""
        return TokenLayout(self.segment_ids[:, :self.length], self.block_ids[:, :self.length])

    def check_chunk(self, batch: int, chunk_length: int) -> None:
        check(batch == self.batch_size,
              f"the cache holds a batch of {self.batch_size}, but the input has a batch of {batch}")
        check(self.length + chunk_length <= self.max_length,
              f"KV cache overflow: {self.length} cached + {chunk_length} new tokens exceed max_length={self.max_length}",
              error=RuntimeError)

    def attend_keys(self, layer: int, k: Tensor, v: Tensor, write: bool) -> Tuple[Tensor, Tensor]:
        """The keys and values a chunk attends to: the cached prefix followed by the chunk itself.

        Either way the chunk's K/V go into the slots after ``length`` (no copy of the prefix); only a
        written chunk advances ``length``, so a read-only chunk's slots are free again afterwards.
        """
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, layout: TokenLayout) -> None:
        """Record the layout of a written chunk and move the write position past it."""
        start, end = self.length, self.length + layout.shape[1]
        self.segment_ids[:, start:end] = layout.segment_ids
        self.block_ids[:, start:end] = layout.block_ids
        self.length = end

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (the rest is overwritten by later writes)."""
        check(0 <= length <= self.length, f"`length` must be in [0, {self.length}], got {length}")
        self.length = length

    def reset(self) -> None:
        self.truncate(0)

    def select(self, rows: Tensor) -> None:
        """Keep only the given batch rows, in place (e.g. to drop finished samples)."""
        for name in ("keys", "values"):
            setattr(self, name, getattr(self, name)[:, rows])
        self.segment_ids, self.block_ids = self.segment_ids[rows], self.block_ids[rows]

    def extra_repr(self) -> str:
        layers, batch, heads, max_length, dim_head = self.keys.shape
        return f"layers={layers}, batch={batch}, kv_heads={heads}, max_length={max_length}, dim_head={dim_head}, length={self.length}"
