"""The one pre-norm transformer every model in this library is built on, configured, not forked.

Inputs are embeddings ``[b, n, dim]``; token embeddings, heads and absolute position embeddings
live in the models. A forward builds its attention mask and rotary table once and hands them to
every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._utils import (check, check_finite_number, check_flag, default, divisible_by, pick_alias,
                      recompile_limit_at_least, round_up_to_multiple)
from ..saving import Checkpointable
from .attention import BACKENDS, Attention, AttentionMask, flex_available
from .kv_cache import CacheWindow, KVCache
from .masks import TokenLayout
from .norms import make_norm
from .positions import RotaryEmbedding, sequence_positions

FEED_FORWARDS = ("swiglu", "gelu")
ATTN_KWARGS = ("softcap_value", "gate_values", "laser_softclamp_value")  # transfusion-pytorch's Attention extras
FF_KWARGS = ("dropout",)  # transfusion-pytorch's FeedForward extra: dropout after the activation

BlockHook = Callable[[int, Tensor], Optional[Tensor]]


Carried = Tuple[List[Tensor], Optional[Tensor], List[Tensor]]  # U-ViT skips, first layer's values, hiddens


@dataclass
class BlockInputs:
    """What every block of one forward reads beside the residual stream (the attention mask and the
    rotary table are built from it); the input of the compiled decode step."""

    layout: Optional[TokenLayout]
    window: Optional[CacheWindow]
    positions: Optional[Tensor]
    zero_rotation: Optional[Tensor]
    cond: Optional[Tensor]
    cond_index: Optional[Tensor]
    backend: Optional[str]


def _hooked(block_hook: Optional[BlockHook], index: int, x: Tensor) -> Tensor:
    """The residual stream after ``block_hook`` at block ``index`` (its returned tensor, if any)."""
    replaced = block_hook(index, x) if block_hook is not None else None
    return replaced if replaced is not None else x


# graphs of the compiled step one process may hold: per transformer, chunk shape, segment and row count
# (with fullgraph, dynamo raises past its limit instead of falling back)
COMPILED_STEP_RECOMPILE_LIMIT = 64


@lru_cache(maxsize=None)
def _compiled_step(mode: str) -> Callable:
    """:meth:`Transformer._blocks` compiled for ``mode``, once per process: the graphs it compiles are
    kept by dynamo (per transformer and shape), so a later generation reuses them."""
    return torch.compile(Transformer._blocks, fullgraph=True, dynamic=False, mode=mode)


def _mark_cache_static(cache: KVCache) -> None:
    """CUDA graphs update the cache's buffers in place (``index_put_``): mark them as fixed addresses
    (not copied into the graph's own inputs); a buffer replaced by ``reserve`` / ``select`` is captured anew."""
    for buffer in (cache.keys, cache.values, cache.segment_ids, cache.block_ids):
        torch._dynamo.mark_static_address(buffer, guard=False)


def _cloned(item: Any) -> Any:
    if isinstance(item, Tensor):
        return item.clone()
    if isinstance(item, list):
        return [_cloned(element) for element in item]
    return item


def swiglu_hidden_dim(dim: int, *, mult: float = 4.0, multiple_of: int = 256,
                      multiplier: Optional[float] = None) -> int:
    """LLaMA's rule: two thirds of ``mult * dim``, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * int(mult * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return round_up_to_multiple(hidden, multiple_of)


def _expansion_hidden_dim(dim: int, factor: float, *, gated: bool, ff_mult: float, ff_hidden: Optional[int]) -> int:
    """transfusion-pytorch's feed-forward width: ``int(dim * factor * 2 / 3)`` when gated, unrounded."""
    check_finite_number("ff_expansion_factor", factor, minimum=0.0, strict=True)
    check(ff_hidden is None and ff_mult == 4.0, "give one of `ff_expansion_factor`, `ff_mult` and `ff_hidden`, got "
          f"ff_expansion_factor={factor!r} with ff_mult={ff_mult!r}, ff_hidden={ff_hidden!r}")
    hidden = int(dim * factor * 2 / 3) if gated else int(dim * factor)
    check(hidden > 0, f"`ff_expansion_factor` ({factor}) leaves no hidden units at dim {dim}")
    return hidden


def _backend_for(attn_backend: str, use_flex_attn: Optional[bool]) -> str:
    """``attn_backend`` with transfusion-pytorch's ``use_flex_attn`` folded in: True is flex where CUDA
    runs it (``"auto"``), False is ``"sdpa"``; ``"auto"`` defers to it, a contradicting backend is an error."""
    check(attn_backend in BACKENDS, f"`attn_backend` must be one of {BACKENDS}, got {attn_backend!r}")
    check_flag("use_flex_attn", use_flex_attn, optional=True)
    if use_flex_attn is None:
        return attn_backend
    check(attn_backend != ("sdpa" if use_flex_attn else "flex"),
          f"`use_flex_attn={use_flex_attn}` contradicts `attn_backend={attn_backend!r}`: give one of them")
    if attn_backend != "auto":
        return attn_backend
    return "auto" if use_flex_attn else "sdpa"


def _mask_between(queries: TokenLayout, keys: TokenLayout, query_index: Optional[Tensor], backend: str, *,
                  keep_dense: bool) -> AttentionMask:
    """The mask of ``queries`` over ``keys`` for ``backend``; an all-visible dense mask is dropped (no mask,
    SDPA's fastest path) unless ``keep_dense``: the check is a host sync, kept out of decode steps and graphs."""
    if backend == "flex":
        return AttentionMask(block_mask=queries.block_mask(keys, query_index=query_index))
    dense = queries.dense_mask(keys, query_index=query_index)
    if keep_dense or not bool(dense.all()):
        return AttentionMask(dense=dense)
    return AttentionMask()


def _aliased(name: str, value: Any, default_value: Any, alias: str, alias_value: Any) -> Any:
    """An option given as ``name`` (its default meaning "not given") or as transfusion-pytorch's ``alias``."""
    return pick_alias(name, None if value == default_value else value, alias, alias_value, default_value)


def _with_aliases(*, qk_norm: bool, qk_rmsnorm: Optional[bool], attn_dropout: float, dropout: Optional[float],
                  ff_hidden_dropout: float, ff_kwargs: Optional[Dict[str, Any]]) -> Tuple[bool, float, float]:
    """``qk_norm``, ``attn_dropout`` and ``ff_hidden_dropout`` with transfusion-pytorch's names for them
    (``qk_rmsnorm``, ``dropout``, ``ff_kwargs['dropout']``) folded in."""
    check_flag("qk_rmsnorm", qk_rmsnorm, optional=True)
    ff_dropout = _checked_kwargs("ff_kwargs", ff_kwargs, FF_KWARGS).get("dropout")
    for name, value in (("dropout", dropout), ("ff_kwargs['dropout']", ff_dropout)):
        if value is not None:
            check_finite_number(name, value, minimum=0.0, maximum=1.0)
    return (_aliased("qk_norm", qk_norm, False, "qk_rmsnorm", qk_rmsnorm),
            _aliased("attn_dropout", attn_dropout, 0.0, "dropout", dropout),
            _aliased("ff_hidden_dropout", ff_hidden_dropout, 0.0, "ff_kwargs['dropout']", ff_dropout))


def _checked_kwargs(name: str, kwargs: Optional[Dict[str, Any]], allowed: Tuple[str, ...]) -> Dict[str, Any]:
    if kwargs is None:
        return {}
    check(isinstance(kwargs, dict), f"`{name}` must be a dict or None, got {type(kwargs).__name__}", error=TypeError)
    unknown = sorted(repr(key) for key in kwargs if key not in allowed)
    check(not unknown, f"`{name}` may only hold {allowed}, got {', '.join(unknown)}; the Transformer's own "
          "options (heads, dim_head, dropout, qk_rmsnorm, ...) are given to it directly", error=TypeError)
    return dict(kwargs)


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
                return_values: bool = False, **attn_kwargs):
        """The block's output; with ``return_values`` also its attention's values (value residual)."""
        mod = self.modulation(cond, cond_index) if self.modulation is not None and cond is not None else None
        attn_out = self.attn(_modulated(self.attn_norm(x), mod, 0), return_values=return_values, **attn_kwargs)
        attn_out, values = attn_out if return_values else (attn_out, None)
        x = x + _gated(attn_out, mod, 0)
        x = x + _gated(self.ff(_modulated(self.ff_norm(x), mod, 3)), mod, 3)
        return (x, values) if return_values else x


