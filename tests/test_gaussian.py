"""The Gaussian diffusion objective: closed forms of the schedules, ADM's respacing rules, the hybrid
loss and the respaced sampler against the official MAR/DiT diffusion code (golden ``mar.pt``)."""

import math

import pytest
import torch

from mmgen_pytorch.diffloss import DiffLoss
from mmgen_pytorch.guidance import guide, guide_both_halves
from mmgen_pytorch.objectives.gaussian import (GaussianDiffusion, cosine_betas, linear_betas,
                                               make_betas, space_timesteps)


def golden_diffloss(data):
    head = DiffLoss(target_channels=16, z_channels=64, depth=2, width=64, num_sampling_steps="10").eval()
    head.load_state_dict({k[len("diffloss."):]: v for k, v in data["state_dict"].items() if k.startswith("diffloss.")})
    return head


def assert_noisy_step_close(actual, expected):
    """The golden README's rule: atol 1e-5 + 1e-6 · max|expected[i]| per step (1/√ᾱ reaches 2e4)."""
    for i in range(expected.shape[0]):
        atol = 1e-5 + 1e-6 * expected[i].abs().max().item()
        torch.testing.assert_close(actual[i], expected[i], rtol=1e-5, atol=atol, msg=f"step {i}")


# schedules

def test_linear_schedule_closed_form():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15) and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert bool((betas.diff() > 0).all())
    assert linear_betas(250)[-1].item() == pytest.approx(0.08)  # ADM scales both ends by 1000 / T

    diffusion = GaussianDiffusion(betas=betas)
    table = diffusion.schedule
    alpha_bar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(table["alphas_cumprod"], alpha_bar)
    assert bool((alpha_bar.diff() < 0).all()) and 0 < alpha_bar[-1] < 1e-4
    alpha_bar_prev = torch.cat((torch.ones(1, dtype=torch.float64), alpha_bar[:-1]))
    torch.testing.assert_close(table["posterior_variance"], betas * (1 - alpha_bar_prev) / (1 - alpha_bar))
    assert table["posterior_variance"][0] == 0
    assert table["posterior_log_variance_clipped"][0] == table["posterior_log_variance_clipped"][1]


def test_q_sample_mean_and_variance():
    diffusion = GaussianDiffusion.create(schedule="linear")
    x0 = torch.full((200_000, 1), 0.7)
    for step in (0, 300, 999):
        t = torch.full((x0.shape[0],), step)
        alpha_bar = diffusion.schedule["alphas_cumprod"][step].item()
        exact = diffusion.q_sample(x0[:1], t[:1], torch.zeros(1, 1))
        assert exact.item() == pytest.approx(math.sqrt(alpha_bar) * 0.7, rel=1e-6)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(step)))
        assert xt.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - alpha_bar, abs=0.01 + 0.01 * (1 - alpha_bar))


def test_cosine_schedule_caps_beta_and_follows_alpha_bar():
    betas = cosine_betas(1000)
    assert betas.max().item() == pytest.approx(0.999) and bool((betas > 0).all())
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert alpha_bar[499].item() == pytest.approx(expected, rel=1e-9)


# respacing

def test_spacing_rules():
    assert space_timesteps(1000, "10") == list(range(0, 1000, 111))
    hundred = space_timesteps(1000, "100")
    assert len(hundred) == 100 and hundred[:3] == [0, 10, 20] and hundred[-3:] == [979, 989, 999]
    assert space_timesteps(1000, 100) == hundred
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, None) == list(range(1000))
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]


@pytest.mark.parametrize("spacing", ["abc", "0", "ddim999", "2000"])
def test_bad_spacing_names_the_argument(spacing):
    with pytest.raises(ValueError, match="spacing"):
        space_timesteps(1000, spacing)


def test_respaced_chain_keeps_alpha_bar_and_maps_to_original_steps():
    base = GaussianDiffusion.create(schedule="linear")
    spaced = base.respaced("20")
    kept = spaced.timestep_map
    torch.testing.assert_close(spaced.schedule["alphas_cumprod"], base.schedule["alphas_cumprod"][kept])
    assert torch.equal(spaced.model_timesteps(torch.tensor([0, 19])), kept[[0, 19]])
    twice = spaced.respaced("5")  # composing keeps pointing at original timesteps
    assert set(twice.timestep_map.tolist()) <= set(kept.tolist())


