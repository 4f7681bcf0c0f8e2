"""Rotary position embeddings from per-token position ids: 1-D, and N-D axial.

Layout (Meta / gpt-fast / LlamaGen / rotary-embedding-torch): channels are rotated in adjacent
pairs ``(2i, 2i+1)``. With ``axes = A`` the rotated pairs are split into A equal groups; group ``a``
rotates with coordinate ``a`` of the position and uses frequencies ``base^(-2j / (rot_dim / A))``.
For ``A = 2`` this is exactly LlamaGen's 2-D RoPE (first half of the pairs rotate with the row,
second half with the column). Tokens flagged in ``zero_rotation`` get ``cos = sin = 0``, which makes
their q and k zero vectors: LlamaGen's condition prefix.

The table is computed once per forward (:class:`RotaryTable`) and applied in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Int
from rotary_embedding_torch.rotary_embedding_torch import rotate_half
from torch import Tensor, nn

from .._utils import check, default, divisible_by


@dataclass
class RotaryTable:
    cos: Tensor  # float32 [b, 1, n, rot_dim]
    sin: Tensor

    def rotate(self, t: Tensor) -> Tensor:
        """Rotate the first ``rot_dim`` channels of ``t`` ([b, h, n, d]) in float32."""
        rot_dim = self.cos.shape[-1]
        rotated = t[..., :rot_dim].float()
        rotated = (rotated * self.cos + rotate_half(rotated) * self.sin).type_as(t)
        return rotated if rot_dim == t.shape[-1] else torch.cat((rotated, t[..., rot_dim:]), dim=-1)

    def pairs(self) -> Tensor:
        """``[b, n, rot_dim/2, 2]`` (cos, sin) per rotation pair: LlamaGen's ``freqs_cis`` layout."""
        cos, sin = self.cos[:, 0, :, ::2], self.sin[:, 0, :, ::2]
        return torch.stack((cos, sin), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim_head: int, *, axes: int = 1, base: float = 10000.0, rot_dim: Optional[int] = None):
        super().__init__()
        rot_dim = default(rot_dim, dim_head)
        check(axes >= 1, f"`rotary_axes` must be >= 1, got {axes}")
        check(rot_dim <= dim_head and divisible_by(rot_dim, 2 * axes),
              f"the rotary dim ({rot_dim}) must be <= dim_head ({dim_head}) and divisible by 2 * axes ({2 * axes})")
        self.axes, self.rot_dim = axes, rot_dim
        per_axis = rot_dim // axes
        inv_freq = base ** (-torch.arange(0, per_axis, 2, dtype=torch.float64) / per_axis)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Int[Tensor, "b n"] | Int[Tensor, "b n axes"],
                zero_rotation: Optional[Bool[Tensor, "b n"]] = None) -> RotaryTable:
        if positions.ndim == 2:
            positions = repeat(positions, "b n -> b n a", a=self.axes)
        check(positions.shape[-1] == self.axes,
              f"`positions` must have {self.axes} coordinate(s) per token, got shape {tuple(positions.shape)}")
        angles = positions.float()[..., None] * self.inv_freq  # b n axes freqs
        angles = repeat(rearrange(angles, "b n a f -> b n (a f)"), "b n f -> b 1 n (f r)", r=2)
        cos, sin = angles.cos(), angles.sin()
        if zero_rotation is not None:
            keep = rearrange(~zero_rotation, "b n -> b 1 n 1").float()
            cos, sin = cos * keep, sin * keep
        return RotaryTable(cos, sin)


def grid_positions(*shape: int, device=None) -> Int[Tensor, "n axes"]:
    """Row-major coordinates of an N-D grid: ``grid_positions(2, 3)`` -> ``[[0,0],[0,1],...,[1,2]]``."""
    axes = torch.meshgrid(*(torch.arange(s, device=device) for s in shape), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, len(shape))


def sequence_positions(length: int, batch: int = 1, offset: int = 0, device=None) -> Int[Tensor, "b n"]:
    return repeat(torch.arange(offset, offset + length, device=device), "n -> b n", b=batch)


def llamagen_positions(grid: int, prefix: int, *, batch: int = 1, device=None):
    """Positions and zero-rotation flags of LlamaGen's sequence: ``prefix`` condition tokens (zero
    rotation) followed by a ``grid x grid`` raster of image tokens."""
    image = grid_positions(grid, grid, device=device)
    positions = torch.cat((torch.zeros(prefix, 2, dtype=torch.long, device=device), image))
    zero = torch.arange(prefix + grid * grid, device=device) < prefix
    return repeat(positions, "n a -> b n a", b=batch), repeat(zero, "n -> b n", b=batch)

