"""The one pre-norm transformer every model in this library is built on, configured, not forked.

Inputs are embeddings ``[b, n, dim]``; token embeddings, heads and absolute position embeddings
live in the models. A forward builds its attention mask and rotary table once and hands them to
every block.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._utils import check, default, divisible_by, round_up_to_multiple
from ..saving import Checkpointable
from .attention import BACKENDS, Attention, AttentionMask, flex_available
from .kv_cache import CacheWindow, KVCache
from .masks import TokenLayout
from .norms import make_norm
from .positions import RotaryEmbedding, sequence_positions

FEED_FORWARDS = ("swiglu", "gelu")

BlockHook = Callable[[int, Tensor], Optional[Tensor]]


def swiglu_hidden_dim(dim: int, *, mult: float = 4.0, multiple_of: int = 256,
                      multiplier: Optional[float] = None) -> int:
    """LLaMA's rule: two thirds of ``mult * dim``, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * int(mult * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return round_up_to_multiple(hidden, multiple_of)


class FeedForward(nn.Module):
    """SwiGLU ``proj_out(silu(gate) * up)`` with ``proj_in = [gate; up]``, or a GELU MLP."""

    def __init__(self, dim: int, hidden: int, *, kind: str = "swiglu", bias: bool = False, dropout: float = 0.0,
                 hidden_dropout: float = 0.0):
        super().__init__()
        check(kind in FEED_FORWARDS, f"`ff` must be one of {FEED_FORWARDS}, got {kind!r}")
        self.kind = kind
        self.proj_in = nn.Linear(dim, hidden * (2 if kind == "swiglu" else 1), bias=bias)
        self.proj_out = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.hidden_dropout = nn.Dropout(hidden_dropout)  # timm's Mlp drops after the activation too

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.proj_in(x)
        if self.kind == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return self.dropout(self.proj_out(self.hidden_dropout(hidden)))


class AdaptiveModulation(nn.Module):
    """adaLN-Zero (DiT): shift, scale and gate for both sub-blocks from a per-token condition.

    Only tokens flagged in ``cond_mask`` are modulated; every other token gets shift 0, scale 0 and
    gate 1, i.e. exactly the unconditioned block. With ``cond_index`` the condition is a table of
    ``k`` rows, modulated once per row and gathered per token (cheap when many tokens share one
    condition, like every token of a noised image sharing its timestep).
    """

    def __init__(self, dim: int, dim_cond: int):
        super().__init__()
        self.to_modulation = nn.Linear(dim_cond, 6 * dim)
        nn.init.zeros_(self.to_modulation.weight)
        nn.init.zeros_(self.to_modulation.bias)

    def forward(self, cond: Tensor, cond_index: Tensor) -> Tuple[Tensor, ...]:
        """``cond``: a ``[k, dim_cond]`` table; ``cond_index [b, n]``: a row per token, ``-1`` for none.

        Returns shift_a, scale_a, gate_a, shift_f, scale_f, gate_f, each ``[b, n, dim]``.
        """
        mod = self.to_modulation(F.silu(cond))
        identity = torch.zeros_like(mod[:1]).view(1, 6, -1)
        identity[:, 2::3] = 1.0  # gates of 1, shifts and scales of 0: the unconditioned block
        table = torch.cat((mod, identity.view(1, -1)))
        rows = torch.where(cond_index < 0, mod.shape[0], cond_index)
        return table[rows].chunk(6, dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, *, attention: Attention, feed_forward: FeedForward, norm: str, norm_eps: float,
                 dim_cond: Optional[int]):
        super().__init__()
        self.attn_norm = make_norm(norm, dim, eps=norm_eps)
        self.attn = attention
        self.ff_norm = make_norm(norm, dim, eps=norm_eps)
        self.ff = feed_forward
        self.modulation = AdaptiveModulation(dim, dim_cond) if dim_cond is not None else None

    def forward(self, x: Tensor, *, cond: Optional[Tensor] = None, cond_index: Optional[Tensor] = None,
                **attn_kwargs) -> Tensor:
        if self.modulation is None or cond is None:
            x = x + self.attn(self.attn_norm(x), **attn_kwargs)
            return x + self.ff(self.ff_norm(x))
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(cond, cond_index)
        x = x + gate_a * self.attn(self.attn_norm(x) * (1 + scale_a) + shift_a, **attn_kwargs)
        return x + gate_f * self.ff(self.ff_norm(x) * (1 + scale_f) + shift_f)


