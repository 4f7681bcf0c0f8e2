"""LlamaGen's VQ tokenizer: golden outputs of the official code, official checkpoint loading, input
checks and a training step."""

import argparse
from dataclasses import replace

import pytest
import torch

from mmgen_pytorch.pretrained import CheckpointMismatchError
from mmgen_pytorch.tokenizers import VQConfig, VQVAE
from mmgen_pytorch.tokenizers.vq import infer_vq_config

from _helpers import assert_close_f32, smooth_images, train_steps

TINY = VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                z_channels=32, num_res_blocks=1, usage_window=256)


class Opaque:
    """Stands for objects weights_only loading refuses (e.g. omegaconf configs in a checkpoint)."""


def test_golden_quant_indices_decode_and_recon(golden):
    data = golden("llamagen_vq.pt")
    model = VQVAE.from_official(data["state_dict"], config=data["config"]).eval()
    image, expected = data["inputs"]["image"], data["outputs"]
    with torch.no_grad():
        quant, losses, indices = model.encode(image)
        recon = model(image).recon
        decoded = model.decode_code(expected["indices"], shape=(2, 8, 8, 8))
    assert torch.equal(indices.flatten(), expected["indices"])
    assert torch.equal(model.encode_to_indices(image), expected["indices"].view(2, 8, 8))
    assert_close_f32(quant, expected["quant"])
    assert_close_f32(decoded, expected["decoded"], tol=1e-4)  # a deep decoder (TOLERANCES.md)
    assert_close_f32(recon, expected["recon"], tol=1e-4)
    assert losses.entropy == 0 and losses.commit.item() == pytest.approx(0.25 * losses.vq.item())
    assert infer_vq_config(data["state_dict"]) == model.config  # the architecture read off the weights


def test_decode_code_accepts_grid_sequence_and_flat_layouts():
    model = VQVAE(TINY).eval()
    codes = torch.randint(0, 16, (2, 3, 3))
    with torch.no_grad():
        grid = model.decode_code(codes)
        for flat, shape in ((codes.view(2, 9), None), (codes.view(2, 9), (3, 3)), (codes.flatten(), (2, 4, 3, 3))):
            torch.testing.assert_close(model.decode_code(flat, shape=shape), grid, atol=0, rtol=0)
    assert grid.shape == (2, 3, 6, 6)


def test_from_official_unwraps_training_checkpoints_and_files(tmp_path):
    torch.manual_seed(0)
    reference = VQVAE(TINY)
    state_dict = reference.state_dict()
    ema = {k: v + 1 if k == "quant_conv.bias" else v for k, v in state_dict.items()}
    checkpoint = {"model": state_dict, "ema": ema, "optimizer": {}, "steps": 7,
                  "args": argparse.Namespace(vq_model="VQ-16", codebook_size=16)}
    path = tmp_path / "vq.pt"
    torch.save(checkpoint, path)
    for source in (path, str(path), checkpoint, {"state_dict": state_dict}, {"module": state_dict}, state_dict):
        model = VQVAE.from_official(source, config=TINY)
        assert torch.equal(model.quant_conv.bias, reference.quant_conv.bias)
    assert torch.equal(VQVAE.from_official(path, ema=True).quant_conv.bias, reference.quant_conv.bias + 1)
    ema_only = {"ema": ema, "steps": 7}  # a checkpoint of EMA weights alone unwraps without ema=True
    assert torch.equal(VQVAE.from_official(ema_only, config=TINY).quant_conv.bias, reference.quant_conv.bias + 1)


def test_key_errors_name_the_keys():
    state_dict = VQVAE(TINY).state_dict()
    missing = {k: v for k, v in state_dict.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): decoder\.conv_out\.bias"):
        VQVAE.from_official(missing, config=TINY)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): quantize\.extra"):
        VQVAE.from_official({**state_dict, "quantize.extra": torch.zeros(1)}, config=TINY)
    with pytest.raises(CheckpointMismatchError, match=r"quantize\.embedding\.weight: model \(32, 4\)"):
        VQVAE.from_official(state_dict, config=replace(TINY, codebook_size=32))
    without_conv_in = {k: v for k, v in state_dict.items() if k != "encoder.conv_in.weight"}
    with pytest.raises(CheckpointMismatchError, match="no 'encoder.conv_in.weight' key; pass `config=`"):
        VQVAE.from_official(without_conv_in)


def test_unsafe_checkpoint_files_are_refused_with_a_hint(tmp_path):
    torch.save({"model": VQVAE(TINY).state_dict(), "config": Opaque()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointMismatchError, match="weights_only=False"):
        VQVAE.from_official(tmp_path / "unsafe.pt", config=TINY)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = VQVAE(TINY).eval()
    with pytest.raises(ValueError, match="`images` must have 3 channels"):
        model.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="`images` must be a 4-D tensor"):
        model.encode_to_indices(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"`indices` must be code ids in \[0, 16\)"):
        model.decode_code(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match="`indices` must be an integer tensor"):
        model.decode_code(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="not a square grid"):
        model.decode_code(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="`quant` must be a floating tensor"):
        model.decode(torch.zeros(1, 5, 2, 2))
    with pytest.raises(ValueError, match="unknown preset"):
        VQVAE("VQ-32")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    loaded = VQVAE.from_official(tmp_path / "ours.pt", config=TINY).eval()
    images = smooth_images()
    assert torch.equal(loaded.encode_to_indices(images), model.encode_to_indices(images))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).recon, model(images).recon, atol=0, rtol=0)


def test_training_steps_decrease_the_loss_and_log_usage():
    torch.manual_seed(0)
    model = VQVAE(TINY, encoder_ch_mult=(1,), decoder_ch_mult=(1,), entropy_loss_ratio=0.1).train()
    images = smooth_images()
    losses, out = train_steps(model, lambda _: model(images))
    assert losses[-1] < losses[0]
    assert out.quantizer.entropy != 0 and 0 < out.quantizer.usage <= 1
    assert torch.equal(model.quantize.codebook_used[-128:], out.indices.flatten().float())


def test_presets_have_the_official_parameter_counts():
    with torch.device("meta"):
        assert sum(p.numel() for p in VQVAE("VQ-16").parameters()) == 71_883_403
        assert sum(p.numel() for p in VQVAE("VQ-8").parameters()) == 70_109_835
