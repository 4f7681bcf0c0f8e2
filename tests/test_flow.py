"""Rectified flow (Transfusion's objective) against its formulas: interpolation, velocity target and
loss, time sampling (uniform, logit-normal), and the torchdiffeq integration on an ODE with a known
solution, for fixed-step and adaptive solvers."""

import math

import pytest
import torch

from mmgen_pytorch import RectifiedFlow, Transfusion


def test_interpolation_target_and_loss_follow_the_formulas():
    x, noise, t = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5)
    flow = RectifiedFlow()
    expected = torch.stack([t[i] * x[i] + (1 - t[i]) * noise[i] for i in range(5)])
    torch.testing.assert_close(flow.noised(x, noise, t), expected)
    output = torch.randn(5, 3)
    per_token = [((output[i] - (x[i] - noise[i])) ** 2).mean() for i in range(5)]
    torch.testing.assert_close(flow.loss(output, x, noise), torch.stack(per_token))
    assert flow.clean_time == 1.0 and torch.equal(flow.noised(x, noise, torch.ones(5)), x)


def test_time_sampling_distributions():
    generator = torch.Generator().manual_seed(0)
    uniform = RectifiedFlow().sample_times(200_000, generator=generator)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 5e-3
    logit_normal = RectifiedFlow(time_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)
    times = logit_normal.sample_times(200_000, generator=generator)
    logits = torch.log(times / (1 - times))
    assert abs(logits.mean() - 0.5) < 1e-2 and abs(logits.std() - 0.8) < 1e-2
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlow(time_sampling="beta")


@pytest.mark.parametrize("method, steps, tolerance", [("euler", 400, 5e-3), ("midpoint", 16, 1e-3),
                                                      ("rk4", 8, 1e-5), ("dopri5", 1, 1e-4)])
def test_integration_solves_a_known_ode(method, steps, tolerance):
    """dx/dt = x * cos(t) from x(0) = noise has x(1) = noise * exp(sin 1)."""
    flow = RectifiedFlow(ode_method=method)
    noise = torch.randn(4, 3, dtype=torch.float64)
    out = flow.integrate(lambda t, x: x * torch.cos(t), noise, steps)
    torch.testing.assert_close(out, noise * math.exp(math.sin(1.0)), rtol=tolerance, atol=tolerance)


def test_transfusion_samples_with_another_solver():
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=16, dim_latent=4, modality_default_shape=(2,),
                        objective=RectifiedFlow(ode_method="rk4"),
                        transformer=dict(dim=32, depth=1, heads=2, attn_backend="sdpa")).eval()
    evaluations = []
    original = model.objective.integrate

    def counting(velocity, noise, steps, **options):
        return original(lambda t, x: evaluations.append(1) or velocity(t, x), noise, steps, **options)

    model.objective.integrate = counting
    images = model.generate_modality_only(2, modality_steps=3, progress=False)
    assert len(evaluations) == 3 * 4 and torch.isfinite(images).all()  # rk4: 4 evaluations per step
