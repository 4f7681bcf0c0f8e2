"""Multi-head attention with grouped-query heads and two kernels: SDPA and flex attention.

Flex attention always runs compiled (``torch.compile(flex_attention, dynamic=False)``): its inputs are
padded to the ``BlockMask``'s lengths, which :meth:`~mmgen_pytorch.backbone.TokenLayout.block_mask`
rounds up to 128-token buckets, so ragged batches compile once per bucket instead of once per length
(up to :data:`FLEX_RECOMPILE_LIMIT` shapes per process; past it torch falls back to its unfused kernel
with a warning). Inside a model that is
itself compiled, the outer graph takes the kernel in. :func:`eager_flex_attention` is the uncompiled
debugging path.

Options beyond plain attention (each adds parameters only when on): logit soft-capping, LASER
(attention over ``exp(values)``, then ``log``), a learned per-head mix of the first layer's values
into this layer's (value residual learning) and per-head sigmoid gates on the output.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._utils import check, check_finite_number, check_flag, divisible_by, recompile_limit_at_least
from .kv_cache import CacheWindow
from .norms import RMSNorm
from .positions import RotaryTable

BACKENDS = ("auto", "sdpa", "flex")


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# Distinct input shapes (batch, heads, bucketed lengths, dtype, ...) one process may compile the flex
# kernel for; past it dynamo falls back to the unfused kernel with torch's warning (an error in our tests).
FLEX_RECOMPILE_LIMIT = 64
_eager_flex = False  # see eager_flex_attention()


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


@contextmanager
def eager_flex_attention() -> Iterator[None]:
    """Run flex attention uncompiled inside this block: torch's unfused debugging path, forward only,
    which materialises the whole score matrix. For checking masks on CPU without compile time;
    outside it flex attention always runs the compiled kernel."""
    import torch.nn.attention.flex_attention as flex_module

    global _eager_flex
    before = _eager_flex, flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    _eager_flex = flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        _eager_flex, flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = before


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, **kwargs) -> Tensor:
    """Flex attention over inputs padded to the ``BlockMask``'s bucketed lengths (the padding is masked
    out), so that every length in one bucket reuses one compiled kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    query_length = q.shape[2]
    padded_q, padded_kv = block_mask.seq_lengths
    q = F.pad(q, (0, 0, 0, padded_q - query_length))
    k, v = (F.pad(t, (0, 0, 0, padded_kv - t.shape[2])) for t in (k, v))
    if _eager_flex or torch.compiler.is_compiling():  # inside a compiled model the outer graph fuses it
        out = flex_attention(q, k, v, block_mask=block_mask, **kwargs)
    else:
        with recompile_limit_at_least(FLEX_RECOMPILE_LIMIT):
            out = _compiled_flex()(q, k, v, block_mask=block_mask, **kwargs)
    return out[:, :, :query_length]


@dataclass
class AttentionMask:
    """What every layer of one forward attends with; built once per forward.

    Exactly one of: ``is_causal`` (plain causal, no mask tensor), ``dense`` (bool ``[b, 1, q, kv]``,
    SDPA) or ``block_mask`` (flex attention).
    """

    dense: Optional[Tensor] = None
    block_mask: Optional[Any] = None
    is_causal: bool = False


def softclamp(t: Tensor, value: float) -> Tensor:
    """``value * tanh(t / value)``: ``t`` squashed smoothly into ``(-value, value)``."""
    return (t / value).tanh() * value


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, dropout: float = 0.0,
           scale: Optional[float] = None, softcap: Optional[float] = None) -> Tensor:
    """``q`` ``[b, h, n, d]``; ``k``/``v`` ``[b, kv_heads, m, d]`` (grouped when kv_heads < h).

    ``softcap``: the scaled logits become ``softcap * tanh(logits / softcap)`` (SDPA cannot, so that
    path computes the attention matrix itself)."""
    if mask.block_mask is not None:
        check(dropout == 0.0, "flex attention does not support attention dropout; use the sdpa backend")
        score_mod = _softcap_score_mod(softcap) if softcap else None
        return _flex_attention(q, k, v, mask.block_mask, score_mod=score_mod, scale=scale,
                               enable_gqa=k.shape[1] != q.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if softcap:
        return _softcapped_attention(q, k, v, mask, dropout=dropout, scale=scale, softcap=softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal,
                                          dropout_p=dropout, scale=scale)


def _softcap_score_mod(softcap: float):
    def score_mod(score, batch, head, query_index, key_index):
        return softclamp(score, softcap)
    return score_mod


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, dropout: float,
                          scale: Optional[float], softcap: float) -> Tensor:
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    logits = softclamp((q @ k.transpose(-1, -2)) * scale, softcap)
    visible = mask.dense
    if mask.is_causal:
        visible = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if visible is not None:
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
    weights = F.dropout(logits.softmax(dim=-1), p=dropout)
    return weights @ v


