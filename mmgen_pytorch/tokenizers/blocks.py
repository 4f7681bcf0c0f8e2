"""The convolutional encoder and decoder shared by every image tokenizer (VQ, KL and RQ).

All three upstreams (LlamaGen's VQ, MAR's KL-16 and DnD's RQ-VAE) use the same taming/LDM
architecture: GroupNorm(32, eps 1e-6) + swish, residual blocks with a 1x1 ``nin_shortcut`` where the
width changes, single-head spatial self-attention built from 1x1 convolutions, stride-2 downsampling
after a (0, 1, 0, 1) zero pad, and nearest x2 upsampling followed by a 3x3 conv.

Our layout (LlamaGen's key names; :mod:`mmgen_pytorch.pretrained.ldm` maps the LDM layout onto it):

- ``conv_in``, ``conv_blocks.{k}.res.{j}``, ``conv_blocks.{k}.attn.{j}``,
  ``conv_blocks.{k}.downsample.conv`` / ``.upsample.conv``, ``mid.{0,1,2}`` (res, attn, res),
  ``norm_out``, ``conv_out``.
- ``conv_blocks`` are in processing order: the encoder's ``conv_blocks.0`` is the full-resolution
  level, the decoder's ``conv_blocks.0`` the lowest-resolution one.

Attention placement is given as resolution *levels*: level ``i`` works at ``1 / 2**i`` of the image
size (negative values count from the lowest resolution, so ``(-1,)`` is LlamaGen's "lowest level
only"); :func:`mmgen_pytorch.pretrained.ldm.levels_at_resolutions` converts LDM's ``attn_resolutions``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .._utils import (check, check_finite, check_index_range, check_value_range, describe, divisible_by, is_index_tensor,
                      like_parameters)

NORM_GROUPS = 32
NORM_EPS = 1e-6


def normalize(channels: int) -> nn.GroupNorm:
    check(divisible_by(channels, NORM_GROUPS),
          f"every channel count must be a multiple of {NORM_GROUPS} (GroupNorm groups), got {channels}")
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS)


def swish(x: Tensor) -> Tensor:
    return F.silu(x)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b d h w"]:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, scale 1/sqrt(c), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c x y -> b 1 (x y) c") for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (x y) c -> b c x y", x=x.shape[-2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero pad right/bottom by one, then a 3x3 stride-2 conv: (h, w) -> (h/2, w/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h2 w2"]:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h2 w2"]:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvLevel(nn.Module):
    """``num_res`` residual blocks, each followed by attention when ``attn``, then an optional resample."""

    def __init__(self, in_channels: int, out_channels: int, num_res: int, *, attn: bool,
                 resample: Optional[str], dropout: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res
        self.res = nn.ModuleList(ResnetBlock(a, b, dropout) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_res if attn else 0))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


def middle(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


def resolve_levels(levels: Iterable[int], num_levels: int) -> Tuple[int, ...]:
    """Attention levels as sorted non-negative indices; negative ones count from the lowest resolution."""
    resolved = []
    for level in levels:
        check(-num_levels <= level < num_levels,
              f"`attn_levels` entries must lie in [-{num_levels}, {num_levels}) for {num_levels} levels, got {level}")
        resolved.append(level % num_levels)
    return tuple(sorted(set(resolved)))


def _check_widths(ch: int, ch_mult: Sequence[int], num_res_blocks: int) -> None:
    check(len(ch_mult) >= 1, f"`ch_mult` needs at least one level, got {tuple(ch_mult)}")
    check(num_res_blocks >= 1, f"`num_res_blocks` must be >= 1, got {num_res_blocks}")
    for mult in ch_mult:
        check(mult >= 1 and divisible_by(ch * mult, NORM_GROUPS),
              f"`ch` * `ch_mult` must give multiples of {NORM_GROUPS} (GroupNorm groups): "
              f"ch={ch}, ch_mult={tuple(ch_mult)}")


class Encoder(nn.Module):
    """Image -> latent: ``len(ch_mult) - 1`` stride-2 downsamples, then mid (res, attn, res)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_levels: Iterable[int] = (-1,), z_channels: int = 256, double_z: bool = False,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        _check_widths(ch, ch_mult, num_res_blocks)
        num_levels = len(ch_mult)
        attn = resolve_levels(attn_levels, num_levels)
        self.in_channels, self.num_levels = in_channels, num_levels
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.conv_blocks = nn.ModuleList(
            ConvLevel(widths[i], widths[i + 1], num_res_blocks, attn=i in attn,
                      resample="down" if i < num_levels - 1 else None, dropout=dropout)
            for i in range(num_levels))
        self.mid = middle(widths[-1], dropout)
        self.norm_out = normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels if double_z else z_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    def forward(self, images: Float[Tensor, "b c h w"]) -> Float[Tensor, "b z h2 w2"]:
        h = self.conv_in(images)
        for module in (*self.conv_blocks, *self.mid):
            h = module(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image: mid (res, attn, res), then ``num_res_blocks + 1`` res blocks per level."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_levels: Iterable[int] = (-1,), z_channels: int = 256, out_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        _check_widths(ch, ch_mult, num_res_blocks)
        num_levels = len(ch_mult)
        attn = resolve_levels(attn_levels, num_levels)
        self.z_channels, self.num_levels = z_channels, num_levels
        order = list(reversed(range(num_levels)))  # processing order: lowest resolution first
        widths = [ch * ch_mult[-1]] + [ch * ch_mult[i] for i in order]
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = middle(widths[0], dropout)
        self.conv_blocks = nn.ModuleList(
            ConvLevel(widths[k], widths[k + 1], num_res_blocks + 1, attn=level in attn,
                      resample="up" if level > 0 else None, dropout=dropout)
            for k, level in enumerate(order))
        self.norm_out = normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: Float[Tensor, "b z h w"]) -> Float[Tensor, "b c h2 w2"]:
        h = self.conv_in(z)
        for module in (*self.mid, *self.conv_blocks):
            h = module(h)
        return self.conv_out(swish(self.norm_out(h)))


