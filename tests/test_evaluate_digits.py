"""The digits scorer (`examples/evaluate_digits.py`) on inputs whose scores are known: real held-out
digits, copies of the training digits, and noise."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import evaluate_digits  # noqa: E402


@pytest.fixture(scope="module")
def data():
    x_train, x_test, y_train, y_test = evaluate_digits.split()
    return x_train.reshape(-1, 8, 8) / 16.0, y_train, x_test.reshape(-1, 8, 8) / 16.0, y_test


def test_real_heldout_digits_score_like_real_data(data):
    _, _, images, labels = data
    scores = evaluate_digits.evaluate(images, labels)
    assert scores["conditional_accuracy"] == pytest.approx(scores["classifier_heldout_accuracy"])
    assert scores["classifier_heldout_accuracy"] > 0.98
    assert scores["frechet_distance"] < 1e-6  # the same set as the reference
    assert scores["nearest_train_distance"] == pytest.approx(scores["nearest_train_distance_real"])
    assert 12 < scores["nearest_train_distance_real"] < 22


def test_copies_of_training_digits_are_flagged_as_memorised(data):
    images, labels, _, _ = data
    scores = evaluate_digits.evaluate(images[:500], labels[:500])
    assert scores["nearest_train_distance"] == pytest.approx(0.0, abs=1e-5)
    assert scores["frechet_distance"] < 2 * scores["frechet_floor_real"]  # the FD alone cannot tell


def test_nearest_distance_matches_brute_force(data):
    images, _, heldout, _ = data
    x_train = images.reshape(len(images), 64) * 16
    pixels = heldout[:50].reshape(50, 64) * 16
    brute = np.median([min(np.linalg.norm(p - t) for t in x_train) for p in pixels])
    assert evaluate_digits.nearest_train_distance(pixels) == pytest.approx(brute, rel=1e-6)


def test_noise_scores_badly(data):
    _, labels, _, _ = data
    noise = np.random.default_rng(0).uniform(0, 1, (500, 8, 8)).astype(np.float32)
    scores = evaluate_digits.evaluate(noise, labels[:500])
    assert scores["conditional_accuracy"] < 0.3
    assert scores["frechet_distance"] > 10 * scores["frechet_floor_real"]


def test_frechet_distance_equals_scipy_sqrtm_on_the_same_pca_features(data):
    """The printed FD (torchmetrics' FID in mmgen_pytorch.evaluation) is the former np.cov + scipy sqrtm
    computation on the same features: the PCA-20 features of the uint8-rounded samples and held-out digits."""
    from scipy import linalg

    _, _, heldout, labels = data
    samples = np.clip(heldout[:300] + np.random.default_rng(0).normal(0, 0.1, heldout[:300].shape), 0, 1)
    extractor = evaluate_digits.fitted()[1]
    a, b = (extractor(evaluate_digits.as_uint8_images(pixels)).numpy() for pixels in (samples * 16, heldout * 16))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    scores = evaluate_digits.evaluate(samples, labels[:300])
    assert scores["frechet_distance"] == pytest.approx(expected, rel=1e-6)


def test_tokenizer_rfid_is_zero_for_a_perfect_tokenizer_and_grows_with_its_error():
    """rFID of the held-out digits through a tokenizer: 0 when the reconstruction is the input, larger as
    the reconstruction's error grows (PCA features, the recipes' one-channel 8x8 images)."""
    from types import SimpleNamespace

    import torch

    class Noisy(torch.nn.Module):
        def __init__(self, std):
            super().__init__()
            self.std = std

        def forward(self, images):
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * self.std
            return SimpleNamespace(recon=(images + noise).clamp(-1, 1))

    scores = [evaluate_digits.tokenizer_rfid(Noisy(std)) for std in (0.0, 0.1, 0.3)]
    assert abs(scores[0]) < 1e-6 * max(1.0, scores[1]) and 0 < scores[1] < scores[2]
