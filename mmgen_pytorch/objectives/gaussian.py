"""Gaussian diffusion (DDPM / improved DDPM, as ADM and DiT write it), apart from any model.

Conventions:

- ``t`` is an index into *this* diffusion's schedule (``0 .. num_timesteps - 1``, 0 is the least
  noisy). A respaced diffusion keeps a subset of an original schedule; its ``timestep_map[t]`` is
  the original timestep, and that is what a network is fed (``model_timesteps``).
- The network predicts ε and, with ``variance="learned_range"``, a value ``v`` per channel that
  interpolates the log variance between ``log β̃_t`` (clipped) and ``log β_t``. Its output is
  ``[ε | v]`` along dim 1.
- Schedules are kept in float64 (as ADM keeps them in numpy) and cast to float32 when indexed; all
  per-step math runs in float32 whatever the network's dtype, so bf16 networks are safe.
- The hybrid loss is ``mse(ε, ε̂) + vb``, where ``vb`` is the variational bound in bits with the
  predicted mean detached (it trains only the variance): a normal KL for ``t > 0`` and the
  discretised-Gaussian decoder NLL (255 bins on [-1, 1]) at ``t = 0``.

A model callback everywhere is ``model(x_t, t_original) -> output``. :class:`GaussianObjective`
puts the chain behind the objective interface that Transfusion and MonoFormer share.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .. import guidance
from .._utils import GeneratorLike, as_generator, as_int, check, check_finite_number
from .base import ContinuousObjective, Denoiser

SCHEDULES = ("linear", "cosine")
VARIANCES = ("learned_range", "fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim")

Spacing = Union[None, int, str, Sequence[int]]
StepIndex = Union[Int[Tensor, " b"], int]  # chain indices per row, or one step shared by every row
Model = Callable[[Tensor, Tensor], Tensor]


# schedules (float64)

def linear_betas(num_timesteps: int) -> Float[Tensor, " T"]:
    """ADM's linear schedule: 1e-4 -> 0.02 for 1000 steps, both ends scaled by ``1000 / T``."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64, device="cpu")