# the reverse process

def test_learned_range_interpolates_between_the_log_variances():
    diffusion = GaussianDiffusion.create(schedule="linear", spacing="50")
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 25, 49])
    top = diffusion.p_mean_variance(torch.cat((torch.zeros(4, 3), torch.ones(4, 3)), 1), x, t)
    bottom = diffusion.p_mean_variance(torch.cat((torch.zeros(4, 3), -torch.ones(4, 3)), 1), x, t)
    torch.testing.assert_close(top.log_variance[:, 0], diffusion.schedule["log_betas"][t].float())
    clipped = diffusion.schedule["posterior_log_variance_clipped"][t].float()
    torch.testing.assert_close(bottom.log_variance[:, 0], clipped)


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small", "fixed_large"])
def test_a_shared_int_step_equals_per_row_steps(variance):
    diffusion = GaussianDiffusion.create(schedule="cosine", spacing="30", variance=variance)
    x = torch.randn(4, 6)
    out = torch.randn(4, 12 if variance == "learned_range" else 6)
    noise = torch.randn(4, 6)
    for step in (0, 1, 17, 29):
        rows = torch.full((4,), step)
        shared, per_row = diffusion.p_mean_variance(out, x, step), diffusion.p_mean_variance(out, x, rows)
        for a, b in zip(shared, per_row):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(diffusion.p_sample(shared, step, noise), diffusion.p_sample(per_row, rows, noise))
        torch.testing.assert_close(diffusion.ddim_step(shared, x, step, noise, eta=0.5),
                                   diffusion.ddim_step(per_row, x, rows, noise, eta=0.5))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_perfect_eps_model_recovers_x0(sampler):
    diffusion = GaussianDiffusion.create(schedule="linear", spacing="25", variance="fixed_small")
    x0 = torch.rand(6, 4) * 2 - 1

    def perfect(x_t, t_original):
        alpha_bar = diffusion.table("alphas_cumprod", diffusion.timestep_map.tolist().index(int(t_original[0])) *
                                    torch.ones_like(t_original), x_t)
        return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    out = diffusion.sample_loop(perfect, torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
                                sampler=sampler, temperature=0.0)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)


def test_hybrid_loss_trains_the_mean_by_mse_and_the_variance_by_vb():
    diffusion = GaussianDiffusion.create(schedule="linear")
    x0, noise = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0, 3, 100, 500, 999])
    eps = noise.clone().requires_grad_(True)
    values = torch.zeros(5, 4, requires_grad=True)
    losses = diffusion.losses(torch.cat((eps, values), 1), x0, diffusion.q_sample(x0, t, noise), t, noise)
    assert torch.equal(losses.mse, torch.zeros(5)) and torch.equal(losses.loss, losses.mse + losses.vb)
    assert bool((losses.vb[1:] >= -1e-6).all())
    losses.vb.sum().backward()
    assert eps.grad is None or eps.grad.abs().max() == 0  # the mean is detached inside vb
    assert values.grad.abs().max() > 0


def test_bf16_outputs_are_handled_in_float32():
    diffusion = GaussianDiffusion.create(schedule="cosine", spacing="10")
    x = torch.randn(3, 4)
    prediction = diffusion.p_mean_variance(torch.randn(3, 8).bfloat16(), x, torch.tensor([9, 5, 0]))
    assert prediction.mean.dtype == torch.float32 and bool(torch.isfinite(prediction.mean).all())


def test_guidance_only_on_the_first_channels():
    cond, uncond = torch.randn(2, 8), torch.randn(2, 8)
    out = guide_both_halves(torch.cat((cond, uncond)), 4.0, features=3, feature_dim=1)  # MonoFormer's 3-of-4 quirk
    expected = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:2, :3], expected)
    torch.testing.assert_close(out[2:, :3], expected)
    assert torch.equal(out[:2, 3:], cond[:, 3:]) and torch.equal(out[2:, 3:], uncond[:, 3:])
    assert torch.equal(guide(torch.cat((cond, uncond)), 4.0, features=3, feature_dim=1), out[:2])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion.create(schedule="quadratic")
    with pytest.raises(ValueError, match="variance"):
        GaussianDiffusion.create(variance="learned")
    diffusion = GaussianDiffusion.create(spacing="5")
    with pytest.raises(ValueError, match="model_output"):
        diffusion.p_mean_variance(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="sampler"):
        diffusion.sample_loop(lambda x, t: torch.cat((x, x), 1), torch.zeros(1, 2), sampler="euler")


