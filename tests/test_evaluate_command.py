"""python -m mmgen_pytorch.evaluate and metrics during training, with the tiny random extractor: the command on
a sample folder, an ADM .npz and an image folder against an image-folder reference (FID == scipy's from the
extractor's features), ADM references with mu / sigma only (FID, no precision / recall, said so) and with
both, a run folder sampled then scored end to end, bad arguments refused before anything loads; training
with an `eval` section logs finite metrics at its steps without changing the training losses, and resumes
bit-identically."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("PIL")
pytest.importorskip("torchmetrics")

from mmgen_pytorch import LlamaGen, evaluate, sample, train  # noqa: E402
from mmgen_pytorch.evaluation import build_extractor, sources  # noqa: E402
from mmgen_pytorch.evaluation.adm_npz import load_adm_npz  # noqa: E402
from mmgen_pytorch.tokenizers import VQVAE, AutoencoderKL, KLConfig, VQConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230)]


def write_images(folder: Path, count: int, *, seed: int, classes: bool = False, size: int = 32) -> Path:
    """``count`` noisy colour squares (class sub-folders when ``classes``)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        label = index % len(COLOURS)
        noise = torch.randint(0, 80, (size, size, 3), generator=generator)
        pixels = (torch.tensor(COLOURS[label]) * 0.7 + noise).clamp(0, 255).to(torch.uint8).numpy()
        target = folder / f"class{label}" if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"{index:03d}.png")
    return folder


def folder_pixels(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(file).convert("RGB")) for file in sorted(folder.rglob("*.png"))])


def tiny_features(pixels: np.ndarray) -> np.ndarray:
    """The tiny extractor's features of uint8 [N, H, W, 3] images, float64."""
    return build_extractor("tiny")(torch.from_numpy(pixels).permute(0, 3, 1, 2)).double().numpy()


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("reference"), 24, seed=1, classes=True)


@pytest.fixture(scope="module")
def llamagen_run(tmp_path_factory):
    """A training output folder of a tiny c2i LlamaGen (4 classes) with EMA weights, its VQ tokenizer."""
    pytest.importorskip("ema_pytorch")
    from _helpers import fake_llamagen_run

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2, 2, 2),
                        decoder_ch_mult=(1, 2, 2, 2), z_channels=16, num_res_blocks=1, usage_window=256))
    kwargs = yaml.safe_load((ROOT / "mmgen_pytorch" / "configs" / "tiny-llamagen.yaml").read_text())["model"]["kwargs"]
    fake_llamagen_run(root, LlamaGen(**kwargs), vq)
    return root / "run"


@pytest.fixture(scope="module")
def scored_run(llamagen_run, reference, tmp_path_factory):
    """The run folder sampled (20 images, the CLI's sampling flags) and scored in one command."""
    out = tmp_path_factory.mktemp("scored") / "samples"
    report = evaluate.main([str(llamagen_run), "--reference", str(reference), "--extractor", "tiny", "--out", str(out),
                            "--num", "20", "--batch-size", "10", "--cfg", "2.0", "--no-progress",
                            "--eval-batch-size", "7"])
    return out, report


# the command


def test_run_folder_is_sampled_then_scored(scored_run, reference, capsys):
    out, report = scored_run
    assert json.loads((out / "metrics.json").read_text()) == report
    assert json.loads((out / "sampling.json").read_text())["weights"] == "ema"
    assert report["num_samples"] == 20 and report["generated_kind"] == sources.SAMPLE_FOLDER
    assert set(report["metrics"]) == {"fid", "is", "is_std", "precision", "recall"}
    assert all(math.isfinite(value) for value in report["metrics"].values())
    expected = scipy_fid(tiny_features(folder_pixels(reference)), tiny_features(folder_pixels(out / "images")))
    assert report["metrics"]["fid"] == pytest.approx(expected, rel=1e-5)


def test_sample_folder_npz_and_png_folder_give_the_same_scores(scored_run, reference, tmp_path, capsys):
    out, report = scored_run
    again = evaluate.main([str(out), "--reference", str(reference), "--extractor", "tiny", "--out", str(tmp_path / "a")])
    npz = next(out.glob("samples_*.npz"))
    from_npz = evaluate.main([str(npz), "--reference", str(reference), "--extractor", "tiny",
                              "--out", str(tmp_path / "b"), "--eval-batch-size", "3"])
    from_pngs = evaluate.main([str(out / "images"), "--reference", str(reference), "--extractor", "tiny",
                               "--out", str(tmp_path / "c")])
    for other in (again, from_npz, from_pngs):
        assert other["metrics"] == pytest.approx(report["metrics"], rel=1e-6)
    assert from_npz["generated_kind"] == sources.ADM_NPZ and from_pngs["generated_kind"] == sources.IMAGE_FOLDER
    printed = capsys.readouterr().out
    assert "| metric | value |" in printed and "| FID |" in printed and "| Precision |" in printed
    assert np.array_equal(load_adm_npz(npz).images, folder_pixels(out / "images"))


