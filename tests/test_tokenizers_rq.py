"""DnD's RQ-VAE: golden outputs of the official code, shared-codebook loading, partial-depth
decoding, input checks, and EMA codebook training with dead-code restarts."""

from dataclasses import replace

import pytest
import torch

from mmgen_pytorch.pretrained import CheckpointMismatchError
from mmgen_pytorch.tokenizers import RQConfig, RQVAE

from _helpers import assert_close_f32, saved_and_reloaded, smooth_images, train_steps

TINY = RQConfig(embed_dim=8, n_embed=16, depth=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(),
                z_channels=8)


def test_golden_codes_decode_recon_and_commitment(golden):
    data = golden("dnd_rqvae.pt")
    expected = data["outputs"]
    model = RQVAE.from_official(data["state_dict"], config=data["config"]).eval()
    image = data["inputs"]["image"]
    with torch.no_grad():
        codes = model.encode_to_codes(image)
        decoded = model.decode_code(expected["codes"])
        out = model(image)
    assert torch.equal(codes, expected["codes"]) and torch.equal(out.codes, expected["codes"])
    assert_close_f32(decoded, expected["decoded"], tol=1e-4)  # a deep decoder (TOLERANCES.md)
    assert_close_f32(out.recon, expected["recon"], tol=1e-4)
    assert_close_f32(out.commitment_loss, expected["commitment_loss"])
    inferred = RQVAE.from_official(data["state_dict"]).config  # the architecture read off the weights
    assert inferred == model.config and inferred.attn_levels == (2,)


def test_partial_depth_decoding_sums_the_first_depths(golden):
    data = golden("dnd_rqvae.pt")
    model = RQVAE.from_official(data["state_dict"]).eval()
    codes = data["outputs"]["codes"]
    codebook = data["state_dict"]["quantizer.codebooks.0.weight"]
    torch.testing.assert_close(model.embed_code(codes).permute(0, 2, 3, 1), codebook[codes].sum(-2))
    torch.testing.assert_close(model.embed_code(codes, depth=1).permute(0, 2, 3, 1), codebook[codes[..., 0]])
    with torch.no_grad():
        coarse = model.decode_code(codes, depth=1)
        torch.testing.assert_close(model.decode_code(codes[..., :1]), coarse, atol=0, rtol=0)
        assert not torch.allclose(coarse, model.decode_code(codes), atol=1e-3)


def test_from_official_unwraps_checkpoints_and_files(golden, tmp_path):
    data = golden("dnd_rqvae.pt")
    state_dict = data["state_dict"]
    checkpoint = {"epoch": 1, "state_dict": state_dict, "optimizer": {}, "discriminator": {}}
    path = tmp_path / "epoch1_model.pt"
    torch.save(checkpoint, path)
    for source in (path, checkpoint, state_dict, {"model": state_dict}):
        model = RQVAE.from_official(source, config=data["config"])
        assert torch.equal(model.quantizer.codebook, state_dict["quantizer.codebooks.1.weight"][:-1])
        assert torch.equal(model.quantizer.cluster_size_ema, state_dict["quantizer.codebooks.0.cluster_size_ema"])


def with_codebook_copies(state_dict, depths):
    base = {k: v for k, v in state_dict.items() if not k.startswith("quantizer.codebooks.")}
    for d in range(depths):
        for name in ("weight", "embed_ema", "cluster_size_ema"):
            base[f"quantizer.codebooks.{d}.{name}"] = state_dict[f"quantizer.codebooks.0.{name}"]
    return base


