"""mmgen_pytorch.evaluation on inputs whose scores are known: FID of a set against itself and under growing
noise, FD against scipy's sqrtm, IS of synthetic logits, precision / recall of synthetic mode coverage
(and against a brute-force numpy version), the reference-statistics cache, and the error paths (Inception
itself cannot run here: torch-fidelity needs a torchvision that loads with this torch build)."""

import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from mmgen_pytorch._utils import install_hint
from mmgen_pytorch.evaluation import (INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, FeatureStats, PCAExtractor,
                                      TinyConvExtractor, evaluate, feature_stats, frechet_distance,
                                      image_folder_batches, inception_score, inception_v3, precision_recall,
                                      reconstruction_fid, reference_stats)


def smooth_images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Float images (count, 3, size, size) in [48, 208]: upsampled 4x4 noise, so added noise is what changes."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=size, mode="bilinear") * 160 + 48


def as_batches(images: torch.Tensor, size: int = 64) -> list:
    return list(images.round().clamp(0, 255).to(torch.uint8).split(size))


def never_iterated():
    raise AssertionError("the batches were read although the call should have failed or used the cache first")
    yield  # noqa: unreachable: makes this a generator


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The brute-force reference: np.cov and scipy's sqrtm (the digits scorer's former computation)."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


@pytest.fixture(scope="module")
def extractor():
    return TinyConvExtractor(num_classes=10)


@pytest.fixture(scope="module")
def reference(extractor):
    return feature_stats(as_batches(smooth_images(256)), extractor)


# --- FID ------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(extractor, reference):
    scores = evaluate(as_batches(smooth_images(256)), reference, extractor)
    assert scores["num_samples"] == 256
    assert abs(scores["fid"]) <= 1e-9 * float(reference.sigma.trace())
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0


def test_fid_grows_monotonically_with_added_noise(extractor, reference):
    images, noise = smooth_images(256), torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fids = [evaluate(as_batches(images + level * noise), reference, extractor, metrics=["fid"])["fid"]
            for level in (0, 5, 15, 40, 80)]
    assert all(low < high for low, high in zip(fids, fids[1:])), fids


def test_frechet_distance_matches_scipy_sqrtm():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=generator, dtype=torch.float64)
    a = torch.randn(400, 24, generator=generator, dtype=torch.float64) @ mixing
    b = torch.randn(300, 24, generator=generator, dtype=torch.float64) @ (mixing * 1.3) + 0.5
    ours = frechet_distance(FeatureStats.from_features(a, extractor="x"), FeatureStats.from_features(b, extractor="x"))
    assert ours == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)


def test_frechet_distance_refuses_statistics_of_two_extractors():
    features = torch.randn(10, 4)
    with pytest.raises(ValueError, match="'one'.*'two'"):
        frechet_distance(FeatureStats.from_features(features, extractor="one"),
                         FeatureStats.from_features(features, extractor="two"))


# --- IS -------------------------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(1000, 10))
    assert mean == pytest.approx(1.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    logits = 30.0 * F.one_hot(torch.arange(10_000) % 10, 10).float()
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-4) and np.isnan(std)  # one split: no spread
    assert inception_score(logits)[0] == pytest.approx(10.0, rel=1e-2)  # 10 random splits: nearly balanced each
    assert inception_score(logits[::2], splits=1)[0] == pytest.approx(5.0, rel=1e-4)  # the even classes only


# --- precision / recall ---------------------------------------------------------------------------------


def clusters(modes: int, count: int, centres: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(count, centres.shape[1], generator=torch.Generator().manual_seed(seed))
    return centres[torch.arange(count) % modes] + noise


def test_precision_recall_of_identical_and_of_disjoint_sets():
    points = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(points, points.clone()) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(points, points + 1000.0) == {"precision": 0.0, "recall": 0.0}


def test_a_set_covering_half_the_modes_has_half_the_recall():
    centres = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) * 100
    real = clusters(10, 2000, centres, seed=1)
    full = precision_recall(real, clusters(10, 2000, centres, seed=2))
    half = precision_recall(real, clusters(5, 1000, centres, seed=3))
    assert full["recall"] > 0.9 and half["precision"] > 0.9
    assert half["recall"] / full["recall"] == pytest.approx(0.5, abs=0.03)


def test_precision_recall_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(120, 5, generator=generator), torch.randn(90, 5, generator=generator) * 1.2 + 0.3
    distances = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    r, f = real.double().numpy(), fake.double().numpy()
    radii_r, radii_f = np.sort(distances(r, r), 1)[:, 3], np.sort(distances(f, f), 1)[:, 3]
    expected = {"precision": (distances(f, r) <= radii_r[None]).any(1).mean(),
                "recall": (distances(r, f) <= radii_f[None]).any(1).mean()}
    assert precision_recall(real, fake, chunk=32) == pytest.approx(expected, abs=1 / 120)  # a float32 tie at most