def test_adm_reference_with_mu_sigma_only_gives_fid_and_says_why_not_precision(scored_run, reference, tmp_path,
                                                                              capsys):
    out, report = scored_run
    features = tiny_features(folder_pixels(reference))
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    result = evaluate.main([str(out), "--reference", str(tmp_path / "ref.npz"), "--extractor", "tiny",
                            "--out", str(tmp_path)])
    assert set(result["metrics"]) == {"fid", "is", "is_std"}
    assert result["metrics"]["fid"] == pytest.approx(report["metrics"]["fid"], rel=1e-6)
    assert any("precision / recall not computed" in note and "mu / sigma" in note for note in result["notes"])
    printed = capsys.readouterr().out
    assert "precision / recall not computed" in printed and "| Precision |" not in printed
    assert json.loads((tmp_path / "metrics.json").read_text())["notes"] == result["notes"]


def test_adm_reference_with_images_and_mu_sigma_takes_fid_from_mu_sigma(scored_run, reference, tmp_path):
    """As ADM's evaluator: the file's mu / sigma for the FID (here the generated set's own: FID ~ 0), its
    images for precision / recall."""
    out, report = scored_run
    generated = tiny_features(folder_pixels(out / "images"))
    np.savez(tmp_path / "ref.npz", folder_pixels(reference), mu=generated.mean(0), sigma=np.cov(generated, rowvar=False))
    result = evaluate.main([str(out), "--reference", str(tmp_path / "ref.npz"), "--extractor", "tiny", "--out",
                            str(tmp_path)])
    scale = np.abs(generated).max() ** 2
    assert abs(result["metrics"]["fid"]) < 1e-6 * scale < report["metrics"]["fid"]
    assert result["metrics"]["precision"] == pytest.approx(report["metrics"]["precision"])
    assert result["metrics"]["recall"] == pytest.approx(report["metrics"]["recall"])


def test_reference_cache_is_written_then_read(scored_run, reference, tmp_path):
    out, report = scored_run
    args = [str(out), "--reference", str(reference), "--extractor", "tiny", "--reference-cache",
            str(tmp_path / "stats.npz"), "--out", str(tmp_path)]
    first = evaluate.main(args)
    assert (tmp_path / "stats.npz").is_file()
    from_stats = evaluate.main([str(out), "--reference", str(tmp_path / "stats.npz"), "--extractor", "tiny", "--out",
                                str(tmp_path)])
    assert first["metrics"] == from_stats["metrics"] == pytest.approx(report["metrics"], rel=1e-6)
    assert from_stats["reference_kind"] == sources.STATISTICS


