"""MAR: masked autoregressive generation of continuous VAE tokens with a per-token diffusion head.

Li et al., "Autoregressive Image Generation without Vector Quantization" (LTH14/mar). An MAE-style
encoder sees the known tokens (plus ``buffer_size`` rows holding the class embedding), a decoder
fills the masked positions with ``mask_token``, and its output ``z`` at each position conditions
:class:`~mmgen_pytorch.diffloss.DiffLoss`, a small diffusion MLP that models that token. Both
transformers are the shared backbone configured as timm ViT blocks (pre-LayerNorm eps 1e-6, fused
qkv with bias, exact-GELU MLP, no rotary, bidirectional).

Reading order: :class:`MAR` (construction, training forward, ``sample``, VAE helpers, ``from_official``,
then the encoder / decoder pieces) -> presets -> the mask schedule. The presets (upstream's factory
sizes), key maps and config translation are :mod:`mmgen_pytorch.pretrained.mar`.
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._utils import (GeneratorLike, as_generator, as_int, check, check_finite, check_index_range, describe,
                     is_index_tensor, like_parameters)
from .backbone import Transformer
from .diffloss import DiffLoss
from .objectives.gaussian import Spacing, check_chain_options
from .guidance import check_cfg_scale, check_cfg_schedule, scheduled_cfg_scale
from .pretrained import mar as pretrained_mar
from .pretrained.mar import PRESETS
from .saving import Checkpointable
from .tokenizers.kl import KL16_LATENT_SCALE

__all__ = ["MAR", "DiffLoss", "MARSamples", "MaskStep", "mask_schedule", "mar_base", "mar_large",
           "mar_huge", "PRESETS", "VAE_SCALE"]

VAE_SCALE = KL16_LATENT_SCALE  # KL-16 latents are multiplied by this before MAR sees them

class MARSamples(NamedTuple):
    latents: Float[Tensor, "b c h w"]             # in MAR's (scaled) latent space
    images: Optional[Float[Tensor, "b 3 H W"]]    # vae.decode(latents / vae_scale), when a VAE is attached


class MAR(Checkpointable, nn.Module):
    """Masked autoregressive model over ``[b, vae_embed_dim, h, w]`` latents.

    Args (keyword-only):
        img_size, vae_stride, patch_size, vae_embed_dim: geometry; ``seq_len = (img_size / vae_stride /
            patch_size)²`` tokens of ``vae_embed_dim · patch_size²`` channels.
        encoder_dim, encoder_depth, encoder_heads, decoder_dim, decoder_depth, decoder_heads, mlp_ratio,
            norm_eps: the two transformers (decoder defaults to the encoder's sizes).
        mask_ratio_min: lower end of the truncated-normal mask ratio (mean 1, std 0.25, upper end 1).
        label_drop_prob: training probability of replacing the class by ``fake_latent``.
        num_classes, buffer_size: class table size; rows prepended to hold the class embedding.
        attn_dropout, proj_dropout: timm's ``attn_drop`` and ``proj_drop``.
        diffloss_depth, diffloss_width, num_sampling_steps: the diffusion head.
        diffusion_batch_mul: how many times each token's ``z`` is reused with fresh (t, noise) in training.
        grad_checkpointing: recompute transformer and MLP blocks in the backward pass.
        vae, vae_scale: an optional frozen autoencoder (``encode(x).sample()/.mean``, ``decode(z)``),
            kept out of the state dict, and the latent scale applied outside it (default: the VAE's
            ``scale_factor``, else KL-16's 0.2325).
        attn_backend: the encoder's and decoder's kernel (see :class:`~mmgen_pytorch.backbone.Transformer`).
            Their attention is unmasked: ``"auto"`` runs SDPA's fused kernels; ``"flex"`` runs flex attention
            over one all-visible block (forward only on CPU; with attention dropout, training with it is refused).
    """

    def __init__(self, *, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1, vae_embed_dim: int = 16,
                 encoder_dim: int = 1024, encoder_depth: int = 16, encoder_heads: int = 16,
                 decoder_dim: Optional[int] = None, decoder_depth: Optional[int] = None,
                 decoder_heads: Optional[int] = None, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 mask_ratio_min: float = 0.7, label_drop_prob: float = 0.1, num_classes: int = 1000,
                 buffer_size: int = 64, attn_dropout: float = 0.1, proj_dropout: float = 0.1,
                 diffloss_depth: int = 3, diffloss_width: int = 1024, num_sampling_steps: Spacing = "100",
                 diffusion_batch_mul: int = 4, grad_checkpointing: bool = False, vae: Optional[nn.Module] = None,
                 vae_scale: Optional[float] = None, attn_backend: str = "auto"):
        super().__init__()
        decoder_dim = encoder_dim if decoder_dim is None else decoder_dim
        decoder_depth = encoder_depth if decoder_depth is None else decoder_depth
        decoder_heads = encoder_heads if decoder_heads is None else decoder_heads
        _check_geometry(img_size, vae_stride, patch_size, vae_embed_dim)
        check(0.0 < mask_ratio_min <= 1.0, f"`mask_ratio_min` must be in (0, 1], got {mask_ratio_min}")
        check(0.0 <= label_drop_prob <= 1.0, f"`label_drop_prob` must be in [0, 1], got {label_drop_prob}")
        check(num_classes >= 1 and buffer_size >= 1 and diffusion_batch_mul >= 1,
              f"`num_classes`, `buffer_size` and `diffusion_batch_mul` must be >= 1, got "
              f"{num_classes}, {buffer_size}, {diffusion_batch_mul}")

        self.img_size, self.vae_stride = img_size, vae_stride
        self.patch_size, self.vae_embed_dim = patch_size, vae_embed_dim
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_dim = vae_embed_dim * patch_size ** 2
        self.buffer_size, self.num_classes = buffer_size, num_classes
        self.mask_ratio_min, self.label_drop_prob = mask_ratio_min, label_drop_prob
        # the VAE's own latent scale (AutoencoderKL.scale_factor) unless one is given, else KL-16's
        vae_scale = vae_scale if vae_scale is not None else getattr(vae, "scale_factor", VAE_SCALE)
        self.diffusion_batch_mul, self.vae_scale = diffusion_batch_mul, float(vae_scale)
        self._vae = (vae,)  # a tuple keeps the frozen VAE out of parameters() and state_dict()
        if vae is not None:
            vae.requires_grad_(False).eval()

        positions = self.seq_len + buffer_size
        block = dict(norm="layernorm", norm_eps=norm_eps, ff="gelu", ff_mult=mlp_ratio, qkv_bias=True, out_bias=True,
                     ff_bias=True, rotary_axes=0, causal=False, attn_dropout=attn_dropout, resid_dropout=proj_dropout,
                     ff_dropout=proj_dropout, ff_hidden_dropout=proj_dropout, grad_checkpointing=grad_checkpointing,
                     attn_backend=attn_backend)
        # encoder: class rows + visible tokens
        self.class_emb = nn.Embedding(num_classes, encoder_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_dim))  # the null class
        self.z_proj = nn.Linear(self.token_dim, encoder_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_dim, eps=norm_eps)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, encoder_dim))
        self.encoder = Transformer(dim=encoder_dim, depth=encoder_depth, heads=encoder_heads, **block)
        # decoder: every position, masked ones filled with mask_token
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, decoder_dim))
        self.decoder = Transformer(dim=decoder_dim, depth=decoder_depth, heads=decoder_heads, **block)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_dim))
        self.reset_parameters()
        # built after the init above, so the head keeps its own (zeroed adaLN) init
        self.diffloss = DiffLoss(target_channels=self.token_dim, z_channels=decoder_dim, depth=diffloss_depth,
                                 width=diffloss_width, num_sampling_steps=num_sampling_steps,
                                 grad_checkpointing=grad_checkpointing)

    def reset_parameters(self) -> None:
        """N(0, 0.02) embeddings, xavier linears with zero bias, unit LayerNorms (the head excluded)."""
        for param in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, DiffLoss):
                break
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def vae(self) -> Optional[nn.Module]:
        return self._vae[0]

    @property
    def device(self) -> torch.device:
        return self.fake_latent.device

    # training

    def forward(self, latents: Float[Tensor, "b c h w"], labels: Optional[Int[Tensor, " b"]] = None, *,
                generator: GeneratorLike = None) -> Tensor:
        """Diffusion loss on the masked tokens of (already scaled) latents; ``labels=None`` trains
        class-unconditionally (``class_emb`` then gets no gradient: freeze it, or wrap the model in
        DistributedDataParallel with ``find_unused_parameters=True``). One mask ratio per batch, one
        random order per sample.

        ``generator`` seeds the mask ratio, orders, label drop, timesteps and noise; dropout layers
        draw from torch's global RNG. An int ``generator`` is a seed."""
        self._check_latents(latents)
        batch = latents.shape[0]
        labels = self._check_labels(labels, batch, "labels")
        generator = as_generator(generator, self.device)
        tokens = self.patchify(latents)
        class_embedding = self.class_embedding(labels, batch, drop=self.training, generator=generator)
        orders = self.random_orders(batch, generator=generator)
        mask = self.mask_from_orders(orders, self.sample_num_masked(generator=generator))
        z = self.condition(tokens, mask, class_embedding)
        # the loss counts masked tokens only, each drawn diffusion_batch_mul times (upstream's order of rows)
        masked = mask.reshape(-1).nonzero().squeeze(1)
        rows = masked.repeat(self.diffusion_batch_mul)
        target = tokens.detach().reshape(-1, self.token_dim)[rows]
        z = z.reshape(-1, z.shape[-1]).index_select(0, masked)
        return self.diffloss(target, z, z_rows=torch.arange(len(masked), device=z.device).repeat(
            self.diffusion_batch_mul), generator=generator)

    # sampling

    @torch.no_grad()
    def sample(self, class_labels: Union[Tensor, Sequence[int], None] = None, *, batch_size: Optional[int] = None,
               num_iter: int = 64, cfg_scale: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0,
               num_sampling_steps: Spacing = None, generator: GeneratorLike = None,
               clip_denoised: Optional[float] = None, progress: bool = True) -> MARSamples:
        """Generate latents (and images with a VAE) in ``num_iter`` steps.

        ``class_labels``: class ids ``[b]`` (a list or an integer tensor: ``[7]`` is one image of class 7),
        or None with ``batch_size=n`` for n class-unconditional samples (every row uses ``fake_latent``);
        a bare int is refused as ambiguous. Each step re-encodes the known tokens,
        picks the next tokens along a random order by the cosine schedule and samples exactly those
        with the diffusion head (``num_sampling_steps`` overrides its respacing, ``temperature``
        scales its per-step noise). ``cfg_scale != 1`` runs the transformer on ``[cond; null]`` rows and
        guides ε with the per-step scale of ``cfg_schedule``. ``clip_denoised=c > 0`` clamps the head's
        predicted x_0 to ``[-c, c]`` (bounded data such as pixels; upstream does not clip latents).
        ``generator``: a ``torch.Generator`` or an int seed.
        """
        labels, batch = self._sampling_labels(class_labels, batch_size)
        check(isinstance(num_iter, int) and num_iter >= 1, f"`num_iter` must be an int >= 1, got {num_iter!r}")
        check_cfg_schedule(cfg_schedule)
        check_chain_options(temperature=temperature, clip_denoised=clip_denoised)
        check_cfg_scale(cfg_scale)
        self.diffloss.sampling_diffusion(num_sampling_steps)  # a bad spacing fails here, before any step
        generator = as_generator(generator, self.device)
        class_embedding = self.class_embedding(labels, batch)
        if cfg_scale != 1.0:  # one doubled batch: conditional rows, then null-class rows
            class_embedding = torch.cat((class_embedding, self.fake_latent.expand(batch, -1)))
        head = dict(temperature=temperature, num_sampling_steps=num_sampling_steps, generator=generator,
                    clip_denoised=clip_denoised)
        tokens = torch.zeros(batch, self.seq_len, self.token_dim, device=self.device)
        orders = self.random_orders(batch, generator=generator)
        masked = self.seq_len
        for step in tqdm(mask_schedule(self.seq_len, num_iter), disable=not progress, desc="MAR"):
            if step.num_pred == 0:
                continue  # only when num_iter > seq_len: nothing is predicted, nothing changes
            chosen = orders[:, step.remaining:masked]  # the positions predicted now, [b, num_pred]
            scale = scheduled_cfg_scale(cfg_scale, cfg_schedule, known=self.seq_len - step.mask_len, total=self.seq_len)
            values = self.sample_positions(tokens, self.mask_from_orders(orders, masked), chosen, class_embedding,
                                           cfg_scale=scale, **head)
            tokens = tokens.scatter(1, chosen[..., None].expand(-1, -1, self.token_dim), values.to(tokens.dtype))
            masked = step.remaining
        latents = self.unpatchify(tokens)
        return MARSamples(latents, self.decode(latents) if self.vae is not None else None)

    def sample_positions(self, tokens: Float[Tensor, "b n d"], mask: Bool[Tensor, "b n"], chosen: Int[Tensor, "b k"],
                         class_embedding: Float[Tensor, "b2 e"], *, cfg_scale: float = 1.0,
                         **head_kwargs) -> Float[Tensor, "b k d"]:
        """One step: condition every position on the known tokens, then let the head sample only the
        ``chosen`` ones. A class embedding with twice the rows of ``tokens`` means CFG."""
        batch = tokens.shape[0]
        guided = class_embedding.shape[0] == 2 * batch
        if guided:
            tokens, mask = torch.cat((tokens, tokens)), torch.cat((mask, mask))
        z = self.condition(tokens, mask, class_embedding)
        z_uncond = _gather_rows(z[batch:], chosen) if guided else None
        values = self.diffloss.sample(_gather_rows(z[:batch], chosen), z_uncond=z_uncond,
                                      cfg_scale=cfg_scale if guided else 1.0, **head_kwargs)
        return values.reshape(batch, -1, self.token_dim)

    # VAE

    @torch.no_grad()
    def encode(self, images: Float[Tensor, "b 3 H W"], *, sample_posterior: bool = True,
               generator: GeneratorLike = None) -> Float[Tensor, "b c h w"]:
        """Images in [-1, 1] -> scaled latents (``posterior.sample() · vae_scale``, as upstream trains)."""
        check(self.vae is not None, "`encode` needs a VAE: construct MAR(..., vae=AutoencoderKL(...))")
        posterior = self.vae.to(images.device).encode(images)
        if not sample_posterior:
            return posterior.mean * self.vae_scale
        latents = posterior.sample() if generator is None else posterior.sample(as_generator(generator, images.device))
        return latents * self.vae_scale

    @torch.no_grad()
    def decode(self, latents: Float[Tensor, "b c h w"]) -> Float[Tensor, "b 3 H W"]:
        """Scaled latents -> images (``vae.decode(latents / vae_scale)``, range [-1, 1])."""
        check(self.vae is not None, "`decode` needs a VAE: construct MAR(..., vae=AutoencoderKL(...))")
        vae = self.vae.to(latents.device)
        return vae.decode(like_parameters(latents / self.vae_scale, vae))

    # official checkpoints

    @classmethod
    def from_official(cls, checkpoint: Union[str, os.PathLike, Mapping], *,
                      config: Union[None, str, Mapping[str, Any]] = None, use_ema: bool = True,
                      **overrides) -> "MAR":
        """Load an LTH14/mar checkpoint strictly.

        ``checkpoint``: a ``checkpoint-last.pth`` path, its loaded dict (``model`` / ``model_ema`` /
        ``args``) or a raw state dict. ``config``: a preset name (``"mar_base"``), a dict of our or the
        official constructor arguments (``encoder_embed_dim``, ``class_num``, ``diffloss_d``, ...), or
        None to read the checkpoint's ``args``. DiffLoss depth/width are read from the weights when not
        given. ``use_ema`` picks ``model_ema`` when present. ``overrides`` (e.g. ``vae=``) win.
        """
        return pretrained_mar.from_official(cls, checkpoint, config=config, use_ema=use_ema, **overrides)

    # pieces (public: the golden tests pin them)

    def patchify(self, latents: Float[Tensor, "b c h w"]) -> Float[Tensor, "b n d"]:
        """Raster-order tokens, channels slowest within a token: ``(c p q)``."""
        return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch_size, q=self.patch_size)

    def unpatchify(self, tokens: Float[Tensor, "b n d"]) -> Float[Tensor, "b c h w"]:
        return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=self.seq_h, w=self.seq_w,
                         p=self.patch_size, q=self.patch_size)

    def class_embedding(self, labels: Optional[Tensor], batch: int, *, drop: bool = False,
                        generator: GeneratorLike = None) -> Float[Tensor, "b d"]:
        """``class_emb(labels)``, ``fake_latent`` for ``labels=None``; ``drop`` replaces each row by
        ``fake_latent`` with probability ``label_drop_prob``."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        embedding = self.class_emb(labels)
        if not drop:
            return embedding
        # in training the null class stays in the graph even when nothing can be dropped (as upstream's
        # torch.where): every parameter gets a gradient each step, which DistributedDataParallel requires
        dropped = (_rand((batch,), generator, self.device) < self.label_drop_prob if self.label_drop_prob > 0
                   else torch.zeros(batch, dtype=torch.bool, device=self.device))
        return torch.where(dropped[:, None], self.fake_latent.to(embedding.dtype), embedding)

    def random_orders(self, batch: int, *, generator: GeneratorLike = None) -> Int[Tensor, "b n"]:
        """An independent uniform permutation of the positions per sample."""
        return _rand((batch, self.seq_len), generator, self.device, dtype=torch.float64).argsort(dim=-1)

    def mask_from_orders(self, orders: Tensor, num_masked: int) -> Bool[Tensor, "b n"]:
        """True at the first ``num_masked`` positions of each order."""
        mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
        return mask.scatter(1, orders[:, :num_masked], True)

    def sample_num_masked(self, *, generator: GeneratorLike = None) -> int:
        """``ceil(seq_len · r)`` with r ~ N(1, 0.25²) truncated to [mask_ratio_min, 1] (inverse CDF)."""
        low = torch.special.ndtr(torch.tensor((self.mask_ratio_min - 1.0) / 0.25, dtype=torch.float64))
        high = 0.5  # Φ(0): the upper end of the support is the mean
        u = _rand((1,), generator, torch.device("cpu")).double()
        ratio = 1.0 + 0.25 * torch.special.ndtri(low + u * (high - low))
        ratio = float(ratio.clamp(self.mask_ratio_min, 1.0))
        return int(math.ceil(self.seq_len * ratio))

    def condition(self, tokens: Float[Tensor, "b n d"], mask: Tensor,
                  class_embedding: Float[Tensor, "b e"]) -> Float[Tensor, "b n dd"]:
        """The per-position DiffLoss condition ``z`` (upstream: ``forward_mae_decoder(forward_mae_encoder(...))``)."""
        mask = mask.bool()
        kept = self._visible_index(mask)
        return self.decode_positions(self.encode_visible(tokens, kept, class_embedding), kept)

    def encode_visible(self, tokens: Tensor, kept: Int[Tensor, "b k"], class_embedding: Tensor) -> Tensor:
        """Sparse encoder over the buffer rows and the visible tokens (``kept`` indexes buffer + tokens)."""
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        buffer = class_embedding[:, None].expand(-1, self.buffer_size, -1).to(x.dtype)
        x = self.z_proj_ln(torch.cat((buffer, x), dim=1) + self.encoder_pos_embed_learned)
        return self.encoder(_gather_positions(x, kept))

    def decode_positions(self, x: Tensor, kept: Int[Tensor, "b k"]) -> Tensor:
        """Scatter the encoded rows back among mask tokens, decode, drop the buffer, add the diffusion
        position embedding (after the decoder's final norm)."""
        x = self.decoder_embed(x)
        full = self.mask_token.to(x.dtype).expand(x.shape[0], self.seq_len + self.buffer_size, -1)
        full = full.scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), x)
        x = self.decoder(full + self.decoder_pos_embed_learned)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    # internals

    def _visible_index(self, mask: Tensor) -> Tensor:
        """Ascending indices (buffer rows included) of the unmasked positions; same count per row."""
        counts = mask.sum(dim=1)
        check(mask.ndim == 2 and mask.shape[1] == self.seq_len and bool((counts == counts[0]).all()),
              f"`mask` must be [b, {self.seq_len}] with the same number of masked tokens in every row, got "
              f"{describe(mask)} with counts {counts.tolist()[:8]}")
        padded = torch.cat((mask.new_zeros(mask.shape[0], self.buffer_size), mask), dim=1)
        visible = self.buffer_size + self.seq_len - int(counts[0])
        return padded.to(torch.int8).argsort(dim=1, stable=True)[:, :visible]

    def _check_latents(self, latents: Tensor) -> None:
        size = self.seq_h * self.patch_size
        expected = (self.vae_embed_dim, size, size)
        check(isinstance(latents, Tensor) and latents.ndim == 4 and tuple(latents.shape[1:]) == expected
              and latents.is_floating_point() and latents.shape[0] > 0,
              f"`latents` must be a float tensor [b >= 1, {self.vae_embed_dim}, {size}, {size}], "
              f"got {describe(latents)}")
        check_finite("latents", latents)

    def _check_labels(self, labels, batch: Optional[int], name: str) -> Optional[Tensor]:
        if labels is None:
            return None
        labels = torch.as_tensor(labels, device=self.device)
        check(is_index_tensor(labels) and labels.ndim == 1 and (batch is None or labels.shape[0] == batch)
              and labels.numel() > 0,
              f"`{name}` must be integer class ids [{'b' if batch is None else batch}], got {describe(labels)}")
        check_index_range(name, labels, self.num_classes, bound="num_classes")
        return labels.long()

    def _sampling_labels(self, class_labels, batch_size: Optional[int]):
        bare = as_int(class_labels)  # a class or a batch size? refused rather than guessed
        check(bare is None, f"`class_labels` must be class ids [b], got the bare int {bare}: pass `class_labels=[{bare}]` "
                            f"for one sample of class {bare}, or `batch_size={bare}` (no `class_labels`) for {bare} "
                            f"class-unconditional samples")
        if class_labels is None:
            check(isinstance(batch_size, int) and batch_size >= 1,
                  f"`batch_size` must be an int >= 1 when no `class_labels` are given, got {batch_size!r}")
            return None, batch_size
        labels = self._check_labels(class_labels, batch_size, "class_labels")
        return labels, labels.shape[0]


