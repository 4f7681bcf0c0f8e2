"""MAR's per-token diffusion head: a small adaLN MLP denoiser trained with the hybrid Gaussian loss.

Reading order: :class:`DiffLoss` (training loss and sampler) -> :class:`SimpleMLPAdaLN` (the
denoiser) -> its blocks. The diffusion math lives in :mod:`mmgen_pytorch.objectives.gaussian`:
training uses the 1000-step cosine chain; sampling a respaced copy (``num_sampling_steps``, e.g.
``"100"`` or ``"ddim50"``) whose steps feed the network their *original* timesteps.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._utils import GeneratorLike, as_generator, check, describe
from .guidance import guide
from .objectives.flow import TimeEmbedding
from .objectives.gaussian import GaussianDiffusion, Spacing, check_chain_options

NUM_TRAIN_TIMESTEPS = 1000


class DiffLoss(nn.Module):
    """Diffusion loss and sampler for tokens ``[n, target_channels]`` conditioned on ``z [n, z_channels]``.

    Args (keyword-only):
        target_channels: token width (MAR: ``vae_embed_dim * patch_size**2``).
        z_channels: condition width (MAR's decoder width).
        depth, width: residual blocks and hidden width of the MLP (released MAR: 6x1024, 8x1280, 12x1536).
        num_sampling_steps: respacing of the sampling chain (``"100"``, ``100``, ``"ddim50"``, ...).
        grad_checkpointing: recompute the residual blocks in the backward pass.
    """

    def __init__(self, *, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: Spacing = "100", grad_checkpointing: bool = False):
        super().__init__()
        check(min(target_channels, z_channels, depth, width) > 0,
              f"`target_channels`, `z_channels`, `depth` and `width` must be positive, got "
              f"{target_channels}, {z_channels}, {depth}, {width}")
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(in_channels=target_channels, width=width, out_channels=2 * target_channels,
                                  z_channels=z_channels, depth=depth, grad_checkpointing=grad_checkpointing)
        self.train_diffusion = GaussianDiffusion.create(schedule="cosine", num_timesteps=NUM_TRAIN_TIMESTEPS)
        self.num_sampling_steps = num_sampling_steps
        self._sampling_chains: Dict[str, GaussianDiffusion] = {}
        self.gen_diffusion = self.sampling_diffusion(num_sampling_steps)

    def sampling_diffusion(self, num_sampling_steps: Spacing = None) -> GaussianDiffusion:
        """The respaced sampling chain (cached per spacing)."""
        spacing = self.num_sampling_steps if num_sampling_steps is None else num_sampling_steps
        key = repr(spacing)
        if key not in self._sampling_chains:
            self._sampling_chains[key] = self.train_diffusion.respaced(spacing, name="num_sampling_steps")
        return self._sampling_chains[key]

    # training

    def forward(self, target: Float[Tensor, "n c"], z: Float[Tensor, "m d"], mask: Optional[Tensor] = None, *,
                z_rows: Optional[Int[Tensor, " n"]] = None, generator: GeneratorLike = None) -> Tensor:
        """Hybrid loss at uniform timesteps: the mean over rows, or the ``mask``-weighted mean.

        ``z_rows``: row ``i`` of ``target`` is conditioned on ``z[z_rows[i]]`` (MAR draws several (t, noise) per
        token: its condition is embedded once per token, not once per draw); None: row ``i`` on ``z[i]``."""
        self._check_condition(z, target.shape[0] if z_rows is None else None, "z")
        check(target.ndim == 2 and target.shape[1] == self.in_channels,
              f"`target` must be [n, {self.in_channels}], got {describe(target)}")
        if z_rows is not None:
            check(isinstance(z_rows, Tensor) and z_rows.shape == target.shape[:1] and z_rows.dtype in (torch.int32, torch.int64),
                  f"`z_rows` must be an integer tensor [{target.shape[0]}] (a row of `z` per row of `target`), "
                  f"got {describe(z_rows)}")
        losses = self.train_diffusion.training_losses(lambda x_t, t: self.net(x_t, t, z, c_rows=z_rows), target,
                                                      generator=as_generator(generator, z.device))
        if mask is None:
            return losses.loss.mean()
        mask = mask.to(losses.loss.dtype)
        return (losses.loss * mask).sum() / mask.sum()

    # sampling

    @torch.no_grad()
    def sample(self, z: Float[Tensor, "n d"], *, z_uncond: Optional[Float[Tensor, "n d"]] = None,
               cfg_scale: float = 1.0, temperature: float = 1.0, num_sampling_steps: Spacing = None,
               noise: Optional[Tensor] = None, sampler: str = "ddpm", generator: GeneratorLike = None,
               clip_denoised: Optional[float] = None) -> Float[Tensor, "n c"]:
        """One token per row of ``z``, float32.

        With ``cfg_scale != 1`` the network sees ``[x; x]`` under ``[z; z_uncond]`` and ε is guided
        (the variance stays the conditional one); only the conditional half is carried, which is
        exactly the conditional half of upstream's doubled chain. ``temperature`` scales each
        step's noise, not x_T. The time and condition embeddings are computed once per call.
        """
        guided = cfg_scale != 1.0
        check_chain_options(temperature=temperature, sampler=sampler, clip_denoised=clip_denoised)
        generator = as_generator(generator, z.device)
        self._check_condition(z, None, "z")
        if guided:
            check(z_uncond is not None, "`z_uncond` is required when `cfg_scale` != 1")
            self._check_condition(z_uncond, z.shape[0], "z_uncond")
        diffusion = self.sampling_diffusion(num_sampling_steps)
        cond = self.net.cond_embed(torch.cat((z, z_uncond)) if guided else z)
        times = self.net.time_embed(diffusion.timestep_map.to(z.device))  # [steps, width], once per call
        row_of = torch.zeros(int(diffusion.timestep_map.max()) + 1, dtype=torch.long, device=z.device)
        row_of[diffusion.timestep_map] = torch.arange(diffusion.num_timesteps, device=z.device)
        if noise is None:
            device = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape[0], self.in_channels, generator=generator, device=device).to(z.device)
        check(tuple(noise.shape) == (z.shape[0], self.in_channels),
              f"`noise` must be [{z.shape[0]}, {self.in_channels}], got {describe(noise)}")

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            y = times[row_of[t[:1]]] + cond  # every row is at the same step
            if not guided:
                return self.net.forward_embedded(x, y)
            return guide(self.net.forward_embedded(torch.cat((x, x)), y), cfg_scale, features=self.in_channels)

        return diffusion.sample_loop(denoise, noise, temperature=temperature, sampler=sampler, generator=generator,
                                     clip_denoised=clip_denoised)

    def _check_condition(self, z: Tensor, rows: Optional[int], name: str) -> None:
        width = self.net.cond_embed.in_features
        ok = isinstance(z, Tensor) and z.ndim == 2 and z.shape[1] == width and (rows is None or z.shape[0] == rows)
        check(ok, f"`{name}` must be [{'n' if rows is None else rows}, {width}], got {describe(z)}")


class SimpleMLPAdaLN(nn.Module):
    """MLP denoiser: ``y = time_embed(t) + cond_embed(c)`` modulates every residual block (adaLN)
    and the final layer, which outputs ``[ε | v]`` (``out_channels = 2 · in_channels``)."""

    def __init__(self, *, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimeEmbedding(width, scale=1.0)  # integer timesteps, [cos, sin], max period 1e4
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears with zero bias, N(0, 0.02) time MLP, zeroed adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.res_blocks] + \
                [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Float[Tensor, "n c"], t: Int[Tensor, " n"], c: Float[Tensor, "m d"], *,
                c_rows: Optional[Int[Tensor, " n"]] = None) -> Float[Tensor, "n c2"]:
        """``t``: original (unrespaced) integer timesteps; row ``i`` is conditioned on ``c[c_rows[i]]`` (``c[i]``
        when ``c_rows`` is None). Each distinct timestep and condition is embedded once: training draws many
        more rows than the chain has steps, and MAR reuses each token's condition for several draws."""
        steps, step_rows = torch.unique(t, return_inverse=True)
        cond = self.cond_embed(c.to(self.cond_embed.weight.dtype))
        # index_select, not indexing: its backward (a scatter-add) is ~5x faster on CPU than indexing's
        time_rows = self.time_embed(steps).index_select(0, step_rows)
        return self.forward_embedded(x, time_rows + (cond if c_rows is None else cond.index_select(0, c_rows)))

    def forward_embedded(self, x: Tensor, y: Tensor) -> Tensor:
        """The network after its condition ``y`` (time + condition embedding) is formed."""
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        for block in self.res_blocks:
            use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
            h = checkpoint(block, h, y, use_reentrant=False) if use_checkpoint else block(h, y)
        return self.final_layer(h, y)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """``x + gate · mlp(LN(x) · (1 + scale) + shift)`` with shift, scale, gate from ``y``."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm, adaLN shift/scale from ``y``, then the output projection."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
