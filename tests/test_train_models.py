"""The training entry point for DnD, Transfusion and MonoFormer (MAR and LlamaGen: tests/test_train.py):
their tiny configs trained a few steps from an image folder (through the frozen tokenizer) and from a
cache, Transfusion on captions (text + image) resumed bit-identically, and data a model cannot take
(a cache of another kind, a flat folder for a class-conditional model, labels or captions past the
model's vocabulary) refused before the first step."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("yaml")
pytest.importorskip("PIL")

from _helpers import (assert_resumes_bit_identically, reset_accelerate_state, train_run,  # noqa: E402
                      training_data, under)
from mmgen_pytorch import train  # noqa: E402
from mmgen_pytorch.data.cache import StackFields  # noqa: E402
from mmgen_pytorch.training.config import load_config  # noqa: E402
from mmgen_pytorch.training.recipes import build_dataset, multimodal_samples  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("train-models"), kinds=("kl", "rq"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state(one_torch_thread):
    yield
    reset_accelerate_state()


def source(data, kind: str, where: str) -> list:
    given = ("--data.cache", data / f"cache-{kind}") if where == "cache" else ("--data.folder", data / "images")
    return [given[0], str(given[1]), "--tokenizer.path", str(data / kind)]


def logged(out) -> list:
    return [json.loads(line) for line in (out / train.LOG_FILE).read_text().splitlines()]


@pytest.mark.parametrize("name, kind, where", [
    ("tiny-dnd", "rq", "cache"), ("tiny-dnd", "rq", "folder"), ("tiny-monoformer", "kl", "cache"),
    ("tiny-monoformer", "kl", "folder"), ("tiny-transfusion", "kl", "cache"),
])
def test_tiny_config_trains(data, tmp_path, name, kind, where):
    """4 steps: finite losses that fall, one log line per step, the final checkpoint (loadable as the
    model) and the EMA model's sample grid (4 samples of 32x32)."""
    from PIL import Image

    from mmgen_pytorch.saving import load_model

    losses = train_run(name, tmp_path, *source(data, kind, where))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert [entry["step"] for entry in logged(tmp_path)] == [1, 2, 3, 4]
    model = load_model(train.checkpoint_dir(tmp_path, 4))
    assert type(model).__name__ == load_config(name, source(data, kind, where)).model.name
    with Image.open(tmp_path / "samples" / "step-0000004.png") as image:
        assert image.size == (2 * 32, 2 * 32)


def test_in_memory_folder_trains_as_the_folder_decoded_per_item(data, tmp_path):
    """`data.in_memory` without a tokenizer changes where images are decoded, not what a run sees: the same
    losses, flips included."""
    folder = ["--data.folder", str(data / "images"), "--model.kwargs.latent_channels", "3",
              "--model.kwargs.latent_size", "32", "--model.kwargs.patch_size", "8"]
    per_item = train_run("tiny-monoformer", tmp_path / "per-item", *folder)
    reset_accelerate_state()
    assert train_run("tiny-monoformer", tmp_path / "in-memory", *folder, "--data.in_memory", "true") == per_item


@pytest.mark.parametrize("name, kind", [("tiny-dnd", "rq"), ("tiny-monoformer", "kl")])
def test_in_memory_folder_with_a_tokenizer_is_encoded_once_and_trains_as_encoding_each_batch(
        data, tmp_path, monkeypatch, name, kind):
    """With a frozen tokenizer, `data.in_memory` encodes every image and its mirror once (EncodedDataset)
    and no batch is encoded during training, yet the run sees what encoding each batch gives: the same
    flips, so the same codes (equal losses) and the same KL moments up to float rounding."""
    from mmgen_pytorch.training import recipes

    folder = source(data, kind, "folder")
    per_batch = train_run(name, tmp_path / "per-batch", *folder)
    reset_accelerate_state()

    def encoding_a_batch(*args):
        raise AssertionError("a batch was encoded during training")
    monkeypatch.setattr(recipes, "encode_images", encoding_a_batch)
    once = train_run(name, tmp_path / "once", *folder, "--data.in_memory", "true")
    if kind == "kl":
        assert once == pytest.approx(per_batch, rel=1e-5)
    else:
        assert once == per_batch


