"""Multi-head attention with grouped-query heads and two kernels: SDPA and flex attention."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._utils import check, divisible_by
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


@lru_cache(maxsize=None)
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@dataclass
class AttentionMask:
    """What every layer of one forward attends with; built once per forward.

    Exactly one of: ``is_causal`` (plain causal, no mask tensor), ``dense`` (bool ``[b, 1, q, kv]``,
    SDPA) or ``block_mask`` (flex attention).
    """

    dense: Optional[Tensor] = None
    block_mask: Optional[Any] = None
    is_causal: bool = False


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, *, dropout: float = 0.0,
           scale: Optional[float] = None) -> Tensor:
    """``q`` ``[b, h, n, d]``; ``k``/``v`` ``[b, kv_heads, m, d]`` (grouped when kv_heads < h)."""
    if mask.block_mask is not None:
        check(dropout == 0.0, "flex attention does not support attention dropout; use the sdpa backend")
        kernel = _flex_kernel(q.is_cuda)
        return kernel(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal,
                                          dropout_p=dropout, scale=scale)


class Attention(nn.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, kv_heads: int, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, scale: Optional[float] = None):
        super().__init__()
        check(divisible_by(heads, kv_heads), f"`heads` ({heads}) must be divisible by `kv_heads` ({kv_heads})")
        self.heads, self.kv_heads, self.dim_head, self.scale = heads, kv_heads, dim_head, scale
        self.attn_dropout = attn_dropout
        self.to_qkv = nn.Linear(dim, (heads + 2 * kv_heads) * dim_head, bias=qkv_bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=out_bias)
        self.q_norm = RMSNorm(dim_head, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim_head, eps=norm_eps) if qk_norm else nn.Identity()
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, *, mask: AttentionMask, rotary: Optional[RotaryTable] = None,
                cache: Optional[CacheWindow] = None, layer_index: int = 0) -> Tensor:
        q, k, v = self.to_qkv(x).split([self.heads * self.dim_head, self.kv_heads * self.dim_head,
                                        self.kv_heads * self.dim_head], dim=-1)
        q = self.q_norm(rearrange(q, "b n (h d) -> b h n d", d=self.dim_head))
        k = self.k_norm(rearrange(k, "b n (h d) -> b h n d", d=self.dim_head))
        v = rearrange(v, "b n (h d) -> b h n d", d=self.dim_head)
        if rotary is not None:
            q, k = rotary.rotate(q), rotary.rotate(k)
        if cache is not None:
            k, v = cache.update(layer_index, k, v)
        dropout = self.attn_dropout if self.training else 0.0
        out = attend(q, k.to(q.dtype), v.to(q.dtype), mask, dropout=dropout, scale=self.scale)
        return self.resid_dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))
