"""MonoFormer: one LLaMA for autoregressive text and DDPM diffusion on image latents.

Zhao et al., "MonoFormer: One Transformer for Both Diffusion and Autoregression" (arXiv 2409.16280).
MonoFormer is Transfusion's machinery configured differently, so it subclasses :class:`Transfusion`
and swaps only the pieces that differ (packing, backbone, KV cache and the lockstep sampler are
shared, not copied):

- objective: :class:`~mmgen_pytorch.objectives.gaussian.GaussianObjective` (1000-step linear or cosine
  DDPM, ε-prediction with learned variance, hybrid loss, respaced sampling that feeds the network the
  original timesteps, CFG on ε only — optionally on the first ``cfg_channels`` latent channels);
- positions: LLaMA's 1-D RoPE over the flattened sequence (images take consecutive positions) plus a
  fixed 2-D sin-cos embedding added to the image tokens;
- time: a DiT timestep embedding of the integer step, injected before the first block
  (``"adaln_before_decoder"``) or as a timestep token before the image (``"token"``); the backbone has
  no per-block adaLN;
- image layers: patchify ``(C, ph, pw)`` -> zero-initialised linear embedding; a DiT final layer
  (non-affine LayerNorm, adaLN, linear to ``p·p·2C`` features read as ``(ph, pw, 2C)``);
- CFG: the whole prompt is dropped (an empty prompt, ``uncond_text="empty"``).

Reading order: image helpers -> time injections -> final layer -> :class:`MonoFormer` (construction,
the swapped layers, input checks, ``generate_images``, ``from_llama``). Reading Hugging Face LLaMA
checkpoints is :mod:`mmgen_pytorch.pretrained.llama_hf`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from ._utils import GeneratorLike, check, check_finite, describe
from .objectives.flow import TimeEmbedding
from .objectives.gaussian import GaussianObjective, Spacing
from .pretrained import llama_hf
from .pretrained.llama_hf import llama_transformer_config
from .transfusion.model import TimeInjection, Transfusion
from .transfusion.packing import LatentRun
from .transfusion.packing import Modality, Shape

__all__ = ["MonoFormer", "TIMESTEP_INJECTIONS", "patchify", "unpatchify", "sincos_2d", "llama_transformer_config"]

TIMESTEP_INJECTIONS = ("adaln_before_decoder", "token")


# image helpers

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


# time injections (the backbone itself has no adaLN)

class InputAdaLN(TimeInjection):
    """``"adaln_before_decoder"`` (the released checkpoint): latent tokens enter the first block as
    ``x · (1 + b) + a`` with ``(a, b) = Linear(SiLU(t_emb)).chunk(2)``, zero-initialised. The first half
    acts as the SHIFT (upstream names the halves the other way round but passes them in this order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_modulation = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.to_modulation.weight)
        nn.init.zeros_(self.to_modulation.bias)

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor, latents: Sequence[LatentRun]):
        shift, scale = self.to_modulation(F.silu(time_table)).chunk(2, dim=-1)
        index = (time_index.reshape(-1) >= 0).nonzero().squeeze(1)
        rows = time_index.reshape(-1)[index]
        flat = x.reshape(-1, x.shape[-1])
        modulated = flat[index] * (1 + scale[rows]) + shift[rows]
        return flat.index_copy(0, index, modulated.to(flat.dtype)).view_as(x), {}


class TimeToken(TimeInjection):
    """``"token"`` (the repository configs): one token right before each image's latents, inside its
    bidirectional block, is ``Linear -> GELU -> Linear`` of the time embedding. The last layer starts at
    zero (zeroing both layers would leave the projector without gradient)."""

    time_tokens = 1

    def __init__(self, dim: int):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.projector[2].weight)
        nn.init.zeros_(self.projector[2].bias)

    def forward(self, x: Tensor, time_table: Tensor, time_index: Tensor, latents: Sequence[LatentRun]):
        # the placement puts the time token right before each modality's first latent (coords all 0)
        firsts = [index[(coords == 0).all(-1)] for _, index, _, coords in latents]
        if not firsts:
            return x, {}
        firsts = torch.cat(firsts)
        tokens = self.projector(time_table)[time_index.reshape(-1)[firsts]]
        flat = x.reshape(-1, x.shape[-1])
        return flat.index_copy(0, firsts - self.time_tokens, tokens.to(flat.dtype)).view_as(x), {}


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


