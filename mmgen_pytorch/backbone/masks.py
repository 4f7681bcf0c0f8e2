"""One attention-mask definition, two backends.

A batch row is described per token by two integer ids:

- ``segment_ids``: which sample the token belongs to (``-1`` = padding). Several samples may be
  packed into one row; tokens never attend across samples.
- ``block_ids``: which bidirectional block the token lies in (``-1`` = none, i.e. causal).

The rule, written once in :func:`visible`: a query at index ``q`` sees a key at index ``kv`` iff
they are in the same sample, the key is not padding, and (``kv <= q`` or both lie in the same
block). An optional per-token ``causal_limits`` replaces ``q`` in ``kv <= q``: a token placed late in
the row can then see only the keys up to an earlier index (Transfusion puts the noised copy of a
modality after the sample and lets it see only the prefix that precedes the clean modality). A padding query sees only itself, so every row of the mask has at least one ``True``
(no NaN from an empty softmax); its output is defined as attention onto its own value.

From that one function come both the dense ``[b, 1, q, kv]`` boolean mask for
``scaled_dot_product_attention`` and the ``mask_mod`` for flex attention's ``BlockMask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import check, round_up_to_multiple

PADDING = -1
NO_BLOCK = -1
FLEX_BLOCK = 128  # flex attention's sparse block: BlockMask lengths are rounded up to a multiple of it

Span = Tuple[int, int]  # (start, length)


def visible(q_segment: Tensor, q_block: Tensor, q_index: Tensor,
            kv_segment: Tensor, kv_block: Tensor, kv_index: Tensor, q_limit: Optional[Tensor] = None) -> Tensor:
    """The mask rule. Works elementwise on broadcastable tensors, and on flex's scalar indices."""
    q_limit = q_index if q_limit is None else q_limit
    same_sample = (q_segment == kv_segment) & (kv_segment != PADDING)
    same_block = (q_block == kv_block) & (q_block != NO_BLOCK)
    return (same_sample & ((kv_index <= q_limit) | same_block)) | (kv_index == q_index)


