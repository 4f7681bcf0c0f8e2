"""Broken and foreign checkpoint files (issue 16): every loader names the file and says what is wrong
(empty / truncated / not valid JSON / not a checkpoint) instead of failing deep inside torch or
safetensors, never suggests unsafe loading for a file that is not a checkpoint, and
``load_training_state`` checks everything before it changes anything."""

import copy
import json
import re

import pytest
import torch
from ema_pytorch import EMA
from safetensors.torch import save_file

from mmgen_pytorch import Transformer, VQVAE, load_model, load_training_state, save_training_state
from mmgen_pytorch.pretrained import (CheckpointFileError, CheckpointMismatchError, load_checkpoint,
                                     read_checkpoint)
from mmgen_pytorch.tokenizers import VQConfig

HTML = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# name -> (how the file is broken, what the message must say after naming the file)
BROKEN = {
    "truncated": (half, "truncated"),
    "empty": (lambda path: path.write_bytes(b""), r"empty \(0 bytes\)"),
    "html": (lambda path: path.write_text(HTML), "not a checkpoint: it is an HTML"),
    "text": (lambda path: path.write_text("hello"), "not a checkpoint: it is a text file starting 'hello'"),
}


def named(path, what):
    """The message names the file (quoted), then says what is wrong."""
    return re.escape(repr(str(path))) + ".*" + what


class Opaque:
    """A class weights-only loading does not know."""


@pytest.fixture
def refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a file that is not a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)


def tiny_backbone():
    return Transformer(dim=16, depth=1, heads=2, dim_head=8)


# Checkpointable.load: config.json and model.safetensors

@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_weights_file_is_named(broken, tmp_path, refuse_unpickling):
    folder = tiny_backbone().save(tmp_path / "model")
    damage, what = BROKEN[broken]
    damage(folder / "model.safetensors")
    with pytest.raises(CheckpointFileError, match=named(folder / "model.safetensors", what)) as error:
        load_model(folder)
    assert "weights_only" not in str(error.value)


def test_a_torch_file_in_place_of_safetensors_is_named(tmp_path):
    folder = tiny_backbone().save(tmp_path / "model")
    torch.save(tiny_backbone().state_dict(), folder / "model.safetensors")
    with pytest.raises(CheckpointFileError, match=named(folder / "model.safetensors", "is torch.save output.*"
                                                                                        "expected safetensors")):
        Transformer.load(folder)


@pytest.mark.parametrize("content, what", [
    (None, r"not valid JSON at line \d+, column \d+ where the text ends, so the file is probably truncated"),
    ("", "is empty"),
    ("hello", "not valid JSON at line 1, column 1"),
    (HTML, "not valid JSON at line 1, column 1"),
])
def test_a_broken_config_is_named_with_the_line(content, what, tmp_path):
    folder = tiny_backbone().save(tmp_path / "model")
    if content is None:
        half(folder / "config.json")
    else:
        (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointFileError, match=named(folder / "config.json", what)):
        load_model(folder)


def test_a_malformed_config_record_is_named(tmp_path):
    folder = VQVAE(VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                            z_channels=32, num_res_blocks=1)).save(tmp_path / "vq")
    record = json.loads((folder / "config.json").read_text())
    record["config"]["config"].pop("fields")  # a tagged dataclass without its fields
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointFileError, match=named(folder / "config.json", "malformed `config` entry")):
        VQVAE.load(folder)

    (folder / "config.json").write_text(json.dumps({**record, "required": ["vae"]}))
    with pytest.raises(CheckpointMismatchError, match="config.json is not a config.json this version"):
        VQVAE.load(folder)


# official checkpoints (.pth / .pt / .safetensors) through read_checkpoint / load_checkpoint

def torch_file(path, legacy=False, **extra):
    torch.save({"model": tiny_backbone().state_dict(), **extra}, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_torch_checkpoint_is_named(legacy, tmp_path):
    path = torch_file(tmp_path / "ckpt.pth", legacy)
    half(path)
    with pytest.raises(CheckpointFileError, match=named(path, "truncated")) as error:
        load_checkpoint(path)
    assert "weights_only" not in str(error.value)


@pytest.mark.parametrize("broken", ["empty", "html", "text"])
def test_a_file_that_is_not_a_checkpoint_is_never_unpickled(broken, tmp_path, refuse_unpickling):
    path = tmp_path / "checkpoint-last.pth"
    damage, what = BROKEN[broken]
    damage(path)
    for load in (load_checkpoint, read_checkpoint, lambda p: VQVAE.from_official(p)):
        with pytest.raises(CheckpointFileError, match=named(path, what)) as error:
            load(path)
        assert "weights_only" not in str(error.value) and "safe_globals" not in str(error.value)


def test_a_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=named(tmp_path / "nope.pth", "does not exist")):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_unsafe_globals_of_a_real_checkpoint_are_named_and_the_advice_works(legacy, tmp_path):
    path = torch_file(tmp_path / "ckpt.pth", legacy, config=Opaque())
    with pytest.raises(CheckpointMismatchError, match=named(path, "is a PyTorch checkpoint")) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert f"{__name__}.Opaque" in message and "torch.serialization.add_safe_globals" in message
    assert not isinstance(error.value, CheckpointFileError)
    with torch.serialization.safe_globals([Opaque]):  # what the message advises, for a trusted class
        assert load_checkpoint(path).keys() == tiny_backbone().state_dict().keys()


def test_a_checkpoint_that_is_not_a_mapping_is_named(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointMismatchError, match=named(tmp_path / "tensor.pt", "holds a Tensor, not a state")):
        load_checkpoint(tmp_path / "tensor.pt")


