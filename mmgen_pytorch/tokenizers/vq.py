"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8): conv encoder -> 1x1 ``quant_conv`` -> nearest
code of an L2-normalised codebook (straight-through) -> 1x1 ``post_quant_conv`` -> conv decoder.

Images are in [-1, 1]; tokens are in row-major raster order. Losses follow the official
quantizer: ``vq = mean((z_q - sg z)^2)``, ``commit = beta * mean((sg z_q - z)^2)`` and an optional
entropy loss ``ratio * (sample entropy - average entropy)`` on ``-distance / temperature``.
The forward's loss is MSE reconstruction + the quantizer losses; upstream's LPIPS + PatchGAN training is
:class:`~mmgen_pytorch.tokenizers.losses.TokenizerLoss` (``python -m mmgen_pytorch.train llamagen-vq-16``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from .._utils import check, describe
from ..pretrained.common import load_official
from ..pretrained.ldm import infer_conv_layout
from ..pretrained.vq import llamagen_vq_state_dict
from ..saving import Checkpointable
from .blocks import Decoder, Encoder, check_codes, check_images, check_latent, resolve_config


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True
    show_usage: bool = True
    commit_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01
    ch: int = 128
    encoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    attn_levels: Tuple[int, ...] = (-1,)  # attention at the lowest resolution only
    in_channels: int = 3
    dropout: float = 0.0
    usage_window: int = 65536

    # official ModelArgs name -> ours (`ch` is not a ModelArgs field; the official width is 128).
    # Not annotated, so a class constant rather than a field.
    OFFICIAL = {"codebook_size": "codebook_size", "codebook_embed_dim": "codebook_dim",
                "codebook_l2_norm": "l2_norm", "codebook_show_usage": "show_usage",
                "commit_loss_beta": "commit_beta", "entropy_loss_ratio": "entropy_loss_ratio",
                "encoder_ch_mult": "encoder_ch_mult", "decoder_ch_mult": "decoder_ch_mult",
                "z_channels": "z_channels", "dropout_p": "dropout", "ch": "ch"}

    @classmethod
    def from_official(cls, args: Mapping) -> "VQConfig":
        """From LlamaGen's ``vq_model.ModelArgs`` fields (other keys are ignored)."""
        values = {ours: args[theirs] for theirs, ours in cls.OFFICIAL.items() if theirs in args}
        for key in ("encoder_ch_mult", "decoder_ch_mult"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


VQ_PRESETS = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
}


class VQLosses(NamedTuple):
    vq: Float[Tensor, ""]
    commit: Float[Tensor, ""]
    entropy: Float[Tensor, ""]
    usage: Float[Tensor, ""]  # fraction of the codebook seen in the usage window (no gradient)


class VQEncoding(NamedTuple):
    quant: Float[Tensor, "b d h w"]  # straight-through quantized latent
    losses: VQLosses
    indices: Int[Tensor, "b h w"]


class VQOutput(NamedTuple):
    recon: Float[Tensor, "b c H W"]
    loss: Float[Tensor, ""]  # recon_loss + vq + commit + entropy
    recon_loss: Float[Tensor, ""]
    quantizer: VQLosses
    indices: Int[Tensor, "b h w"]


def entropy_loss(affinity: Float[Tensor, "n k"], temperature: float) -> Float[Tensor, ""]:
    """Mean per-sample entropy minus the entropy of the mean assignment (sharp and diverse codes)."""
    logits = affinity / temperature
    probs, log_probs = logits.softmax(-1), logits.log_softmax(-1)
    mean_probs = probs.mean(0)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    mean_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return sample_entropy - mean_entropy


class VectorQuantizer(nn.Module):
    """Nearest code by squared distance; with ``l2_norm`` both z and the codebook are normalised."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        size = config.codebook_size
        self.embedding = nn.Embedding(size, config.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)
        if config.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if config.show_usage:
            self.register_buffer("codebook_used", torch.zeros(config.usage_window))

    def codebook(self) -> Float[Tensor, "k d"]:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.config.l2_norm else weight

    def lookup(self, indices: Int[Tensor, "b h w"]) -> Float[Tensor, "b d h w"]:
        return rearrange(F.embedding(indices, self.codebook()), "b h w d -> b d h w")

    def nearest(self, z: Float[Tensor, "b d h w"]) -> Tuple[Tensor, Tensor, Tensor]:
        """(normalised z as [b, h, w, d], squared distances [b*h*w, k], indices [b, h, w])."""
        z = rearrange(z, "b d h w -> b h w d")
        if self.config.l2_norm:
            z = F.normalize(z, dim=-1)
        flat, codebook = z.reshape(-1, z.shape[-1]), self.codebook()
        with torch.autocast(flat.device.type, enabled=False):  # bf16 distances would pick wrong codes
            flat = flat.to(codebook.dtype)
            distance = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return z, distance, distance.argmin(-1).view(z.shape[:-1])

    @torch.no_grad()
    def _track_usage(self, indices: Tensor) -> Tensor:
        if not self.config.show_usage:
            return indices.new_zeros((), dtype=torch.float32)
        if self.training:
            recent = indices.flatten()[-self.codebook_used.numel():].to(self.codebook_used.dtype)
            self.codebook_used.copy_(torch.cat((self.codebook_used[recent.numel():], recent)))
        return torch.tensor(self.codebook_used.unique().numel() / self.config.codebook_size)

    def forward(self, z: Float[Tensor, "b d h w"]) -> VQEncoding:
        z, distance, indices = self.nearest(z)
        z_q = F.embedding(indices, self.codebook())
        vq = F.mse_loss(z_q, z.detach())
        commit = self.config.commit_beta * F.mse_loss(z_q.detach(), z)
        entropy = (self.config.entropy_loss_ratio * entropy_loss(-distance, self.config.entropy_temperature)
                   if self.config.entropy_loss_ratio > 0 else z.new_zeros(()))
        quant = z + (z_q - z).detach()
        losses = VQLosses(vq, commit, entropy, self._track_usage(indices).to(z.device))
        return VQEncoding(rearrange(quant, "b h w d -> b d h w"), losses, indices)


class VQVAE(Checkpointable, nn.Module):
    """LlamaGen VQ tokenizer. ``VQVAE("VQ-16")``, ``VQVAE("VQ-8")`` or ``VQVAE(VQConfig(...))``;
    keyword overrides replace config fields, e.g. ``VQVAE("VQ-16", codebook_size=4096)``."""

    def __init__(self, config: Union[str, VQConfig, Mapping, None] = "VQ-16", **overrides):
        super().__init__()
        self.config = config = resolve_config(config, VQConfig, VQ_PRESETS, overrides)
        conv = dict(ch=config.ch, num_res_blocks=config.num_res_blocks, attn_levels=config.attn_levels,
                    z_channels=config.z_channels, dropout=config.dropout)
        self.encoder = Encoder(ch_mult=config.encoder_ch_mult, in_channels=config.in_channels, **conv)
        self.decoder = Decoder(ch_mult=config.decoder_ch_mult, out_channels=config.in_channels, **conv)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.quantize = VectorQuantizer(config)

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def encode(self, images: Float[Tensor, "b c H W"]) -> VQEncoding:
        """Straight-through quantized latent, quantizer losses and indices ``[b, h, w]``; ``images`` in
        [-1, 1] (any float dtype)."""
        return self._quantized(check_images(images, self))

    @torch.no_grad()
    def encode_to_indices(self, images: Float[Tensor, "b c H W"]) -> Int[Tensor, "b h w"]:
        """Code indices in raster order (row-major), ``[b, H/f, W/f]``."""
        return self.quantize.nearest(self.quant_conv(self.encoder(check_images(images, self))))[2]

    def embed_code(self, indices: Int[Tensor, "b h w"]) -> Float[Tensor, "b d h w"]:
        check_codes(indices, self.codebook_size, 3, "indices", "[b, h, w]")
        return self.quantize.lookup(indices)

    def decode(self, quant: Float[Tensor, "b d h w"]) -> Float[Tensor, "b c H W"]:
        return self.decoder(self.post_quant_conv(check_latent(quant, self, self.config.codebook_dim, "quant")))

    def decode_code(self, indices: Int[Tensor, "..."],
                    shape: Optional[Sequence[int]] = None) -> Float[Tensor, "b c H W"]:
        """Images (nominally in [-1, 1], not clamped) from indices ``[b, h, w]``; or ``[b, h*w]`` with
        ``shape=(h, w)`` (square grids are inferred); or LlamaGen's flat ``[b*h*w]`` with
        ``shape=(b, d, h, w)``."""
        return self.decode(self.embed_code(as_grid(indices, shape)))

    def forward(self, images: Float[Tensor, "b c H W"]) -> VQOutput:
        """Reconstruction and the training loss: MSE reconstruction + vq + commitment + entropy."""
        images = check_images(images, self)
        quant, losses, indices = self._quantized(images)
        recon = self.decoder(self.post_quant_conv(quant))
        recon_loss = F.mse_loss(recon, images)
        total = recon_loss + losses.vq + losses.commit + losses.entropy
        return VQOutput(recon, total, recon_loss, losses, indices)

    def _quantized(self, images: Tensor) -> VQEncoding:
        return self.quantize(self.quant_conv(self.encoder(images)))

    @classmethod
    def from_official(cls, source, config: Union[str, VQConfig, Mapping, None] = None, *,
                      ema: bool = False) -> "VQVAE":
        """Load a LlamaGen VQ checkpoint: a path, ``{"model"/"ema"/"state_dict": ...}`` or a raw
        state dict. ``config`` is a preset name, a :class:`VQConfig`, LlamaGen ``ModelArgs`` fields
        as a dict, or None to read the architecture off the weights. ``ema`` picks ``"ema"``."""
        config = None if config is None else resolve_config(config, VQConfig, VQ_PRESETS, {})
        return load_official(cls, source, config, kind="vq",
                             to_ours=lambda official, _: llamagen_vq_state_dict(official),
                             infer=infer_vq_config, prefer="ema" if ema else None)


def infer_vq_config(official: Mapping[str, Tensor]) -> VQConfig:
    """The architecture of an official LlamaGen VQ state dict, read off its key names and shapes."""
    state_dict = llamagen_vq_state_dict(official)
    check("quantize.embedding.weight" in state_dict, "the state dict has no `quantize.embedding.weight`")
    layout = infer_conv_layout(state_dict)
    size, dim = state_dict["quantize.embedding.weight"].shape
    used = state_dict.get("quantize.codebook_used")
    return VQConfig(codebook_size=size, codebook_dim=dim, ch=layout["ch"], show_usage=used is not None,
                    usage_window=used.numel() if used is not None else 65536,
                    encoder_ch_mult=layout["encoder_ch_mult"], decoder_ch_mult=layout["decoder_ch_mult"],
                    z_channels=layout["encoder_out_channels"], num_res_blocks=layout["num_res_blocks"],
                    in_channels=layout["in_channels"])  # attention: the lowest level (LlamaGen's fixed rule)


def as_grid(indices: Tensor, shape: Optional[Sequence[int]]) -> Tensor:
    """Indices ``[b, h, w]`` from ``[b, h, w]``, ``[b, n]`` (+ ``shape=(h, w)`` or square) or ``[n]`` + 4-D shape."""
    check(isinstance(indices, Tensor) and 1 <= indices.ndim <= 3,
          f"`indices` must be [b, h, w], [b, h*w] or flat [b*h*w], got {describe(indices)}")
    if indices.ndim == 3:
        return indices
    dims = tuple(int(s) for s in shape) if shape is not None else ()
    check(len(dims) in (0, 2, 4), f"`shape` must be (h, w) or LlamaGen's (b, d, h, w), got {shape!r}")
    if indices.ndim == 1:
        check(len(dims) == 4, f"flat `indices` {describe(indices)} need `shape=(b, d, h, w)`, got {shape!r}")
        batch, grid = dims[0], dims[2:]
    else:
        batch = indices.shape[0]
        side = math.isqrt(indices.shape[1])
        grid = dims[-2:] if dims else (side, side)
        check(dims or side * side == indices.shape[1],
              f"`indices` {describe(indices)} is not a square grid; pass `shape=(h, w)`")
    check(batch * grid[0] * grid[1] == indices.numel(),
          f"`indices` {describe(indices)} do not fit `shape` {shape!r}")
    return indices.reshape(batch, *grid)