@dataclass
class TokenLayout:
    """Per-token sample and block ids of a ``[batch, length]`` token grid."""

    segment_ids: Tensor  # long [b, n]; PADDING for padding
    block_ids: Tensor    # long [b, n]; NO_BLOCK for causal tokens
    causal_limits: Optional[Tensor] = None  # long [b, n]; absolute key index each query sees up to

    def __post_init__(self):
        check(self.segment_ids.ndim == 2 and self.segment_ids.shape == self.block_ids.shape,
              f"`segment_ids` and `block_ids` must both be [batch, length], got "
              f"{tuple(self.segment_ids.shape)} and {tuple(self.block_ids.shape)}")
        check(not self.segment_ids.is_floating_point() and not self.block_ids.is_floating_point(),
              "`segment_ids` and `block_ids` must be integer tensors")
        if self.causal_limits is not None:
            check(self.causal_limits.shape == self.segment_ids.shape and not self.causal_limits.is_floating_point(),
                  f"`causal_limits` must be an integer tensor shaped like `segment_ids` {tuple(self.segment_ids.shape)}, "
                  f"got {self.causal_limits.dtype} {tuple(self.causal_limits.shape)}")

    # construction

    @classmethod
    def causal(cls, batch: int, length: int, device=None) -> "TokenLayout":
        return cls(torch.zeros(batch, length, dtype=torch.long, device=device),
                   torch.full((batch, length), NO_BLOCK, dtype=torch.long, device=device))

    @classmethod
    def bidirectional(cls, batch: int, length: int, device=None) -> "TokenLayout":
        """One sample per row, every token seeing every other (one block)."""
        zeros = torch.zeros(batch, length, dtype=torch.long, device=device)
        return cls(zeros, zeros.clone())

    @classmethod
    def from_spans(cls, *, lengths: Sequence[int], blocks: Optional[Sequence[Sequence[Span]]] = None,
                   starts: Optional[Sequence[int]] = None, total_length: Optional[int] = None,
                   device=None) -> "TokenLayout":
        """One sample per row: sample ``i`` occupies ``[starts[i], starts[i] + lengths[i])`` and its
        bidirectional blocks are ``(start, length)`` spans in row coordinates; the rest is padding.

        ``starts`` defaults to 0 (right padding); pass ``total_length - lengths`` for left padding.
        """
        lengths = [int(n) for n in lengths]
        batch = len(lengths)
        check(batch > 0, "`lengths` must name at least one sample")
        starts = [0] * batch if starts is None else [int(s) for s in starts]
        blocks = [[] for _ in range(batch)] if blocks is None else blocks
        check(len(starts) == batch and len(blocks) == batch,
              f"`starts` and `blocks` need one entry per sample ({batch}), "
              f"got {len(starts)} and {len(blocks)}")
        ends = [s + n for s, n in zip(starts, lengths)]
        total_length = max(ends) if total_length is None else int(total_length)

        segment_ids = torch.full((batch, total_length), PADDING, dtype=torch.long)
        block_ids = torch.full((batch, total_length), NO_BLOCK, dtype=torch.long)
        for row, (start, end, spans) in enumerate(zip(starts, ends, blocks)):
            check(start >= 0 and lengths[row] >= 0 and end <= total_length,
                  f"sample {row} spans [{start}, {end}), which must lie inside [0, {total_length})")
            segment_ids[row, start:end] = 0
            _fill_blocks(block_ids[row], spans, start, end, row)
        return cls(segment_ids.to(device), block_ids.to(device))

    # properties

    @property
    def shape(self) -> torch.Size:
        return self.segment_ids.shape

    @property
    def is_padding(self) -> Tensor:
        return self.segment_ids == PADDING

    # the two backends

    def dense_mask(self, keys: Optional["TokenLayout"] = None, query_offset: int = 0,
                   query_index: Optional[Tensor] = None) -> Tensor:
        """Bool ``[b, 1, q, kv]``: True where attention is allowed.

        ``keys`` describes the key tokens (default: the queries themselves). Query ``i`` sits at
        key index ``query_offset + i``, as when a chunk attends to a cached prefix plus itself, or at
        ``query_index[i]`` (a long tensor ``[q]``: a cache's ``input_pos``).
        """
        keys = self if keys is None else keys
        q_index = self._query_index(query_offset, query_index)
        kv_index = torch.arange(keys.shape[1], device=self.segment_ids.device)
        q_limit = None if self.causal_limits is None else self.causal_limits[:, :, None]
        mask = visible(self.segment_ids[:, :, None], self.block_ids[:, :, None], q_index[:, None],
                       keys.segment_ids[:, None, :], keys.block_ids[:, None, :], kv_index[None, :], q_limit)
        return mask[:, None]

    def mask_mod(self, keys: Optional["TokenLayout"] = None, query_offset: int = 0,
                 query_index: Optional[Tensor] = None):
        """The same rule as :meth:`dense_mask`, as a flex-attention ``mask_mod(b, h, q, kv)``."""
        keys = self if keys is None else keys
        q_index = self._query_index(query_offset, query_index)
        q_segment, q_block = self.segment_ids, self.block_ids
        kv_segment, kv_block = keys.segment_ids, keys.block_ids
        limits = self.causal_limits

        def mask_mod(b, h, q, kv):
            q_limit = None if limits is None else limits[b, q]
            return visible(q_segment[b, q], q_block[b, q], q_index[q],
                           kv_segment[b, kv], kv_block[b, kv], kv, q_limit)

        return mask_mod

    def block_mask(self, keys: Optional["TokenLayout"] = None, query_offset: int = 0,
                   query_index: Optional[Tensor] = None):
        """The same rule as a flex ``BlockMask`` whose query and key lengths are rounded up to
        :data:`FLEX_BLOCK` (the extra queries and keys are padding), so that ragged batches fall into
        a few shapes and the compiled kernel is reused; the attention pads its inputs to match."""
        q_index = self._query_index(query_offset, query_index)
        queries = self.padded_to(round_up_to_multiple(self.shape[1], FLEX_BLOCK))
        # self-attention shares one padded layout, whatever the length: dynamo guards on tensor aliasing
        keys = queries if keys is None or keys is self else keys.padded_to(round_up_to_multiple(keys.shape[1], FLEX_BLOCK))
        extra = queries.shape[1] - self.shape[1]
        q_index = torch.cat((q_index, q_index[-1] + 1 + torch.arange(extra, device=q_index.device)))
        return _create_block_mask(queries.mask_mod(keys, query_index=q_index), B=self.shape[0], H=None,
                                  Q_LEN=queries.shape[1], KV_LEN=keys.shape[1], device=self.segment_ids.device)

    def padded_to(self, length: int) -> "TokenLayout":
        """This layout followed by padding tokens up to ``length``."""
        extra = length - self.shape[1]
        check(extra >= 0, f"cannot pad a layout of length {self.shape[1]} to {length}")
        if extra == 0:
            return self
        padded = lambda ids, fill: F.pad(ids, (0, extra), value=fill)  # noqa: E731
        limits = None if self.causal_limits is None else padded(self.causal_limits, 0)
        return TokenLayout(padded(self.segment_ids, PADDING), padded(self.block_ids, NO_BLOCK), limits)

    def _query_index(self, offset: int, index: Optional[Tensor]) -> Tensor:
        if index is not None:
            check(tuple(index.shape) == (self.shape[1],), f"`query_index` must be [{self.shape[1]}], got {tuple(index.shape)}")
            return index
        return torch.arange(self.shape[1], device=self.segment_ids.device) + offset


def _create_block_mask(mask_mod, **sizes):
    """torch's ``create_block_mask``; on CUDA compiled, as torch >= 2.6 recommends (the deprecated
    ``_compile=True`` did the same), which never materialises the dense ``[b, q, kv]`` mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    build = _compiled_create_block_mask() if sizes["device"].type == "cuda" else create_block_mask
    return build(mask_mod, **sizes)


@lru_cache(maxsize=None)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    return torch.compile(create_block_mask)


def _fill_blocks(block_row: Tensor, spans: Sequence[Span], start: int, end: int, row: int) -> None:
    previous_end = start
    for block_id, (block_start, block_length) in enumerate(sorted((int(s), int(n)) for s, n in spans)):
        block_end = block_start + block_length
        check(block_length > 0, f"sample {row}: block ({block_start}, {block_length}) must have a positive length")
        check(block_start >= start and block_end <= end,
              f"sample {row}: block ({block_start}, {block_length}) exceeds the sample's extent [{start}, {end})")
        check(block_start >= previous_end,
              f"sample {row}: block ({block_start}, {block_length}) overlaps the previous block, which ends at {previous_end}")
        block_row[block_start:block_end] = block_id
        previous_end = block_end