def laser_attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, softclamp_value: float,
                 **attend_kwargs) -> Tensor:
    """LASER: ``log(attention(q, k, exp(softclamp(v))))``, computed as
    ``log(attention(q, k, exp(v' - m))) + m`` with ``m`` the per-channel maximum of the soft-clamped
    values ``v'`` over the keys: the same value, without overflow in half precision."""
    v = softclamp(v, softclamp_value)
    shift = v.amax(dim=-2, keepdim=True).detach()  # the result does not depend on it: no gradient needed
    out = attend(q, k, (v - shift).exp(), mask, **attend_kwargs)
    shift = shift.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return out.clamp_min(torch.finfo(out.dtype).tiny).log() + shift


class Attention(nn.Module):
    """Grouped-query attention. Optional (parameters only when on):

    - ``softcap_value``: soft-cap the logits at this value (None or 0: off);
    - ``laser`` with ``laser_softclamp_value``: LASER attention (see :func:`laser_attend`);
    - ``value_residual_mix``: this layer's values become ``v * mix + v_first * (1 - mix)`` with
      ``v_first`` the first layer's values (passed as ``value_residual``) and
      ``mix = sigmoid(linear(x))`` per token and key/value head;
    - ``gate_values``: each head's output times ``sigmoid(linear(x))`` before the output projection.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, kv_heads: int, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, scale: Optional[float] = None,
                 softcap_value: Optional[float] = None, laser: bool = False, laser_softclamp_value: float = 15.0,
                 value_residual_mix: bool = False, gate_values: bool = False):
        super().__init__()
        check(divisible_by(heads, kv_heads), f"`heads` ({heads}) must be divisible by `kv_heads` ({kv_heads})")
        for name, flag in (("laser", laser), ("value_residual_mix", value_residual_mix), ("gate_values", gate_values)):
            check_flag(name, flag)
        if softcap_value is not None:
            check_finite_number("softcap_value", softcap_value, minimum=0.0)
        check_finite_number("laser_softclamp_value", laser_softclamp_value, minimum=0.0, strict=True)
        self.heads, self.kv_heads, self.dim_head, self.scale = heads, kv_heads, dim_head, scale
        self.attn_dropout = attn_dropout
        self.softcap = float(softcap_value) if softcap_value else None
        self.laser, self.laser_softclamp_value = laser, float(laser_softclamp_value)
        self.to_qkv = nn.Linear(dim, (heads + 2 * kv_heads) * dim_head, bias=qkv_bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=out_bias)
        self.q_norm = RMSNorm(dim_head, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim_head, eps=norm_eps) if qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.to_value_mix = nn.Linear(dim, kv_heads) if value_residual_mix else None
        self.to_gates = nn.Linear(dim, heads, bias=False) if gate_values else None

    def forward(self, x: Tensor, *, mask: AttentionMask, rotary: Optional[RotaryTable] = None,
                cache: Optional[CacheWindow] = None, layer_index: int = 0, value_residual: Optional[Tensor] = None,
                return_values: bool = False):
        """The attention output; with ``return_values`` also this layer's values before any mixing
        (``[b, kv_heads, n, dim_head]``, what later layers take as ``value_residual``)."""
        q, k, v = self.to_qkv(x).split([self.heads * self.dim_head, self.kv_heads * self.dim_head,
                                        self.kv_heads * self.dim_head], dim=-1)
        q = self.q_norm(rearrange(q, "b n (h d) -> b h n d", d=self.dim_head))
        k = self.k_norm(rearrange(k, "b n (h d) -> b h n d", d=self.dim_head))
        v = values = rearrange(v, "b n (h d) -> b h n d", d=self.dim_head)
        if value_residual is not None:
            check(self.to_value_mix is not None,
                  "`value_residual` was given to an Attention built without `value_residual_mix`")
            mix = rearrange(self.to_value_mix(x).sigmoid(), "b n h -> b h n 1")
            v = v * mix + value_residual * (1.0 - mix)
        if rotary is not None:
            q, k = rotary.rotate(q), rotary.rotate(k)
        if cache is not None:
            k, v = cache.update(layer_index, k, v)
        out = self._attend(q, k.to(q.dtype), v.to(q.dtype), mask)
        if self.to_gates is not None:
            out = out * rearrange(self.to_gates(x).sigmoid(), "b n h -> b h n 1")
        out = self.resid_dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))
        return (out, values) if return_values else out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        kwargs = dict(dropout=self.attn_dropout if self.training else 0.0, scale=self.scale, softcap=self.softcap)
        if self.laser:
            return laser_attend(q, k, v, mask, softclamp_value=self.laser_softclamp_value, **kwargs)
        return attend(q, k, v, mask, **kwargs)