@pytest.mark.parametrize("where", ["cache", "folder"])
def test_a_text_model_counts_the_classes_of_its_labelled_data(data, where):
    """A Transfusion trained on class labels (one-token texts) draws its grid, evaluation and `sample` images
    over its data's classes, from a folder and from a cache (which holds labels, not class names)."""
    from mmgen_pytorch.data import ImageFolderDataset

    config = load_config("tiny-transfusion", source(data, "kl", where))
    classes = len(ImageFolderDataset(data / "images", resolution=32).classes)
    assert classes > 1 and train.num_classes(config, build_dataset(config, None)) == classes


def test_transfusion_on_captions_resumes_bit_identically(data, tmp_path):
    """Text + image from an image folder with a captions file, images encoded by the frozen KL tokenizer
    and flipped at random: the resumed run repeats the uninterrupted one bit for bit."""
    common = [*source(data, "kl", "folder"), "--data.captions", str(data / "captions.jsonl"),
              "--train.checkpoint_every", "2"]
    losses = assert_resumes_bit_identically("tiny-transfusion", tmp_path, common)
    assert losses[-1] < losses[0]
    assert (tmp_path / "resumed" / "samples" / "step-0000004.png").is_file()


def test_captions_are_the_text_before_each_image(data):
    """Each Transfusion sample is [caption's UTF-8 bytes + 1, the image's latent], the caption read
    independently from the captions file; a caption-trained text model draws its grid without class prompts."""
    config = load_config("tiny-transfusion", [*source(data, "kl", "folder"), "--data.captions",
                                              str(data / "captions.jsonl"), "--data.random_flip", "false"])
    dataset = build_dataset(config, None)
    captions = {json.loads(line)["file"]: json.loads(line)["caption"]
                for line in (data / "captions.jsonl").read_text().splitlines()}
    rows = [0, 9, 23]
    samples = multimodal_samples(StackFields()([dataset[i] for i in rows]), None, channel_last=True)
    for row, (text, image) in zip(rows, samples):
        expected = [byte + 1 for byte in captions[dataset.relative_path(dataset.samples[row][0])].encode("utf-8")]
        assert text.tolist() == expected
        torch.testing.assert_close(image, dataset[row]["image"].permute(1, 2, 0), rtol=0, atol=0)
    assert train.num_classes(config, dataset) is None
    on_labels = load_config("tiny-monoformer", source(data, "kl", "folder"))
    assert train.num_classes(on_labels, build_dataset(on_labels, None)) == 3


def test_image_first_lays_out_that_share_of_transfusion_samples_image_then_caption(data, tmp_path):
    """`data.image_first`: 0 keeps every sample [caption, image] and draws nothing from the RNG; 1 gives
    [image, caption]; 0.5 a seeded mix of both, the same items in either order; a run with it trains and
    resumes bit-identically; other models and values outside [0, 1] are refused naming the key."""
    config = load_config("tiny-transfusion", [*source(data, "kl", "folder"), "--data.captions",
                                              str(data / "captions.jsonl"), "--data.random_flip", "false"])
    batch = StackFields()([build_dataset(config, None)[i] for i in range(16)])
    state = torch.get_rng_state()
    kept = multimodal_samples(batch, None, channel_last=True, image_first=0.0)
    assert torch.equal(torch.get_rng_state(), state) and all(sample[0].dtype == torch.long for sample in kept)
    flipped = multimodal_samples(batch, None, channel_last=True, image_first=1.0)
    assert all(torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) for a, b in zip(kept, flipped))
    torch.manual_seed(0)
    mixed = multimodal_samples(batch, None, channel_last=True, image_first=0.5)
    firsts = [sample[0].is_floating_point() for sample in mixed]
    assert 0 < sum(firsts) < len(firsts)
    assert all(torch.equal(m[0], (f if first else k)[0]) for m, k, f, first in zip(mixed, kept, flipped, firsts))
    common = [*source(data, "kl", "folder"), "--data.captions", str(data / "captions.jsonl"), "--data.image_first",
              "0.5", "--train.checkpoint_every", "2", "--train.sample_every", "0"]
    assert_resumes_bit_identically("tiny-transfusion", tmp_path, common)
    for name, value, words in (("tiny-monoformer", "0.5", "does not apply to MonoFormer"),
                               ("tiny-transfusion", "1.5", "must be in [0, 1]")):
        with pytest.raises(SystemExit, match="^config error: `data.image_first`") as info:
            train_run(name, tmp_path / "refused", *source(data, "kl", "folder"), "--data.image_first", value)
        assert words in str(info.value)