# --- reference statistics -------------------------------------------------------------------------------


def test_reference_cache_round_trip_and_refusal_of_another_extractor(extractor, tmp_path):
    cache = tmp_path / "ref.npz"
    made = reference_stats(as_batches(smooth_images(100)), extractor, cache=cache, max_features=40)
    loaded = reference_stats(never_iterated(), extractor, cache=cache)
    assert loaded.count == made.count == 100 and loaded.extractor == made.extractor == extractor.identity
    for name in ("mu", "sigma", "features"):
        assert torch.equal(getattr(loaded, name), getattr(made, name))
    assert loaded.features.shape == (40, extractor.num_features)
    other = TinyConvExtractor(num_classes=10, seed=1)
    with pytest.raises(ValueError, match=r"tiny-random-conv\(seed=0\).*tiny-random-conv\(seed=1\)"):
        reference_stats(never_iterated(), other, cache=cache)
    with pytest.raises(ValueError, match="seed=1"):
        evaluate(never_iterated(), loaded, other)
    with pytest.raises(FileNotFoundError, match="`cache`.*no-folder"):
        reference_stats(never_iterated(), extractor, cache=tmp_path / "no-folder" / "ref.npz")


def test_reference_cache_records_its_resolution_and_folder_and_refuses_others(extractor, tmp_path):
    cache = tmp_path / "ref.npz"
    made = reference_stats(as_batches(smooth_images(20)), extractor, cache=cache, resolution=16, source="/data/a")
    loaded = reference_stats(never_iterated(), extractor, cache=cache, resolution=16, source="/data/a")
    assert (made.resolution, made.source) == (loaded.resolution, loaded.source) == (16, "/data/a")
    with pytest.raises(ValueError, match=r"ref\.npz.*resized to 16x16, but 32x32 are asked"):
        reference_stats(never_iterated(), extractor, cache=cache, resolution=32, source="/data/a")
    with pytest.raises(ValueError, match=r"ref\.npz.*folder '/data/a', not from '/data/b'"):
        reference_stats(never_iterated(), extractor, cache=cache, resolution=16, source="/data/b")


def test_a_cache_recording_no_resolution_is_refused_when_one_is_asked(extractor, tmp_path):
    cache = tmp_path / "old.npz"
    reference_stats(as_batches(smooth_images(20)), extractor, cache=cache)  # as an older version wrote it
    assert FeatureStats.load(cache).resolution is None
    with pytest.raises(ValueError, match=r"old\.npz.*do not record the resolution.*delete the file.*16x16"):
        reference_stats(never_iterated(), extractor, cache=cache, resolution=16)


def test_a_file_that_is_not_our_statistics_is_refused_by_name(tmp_path):
    path = tmp_path / "adm.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"adm\.npz.*\['count', 'features', 'extractor'\]"):
        FeatureStats.load(path)
    for name, write in (("garbage.npz", lambda p: p.write_bytes(b"not an archive")),
                        ("array.npy", lambda p: np.save(p, np.zeros(3)))):
        write(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}.*not an .npz"):
            FeatureStats.load(tmp_path / name)


def test_image_folder_batches_give_the_files_pixels(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pixels = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for index, image in enumerate(pixels):
        Image.fromarray(image.numpy()).save(tmp_path / f"{index}.png")
    (batch,) = image_folder_batches(tmp_path, resolution=16, batch_size=8)
    assert batch.dtype == torch.uint8 and torch.equal(batch, pixels.permute(0, 3, 1, 2))


# --- rFID -----------------------------------------------------------------------------------------------


def test_reconstruction_fid_is_zero_for_a_perfect_tokenizer_and_grows_with_its_error(extractor):
    batches = as_batches(smooth_images(128))
    assert abs(reconstruction_fid(batches, lambda images: images, extractor)) < 1e-12
    blurred = reconstruction_fid(batches, lambda images: F.avg_pool2d(images, 3, 1, 1), extractor)
    more = reconstruction_fid(batches, lambda images: F.avg_pool2d(images, 5, 1, 2), extractor)
    assert 0 < blurred < more


def test_a_greyscale_tokenizer_reconstructs_the_luma_and_is_scored_against_it(extractor):
    """A tokenizer whose ``config.in_channels`` is 1 gets the originals' luma ``[n, 1, h, w]``; returning it
    unchanged scores 0 (both sides greyscale), and a blur of it more."""
    from types import SimpleNamespace

    class GreyTokenizer(torch.nn.Module):
        config = SimpleNamespace(in_channels=1)

        def __init__(self, blur: int = 0):
            super().__init__()
            self.blur = blur

        def forward(self, images):
            assert images.shape[1] == 1
            return F.avg_pool2d(images, 2 * self.blur + 1, 1, self.blur) if self.blur else images

    batches = as_batches(smooth_images(128))
    assert abs(reconstruction_fid(batches, GreyTokenizer(), extractor)) < 1e-9
    assert reconstruction_fid(batches, GreyTokenizer(blur=1), extractor) > 0


def test_reconstruction_fid_runs_a_tokenizer_in_eval_mode():
    from mmgen_pytorch.tokenizers import AutoencoderKL
    from mmgen_pytorch.tokenizers.kl import KLConfig

    tokenizer = AutoencoderKL(KLConfig(embed_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, encoder_attn_levels=(),
                                       decoder_attn_levels=())).train()
    fid = reconstruction_fid(as_batches(smooth_images(16), 8), tokenizer, TinyConvExtractor())
    assert fid > 0 and tokenizer.training  # the posterior mode, deterministic; its training flag restored


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, error, match", [
    (torch.zeros(4, 3, 16, 16), TypeError, r"`generated_batches\[0\]` must be a uint8 tensor.*float32"),
    (torch.zeros(4, 1, 16, 16, dtype=torch.uint8), ValueError, r"`generated_batches\[0\]`.*\(N, 3, H, W\)"),
    (torch.zeros(16, 16, dtype=torch.uint8), ValueError, r"`generated_batches\[0\]`.*\(N, 3, H, W\)"),
])
def test_wrong_images_are_refused_by_name(extractor, reference, batch, error, match):
    with pytest.raises(error, match=match):
        evaluate([batch], reference, extractor)