def test_codebook_copies_must_match_the_depth_and_each_other(golden):
    data = golden("dnd_rqvae.pt")
    state_dict, config = data["state_dict"], data["config"]
    extra = r"depths \[0, 1, 2\].*unexpected \['quantizer\.codebooks\.2\.\*'\]"
    with pytest.raises(CheckpointMismatchError, match=extra):
        RQVAE.from_official(with_codebook_copies(state_dict, 3), config=config)
    with pytest.raises(CheckpointMismatchError, match=r"missing \['quantizer\.codebooks\.2\.\*'\]"):
        RQVAE.from_official(state_dict, config={**config, "code_shape": [4, 4, 3]})
    unshared = {**state_dict, "quantizer.codebooks.1.weight": state_dict["quantizer.codebooks.1.weight"] + 1}
    with pytest.raises(CheckpointMismatchError, match=r"`quantizer\.codebooks\.1\.weight` differs"):
        RQVAE.from_official(unshared, config=config)
    assert RQVAE.from_official(with_codebook_copies(state_dict, 3)).depth == 3  # inferred from the copies


def test_key_errors_name_the_keys(golden):
    data = golden("dnd_rqvae.pt")
    state_dict, config = data["state_dict"], data["config"]
    with pytest.raises(CheckpointMismatchError, match=r"quantizer\.codebook: model \(128, 16\) vs .* \(64, 16\)"):
        RQVAE.from_official(state_dict, config={**config, "n_embed": 128})
    missing = {k: v for k, v in state_dict.items() if k != "decoder.up.2.attn.1.proj_out.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): decoder\.conv_blocks\.0\.attn\.1\.proj_out"):
        RQVAE.from_official(missing, config=config)
    with pytest.raises(CheckpointMismatchError, match="no `quantizer.codebooks"):
        RQVAE.from_official({k: v for k, v in state_dict.items() if "codebooks" not in k})


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = RQVAE(TINY).eval()
    with pytest.raises(ValueError, match=r"`codes` must be code ids in \[0, 16\)"):
        model.decode_code(torch.full((1, 2, 2, 3), 16))
    with pytest.raises(ValueError, match=r"`codes` must be code ids in \[0, 16\)"):
        model.decode_code(torch.full((1, 2, 2, 3), -1))
    with pytest.raises(ValueError, match="`codes` must have 1..3 depth slices"):
        model.decode_code(torch.zeros(1, 2, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="`codes` must be a 4-D integer tensor"):
        model.decode_code(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`depth` must lie in \[1, 3\]"):
        model.decode_code(torch.zeros(1, 2, 2, 3, dtype=torch.long), depth=0)
    with pytest.raises(ValueError, match="`images` must have 3 channels"):
        model.encode_to_codes(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="`images` must be a 4-D tensor"):
        model.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="`loss_type`"):
        RQVAE(TINY, loss_type="huber")


def test_save_load_round_trip(tmp_path):
    model, loaded = saved_and_reloaded(lambda: RQVAE(TINY), tmp_path / "ours.pt")
    images = smooth_images()
    assert torch.equal(loaded.encode_to_codes(images), model.encode_to_codes(images))


def test_ema_updates_only_in_training_and_restarts_dead_codes():
    torch.manual_seed(0)
    # one depth: with a shared codebook, a code restarted at depth d is re-decayed (EMA count 0.99 < 1)
    # and restarted again at depth d + 1, as upstream; large batches keep real codes alive
    model = RQVAE(replace(TINY, ch_mult=(1,), depth=1))
    model.quantizer.codebook.add_(100.0)  # every codeword far from every latent: one code wins, others are dead
    images = smooth_images()
    before = model.quantizer.codebook.clone()
    model.eval()(images)
    model.train().encode_to_codes(images)
    assert torch.equal(model.quantizer.codebook, before)  # eval forward and encode_to_codes never update
    assert model.encode_to_codes(images)[..., 0].unique().numel() == 1
    model(images)  # one training forward: EMA step, dead codes restarted from batch latents
    assert not torch.equal(model.quantizer.codebook, before)
    assert (model.quantizer.cluster_size_ema >= 1).all()
    assert model.encode_to_codes(images)[..., 0].unique().numel() > 4


def test_training_steps_decrease_the_loss():
    torch.manual_seed(0)
    model = RQVAE(replace(TINY, ch_mult=(1,))).train()
    images = smooth_images()
    losses, _ = train_steps(model, lambda _: model(images))
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.encoder.parameters())  # commitment + straight-through reach it
