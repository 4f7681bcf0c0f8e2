"""Rectified flow (flow matching), apart from any model.

Convention (Transfusion): ``x_t = t * x + (1 - t) * noise``, ``t = 0`` is noise and ``t = 1`` is data
(``clean_time``), and the network predicts the velocity ``x - noise``. Sampling integrates the
velocity from 0 to 1 with a torchdiffeq solver. Implements :class:`~.base.ContinuousObjective`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint
from tqdm.auto import tqdm

from .._utils import GeneratorLike, as_generator, check
from .. import guidance
from .base import ContinuousObjective, Denoiser

TIME_SAMPLINGS = ("uniform", "logit_normal")
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


class RectifiedFlow(ContinuousObjective):
    clean_time = 1.0

    def __init__(self, *, time_sampling: str = "uniform", logit_normal_mean: float = 0.0,
                 logit_normal_std: float = 1.0, ode_method: str = "midpoint", ode_kwargs: Optional[dict] = None):
        check(time_sampling in TIME_SAMPLINGS, f"`time_sampling` must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        self.time_sampling, self.mean, self.std = time_sampling, logit_normal_mean, logit_normal_std
        self.ode_method, self.ode_kwargs = ode_method, dict(ode_kwargs or {})

    def sample_times(self, count: int, *, device=None, generator: GeneratorLike = None) -> Tensor:
        generator = as_generator(generator, device)
        if self.time_sampling == "uniform":
            return torch.rand(count, device=device, generator=generator)
        normal = torch.randn(count, device=device, generator=generator) * self.std + self.mean
        return torch.sigmoid(normal)

    def check_time(self, time: float, *, name: str) -> None:
        check(0.0 <= float(time) <= 1.0, f"{name} must be a flow time in [0, 1], got {time}")

    @staticmethod
    def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``t`` broadcasts against ``x`` from the left (one time per leading entry)."""
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
        return t * x + (1 - t) * noise

    def noised(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.interpolate(x, noise, t)

    @staticmethod
    def time_embedding_input(t: Tensor) -> Tensor:
        return t.float() * 1000.0  # DiT's scale: the embedding sees [0, 1000]

    @staticmethod
    def output_dim(dim_latent: int) -> int:
        return dim_latent

    @staticmethod
    def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
        return x - noise

    @staticmethod
    def loss(output: Tensor, x: Tensor, noise: Tensor, x_t: Optional[Tensor] = None,
             t: Optional[Tensor] = None) -> Tensor:
        """Per-token squared error against the velocity target (mean over channels)."""
        return F.mse_loss(output, x - noise, reduction="none").mean(-1)

    @staticmethod
    def guide(output: Tensor, scale: float) -> Tensor:
        return guidance.guide(output, scale)

    def generate(self, denoise: Denoiser, noise: Tensor, steps: int, *,
                 generator: GeneratorLike = None, progress: bool = False) -> Tensor:
        """Integrate ``denoise`` (a velocity) from noise to data; deterministic, so ``generator`` is unused."""
        return self.integrate(lambda t, x: denoise(x, t), noise, steps, progress=progress)

    def integrate(self, velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int, *,
                  progress: bool = False) -> Tensor:
        """Solve ``dx/dt = velocity(t, x)`` from ``t = 0`` (noise) to ``t = 1``; returns the final x.

        Fixed-step methods take ``steps`` steps on a uniform grid (midpoint: 2 evaluations per step).
        ``progress``: a bar of the ``steps`` steps, at the step of the time last evaluated.
        """
        self.check_steps(steps, name="modality_steps")
        grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device, dtype=noise.dtype)
        kwargs = dict(self.ode_kwargs)
        if self.ode_method not in FIXED_STEP_METHODS:
            kwargs.setdefault("atol", 1e-5)
            kwargs.setdefault("rtol", 1e-5)
            grid = grid[[0, -1]]

        def solve(function: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
            return odeint(function, noise, grid, method=self.ode_method, **kwargs)[-1]

        if not progress:
            return solve(velocity)
        with tqdm(total=steps, desc="flow", leave=False) as bar:
            def ticking(t: Tensor, x: Tensor) -> Tensor:
                bar.update(min(steps, int(float(t) * steps + 1e-4)) - bar.n)  # the steps done before time t
                return velocity(t, x)

            x = solve(ticking)
            bar.update(steps - bar.n)
        return x


class TimeEmbedding(nn.Module):
    """DiT's timestep embedder: a ``[cos, sin]`` sinusoid of ``scale · t`` followed by an MLP.

    Models feed it ``objective.time_embedding_input(t)`` (flow: ``t · 1000``; DDPM: the integer step).
    """

    def __init__(self, dim: int, *, frequency_dim: int = 256, max_period: float = 10000.0, scale: float = 1.0):
        super().__init__()
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        args = (t.float() * self.scale)[..., None] * self.freqs
        return self.mlp(torch.cat((args.cos(), args.sin()), dim=-1).to(self.mlp[0].weight.dtype))