# Pixels are expected in [-1, 1]; the margin lets resampling overshoot through (bicubic reaches ±1.49
# at sharp edges) while 0..255 pixels, the usual mistake, are caught.
PIXEL_MARGIN = 0.5


def check_images(images: Tensor, tokenizer: nn.Module, name: str = "images") -> Tensor:
    """Images are float [b, channels, h, w] in [-1, 1] with h and w multiples of the tokenizer's
    downsampling factor; returned in the tokenizer's parameter dtype and device (as the models convert).
    The range check is one min/max reduction, before the encoder runs."""
    channels, factor = tokenizer.config.in_channels, tokenizer.downsample_factor
    check(isinstance(images, Tensor) and images.ndim == 4,
          f"`{name}` must be a 4-D tensor [b, {channels}, h, w], got {describe(images)}")
    check(images.is_floating_point(), f"`{name}` must be a floating tensor, got {describe(images)}")
    check(images.shape[1] == channels, f"`{name}` must have {channels} channels, got {describe(images)}")
    check(images.shape[0] > 0 and images.shape[-2] > 0 and images.shape[-1] > 0,
          f"`{name}` must hold at least one non-empty image, got {describe(images)}")
    check(divisible_by(images.shape[-2], factor) and divisible_by(images.shape[-1], factor),
          f"`{name}` height and width must be multiples of {factor} (the downsampling factor), got {describe(images)}")
    check_value_range(name, images, -1 - PIXEL_MARGIN, 1 + PIXEL_MARGIN, expected="pixels in [-1, 1]",
                      hint=" (0..255 pixels: pass `images / 127.5 - 1`; 0..1 pixels: `images * 2 - 1`)")
    return like_parameters(images, tokenizer)


def check_latent(z: Tensor, tokenizer: nn.Module, channels: int, name: str = "z") -> Tensor:
    """A float latent [b, channels, h, w], returned in the tokenizer's parameter dtype and device."""
    check(isinstance(z, Tensor) and z.ndim == 4 and z.is_floating_point() and z.shape[1] == channels,
          f"`{name}` must be a floating tensor [b, {channels}, h, w], got {describe(z)}")
    check_finite(name, z)
    return like_parameters(z, tokenizer)


# Shared by the three tokenizers: configs by preset name / dataclass / official dict, index checks
# (their from_official pipeline is mmgen_pytorch.pretrained.common.load_official).

def resolve_config(config, cls, presets: Mapping[str, object], overrides: Mapping[str, object]):
    """A ``cls`` dataclass from a preset name, an instance, an official argument dict, or None (default)."""
    if config is None:
        config = cls()
    elif isinstance(config, str):
        check(config in presets, f"unknown preset `config`={config!r}; choose one of {sorted(presets)}")
        config = presets[config]
    elif isinstance(config, Mapping):
        config = cls.from_official(config)
    check(isinstance(config, cls),
          f"`config` must be a preset name, a {cls.__name__} or a dict, got {describe(config)}")
    return replace(config, **overrides) if overrides else config


def check_codes(codes: Tensor, vocab: int, ndim: int, name: str, layout: str) -> None:
    check(isinstance(codes, Tensor) and codes.ndim == ndim,
          f"`{name}` must be a {ndim}-D integer tensor {layout}, got {describe(codes)}")
    check(is_index_tensor(codes), f"`{name}` must be an integer tensor, got {describe(codes)}")
    check_index_range(name, codes, vocab, what="code ids", bound="codebook size")
