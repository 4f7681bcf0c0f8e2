"""Checkpoints: save / load round trips of every model and tokenizer (bitwise equal outputs, plain JSON,
no pickle), their errors, and a training resume that is bit-identical to an uninterrupted run."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from ema_pytorch import EMA
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_flatten

from mmgen_pytorch import (MAR, RQVAE, VQVAE, AutoencoderKL, CaptionEncoder, Checkpointable, DnDTransformer, LlamaGen,
                           MonoFormer, RectifiedFlow, TextLoss, Transformer, Transfusion, load_model,
                           load_training_state, save_training_state)
from mmgen_pytorch.code_heads import DepthHeads
from mmgen_pytorch.pretrained import CheckpointMismatchError
from mmgen_pytorch.tokenizers import KLConfig, RQConfig, VQConfig

from _helpers import perturbed, smooth_images

TRANSFORMER = dict(dim=32, depth=2, heads=2, attn_backend="sdpa")
VQ = VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32,
              num_res_blocks=1, usage_window=64)
RQ = RQConfig(embed_dim=8, n_embed=16, depth=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=8)
KL = KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(), decoder_attn_levels=())


def tiny_transfusion(**kwargs):
    return Transfusion(**{**dict(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                                 transformer=dict(TRANSFORMER, dim_head=16)), **kwargs})


def tiny_mar(**kwargs):
    return MAR(**{**dict(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                         decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1, diffloss_width=32,
                         num_sampling_steps="4", diffusion_batch_mul=2), **kwargs})


def transfusion_batch():
    length = random.randint(2, 5)  # Python and NumPy draws too, so a resume must restore those RNGs
    scale = float(np.random.uniform(0.5, 1.5))
    return [[torch.randint(0, 32, (length,)), torch.randn(2, 2, 8) * scale, torch.randint(0, 32, (3,))],
            [torch.randint(0, 32, (4,)), torch.randn(2, 2, 8)]]


def mar_batch():
    return torch.randn(2, 4, 4, 4) * float(np.random.uniform(0.5, 1.5)), torch.randint(0, 10, (2,))


# name -> (build, run): `run(model)` is called under the same seeds for the saved and the loaded model
CASES = {
    "transfusion": (tiny_transfusion, lambda m: m(transfusion_batch(), return_breakdown=True)),
    "transfusion_backbone_instance": (
        lambda: tiny_transfusion(transformer=Transformer(**TRANSFORMER, dim_head=16, rotary_axes=2, dim_cond=32)),
        lambda m: m(transfusion_batch())),
    "monoformer": (
        lambda: MonoFormer(num_text_tokens=8, transformer=TRANSFORMER, latent_channels=4, latent_size=(4, 4),
                           patch_size=2, cfg_channels=3),
        lambda m: m([[torch.randint(0, 8, (3,)), torch.randn(4, 4, 4)],
                     [torch.randint(0, 8, (2,)), torch.randn(4, 4, 4)]], return_breakdown=True)),
    "llamagen_c2i": (
        lambda: LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, num_classes=5),
        lambda m: m(torch.randint(0, 24, (2, 3, 3)), class_labels=torch.tensor([1, 4]), return_logits=True)),
    "llamagen_t2i_caption_encoder": (
        lambda: LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, model_type="t2i", cls_token_num=6,
                         caption_encoder=CaptionEncoder(num_tokens=50, dim=16, depth=1, heads=2, max_seq_len=6)),
        lambda m: m(torch.randint(0, 24, (2, 3, 3)), caption_ids=torch.randint(1, 50, (2, 6)), return_logits=True)),
    "dnd": (
        lambda: DnDTransformer(dim=32, depth=4, heads=2, head_positions=[1, 3], vocab_size=24, grid_size=3,
                               num_classes=5),
        lambda m: m(torch.randint(0, 24, (2, 3, 3, 2)), class_labels=torch.tensor([0, 3]), return_logits=True)),
    "llamagen_depth_heads": (
        lambda: LlamaGen(dim=32, depth=3, heads=2, vocab_size=24, grid_size=3, num_classes=5,
                         code_heads=DepthHeads(dim=32, vocab_size=24, head_positions=(0, 2))),
        lambda m: m(torch.randint(0, 24, (2, 3, 3, 2)), class_labels=torch.tensor([0, 3]), return_logits=True)),
    "mar": (tiny_mar, lambda m: m(*mar_batch())),
    "vqvae": (lambda: VQVAE(VQ, codebook_size=24), lambda m: m(smooth_images(2, 8))),
    "rqvae": (lambda: RQVAE(RQ), lambda m: m(smooth_images(2, 8))),
    "autoencoder_kl": (lambda: AutoencoderKL(config=KL), lambda m: m(smooth_images(2, 8))),
}


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def tensors(output):
    return [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)]


@pytest.fixture
def no_pickle(monkeypatch):
    """Loading a model must not unpickle anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model load unpickled something")

    class RefusingUnpickler(pickle.Unpickler):
        load = refuse

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)


