"""DnD-Transformer's RQ-VAE (kakaobrain's residual-quantized VAE): conv encoder -> 1x1
``quant_conv`` -> residual quantization over ``depth`` steps with ONE shared codebook -> 1x1
``post_quant_conv`` -> conv decoder.

At every depth the nearest codeword (squared L2) to the current residual is chosen and subtracted;
the latent is the sum of the chosen codewords, so :meth:`RQVAE.decode_code` decodes
``sum_d codebook[codes[..., d]]`` and a prefix of depths decodes a coarser image.

Training: the codebook is not learned by gradients but by EMA of the assigned vectors (decay 0.99,
Laplace-smoothed cluster sizes); codewords whose EMA count falls below 1 are restarted from random
vectors of the current batch. Loss = MSE (or L1) reconstruction + ``latent_loss_weight`` *
commitment, the commitment being the mean over depths of ``mean((z - partial_sum_d)^2)``.
Upstream's LPIPS + adaptive-weight PatchGAN training is :class:`~mmgen_pytorch.tokenizers.losses.TokenizerLoss`
(``python -m mmgen_pytorch.train dnd-rqvae``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from .._utils import check
from ..files import CheckpointMismatchError
from ..pretrained.common import load_official
from ..pretrained.dnd import dnd_rqvae_state_dict
from ..pretrained.ldm import infer_conv_layout, levels_at_resolutions
from ..saving import Checkpointable
from .blocks import Decoder, Encoder, check_codes, check_images, check_latent, resolve_config

LOSS_TYPES = ("mse", "l1")


@dataclass(frozen=True)
class RQConfig:
    embed_dim: int = 256
    n_embed: int = 16384
    depth: int = 2
    decay: float = 0.99
    eps: float = 1e-5
    restart_unused_codes: bool = True
    latent_loss_weight: float = 0.25
    loss_type: str = "mse"
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: Tuple[int, ...] = (-1,)
    z_channels: int = 256
    in_channels: int = 3
    dropout: float = 0.0

    @classmethod
    def from_official(cls, args: Mapping) -> "RQConfig":
        """From the official ``RQVAE(**kwargs)`` arguments (``embed_dim``, ``n_embed``, ``code_shape``,
        ``ddconfig``, ...) or a ``config.yaml`` dict with ``arch`` / ``hparams`` + ``ddconfig``."""
        args = dict(args.get("arch", args))
        args = {**args.get("hparams", {}), **{k: v for k, v in args.items() if k != "hparams"}}
        dd = dict(args.get("ddconfig", {}))
        check(args.get("bottleneck_type", "rq") == "rq",
              f"only bottleneck_type 'rq' is supported, got {args.get('bottleneck_type')!r}")
        check(args.get("shared_codebook", True), "only shared_codebook=True RQ-VAEs are supported")
        check(not dd.get("double_z", False), "the RQ-VAE encoder needs `double_z=False` in `ddconfig`")
        code_shape, latent_shape = args.get("code_shape"), args.get("latent_shape")
        check(code_shape is not None and len(code_shape) == 3,
              f"`code_shape` must be [h, w, depth], got {code_shape!r}")
        check(latent_shape is None or list(latent_shape[:2]) == list(code_shape[:2]),
              f"latent_shape {latent_shape!r} and code_shape {code_shape!r} must share h, w (no spatial grouping)")
        ch_mult = tuple(dd.get("ch_mult", cls.ch_mult))
        attn = levels_at_resolutions(dd.get("resolution", 256), len(ch_mult), dd.get("attn_resolutions", ()))
        return cls(embed_dim=args.get("embed_dim", cls.embed_dim), n_embed=args.get("n_embed", cls.n_embed),
                   depth=int(code_shape[-1]), decay=args.get("decay", cls.decay),
                   restart_unused_codes=args.get("restart_unused_codes", True),
                   latent_loss_weight=args.get("latent_loss_weight", cls.latent_loss_weight),
                   loss_type=args.get("loss_type", "mse"), ch=dd.get("ch", cls.ch), ch_mult=ch_mult,
                   num_res_blocks=dd.get("num_res_blocks", cls.num_res_blocks), attn_levels=attn,
                   z_channels=dd.get("z_channels", cls.z_channels), in_channels=dd.get("in_channels", 3),
                   dropout=dd.get("dropout", 0.0))


class RQQuantized(NamedTuple):
    quant: Float[Tensor, "b d h w"]  # straight-through sum over all depths
    codes: Int[Tensor, "b h w depth"]
    commitment_loss: Float[Tensor, ""]


class RQOutput(NamedTuple):
    recon: Float[Tensor, "b c H W"]
    loss: Float[Tensor, ""]  # recon_loss + latent_loss_weight * commitment_loss
    recon_loss: Float[Tensor, ""]
    commitment_loss: Float[Tensor, ""]
    codes: Int[Tensor, "b h w depth"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def tile_with_noise(vectors: Float[Tensor, "n d"], count: int) -> Float[Tensor, "m d"]:
    """Repeat ``vectors`` to at least ``count`` rows, each copy jittered by U[0, 0.01/sqrt(d))."""
    repeats = -(-count // vectors.shape[0])
    tiled = vectors.repeat(repeats, 1)
    return tiled + torch.rand_like(tiled) * (0.01 / vectors.shape[1] ** 0.5)


class ResidualQuantizer(nn.Module):
    """A shared codebook ``[n_embed, embed_dim]`` applied ``depth`` times to the running residual."""

    def __init__(self, config: RQConfig):
        super().__init__()
        self.config = config
        check(config.depth >= 1 and config.n_embed >= 1, f"`depth` and `n_embed` must be >= 1, got {config}")
        codebook = torch.randn(config.n_embed, config.embed_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("embed_ema", codebook.clone())
        self.register_buffer("cluster_size_ema", torch.zeros(config.n_embed))

    def nearest(self, residual: Float[Tensor, "n d"]) -> Int[Tensor, "n"]:
        codebook = self.codebook
        distance = torch.addmm(residual.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1), residual,
                               codebook.t(), alpha=-2.0)
        return distance.argmin(-1)

    @torch.no_grad()
    def update_ema(self, vectors: Float[Tensor, "n d"], indices: Int[Tensor, "n"]) -> None:
        """EMA of cluster sizes and sums; codes whose EMA count is below 1 restart from batch vectors."""
        n_embed, decay = self.config.n_embed, self.config.decay
        counts = torch.bincount(indices, minlength=n_embed).to(vectors.dtype)
        sums = vectors.new_zeros(n_embed, vectors.shape[1]).index_add_(0, indices, vectors)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size_ema.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_ema.mul_(decay).add_(sums, alpha=1 - decay)
        if self.config.restart_unused_codes:
            pool = vectors if vectors.shape[0] >= n_embed else tile_with_noise(vectors, n_embed)
            fresh = pool[torch.randperm(pool.shape[0], device=pool.device)[:n_embed]]
            if _distributed():
                dist.broadcast(fresh, 0)
            dead = self.cluster_size_ema < 1
            self.embed_ema[dead] = fresh[dead]
            self.cluster_size_ema[dead] = 1.0

    @torch.no_grad()
    def refresh_codebook(self) -> None:
        """codebook = EMA sums / Laplace-smoothed EMA counts."""
        sizes, eps = self.cluster_size_ema, self.config.eps
        total = sizes.sum()
        smoothed = total * (sizes + eps) / (total + self.config.n_embed * eps)
        self.codebook.copy_(self.embed_ema / smoothed[:, None])

    @torch.no_grad()
    def residual_codes(self, z: Float[Tensor, "n d"], update: bool) -> Tuple[Tensor, List[Tensor]]:
        """Codes ``[n, depth]`` and the partial sums after each depth (updating the codebook if asked)."""
        residual, total = z.clone(), torch.zeros_like(z)
        codes, partial_sums = [], []
        for _ in range(self.config.depth):
            indices = self.nearest(residual)
            if update:
                self.update_ema(residual, indices)
            chosen = self.codebook[indices]  # looked up before this depth's codebook refresh
            if update:
                self.refresh_codebook()
            residual, total = residual - chosen, total + chosen
            codes.append(indices)
            partial_sums.append(total)
        return torch.stack(codes, dim=-1), partial_sums

    def forward(self, latent: Float[Tensor, "b d h w"], *, update: Optional[bool] = None) -> RQQuantized:
        """Quantize; in training mode (or with ``update=True``) the shared codebook is EMA-updated.

        The code search and EMA run in the codebook's dtype with autocast off: bf16 distances pick
        wrong codes, and the float32 EMA buffers cannot take bf16 vectors."""
        z = rearrange(latent, "b d h w -> b h w d")
        flat = z.reshape(-1, z.shape[-1])
        with torch.autocast(flat.device.type, enabled=False):
            codes, partial_sums = self.residual_codes(flat.detach().to(self.codebook.dtype),
                                                      self.training if update is None else update)
        commitment = torch.stack([F.mse_loss(flat, partial) for partial in partial_sums]).mean()
        quant = z + (partial_sums[-1].view_as(z).to(z.dtype) - z).detach()
        return RQQuantized(rearrange(quant, "b h w d -> b d h w"), codes.view(*z.shape[:-1], -1), commitment)

    def embed(self, codes: Int[Tensor, "b h w k"]) -> Float[Tensor, "b d h w"]:
        return rearrange(F.embedding(codes, self.codebook).sum(-2), "b h w d -> b d h w")


class RQVAE(Checkpointable, nn.Module):
    """DnD's RQ-VAE. ``RQVAE(RQConfig(...))``, ``RQVAE(official_kwargs_dict)`` or keyword overrides
    of the defaults (ImageNet 16x16x2 widths; the released checkpoint's attention placement is not
    documented, so load it with ``RQVAE.from_official(path)`` which reads it off the weights)."""

    def __init__(self, config: Union[RQConfig, Mapping, None] = None, **overrides):
        super().__init__()
        self.config = config = resolve_config(config, RQConfig, {}, overrides)
        check(config.loss_type in LOSS_TYPES, f"`loss_type` must be one of {LOSS_TYPES}, got {config.loss_type!r}")
        conv = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                    attn_levels=config.attn_levels, z_channels=config.z_channels, dropout=config.dropout)
        self.encoder = Encoder(double_z=False, in_channels=config.in_channels, **conv)
        self.decoder = Decoder(out_channels=config.in_channels, **conv)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantizer = ResidualQuantizer(config)

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def codebook_size(self) -> int:
        """Codes in the codebook shared by every depth (``n_embed``)."""
        return self.config.n_embed

    def encode_latent(self, images: Float[Tensor, "b c H W"]) -> Float[Tensor, "b d h w"]:
        """The continuous latent before quantization (``quant_conv`` output) of ``images`` in [-1, 1]
        (any float dtype)."""
        return self._latent(check_images(images, self))

    def _latent(self, checked_images: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(checked_images))

    def encode(self, images: Float[Tensor, "b c H W"]) -> RQQuantized:
        """Straight-through quantized latent, codes ``[b, h, w, depth]`` and the commitment loss.
        In training mode this EMA-updates the codebook."""
        return self.quantizer(self.encode_latent(images))

    @torch.no_grad()
    def encode_to_codes(self, images: Float[Tensor, "b c H W"]) -> Int[Tensor, "b h w depth"]:
        """Codes ``[b, H/f, W/f, depth]`` (never updates the codebook)."""
        return self.quantizer(self.encode_latent(images), update=False).codes

    def embed_code(self, codes: Int[Tensor, "b h w k"], depth: Optional[int] = None) -> Float[Tensor, "b d h w"]:
        """Sum of the codewords of the first ``depth`` (default: all given) depth slices."""
        check_codes(codes, self.config.n_embed, 4, "codes", f"[b, h, w, depth <= {self.depth}]")
        given = codes.shape[-1]
        check(1 <= given <= self.depth, f"`codes` must have 1..{self.depth} depth slices, got {given}")
        depth = given if depth is None else depth
        check(1 <= depth <= given, f"`depth` must lie in [1, {given}] (the depth slices given), got {depth}")
        return self.quantizer.embed(codes[..., :depth])

    def decode(self, quant: Float[Tensor, "b d h w"]) -> Float[Tensor, "b c H W"]:
        return self.decoder(self.post_quant_conv(check_latent(quant, self, self.config.embed_dim, "quant")))

    def decode_code(self, codes: Int[Tensor, "b h w k"], depth: Optional[int] = None) -> Float[Tensor, "b c H W"]:
        """Images (nominally in [-1, 1], not clamped) from codes ``[b, h, w, depth]``; with fewer depth
        slices or ``depth=d`` only the first d depths are summed (a coarser image)."""
        return self.decode(self.embed_code(codes, depth))

    def forward(self, images: Float[Tensor, "b c H W"]) -> RQOutput:
        """Reconstruction and training loss; in training mode the codebook is EMA-updated."""
        images = check_images(images, self)
        quant, codes, commitment = self.quantizer(self._latent(images))
        recon = self.decoder(self.post_quant_conv(quant))
        distance = F.mse_loss if self.config.loss_type == "mse" else F.l1_loss
        recon_loss = distance(recon, images)
        return RQOutput(recon, recon_loss + self.config.latent_loss_weight * commitment, recon_loss, commitment, codes)

    @classmethod
    def from_official(cls, source, config: Union[RQConfig, Mapping, None] = None, *, ema: bool = False) -> "RQVAE":
        """Load a DnD / kakaobrain RQ-VAE checkpoint: a path, ``{"state_dict": ...}`` or a raw state
        dict. ``config`` is an :class:`RQConfig`, the official ``RQVAE`` kwargs (or ``config.yaml``) as
        a dict, or None to read the architecture off the weights. ``ema`` picks ``"state_dict_ema"``.
        The per-depth codebook copies must be identical and match ``depth``."""
        config = None if config is None else resolve_config(config, RQConfig, {}, {})
        return load_official(cls, source, config, kind="rq",
                             to_ours=lambda sd, cfg: dnd_rqvae_state_dict(sd, depth=cfg.depth),
                             infer=infer_rq_config, prefer="state_dict_ema" if ema else None)


def infer_rq_config(official: Mapping[str, Tensor]) -> RQConfig:
    """The architecture of an official RQ-VAE state dict, read off its key names and shapes."""
    depths = {key.split(".")[2] for key in official if key.startswith("quantizer.codebooks.")}
    if not depths:
        raise CheckpointMismatchError("the checkpoint has no `quantizer.codebooks.{d}.*` keys (RQ-VAE codebook)")
    state_dict = dnd_rqvae_state_dict(official)
    layout = infer_conv_layout(state_dict)
    n_embed, embed_dim = state_dict["quantizer.codebook"].shape
    return RQConfig(embed_dim=embed_dim, n_embed=n_embed, depth=len(depths), ch=layout["ch"],
                    ch_mult=layout["encoder_ch_mult"], num_res_blocks=layout["num_res_blocks"],
                    attn_levels=layout["encoder_attn_levels"], z_channels=layout["encoder_out_channels"],
                    in_channels=layout["in_channels"])
