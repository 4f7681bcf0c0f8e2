"""MAR's KL autoencoder: golden outputs of the official code, the diagonal Gaussian posterior,
official checkpoint loading, input checks and a training step."""

import argparse
from dataclasses import replace

import pytest
import torch

from mmgen_pytorch.pretrained import CheckpointMismatchError, mar_vae_state_dict
from mmgen_pytorch.tokenizers import AutoencoderKL, DiagonalGaussian, KLConfig

from _helpers import assert_close_f32, saved_and_reloaded, smooth_images, train_steps

TINY = KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(), decoder_attn_levels=())


def test_golden_posterior_and_decode(golden):
    data = golden("mar_vae.pt")
    expected = data["outputs"]
    for config in (data["config"], None):  # official arguments, and the architecture read off the weights
        model = AutoencoderKL.from_official(data["state_dict"], config=config).eval()
        with torch.no_grad():
            posterior = model.encode(data["inputs"]["image"])
            decoded = model.decode(posterior.mean)
        for name, value in (("moments", posterior.parameters), ("posterior_mean", posterior.mean),
                            ("posterior_logvar", posterior.logvar), ("posterior_std", posterior.std)):
            assert_close_f32(value, expected[name])
        assert_close_f32(decoded, expected["decoded"], tol=1e-4)  # a deep decoder (TOLERANCES.md)
    assert model.config.encoder_attn_levels == () and model.config.decoder_attn_levels == ()


def test_diagonal_gaussian_clamps_samples_and_kl():
    moments = torch.cat((torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 50.0)), dim=1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max() == 20.0 and torch.equal(posterior.mode(), posterior.mean)
    standard = DiagonalGaussian(torch.zeros(2, 6, 2, 2))
    assert torch.equal(standard.kl(), torch.zeros(2)) and torch.equal(standard.kl(standard), torch.zeros(2))
    first = standard.sample(torch.Generator().manual_seed(3))
    assert torch.equal(first, standard.sample(torch.Generator().manual_seed(3)))
    shifted = DiagonalGaussian(torch.cat((torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)), dim=1))
    assert shifted.kl().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="`parameters` must be"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


def test_non_variational_posterior_has_official_unit_logvar():
    model = AutoencoderKL(TINY, use_variational=False).eval()
    assert model.quant_conv.out_channels == 4
    posterior = model.encode(smooth_images())
    assert torch.equal(posterior.logvar, torch.ones_like(posterior.mean))


def test_from_official_unwraps_training_checkpoints_and_files(golden, tmp_path):
    state_dict = golden("mar_vae.pt")["state_dict"]
    ema = {k: v + 1 if k == "post_quant_conv.bias" else v for k, v in state_dict.items()}
    checkpoint = {"model": state_dict, "model_ema": ema, "epoch": 3, "args": argparse.Namespace(vae_embed_dim=4)}
    path = tmp_path / "kl16.ckpt"
    torch.save(checkpoint, path)
    for source in (path, checkpoint, {"state_dict": state_dict}):
        model = AutoencoderKL.from_official(source)
        assert torch.equal(model.post_quant_conv.bias, state_dict["post_quant_conv.bias"])
    model = AutoencoderKL.from_official(path, ema=True)
    assert torch.equal(model.post_quant_conv.bias, state_dict["post_quant_conv.bias"] + 1)


def test_ldm_key_map_reverses_decoder_levels(golden):
    mapped = mar_vae_state_dict(golden("mar_vae.pt")["state_dict"])
    assert "decoder.conv_blocks.0.upsample.conv.weight" in mapped  # LDM's up.1 (lowest resolution)
    assert "decoder.conv_blocks.1.res.0.nin_shortcut.weight" in mapped  # LDM's up.0
    assert "encoder.mid.1.q.weight" in mapped and not any(".up." in k or ".down." in k for k in mapped)


def test_key_errors_name_the_keys(golden):
    data = golden("mar_vae.pt")
    state_dict = data["state_dict"]
    missing = {k: v for k, v in state_dict.items() if k != "encoder.mid.attn_1.q.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): encoder\.mid\.1\.q\.bias"):
        AutoencoderKL.from_official(missing, config=data["config"])
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): loss\.logvar"):
        AutoencoderKL.from_official({**state_dict, "loss.logvar": torch.zeros(())}, config=data["config"])
    with pytest.raises(CheckpointMismatchError, match=r"post_quant_conv\.weight: model \(16, 16, 1, 1\)"):
        AutoencoderKL.from_official(state_dict, config={**data["config"], "embed_dim": 16})


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = AutoencoderKL(TINY).eval()
    with pytest.raises(ValueError, match="`images` must have 3 channels"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="`images` must be a 4-D tensor"):
        model.encode(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="`images` must be a floating tensor"):
        model.encode(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`z` must be a floating tensor \[b, 4, h, w\]"):
        model.decode(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="multiples of 32"):
        AutoencoderKL(TINY, ch=48)


def test_save_load_round_trip(tmp_path):
    model, loaded = saved_and_reloaded(lambda: AutoencoderKL(TINY), tmp_path / "ours.pt")
    images = smooth_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, sample=False).recon, model(images, sample=False).recon,
                                   atol=0, rtol=0)


def test_training_steps_decrease_the_loss():
    torch.manual_seed(0)
    model = AutoencoderKL(replace(TINY, ch_mult=(1,), kl_weight=1e-3)).train()
    images = smooth_images()
    losses, out = train_steps(model, lambda step: model(images, generator=torch.Generator().manual_seed(step)))
    assert losses[-1] < losses[0] and out.kl > 0


def test_kl16_preset_has_the_official_parameter_count():
    with torch.device("meta"):
        assert sum(p.numel() for p in AutoencoderKL("KL-16").parameters()) == 66_456_019