@pytest.fixture(scope="module")
def flat_folder(data):
    flat = data / "flat"
    flat.mkdir()
    for path in sorted((data / "images" / "class0").glob("*.png")):
        (flat / path.name).write_bytes(path.read_bytes())
    return flat


@pytest.mark.parametrize("name, options, words", [
    ("tiny-dnd", ["--data.cache", "cache-kl", "--tokenizer.path", "rq"], ["data.cache", "KL moments", "RQVAE"]),
    ("tiny-transfusion", ["--data.cache", "cache-rq", "--tokenizer.path", "kl"], ["data.cache", "RQ codes", "KL"]),
    ("tiny-monoformer", ["--data.folder", "images", "--tokenizer.path", "rq"], ["tokenizer", "AutoencoderKL", "RQVAE"]),
    ("tiny-dnd", ["--data.folder", "flat", "--tokenizer.path", "rq"], ["DnDTransformer", "class labels", "flat"]),
    ("tiny-dnd", ["--data.cache", "cache-rq", "--model.kwargs.num_classes", "2"],
     ["model.kwargs.num_classes", "is 2", "at least 3"]),
    ("tiny-monoformer", ["--data.cache", "cache-kl", "--tokenizer.path", "kl", "--model.kwargs.num_text_tokens", "2"],
     ["model.kwargs.num_text_tokens", "class labels", "at least 3"]),
    ("tiny-monoformer", ["--data.folder", "images", "--tokenizer.path", "kl", "--data.captions", "captions.jsonl"],
     ["model.kwargs.num_text_tokens", "is 8", "caption ids", "at least 257"]),
    # the latents / codes the data becomes against the grid, channels and code depth the model takes
    ("tiny-monoformer", ["--data.cache", "cache-kl", "--tokenizer.path", "kl", "--model.kwargs.latent_size", "8"],
     ["`model.kwargs.latent_size` 8", "gives 16x16", "`data.cache`", "what would fit: `model.kwargs.latent_size` 16"]),
    ("tiny-monoformer", ["--data.folder", "images", "--tokenizer.path", "kl", "--model.kwargs.latent_channels", "3"],
     ["3 latent channels (`model.kwargs.latent_channels`)", "gives 4", "`model.kwargs.latent_channels` 4"]),
    ("tiny-transfusion", ["--data.folder", "images", "--tokenizer.path", "kl", "--data.resolution", "16"],
     ["`model.kwargs.modality_default_shape` [16, 16]", "gives 8x8", "`data.resolution` 16", "stride 2",
      "`model.kwargs.modality_default_shape` [8, 8]; or `data.resolution` 32"]),
    ("tiny-dnd", ["--data.folder", "images", "--tokenizer.path", "rq", "--model.kwargs.grid_size", "2"],
     ["`model.kwargs.grid_size` 2", "gives 4x4", "stride 8", "`model.kwargs.grid_size` 4; or `data.resolution` 16"]),
    ("tiny-dnd", ["--data.cache", "cache-rq", "--tokenizer.path", "rq", "--model.kwargs.head_positions", "[1]"],
     ["quantizes 2 depths", "predicts 1 codes", "head_positions"]),
])
def test_data_the_model_cannot_take_is_refused_before_training(data, flat_folder, tmp_path, name, options, words):
    """Refused with the key to change before the model is trained (these failed inside the first step)."""
    with pytest.raises(SystemExit, match="^config error: ") as info:
        train_run(name, tmp_path, *under(data, options))
    assert all(word in str(info.value) for word in words), str(info.value)
    assert not (tmp_path / train.LOG_FILE).exists()


