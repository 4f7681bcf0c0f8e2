"""Sampling at scale (mmgen_pytorch.evaluation.sampling, mmgen_pytorch.sample) and ADM's .npz format, on tiny
untrained models: class balance, resume after an interruption == one uninterrupted run, 2 shards == 1
shard (byte-identical PNGs), the settings of a folder kept, and bad arguments / flags refused by name
before any model is loaded or any image drawn."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("PIL")

from mmgen_pytorch import LlamaGen, MAR, Transfusion  # noqa: E402
from mmgen_pytorch.evaluation import sampling  # noqa: E402
from mmgen_pytorch.evaluation.adm_npz import load_adm_npz, save_adm_npz, save_adm_npz_from_pngs  # noqa: E402
from mmgen_pytorch.evaluation.sampling import balanced_labels, sample_images  # noqa: E402
from mmgen_pytorch.tokenizers import VQVAE, AutoencoderKL, KLConfig, VQConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERATE_IMAGES = sampling.generate_images


def tiny_kwargs(name: str) -> dict:
    return yaml.safe_load((ROOT / "mmgen_pytorch" / "configs" / f"{name}.yaml").read_text())["model"]["kwargs"]


@pytest.fixture(scope="module")
def llamagen():
    """A tiny c2i LlamaGen (4 classes, 4x4 codes of 16) and its VQ tokenizer (32x32 images)."""
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2, 2, 2),
                        decoder_ch_mult=(1, 2, 2, 2), z_channels=16, num_res_blocks=1, usage_window=256)).eval()
    return LlamaGen(**tiny_kwargs("tiny-llamagen")).eval(), vq


def draw(llamagen, out, **kwargs):
    model, vq = llamagen
    return sample_images(model, vq, out, **{**dict(num=7, batch_size=2, seed=3, cfg=2.0, progress=False), **kwargs})


def png_bytes(folder: Path) -> dict:
    return {file.name: file.read_bytes() for file in sorted((folder / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def straight(llamagen, tmp_path_factory):
    """7 images in batches of 2 on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("straight")
    npz = draw(llamagen, out)
    return out, npz


# ADM's .npz