# round trips

@pytest.mark.parametrize("name", CASES)
def test_round_trip_gives_bitwise_equal_outputs(name, tmp_path, no_pickle):
    build, run = CASES[name]
    seed_everything(0)
    model = perturbed(build()).eval()
    folder = model.save(tmp_path / name)
    loaded = type(model).load(folder)

    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((folder / "config.json").read_text())
    assert record["class"] == type(model).__name__ and record["required"] == {}
    assert type(loaded) is type(model) and not loaded.training
    assert_same_model(model, loaded, run)


def test_load_model_builds_the_saved_class(tmp_path):
    folder = perturbed(CASES["dnd"][0]()).save(tmp_path / "dnd")
    loaded = load_model(folder)
    assert type(loaded) is DnDTransformer and loaded.head_positions == (1, 3)
    assert type(Checkpointable.load(folder)) is DnDTransformer


def test_config_records_the_outermost_constructor_and_survives_json(tmp_path):
    monoformer = CASES["monoformer"][0]().save(tmp_path / "mono")
    config = json.loads((monoformer / "config.json").read_text())["config"]
    assert config["latent_channels"] == 4 and config["latent_size"] == [4, 4] and "dim_latent" not in config
    assert MonoFormer.load(monoformer).latent_shape == (4, 4, 4)

    dnd = json.loads((CASES["dnd"][0]().save(tmp_path / "dnd") / "config.json").read_text())["config"]
    assert dnd["head_positions"] == [1, 3] and "model_type" not in dnd

    vq = VQVAE(VQ, codebook_size=24)
    loaded = VQVAE.load(vq.save(tmp_path / "vq"))
    assert loaded.config == vq.config and isinstance(loaded.config.encoder_ch_mult, tuple)

    backbone = CASES["transfusion_backbone_instance"][0]()
    nested = json.loads((backbone.save(tmp_path / "tf") / "config.json").read_text())["config"]["transformer"]
    assert nested["__module__"] == "mmgen_pytorch.backbone.transformer:Transformer"
    assert nested["config"]["dim_cond"] == 32


def test_model_dtype_is_kept(tmp_path):
    model = perturbed(tiny_mar()).to(torch.bfloat16)
    loaded = MAR.load(model.save(tmp_path / "bf16"))
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))


# errors

def test_loading_another_class_names_both(tmp_path):
    folder = tiny_mar().save(tmp_path / "mar")
    with pytest.raises(CheckpointMismatchError, match=r"holds a MAR checkpoint, not a LlamaGen.*MAR\.load"):
        LlamaGen.load(folder)


def test_arguments_json_cannot_hold_must_be_passed_again(tmp_path):
    vae = AutoencoderKL(KL)
    folder = tiny_mar(vae_embed_dim=4, vae=vae).save(tmp_path / "mar")
    assert json.loads((folder / "config.json").read_text())["required"] == {"vae": "AutoencoderKL"}
    with pytest.raises(TypeError, match=r"`vae` \(AutoencoderKL\).*MAR\.load\(path, vae=\.\.\.\)"):
        MAR.load(folder)
    assert MAR.load(folder, vae=vae).vae is vae
    assert MAR.load(folder, vae=None).vae is None

    encoder = tiny_transfusion(modality_encoder=nn.Identity()).save(tmp_path / "tf")
    with pytest.raises(TypeError, match=r"`modality_encoder` \(Identity\)"):
        Transfusion.load(encoder)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    folder = tiny_mar().save(tmp_path / "mar")
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): encoder\.layers\.1\."):
        MAR.load(folder, encoder_depth=2)

    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "stray.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \(1\): stray\.weight"):
        MAR.load(folder)


def test_config_cannot_name_arbitrary_classes(tmp_path):
    folder = VQVAE(VQ).save(tmp_path / "vq")
    record = json.loads((folder / "config.json").read_text())
    record["config"]["config"]["__dataclass__"] = "subprocess:Popen"
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointMismatchError, match="subprocess:Popen"):
        VQVAE.load(folder)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MAR.load(tmp_path)