def _modulated(h: Tensor, mod: Optional[Tuple[Tensor, ...]], first: int) -> Tensor:
    """adaLN: ``h * (1 + scale) + shift`` with shift, scale at ``mod[first]``, ``mod[first + 1]``."""
    return h if mod is None else h * (1 + mod[first + 1]) + mod[first]


def _gated(out: Tensor, mod: Optional[Tuple[Tensor, ...]], first: int) -> Tensor:
    return out if mod is None else mod[first + 2] * out


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

    transfusion-pytorch's options (same meaning; every one off by default, adding nothing when off):
        use_flex_attn: ``True``: flex attention on CUDA, SDPA elsewhere (``attn_backend="auto"``);
            ``False``: SDPA (``"sdpa"``). An ``attn_backend`` that contradicts it is an error.
        unet_skips: U-ViT long skips: each block of the second half gets ``x + linear([x; skip])``, with
            ``skip`` the input of its mirror block in the first half (the middle block of an odd depth
            gets none).
        use_value_residual: value residual learning: every block after the first mixes the first
            block's values into its own, ``v * m + v_first * (1 - m)``, ``m = sigmoid(linear(x))`` per
            token and key/value head.
        attn_laser: LASER attention, ``log(softmax(qk) @ exp(softclamp(v, 15)))``.
        ff_expansion_factor: feed-forward hidden width ``int(dim * f * 2 / 3)`` for SwiGLU (``dim * f``
            for GELU), unrounded; instead of ``ff_mult`` / ``ff_hidden``.
        qk_rmsnorm: alias of ``qk_norm``. dropout: alias of ``attn_dropout`` (on the attention weights).
        attn_kwargs: extra options of every attention: ``softcap_value`` (soft-cap the logits),
            ``gate_values`` (per-head output gates), ``laser_softclamp_value`` (default 15).
        ff_kwargs: ``dropout``, after the feed-forward activation (alias of ``ff_hidden_dropout``).
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
                 grad_checkpointing: bool = False, use_flex_attn: Optional[bool] = None, unet_skips: bool = False,
                 use_value_residual: bool = False, attn_laser: bool = False,
                 ff_expansion_factor: Optional[float] = None, qk_rmsnorm: Optional[bool] = None,
                 dropout: Optional[float] = None, attn_kwargs: Optional[Dict[str, Any]] = None,
                 ff_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        check(dim > 0 and depth > 0 and heads > 0, f"`dim`, `depth` and `heads` must be positive, got {dim}, {depth}, {heads}")
        check(dim_head is not None or divisible_by(dim, heads),
              f"`dim` ({dim}) must be divisible by `heads` ({heads}) unless `dim_head` is given")
        attn_backend = _backend_for(attn_backend, use_flex_attn)
        for name, flag in (("unet_skips", unet_skips), ("use_value_residual", use_value_residual),
                           ("attn_laser", attn_laser)):
            check_flag(name, flag)
        qk_norm, attn_dropout, ff_hidden_dropout = _with_aliases(
            qk_norm=qk_norm, qk_rmsnorm=qk_rmsnorm, attn_dropout=attn_dropout, dropout=dropout,
            ff_hidden_dropout=ff_hidden_dropout, ff_kwargs=ff_kwargs)
        attn_extras = _checked_kwargs("attn_kwargs", attn_kwargs, ATTN_KWARGS)
        dim_head = default(dim_head, dim // heads)
        kv_heads = default(kv_heads, heads)
        check(divisible_by(heads, kv_heads), f"`heads` ({heads}) must be divisible by `kv_heads` ({kv_heads})")
        if ff_expansion_factor is not None:
            ff_hidden = _expansion_hidden_dim(dim, ff_expansion_factor, gated=ff == "swiglu", ff_mult=ff_mult,
                                             ff_hidden=ff_hidden)
        if ff_hidden is None:
            ff_hidden = (swiglu_hidden_dim(dim, mult=ff_mult, multiple_of=ff_multiple_of, multiplier=ff_dim_multiplier)
                         if ff == "swiglu" else int(dim * ff_mult))

        self.dim, self.depth, self.heads, self.kv_heads, self.dim_head = dim, depth, heads, kv_heads, dim_head
        self.dim_cond, self.attn_backend, self.attn_dropout = dim_cond, attn_backend, attn_dropout
        self.causal, self.grad_checkpointing = causal, grad_checkpointing
        self.use_value_residual = use_value_residual
        self.rotary = RotaryEmbedding(dim_head, axes=rotary_axes, base=rotary_base, rot_dim=rotary_dim) if rotary_axes else None
        self.layers = nn.ModuleList([
            Block(dim, norm=norm, norm_eps=norm_eps, dim_cond=dim_cond,
                  attention=Attention(dim, heads=heads, dim_head=dim_head, kv_heads=kv_heads, qkv_bias=qkv_bias,
                                      out_bias=out_bias, qk_norm=qk_norm, norm_eps=norm_eps, scale=attn_scale,
                                      attn_dropout=attn_dropout, resid_dropout=resid_dropout, laser=attn_laser,
                                      value_residual_mix=use_value_residual and index > 0, **attn_extras),
                  feed_forward=FeedForward(dim, ff_hidden, kind=ff, bias=ff_bias, dropout=ff_dropout,
                                           hidden_dropout=ff_hidden_dropout))
            for index in range(depth)
        ])
        self.norm = make_norm(norm, dim, eps=norm_eps) if final_norm else nn.Identity()
        # built last, so that the blocks' seeded init is the same with or without them
        self.skip_projs = (nn.ModuleList(nn.Linear(2 * dim, dim, bias=False) for _ in range(depth // 2))
                           if unet_skips else None)

    # public API

    def new_cache(self, batch_size: int, max_length: int, *, dtype: Optional[torch.dtype] = None, device=None,
                  static: bool = False, compiled: bool = False) -> KVCache:
        """An empty :class:`KVCache` for this transformer (``static``: fixed-shape windows; ``compiled``: forwards
        through it run the compiled decode step, see :meth:`_compiled_blocks`; it needs ``static``)."""
        reference = next(self.parameters())
        return KVCache(num_layers=self.depth, batch_size=batch_size, max_length=max_length, kv_heads=self.kv_heads,
                       dim_head=self.dim_head, dtype=default(dtype, reference.dtype),
                       device=default(device, reference.device), static=static, compiled=compiled)

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
            cache: a :class:`KVCache`; the tokens continue after its ``length`` positions. A cache built
                with ``compiled=True`` (static windows) runs the blocks as a compiled decode step: see
                :meth:`_compiled_blocks`.
            write_cache: the chunk becomes part of the cached sequence (else it attends to the cached
                prefix plus itself and the cache's ``length`` stays).
            block_hook: ``hook(block_index, hidden) -> hidden | None`` after every block; a returned
                tensor replaces the residual stream (e.g. to inject embeddings). With a compiled cache the
                hook must name the blocks after which it acts in its attribute ``blocks`` (a sequence of
                block indices): it runs only there, eagerly, between compiled segments of blocks.
            return_hiddens: also return the hidden state after every block (before the final norm).
        """
        batch, length = self._check_inputs(x, layout, positions, zero_rotation, cond, cond_mask, cond_index, cache)
        segments = self._segments(block_hook) if cache is not None and cache.compiled else None
        inputs = self._block_inputs(x, layout, positions, zero_rotation, cond, cond_mask, cond_index, cache, backend)
        if segments is not None:
            x, hiddens = self._compiled_blocks(x, inputs, segments, block_hook, return_hiddens)
        else:
            checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
            x, (_, _, hiddens) = self._blocks(x, inputs, ([], None, []), 0, self.depth, block_hook=block_hook,
                                              return_hiddens=return_hiddens, checkpointed=checkpointed,
                                              final_norm=True)
        if cache is not None and write_cache:
            cache.commit(length)
        return (x, hiddens) if return_hiddens else x

    # internals: one forward, split into its host side and its pure tensor part

    def _block_inputs(self, x: Tensor, layout: Optional[TokenLayout], positions: Optional[Tensor],
                      zero_rotation: Optional[Tensor], cond: Optional[Tensor], cond_mask: Optional[Tensor],
                      cond_index: Optional[Tensor], cache: Optional[KVCache], backend: Optional[str]) -> "BlockInputs":
        """The host side of a forward (eager, also in a compiled decode step): default positions from the
        cache's length, per-token conditions as a table, and the cache window opened at ``input_pos``, a
        tensor, so that the compiled part never sees the length as a Python int."""
        batch, length = x.shape[:2]
        if self.rotary is not None and positions is None:
            positions = sequence_positions(length, batch, cache.length if cache is not None else 0, device=x.device)
        if cond is not None and cond_index is None:  # per-token conditions: a table of b * n rows
            cond_mask = cond_mask if cond_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
            rows = torch.arange(batch * length, device=x.device).view(batch, length)
            cond, cond_index = cond.reshape(batch * length, -1), torch.where(cond_mask, rows, -1)
        window = None
        if cache is not None:
            window = cache.open(layout if layout is not None else TokenLayout.causal(batch, length, device=x.device))
        return BlockInputs(layout, window, positions, zero_rotation, cond, cond_index, backend)

    def _blocks(self, x: Tensor, inputs: "BlockInputs", carried: Carried, first: int, last: int, *,
                block_hook: Optional[BlockHook] = None, return_hiddens: bool = False,
                checkpointed: bool = False, final_norm: bool = False) -> Tuple[Tensor, Carried]:
        """The pure tensor part of a forward: the attention mask and rotary table from ``inputs``, then
        blocks ``first .. last - 1``, then the final norm if ``final_norm``. ``carried``: the
        U-ViT skips, the first layer's values and the hidden states of the blocks before ``first``;
        returned as they stand after ``last - 1``. A compiled decode step compiles this as one graph."""
        mask = self._attention_mask(x, inputs.layout, inputs.window, inputs.backend)
        rotary = self.rotary(inputs.positions, inputs.zero_rotation) if self.rotary is not None else None
        skips, first_values, hiddens = list(carried[0]), carried[1], list(carried[2])
        for index in range(first, last):
            x = self._unet_skip(index, x, skips)
            wants_values = self.use_value_residual and index == 0
            kwargs = dict(cond=inputs.cond, cond_index=inputs.cond_index, mask=mask, rotary=rotary,
                          cache=inputs.window, layer_index=index, value_residual=first_values,
                          return_values=wants_values)
            block = self.layers[index]
            x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointed else block(x, **kwargs)
            if wants_values:
                x, first_values = x
            x = _hooked(block_hook, index, x)
            if return_hiddens:
                hiddens.append(x)
        if final_norm:
            x = self.norm(x)
        return x, (skips, first_values, hiddens)

    def _compiled_blocks(self, x: Tensor, inputs: "BlockInputs", segments: List[Tuple[int, int]],
                         block_hook: Optional[BlockHook], return_hiddens: bool) -> Tuple[Tensor, List[Tensor]]:
        """The blocks of a forward through a ``compiled`` (static) cache, gpt-fast style: :meth:`_blocks`
        compiled by ``torch.compile(fullgraph=True, dynamic=False)`` (``mode="reduce-overhead"``, i.e. CUDA
        graphs, on CUDA; the default mode elsewhere) and cached per mode, so every later step and every
        later generation reuses it. The host side (:meth:`_block_inputs`, the cache's ``commit``,
        ``reserve`` and ``select``) stays eager and the cache's length reaches the graph only as the
        ``input_pos`` tensor, so a graph is compiled once per chunk shape, not once per position. A new
        shape (another chunk length, fewer rows after :meth:`KVCache.select`, buffers grown by
        :meth:`KVCache.reserve`) compiles (and on CUDA captures) one more graph. A ``block_hook`` runs
        eagerly between the compiled ``segments`` (:meth:`_segments`), which end after its ``blocks``."""
        cuda = x.is_cuda
        step = _compiled_step("reduce-overhead" if cuda else "default")
        if cuda:
            _mark_cache_static(inputs.window.cache)
            torch.compiler.cudagraph_mark_step_begin()
        hooked_blocks = set(getattr(block_hook, "blocks", ()))
        carried: Carried = ([], None, [])
        for first, last in segments:
            hook_here = last - 1 in hooked_blocks
            norm_here = last == self.depth and not hook_here  # else the norm follows the hook, eagerly
            with recompile_limit_at_least(COMPILED_STEP_RECOMPILE_LIMIT):
                x, carried = step(self, x, inputs, carried, first, last, return_hiddens=return_hiddens,
                                  final_norm=norm_here)
            if cuda:  # a CUDA graph's outputs are overwritten by its next replay
                x, carried = _cloned(x), tuple(_cloned(item) for item in carried)
            if hook_here:
                x = _hooked(block_hook, last - 1, x)
                if return_hiddens:
                    carried[2][-1] = x
        if last - 1 in hooked_blocks:
            x = self.norm(x)
        return x, carried[2]

    def _segments(self, block_hook: Optional[BlockHook]) -> List[Tuple[int, int]]:
        """``(first, last)`` block ranges of a compiled forward: one, or one ending after each of the hook's
        ``blocks`` and a last one up to the depth (none empty)."""
        if block_hook is None:
            return [(0, self.depth)]
        blocks = getattr(block_hook, "blocks", None)
        check(blocks is not None and all(isinstance(b, int) and 0 <= b < self.depth for b in blocks),
              f"a `block_hook` run through a compiled KV cache must name the blocks after which it acts in its "
              f"attribute `blocks` (block indices in [0, {self.depth})), got {blocks!r}")
        ends = sorted({b + 1 for b in blocks} | {self.depth})
        return list(zip([0, *ends[:-1]], ends))

    # internals

    def _unet_skip(self, index: int, x: Tensor, skips: List[Tensor]) -> Tensor:
        """U-ViT: remember the inputs of the first ``depth // 2`` blocks; the last ``depth // 2`` blocks
        take them back in reverse order through their projection of ``[x; skip]``."""
        if self.skip_projs is None:
            return x
        if index < self.depth // 2:
            skips.append(x)
            return x
        projection = index - (self.depth - self.depth // 2)  # negative: the middle block of an odd depth
        if projection < 0:
            return x
        return x + self.skip_projs[projection](torch.cat((x, skips.pop()), dim=-1))

    def resolve_backend(self, x: Tensor, query_length: int, backend: Optional[str] = None) -> str:
        """The kernel a forward over ``x`` runs. ``"auto"``: flex attention on CUDA for chunks of more
        than one query, SDPA for single-token decode steps, on CPU, and in a training forward with
        attention dropout (flex has none). An explicit ``"flex"`` is checked here, before any work."""
        backend = default(backend, self.attn_backend)
        check(backend in BACKENDS, f"`backend` must be one of {BACKENDS}, got {backend!r}")
        drops_attention = self.training and self.attn_dropout > 0
        if backend == "auto":
            use_flex = x.is_cuda and flex_available() and query_length > 1 and not drops_attention
            return "flex" if use_flex else "sdpa"
        if backend == "flex":
            check(flex_available(), "the flex backend needs torch >= 2.5 (flex_attention)")
            check(not drops_attention, "flex attention does not support attention dropout "
                  f"(attn_dropout={self.attn_dropout} in training mode); use the sdpa or auto backend")
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or next(self.parameters()).requires_grad)
            check(x.is_cuda or not needs_grad,
                  "flex attention has no backward pass on CPU: run it under torch.no_grad(), or use the sdpa "
                  "or auto backend", error=NotImplementedError)
        return backend

    def _attention_mask(self, x: Tensor, layout: Optional[TokenLayout], window: Optional[CacheWindow],
                        backend: Optional[str]) -> AttentionMask:
        batch, length = x.shape[:2]
        unmasked = layout is None and window is None
        check(backend is None or backend in BACKENDS, f"`backend` must be one of {BACKENDS}, got {backend!r}")
        if unmasked and not self.causal and default(backend, self.attn_backend) != "flex":
            return AttentionMask()  # all-visible: SDPA's fused kernels, unless flex is asked for by name
        backend = self.resolve_backend(x, length, backend)
        if unmasked and backend == "sdpa":
            return AttentionMask(is_causal=True)
        queries = layout
        if queries is None:
            queries = (TokenLayout.causal if self.causal else TokenLayout.bidirectional)(batch, length, device=x.device)
        if window is None:
            return _mask_between(queries, queries, None, backend, keep_dense=torch.compiler.is_compiling())
        build = lambda: _mask_between(queries, window.key_layout(), window.input_pos, backend, keep_dense=True)  # noqa: E731
        if torch.compiler.is_compiling():  # a compiled step builds it in its graph (the memo's ints would be guards)
            return build()
        return window.cache.reusable_mask(queries, window, backend, build)

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