def test_adm_npz_round_trip_matches_numpy_savez(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = save_adm_npz(tmp_path / "a.npz", images, labels)
    loaded = load_adm_npz(path)
    assert np.array_equal(loaded.images, images) and np.array_equal(loaded.labels, labels)
    np.savez(tmp_path / "reference.npz", images, labels)  # the writer stores what np.savez stores
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(tmp_path / "reference.npz") as theirs:
        assert ours.namelist() == theirs.namelist() == ["arr_0.npy", "arr_1.npy"]
        assert all(ours.read(name) == theirs.read(name) for name in ours.namelist())
    unlabelled = load_adm_npz(save_adm_npz(tmp_path / "b.npz", torch.from_numpy(images)))
    assert unlabelled.labels is None and np.array_equal(unlabelled.images, images)
    from PIL import Image

    files = []
    for index, image in enumerate(images):
        files.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(files[-1])
    streamed = load_adm_npz(save_adm_npz_from_pngs(tmp_path / "c.npz", files, labels))
    assert np.array_equal(streamed.images, images) and np.array_equal(streamed.labels, labels)


def test_adm_npz_errors_name_the_argument_or_file(tmp_path):
    good = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"`images` must be uint8 \[N, H, W, 3\].*float32"):
        save_adm_npz(tmp_path / "a.npz", good.astype(np.float32))
    with pytest.raises(ValueError, match=r"`images`.*shape=\(2, 4, 4\)"):
        save_adm_npz(tmp_path / "a.npz", good[..., 0])
    with pytest.raises(ValueError, match=r"`labels` must be integer class labels \[2\]"):
        save_adm_npz(tmp_path / "a.npz", good, np.arange(3))
    with pytest.raises(TypeError, match="`images` must be a NumPy array"):
        save_adm_npz(tmp_path / "a.npz", good.tolist())
    with pytest.raises(ValueError, match="`path` must end in .npz"):
        save_adm_npz(tmp_path / "a.npy", good)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_adm_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "floats.npz", good.astype(np.float32))
    with pytest.raises(ValueError, match=r"`arr_0` in .*floats.npz.* must be uint8"):
        load_adm_npz(tmp_path / "floats.npz")
    np.savez(tmp_path / "labels.npz", good, np.arange(5))
    with pytest.raises(ValueError, match=r"`arr_1` in .*labels.npz.* \[2\]"):
        load_adm_npz(tmp_path / "labels.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"text.npz.* is not an .npz archive"):
        load_adm_npz(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="`files`: 1 of 1 do not exist"):
        save_adm_npz_from_pngs(tmp_path / "d.npz", [tmp_path / "none.png"])


# class balance, resume, shards


@pytest.mark.parametrize("num, classes", [(50, 10), (7, 4), (3, 5)])
def test_balanced_labels_spread_evenly_in_class_order(num, classes):
    labels = balanced_labels(num, classes)
    counts = np.bincount(labels, minlength=classes)
    assert len(labels) == num and labels == sorted(labels)
    assert counts.max() - counts.min() <= 1 and counts.max() == math.ceil(num / classes)


def test_npz_holds_the_images_and_balanced_labels(straight):
    out, npz = straight
    assert npz == out / "samples_7x32x32x3.npz"
    batch = load_adm_npz(npz)
    assert batch.images.shape == (7, 32, 32, 3)
    assert batch.labels.tolist() == balanced_labels(7, 4) == [0, 0, 1, 1, 2, 2, 3]
    from PIL import Image

    with Image.open(out / "images" / "000004.png") as image:
        assert np.array_equal(np.asarray(image), batch.images[4])
    assert len(set(png_bytes(out).values())) == 7  # every image its own draw
    assert json.loads((out / "sampling.json").read_text())["options"]["cfg"] == 2.0


class Interrupt(Exception):
    pass


def counting_draws(monkeypatch, fail_after=None):
    """Wrap the batch draw: count the batches drawn, raise Interrupt after ``fail_after`` of them."""
    drawn = []

    def generate(*args, **kwargs):
        if fail_after is not None and len(drawn) >= fail_after:
            raise Interrupt
        drawn.append(kwargs["generator"])
        return GENERATE_IMAGES(*args, **kwargs)
    monkeypatch.setattr(sampling, "generate_images", generate)
    return drawn


def test_resumed_run_is_byte_identical_to_an_uninterrupted_one(llamagen, straight, tmp_path, monkeypatch):
    counting_draws(monkeypatch, fail_after=2)
    with pytest.raises(Interrupt):
        draw(llamagen, tmp_path)
    assert sorted(png_bytes(tmp_path)) == [f"{i:06d}.png" for i in range(4)]
    (tmp_path / "images" / "000003.png").unlink()  # a batch cut short, and a write left half done
    (tmp_path / "images" / "000005.png.tmp").write_bytes(b"partial")
    drawn = counting_draws(monkeypatch)
    npz = draw(llamagen, tmp_path)
    assert len(drawn) == 3  # batches [2, 3], [4, 5], [6]; [0, 1] was kept
    assert png_bytes(tmp_path) == png_bytes(straight[0])
    assert np.array_equal(load_adm_npz(npz).images, load_adm_npz(straight[1]).images)


def test_two_shards_give_the_one_shard_images(llamagen, straight, tmp_path, monkeypatch):
    drawn = counting_draws(monkeypatch)
    assert draw(llamagen, tmp_path, rank=1, world_size=2) is None  # rank 1: batches 1, 3; no .npz
    assert len(drawn) == 2
    npz = draw(llamagen, tmp_path, rank=0, world_size=2)  # rank 0: batches 0, 2; every image there: the .npz
    assert len(drawn) == 4
    assert png_bytes(tmp_path) == png_bytes(straight[0])
    assert load_adm_npz(npz).labels.tolist() == load_adm_npz(straight[1]).labels.tolist()


def test_other_settings_into_a_sampled_folder_are_refused_before_drawing(llamagen, straight, monkeypatch):
    drawn = counting_draws(monkeypatch)
    with pytest.raises(ValueError, match=r"other settings .*options: .*'cfg': 2\.0.*'cfg': 3\.0"):
        draw(llamagen, straight[0], cfg=3.0)
    with pytest.raises(ValueError, match="batch_size: 2 there, 4 now"):
        draw(llamagen, straight[0], batch_size=4)
    assert drawn == []


def test_a_run_that_failed_before_its_first_image_does_not_bind_the_rerun(llamagen, straight, tmp_path, monkeypatch):
    """The model fails in the first batch: sampling.json is left without images, and a rerun with other settings
    replaces it; once an image is written, other settings are refused again."""
    counting_draws(monkeypatch, fail_after=0)
    with pytest.raises(Interrupt):
        draw(llamagen, tmp_path, cfg=3.0)
    assert json.loads((tmp_path / "sampling.json").read_text())["options"]["cfg"] == 3.0
    assert png_bytes(tmp_path) == {}
    counting_draws(monkeypatch, fail_after=1)
    with pytest.raises(Interrupt):
        draw(llamagen, tmp_path)  # cfg 2.0 now: allowed, and recorded
    assert json.loads((tmp_path / "sampling.json").read_text())["options"]["cfg"] == 2.0
    assert sorted(png_bytes(tmp_path)) == ["000000.png", "000001.png"]
    with pytest.raises(ValueError, match=r"other settings .*'cfg': 2\.0.*'cfg': 3\.0"):
        draw(llamagen, tmp_path, cfg=3.0)
    counting_draws(monkeypatch)
    draw(llamagen, tmp_path)
    assert png_bytes(tmp_path) == png_bytes(straight[0])


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(num=0), ValueError, "`num` must be a positive int, got 0"),
    (dict(batch_size=True), TypeError, "`batch_size` must be a positive int"),
    (dict(seed=-1), ValueError, "`seed` must be an int >= 0"),
    (dict(rank=2, world_size=2), ValueError, r"`rank` must be an int in \[0, 2\)"),
    (dict(rank=0), ValueError, "give both `rank` and `world_size`"),
    (dict(cfg=float("nan")), ValueError, "`cfg` must be a finite number"),
    (dict(temperature=-1.0), ValueError, "`temperature` must be a finite number >= 0"),
    (dict(generator=1), TypeError, "`generator`: set by sample_images"),
    (dict(prompts=["a cat"], num_classes=4), ValueError, "give `prompts` or `num_classes`"),
    (dict(prompts=["a cat"]), ValueError, "`model`: a c2i LlamaGen takes class labels, not captions"),
    (dict(top_k=object()), TypeError, "sampler options must be JSON values"),
    (dict(num_classes=10), ValueError, r"`num_classes` 10: the model has 4 classes"),
    (dict(num_classes=0), ValueError, r"LlamaGen is class-conditional: it needs a class label .*`num_classes` 0"),
    (dict(cfg_schedule="foo"), ValueError, r"`cfg_schedule` must be one of \('linear', 'constant'\), got 'foo'"),
])
def test_bad_arguments_are_refused_before_drawing(llamagen, tmp_path, monkeypatch, kwargs, error, words):
    drawn = counting_draws(monkeypatch)
    with pytest.raises(error, match=words):
        draw(llamagen, tmp_path / "out", **kwargs)
    assert drawn == [] and not (tmp_path / "out").exists()


