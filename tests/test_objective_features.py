"""transfusion-pytorch's training options on Transfusion, each against an independent computation:
x-prediction (``model_output_clean``), the reconstruction loss through the decoder, velocity consistency
with an EMA model, times from a user function, ``odeint_kwargs`` and forward's return flags."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmgen_pytorch.objectives import GaussianObjective, RectifiedFlow
from mmgen_pytorch.transfusion import LossBreakdown, Transfusion, random_modality_length_to_time_fn

from _helpers import assert_close_f32, perturbed

DIM_LATENT, SHAPE, DEPTH = 4, (3,), 2


def tiny(**kwargs) -> Transfusion:
    torch.manual_seed(0)
    options = dict(num_text_tokens=8, dim_latent=DIM_LATENT, modality_default_shape=SHAPE,
                   transformer=dict(dim=16, depth=DEPTH, heads=2), prob_uncond=0.0)
    return Transfusion(**{**options, **kwargs})


def batch(channel_first: bool = False):
    """Two samples, each text then one modality at its end (noised in place: every latent token is trained)."""
    generator = torch.Generator().manual_seed(1)
    latents = [torch.randn(*SHAPE, DIM_LATENT, generator=generator) for _ in range(2)]
    texts = [torch.randint(0, 8, (n,), generator=generator) for n in (4, 2)]
    data = [[text, latent.movedim(-1, 0) if channel_first else latent] for text, latent in zip(texts, latents)]
    noise = [[torch.randn(*SHAPE, DIM_LATENT, generator=generator)] for _ in range(2)]
    return data, latents, noise


def close(actual, expected):
    assert_close_f32(actual.detach(), expected.detach())


def test_clean_prediction_velocity_is_its_formula():
    flow = RectifiedFlow(prediction="clean", eps=0.05)
    out, x_t = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.0, 0.5, 0.99, 1.0])
    expected = torch.stack([(out[i] - x_t[i]) / max(1 - float(t[i]), 0.05) for i in range(4)])
    close(flow.velocity(out, x_t, t), expected)
    assert torch.equal(flow.predicted_clean(out, x_t, t), out)
    velocity = RectifiedFlow()
    assert torch.equal(velocity.velocity(out, x_t, t), out)
    close(velocity.predicted_clean(out, x_t, t), x_t + (1 - t[:, None]) * out)


def test_clean_prediction_sampling_integrates_the_derived_flow():
    # x-prediction of a constant x*: the derived flow's Euler steps land on x* exactly (1 - t stays >= eps)
    target, noise = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    flow = RectifiedFlow(prediction="clean", ode_method="euler")
    close(flow.generate(lambda x, t: target, noise, 4), target)


def test_model_output_clean_loss_is_the_derived_flows_error():
    model = tiny(model_output_clean=True)
    assert model.objective.prediction == "clean" and model.objective.eps == 1e-2
    data, latents, noise = batch()
    times = [[0.3], [0.995]]  # the second one's 1 - t is under eps: clamped
    _, outputs = model(data, times=times, noise=noise, return_loss=False)
    clean, noises = torch.cat(latents), torch.cat([n[0] for n in noise])
    t = torch.tensor([0.3] * 3 + [0.995] * 3)[:, None]
    x_t = t * clean + (1 - t) * noises
    flow = (outputs[0] - x_t) / (1 - t).clamp_min(1e-2)
    _, breakdown = model(data, times=times, noise=noise, return_breakdown=True)
    close(breakdown.flow[0], F.mse_loss(flow, clean - noises))


def test_reconstruction_loss_through_the_decoder():
    decoder = nn.Conv1d(DIM_LATENT, 3, 1)
    model = tiny(channel_first_latent=True, modality_decoder=decoder, reconstruction_loss_weight=0.5)
    data, latents, noise = batch(channel_first=True)
    times = [[0.2], [0.7]]
    _, outputs = model(data, times=times, noise=noise, return_loss=False)
    losses = []
    for index, (latent, t) in enumerate(zip(latents, (0.2, 0.7))):
        velocity = outputs[0][3 * index:3 * index + 3]
        x_t = t * latent + (1 - t) * noise[index][0]
        estimate = x_t + (1 - t) * velocity
        decoded = decoder(estimate.T[None])[0]  # channel first [c, n] through the decoder
        losses.append(F.mse_loss(decoded, decoder(latent.T[None])[0]))
    expected = torch.stack(losses).mean()
    loss, breakdown = model(data, times=times, noise=noise, return_breakdown=True)
    close(breakdown.recon[0], expected.detach())
    close(loss, breakdown.text + breakdown.flow[0] + 0.5 * expected.detach())
    assert breakdown.recon[0].requires_grad and breakdown.velocity is None
    assert all(p.grad is None for p in decoder.parameters())


def test_reconstruction_loss_without_decoder_is_in_latent_space():
    model = tiny(reconstruction_loss_weight=1.0, model_output_clean=True)
    data, latents, noise = batch()
    _, outputs = model(data, times=[[0.4], [0.6]], noise=noise, return_loss=False)
    expected = torch.stack([F.mse_loss(outputs[0][:3], latents[0]), F.mse_loss(outputs[0][3:], latents[1])]).mean()
    _, breakdown = model(data, times=[[0.4], [0.6]], noise=noise, return_breakdown=True)
    close(breakdown.recon[0], expected)


class Holder(nn.Module):
    """Stands in for ema_pytorch.EMA: the averaged model under ``ema_model``."""

    def __init__(self, model):
        super().__init__()
        self.ema_model = model


def test_velocity_consistency_against_its_formula():
    model = tiny()
    ema = perturbed(copy.deepcopy(model))
    data, latents, noise = batch()
    delta, times = 0.01, [0.3, 0.8]
    # ours at t (1 - delta), the EMA delta later, both on the same noise paths
    ours_t = [[t * (1 - delta)] for t in times]
    later_t = [[t * (1 - delta) + delta] for t in times]
    _, ours = model(data, times=ours_t, noise=noise, return_loss=False)
    _, theirs = ema(data, times=later_t, noise=noise, return_loss=False)
    expected = F.mse_loss(ours[0], theirs[0])
    loss, breakdown = model(data, times=[[t] for t in times], noise=noise, return_breakdown=True,
                            velocity_consistency_ema_model=Holder(ema), velocity_consistency_delta_time=delta)
    close(breakdown.velocity[0], expected)
    close(loss, breakdown.text + breakdown.flow[0] + 0.1 * expected)
    loss.backward()
    assert all(p.grad is None for p in ema.parameters())


def test_velocity_consistency_bad_teachers_are_refused():
    model = tiny()
    data, _, _ = batch()
    with pytest.raises(TypeError, match="velocity_consistency_ema_model"):
        model(data, velocity_consistency_ema_model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="velocity_consistency_ema_model"):
        model(data, velocity_consistency_ema_model=tiny(dim_latent=5))
    with pytest.raises(ValueError, match="velocity_consistency_delta_time"):
        model(data, velocity_consistency_ema_model=model, velocity_consistency_delta_time=1.5)


def test_times_function_gives_the_times():
    model = tiny()
    data, _, noise = batch()
    seen = []

    def ones(counts):
        seen.append(counts.tolist())
        return torch.ones(len(counts), int(counts.max()))

    loss, times = model(data, noise=noise, num_modalities_to_times_fn=ones, return_times=True)
    assert seen == [[1, 1]] and torch.equal(times, torch.ones(2, 1))
    close(loss, model(data, noise=noise, times=torch.ones(2, 1)))
    # at t = 0 the input is pure noise
    _, zero = model(data, noise=noise, num_modalities_to_times_fn=lambda c: torch.zeros(len(c), 1), return_loss=False)
    _, by_hand = model([[d[0], n[0]] for d, n in zip(data, noise)], times=[[1.0], [1.0]], noise=noise,
                       return_loss=False)
    close(zero[0], by_hand[0])


def test_random_modality_length_to_time_fn():
    times = random_modality_length_to_time_fn(torch.tensor([1, 3, 0]))
    assert times.shape == (3, 3) and bool(((0 <= times) & (times < 1)).all())
    model = tiny()
    data, _, _ = batch()
    assert model(data, num_modalities_to_times_fn=random_modality_length_to_time_fn).ndim == 0


@pytest.mark.parametrize("bad, match", [
    (lambda c: torch.rand(len(c) + 1, 1), "Float\\[batch=2"),
    (lambda c: torch.rand(len(c)), "Float\\[batch=2"),
    (lambda c: [[0.5], [0.5]], "Float\\[batch=2"),
    (lambda c: torch.full((len(c), 1), 1.5), "flow times in \\[0, 1\\]"),
    (lambda c: torch.full((len(c), 1), float("nan")), "NaN"),
])
def test_times_function_bad_returns_are_refused_before_the_backbone(monkeypatch, bad, match):
    model = tiny()
    monkeypatch.setattr(model, "run_backbone", lambda *a, **k: pytest.fail("the backbone ran"))
    data, _, _ = batch()
    with pytest.raises(ValueError, match=f"num_modalities_to_times_fn.*{match}"):
        model(data, num_modalities_to_times_fn=bad)
    with pytest.raises(ValueError, match="not both"):
        model(data, times=[[0.5], [0.5]], num_modalities_to_times_fn=random_modality_length_to_time_fn)


@pytest.mark.parametrize("channel_first", [False, True])
def test_return_flags(channel_first):
    model = tiny(channel_first_latent=channel_first)
    data, _, noise = batch(channel_first)
    times = [[0.25], [0.5]]
    loss, breakdown, hiddens, per_sample = model(data, times=times, noise=noise, return_breakdown=True,
                                                 return_hiddens=True, return_times=True)
    assert isinstance(breakdown, LossBreakdown) and breakdown.velocity is None and breakdown.recon is None
    length = hiddens[0].shape[1]
    assert len(hiddens) == DEPTH + 2 and all(h.shape == (2, length, 16) for h in hiddens)
    assert torch.equal(per_sample, torch.tensor([[0.25], [0.5]]))
    embed, functions = model(data, times=times, noise=noise, return_embed=True)
    assert torch.equal(embed, hiddens[-1]) and list(functions) == [0] and len(functions[0]) == 2
    flows = model(data, times=times, noise=noise, return_only_pred_flows=True)
    grid = (DIM_LATENT, *SHAPE) if channel_first else (*SHAPE, DIM_LATENT)
    assert [[f.shape for f in per_type] for per_type in flows] == [[grid, grid]]
    for function, flow in zip(functions[0], flows[0]):
        assert torch.equal(function(embed), flow)
    _, outputs = model(data, times=times, noise=noise, return_loss=False)
    assert torch.equal(flows[0][1], outputs[0][3:].movedim(-1, 0) if channel_first else outputs[0][3:])
    (logits, _), text_times = model(torch.randint(0, 8, (1, 5)), return_loss=False, return_times=True)
    assert text_times.shape == (1, 0) and logits.shape[0] == 1


def test_odeint_kwargs_map_to_the_objective():
    model = tiny(odeint_kwargs=dict(method="rk4", atol=1e-4, rtol=1e-4))
    assert (model.objective.ode_method, model.objective.ode_kwargs) == ("rk4", {"atol": 1e-4, "rtol": 1e-4})
    agreeing = RectifiedFlow(ode_method="euler", prediction="clean")
    assert tiny(objective=agreeing, odeint_kwargs=dict(method="euler"), model_output_clean=True).objective is agreeing


@pytest.mark.parametrize("kwargs, match", [
    (dict(odeint_kwargs=dict(method="euler"), objective=RectifiedFlow()), "odeint_kwargs\\['method'\\].*disagrees"),
    (dict(odeint_kwargs=dict(atol=1e-3), objective=RectifiedFlow()), "`odeint_kwargs`.*disagrees"),
    (dict(odeint_kwargs=dict(method="nope")), "odeint_kwargs\\['method'\\]"),
    (dict(odeint_kwargs=dict(t=1)), "`odeint_kwargs` takes"),
    (dict(odeint_kwargs=[1]), "`odeint_kwargs` must be a dict"),
    (dict(model_output_clean=True, objective=RectifiedFlow()), "model_output_clean.*disagrees"),
    (dict(model_output_clean=True, objective=GaussianObjective()), "model_output_clean.*GaussianObjective"),
    (dict(reconstruction_loss_weight=0.1, objective=GaussianObjective()), "reconstruction_loss_weight"),
    (dict(reconstruction_loss_weight=-1.0), "reconstruction_loss_weight"),
    (dict(velocity_consistency_loss_weight=float("nan")), "velocity_consistency_loss_weight"),
    (dict(eps=0.0), "`eps`"),
])
def test_bad_training_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_objective_rejects_bad_settings():
    for kwargs, match in ((dict(prediction="x"), "prediction"), (dict(ode_method="nope"), "ode_method"),
                          (dict(ode_kwargs=dict(method="rk4")), "ode_kwargs")):
        with pytest.raises(ValueError, match=match):
            RectifiedFlow(**kwargs)


def test_config_round_trip_with_model_output_clean(tmp_path):
    model = tiny(model_output_clean=True, reconstruction_loss_weight=0.25, velocity_consistency_loss_weight=0.5,
                 odeint_kwargs=dict(method="euler")).eval()
    loaded = Transfusion.load(model.save(tmp_path / "model"))
    assert (loaded.objective.prediction, loaded.objective.ode_method) == ("clean", "euler")
    assert (loaded.reconstruction_loss_weight, loaded.velocity_consistency_loss_weight) == (0.25, 0.5)
    data, _, noise = batch()
    times = [[0.3], [0.6]]
    close(loaded(data, times=times, noise=noise), model(data, times=times, noise=noise))
