"""Rectified flow (flow matching), apart from any model.

Convention (Transfusion): ``x_t = t * x + (1 - t) * noise``, ``t = 0`` is noise and ``t = 1`` is data
(``clean_time``), and the network predicts the velocity ``x - noise`` (``prediction="velocity"``) or the
clean data ``x`` (``prediction="clean"``, x-prediction, arXiv 2511.13720), from which the velocity is
derived as ``(x_hat - x_t) / max(1 - t, eps)``. The loss is the squared error of the (derived) velocity
and sampling integrates it from 0 to 1 with a torchdiffeq solver. Implements
:class:`~.base.ContinuousObjective`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver
from tqdm.auto import tqdm

from .._utils import GeneratorLike, as_generator, check, describe
from .. import guidance
from .base import ContinuousObjective, Denoiser

TIME_SAMPLINGS = ("uniform", "logit_normal")
PREDICTIONS = ("velocity", "clean")
ODE_METHODS = tuple(sorted(SOLVERS))
FIXED_STEP_METHODS = tuple(name for name in ODE_METHODS if issubclass(SOLVERS[name], FixedGridODESolver))
ODE_OPTIONS = ("rtol", "atol", "options")  # torchdiffeq's odeint keywords besides the method


class RectifiedFlow(ContinuousObjective):
    """Rectified flow. ``prediction``: what the network outputs, ``"velocity"`` or ``"clean"`` (the
    velocity is then derived with ``(1 - t)`` floored at ``eps``). ``ode_method`` / ``ode_kwargs``:
    torchdiffeq's ``method`` and its other ``odeint`` keywords (``rtol``, ``atol``, ``options``)."""

    clean_time = 1.0

    def __init__(self, *, time_sampling: str = "uniform", logit_normal_mean: float = 0.0,
                 logit_normal_std: float = 1.0, ode_method: str = "midpoint", ode_kwargs: Optional[dict] = None,
                 prediction: str = "velocity", eps: float = 1e-2):
        check(time_sampling in TIME_SAMPLINGS, f"`time_sampling` must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        check(prediction in PREDICTIONS, f"`prediction` must be one of {PREDICTIONS}, got {prediction!r}")
        check(isinstance(eps, (int, float)) and 0.0 < eps <= 1.0, f"`eps` must be a float in (0, 1], got {eps!r}")
        self.time_sampling, self.mean, self.std = time_sampling, logit_normal_mean, logit_normal_std
        self.ode_method, self.ode_kwargs = check_ode_settings(ode_method, ode_kwargs)
        self.prediction, self.eps = prediction, float(eps)

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

    @property
    def predicts_clean(self) -> bool:
        return self.prediction == "clean"

    def velocity(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity the network's ``output`` stands for at ``x_t`` and times ``t`` (broadcast from the
        left); x-prediction: ``(output - x_t) / max(1 - t, eps)``."""
        if not self.predicts_clean:
            return output
        t = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
        return (output - x_t) / (1 - t).clamp_min(self.eps)

    def predicted_clean(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The one-step estimate of the data: the clean prediction itself, or ``x_t + (1 - t) * velocity``."""
        if self.predicts_clean:
            return output
        t = t.reshape(t.shape + (1,) * (x_t.ndim - t.ndim))
        return x_t + (1 - t) * output

    def loss(self, output: Tensor, x: Tensor, noise: Tensor, x_t: Optional[Tensor] = None,
             t: Optional[Tensor] = None) -> Tensor:
        """Per-token squared error of the (derived) velocity against ``x - noise`` (mean over channels)."""
        if self.predicts_clean:
            check(x_t is not None and t is not None, "x-prediction's loss needs `x_t` and `t`")
            output = self.velocity(output, x_t, t)
        return F.mse_loss(output, x - noise, reduction="none").mean(-1)

    @staticmethod
    def guide(output: Tensor, scale: float) -> Tensor:
        return guidance.guide(output, scale)

    def generate(self, denoise: Denoiser, noise: Tensor, steps: int, *,
                 generator: GeneratorLike = None, progress: bool = False) -> Tensor:
        """Integrate the velocity of ``denoise``'s output from noise to data; deterministic, so ``generator``
        is unused."""
        return self.integrate(lambda t, x: self.velocity(denoise(x, t), x, t), noise, steps, progress=progress)

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


def check_ode_settings(method, kwargs) -> tuple:
    """``(method, kwargs)`` for torchdiffeq's ``odeint``: a known method and only its other keywords."""
    check(method in ODE_METHODS, f"`ode_method` must be one of torchdiffeq's {ODE_METHODS}, got {method!r}")
    check(kwargs is None or isinstance(kwargs, Mapping), f"`ode_kwargs` must be a dict, got {describe(kwargs)}")
    unknown = sorted(set(kwargs or {}) - set(ODE_OPTIONS))
    check(not unknown, f"`ode_kwargs` takes only {ODE_OPTIONS} (the method is `ode_method`), got {unknown}")
    return method, dict(kwargs or {})


def upstream_flow_objective(objective: Optional[ContinuousObjective], *, model_output_clean: Optional[bool],
                            odeint_kwargs: Optional[Mapping[str, Any]], eps: Optional[float]) -> ContinuousObjective:
    """transfusion-pytorch's ``model_output_clean`` / ``odeint_kwargs`` / ``eps`` as a :class:`RectifiedFlow`;
    with an ``objective`` too, each one given must agree with it (ValueError naming both)."""
    check(odeint_kwargs is None or isinstance(odeint_kwargs, Mapping),
          f"`odeint_kwargs` must be a dict of torchdiffeq odeint keywords, got {describe(odeint_kwargs)}")
    odeint_kwargs = dict(odeint_kwargs or {})
    unknown = sorted(set(odeint_kwargs) - {"method", *ODE_OPTIONS})
    check(not unknown, f"`odeint_kwargs` takes torchdiffeq's odeint keywords method, {', '.join(ODE_OPTIONS)}; "
                       f"got {unknown}")
    check(odeint_kwargs.get("method", "midpoint") in ODE_METHODS,
          f"`odeint_kwargs['method']` must be one of torchdiffeq's {ODE_METHODS}, got {odeint_kwargs.get('method')!r}")
    wanted = {"prediction": None if model_output_clean is None else ("clean" if model_output_clean else "velocity"),
              "eps": eps, "ode_method": odeint_kwargs.pop("method", None),
              "ode_kwargs": odeint_kwargs or None}
    wanted = {name: value for name, value in wanted.items() if value is not None}
    if objective is None:
        return RectifiedFlow(**wanted)
    spelled = {"prediction": "model_output_clean", "eps": "eps", "ode_method": "odeint_kwargs['method']",
               "ode_kwargs": "odeint_kwargs"}
    for name, value in wanted.items():
        check(isinstance(objective, RectifiedFlow),
              f"`{spelled[name]}` is a rectified-flow setting, but `objective` is a {type(objective).__name__}")
        given = {**objective.ode_kwargs, **value} if name == "ode_kwargs" else value  # a subset must agree
        check(getattr(objective, name) == given,
              f"`{spelled[name]}` ({value!r}) disagrees with `objective` ({name}={getattr(objective, name)!r}): "
              f"give the setting once")
    return objective


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
