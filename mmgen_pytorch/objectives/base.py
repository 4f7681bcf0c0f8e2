"""What a model that denoises continuous tokens asks of its training objective.

Transfusion and MonoFormer call only this interface, so rectified flow and Gaussian diffusion are
interchangeable under one packing, backbone and sampler. Conventions:

- tensors are channel-last tokens ``[..., d]`` (one row per latent token);
- a *time* is the value the network is conditioned on, one float per token or instance: flow time
  in ``[0, 1]`` (1 = data), or the ORIGINAL integer DDPM timestep (stored in a float tensor);
  ``clean_time`` marks a clean latent placed in the context (no noise, no loss);
- a network output for ``d``-channel tokens has ``output_dim(d)`` channels (velocity; or ε followed
  by the learned variance values).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from .._utils import GeneratorLike, as_int, check
from ..saving import Configurable

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t [b, n, d], one shared time, 0-d) -> output [b, n, output_dim]


class ContinuousObjective(Configurable, ABC):
    clean_time: float
    generate_options: Tuple[str, ...] = ()  # the keyword options of ``generate`` besides ``generator``

    def check_steps(self, steps, *, name: str) -> None:
        """Raise ValueError naming ``name`` unless ``steps`` is a valid ``generate`` step count."""
        count = as_int(steps)
        check(count is not None and count >= 1, f"`{name}` must be an int >= 1, got {steps!r}")

    def check_generate_options(self, options: Mapping[str, Any], *, name: str = "objective_kwargs") -> None:
        """Raise ValueError before any work unless ``generate`` takes every one of ``options`` (and, where
        the objective checks them, their values)."""
        unknown = sorted(set(options) - set(self.generate_options))
        takes = ", ".join(self.generate_options) or "no options"
        check(not unknown, f"`{name}`: {type(self).__name__}.generate takes {takes}, got {unknown}")

    @abstractmethod
    def sample_times(self, count: int, *, device=None, generator: GeneratorLike = None) -> Tensor:
        """``count`` training times (float tensor)."""

    @abstractmethod
    def check_time(self, time: float, *, name: str) -> None:
        """Raise ValueError naming ``name`` unless ``time`` is a valid training time."""

    @abstractmethod
    def noised(self, x: Float[Tensor, "k d"], noise: Float[Tensor, "k d"],
               t: Float[Tensor, " k"]) -> Float[Tensor, "k d"]:
        """The network input at times ``t``; ``x`` itself where ``t == clean_time``."""

    @abstractmethod
    def time_embedding_input(self, t: Tensor) -> Tensor:
        """What the sinusoidal time embedding is fed for times ``t`` (flow: ``t · 1000``; DDPM: the step)."""

    @abstractmethod
    def output_dim(self, dim_latent: int) -> int:
        """Channels of the network output for ``dim_latent``-channel tokens."""

    @abstractmethod
    def loss(self, output: Float[Tensor, "k o"], x: Float[Tensor, "k d"], noise: Float[Tensor, "k d"],
             x_t: Float[Tensor, "k d"], t: Float[Tensor, " k"]) -> Float[Tensor, " k"]:
        """Per-token loss (mean over channels) of noised tokens."""

    @abstractmethod
    def guide(self, output: Float[Tensor, "b2 n o"], scale: float) -> Float[Tensor, "b n o"]:
        """Classifier-free guidance of a doubled batch ``[cond; uncond]`` -> the guided conditional half."""

    @abstractmethod
    def generate(self, denoise: Denoiser, noise: Float[Tensor, "b n d"], steps, *,
                 generator: GeneratorLike = None, progress: bool = False,
                 **options) -> Float[Tensor, "b n d"]:
        """Run the reverse process from ``noise``; ``denoise(x, t)`` gets every row at one time.
        ``progress``: a tqdm bar that ticks once per sampling step."""
