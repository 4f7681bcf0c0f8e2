"""Broken and foreign checkpoint files (issue 16): every loader names the file and says what is wrong
(empty / truncated / not valid JSON / not a checkpoint) instead of failing deep inside torch or
safetensors, and never suggests unsafe loading for a file that is not a checkpoint."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from mmgen_pytorch import Transformer, VQVAE, load_model
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
