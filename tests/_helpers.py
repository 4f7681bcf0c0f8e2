"""Helpers shared by the tests: deterministic images, models moved off their initialisation, short
training runs, and reference re-draws of a model's training-time randomness."""

from typing import Any, Callable, List, Tuple

import torch
from torch import nn


def perturbed(model: nn.Module, *, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Seeded noise on every parameter, in place. Zero-initialised heads and gates would otherwise make
    outputs constant or context-free, hiding a weight that did not load or a path that was cut."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight redrawn (norm gains around 1, the rest N(0, 0.2²)) from ``torch.manual_seed(seed)``, in
    eval mode: the official inits zero the output heads, which would make every logit equal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.1 if "norm" in name else 0.2)
    return model.eval()


def smooth_images(n=2, size=8, seed=0):
    """``[n, 3, size, size]`` smooth sinusoidal images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    freq = 1 + 2 * torch.rand(n, 3, 1, 1, generator=g)
    return torch.sin(freq * xx + freq.flip(1) * yy)


def train_steps(model: nn.Module, forward: Callable[[int], Any], *, steps: int = 4,
                lr: float = 3e-3) -> Tuple[List[float], Any]:
    """``steps`` Adam steps on ``forward(step).loss``; returns the losses and the last output."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        out = forward(step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses, out


def saved_and_reloaded(build: Callable[[], nn.Module], path) -> Tuple[nn.Module, nn.Module]:
    """A model built from seed 0 and a second one built the same way, loaded from the first's state dict
    saved at ``path`` (read back with ``weights_only=True``); both in eval mode."""
    torch.manual_seed(0)
    model = build().eval()
    torch.save(model.state_dict(), path)
    loaded = build().eval()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    return model, loaded


def corrupted_like_the_model(codes, p, vocab_size, seed):
    """The inputs ``codes[:, :-1]`` with each position swapped for random codes with probability p, drawn
    from the same seed in the model's order (one uniform per position, then the random codes)."""
    torch.manual_seed(seed)
    inputs = codes[:, :-1]
    swap = torch.rand(inputs.shape[:2]) < p
    swap = swap.view(*swap.shape, *(1,) * (inputs.ndim - 2))
    return torch.where(swap, torch.randint_like(inputs, vocab_size), inputs), swap


def assert_close_f32(actual, expected, *, tol: float = 1e-5, amplification: float = 1.0, **kwargs):
    """Two float32 computations of the same math agree up to rounding (tests/TOLERANCES.md): the allowed error is
    ``tol · amplification`` relative to the largest magnitude compared, so it holds on every CPU whatever the scale
    of the values. ``amplification`` is how much the computation after the point where rounding differs can grow
    an error, e.g. ``2·s − 1`` for classifier-free guidance at scale ``s ≥ 1``."""
    scale = tol * amplification
    finite = torch.as_tensor(expected).detach().abs().nan_to_num(nan=0.0, posinf=0.0)  # NaN / inf: compared as equal_nan says
    magnitude = float(finite.max()) if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=scale, atol=scale * max(magnitude, 1.0), **kwargs)


def guidance_amplification(scale: float) -> float:
    """``uncond + (cond − uncond)·s`` turns errors ε in both halves into at most ``(|s| + |1 − s|)·ε``."""
    return abs(scale) + abs(1 - scale)