def test_dnd_blocks_after_the_last_head_need_find_unused_parameters_under_ddp(data):
    """Those blocks get no gradient: DDP would fail in the second step; one process trains them as they are."""
    from mmgen_pytorch.training.config import ConfigError
    from mmgen_pytorch.training.recipes import build_model, check_idle_blocks

    config = load_config("tiny-dnd", ["--data.cache", "x", "--model.kwargs.depth", "3"])
    model = build_model(config, None)
    with pytest.raises(ConfigError, match=r"blocks 2..2 .* `train.find_unused_parameters: true`"):
        check_idle_blocks(config, model, processes=2)
    check_idle_blocks(config, model, processes=1)
    allowed = load_config("tiny-dnd", ["--data.cache", "x", "--model.kwargs.depth", "3",
                                       "--train.find_unused_parameters", "true"])
    check_idle_blocks(allowed, model, processes=2)
    shipped = load_config("tiny-dnd", ["--data.cache", "x"])  # heads [0, 1] of 2 blocks
    check_idle_blocks(shipped, build_model(shipped, None), processes=2)


# the tiny tokenizer configs: each trains, and its run folder is the tokenizer of its tiny generators


@pytest.mark.parametrize("tokenizer, generators, extra", [
    ("tiny-kl", ["tiny-mar", "tiny-transfusion", "tiny-monoformer"], []),
    ("tiny-rqvae", ["tiny-dnd"], []),
    ("tiny-vqgan", ["tiny-llamagen"], ["--data.resolution", "16"]),  # tiny-vqgan: 16x16 images as 4x4 codes
])
def test_tiny_tokenizer_configs_train_their_generators(data, tmp_path, tokenizer, generators, extra):
    """2 steps of the tokenizer, then 2 steps of each generator from the images through the tokenizer's
    training run folder (``--tokenizer.path`` a run: its latest checkpoint's model), with a sample grid."""
    from safetensors.torch import load_file

    from mmgen_pytorch.training.recipes import load_tokenizer

    images = ["--data.folder", str(data / "images")]
    losses = train_run(tokenizer, tmp_path / "tokenizer", *images, "--train.steps", "2", "--train.tracker", "none")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    reset_accelerate_state()
    run_folder = ["--tokenizer.path", str(tmp_path / "tokenizer")]
    trained = load_file(train.checkpoint_dir(tmp_path / "tokenizer", 2) / "model.safetensors")
    loaded = load_tokenizer(load_config(generators[0], [*images, *run_folder])).state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    for name in generators:
        out = tmp_path / name
        losses = train_run(name, out, *images, *run_folder, *extra, "--data.cache", "null", "--train.steps", "2",
                           "--sample.num", "2", "--train.tracker", "none")
        reset_accelerate_state()
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), name
        assert (out / "samples" / "step-0000002.png").is_file(), name


# MAR on the images themselves: no tokenizer, RGB patches as its tokens

PIXEL_MAR = ["--model.kwargs.vae_stride", "1", "--model.kwargs.vae_embed_dim", "3", "--model.kwargs.patch_size", "8",
             "--model.kwargs.num_classes", "3"]