def test_a_reference_cache_of_another_resolution_or_an_old_one_is_refused_before_loading(reference, tmp_path,
                                                                                        monkeypatch):
    def not_loaded(*args, **kwargs):
        raise AssertionError("loaded the extractor before checking the reference cache")
    large, small = write_images(tmp_path / "large", 6, seed=2), write_images(tmp_path / "small", 6, seed=3, size=16)
    cache = tmp_path / "ref.npz"
    base = ["--reference", str(reference), "--extractor", "tiny", "--reference-cache", str(cache)]
    assert evaluate.main([str(large), *base, "--out", str(tmp_path / "a")])["reference_resolution"] == 32
    monkeypatch.setattr("mmgen_pytorch.evaluation.features.build_extractor", not_loaded)
    with pytest.raises(SystemExit, match=r"ref\.npz.*resized to 32x32, but 16x16 are asked"):
        evaluate.main([str(small), *base, "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match=r"ref\.npz.*come from the reference folder .*, not from .*large"):
        evaluate.main([str(large), *base[:1], str(large), *base[2:], "--out", str(tmp_path / "c")])
    with np.load(cache) as data:  # as an older version wrote it: no resolution, no folder
        np.savez(cache, **{key: data[key] for key in ("mu", "sigma", "count", "features", "extractor")})
    with pytest.raises(SystemExit, match=r"ref\.npz.*do not record the resolution.*delete the file"):
        evaluate.main([str(large), *base, "--out", str(tmp_path / "d")])
    assert not any((tmp_path / name / "metrics.json").exists() for name in "bcd")


@pytest.mark.parametrize("size, words", [
    (48, r"the first: 48x48\) are resized down and centre-cropped to 32x32"),
    (16, r"WARNING: .*the first: 16x16\) are UPSCALED to 32x32: FID against upscaled references is not comparable"),
])
def test_a_reference_folder_of_another_size_is_resized_and_said_so(tmp_path, capsys, size, words):
    generated = write_images(tmp_path / "generated", 6, seed=2)
    other = write_images(tmp_path / "reference", 6, seed=1, size=size)
    report = evaluate.main([str(generated), "--reference", str(other), "--extractor", "tiny"])
    assert report["reference_resolution"] == 32 and report["reference_resized_from"] == [size, size]
    assert json.loads((generated / "metrics.json").read_text())["reference_resized_from"] == [size, size]
    assert any(re.search(words, note) for note in report["notes"])
    assert re.search(words, capsys.readouterr().out)


@pytest.mark.parametrize("flags, words", [
    (["{missing}"], "GENERATED .* does not exist"),
    (["{samples}", "--reference", "{missing}"], "--reference .* does not exist"),
    (["{samples}", "--reference", "{text}"], "must be an image folder or an .npz"),
    (["{samples}", "--reference", "{other_npz}"], r"holds \['x'\]: expected ADM's reference batch"),
    (["{samples}", "--reference", "{inception_npz}"], "statistics of 2048 features, but the extractor gives 16"),
    (["{samples}", "--reference", "{small_npz}"], "holds 8x8 images but the images of GENERATED .* are 32x32"),
    (["{samples}", "--reference-cache", "{missing}/stats.npz"], "--reference-cache.* must be a statistics file"),
    (["{samples}", "--reference", "{inception_npz}", "--reference-cache", "{text}"],
     "--reference-cache goes with an image-folder reference"),
    (["{samples}", "--cfg", "2.0", "--seed", "3"], "--seed, --cfg: sampling flags, but GENERATED"),
    (["{samples}", "--inception-weights", "{text}"], "--inception-weights` goes with the inception extractor"),
    (["{samples}", "--eval-batch-size", "0"], "`--eval-batch-size` must be a positive int"),
    (["{partial}"], "1 of its 20 images are not written"),
    (["{run}"], "--out: GENERATED is a run / model folder"),
    (["{run}", "--out", "{fresh}", "--preset", "mar-z"], "--preset must be one of"),
    (["{run}", "--out", "{fresh}", "--num", "4", "--steps", "3"], "--steps: LlamaGen's sampler has no such option"),
    (["{run}", "--out", "{text}", "--num", "4"], "--out .* is a file"),
    (["{run}", "--out", "{fresh}", "--num", "4", "--reference", "{small_npz}"],
     r"holds 8x8 images but SOURCE's images \(data.resolution 32\) are 32x32"),
    (["{run}", "--out", "{fresh}", "--num", "4", "--extractor", "pca-digits"],
     r"`--extractor` pca-digits takes 8x8 images, but SOURCE's images \(data.resolution 32\) are 32x32"),
    (["{samples}", "--extractor", "pca-digits"], "`--extractor` pca-digits takes 8x8 images, but the images of GENERATED"),
])
def test_bad_arguments_are_refused_before_loading(scored_run, llamagen_run, reference, tmp_path, monkeypatch,
                                                  flags, words):
    def not_loaded(*args, **kwargs):
        raise AssertionError("loaded an extractor or a model before checking the arguments")
    monkeypatch.setattr(sample, "load_for_sampling", not_loaded)
    monkeypatch.setattr("mmgen_pytorch.evaluation.features.build_extractor", not_loaded)
    out = scored_run[0]
    (tmp_path / "ref.txt").write_text("")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "small.npz", np.zeros((4, 8, 8, 3), dtype=np.uint8))
    shutil.copytree(out, tmp_path / "partial", ignore=shutil.ignore_patterns("*.npz", "metrics.json"))
    (tmp_path / "partial" / "images" / "000007.png").unlink()
    names = dict(missing=str(tmp_path / "missing"), samples=str(out), text=str(tmp_path / "ref.txt"),
                 other_npz=str(tmp_path / "other.npz"), inception_npz=str(tmp_path / "inception.npz"),
                 small_npz=str(tmp_path / "small.npz"), partial=str(tmp_path / "partial"), run=str(llamagen_run),
                 fresh=str(tmp_path / "fresh"))
    argv = [flag.format(**names) for flag in flags]
    if "--reference" not in argv:
        argv += ["--reference", str(reference)]
    with pytest.raises(SystemExit, match=words):
        evaluate.main(argv if "--extractor" in argv else [*argv, "--extractor", "tiny"])
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "partial" / "metrics.json").exists()