def test_mar_and_transfusion_draw_class_balanced_images(tmp_path):
    """The two other sampler paths: MAR through its KL tokenizer, Transfusion (pixels as 3-channel latents)
    with the class label as its one-token prompt."""
    torch.manual_seed(0)
    kl = AutoencoderKL(KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(),
                                decoder_attn_levels=())).eval()
    mar = MAR(**tiny_kwargs("tiny-mar")).eval()
    npz = sample_images(mar, kl, tmp_path / "mar", num=3, batch_size=3, num_classes=3, steps=2, cfg=1.5,
                        progress=False)
    assert load_adm_npz(npz).images.shape == (3, 32, 32, 3) and load_adm_npz(npz).labels.tolist() == [0, 1, 2]
    transfusion = Transfusion(num_text_tokens=257, dim_latent=3, modality_default_shape=(4, 4),
                              transformer=dict(dim=32, depth=1, heads=2)).eval()
    npz = sample_images(transfusion, None, tmp_path / "tf", num=2, batch_size=2, num_classes=2, steps=2, cfg=2.0,
                        progress=False)
    batch = load_adm_npz(npz)
    assert batch.images.shape == (2, 4, 4, 3) and batch.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"`num_classes` 258: Transfusion takes a class label as a one-token text, "
                                         r"and its texts have 257 tokens; give at most 257"):
        sample_images(transfusion, None, tmp_path / "too-many", num=2, num_classes=258, progress=False)
    assert not (tmp_path / "too-many").exists()