def cosine_alpha_bar(t: float) -> float:
    """ᾱ(t) = cos²(((t + 0.008) / 1.008) · π/2) for ``t`` in [0, 1] (Python floats, as ADM)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, *, max_beta: float = 0.999) -> Float[Tensor, " T"]:
    """β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T), capped at ``max_beta``."""
    betas = [min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def make_betas(schedule: str, num_timesteps: int) -> Float[Tensor, " T"]:
    check(schedule in SCHEDULES, f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")
    check(isinstance(num_timesteps, int) and num_timesteps >= 1,
          f"`num_timesteps` must be a positive int, got {num_timesteps!r}")
    return linear_betas(num_timesteps) if schedule == "linear" else cosine_betas(num_timesteps)


# respacing

def space_timesteps(num_timesteps: int, spacing: Spacing, *, name: str = "spacing") -> List[int]:
    """The original timesteps a respaced diffusion keeps, ascending (ADM's rules).

    ``spacing``: ``None`` or ``""`` (all), an int or ``"N"`` (N evenly spread steps, first and last
    kept, rounded), ``"a,b,c"`` (the range cut into equal sections, a/b/c steps in each) or
    ``"ddimN"`` (the integer stride giving exactly N steps). ``name``: the caller's argument, for errors.
    """
    if spacing is None or spacing == "":
        return list(range(num_timesteps))
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        return _ddim_spacing(num_timesteps, spacing, name)
    counts = _section_counts(spacing, name)
    sizes = [num_timesteps // len(counts) + (1 if i < num_timesteps % len(counts) else 0) for i in range(len(counts))]
    kept, start = [], 0
    for size, count in zip(sizes, counts):
        check(0 < count <= size, f"`{name}` {spacing!r}: cannot take {count} steps from a section of {size}")
        kept += [start + index for index in _evenly_spread(size, count)]
        start += size
    return sorted(set(kept))


def _section_counts(spacing: Spacing, name: str) -> List[int]:
    try:
        counts = ([int(part) for part in spacing.split(",")] if isinstance(spacing, str) else
                  [as_int(spacing)] if as_int(spacing) is not None else [as_int(c) for c in spacing])
    except (TypeError, ValueError):
        counts = []
    counts = [] if None in counts else counts  # a float (2.5) or a bool is not a step count
    check(len(counts) > 0, f"`{name}` must be an int, 'N', 'a,b,...', 'ddimN' or a list of ints, got {spacing!r}")
    return counts


def _evenly_spread(size: int, count: int) -> List[int]:
    """``count`` indices in ``[0, size)`` from a float stride accumulated step by step, then rounded
    half to even (ADM's rounding, kept so the respaced steps match exactly)."""
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    position, indices = 0.0, []
    for _ in range(count):
        indices.append(round(position))
        position += stride
    return indices


def _ddim_spacing(num_timesteps: int, spacing: str, name: str) -> List[int]:
    try:
        desired = int(spacing[len("ddim"):])
    except ValueError:
        desired = -1
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"`{name}` {spacing!r}: no integer stride gives exactly that many of {num_timesteps} steps")


def respace_betas(alphas_cumprod: Tensor, kept: Sequence[int]) -> Tensor:
    """Betas of the chain that visits only ``kept``: ``β'_i = 1 − ᾱ[kept_i] / ᾱ[kept_{i−1}]``."""
    kept_alpha_bar = alphas_cumprod[list(kept)]
    previous = torch.cat((kept_alpha_bar.new_ones(1), kept_alpha_bar[:-1]))
    return 1 - kept_alpha_bar / previous


# Gaussian helpers (float32)

def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Φ used by ADM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of data on a 255-bin grid over [-1, 1] under N(means, e^(2 log_scales)); the edge
    bins take the open tails. Probabilities are clamped at 1e-12."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


class Prediction(NamedTuple):
    """``p(x_{t-1} | x_t)`` and the x_0 it implies."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor


class Losses(NamedTuple):
    """Per-sample terms (``[b]``): ``loss = mse + vb`` (``vb`` is 0 for a fixed variance)."""

    loss: Tensor
    mse: Tensor
    vb: Tensor


class GaussianDiffusion:
    """A (possibly respaced) DDPM chain with ε-prediction.

    Args (keyword-only):
        betas: float64 noise schedule of this chain.
        timestep_map: the original timestep of each step (default ``arange``).
        variance: ``"learned_range"`` (network outputs ``[ε | v]``), ``"fixed_small"`` (β̃_t) or
            ``"fixed_large"`` (β_t, with β̃_1 at t = 0).
        vb_weight: factor on the ``vb`` term (ADM's RESCALED_MSE uses ``T / 1000``).
    """

    def __init__(self, *, betas: Tensor, timestep_map: Optional[Sequence[int]] = None,
                 variance: str = "learned_range", vb_weight: float = 1.0):
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu").flatten()
        check(betas.numel() >= 1 and bool(((betas > 0) & (betas <= 1)).all()),
              f"`betas` must be a non-empty schedule with every value in (0, 1], got {betas.tolist()[:8]}...")
        check(variance in VARIANCES, f"`variance` must be one of {VARIANCES}, got {variance!r}")
        timestep_map = list(range(betas.numel())) if timestep_map is None else [int(t) for t in timestep_map]
        check(len(timestep_map) == betas.numel(),
              f"`timestep_map` needs one entry per beta ({betas.numel()}), got {len(timestep_map)}")
        self.betas, self.variance, self.vb_weight = betas, variance, vb_weight
        self.num_timesteps = betas.numel()
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long, device="cpu")
        self.schedule = _schedule_tables(betas)
        self._cast: Dict[torch.device, Dict[str, Tensor]] = {}
        self._scalars: Dict[str, List[float]] = {}

    @classmethod
    def create(cls, *, schedule: str = "linear", num_timesteps: int = 1000, spacing: Spacing = None,
               variance: str = "learned_range", vb_weight: float = 1.0) -> "GaussianDiffusion":
        """A ``schedule`` chain of ``num_timesteps`` steps, respaced by ``spacing`` (see :func:`space_timesteps`).

        Like ADM, even the unrespaced chain is rebuilt from ᾱ (``spacing=None`` keeps every step).
        """
        base = cls(betas=make_betas(schedule, num_timesteps), variance=variance, vb_weight=vb_weight)
        return base.respaced(spacing)

    def respaced(self, spacing: Spacing, *, name: str = "spacing") -> "GaussianDiffusion":
        """This chain restricted to the steps ``spacing`` keeps; the timestep map still points at
        the original timesteps. ``name``: the caller's argument, for errors."""
        kept = space_timesteps(self.num_timesteps, spacing, name=name)
        return GaussianDiffusion(betas=respace_betas(self.schedule["alphas_cumprod"], kept),
                                 timestep_map=self.timestep_map[kept].tolist(), variance=self.variance,
                                 vb_weight=self.vb_weight)

    # tables

    def model_timesteps(self, t: Int[Tensor, " b"]) -> Int[Tensor, " b"]:
        """The original timesteps the network is fed for chain indices ``t``."""
        return self.timestep_map.to(t.device)[t]

    def table(self, name: str, t: StepIndex, like: Tensor) -> Union[Tensor, float]:
        """``schedule[name][t]`` as float32 on ``like``'s device, broadcastable against ``like``; for
        an int ``t`` (every row at one step) the float32 value as a Python float."""
        if isinstance(t, int):
            if not self._scalars:
                self._scalars = {key: value.float().tolist() for key, value in self.schedule.items()}
            return self._scalars[name][t]
        device = like.device
        if device not in self._cast:
            self._cast[device] = {key: value.to(device=device, dtype=torch.float32)
                                  for key, value in self.schedule.items()}
        values = self._cast[device][name][t]
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    # forward process

    def sample_timesteps(self, count: int, *, device=None, generator: GeneratorLike = None) -> Tensor:
        """Uniform chain indices."""
        generator = as_generator(generator, device)
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (count,), generator=generator, device=gen_device).to(device)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        x_start, noise = x_start.float(), noise.float()
        return self.table("sqrt_alphas_cumprod", t, x_start) * x_start + \
            self.table("sqrt_one_minus_alphas_cumprod", t, x_start) * noise

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: StepIndex):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.table("posterior_mean_coef1", t, x_t) * x_start + self.table("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.table("posterior_variance", t, x_t), self.table("posterior_log_variance_clipped", t, x_t)

    # reverse process

    def split_output(self, model_output: Tensor, x_t: Tensor):
        """``(ε, v)``; ``v`` is None for a fixed variance."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.variance == "learned_range" else channels
        check(model_output.shape[0] == x_t.shape[0] and model_output.shape[1] == expected
              and model_output.shape[2:] == x_t.shape[2:],
              f"`model_output` must be [{x_t.shape[0]}, {expected}, ...] for x_t {tuple(x_t.shape)} "
              f"(variance={self.variance!r}), got {tuple(model_output.shape)}")
        model_output = model_output.float()
        if self.variance != "learned_range":
            return model_output, None
        return model_output[:, :channels], model_output[:, channels:]

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: StepIndex,
                        clip_denoised: Optional[float] = None) -> Prediction:
        """p(x_{t-1} | x_t) from the network output at chain index ``t``; ``clip_denoised=c`` clamps the
        predicted x_0 to ``[-c, c]`` first (for bounded data such as pixels; upstream MAR does not clip)."""
        x_t = x_t.float()
        eps, values = self.split_output(model_output, x_t)
        log_variance = self._log_variance(values, t, x_t)
        pred_xstart = self.table("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
            self.table("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        if clip_denoised is not None:
            pred_xstart = pred_xstart.clamp(-clip_denoised, clip_denoised)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return Prediction(mean, torch.exp(log_variance), log_variance, pred_xstart)

    def _log_variance(self, values: Optional[Tensor], t: StepIndex, x_t: Tensor) -> Tensor:
        if self.variance == "learned_range":
            min_log = self.table("posterior_log_variance_clipped", t, x_t)
            max_log = self.table("log_betas", t, x_t)
            frac = (values + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        name = "posterior_log_variance_clipped" if self.variance == "fixed_small" else "log_betas_large"
        value = self.table(name, t, x_t)
        return value.expand_as(x_t) if isinstance(value, Tensor) else torch.full_like(x_t, value)

    def predict_eps(self, x_t: Tensor, t: StepIndex, pred_xstart: Tensor) -> Tensor:
        return (self.table("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / \
            self.table("sqrt_recipm1_alphas_cumprod", t, x_t)

    # losses

    def losses(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> Losses:
        """Hybrid loss per sample for an output computed at ``x_t = q_sample(x_start, t, noise)``."""
        x_start, x_t, noise = x_start.float(), x_t.float(), noise.float()
        eps, values = self.split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        if values is None:
            return Losses(mse, mse, torch.zeros_like(mse))
        frozen = torch.cat((eps.detach(), values), dim=1)
        vb = self.vb_weight * self.vb_terms_bits(frozen, x_start, x_t, t)
        return Losses(mse + vb, mse, vb)

    def vb_terms_bits(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """One term of the variational bound per sample, in bits."""
        true_mean, _, true_log_variance = self.q_posterior(x_start, x_t, t)
        prediction = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, prediction.mean, prediction.log_variance)
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=prediction.mean,
                                                   log_scales=0.5 * prediction.log_variance)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Model, x_start: Tensor, t: Optional[Tensor] = None, *,
                        noise: Optional[Tensor] = None, generator: GeneratorLike = None) -> Losses:
        """Noise ``x_start`` at chain indices ``t`` (uniform when None) and score ``model(x_t, t_original)``."""
        generator = as_generator(generator, x_start.device)  # one stream for the steps and the noise
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], device=x_start.device, generator=generator)
        if noise is None:
            noise = _randn(x_start.shape, like=x_start, generator=generator)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t))
        return self.losses(output, x_start, x_t, t, noise)

    # sampling

    def p_sample(self, prediction: Prediction, t: StepIndex, noise: Tensor, *, temperature: float = 1.0) -> Tensor:
        """Ancestral step: mean + σ · noise · temperature (no noise at t = 0)."""
        nonzero = _nonzero(t, noise)
        return prediction.mean + nonzero * torch.exp(0.5 * prediction.log_variance) * noise * temperature

    def ddim_step(self, prediction: Prediction, x_t: Tensor, t: StepIndex, noise: Tensor, *, eta: float = 0.0,
                  temperature: float = 1.0) -> Tensor:
        """DDIM update from the predicted x_0 (``eta = 0``: deterministic)."""
        eps = self.predict_eps(x_t.float(), t, prediction.pred_xstart)
        alpha_bar = self.table("alphas_cumprod", t, x_t)
        alpha_bar_prev = self.table("alphas_cumprod_prev", t, x_t)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5
        mean = prediction.pred_xstart * alpha_bar_prev ** 0.5 + (1 - alpha_bar_prev - sigma ** 2) ** 0.5 * eps
        return mean + _nonzero(t, noise) * sigma * noise * temperature

    def sample_loop(self, model: Model, noise: Tensor, *, temperature: float = 1.0, sampler: str = "ddpm",
                    eta: float = 0.0, generator: GeneratorLike = None, progress: bool = False,
                    clip_denoised: Optional[float] = None) -> Tensor:
        """Run the chain from ``x_T = noise`` (not scaled by the temperature) down to x_0.

        ``model(x_t, t_original)`` is called with every row at the same step; ``temperature``
        scales each step's fresh noise only (MAR's convention). Returns float32.
        """
        check_chain_options(temperature=temperature, sampler=sampler, eta=eta, clip_denoised=clip_denoised)
        generator = as_generator(generator, noise.device)
        x = noise.float()
        originals = self.timestep_map.tolist()
        steps = range(self.num_timesteps - 1, -1, -1)
        for index in tqdm(steps, desc="diffusion", leave=False) if progress else steps:
            t_model = torch.full((x.shape[0],), originals[index], dtype=torch.long, device=x.device)
            prediction = self.p_mean_variance(model(x, t_model), x, index, clip_denoised)  # one shared step
            noisy = index > 0 and temperature > 0
            fresh = _randn(x.shape, like=x, generator=generator) if noisy else torch.zeros_like(x)
            x = (self.p_sample(prediction, index, fresh, temperature=temperature) if sampler == "ddpm"
                 else self.ddim_step(prediction, x, index, fresh, eta=eta, temperature=temperature))
        return x


def check_chain_options(*, temperature: float = 1.0, sampler: str = "ddpm", eta: float = 0.0,
                        clip_denoised: Optional[float] = None) -> None:
    """The options of a reverse chain (:meth:`GaussianDiffusion.sample_loop`), checked before any step.

    DDIM's ``σ = eta · sqrt((1 − ᾱ_prev) / (1 − ᾱ)) · sqrt(1 − ᾱ / ᾱ_prev)`` keeps the square root
    ``sqrt(1 − ᾱ_prev − σ²)`` real for every step only when ``eta <= 1`` (1: DDPM's posterior variance)."""
    check(sampler in SAMPLERS, f"`sampler` must be one of {SAMPLERS}, got {sampler!r}")
    check_finite_number("temperature", temperature, minimum=0)
    check_finite_number("eta", eta, minimum=0, maximum=1)
    check(eta == 0 or sampler == "ddim", f"`eta` ({eta}) is DDIM's noise level: it needs `sampler='ddim'`")
    if clip_denoised is not None:  # a bound c clamps x0 to [-c, c]: c <= 0 would pin every value
        check_finite_number("clip_denoised", clip_denoised, minimum=0, strict=True)


def _schedule_tables(betas: Tensor) -> Dict[str, Tensor]:
    """Every float64 quantity a step needs, indexed by chain step."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat((alphas_cumprod.new_ones(1), alphas_cumprod[:-1]))
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # β̃_0 = 0, so the log is clipped by repeating β̃_1 at step 0
    clipped = torch.cat((posterior_variance[1:2], posterior_variance[1:])) if betas.numel() > 1 else betas
    return dict(
        betas=betas,
        log_betas=torch.log(betas),
        log_betas_large=torch.log(torch.cat((posterior_variance[1:2], betas[1:])) if betas.numel() > 1 else betas),
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=torch.log(clipped),
        posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
    )


def _nonzero(t: StepIndex, like: Tensor):
    """1 where the step is not the last (t > 0), broadcastable against ``like``."""
    if isinstance(t, int):
        return float(t != 0)
    return (t != 0).float().reshape((-1,) + (1,) * (like.ndim - 1))


def _randn(shape, *, like: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal float32 noise on ``like``'s device, drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


# the objective interface (channel-last tokens)

class GaussianObjective(ContinuousObjective):
    """:class:`GaussianDiffusion` behind :class:`~.base.ContinuousObjective`, on channel-last tokens.

    Times are ORIGINAL integer timesteps in ``[0, num_timesteps)`` held in float tensors; ``-1``
    (``clean_time``) marks a clean latent in the context, embedded like step 0. Training draws steps
    uniformly and scores the hybrid loss; the network outputs ``[ε | v]`` per token (``[ε]`` for a fixed
    variance). ``generate(steps=N)`` runs the chain respaced to N steps (``"ddpm"`` ancestral or
    ``"ddim"``, fresh noise scaled by ``temperature``), feeding the network the original timesteps.

    ``guide_features``: CFG guides only the first that many ε features of a token (MonoFormer's
    first-3-of-4-channels quirk); default all of ε. The variance values are never guided.
    """

    clean_time = -1.0
    generate_options = ("temperature", "sampler", "eta", "clip_denoised")  # progress: the caller's own

    def __init__(self, *, schedule: str = "linear", num_timesteps: int = 1000, variance: str = "learned_range",
                 guide_features: Optional[int] = None):
        check(guide_features is None or (isinstance(guide_features, int) and guide_features > 0),
              f"`guide_features` must be None or a positive int, got {guide_features!r}")
        self.diffusion = GaussianDiffusion.create(schedule=schedule, num_timesteps=num_timesteps, variance=variance)
        self.guide_features = guide_features
        self._chains: Dict[str, GaussianDiffusion] = {}

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    @property
    def learned_variance(self) -> bool:
        return self.diffusion.variance == "learned_range"

    def sample_times(self, count: int, *, device=None, generator: GeneratorLike = None) -> Tensor:
        return self.diffusion.sample_timesteps(count, device=device, generator=generator).float()

    def check_time(self, time: float, *, name: str) -> None:
        valid = float(time) == int(time) and 0 <= int(time) < self.num_timesteps
        check(valid, f"{name} must be an integer timestep in [0, {self.num_timesteps}), got {time}")

    def noised(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        x_t = self.diffusion.q_sample(x, t.long().clamp_min(0), noise).to(x.dtype)
        clean = (t == self.clean_time).reshape(t.shape + (1,) * (x.ndim - t.ndim))
        return torch.where(clean, x, x_t)

    @staticmethod
    def time_embedding_input(t: Tensor) -> Tensor:
        return t.float().clamp_min(0)

    def output_dim(self, dim_latent: int) -> int:
        return 2 * dim_latent if self.learned_variance else dim_latent

    def loss(self, output: Tensor, x: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.diffusion.losses(output, x, x_t, t.long(), noise).loss

    def guide(self, output: Tensor, scale: float) -> Tensor:
        eps_features = output.shape[-1] // (2 if self.learned_variance else 1)
        channels = self.guide_features if self.guide_features is not None else eps_features
        check(channels <= eps_features,
              f"`guide_features` ({channels}) exceeds the {eps_features} ε features of a token")
        return guidance.guide(output, scale, features=channels)

    def sampling_chain(self, steps: Spacing, *, name: str = "steps") -> GaussianDiffusion:
        """The training chain respaced to ``steps`` (an int N or any :func:`space_timesteps` spacing), cached;
        ``name``: the caller's argument, for errors."""
        check(as_int(steps) is None or 1 <= as_int(steps) <= self.num_timesteps,
              f"`{name}` must be in [1, {self.num_timesteps}], got {steps}")
        key = str(steps)
        if key not in self._chains:
            self._chains[key] = self.diffusion.respaced(steps, name=name)
        return self._chains[key]

    def check_steps(self, steps: Spacing, *, name: str) -> None:
        self.sampling_chain(steps, name=name)

    def check_generate_options(self, options: Mapping[str, Any], *, name: str = "objective_kwargs") -> None:
        super().check_generate_options(options, name=name)
        check_chain_options(**options)

    def generate(self, denoise: Denoiser, noise: Tensor, steps: Spacing, *,
                 generator: GeneratorLike = None, temperature: float = 1.0, sampler: str = "ddpm",
                 eta: float = 0.0, clip_denoised: Optional[float] = None, progress: bool = False) -> Tensor:
        """The respaced reverse chain over the tokens of ``noise [b, n, d]`` (every token is one row of
        the chain's batch); ``clip_denoised=c`` clamps each step's x0 prediction to [-c, c] (data known to
        be bounded). Returns float32 latents."""
        chain = self.sampling_chain(steps)
        shape = noise.shape

        def model(x: Tensor, t: Tensor) -> Tensor:
            return denoise(x.view(shape), t[0]).reshape(x.shape[0], -1)

        out = chain.sample_loop(model, noise.reshape(-1, shape[-1]), temperature=temperature, sampler=sampler,
                                eta=eta, generator=generator, clip_denoised=clip_denoised, progress=progress)
        return out.view(shape)