@pytest.mark.parametrize("flags, module, words", [
    ([], "torch_fidelity", r"^evaluate: `--extractor` inception \(the default\): the Inception extractor needs "
                           r"torch-fidelity.*\[inception\].*; or choose `--extractor` pca-digits .*tiny"),
    (["--extractor", "pca-digits"], "sklearn.decomposition",
     r"^evaluate: `--extractor` pca-digits: the digits extractor needs scikit-learn.*; or choose `--extractor` "
     r"inception .*tiny"),
])
def test_a_missing_extractor_package_is_one_line_before_any_image_is_read(scored_run, reference, monkeypatch,
                                                                          flags, module, words):
    def not_read(*args, **kwargs):
        raise AssertionError("read images before checking the extractor's packages")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    monkeypatch.setattr(sources, "open_generated", not_read)
    monkeypatch.setattr(sources, "open_reference", not_read)
    with pytest.raises(SystemExit, match=words) as raised:
        evaluate.main([str(scored_run[0]), "--reference", str(reference), *flags])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("flags, words", [
    (["--reference", "{small_npz}"], r"holds 8x8 images but SOURCE's images \(the model draws 32x32\) are 32x32"),
    (["--extractor", "pca-digits"], r"`--extractor` pca-digits takes 8x8 images, but SOURCE's images \(the model "
                                    r"draws 32x32\) are 32x32"),
])
def test_a_saved_model_folder_of_the_wrong_size_is_refused_before_drawing(reference, tmp_path, monkeypatch, flags,
                                                                          words):
    """A save_pretrained folder's image size is known once loaded: checked then, as a run folder's is before."""
    from mmgen_pytorch.evaluation import sampling

    torch.manual_seed(0)
    vq = VQVAE(VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2, 2, 2),
                        decoder_ch_mult=(1, 2, 2, 2), z_channels=16, num_res_blocks=1, usage_window=256))
    kwargs = yaml.safe_load((ROOT / "mmgen_pytorch" / "configs" / "tiny-llamagen.yaml").read_text())["model"]["kwargs"]
    LlamaGen(**kwargs).save_pretrained(tmp_path / "model")
    vq.save(tmp_path / "vq")
    np.savez(tmp_path / "small.npz", np.zeros((4, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(sampling, "generate_images", lambda *args, **kwargs: pytest.fail("drew an image"))
    argv = [str(tmp_path / "model"), "--tokenizer", str(tmp_path / "vq"), "--num", "2", "--out", str(tmp_path / "out"),
            *[flag.format(small_npz=tmp_path / "small.npz") for flag in flags]]
    argv += [] if "--reference" in argv else ["--reference", str(reference)]
    argv += [] if "--extractor" in argv else ["--extractor", "tiny"]
    with pytest.raises(SystemExit, match="^evaluate: .*" + words):
        evaluate.main(argv)
    assert not (tmp_path / "out").exists()


# metrics during training


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """24 class-folder images (32x32), a tiny KL tokenizer and its latent cache, a held-out folder."""
    from mmgen_pytorch.data import ImageFolderDataset, cache_dataset

    root = tmp_path_factory.mktemp("train")
    write_images(root / "images", 24, seed=0, classes=True)
    write_images(root / "held-out", 12, seed=5)
    torch.manual_seed(0)
    kl = AutoencoderKL(KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(),
                                decoder_attn_levels=()))
    kl.save(root / "kl")
    images = ImageFolderDataset(root / "images", resolution=32, random_flip=False)
    cache_dataset(images, kl.eval(), root / "cache", batch_size=24, progress=False)
    return root


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def log_lines(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def eval_lines(out: Path) -> dict:
    return {entry["step"]: entry for entry in log_lines(out) if "eval/fid" in entry or "eval/rfid" in entry}


def test_training_with_eval_logs_metrics_and_keeps_the_losses_and_the_resume(train_data, tmp_path, monkeypatch):
    """4 steps with metrics at steps 2 and 4 == 4 steps without (losses); resumed at 2 == straight. The
    evaluation's sampler is made to draw from torch's global RNG too: scoring must leave it as it was."""
    from mmgen_pytorch.evaluation import sampling

    draw = sampling.generate_images

    def drawing_from_the_global_rng(*args, **kwargs):
        torch.rand(3)
        return draw(*args, **kwargs)
    monkeypatch.setattr(sampling, "generate_images", drawing_from_the_global_rng)
    common = ["tiny-mar", "--data.cache", str(train_data / "cache"), "--tokenizer.path", str(train_data / "kl"),
              "--train.checkpoint_every", "2", "--train.tracker", "none"]
    scored = ["--eval.every", "2", "--eval.num_samples", "6", "--eval.batch_size", "4", "--eval.extractor", "tiny",
              "--eval.reference", str(train_data / "images")]
    plain = train.main([*common, "--train.output_dir", str(tmp_path / "plain")])
    with_eval = train.main([*common, *scored, "--train.output_dir", str(tmp_path / "eval")])
    assert with_eval == plain  # scoring draws nothing from the training RNG streams
    logged = eval_lines(tmp_path / "eval")
    assert sorted(logged) == [2, 4] and not eval_lines(tmp_path / "plain")
    for entry in logged.values():
        assert {"eval/fid", "eval/precision", "eval/recall"} <= set(entry) and "loss" not in entry
        assert all(math.isfinite(entry[key]) for key in ("eval/fid", "eval/precision", "eval/recall"))
    assert logged[2]["eval/fid"] != logged[4]["eval/fid"]  # the EMA moved
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(train.checkpoint_dir(tmp_path / "eval", 2), train.checkpoint_dir(resumed_dir, 2))
    shutil.copy(tmp_path / "eval" / "config.yaml", resumed_dir / "config.yaml")
    resumed = train.main([*common, *scored, "--train.output_dir", str(resumed_dir), "--resume"])
    assert resumed == with_eval[2:]
    assert eval_lines(resumed_dir)[4] == logged[4]


def test_tokenizer_training_logs_rfid_of_the_held_out_images(train_data, tmp_path):
    train.main(["tiny-vqgan", "--data.folder", str(train_data / "images"), "--train.steps", "2",
                "--train.output_dir", str(tmp_path), "--train.tracker", "none", "--eval.every", "1",
                "--eval.num_samples", "5", "--eval.batch_size", "3", "--eval.extractor", "tiny",
                "--eval.reference", str(train_data / "held-out")])
    logged = eval_lines(tmp_path)
    assert sorted(logged) == [1, 2] and all(math.isfinite(entry["eval/rfid"]) and entry["eval/rfid"] > 0
                                            for entry in logged.values())


@pytest.mark.parametrize("overrides, words", [
    (["--eval.every", "2"], "`eval.every` is 2: give `eval.reference`"),
    (["--eval.every", "-1"], "`eval.every` must be >= 0"),
    (["--eval.num_samples", "1"], "`eval.num_samples` must be >= 2"),
    (["--eval.extractor", "clip"], r"`eval.extractor` must be one of \['inception', 'pca-digits', 'tiny'\]"),
    (["--eval.extractor", "tiny", "--eval.inception_weights", "w.pth"], "`eval.inception_weights` goes with"),
])
def test_eval_config_errors_name_the_key(overrides, words):
    from mmgen_pytorch.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words):
        load_config("tiny-mar", ["--data.cache", "x", *overrides])


def test_eval_reference_problems_are_refused_before_building(train_data, tmp_path, monkeypatch):
    def not_built(*args, **kwargs):
        raise AssertionError("built the model before checking the eval section")
    monkeypatch.setattr(train, "build", not_built)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(16), sigma=np.eye(16))
    base = ["--train.output_dir", str(tmp_path / "out"), "--eval.every", "1", "--eval.extractor", "tiny"]
    with pytest.raises(SystemExit, match="`eval.reference` .* does not exist"):
        train.main(["tiny-mar", "--data.cache", "x", *base, "--eval.reference", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="a tokenizer is scored by the rFID .* must hold images"):
        train.main(["tiny-vqgan", "--data.folder", "x", *base, "--eval.reference", str(tmp_path / "stats.npz")])
    with pytest.raises(SystemExit, match="holds 32x32 images but the images .*data.resolution. 16"):
        np.savez(tmp_path / "big.npz", np.zeros((4, 32, 32, 3), dtype=np.uint8))
        train.main(["tiny-vqgan", "--data.folder", "x", *base, "--eval.reference", str(tmp_path / "big.npz")])
    with pytest.raises(SystemExit, match="`eval.extractor` pca-digits takes 8x8 images, but the images "
                                         r"\(`data.resolution` 16\) are 16x16"):
        train.main(["tiny-vqgan", "--data.folder", "x", *base, "--eval.extractor", "pca-digits",
                    "--eval.reference", str(tmp_path / "big.npz")])
