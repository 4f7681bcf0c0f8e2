"""MAR's KL-16 autoencoder (LDM's ``AutoencoderKL``, trimmed): conv encoder with ``double_z`` ->
1x1 ``quant_conv`` -> diagonal Gaussian posterior ``[mean | logvar]`` -> 1x1 ``post_quant_conv`` ->
conv decoder (attention only in its middle block).

MAR scales latents by 0.2325 *outside* the VAE (:data:`KL16_LATENT_SCALE`, the config's
``scale_factor``): it trains on ``encode(x).sample() * 0.2325`` and decodes ``decode(z / 0.2325)``;
a MAR given this VAE takes its ``scale_factor`` unless told another ``vae_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .._utils import GeneratorLike, as_generator, check
from ..pretrained.common import load_official
from ..pretrained.ldm import infer_conv_layout, levels_at_resolutions
from ..pretrained.mar import mar_vae_state_dict
from ..saving import Checkpointable
from .blocks import Decoder, Encoder, check_images, check_latent, resolve_config

KL16_LATENT_SCALE = 0.2325


class DiagonalGaussian:
    """Posterior from moments ``[b, 2c, h, w]`` = ``[mean | logvar]``, logvar clamped to [-30, 20]."""

    def __init__(self, parameters: Float[Tensor, "b c2 h w"]):
        check(parameters.ndim == 4 and parameters.shape[1] % 2 == 0,
              f"`parameters` must be [b, 2c, h, w] moments, got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: GeneratorLike = None) -> Float[Tensor, "b c h w"]:
        generator = as_generator(generator, self.mean.device)
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Float[Tensor, "b c h w"]:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> Float[Tensor, "b"]:
        """KL(self || other), summed over c, h, w; ``other`` defaults to the standard normal."""
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: Float[Tensor, "b c h w"]) -> Float[Tensor, "b"]:
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=(1, 2, 3))


@dataclass(frozen=True)
class KLConfig:
    embed_dim: int = 16
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    encoder_attn_levels: Tuple[int, ...] = (-1,)  # MAR: at 16x16 of 256 (the lowest level of KL-16)
    decoder_attn_levels: Tuple[int, ...] = ()  # MAR removed LDM's up-path attention
    use_variational: bool = True
    in_channels: int = 3
    dropout: float = 0.0
    kl_weight: float = 1e-6  # LDM's kl-f16 recipe; the training loss here is MSE + kl_weight * KL
    scale_factor: float = KL16_LATENT_SCALE  # what a generator multiplies the latents by (not used inside)

    @classmethod
    def from_official(cls, args: Mapping) -> "KLConfig":
        """From MAR's ``AutoencoderKL(embed_dim, ch_mult, use_variational)`` arguments, optionally with
        ``encoder_kwargs`` / ``decoder_kwargs`` (LDM ``Encoder``/``Decoder`` arguments) or ``ch``."""
        enc, dec = dict(args.get("encoder_kwargs", {})), dict(args.get("decoder_kwargs", {}))
        ch_mult = tuple(args.get("ch_mult", enc.get("ch_mult", cls.ch_mult)))
        levels = lambda kw, default: levels_at_resolutions(  # noqa: E731
            kw.get("resolution", 256), len(ch_mult), kw.get("attn_resolutions", default))
        check(enc.get("double_z", True), "MAR's KL autoencoder needs `double_z=True` in `encoder_kwargs`")
        return cls(embed_dim=args.get("embed_dim", cls.embed_dim), ch=args.get("ch", enc.get("ch", cls.ch)),
                   ch_mult=ch_mult, num_res_blocks=enc.get("num_res_blocks", cls.num_res_blocks),
                   encoder_attn_levels=levels(enc, (16,)), decoder_attn_levels=levels(dec, ()),
                   use_variational=args.get("use_variational", True), in_channels=enc.get("in_channels", 3),
                   dropout=enc.get("dropout", 0.0))


KL_PRESETS = {"KL-16": KLConfig()}


class KLOutput(NamedTuple):
    recon: Float[Tensor, "b c H W"]
    loss: Float[Tensor, ""]  # recon_loss + kl_weight * kl
    recon_loss: Float[Tensor, ""]
    kl: Float[Tensor, ""]  # mean over the batch of the summed KL
    posterior: DiagonalGaussian


class AutoencoderKL(Checkpointable, nn.Module):
    """``AutoencoderKL("KL-16")`` (MAR's released VAE), or a :class:`KLConfig`; keyword overrides
    replace config fields. ``use_variational=False`` reproduces MAR's quirk: the posterior gets
    logvar 1 (std e^0.5), so ``sample()`` still adds noise; use ``.mean`` for a deterministic latent."""

    def __init__(self, config: Union[str, KLConfig, Mapping, None] = "KL-16", **overrides):
        super().__init__()
        self.config = config = resolve_config(config, KLConfig, KL_PRESETS, overrides)
        conv = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                    z_channels=config.embed_dim, dropout=config.dropout)
        self.encoder = Encoder(attn_levels=config.encoder_attn_levels, double_z=True,
                               in_channels=config.in_channels, **conv)
        self.decoder = Decoder(attn_levels=config.decoder_attn_levels, out_channels=config.in_channels, **conv)
        moments = 2 if config.use_variational else 1
        self.quant_conv = nn.Conv2d(2 * config.embed_dim, moments * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, 1)

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def encode(self, images: Float[Tensor, "b c H W"]) -> DiagonalGaussian:
        """The posterior of ``images`` in [-1, 1] (any float dtype)."""
        return self._posterior(check_images(images, self))

    def decode(self, z: Float[Tensor, "b e h w"]) -> Float[Tensor, "b c H W"]:
        """Images (nominally in [-1, 1], not clamped) from unscaled latents."""
        return self.decoder(self.post_quant_conv(check_latent(z, self, self.config.embed_dim, "z")))

    def forward(self, images: Float[Tensor, "b c H W"], *, sample: bool = True,
                generator: GeneratorLike = None) -> KLOutput:
        """Reconstruction and the loss ``mse + kl_weight * KL``; LDM's L1 + LPIPS + PatchGAN training is
        :class:`~mmgen_pytorch.tokenizers.losses.TokenizerLoss` (``python -m mmgen_pytorch.train mar-kl-16``)."""
        images = check_images(images, self)
        posterior = self._posterior(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        recon = self.decoder(self.post_quant_conv(z))
        recon_loss, kl = F.mse_loss(recon, images), posterior.kl().mean()
        return KLOutput(recon, recon_loss + self.config.kl_weight * kl, recon_loss, kl, posterior)

    def _posterior(self, images: Tensor) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(images))
        if not self.config.use_variational:
            moments = torch.cat((moments, torch.ones_like(moments)), dim=1)
        return DiagonalGaussian(moments)

    @classmethod
    def from_official(cls, source, config: Union[str, KLConfig, Mapping, None] = None, *,
                      ema: bool = False) -> "AutoencoderKL":
        """Load MAR's VAE (``kl16.ckpt``): a path, ``{"model"/"state_dict": ...}`` or a raw state dict.
        ``config`` is a preset name, a :class:`KLConfig`, the official constructor arguments as a dict,
        or None to read the architecture off the weights. ``ema`` picks ``"model_ema"``."""
        config = None if config is None else resolve_config(config, KLConfig, KL_PRESETS, {})
        return load_official(cls, source, config, kind="kl",
                             to_ours=lambda official, _: mar_vae_state_dict(official),
                             infer=infer_kl_config, prefer="model_ema" if ema else None)


def infer_kl_config(official: Mapping[str, Tensor]) -> KLConfig:
    """The architecture of an official MAR/LDM KL state dict, read off its key names and shapes."""
    state_dict = mar_vae_state_dict(official)
    layout = infer_conv_layout(state_dict)
    check("post_quant_conv.weight" in state_dict and "quant_conv.weight" in state_dict,
          "the state dict has no `quant_conv` / `post_quant_conv` weights")
    embed_dim = state_dict["post_quant_conv.weight"].shape[0]
    return KLConfig(embed_dim=embed_dim, ch=layout["ch"], ch_mult=layout["encoder_ch_mult"],
                    num_res_blocks=layout["num_res_blocks"], encoder_attn_levels=layout["encoder_attn_levels"],
                    decoder_attn_levels=layout["decoder_attn_levels"], in_channels=layout["in_channels"],
                    use_variational=state_dict["quant_conv.weight"].shape[0] == 2 * embed_dim)
