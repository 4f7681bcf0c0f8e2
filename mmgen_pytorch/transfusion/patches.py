"""Image latents cut into patches: MonoFormer's modality record and layers (DiT's conventions).

A ``[C, H, W]`` latent becomes ``(H/p)·(W/p)`` row-major tokens of ``C·p²`` features ordered
``(C, ph, pw)``; they enter the backbone through a zero-initialised linear layer plus a fixed 2-D sin-cos
embedding, and leave through DiT's final layer (non-affine LayerNorm, adaLN from the time embedding,
linear), whose ``(ph, pw, 2C)`` output order is read back as ``(2C, ph, pw)``.

Reading order: the patch helpers -> :class:`PatchedLatents` (the record) -> :class:`PatchLayers` ->
:class:`FinalLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from .._utils import check, describe
from .modalities import ModalityLayers
from .packing import Shape


def patchify(latent: Float[Tensor, "c h w"], patch_size: int) -> Float[Tensor, "n d"]:
    """``[C, H, W]`` -> row-major patch tokens with features ordered ``(C, ph, pw)``."""
    return rearrange(latent, "c (h ph) (w pw) -> (h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpatchify(tokens: Float[Tensor, "n d"], grid: Tuple[int, int], patch_size: int) -> Float[Tensor, "c h w"]:
    """The inverse of :func:`patchify`."""
    return rearrange(tokens, "(h w) (c ph pw) -> c (h ph) (w pw)", h=grid[0], w=grid[1], ph=patch_size, pw=patch_size)


def sincos_2d(grid: Tuple[int, int], dim: int) -> Float[Tensor, "n dim"]:
    """Fixed 2-D sin-cos position embedding (DiT / MAE layout) of a row-major ``grid``: the first half of
    the features encodes the column, the second half the row, each as ``[sin | cos]`` over ``dim / 4``
    frequencies ``10000^(-k / (dim / 4))``; computed in float64."""
    check(dim % 4 == 0, f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    return torch.cat((_sincos_1d(cols.flatten(), dim // 2), _sincos_1d(rows.flatten(), dim // 2)), dim=1).float()


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    frequencies = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * frequencies
    return torch.cat((angles.sin(), angles.cos()), dim=1)


@dataclass(frozen=True)
class PatchedLatents:
    """Image latents ``[latent_channels, H, W]`` (``latent_size = (H, W)``) in patches of ``patch_size``:
    one fixed grid ``(H / p, W / p)``, tokens of ``latent_channels · p²`` features. Layers:
    :class:`PatchLayers`."""

    latent_channels: int
    latent_size: Tuple[int, int]
    patch_size: int

    rank = 2

    def __post_init__(self):
        (height, width), p = self.latent_size, self.patch_size
        check(min(self.latent_channels, height, width, p) > 0 and height % p == 0 and width % p == 0,
              f"`latent_size` {(height, width)} must be positive multiples of `patch_size` ({p}) and "
              f"`latent_channels` ({self.latent_channels}) positive")

    @property
    def dim_latent(self) -> int:
        return self.latent_channels * self.patch_size ** 2

    @property
    def default_shape(self) -> Shape:
        return (self.latent_size[0] // self.patch_size, self.latent_size[1] // self.patch_size)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return (self.latent_channels, *self.latent_size)

    def to_latent_grid(self, tensor: Tensor, *, name: str) -> Tensor:
        check(tuple(tensor.shape) == self.latent_shape,
              f"`{name}`: expected image latents of shape (C, H, W) = {self.latent_shape}, got {describe(tensor)}")
        return patchify(tensor, self.patch_size).view(*self.default_shape, self.dim_latent)

    def from_tokens(self, tokens: Tensor, shape: Shape, *, decode: bool = True) -> Tensor:
        return unpatchify(tokens, self.default_shape, self.patch_size)

    def check_shape(self, shape, *, name: str) -> Shape:
        check(isinstance(shape, (tuple, list)) and tuple(shape) == self.default_shape,
              f"`{name}`: only the {self.default_shape} patch grid (latent size / patch size) is generated, "
              f"got {shape!r}")
        return self.default_shape

    def build_layers(self, *, dim: int, output_dim: int, axes: int) -> "PatchLayers":
        return PatchLayers(grid=self.default_shape, patch_size=self.patch_size, dim_latent=self.dim_latent, dim=dim,
                           output_dim=output_dim)


class PatchLayers(ModalityLayers):
    """Zero-initialised linear patch embedding + fixed 2-D sin-cos positions in; DiT's final layer out,
    its ``(ph, pw, parts·C)`` features returned in the input's ``(parts·C, ph, pw)`` order (``parts`` 2:
    ε and the learned variance). Works with flat and grid positions."""

    time_conditioned = True

    def __init__(self, *, grid: Shape, patch_size: int, dim_latent: int, dim: int, output_dim: int):
        super().__init__()
        check(output_dim % dim_latent == 0, f"the objective's output width {output_dim} must be a multiple of the "
                                            f"patch features {dim_latent}")
        self.patch_size, self.grid, self.parts = patch_size, tuple(grid), output_dim // dim_latent
        self.x_embedder = nn.Linear(dim_latent, dim)
        nn.init.zeros_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        self.register_buffer("pos_embed", sincos_2d(grid, dim), persistent=False)
        self.final_layer = FinalLayer(dim, output_dim)

    def embed(self, values: Tensor, coords: Tensor) -> Tensor:
        return self.x_embedder(values) + self.pos_embed[self._row_major(coords)].to(values.dtype)

    def _row_major(self, coords: Tensor) -> Tensor:
        """A token's row-major index in the grid: flat positions give it, grid positions give (row, column)."""
        return coords[:, 0] if coords.shape[1] == 1 else coords[:, 0] * self.grid[1] + coords[:, 1]

    def output(self, hidden: Tensor, time_table: Optional[Tensor], rows: Optional[Tensor],
               coords: Optional[Tensor] = None) -> Tensor:
        p = self.patch_size
        out = self.final_layer(hidden, time_table, rows)
        return rearrange(out, "k (ph pw parts c) -> k (parts c ph pw)", ph=p, pw=p, parts=self.parts)


class FinalLayer(nn.Module):
    """DiT's final layer: non-affine LayerNorm (eps 1e-6), adaLN (first half shift) from the time
    embedding, Linear to ``out_features``; weights normal(0.02), biases zero (not DiT's zero init)."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_features)
        for layer in (self.to_modulation, self.linear):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: Float[Tensor, "k d"], time_table: Float[Tensor, "t d"],
                rows: Int[Tensor, " k"]) -> Tensor:
        shift, scale = self.to_modulation(F.silu(time_table)).chunk(2, dim=-1)
        return self.linear(self.norm(hidden) * (1 + scale[rows]) + shift[rows])