def mar_base(**kwargs) -> MAR:
    return MAR(**{**PRESETS["mar_base"], **kwargs})


def mar_large(**kwargs) -> MAR:
    return MAR(**{**PRESETS["mar_large"], **kwargs})


def mar_huge(**kwargs) -> MAR:
    return MAR(**{**PRESETS["mar_huge"], **kwargs})


# the mask schedule

class MaskStep(NamedTuple):
    mask_len: int   # upstream's clamped ``mask_len`` (1 at the last step although nothing stays masked)
    num_pred: int   # tokens predicted at this step
    remaining: int  # tokens still masked after this step


def mask_schedule(seq_len: int, num_iter: int) -> List[MaskStep]:
    """Upstream's cosine schedule: ``mask_len = max(1, min(masked − 1, floor(L · cos(π/2 · (k+1)/N))))``
    tokens stay masked after step k; the last step predicts all that remain."""
    check(isinstance(num_iter, int) and num_iter >= 1, f"`num_iter` must be an int >= 1, got {num_iter!r}")
    steps, masked = [], seq_len
    for k in range(num_iter):
        mask_len = max(1, min(masked - 1, math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_iter))))
        remaining = 0 if k == num_iter - 1 else mask_len
        steps.append(MaskStep(mask_len, masked - remaining, remaining))
        masked = remaining
    return steps


# helpers

def _check_geometry(img_size: int, vae_stride: int, patch_size: int, vae_embed_dim: int) -> None:
    check(min(img_size, vae_stride, patch_size, vae_embed_dim) >= 1,
          f"`img_size`, `vae_stride`, `patch_size`, `vae_embed_dim` must be positive, got "
          f"{img_size}, {vae_stride}, {patch_size}, {vae_embed_dim}")
    check(img_size % (vae_stride * patch_size) == 0,
          f"`img_size` ({img_size}) must be divisible by `vae_stride` · `patch_size` ({vae_stride * patch_size})")


def _rand(shape, generator: GeneratorLike, device: torch.device, dtype=torch.float32) -> Tensor:
    """Uniform [0, 1) on ``device``, drawn on the generator's device (torch RNG only; an int seeds a
    new generator, for the public pieces called on their own)."""
    generator = as_generator(generator, device)
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def _gather_positions(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _gather_rows(z: Tensor, positions: Tensor) -> Tensor:
    """``z[b, positions[b, j]]`` flattened to ``[b · j, d]`` (sample-major)."""
    return _gather_positions(z, positions).reshape(-1, z.shape[-1])
