"""The one decoding engine: a sequence of rows that grows chunk by chunk, cached or recomputed.

Every generating model in this library (Transfusion, MonoFormer, LlamaGen, DnD) decodes through a
:class:`Decoder`. The model supplies

- its chunk type: consecutive tokens of every row, as per-token tensors ``[rows, c, ...]`` (subclass
  :class:`SequenceChunk`, which knows how to concatenate and row-select such records), and
- ``run(chunk, cache, write, **kwargs) -> hidden [rows, c', d]``: embed the chunk and run its backbone
  (with ``cache=None`` the chunk is the whole sequence so far).

The engine offers four operations:

- :meth:`Decoder.write`: the prefill, or one step: the chunk becomes part of the sequence;
- :meth:`Decoder.read`: a read-only step: the chunk attends to the sequence plus itself and the
  sequence stays as it was (every denoising step of a modality against its cached prefix);
- :meth:`Decoder.keep_rows`: row selection (drop CFG twins once guidance stops, or finished rows);
- ``use_cache=False``: the reference path, which recomputes the whole sequence for every call through
  the same model function; the cached path is tested against it.

With a cache the engine owns it: a static :class:`~mmgen_pytorch.backbone.kv_cache.KVCache` written at
``input_pos`` that grows by itself when a chunk would not fit.

``compile=True`` (gpt-fast style) makes that cache fixed-shape (``static``: every window exposes all its
slots, the unwritten ones masked) and ``compiled``: every call after the prefill runs the backbone's
blocks as a ``torch.compile``-d graph that is compiled once per chunk shape and reused for every position
(CUDA graphs on CUDA), while the host side (opening the window at ``input_pos``, committing the length,
growth, row selection) stays eager. See :meth:`~mmgen_pytorch.backbone.Transformer._compiled_blocks`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, TypeVar, Union

import torch
from torch import Tensor

from .._utils import check, check_flag, round_up_to_multiple
from .kv_cache import KVCache
from .masks import TokenLayout

ChunkT = TypeVar("ChunkT", bound="SequenceChunk")
RunChunk = Callable[..., Tensor]  # run(chunk, cache: Optional[KVCache], write: bool, **kwargs) -> hidden
Rows = Union[Tensor, Sequence[int]]
COMPILED_LENGTH_MULTIPLE = 256  # a compiled cache's slots: generations of different lengths share graphs


class SequenceChunk:
    """Consecutive tokens of every row, as a dataclass whose fields are per-token tensors
    ``[rows, c, ...]`` or :class:`TokenLayout` s. A ``None`` field is absent (a ``None`` layout: plain
    causal tokens of one sample per row). A subclass with other kinds of fields overrides
    :meth:`concat` and :meth:`select_rows`."""

    @property
    def length(self) -> int:
        return self._first_tensor().shape[1]

    @property
    def rows(self) -> int:
        return self._first_tensor().shape[0]

    @classmethod
    def concat(cls: type[ChunkT], chunks: Sequence[ChunkT]) -> ChunkT:
        """The chunks one after the other, as one chunk."""
        if len(chunks) == 1:
            return chunks[0]
        return _map_fields(chunks, lambda values: torch.cat(values, dim=1))

    def select_rows(self: ChunkT, rows: Tensor) -> ChunkT:
        return _map_fields([self], lambda values: values[0][rows])

    def _first_tensor(self) -> Tensor:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, TokenLayout):
                return value.segment_ids
            if isinstance(value, Tensor):
                return value
        raise TypeError(f"{type(self).__name__} holds no per-token tensor")


def _map_fields(chunks: Sequence[ChunkT], combine: Callable[[List[Tensor]], Tensor]) -> ChunkT:
    def merged(values: List[Any]) -> Any:
        present = [v for v in values if v is not None]
        if not present:
            return None
        if isinstance(present[0], TokenLayout):
            layouts = [v if v is not None else TokenLayout.causal(c.rows, c.length, device=present[0].segment_ids.device)
                       for v, c in zip(values, chunks)]
            limits = [v.causal_limits for v in layouts]
            return TokenLayout(combine([v.segment_ids for v in layouts]), combine([v.block_ids for v in layouts]),
                               None if any(limit is None for limit in limits) else combine(limits))
        check(len(present) == len(values) and all(isinstance(v, Tensor) for v in values),
              f"{type(chunks[0]).__name__}: every field must be a per-token tensor in every chunk (or a layout); "
              f"override `concat` and `select_rows` for other fields")
        return combine(values)

    first = chunks[0]
    return dataclasses.replace(first, **{f.name: merged([getattr(c, f.name) for c in chunks])
                                         for f in dataclasses.fields(first)})


def check_compile(compile: bool, use_cache: bool) -> None:
    """``compile`` and ``use_cache`` as a generating method takes them (checked before any work): the
    compiled decode step runs on the KV cache, so ``compile=True`` with ``use_cache=False`` is refused."""
    check_flag("compile", compile)
    check(use_cache or not compile,
          "`compile=True` needs `use_cache=True`: the compiled decode step runs on the static KV cache, "
          "and `use_cache=False` (the reference path) recomputes the whole sequence instead")


class Decoder:
    """Decode ``rows`` rows through ``run`` (see the module docstring).

    Args:
        run: ``run(chunk, cache, write, **kwargs) -> hidden [rows, c', d]``, the model's embed + backbone.
        new_cache: ``new_cache(rows, max_length, **options) -> KVCache`` (e.g. ``Transformer.new_cache``);
            with ``compile`` it is called with ``static=True, compiled=True``.
        rows: batch rows (CFG twins included).
        max_length: tokens to preallocate; the cache grows beyond it if needed.
        use_cache: ``False`` recomputes the whole sequence for every call (the reference path).
        compile: run every call but the first write (the prefill, which runs once and whose length changes
            with the prompt) through the backbone's compiled decode step on a fixed-shape cache: the same
            results, faster once compiled (the first call of each chunk shape compiles; later calls and
            later decoders reuse the graph). Needs ``use_cache``. The cache then holds ``max_length``
            rounded up to a multiple of ``COMPILED_LENGTH_MULTIPLE`` (256) slots, so that generations of
            different lengths share their graphs. A shape change (another chunk length, :meth:`keep_rows`,
            growth of the cache) compiles one more graph (on CUDA: captures one more CUDA graph).
    """

    def __init__(self, run: RunChunk, *, new_cache: Callable[..., KVCache], rows: int, max_length: int,
                 use_cache: bool = True, compile: bool = False):
        check_compile(compile, use_cache)
        check(rows > 0 and max_length > 0, f"`rows` and `max_length` must be positive, got {rows} and {max_length}")
        self.run, self.compile = run, compile
        self.cache: Optional[KVCache] = None
        if use_cache:
            if compile:
                max_length = round_up_to_multiple(max_length, COMPILED_LENGTH_MULTIPLE)
            self.cache = new_cache(rows, max_length, static=True, compiled=True) if compile else new_cache(rows, max_length)
        self.history: List[SequenceChunk] = []

    @property
    def length(self) -> int:
        """Tokens in the sequence so far."""
        if self.cache is not None:
            return self.cache.length
        return sum(chunk.length for chunk in self.history)

    def write(self, chunk: SequenceChunk, **kwargs) -> Tensor:
        """Run ``chunk`` as the continuation of the sequence and keep it there; its hidden states."""
        return self._forward(chunk, write=True, **kwargs)

    def read(self, chunk: SequenceChunk, **kwargs) -> Tensor:
        """Run ``chunk`` against the sequence without keeping it; its hidden states."""
        return self._forward(chunk, write=False, **kwargs)

    def keep_rows(self, rows: Rows) -> None:
        """Keep only these batch rows, in this order."""
        device = self.cache.keys.device if self.cache is not None else None
        rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        if self.cache is not None:
            self.cache.select(rows)
        self.history = [chunk.select_rows(rows.to(chunk._first_tensor().device)) for chunk in self.history]

    def _forward(self, chunk: SequenceChunk, *, write: bool, **kwargs) -> Tensor:
        if self.cache is not None:
            self.cache.reserve(chunk.length)
            self.cache.compiled = self.compile and self.cache.length > 0  # the prefill runs eagerly
            return self.run(chunk, cache=self.cache, write=write, **kwargs)
        whole = type(chunk).concat(self.history + [chunk])
        hidden = self.run(whole, cache=None, write=write, **kwargs)[:, -chunk.length:]
        if write:
            self.history.append(chunk)
        return hidden