@pytest.mark.parametrize("name, kind", [("tiny-mar", "kl"), ("tiny-llamagen", "vq"), ("tiny-dnd", "rq"),
                                        ("tiny-transfusion", "kl"), ("tiny-monoformer", "kl"), ("pixels", None)])
def test_drawn_size_is_the_size_of_a_drawn_image(name, kind):
    """What evaluate checks against the reference before drawing: the size one drawn image has."""
    import mmgen_pytorch
    from _helpers import tiny_tokenizer

    torch.manual_seed(0)
    if name == "pixels":
        model = Transfusion(num_text_tokens=257, dim_latent=3, modality_default_shape=(4, 6),
                            transformer=dict(dim=32, depth=1, heads=2)).eval()
    else:
        config = yaml.safe_load((ROOT / "mmgen_pytorch" / "configs" / f"{name}.yaml").read_text())["model"]
        model = getattr(mmgen_pytorch, config["name"])(**config["kwargs"]).eval()
    tokenizer = tiny_tokenizer(kind) if kind else None
    steps = {} if name in ("tiny-llamagen", "tiny-dnd") else dict(steps=1)
    image = GENERATE_IMAGES(model, tokenizer, {"label": torch.tensor([0])}, generator=0, **steps)
    assert sampling.drawn_size(model, tokenizer) == tuple(image.shape[-2:])


