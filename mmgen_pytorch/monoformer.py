"""MonoFormer: one LLaMA for autoregressive text and DDPM diffusion on image latents.

Zhao et al., "MonoFormer: One Transformer for Both Diffusion and Autoregression" (arXiv 2409.16280).
MonoFormer is Transfusion wired with other pieces (packing, backbone, KV cache and the lockstep sampler
are shared, not copied); this module only chooses them:

- objective: :class:`~mmgen_pytorch.objectives.gaussian.GaussianObjective` (1000-step linear or cosine
  DDPM, ε-prediction with learned variance, hybrid loss, respaced sampling that feeds the network the
  original timesteps, CFG on ε only — optionally on the first ``cfg_channels`` latent channels);
- positions: LLaMA's 1-D RoPE over the flattened sequence (``positions="flat"``) plus a fixed 2-D
  sin-cos embedding added to the image tokens;
- time: a DiT timestep embedding of the integer step, injected before the first block
  (:class:`~mmgen_pytorch.transfusion.time_injection.InputAdaLN`) or as a timestep token before the
  image (:class:`~mmgen_pytorch.transfusion.time_injection.TimeToken`); no per-block adaLN;
- image layers: :class:`~mmgen_pytorch.transfusion.patches.PatchedLatents` (patchify ``(C, ph, pw)``
  -> zero-initialised linear embedding; DiT's final layer);
- CFG: the whole prompt is dropped (``uncond_text="empty"``); the text loss only on samples without an
  image (``text_loss="rows_without_modality"``), with weight 0.01.

Reading order: :class:`MonoFormer` (construction, ``generate_images``, ``from_llama``). Reading Hugging
Face LLaMA checkpoints is :mod:`mmgen_pytorch.pretrained.llama_hf`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor

from ._utils import GeneratorLike, check, describe
from .objectives.gaussian import GaussianObjective, Spacing
from .pretrained import llama_hf
from .pretrained.llama_hf import llama_transformer_config
from .transfusion.model import TextLoss, Transfusion
from .transfusion.packing import Positions, UncondText
from .transfusion.patches import PatchedLatents, patchify, sincos_2d, unpatchify
from .transfusion.time_injection import InputAdaLN, TimeToken

__all__ = ["MonoFormer", "TIMESTEP_INJECTIONS", "patchify", "unpatchify", "sincos_2d", "llama_transformer_config"]

TIMESTEP_INJECTIONS = {"adaln_before_decoder": InputAdaLN, "token": TimeToken}


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
        size = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        image = PatchedLatents(latent_channels=latent_channels, latent_size=size, patch_size=patch_size)
        check(timestep_injection in TIMESTEP_INJECTIONS,
              f"`timestep_injection` must be one of {tuple(TIMESTEP_INJECTIONS)}, got {timestep_injection!r}")
        check(cfg_channels is None or 0 < cfg_channels <= latent_channels,
              f"`cfg_channels` must be None or in [1, {latent_channels}], got {cfg_channels}")
        check(isinstance(transformer, dict) and "dim" in transformer,
              f"`transformer` must be a dict with at least `dim` and `depth`, got {describe(transformer)}")
        guide_features = cfg_channels * patch_size ** 2 if cfg_channels is not None else None
        super().__init__(num_text_tokens=num_text_tokens, transformer=transformer, modalities=[image],
                         text_loss_weight=text_loss_weight, prob_uncond=prob_uncond, ignore_index=ignore_index,
                         attn_backend=attn_backend, time_injection=TIMESTEP_INJECTIONS[timestep_injection](
                             dim=transformer["dim"]),
                         positions=Positions.FLAT, uncond_text=UncondText.EMPTY, max_prompt_length=max_prompt_length,
                         text_loss=TextLoss.ALL_ROWS if text_loss_on_image_rows else TextLoss.ROWS_WITHOUT_MODALITY,
                         objective=GaussianObjective(schedule=schedule, num_timesteps=num_timesteps,
                                                     guide_features=guide_features))
        self.latent_shape = image.latent_shape
        self.patch_size, self.grid = patch_size, image.default_shape
        self.timestep_injection = timestep_injection

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