def test_bad_options_are_refused_before_reading_any_batch(extractor, reference):
    with pytest.raises(TypeError, match="`generated_batches`.*single tensor"):
        evaluate(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), reference, extractor)
    with pytest.raises(ValueError, match="`metrics`.*'kid'"):
        evaluate(never_iterated(), reference, extractor, metrics=["fid", "kid"])
    with pytest.raises(ValueError, match="'is'.*no logits"):
        no_logits = TinyConvExtractor()
        evaluate(never_iterated(), feature_stats(as_batches(smooth_images(8)), no_logits), no_logits, metrics=["is"])
    with pytest.raises(ValueError, match="precision / recall.*keeps 0 features"):
        evaluate(never_iterated(), feature_stats(as_batches(smooth_images(8)), extractor, max_features=0), extractor,
                 metrics=["recall"])


def test_the_pca_extractor_names_the_image_size_it_takes():
    pca = PCAExtractor(mean=np.zeros(64), components=np.eye(64)[:5], image_size=8, pixel_max=16.0, name="pca")
    with pytest.raises(ValueError, match="`images` must be 8x8 images"):
        pca(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert pca(torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)).tolist() == [[16.0] * 5] * 2


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=f"nowhere.pth.*{INCEPTION_WEIGHTS_FILE}"):
        inception_v3(missing)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=f"{INCEPTION_WEIGHTS_ENV}.*nowhere.pth"):
        inception_v3()


def test_a_file_that_is_not_the_inception_state_dict_is_refused_by_name(tmp_path):
    garbage, other = tmp_path / "garbage.pth", tmp_path / "other.pth"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, other)
    with pytest.raises(ValueError, match="garbage.pth.*weights_only=True"):
        inception_v3(garbage)
    with pytest.raises(ValueError, match=r"other.pth.*fc.weight.*\(1008, 2048\)"):
        inception_v3(other)


def test_missing_torch_fidelity_names_the_package_and_extra(tmp_path, monkeypatch):
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, weights)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match="torch-fidelity.*" + re.escape(install_hint("inception"))):
        inception_v3(weights)


def test_missing_torchmetrics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)
    with pytest.raises(ImportError, match="torchmetrics.*" + re.escape(install_hint("eval"))):
        FeatureStats.from_features(torch.randn(4, 2), extractor="x")


def test_one_pixel_conversion_for_datasets_samples_and_metrics():
    """The metrics' [-1, 1] -> uint8, the sampled PNGs' [0, 1] -> uint8 and the datasets' uint8 -> [-1, 1] are
    one conversion: every level survives the round trip, and images_to_uint8 equals the PNGs' path on values
    where round(127.5 x + 127.5) and round(255 (x + 1) / 2) differ in float32."""
    from PIL import Image

    import mmgen_pytorch.training.recipes as recipes
    from mmgen_pytorch.data.images import images_to_unit, to_tensor_image, uint8_to_images, unit_to_uint8
    from mmgen_pytorch.evaluation import images_to_uint8

    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    from_file = to_tensor_image(Image.fromarray(levels[0].permute(1, 2, 0).numpy()))
    assert torch.equal(from_file, uint8_to_images(levels)[0])
    assert torch.equal(images_to_uint8(from_file[None]), levels)
    values = torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    assert torch.equal(images_to_uint8(values), unit_to_uint8(images_to_unit(values)))
    assert not hasattr(recipes, "to_uint8") and not hasattr(recipes, "_to_unit")