def test_a_pixel_mar_trains_on_the_folder_without_a_tokenizer_and_samples_from_its_run(data, tmp_path):
    """`vae_stride` 1 and `vae_embed_dim` 3: the 32x32 RGB images themselves (vae_scale 1) as 4x4 tokens of
    8x8 pixels; losses fall, the grid is drawn, and `sample` draws from the run with no `--tokenizer`,
    the images those of the model's own sampler decoded as pixels."""
    from PIL import Image

    from mmgen_pytorch.sample import main as sample_main
    from mmgen_pytorch.saving import load_model

    losses = train_run("tiny-mar", tmp_path / "run", "--data.folder", str(data / "images"), *PIXEL_MAR,
                       "--train.steps", "6")
    assert len(losses) == 6 and losses[-1] < losses[0]
    model = load_model(train.checkpoint_dir(tmp_path / "run", 6))
    assert (model.vae_scale, model.token_dim) == (1.0, 3 * 8 * 8)
    with Image.open(tmp_path / "run" / "samples" / "step-0000006.png") as image:
        assert image.size == (2 * 32, 2 * 32)
    npz = sample_main([str(tmp_path / "run"), "--num", "2", "--batch-size", "2", "--out", str(tmp_path / "drawn"),
                       "--no-progress"])
    with Image.open(tmp_path / "drawn" / "images" / "000000.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    assert npz.is_file()
    with pytest.raises(SystemExit, match="^sample: .*this MAR draws pixels .*takes no tokenizer"):  # one line
        sample_main([str(tmp_path / "run"), "--tokenizer", str(data / "kl"), "--num", "2", "--out",
                     str(tmp_path / "refused"), "--no-progress"])
    assert not (tmp_path / "refused" / "sampling.json").exists()


def test_a_latent_sized_mar_without_a_tokenizer_is_told_what_would_fit(data, tmp_path):
    with pytest.raises(SystemExit, match="^config error: ") as info:
        train_run("tiny-mar", tmp_path, "--data.folder", str(data / "images"))
    message = str(info.value)
    assert all(word in message for word in ("the images themselves", "gives 32x32 and 3 channels",
                                             "`model.kwargs.vae_stride` 1", "`model.kwargs.vae_embed_dim` 3")), message
    assert not (tmp_path / train.LOG_FILE).exists()


# greyscale images: `data.channels: 1`

def test_greyscale_runs_train_a_tokenizer_its_generator_and_a_pixel_mar(data, tmp_path):
    """`data.channels 1`: a one-channel KL tokenizer trains (its discriminator and LPIPS on greyscale), a
    MonoFormer trains through it, and a MAR on the greyscale pixels themselves; every grid and `sample`'s
    PNGs are RGB images of three equal channels."""
    import numpy as np
    from PIL import Image

    from mmgen_pytorch.sample import main as sample_main
    from mmgen_pytorch.saving import load_model

    grey = ["--data.folder", str(data / "images"), "--data.channels", "1"]
    kl = train_run("tiny-kl", tmp_path / "kl", *grey, "--model.kwargs.in_channels", "1")
    assert len(kl) == 4 and all(torch.isfinite(torch.tensor(kl)))
    assert load_model(train.checkpoint_dir(tmp_path / "kl", 4)).config.in_channels == 1
    reset_accelerate_state()
    losses = train_run("tiny-monoformer", tmp_path / "mono", *grey, "--tokenizer.path", str(tmp_path / "kl"))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    reset_accelerate_state()
    pixel_mar = [*PIXEL_MAR[:2], "--model.kwargs.vae_embed_dim", "1", *PIXEL_MAR[4:]]
    losses = train_run("tiny-mar", tmp_path / "mar", *grey, *pixel_mar)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert load_model(train.checkpoint_dir(tmp_path / "mar", 4)).token_dim == 1 * 8 * 8
    for run in ("mono", "mar"):
        with Image.open(tmp_path / run / "samples" / "step-0000004.png") as image:
            pixels = np.asarray(image.convert("RGB"))
            assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    sample_main([str(tmp_path / "mar"), "--num", "2", "--batch-size", "2", "--out", str(tmp_path / "drawn"),
                 "--no-progress"])
    with Image.open(tmp_path / "drawn" / "images" / "000000.png") as image:
        assert image.size == (32, 32)


@pytest.mark.parametrize("name, options, words", [
    ("tiny-kl", ["--data.channels", "1", "--model.kwargs.in_channels", "2"],
     ["`data.channels` is 1 (images have 1 or 3)", "takes 2-channel images: set `model.kwargs.in_channels` 1"]),
    ("tiny-mar", ["--data.resolution", "16", "--model.kwargs.vae_embed_dim", "3", "--model.kwargs.patch_size", "8"],
     ["MAR without a tokenizer trains on the pixels themselves", "`model.kwargs.vae_stride` 1 (got 2)",
      "`model.kwargs.img_size` 16"]),
    ("tiny-transfusion", ["--model.kwargs.modality_default_shape", "32,32", "--model.kwargs.dim_latent", "3"],
     ["`model.kwargs.modality_default_shape` 32,32 must be an int or a list of two ints", "'[32,32]'"]),
    ("tiny-kl", ["--data.channels", "1"], ["`data.channels` is 1", "AutoencoderKL (`model.kwargs.in_channels`) takes "
                                           "3-channel", "`model.kwargs.in_channels` 1"]),
    ("tiny-mar", ["--data.channels", "1", "--tokenizer.path", "kl"], ["`data.channels` is 1", "(`tokenizer`) takes 3"]),
    ("tiny-mar", ["--data.channels", "2"], ["`data.channels` must be 3 (RGB) or 1 (greyscale), got 2"]),
])
def test_channels_the_tokenizer_cannot_take_are_refused_before_training(data, tmp_path, name, options, words):
    with pytest.raises(SystemExit, match="^config error: ") as info:
        train_run(name, tmp_path, "--data.folder", str(data / "images"), *under(data, options))
    assert all(word in str(info.value) for word in words), str(info.value)
    assert not (tmp_path / train.LOG_FILE).exists()


# Transfusion on pixels in patches: `model.kwargs.modalities`

PATCHED = ["--model.kwargs.dim_latent", "null", "--model.kwargs.modality_default_shape", "null"]


def patched_modality(channels: int = 3, size: int = 32, patch: int = 8) -> list:
    return ["--model.kwargs.modalities", f"[{{latent_channels: {channels}, latent_size: {size}, patch_size: {patch}}}]"]


def test_a_transfusion_on_pixels_in_patches_trains_draws_and_samples(data, tmp_path):
    """`model.kwargs.modalities: [{latent_channels: 3, latent_size: 32, patch_size: 8}]`: the 32x32 images
    themselves, channel-first, as 4x4 tokens of 192 features; its grid and `sample` draw 32x32 images."""
    from PIL import Image

    from mmgen_pytorch.sample import main as sample_main
    from mmgen_pytorch.saving import load_model

    losses = train_run("tiny-transfusion", tmp_path / "run", "--data.folder", str(data / "images"), *PATCHED,
                       *patched_modality())
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = load_model(train.checkpoint_dir(tmp_path / "run", 4))
    assert (model.modalities[0].default_shape, model.modalities[0].dim_latent) == ((4, 4), 192)
    with Image.open(tmp_path / "run" / "samples" / "step-0000004.png") as image:
        assert image.size == (2 * 32, 2 * 32)
    sample_main([str(tmp_path / "run"), "--num", "2", "--batch-size", "2", "--out", str(tmp_path / "drawn"),
                 "--no-progress"])
    with Image.open(tmp_path / "drawn" / "images" / "000001.png") as image:
        assert image.size == (32, 32)


@pytest.mark.parametrize("modality, words", [
    (patched_modality(size=16, patch=4), ["a 16x16 grid (`model.kwargs.modalities[0].latent_size` [16, 16])",
                                          "what would fit: `model.kwargs.modalities[0].latent_size` [32, 32]"]),
    (patched_modality(channels=1), ["1 latent channels (`model.kwargs.modalities[0].latent_channels`)",
                                    "`model.kwargs.modalities[0].latent_channels` 3"]),
    (["--model.kwargs.modalities", "[{latent_channels: 3, patch_size: 8}]"],
     ["`model.kwargs.modalities` entries must be {latent_channels, latent_size, patch_size}"]),
])
def test_a_patched_transfusion_that_does_not_fit_the_images_is_refused(data, tmp_path, modality, words):
    with pytest.raises(SystemExit, match="^config error: ") as info:
        train_run("tiny-transfusion", tmp_path, "--data.folder", str(data / "images"), *PATCHED, *modality)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert not (tmp_path / train.LOG_FILE).exists()


# the digits recipes as entry-point configs

def test_the_digits_folder_holds_the_split_with_name_captions(tmp_path):
    """`mmgen_pytorch.data.digits`: the training split as greyscale 8x8 PNGs in class folders named by the
    digit, pixels 0..16 as round(255 v / 16), each captioned with its digit's name."""
    from PIL import Image

    from mmgen_pytorch.data.digits import DIGIT_NAMES, write_digits_folder
    from mmgen_pytorch.evaluation.features import digits_split

    folder = write_digits_folder(tmp_path, split="test")
    _, x_test, _, y_test = digits_split()
    captions = [json.loads(line) for line in (tmp_path / "test-captions.jsonl").read_text().splitlines()]
    assert len(captions) == len(y_test) == 540
    for index in (0, 17, 539):
        entry = captions[index]
        assert entry == {"file": f"{y_test[index]}/{index:04d}.png", "caption": DIGIT_NAMES[y_test[index]]}
        with Image.open(folder / entry["file"]) as image:
            assert image.mode == "L" and image.size == (8, 8)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            assert (pixels == (torch.tensor(x_test[index]) * 255 / 16).round()).all()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from mmgen_pytorch.data.digits import write_digits_folder

    root = tmp_path_factory.mktemp("digits")
    write_digits_folder(root, split="train")
    return root


def test_every_digits_config_trains_on_the_digits_folder(digits, tmp_path):
    """The seven digits-* configs (five generators, two tokenizers) run two steps each on the digits, the
    code models through the tokenizer the tokenizer config just trained; every generator draws its grid."""
    short = ["--data.folder", str(digits / "train"), "--data.batch_size", "8", "--train.steps", "2",
             "--train.log_every", "1", "--train.progress", "false"]
    captions = ["--data.captions", str(digits / "train-captions.jsonl")]
    runs = [("digits-transfusion", captions), ("digits-monoformer", captions), ("digits-mar", []),
            ("digits-vqvae", []), ("digits-llamagen", ["--tokenizer.path", str(tmp_path / "digits-vqvae")]),
            ("digits-rqvae", []), ("digits-dnd", ["--tokenizer.path", str(tmp_path / "digits-rqvae")])]
    for name, extra in runs:
        losses = train_run(name, tmp_path / name, *short, *extra)
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), name
        reset_accelerate_state()
        if "vae" not in name:
            assert (tmp_path / name / "samples" / "step-0000002.png").is_file(), name
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import score_digits_run

    for name in ("digits-transfusion", "digits-llamagen"):  # scored as the digits job scores its recipes
        report = score_digits_run.score(str(tmp_path / name), seeds=(0, 1), num=20, captions=4)
        assert set(report["seeds"]) == {"0", "1"} and 0 <= report["mean"]["conditional_accuracy"] <= 1
        assert report["weights"] == "ema" and report["mean"]["frechet_distance"] > 0
    assert "caption_accuracy" in score_digits_run.score(str(tmp_path / "digits-transfusion"), seeds=(0,), num=10,
                                                        captions=4)
    assert report["tokenizer_rfid"] > 0  # LlamaGen's VQVAE