class MonoFormer(Transfusion):
    """Text + DDPM image generation in one causal LLaMA, images bidirectional (Transfusion's packing).

    Args (keyword-only):
        num_text_tokens: text vocabulary (the LLaMA tokenizer's); the model adds Transfusion's special
            tokens (``[sos]``, ``[eos]``, ``[som]``/``[eom]``, shape spelling) after it.
        transformer: backbone config (``dim``, ``depth``, ``heads``, ``kv_heads``, ...), built with 1-D
            rotary over the whole sequence and no adaLN.
        latent_channels, latent_size, patch_size: image latents ``[C, H, W]`` (``latent_size`` = H = W or
            ``(H, W)``), cut into ``(H/p)·(W/p)`` tokens of ``C·p²`` features.
        timestep_injection: ``"adaln_before_decoder"`` or ``"token"``.
        schedule, num_timesteps: the DDPM chain (``"linear"`` 1e-4..0.02, or ``"cosine"``).
        cfg_channels: guide only the first that many latent channels (upstream: 3 of 4); None = all.
        text_loss_weight: loss = diffusion + text_loss_weight · text (upstream 0.01).
        text_loss_on_image_rows: False (upstream) computes the text loss only on samples without an
            image, so prompts are conditioning, not targets; True also trains the LM on them.
        prob_uncond: probability of dropping a training sample's whole prompt (CFG).
        max_prompt_length: the most text tokens in a prompt (the text just before an image).

    Inputs are Transfusion's: ``[[prompt_ids, latent], ...]`` (any number of images per sample),
    ``Int[b, n]`` text, or ``Float[b, C, H, W]`` latents alone. ``times`` are integer timesteps.
    """

    def __init__(self, *, num_text_tokens: int, transformer: dict, latent_channels: int = 4,
                 latent_size: Union[int, Tuple[int, int]] = 32, patch_size: int = 2,
                 timestep_injection: str = "adaln_before_decoder", schedule: str = "linear",
                 num_timesteps: int = 1000, cfg_channels: Optional[int] = None, text_loss_weight: float = 0.01,
                 prob_uncond: float = 0.1, max_prompt_length: int = 128, ignore_index: int = -1,
                 text_loss_on_image_rows: bool = False, attn_backend: str = "auto"):
        height, width = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        check(min(latent_channels, height, width, patch_size) > 0 and height % patch_size == 0
              and width % patch_size == 0,
              f"`latent_size` {(height, width)} must be positive multiples of `patch_size` ({patch_size}) and "
              f"`latent_channels` ({latent_channels}) positive")
        check(timestep_injection in TIMESTEP_INJECTIONS,
              f"`timestep_injection` must be one of {TIMESTEP_INJECTIONS}, got {timestep_injection!r}")
        check(cfg_channels is None or 0 < cfg_channels <= latent_channels,
              f"`cfg_channels` must be None or in [1, {latent_channels}], got {cfg_channels}")
        check(max_prompt_length > 0, f"`max_prompt_length` must be positive, got {max_prompt_length}")
        check(isinstance(transformer, dict) and "dim" in transformer,
              f"`transformer` must be a dict with at least `dim` and `depth`, got {describe(transformer)}")
        injection = (InputAdaLN if timestep_injection == "adaln_before_decoder" else TimeToken)(transformer["dim"])
        guide_features = cfg_channels * patch_size ** 2 if cfg_channels is not None else None
        super().__init__(num_text_tokens=num_text_tokens, transformer=transformer,
                         dim_latent=latent_channels * patch_size ** 2,
                         modality_default_shape=(height // patch_size, width // patch_size),
                         text_loss_weight=text_loss_weight, prob_uncond=prob_uncond, ignore_index=ignore_index,
                         attn_backend=attn_backend, time_injection=injection, flat_positions=True,
                         uncond_text="empty", text_loss_on_modality_rows=text_loss_on_image_rows,
                         objective=GaussianObjective(schedule=schedule, num_timesteps=num_timesteps,
                                                     guide_features=guide_features))
        self.latent_shape = (latent_channels, height, width)
        self.patch_size, self.grid = patch_size, (height // patch_size, width // patch_size)
        self.timestep_injection, self.max_prompt_length = timestep_injection, max_prompt_length

    # the swapped layers

    def _build_modality_layers(self, dims: Sequence[int], add_pos_emb: Sequence[bool]) -> None:
        (features,) = dims
        self.x_embedder = nn.Linear(features, self.dim)
        nn.init.zeros_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        self.register_buffer("pos_embed", sincos_2d(self.modalities[0].default_shape, self.dim), persistent=False)
        self.time_emb = TimeEmbedding(self.dim)
        self.final_layer = FinalLayer(self.dim, self.objective.output_dim(features))

    def embed_latents(self, modality: int, values: Tensor, coords: Tensor) -> Tensor:
        # flat placement: coords[:, 0] is each token's row-major index in the image
        return self.x_embedder(values) + self.pos_embed[coords[:, 0]].to(values.dtype)

    def modality_output(self, hidden: Tensor, modality: int, flat_index: Tensor, times: Tensor) -> Tensor:
        """``[k, 2·C·p²]``: ε then the variance values, each in the input's ``(C, ph, pw)`` feature order
        (the final layer writes ``(ph, pw, 2C)``, upstream's unpatchify order)."""
        times, rows = torch.unique(times, return_inverse=True)
        time_table = self.time_emb(self.objective.time_embedding_input(times))
        out = self.final_layer(hidden.reshape(-1, self.dim)[flat_index], time_table, rows)
        p = self.patch_size
        return rearrange(out, "k (ph pw two c) -> k (two c ph pw)", ph=p, pw=p, two=2).float()

    # inputs and outputs

    def to_items(self, sample, *, name: str = "sample", modality_type: int = 0):
        items = super().to_items(sample, name=name, modality_type=modality_type)
        for index, (item, following) in enumerate(zip(items, items[1:])):
            if isinstance(item, Tensor) and isinstance(following, Modality):
                self.check_prompt(item, name=f"{name}[{index}]")
        return items

    def check_prompt(self, ids: Tensor, *, name: str) -> None:
        check(ids.numel() <= self.max_prompt_length,
              f"`{name}`: a prompt has at most `max_prompt_length` = {self.max_prompt_length} tokens, "
              f"got {ids.numel()}")

    def to_modality(self, tensor, modality: int, *, name: str) -> Modality:
        self.check_modality_type(modality, name=name)  # MonoFormer has one: 0, images
        check(isinstance(tensor, Tensor) and tensor.is_floating_point() and tuple(tensor.shape) == self.latent_shape,
              f"`{name}`: MonoFormer expects image latents of shape (C, H, W) = {self.latent_shape}, "
              f"got {describe(tensor)}")
        check_finite(name, tensor)
        return Modality(0, patchify(tensor.to(self.device).float(), self.patch_size), self.grid)

    def decode_modality(self, modality: int, tokens: Tensor, shape: Shape) -> Tensor:
        return unpatchify(tokens, self.grid, self.patch_size)

    def check_shape(self, modality: int, shape, *, name: str) -> Shape:
        check(isinstance(shape, (tuple, list)) and tuple(shape) == self.grid,
              f"`{name}`: MonoFormer generates only its {self.grid} patch grid (latent_size / patch_size), "
              f"got {shape!r}")
        return self.grid

    # sampling

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[Tensor], *, cfg_scale: float = 4.0, steps: Spacing = 20,
                        temperature: float = 1.0, sampler: str = "ddpm", eta: float = 0.0,
                        clip_denoised: Optional[float] = None, use_cache: bool = True, progress: bool = False,
                        generator: GeneratorLike = None) -> Float[Tensor, "b c h w"]:
        """One image latent per text prompt (1-D long tensors; an empty tensor is the unconditional prompt).

        CFG (``cfg_scale != 1``) runs each prompt beside its empty-prompt twin; the prompt's K/V is
        computed once and every one of the ``steps`` respaced DDPM steps (``sampler="ddim"`` for DDIM)
        runs only the image tokens against the cache. ``eta`` in [0, 1]: DDIM's noise level (0:
        deterministic, 1: DDPM's variance). ``clip_denoised=c > 0`` clamps every step's x0 prediction to
        [-c, c], for latents known to lie there. ``generator``: a ``torch.Generator`` or an int seed.
        """
        check(isinstance(prompts, (list, tuple)) and len(prompts) > 0,
              f"`prompts` must be a non-empty list of 1-D token tensors, got {describe(prompts)}")
        self.objective.check_steps(steps, name="steps")
        for i, prompt in enumerate(prompts):
            self.check_prompt(self.check_text(prompt, name=f"prompts[{i}]"), name=f"prompts[{i}]")
        forced = 3 + len(self.vocab.shape_ids(self.grid))  # [sos] [meta] shape [som]
        max_length = max(p.numel() for p in prompts) + forced + self.placement.length(self.grid) + 1
        samples = self.sample([[p] for p in prompts], max_length=max_length, cfg_scale=cfg_scale, modality_steps=steps,
                              force_modality_at_start=0, max_modalities=1, use_cache=use_cache, progress=progress,
                              generator=generator,
                              objective_kwargs=dict(temperature=temperature, sampler=sampler, eta=eta,
                                                    clip_denoised=clip_denoised))
        return torch.stack([sample[-1][1] for sample in samples])

    # LLaMA initialisation

    @classmethod
    def from_llama(cls, source, config, **kwargs) -> "MonoFormer":
        """A MonoFormer whose backbone, text embeddings and lm_head come from a Hugging Face LLaMA.

        ``source``: a state dict or a checkpoint file (``.safetensors`` or a torch file) in the
        ``LlamaForCausalLM`` layout; ``config``: its config (a dict or a ``config.json`` path).
        ``kwargs`` go to :class:`MonoFormer` (``transformer=`` entries extend the backbone config). The
        special-token rows MonoFormer adds get a fresh normal(``initializer_range``) init.
        """
        return llama_hf.from_llama(cls, source, config, **kwargs)

    def load_llama(self, source, *, init_std: float = 0.02) -> None:
        """Load a HF LLaMA state dict into the backbone, ``token_emb`` and ``to_text_logits`` rows
        ``[0, num_text_tokens)``; the rows after them are re-drawn from normal(init_std)."""
        llama_hf.load_llama(self, source, init_std=init_std)
