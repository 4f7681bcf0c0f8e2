"""Normalisation layers: RMSNorm computed in float32 (LLaMA / LlamaGen), LayerNorm, and a factory."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._utils import check

NORMS = ("rmsnorm", "layernorm")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(kind: str, dim: int, *, eps: float) -> nn.Module:
    check(kind in NORMS, f"`norm` must be one of {NORMS}, got {kind!r}")
    return RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)