class Transformer(Checkpointable, nn.Module):
    """Pre-norm transformer.

    Args (keyword-only):
        dim, depth, heads: width, number of blocks, query heads.
        dim_head: per-head width (default ``dim // heads``). kv_heads: grouped-query heads (default ``heads``).
        norm: ``"rmsnorm"`` | ``"layernorm"``; norm_eps.
        ff: ``"swiglu"`` | ``"gelu"``; ff_hidden (explicit hidden size) or ff_mult with, for SwiGLU,
            the LLaMA rounding to ff_multiple_of (and optional ff_dim_multiplier); ff_bias.
        qkv_bias, out_bias, qk_norm, attn_scale: attention options.
        attn_dropout, resid_dropout, ff_dropout: dropout probabilities; ff_hidden_dropout: dropout after
            the feed-forward activation (timm's ``Mlp`` applies its ``drop`` there and after ``fc2``).
        rotary_axes: 0 (no rotary), 1 (1-D) or N (N-D axial); rotary_base; rotary_dim (partial rotary).
        dim_cond: enables per-token adaLN-Zero conditioning of that width.
        final_norm: apply a last norm to the output.
        causal: without a ``layout`` (and without a cache) attend causally; ``False`` makes every token
            see every other (MAE / MAR encoders), with no mask tensor at all.
        grad_checkpointing: recompute each block in the backward pass (training without a cache only).
        attn_backend: ``"auto"`` (flex on CUDA, SDPA elsewhere), ``"sdpa"`` or ``"flex"``.
    """

    def __init__(self, *, dim: int, depth: int, heads: int = 8, dim_head: Optional[int] = None,
                 kv_heads: Optional[int] = None, norm: str = "rmsnorm", norm_eps: float = 1e-5,
                 ff: str = "swiglu", ff_mult: float = 4.0, ff_hidden: Optional[int] = None,
                 ff_multiple_of: int = 256, ff_dim_multiplier: Optional[float] = None, ff_bias: bool = False,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False,
                 attn_scale: Optional[float] = None, attn_dropout: float = 0.0, resid_dropout: float = 0.0,
                 ff_dropout: float = 0.0, rotary_axes: int = 1, rotary_base: float = 10000.0,
                 rotary_dim: Optional[int] = None, dim_cond: Optional[int] = None, final_norm: bool = True,
                 attn_backend: str = "auto", ff_hidden_dropout: float = 0.0, causal: bool = True,
                 grad_checkpointing: bool = False):
        super().__init__()
        check(dim > 0 and depth > 0 and heads > 0, f"`dim`, `depth` and `heads` must be positive, got {dim}, {depth}, {heads}")
        check(dim_head is not None or divisible_by(dim, heads),
              f"`dim` ({dim}) must be divisible by `heads` ({heads}) unless `dim_head` is given")
        check(attn_backend in BACKENDS, f"`attn_backend` must be one of {BACKENDS}, got {attn_backend!r}")
        dim_head = default(dim_head, dim // heads)
        kv_heads = default(kv_heads, heads)
        check(divisible_by(heads, kv_heads), f"`heads` ({heads}) must be divisible by `kv_heads` ({kv_heads})")
        if ff_hidden is None:
            ff_hidden = (swiglu_hidden_dim(dim, mult=ff_mult, multiple_of=ff_multiple_of, multiplier=ff_dim_multiplier)
                         if ff == "swiglu" else int(dim * ff_mult))

        self.dim, self.depth, self.heads, self.kv_heads, self.dim_head = dim, depth, heads, kv_heads, dim_head
        self.dim_cond, self.attn_backend = dim_cond, attn_backend
        self.causal, self.grad_checkpointing = causal, grad_checkpointing
        self.rotary = RotaryEmbedding(dim_head, axes=rotary_axes, base=rotary_base, rot_dim=rotary_dim) if rotary_axes else None
        self.layers = nn.ModuleList([
            Block(dim, norm=norm, norm_eps=norm_eps, dim_cond=dim_cond,
                  attention=Attention(dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads, qkv_bias=qkv_bias,
                                      out_bias=out_bias, qk_norm=qk_norm, norm_eps=norm_eps, scale=attn_scale,
                                      attn_dropout=attn_dropout, resid_dropout=resid_dropout),
                  feed_forward=FeedForward(dim, ff_hidden, kind=ff, bias=ff_bias, dropout=ff_dropout,
                                           hidden_dropout=ff_hidden_dropout))
            for _ in range(depth)
        ])
        self.norm = make_norm(norm, dim, eps=norm_eps) if final_norm else nn.Identity()

    # public API

    def new_cache(self, batch_size: int, max_length: int, *, dtype: Optional[torch.dtype] = None, device=None,
                  static: bool = False) -> KVCache:
        """An empty :class:`KVCache` for this transformer (``static``: fixed-shape windows, see there)."""
        reference = next(self.parameters())
        return KVCache(num_layers=self.depth, batch_size=batch_size, max_length=max_length, kv_heads=self.kv_heads,
                       dim_head=self.dim_head, dtype=default(dtype, reference.dtype),
                       device=default(device, reference.device), static=static)

    def forward(self, x: Float[Tensor, "b n d"], *, layout: Optional[TokenLayout] = None,
                positions: Optional[Union[Int[Tensor, "b n"], Int[Tensor, "b n axes"]]] = None,
                zero_rotation: Optional[Bool[Tensor, "b n"]] = None,
                cond: Optional[Union[Float[Tensor, "b n dc"], Float[Tensor, "k dc"]]] = None,
                cond_mask: Optional[Bool[Tensor, "b n"]] = None, cond_index: Optional[Int[Tensor, "b n"]] = None,
                cache: Optional[KVCache] = None, write_cache: bool = True, block_hook: Optional[BlockHook] = None,
                return_hiddens: bool = False, backend: Optional[str] = None):
        """Run the blocks.

        Args:
            x: input embeddings.
            layout: sample/block ids of the tokens (default: one causal sample per row).
            positions: rotary position ids per token, 1 or ``rotary_axes`` coordinates
                (default: ``arange`` continuing after the cache).
            zero_rotation: tokens whose rotation is zeroed (q, k -> 0), LlamaGen's prefix.
            cond, cond_mask: per-token condition for adaLN and which tokens carry it (default all).
            cond_index: instead of ``cond_mask``, ``cond`` is a table ``[k, dim_cond]`` and token
                ``(b, n)`` uses row ``cond_index[b, n]`` (``-1``: no condition).
            cache: a :class:`KVCache`; the tokens continue after its ``length`` positions.
            write_cache: the chunk becomes part of the cached sequence (else it attends to the cached
                prefix plus itself and the cache's ``length`` stays).
            block_hook: ``hook(block_index, hidden) -> hidden | None`` after every block; a returned
                tensor replaces the residual stream (e.g. to inject embeddings).
            return_hiddens: also return the hidden state after every block (before the final norm).
        """
        batch, length = self._check_inputs(x, layout, positions, zero_rotation, cond, cond_mask, cond_index, cache)
        start = cache.length if cache is not None else 0
        queries = layout if layout is not None else TokenLayout.causal(batch, length, device=x.device)
        window = cache.open(queries) if cache is not None else None
        mask = self._attention_mask(x, layout, window, backend)
        rotary = None
        if self.rotary is not None:
            positions = positions if positions is not None else sequence_positions(length, batch, start, device=x.device)
            rotary = self.rotary(positions, zero_rotation)
        if cond is not None and cond_index is None:  # per-token conditions: a table of b * n rows
            cond_mask = cond_mask if cond_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
            rows = torch.arange(batch * length, device=x.device).view(batch, length)
            cond, cond_index = cond.reshape(batch * length, -1), torch.where(cond_mask, rows, -1)

        hiddens: List[Tensor] = []
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for index, block in enumerate(self.layers):
            kwargs = dict(cond=cond, cond_index=cond_index, mask=mask, rotary=rotary, cache=window, layer_index=index)
            x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointed else block(x, **kwargs)
            if block_hook is not None:
                replaced = block_hook(index, x)
                x = replaced if replaced is not None else x
            if return_hiddens:
                hiddens.append(x)
        if cache is not None and write_cache:
            cache.commit(length)
        out = self.norm(x)
        return (out, hiddens) if return_hiddens else out

    # internals

    def resolve_backend(self, x: Tensor, query_length: int, backend: Optional[str] = None) -> str:
        backend = default(backend, self.attn_backend)
        check(backend in BACKENDS, f"`backend` must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            use_flex = x.is_cuda and flex_available() and query_length > 1
            return "flex" if use_flex else "sdpa"
        check(backend != "flex" or flex_available(), "the flex backend needs torch >= 2.5 (flex_attention)")
        return backend

    def _attention_mask(self, x: Tensor, layout: Optional[TokenLayout], window: Optional[CacheWindow],
                        backend: Optional[str]) -> AttentionMask:
        batch, length = x.shape[:2]
        if layout is None and window is None and not self.causal:
            return AttentionMask()
        backend = self.resolve_backend(x, length, backend)
        if layout is None and window is None and backend == "sdpa":
            return AttentionMask(is_causal=True)
        queries = layout if layout is not None else TokenLayout.causal(batch, length, device=x.device)
        keys = window.key_layout() if window is not None else queries
        query_index = window.input_pos if window is not None else None
        if backend == "flex":
            return AttentionMask(block_mask=queries.block_mask(keys, query_index=query_index))
        dense = queries.dense_mask(keys, query_index=query_index)
        if window is not None or torch.compiler.is_compiling():
            return AttentionMask(dense=dense)  # no host sync in a decode step or a graph
        return AttentionMask() if bool(dense.all()) else AttentionMask(dense=dense)  # all-visible: no mask

    def _check_inputs(self, x, layout, positions, zero_rotation, cond, cond_mask, cond_index, cache) -> Tuple[int, int]:
        check(isinstance(x, Tensor) and x.ndim == 3 and x.shape[-1] == self.dim,
              f"`x` must be a float tensor [batch, length, {self.dim}], got "
              f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        check(x.is_floating_point(), f"`x` must be floating point embeddings, got {x.dtype}")
        batch, length = x.shape[:2]
        check(length > 0, "`x` must hold at least one token")
        if layout is not None:
            check(isinstance(layout, TokenLayout), f"`layout` must be a TokenLayout, got {type(layout).__name__}")
            check(tuple(layout.shape) == (batch, length),
                  f"`layout` must describe [batch={batch}, length={length}] tokens, got {tuple(layout.shape)}")
        if positions is not None:
            check(not positions.is_floating_point(), f"`positions` must be an integer tensor, got {positions.dtype}")
            check(positions.ndim in (2, 3) and tuple(positions.shape[:2]) == (batch, length),
                  f"`positions` must be [batch={batch}, length={length}] or [batch, length, axes], "
                  f"got {tuple(positions.shape)}")
        if zero_rotation is not None:
            check(zero_rotation.dtype == torch.bool and tuple(zero_rotation.shape) == (batch, length),
                  f"`zero_rotation` must be a bool tensor [{batch}, {length}], got {zero_rotation.dtype} {tuple(zero_rotation.shape)}")
        if cond is not None:
            check(self.dim_cond is not None, "`cond` was given but the transformer was built without `dim_cond`")
            expected = (cond.shape[0], self.dim_cond) if cond_index is not None else (batch, length, self.dim_cond)
            check(tuple(cond.shape) == expected,
                  f"`cond` must be [batch={batch}, length={length}, dim_cond={self.dim_cond}] "
                  f"(or a [k, {self.dim_cond}] table with `cond_index`), got {tuple(cond.shape)}")
        if cond_index is not None:
            check(cond is not None and cond_mask is None, "`cond_index` needs a `cond` table and excludes `cond_mask`")
            check(not cond_index.is_floating_point() and tuple(cond_index.shape) == (batch, length),
                  f"`cond_index` must be an integer tensor [{batch}, {length}], got {cond_index.dtype} {tuple(cond_index.shape)}")
            check(torch.compiler.is_compiling() or int(cond_index.max()) < cond.shape[0],  # no host sync in a graph
                  f"`cond_index` points past the {cond.shape[0]} rows of `cond`")
        if cond_mask is not None:
            check(cond is not None, "`cond_mask` was given without `cond`")
            check(cond_mask.dtype == torch.bool and tuple(cond_mask.shape) == (batch, length),
                  f"`cond_mask` must be a bool tensor [{batch}, {length}], got {cond_mask.dtype} {tuple(cond_mask.shape)}")
        if cache is not None:
            cache.check_chunk(batch, length)
        return batch, length

