"""Hugging Face Hub conventions: save_pretrained / from_pretrained / push_to_hub over the folders `save` writes,
offline (the Hub download and upload calls are replaced by fakes that read or write local folders)."""

import re
import sys
from types import SimpleNamespace

import huggingface_hub
import pytest

from mmgen_pytorch import MAR, AutoencoderKL, Checkpointable, LlamaGen, load_model
from mmgen_pytorch._utils import install_hint
from mmgen_pytorch.files import CheckpointMismatchError

from _helpers import perturbed
from test_checkpoint import CASES, KL, assert_same_model, no_pickle, seed_everything, tiny_mar  # noqa: F401

FIVE_MODELS_THREE_TOKENIZERS = ["transfusion", "monoformer", "mar", "llamagen_c2i", "dnd", "vqvae", "rqvae",
                                "autoencoder_kl"]
SAVED_FILES = ["config.json", "model.safetensors"]
NO_HUB = "needs huggingface_hub.*" + re.escape(install_hint("hub"))


def built(name):
    seed_everything(0)
    return perturbed(CASES[name][0]()).eval()


def file_bytes(folder):
    return {name: (folder / name).read_bytes() for name in SAVED_FILES}


@pytest.fixture
def without_hub(monkeypatch):
    """``import huggingface_hub`` raises ImportError, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)


@pytest.fixture
def fake_download(monkeypatch):
    """``huggingface_hub.snapshot_download`` serving local folders: {repo id: folder}; its calls are recorded."""
    repos, calls = {}, []

    def snapshot_download(repo_id, **kwargs):
        calls.append(dict(kwargs, repo_id=repo_id))
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return SimpleNamespace(repos=repos, calls=calls)


# round trips

@pytest.mark.parametrize("name", FIVE_MODELS_THREE_TOKENIZERS)
def test_save_pretrained_writes_what_save_writes_and_loads_back(name, tmp_path, no_pickle):
    model = built(name)
    model.save_pretrained(tmp_path / "hub")
    loaded = type(model).from_pretrained(tmp_path / "hub")

    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", *SAVED_FILES]
    assert file_bytes(tmp_path / "hub") == file_bytes(model.save(tmp_path / "saved"))
    assert type(loaded) is type(model) and not loaded.training
    assert_same_model(model, loaded, CASES[name][1])


def test_folders_of_save_and_save_pretrained_are_interchangeable(tmp_path):
    model = built("dnd")
    assert_same_model(model, type(model).from_pretrained(model.save(tmp_path / "saved")), CASES["dnd"][1])
    model.save_pretrained(tmp_path / "hub")
    assert_same_model(model, type(model).load(tmp_path / "hub"), CASES["dnd"][1])
    assert type(load_model(tmp_path / "hub")) is type(Checkpointable.from_pretrained(tmp_path / "hub")) is type(model)


def test_required_arguments_pass_through_and_the_card_names_them(tmp_path):
    vae = AutoencoderKL(KL)
    tiny_mar(vae=vae).save_pretrained(tmp_path / "mar")
    with pytest.raises(TypeError, match=r"`vae` \(AutoencoderKL\).*MAR\.load\(path, vae=\.\.\.\)"):
        MAR.from_pretrained(tmp_path / "mar")
    assert MAR.from_pretrained(tmp_path / "mar", vae=vae).vae is vae
    card = (tmp_path / "mar" / "README.md").read_text()
    assert f'MAR.from_pretrained("{tmp_path / "mar"}", vae=...)' in card and "`vae`: AutoencoderKL" in card


def test_model_card_names_the_library_and_the_class(tmp_path):
    built("vqvae").save_pretrained(tmp_path / "vq")
    card = huggingface_hub.ModelCard.load(tmp_path / "vq" / "README.md")
    assert card.data.library_name == "mmgen-pytorch" and "mmgen-pytorch" in card.data.tags
    assert "# VQVAE" in card.text and "from mmgen_pytorch.tokenizers.vq import VQVAE" in card.text


# the Hub, offline

def test_repo_id_is_downloaded_then_loaded_the_same_way(tmp_path, fake_download, no_pickle):
    model = built("llamagen_c2i")
    fake_download.repos["someone/tiny-llamagen"] = model.save(tmp_path / "snapshot")
    loaded = LlamaGen.from_pretrained("someone/tiny-llamagen", revision="v1", map_location="cpu")

    (call,) = fake_download.calls
    assert call["repo_id"] == "someone/tiny-llamagen" and call["revision"] == "v1"
    assert set(call["allow_patterns"]) == set(SAVED_FILES) and call["library_name"] == "mmgen-pytorch"
    assert_same_model(model, loaded, CASES["llamagen_c2i"][1])


@pytest.mark.parametrize("via", ["push_to_hub", "save_pretrained"])
def test_push_to_hub_uploads_the_saved_folder(via, tmp_path, monkeypatch):
    model, uploads = built("mar"), []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # the folder is temporary: read it now
        uploads.append(dict(kwargs, repo_id=repo_id, files=sorted(p.name for p in folder_path.iterdir()),
                            loaded=MAR.from_pretrained(folder_path),
                            card=(folder_path / "README.md").read_text()))
        return "https://huggingface.co/someone/tiny-mar/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    if via == "push_to_hub":
        url = model.push_to_hub("someone/tiny-mar", commit_message="tiny MAR")
    else:
        url = model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/tiny-mar",
                                    commit_message="tiny MAR")
        assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["README.md", *SAVED_FILES]

    (upload,) = uploads
    assert url.endswith("/commit/0") and upload["repo_id"] == "someone/tiny-mar"
    assert upload["commit_message"] == "tiny MAR" and upload["files"] == ["README.md", *SAVED_FILES]
    assert 'MAR.from_pretrained("someone/tiny-mar")' in upload["card"]
    assert_same_model(model, upload["loaded"], CASES["mar"][1])


# errors

def test_missing_weights_and_another_class_are_refused(tmp_path, fake_download):
    folder = tmp_path / "mar"
    tiny_mar().save_pretrained(folder)
    with pytest.raises(CheckpointMismatchError, match=r"holds a MAR checkpoint, not a LlamaGen.*MAR\.load"):
        LlamaGen.from_pretrained(folder)
    fake_download.repos["someone/mar"] = folder
    with pytest.raises(CheckpointMismatchError, match=r"holds a MAR checkpoint, not a LlamaGen"):
        LlamaGen.from_pretrained("someone/mar")

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*does not exist"):
        MAR.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*does not exist"):
        MAR.from_pretrained("someone/mar")


def test_a_source_that_is_neither_folder_nor_repo_id_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no folder '.*missing'.*not a Hub repo id"):
        MAR.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no folder './checkpoints/mar'"):
        MAR.from_pretrained("./checkpoints/mar")
    with pytest.raises(TypeError, match=r"folder or a Hub repo id .*got int"):
        MAR.from_pretrained(3)
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match=r"file\.json' is a file"):
        MAR.from_pretrained(str(tmp_path / "file.json"))


# huggingface_hub is optional

def test_local_folders_need_no_huggingface_hub(tmp_path, without_hub):
    model = built("rqvae")
    assert model.save_pretrained(tmp_path / "rq") is None
    assert sorted(p.name for p in (tmp_path / "rq").iterdir()) == SAVED_FILES  # no model card without the Hub
    assert_same_model(model, type(model).from_pretrained(tmp_path / "rq"), CASES["rqvae"][1])


def test_hub_calls_without_huggingface_hub_name_the_extra(tmp_path, without_hub):
    model = built("rqvae")
    with pytest.raises(ImportError, match=NO_HUB):
        type(model).from_pretrained("someone/tiny-rq")
    with pytest.raises(ImportError, match=NO_HUB):
        model.push_to_hub("someone/tiny-rq")
    with pytest.raises(ImportError, match=NO_HUB):
        model.save_pretrained(tmp_path / "rq", push_to_hub=True)
    assert not (tmp_path / "rq").exists()  # refused before writing anything