# folders saved by earlier versions

# the key names before the output heads were their own part (`code_heads`); written out, not derived from
# the models' `legacy_keys`, so that the test does not check the renaming against itself
EARLIER_KEYS = {"code_heads.to_logits.": "to_logits.", "code_heads.depths.": "depth_heads."}
# and before each modality's layers were one module (Transfusion's per-layer lists, MonoFormer's own layers)
EARLIER_MODALITY_KEYS = {"modality_layers.0.embed_latent.": "latent_to_model.0.",
                         "modality_layers.1.embed_latent.": "latent_to_model.1.",
                         "modality_layers.0.to_output.": "model_to_latent.0.",
                         "modality_layers.1.to_output.": "model_to_latent.1.",
                         "modality_layers.1.pos_mlp.": "pos_emb.1.",
                         "modality_layers.0.x_embedder.": "x_embedder.",
                         "modality_layers.0.final_layer.": "final_layer."}


def with_earlier_keys(file, earlier=EARLIER_KEYS):
    """Rewrite a safetensors file in the key layout of earlier versions."""
    weights = load_file(file)
    renamed = {}
    for key, tensor in weights.items():
        prefix = next((p for p in earlier if key.startswith(p)), None)
        renamed[earlier[prefix] + key[len(prefix):] if prefix else key] = tensor
    assert renamed.keys() != weights.keys()
    save_file(renamed, file, metadata={"format": "pt"})
    return set(renamed)


@pytest.mark.parametrize("name", ["llamagen_c2i", "dnd"])
def test_folders_saved_with_the_earlier_head_keys_load_bit_exactly(name, tmp_path):
    build, run = CASES[name]
    seed_everything(0)
    model = perturbed(build()).eval()
    folder = model.save(tmp_path / name)
    record = json.loads((folder / "config.json").read_text())
    record["config"].pop("code_heads", None)  # earlier versions had no such argument
    (folder / "config.json").write_text(json.dumps(record))
    keys = with_earlier_keys(folder / "model.safetensors")
    assert {"to_logits.weight"} <= keys if name == "llamagen_c2i" else {"depth_heads.1.norm.weight"} <= keys

    assert_same_model(model, type(model).load(folder), run)


def test_transfusion_folders_of_earlier_versions_load_bit_exactly(tmp_path):
    """Earlier Transfusion folders: flow options as constructor arguments, a bool `flat_positions` and
    `text_loss_on_modality_rows`, and one list of layers per kind."""
    seed_everything(0)
    model = perturbed(tiny_transfusion(dim_latent=(8, 6), modality_default_shape=[(2, 2), (3,)],
                                       add_pos_emb=[False, True],
                                       objective=RectifiedFlow(time_sampling="logit_normal", ode_method="rk4"))).eval()
    folder = model.save(tmp_path / "transfusion")
    record = json.loads((folder / "config.json").read_text())
    assert record["config"]["objective"]["config"]["time_sampling"] == "logit_normal"  # saved as an object now
    config = record["config"]
    for name in ("objective", "positions", "text_loss", "modalities", "max_prompt_length"):
        config.pop(name)
    config.update(time_sampling="logit_normal", ode_method="rk4", ode_kwargs=None, flat_positions=False,
                  text_loss_on_modality_rows=True)
    (folder / "config.json").write_text(json.dumps(record))
    assert {"latent_to_model.1.weight", "pos_emb.1.0.weight"} <= with_earlier_keys(folder / "model.safetensors",
                                                                                   EARLIER_MODALITY_KEYS)

    loaded = Transfusion.load(folder)
    assert (loaded.objective.time_sampling, loaded.objective.ode_method) == ("logit_normal", "rk4")
    assert loaded.placement == model.placement and loaded.text_loss is TextLoss.ALL_ROWS
    assert_same_model(model, loaded, lambda m: m([[torch.randint(0, 32, (3,)), torch.randn(2, 2, 8)],
                                                  [(1, torch.randn(3, 6)), torch.randint(0, 32, (2,))]],
                                                 return_breakdown=True))


def test_monoformer_folders_with_the_earlier_image_layer_keys_load_bit_exactly(tmp_path):
    build, run = CASES["monoformer"]
    seed_everything(0)
    model = perturbed(build()).eval()
    folder = model.save(tmp_path / "monoformer")
    assert {"x_embedder.weight", "final_layer.linear.bias"} <= with_earlier_keys(folder / "model.safetensors",
                                                                                EARLIER_MODALITY_KEYS)
    assert_same_model(model, MonoFormer.load(folder), run)