def test_safetensors_checkpoints_load_too(tmp_path):
    state_dict = tiny_backbone().state_dict()
    save_file(state_dict, tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "model.safetensors")
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


# load_training_state: check everything, then change anything

def training_objects(seed, *, ema=True):
    torch.manual_seed(seed)
    model = tiny_backbone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    objects = dict(model=model, optimizer=optimizer, scheduler=scheduler,
                   ema=EMA(model, beta=0.9, update_after_step=0, update_every=1) if ema else None)
    loss = sum(p.square().sum() for p in model.parameters())  # every parameter gets optimizer state
    loss.backward()
    optimizer.step()
    scheduler.step()
    if ema:
        objects["ema"].update()
    return objects


def snapshot(objects):
    return dict(model=copy.deepcopy(objects["model"].state_dict()),
                optimizer=copy.deepcopy(objects["optimizer"].state_dict()),
                scheduler=copy.deepcopy(objects["scheduler"].state_dict()),
                ema=copy.deepcopy(objects["ema"].state_dict()) if objects["ema"] is not None else None,
                rng=torch.get_rng_state())


def assert_identical(before, after, where="objects"):
    """Bit-identical tensors (torch.equal), equal everything else, at every level."""
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and before.dtype == after.dtype and torch.equal(before, after), where
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), where
        for key in before:
            assert_identical(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), where
        for index, (a, b) in enumerate(zip(before, after)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert before == after, where


def rewrite_training_state(folder, change):
    state = torch.load(folder / "training_state.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "training_state.pt")


def reversed_optimizer(objects):
    objects["optimizer"] = torch.optim.AdamW(list(objects["model"].parameters())[::-1], lr=1e-2)
    objects["scheduler"] = torch.optim.lr_scheduler.LambdaLR(objects["optimizer"], lambda step: 1.0)


# name -> (saved with EMA?, how the folder or the targets are changed, error, what the message says)
FAILURES = {
    "saved_without_ema": (False, None, ValueError, r"`ema` was given but '.*training_state\.pt' holds no ema"),
    "truncated_state": (True, lambda f, o: half(f / "training_state.pt"), CheckpointFileError,
                        r"training_state\.pt' is truncated"),
    "html_state": (True, lambda f, o: (f / "training_state.pt").write_text(HTML), CheckpointFileError,
                   r"training_state\.pt' is not a checkpoint: it is an HTML"),
    "empty_state": (True, lambda f, o: (f / "training_state.pt").write_bytes(b""), CheckpointFileError,
                    r"training_state\.pt' is empty"),
    "truncated_ema_weights": (True, lambda f, o: half(f / "ema.safetensors"), CheckpointFileError,
                              r"ema\.safetensors' is truncated"),
    "missing_ema_weights": (True, lambda f, o: (f / "ema.safetensors").unlink(), FileNotFoundError,
                            r"ema\.safetensors' does not exist"),
    "other_optimizer_class": (True, lambda f, o: o.update(optimizer=torch.optim.SGD(o["model"].parameters(), lr=1,
                                                                                    momentum=0.9)),
                              CheckpointMismatchError, r"optimizer parameter group 0 .*another class"),
    "optimizer_in_other_order": (True, lambda f, o: reversed_optimizer(o), CheckpointMismatchError,
                                 r"`exp_avg` of parameter \d+ has shape .*another order"),
    "other_scheduler_class": (True, lambda f, o: o.update(scheduler=torch.optim.lr_scheduler.StepLR(o["optimizer"], 2)),
                              CheckpointMismatchError, r"scheduler state .*another class"),
    "misshapen_rng_state": (True, lambda f, o: rewrite_training_state(f, lambda s: s["rng"].update(
        torch=torch.zeros(3, dtype=torch.uint8))), CheckpointMismatchError, r"`rng\.torch` in .* expected Tensor"),
    "ema_counters_missing": (True, lambda f, o: rewrite_training_state(f, lambda s: s["ema"].pop("step")),
                             CheckpointMismatchError, r"missing \(1\): step"),
}


@pytest.mark.parametrize("name", FAILURES)
def test_a_failed_resume_changes_nothing(name, tmp_path):
    with_ema, change, error, what = FAILURES[name]
    saved = training_objects(0, ema=with_ema)
    folder = save_training_state(tmp_path / "state", step=1, **saved)
    objects = training_objects(1)
    if change is not None:
        change(folder, objects)
    before = snapshot(objects)
    with pytest.raises(error, match=what):
        load_training_state(folder, **objects)
    assert_identical(before, snapshot(objects))


def test_a_resume_after_the_checks_restores_everything(tmp_path):
    saved = training_objects(0)
    folder = save_training_state(tmp_path / "state", step=7, **saved)
    expected = snapshot(saved)
    objects = training_objects(1)
    assert load_training_state(folder, **objects) == 7
    got = snapshot(objects)
    got["rng"] = expected["rng"]  # restored to the state at save time, checked in test_checkpoint.py
    assert_identical(expected, got)


def test_rng_states_are_only_checked_when_restored(tmp_path):
    folder = save_training_state(tmp_path / "state", step=3, **training_objects(0))
    rewrite_training_state(folder, lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)))
    assert load_training_state(folder, **training_objects(1), restore_rng=False) == 3


def test_monoformer_from_llama_names_a_broken_weights_or_config_file(tmp_path):
    from mmgen_pytorch.pretrained.llama_hf import read_llama_config, read_llama_state_dict
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_text("<!DOCTYPE html><html>404</html>")
    config.write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointFileError, match="model.safetensors.*not a checkpoint.*HTML"):
        read_llama_state_dict(weights)
    with pytest.raises(CheckpointFileError, match="config.json.*not valid JSON.*truncated"):
        read_llama_config(config)