# golden: the official diffusion code (DiT's copy of ADM, as MAR ships it)

def test_hybrid_loss_matches_official(golden):
    data = golden("mar.pt")
    inputs, outputs = data["inputs"], data["outputs"]
    head = golden_diffloss(data)
    torch.testing.assert_close(head.net(inputs["dl_x"], inputs["dl_t"], inputs["dl_c"]), outputs["dl_net_out"],
                               rtol=1e-5, atol=1e-5)
    losses = head.train_diffusion.training_losses(lambda x, t: head.net(x, t, inputs["dl_c"]), inputs["dl_x"],
                                                  inputs["dl_t"], noise=inputs["dl_noise"])
    for name in ("loss", "mse", "vb"):
        torch.testing.assert_close(getattr(losses, name), outputs[f"dl_{name}"], rtol=1e-5, atol=1e-5)


def test_respaced_sampler_matches_official(golden):
    data = golden("mar.pt")
    inputs, outputs = data["inputs"], data["outputs"]
    head = golden_diffloss(data)
    chain = head.gen_diffusion
    assert torch.equal(chain.timestep_map, outputs["gen_timestep_map"])
    torch.testing.assert_close(chain.betas, outputs["gen_betas"], rtol=1e-5, atol=1e-5)

    x, c, c_uncond = inputs["gen_xt"], inputs["gen_c"], inputs["gen_c_uncond"]
    scale = inputs["gen_cfg_scale"].item()
    plain, guided = [], []
    for i in range(chain.num_timesteps):
        t = torch.full((3,), i)
        plain.append(chain.p_mean_variance(head.net(x, chain.model_timesteps(t), c), x, t))
        t2, x2 = torch.full((6,), i), torch.cat((x, x))
        out = guide_both_halves(head.net(x2, chain.model_timesteps(t2), torch.cat((c, c_uncond))), scale, features=16,
                                feature_dim=1)
        guided.append(chain.p_mean_variance(out, x2, t2))
    stack = lambda preds, name: torch.stack([getattr(p, name) for p in preds])  # noqa: E731
    assert_noisy_step_close(stack(plain, "mean"), outputs["gen_mean"])
    assert_noisy_step_close(stack(plain, "pred_xstart"), outputs["gen_pred_xstart"])
    assert_noisy_step_close(stack(guided, "mean"), outputs["gen_cfg_mean"])
    torch.testing.assert_close(stack(plain, "log_variance"), outputs["gen_log_variance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stack(guided, "log_variance"), outputs["gen_cfg_log_variance"], rtol=1e-5, atol=1e-5)


def test_reverse_loop_at_temperature_zero_matches_official(golden):
    data = golden("mar.pt")
    inputs, expected = data["inputs"], data["outputs"]["gen_loop_tau0"]
    head = golden_diffloss(data)
    atol = 1e-5 + 1e-5 * expected.abs().max().item()
    loop = head.gen_diffusion.sample_loop(lambda x, t: head.net(x, t, inputs["gen_c"]), inputs["gen_xt"],
                                          temperature=0.0)
    torch.testing.assert_close(loop, expected, rtol=1e-5, atol=atol)
    fast = head.sample(inputs["gen_c"], temperature=0.0, noise=inputs["gen_xt"])  # embeddings computed once
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=atol)


def test_clip_denoised_clamps_x0_and_uses_it_in_the_posterior_mean():
    diffusion = GaussianDiffusion.create(schedule="cosine", variance="learned_range").respaced("10")
    x_t, output = torch.randn(4, 6) * 3, torch.randn(4, 12) * 3
    free = diffusion.p_mean_variance(output, x_t, 9)
    clipped = diffusion.p_mean_variance(output, x_t, 9, clip_denoised=1.0)
    assert free.pred_xstart.abs().max() > 1 and clipped.pred_xstart.abs().max() <= 1
    torch.testing.assert_close(clipped.pred_xstart, free.pred_xstart.clamp(-1, 1))
    expected_mean, _, _ = diffusion.q_posterior(free.pred_xstart.clamp(-1, 1), x_t, 9)
    torch.testing.assert_close(clipped.mean, expected_mean)
    torch.testing.assert_close(clipped.log_variance, free.log_variance)


def reference_vb_bits(betas, eps, values, x0, x_t, t):
    """The hybrid loss's VB term from the formulas, in float64, one sample at a time (Nichol & Dhariwal
    2021: learned-range variance, KL to the true posterior, discretised-Gaussian NLL at t = 0)."""
    betas = betas.double()
    alpha_bar = torch.cumprod(1 - betas, 0)
    alpha_bar_prev = torch.cat((torch.ones(1, dtype=torch.float64), alpha_bar[:-1]))
    posterior_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    log_posterior_clipped = torch.log(torch.cat((posterior_var[1:2], posterior_var[1:])))
    cdf = lambda x: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    bits = []
    for i, step in enumerate(t.tolist()):
        x0_i, xt_i, eps_i = x0[i].double(), x_t[i].double(), eps[i].double()
        coef1 = betas[step] * alpha_bar_prev[step].sqrt() / (1 - alpha_bar[step])
        coef2 = (1 - alpha_bar_prev[step]) * (1 - betas[step]).sqrt() / (1 - alpha_bar[step])
        frac = (values[i].double() + 1) / 2
        log_var = frac * torch.log(betas[step]) + (1 - frac) * log_posterior_clipped[step]
        pred_x0 = (xt_i - (1 - alpha_bar[step]).sqrt() * eps_i) / alpha_bar[step].sqrt()
        mean = coef1 * pred_x0 + coef2 * xt_i
        if step > 0:
            true_mean = coef1 * x0_i + coef2 * xt_i
            true_log_var = log_posterior_clipped[step]
            kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                        + (true_mean - mean) ** 2 * torch.exp(-log_var))
            bits.append(kl.mean() / math.log(2))
        else:
            inv_std = torch.exp(-0.5 * log_var)
            upper, lower = cdf(inv_std * (x0_i - mean + 1 / 255)), cdf(inv_std * (x0_i - mean - 1 / 255))
            log_prob = torch.where(x0_i < -0.999, torch.log(upper.clamp_min(1e-12)),
                                   torch.where(x0_i > 0.999, torch.log((1 - lower).clamp_min(1e-12)),
                                               torch.log((upper - lower).clamp_min(1e-12))))
            bits.append(-log_prob.mean() / math.log(2))
    return torch.stack(bits)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vb_term_matches_the_closed_form(schedule):
    diffusion = GaussianDiffusion.create(schedule=schedule)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 4, generator=generator) * 1.8 - 0.9
    x0[0, 0], x0[0, 1] = -1.0, 1.0  # the NLL's edge bins
    noise, eps = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    values = torch.rand(6, 4, generator=generator) * 2 - 1
    t = torch.tensor([0, 1, 7, 250, 600, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    losses = diffusion.losses(torch.cat((eps, values), 1), x0, x_t, t, noise)
    expected = reference_vb_bits(make_betas(schedule, 1000), eps, values, x0, x_t, t)
    torch.testing.assert_close(losses.vb.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses.mse, ((noise - eps) ** 2).mean(1))


def test_ddim_at_eta_one_is_the_ancestral_step_with_the_posterior_variance():
    """DDIM's σ(η=1)² equals β̃_t and its mean the posterior mean of the predicted x_0 (Song et al. 2021)."""
    diffusion = GaussianDiffusion.create(schedule="linear", spacing="50", variance="fixed_small")
    generator = torch.Generator().manual_seed(1)
    x_t, eps, noise = (torch.randn(3, 4, generator=generator) for _ in range(3))
    for index in (1, 20, 49):
        prediction = diffusion.p_mean_variance(eps, x_t, index)
        ddim = diffusion.ddim_step(prediction, x_t, index, noise, eta=1.0)
        ancestral = diffusion.p_sample(prediction, index, noise)
        torch.testing.assert_close(ddim, ancestral, rtol=1e-5, atol=1e-5)
        half = diffusion.ddim_step(prediction, x_t, index, noise, eta=1.0, temperature=0.5)
        torch.testing.assert_close(half - prediction.mean, (ancestral - prediction.mean) * 0.5, rtol=1e-4, atol=1e-5)
