"""A static, preallocated key/value cache (gpt-fast's shape).

One tensor pair holds every layer: ``keys`` / ``values`` of shape
``[layers, batch, kv_heads, max_length, dim_head]``, beside the :class:`TokenLayout` ids of every
slot (``segment_ids`` / ``block_ids`` ``[batch, max_length]``, padding where nothing was written), so
that the attention mask of a later chunk comes from the same rule as everything else.

A forward over a chunk of ``c`` tokens opens a :class:`CacheWindow` at ``input_pos = [length,
length + c)``: every layer writes its K/V there in place (``index_put_``) and attends to the slots the
window exposes, and the chunk's layout ids are written at the same positions. Then either

- the chunk is **written** (``write=True``): ``length`` advances to ``length + c``; or
- it was only **read** (``write=False``): ``length`` stays, so the slots after it are scratch space
  that the next chunk overwrites — every denoising step but the last, run against the cached prefix.

A window exposes ``[0, length + c)`` (``static=False``: the cheapest shapes in eager mode) or all
``max_length`` slots with the unwritten ones hidden by the mask (``static=True``: every decode step
has the same shapes, so it can be compiled once). A static cache may also ask for ``compiled`` steps:
every forward through it then runs the transformer's compiled decode step (see
:meth:`~mmgen_pytorch.backbone.Transformer.forward`); the window is still opened and committed here,
eagerly. Growth (:meth:`KVCache.reserve`) is the cache's own business. CFG is a doubled batch inside
the same cache (conditional rows first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .._utils import check
from .masks import NO_BLOCK, PADDING, TokenLayout


class KVCache(nn.Module):
    def __init__(self, *, num_layers: int, batch_size: int, max_length: int, kv_heads: int, dim_head: int,
                 dtype: torch.dtype = torch.float32, device=None, static: bool = False, compiled: bool = False):
        super().__init__()
        check(min(num_layers, batch_size, max_length, kv_heads, dim_head) > 0,
              "KVCache sizes (num_layers, batch_size, max_length, kv_heads, dim_head) must all be positive")
        check(static or not compiled, "a KVCache with `compiled=True` needs `static=True` (fixed-shape windows)")
        shape = (num_layers, batch_size, kv_heads, max_length, dim_head)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("segment_ids", torch.full((batch_size, max_length), PADDING, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("block_ids", torch.full((batch_size, max_length), NO_BLOCK, dtype=torch.long, device=device), persistent=False)
        self.length = 0
        self.static = static
        self.compiled = compiled  # forwards through this cache run the transformer's compiled step
        self._history = 0  # bumped whenever the cached sequence [0, length) may change
        self._mask_memo: Optional[Tuple[TokenLayout, tuple, Any]] = None

    def _apply(self, fn, recurse=True):
        self._history += 1  # buffers moved or cast (`.to`): a kept mask would be on the old device
        return super()._apply(fn, recurse)

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

    # one forward

    def check_chunk(self, batch: int, chunk_length: int) -> None:
        check(batch == self.batch_size,
              f"the cache holds a batch of {self.batch_size}, but the input has a batch of {batch}")
        check(self.length + chunk_length <= self.max_length,
              f"KV cache overflow: {self.length} cached + {chunk_length} new tokens exceed max_length={self.max_length}",
              error=RuntimeError)

    def open(self, layout: TokenLayout, input_pos: Tensor | None = None) -> "CacheWindow":
        """The window of a chunk with ``layout [batch, c]``: it sits at ``input_pos`` (default
        ``[length, length + c)``, which must be the case for a chunk that is later committed), whose
        layout ids are written now."""
        chunk_length = layout.shape[1]
        appends = input_pos is None
        if appends:
            input_pos = torch.arange(self.length, self.length + chunk_length, device=self.keys.device)
        self.segment_ids.index_copy_(1, input_pos, layout.segment_ids)
        self.block_ids.index_copy_(1, input_pos, layout.block_ids)
        end = self.length + chunk_length
        return CacheWindow(self, input_pos, self.max_length if self.static else end, appends=appends)

    def commit(self, chunk_length: int) -> None:
        """A written chunk becomes part of the sequence: ``length`` moves past it."""
        self.length += chunk_length
        self._history += 1

    def reusable_mask(self, queries: TokenLayout, window: "CacheWindow", backend: str, build: Callable[[], Any]) -> Any:
        """``build()``, the attention mask of a chunk, reused while the same ``queries`` layout object is
        run again right after the same cached sequence with the same backend: every denoising step of a
        modality (and its final write) shares one mask. A layout must not be modified in place between
        such calls."""
        key = (self._history, self.length, window.span, backend)
        memo = self._mask_memo
        if window.appends and memo is not None and memo[0] is queries and memo[1] == key:
            return memo[2]
        mask = build()
        self._mask_memo = (queries, key, mask) if window.appends else None
        return mask

    # the sequence

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens, growing the buffers (at least doubling) if needed; the
        written positions are kept."""
        needed = self.length + extra
        if needed <= self.max_length:
            return
        size, kept = max(needed, 2 * self.max_length), self.length

        def grown(old: Tensor, dim: int, fill) -> Tensor:
            new = old.new_full((*old.shape[:dim], size, *old.shape[dim + 1:]), fill)
            new.narrow(dim, 0, kept).copy_(old.narrow(dim, 0, kept))
            return new

        self.keys, self.values = grown(self.keys, 3, 0), grown(self.values, 3, 0)
        self.segment_ids, self.block_ids = grown(self.segment_ids, 1, PADDING), grown(self.block_ids, 1, NO_BLOCK)
        self._history += 1

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` positions (the rest is overwritten by later writes)."""
        check(0 <= length <= self.length, f"`length` must be in [0, {self.length}], got {length}")
        self.length = length
        self._history += 1

    def reset(self) -> None:
        self.truncate(0)

    def select(self, rows: Tensor) -> None:
        """Keep only the given batch rows, in place (e.g. to drop finished samples)."""
        for name in ("keys", "values"):
            setattr(self, name, getattr(self, name)[:, rows])
        self.segment_ids, self.block_ids = self.segment_ids[rows], self.block_ids[rows]
        self._history += 1

    def extra_repr(self) -> str:
        layers, batch, heads, max_length, dim_head = self.keys.shape
        return (f"layers={layers}, batch={batch}, kv_heads={heads}, max_length={max_length}, dim_head={dim_head}, "
                f"length={self.length}, static={self.static}, compiled={self.compiled}")


@dataclass
class CacheWindow:
    """What one forward over a chunk reads and writes: the chunk sits at ``input_pos``; attention sees
    slots ``[0, span)``, of which those at or after the chunk's end are hidden (static windows)."""

    cache: KVCache
    input_pos: Tensor  # long [c]
    span: int
    appends: bool = True  # the chunk sits right after the cached sequence (the default input_pos)

    def update(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Write this layer's chunk K/V ``[b, kv_heads, c, d]``; return the K/V it attends to."""
        keys, values = self.cache.keys, self.cache.values
        # one index_put_ on the whole buffer (not a write into the view ``keys[layer]``): a compiled step
        # then updates it in place, where a write into a view copies the buffer at every step
        batch, heads = keys.shape[1:3]
        device = keys.device
        index = (torch.tensor([layer], device=device).view(1, 1, 1), torch.arange(batch, device=device).view(-1, 1, 1),
                 torch.arange(heads, device=device).view(1, -1, 1), self.input_pos.view(1, 1, -1))
        keys.index_put_(index, k.to(keys.dtype))
        values.index_put_(index, v.to(values.dtype))
        return keys[layer, :, :, :self.span], values[layer, :, :, :self.span]

    def key_layout(self) -> TokenLayout:
        """The layout of the exposed slots; in a static window the slots after the chunk read as padding."""
        segments, blocks = self.cache.segment_ids[:, :self.span], self.cache.block_ids[:, :self.span]
        if self.cache.static:
            unwritten = torch.arange(self.span, device=segments.device) > self.input_pos[-1]
            segments = segments.masked_fill(unwritten, PADDING)
        return TokenLayout(segments, blocks)