def test_prompts_from_text_and_json_lines(tmp_path):
    (tmp_path / "p.txt").write_text("a red square\n\n  a blue circle  \n")
    assert sampling.read_prompts(tmp_path / "p.txt") == ["a red square", "  a blue circle  "]
    (tmp_path / "p.jsonl").write_text('"one"\n{"caption": "two"}\n{"prompt": "three", "id": 4}\n')
    assert sampling.read_prompts(tmp_path / "p.jsonl") == ["one", "two", "three"]
    (tmp_path / "bad.jsonl").write_text('"one"\n{"file": "x.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected a JSON string or an object"):
        sampling.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        sampling.read_prompts(tmp_path / "empty.txt")


def test_monoformer_draws_one_image_per_prompt_cycling_the_prompts(tmp_path):
    from mmgen_pytorch import MonoFormer

    torch.manual_seed(0)
    model = MonoFormer(num_text_tokens=257, transformer=dict(dim=32, depth=1, heads=2), latent_channels=3,
                       latent_size=4, patch_size=2).eval()
    npz = sample_images(model, None, tmp_path, num=3, batch_size=3, prompts=["a cat", "a dog"], steps=2, cfg=2.0,
                        progress=False)
    batch = load_adm_npz(npz)
    assert batch.images.shape == (3, 4, 4, 3) and batch.labels is None
    settings = json.loads((tmp_path / "sampling.json").read_text())
    assert settings["conditioning"] == "captions" and settings["num_classes"] is None


# the command


@pytest.fixture(scope="module")
def run_dir(llamagen, tmp_path_factory):
    """A training output folder as mmgen_pytorch.train leaves it (config.yaml, a checkpoint with EMA weights
    that differ from the model's), and the EMA model."""
    pytest.importorskip("ema_pytorch")
    from _helpers import fake_llamagen_run

    root = tmp_path_factory.mktemp("run")
    model, vq = llamagen
    ema = fake_llamagen_run(root, model, vq)
    return root, ema.ema_model.eval()


def test_command_samples_a_run_with_its_ema_weights(run_dir, llamagen, tmp_path):
    from mmgen_pytorch.sample import main

    root, ema_model = run_dir
    npz = main([str(root / "run"), "--num", "5", "--out", str(tmp_path / "cli"), "--batch-size", "2", "--cfg", "2.0",
                "--top-k", "8", "--no-progress"])
    expected = sample_images(ema_model, llamagen[1], tmp_path / "direct", num=5, batch_size=2, cfg=2.0, top_k=8,
                             progress=False)
    assert png_bytes(tmp_path / "cli") == png_bytes(tmp_path / "direct")
    assert np.array_equal(load_adm_npz(npz).labels, load_adm_npz(expected).labels)
    settings = json.loads((tmp_path / "cli" / "sampling.json").read_text())
    assert settings["weights"] == "ema" and settings["source"].endswith("step-0000004")


def test_command_takes_the_runs_sample_section_unless_a_flag_is_given(run_dir, llamagen, tmp_path, capsys):
    """cfg / temperature of the run's `sample:` section are the defaults; a flag given wins; stderr says which."""
    import shutil

    from mmgen_pytorch.sample import main

    root, ema_model = run_dir
    shutil.copytree(root / "run", tmp_path / "run")
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["sample"].update(cfg=3.0, temperature=0.5)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    argv = [str(tmp_path / "run"), "--num", "2", "--batch-size", "2", "--no-progress"]
    main(argv + ["--out", str(tmp_path / "cli")])
    assert json.loads((tmp_path / "cli" / "sampling.json").read_text())["options"] == dict(
        cfg=3.0, temperature=0.5, steps=None)
    said = capsys.readouterr().err
    assert "cfg 3.0 (the run's sample.cfg), temperature 0.5 (the run's sample.temperature)" in said
    sample_images(ema_model, llamagen[1], tmp_path / "direct", num=2, batch_size=2, cfg=3.0, temperature=0.5,
                  progress=False)
    assert png_bytes(tmp_path / "cli") == png_bytes(tmp_path / "direct")
    main(argv + ["--out", str(tmp_path / "given"), "--cfg", "1.5"])
    assert json.loads((tmp_path / "given" / "sampling.json").read_text())["options"]["cfg"] == 1.5
    assert "cfg 1.5 (--cfg)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def transfusion_runs(tmp_path_factory):
    """Tiny Transfusion runs (untrained) on the 3 class folders of coloured squares, on the flat folder of one
    of them and on the captions of the squares, and the model (the same weights in all)."""
    from _helpers import fake_run, write_colour_folder

    root = tmp_path_factory.mktemp("transfusion")
    images = write_colour_folder(root / "data")
    model = fake_run(root / "classes", "tiny-transfusion", "--data.folder", str(images))
    fake_run(root / "flat", "tiny-transfusion", "--data.folder", str(images / "class0"))
    fake_run(root / "captions", "tiny-transfusion", "--data.folder", str(images), "--data.captions",
             str(root / "data" / "captions.jsonl"))
    return root, model


def test_a_transfusion_run_on_class_folders_samples_class_balanced_by_default(transfusion_runs, tmp_path, capsys):
    from mmgen_pytorch.sample import main

    root, model = transfusion_runs
    argv = ["--num", "3", "--batch-size", "3", "--steps", "2", "--no-progress", "--out"]
    npz = main([str(root / "classes" / "run"), *argv, str(tmp_path / "classes")])
    assert load_adm_npz(npz).labels.tolist() == [0, 1, 2]
    settings = json.loads((tmp_path / "classes" / "sampling.json").read_text())
    assert settings["conditioning"] == "classes" and settings["num_classes"] == 3
    assert "conditioning: 3 classes, balanced (the class labels of the run's data.folder" in capsys.readouterr().err
    from _helpers import tiny_tokenizer

    torch.manual_seed(0)
    kl = tiny_tokenizer("kl")
    sample_images(model, kl, tmp_path / "direct", num=3, batch_size=3, num_classes=3, steps=2, progress=False)
    assert png_bytes(tmp_path / "classes") == png_bytes(tmp_path / "direct")
    main([str(root / "classes" / "run"), *argv, str(tmp_path / "asked"), "--num-classes", "0"])
    assert json.loads((tmp_path / "asked" / "sampling.json").read_text())["conditioning"] == "none"
    main([str(root / "flat" / "run"), *argv, str(tmp_path / "flat")])
    assert json.loads((tmp_path / "flat" / "sampling.json").read_text())["conditioning"] == "none"
    assert "unconditional (the run's data.folder" in capsys.readouterr().err
    main([str(root / "captions" / "run"), *argv, str(tmp_path / "captions")])
    assert json.loads((tmp_path / "captions" / "sampling.json").read_text())["conditioning"] == "none"
    assert "unconditional (the run trained on the captions of data.folder" in capsys.readouterr().err


def test_a_transfusion_run_whose_data_is_gone_asks_for_num_classes_before_loading(transfusion_runs, tmp_path,
                                                                                  monkeypatch):
    import shutil

    from mmgen_pytorch import sample

    root, _ = transfusion_runs
    shutil.copytree(root / "classes" / "run", tmp_path / "run")
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["data"]["folder"] = str(tmp_path / "gone")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sample, "load_for_sampling", lambda *args: pytest.fail("loaded before checking the flags"))
    with pytest.raises(SystemExit, match=r"^sample: --num-classes: the run trained Transfusion on data.folder .*gone"
                                         r".*give --num-classes C \(0: unconditional\)"):
        sample.main([str(tmp_path / "run"), "--num", "2", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_command_samples_a_saved_model_folder(llamagen, tmp_path):
    from mmgen_pytorch.sample import main

    model, vq = llamagen
    model.save_pretrained(tmp_path / "model")
    vq.save(tmp_path / "vq")
    npz = main([str(tmp_path / "model"), "--tokenizer", str(tmp_path / "vq"), "--num-images", "3", "--out",
                str(tmp_path / "out"), "--batch-size", "3", "--no-progress"])
    assert load_adm_npz(npz).images.shape == (3, 32, 32, 3)
    assert json.loads((tmp_path / "out" / "sampling.json").read_text())["weights"] == "model"


def test_a_runs_tokenizer_path_missing_from_here_is_one_line_naming_the_flag(llamagen, tmp_path, monkeypatch):
    """A run whose config.yaml names its tokenizer relative to another folder: `sample` says so and asks for
    --tokenizer, before anything loads (no traceback)."""
    from _helpers import fake_llamagen_run
    from mmgen_pytorch import sample

    model, vq = llamagen
    fake_llamagen_run(tmp_path, model, vq)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["tokenizer"]["path"] = "vq"  # relative to tmp_path, which is not the working folder
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sample, "load_for_sampling", lambda *args: pytest.fail("loaded before checking the flags"))
    with pytest.raises(SystemExit, match=r"^sample: --tokenizer: the run's tokenizer.path 'vq' .*give the tokenizer's "
                                         r"folder with --tokenizer DIR"):
        sample.main([str(tmp_path / "run"), "--num", "2", "--out", str(tmp_path / "out")])


def test_a_mar_run_draws_over_its_datas_classes_or_unconditionally(tmp_path):
    """A MAR run (num_classes 4 in tiny-mar) draws over the classes its folder had, and unconditionally when
    it trained on a flat folder (no labels): its training grid and `sample` agree (train.num_classes)."""
    import shutil

    from _helpers import TRAIN_COLOURS, fake_run, write_colour_folder
    from mmgen_pytorch import sample, train
    from mmgen_pytorch.training.recipes import build_dataset

    images = write_colour_folder(tmp_path / "data", per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, path in enumerate(sorted(images.rglob("*.png"))):
        shutil.copy(path, flat / f"{index}.png")
    for folder, expected in ((images, len(TRAIN_COLOURS)), (flat, 0)):
        root = tmp_path / folder.name
        fake_run(root, "tiny-mar", "--data.folder", str(folder))
        source = sample.resolve_source(str(root / "run"))
        count, why = sample.run_classes(source)
        assert count == expected and ("unconditional" in why) == (expected == 0)
        assert (train.num_classes(source.config, build_dataset(source.config, None)) or 0) == expected


def test_tokenizer_may_be_a_tokenizer_training_run(llamagen, tmp_path):
    """``--tokenizer`` takes a tokenizer's training output folder (its latest checkpoint's model), as
    ``tokenizer.path`` of a training config does: the same images as from the saved tokenizer."""
    from mmgen_pytorch import train
    from mmgen_pytorch.checkpoint import save_training_state
    from mmgen_pytorch.sample import main

    model, vq = llamagen
    model.save_pretrained(tmp_path / "model")
    vq.save(tmp_path / "vq")
    (tmp_path / "vq-run").mkdir()
    (tmp_path / "vq-run" / "config.yaml").write_text("model: {name: VQVAE}\n")
    save_training_state(train.checkpoint_dir(tmp_path / "vq-run", 3), model=vq,
                        optimizer=torch.optim.AdamW(vq.parameters()), step=3)
    drawn = [load_adm_npz(main([str(tmp_path / "model"), "--tokenizer", str(tmp_path / tokenizer), "--num-images", "2",
                                "--out", str(tmp_path / f"out-{tokenizer}"), "--batch-size", "2", "--no-progress"]))
             for tokenizer in ("vq", "vq-run")]
    assert np.array_equal(drawn[0].images, drawn[1].images)


@pytest.mark.parametrize("flags, words", [
    (["{missing}"], "SOURCE .* is not a folder"),
    (["--preset", "mar-z"], "--preset must be one of mar-b"),
    (["--preset", "mar-b"], "--preset mar-b is for MAR, but SOURCE holds a LlamaGen"),
    (["--steps", "8"], "--steps: LlamaGen's sampler has no such option"),
    (["--cfg-schedule", "linear"], "--cfg-schedule: LlamaGen's sampler has no such option"),
    (["--num", "0"], "--num must be a positive int"),
    (["--batch-size", "-2"], "--batch-size must be a positive int"),
    (["--cfg", "nan"], "--cfg must be a finite number"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--prompts", "{missing}"], "prompts file .* does not exist"),
    (["--prompts", "{prompts}", "--num-classes", "4"], "give --prompts or --num-classes"),
    (["--tokenizer", "{missing}"], "--tokenizer .* is not a folder: it does not exist"),
    (["--tokenizer", "{kl}"], "--tokenizer .* holds a AutoencoderKL, but LlamaGen decodes through a VQVAE"),
    (["--out", "{file}"], "--out .* is a file"),
    (["--device", "gpu7"], "--device 'gpu7'"),
])
def test_bad_flags_are_refused_before_loading(run_dir, tmp_path, monkeypatch, flags, words):
    from mmgen_pytorch import sample

    def not_loaded(*args, **kwargs):
        raise AssertionError("loaded a model before checking the flags")
    monkeypatch.setattr(sample, "load_for_sampling", not_loaded)
    (tmp_path / "prompts.txt").write_text("a red square\n")
    (tmp_path / "file").write_text("")
    names = dict(missing=str(tmp_path / "missing"), prompts=str(tmp_path / "prompts.txt"), file=str(tmp_path / "file"),
                 kl=str(tmp_path / "kl"))
    if "{kl}" in flags:
        from _helpers import tiny_tokenizer

        tiny_tokenizer("kl").save(tmp_path / "kl")
    flags = [flag.format(**names) for flag in flags]
    source = flags.pop(0) if flags[0] == names["missing"] else str(run_dir[0] / "run")
    argv = [source, "--num", "4", "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit, match=words):
        sample.main(argv)
    assert not (tmp_path / "out").exists()


def test_flags_the_model_refuses_exit_before_anything_is_written_and_the_corrected_rerun_runs(run_dir, tmp_path,
                                                                                              capsys):
    """--num-classes beyond the model's classes, or 0 for a class-conditional model: a clear exit right after
    loading, no sampling.json left behind; the rerun with other settings draws and says where it wrote."""
    from mmgen_pytorch.sample import main

    out = tmp_path / "out"
    argv = [str(run_dir[0] / "run"), "--num", "2", "--batch-size", "2", "--out", str(out), "--no-progress"]
    for classes, words in (("10", "--num-classes 10: the model has 4 classes"),
                           ("0", "LlamaGen is class-conditional: it needs a class label for every image")):
        with pytest.raises(SystemExit, match=f"^sample: .*{words}"):
            main(argv + ["--num-classes", classes])
        assert not out.exists()
    npz = main(argv + ["--num-classes", "2"])
    assert load_adm_npz(npz).labels.tolist() == [0, 1]
    assert capsys.readouterr().out.strip() == f"sample: wrote 2 images to {out / 'images'} and {npz}"


def test_a_bad_cfg_schedule_is_refused_before_loading(tmp_path, monkeypatch):
    from _helpers import tiny_tokenizer

    from mmgen_pytorch import sample

    MAR(**tiny_kwargs("tiny-mar")).save(tmp_path / "mar")
    tiny_tokenizer("kl").save(tmp_path / "kl")
    monkeypatch.setattr(sample, "load_for_sampling", lambda *args: pytest.fail("loaded before checking the flags"))
    with pytest.raises(SystemExit, match=r"sample: --cfg-schedule must be one of .*got 'foo'"):
        sample.main([str(tmp_path / "mar"), "--tokenizer", str(tmp_path / "kl"), "--num", "2", "--out",
                     str(tmp_path / "out"), "--cfg-schedule", "foo"])
    assert not (tmp_path / "out").exists()


def test_saved_model_without_a_tokenizer_is_refused_by_name(llamagen, tmp_path):
    from mmgen_pytorch.sample import main

    llamagen[0].save(tmp_path / "model")
    with pytest.raises(SystemExit, match="--tokenizer: LlamaGen draws VQ"):
        main([str(tmp_path / "model"), "--num", "2", "--out", str(tmp_path / "out")])


def test_presets_are_data_with_their_sources():
    from mmgen_pytorch.sample import EVAL_PRESETS, SAMPLER_FLAGS

    assert EVAL_PRESETS["mar-l"].options == dict(cfg=3.0, temperature=1.0, steps=256, cfg_schedule="linear",
                                                 num_sampling_steps="100")
    assert EVAL_PRESETS["mar-b-nocfg"].options["temperature"] == 0.95 and EVAL_PRESETS["mar-h"].options["cfg"] == 3.2
    assert EVAL_PRESETS["llamagen-gpt-b-c2i"].options["top_k"] == 0 and EVAL_PRESETS["dnd-xxxl"].options["cfg"] == 1.7
    for preset in EVAL_PRESETS.values():
        assert preset.num == 50_000 and preset.notes
        assert all(preset.model in SAMPLER_FLAGS[name][2] for name in preset.options)


def test_one_npz_reader_names_the_file_for_every_problem(tmp_path):
    """ADM batches, saved statistics and ADM reference moments all go through adm_npz.read_npz."""
    from mmgen_pytorch.evaluation.adm_npz import read_npz
    from mmgen_pytorch.evaluation.metrics import FeatureStats

    np.savez(tmp_path / "moments.npz", mu=np.zeros(3), sigma=np.eye(3))
    arrays = read_npz(tmp_path / "moments.npz", required=["mu"], optional=["sigma", "absent"])
    assert sorted(arrays) == ["mu", "sigma"] and np.array_equal(arrays["sigma"], np.eye(3))
    with pytest.raises(ValueError, match=r"moments.npz.*lacks \['arr_0'\].*holds \['mu', 'sigma'\]"):
        load_adm_npz(tmp_path / "moments.npz")
    with pytest.raises(ValueError, match=r"statistics file .*moments.npz.*lacks .*FeatureStats.save"):
        FeatureStats.load(tmp_path / "moments.npz")
    with open(tmp_path / "single.npz", "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(ValueError, match=r"single.npz.* is not an .npz archive of arrays .*single array"):
        read_npz(tmp_path / "single.npz", required=["mu"])
    with pytest.raises(FileNotFoundError, match=r"missing.npz.* does not exist"):
        read_npz(tmp_path / "missing.npz", required=["mu"])