def assert_same_model(model, loaded, run):
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    outputs = []
    for candidate in (model, loaded):
        seed_everything(1)
        outputs.append(tensors(run(candidate)))
    assert len(outputs[0]) > 0 and len(outputs[0]) == len(outputs[1])
    for a, b in zip(*outputs):  # bitwise; NaN (a per-sample loss a sample does not have) equals NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_training_states_saved_with_the_earlier_head_keys_resume(tmp_path):
    build = CASES["dnd"][0]
    seed_everything(0)
    model, optimizer, scheduler, ema = training_objects(lambda: perturbed(build()))
    for _ in range(2):
        loss = model.train()(torch.randint(0, 24, (2, 3, 3, 2)), class_labels=torch.tensor([0, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update()
    folder = save_training_state(tmp_path / "state", model=model, optimizer=optimizer, step=2, ema=ema,
                                 scheduler=scheduler)
    for file in ("model.safetensors", "ema.safetensors"):
        assert "depth_heads.0.to_logits.weight" in with_earlier_keys(folder / file)

    seed_everything(123)
    fresh = training_objects(build)
    assert load_training_state(folder, model=fresh[0], optimizer=fresh[1], ema=fresh[3], scheduler=fresh[2]) == 2
    for (key, a), (_, b) in zip(model.state_dict().items(), fresh[0].state_dict().items()):
        assert torch.equal(a, b), key
    for (key, a), (_, b) in zip(ema.state_dict().items(), fresh[3].state_dict().items()):
        assert torch.equal(a, b), key
    for index, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(state[k], fresh[1].state_dict()["state"][index][k]) for k in state)


# training resume

def train(model, optimizer, scheduler, ema, batches, steps):
    model.train()
    for _ in range(steps):
        batch = batches()
        loss = model(batch) if isinstance(batch, list) else model(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update()


def training_objects(build):
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    ema = EMA(model, beta=0.9, update_after_step=1, update_every=1)
    return model, optimizer, scheduler, ema


@pytest.mark.parametrize("build, batches", [(lambda: tiny_transfusion(prob_uncond=0.5), transfusion_batch),
                                            (lambda: tiny_mar(attn_dropout=0.2, proj_dropout=0.2), mar_batch)],
                         ids=["transfusion", "mar"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(build, batches, tmp_path):
    steps = 3
    seed_everything(0)
    straight = training_objects(build)
    train(*straight, batches, 2 * steps)

    seed_everything(0)
    first = training_objects(build)
    train(*first, batches, steps)
    model, optimizer, scheduler, ema = first
    folder = save_training_state(tmp_path / "state", model=model, optimizer=optimizer, step=steps, ema=ema,
                                 scheduler=scheduler)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors",
                                                        "training_state.pt"]
    torch.load(folder / "training_state.pt", weights_only=True)

    seed_everything(123)  # a fresh process: other weights, other RNG states
    model, optimizer, scheduler, ema = resumed = training_objects(build)
    assert load_training_state(folder, model=model, optimizer=optimizer, ema=ema, scheduler=scheduler) == steps
    train(*resumed, batches, steps)

    for (name, a), (_, b) in zip(straight[0].named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(straight[3].state_dict().items(), ema.state_dict().items()):
        assert torch.equal(a, b), name
    expected, got = straight[1].state_dict(), optimizer.state_dict()
    assert expected["param_groups"] == got["param_groups"]
    for index, state in expected["state"].items():
        assert all(torch.equal(state[k], got["state"][index][k]) for k in state)
    assert straight[2].state_dict() == scheduler.state_dict()
    # the model part of a training-state folder loads on its own too
    assert all(torch.equal(a.cpu(), b) for a, b in zip(first[0].parameters(), type(first[0]).load(folder).parameters()))


def test_training_state_parts_must_match(tmp_path):
    model, optimizer, scheduler, ema = training_objects(tiny_mar)
    folder = save_training_state(tmp_path / "state", model=model, optimizer=optimizer, step=0)
    with pytest.raises(ValueError, match="`scheduler` was given"):
        load_training_state(folder, model=model, optimizer=optimizer, scheduler=scheduler)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_training_state(folder, model=tiny_mar(encoder_depth=2), optimizer=optimizer)
    with pytest.raises(TypeError, match="`step`"):
        save_training_state(folder, model=model, optimizer=optimizer, step=1.5)
