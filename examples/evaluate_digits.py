"""Score generated 8x8 digits against scikit-learn's real ones.

    python examples/evaluate_digits.py results/transfusion/samples.npz

- conditional accuracy: an RBF SVC fitted on the training split classifies each sample; the score is
  the fraction classified as the class it was asked for;
- Fréchet distance between the samples and the held-out real digits in the 20-dim PCA space of the
  training split, with the floor given by two disjoint sets of real digits of the same sizes; computed by
  `mmgen_pytorch.evaluation` (torchmetrics' FID on `digits_pca_extractor()`), which takes uint8 images:
  samples are rounded to 0..255 first (at most 1/510 of the range, 0.03 pixel units);
- a tokenizer's rFID (`tokenizer_rfid`, LlamaGen's and DnD's recipes): the same Fréchet distance between the
  held-out digits and their reconstructions through the tokenizer (`mmgen_pytorch.evaluation.reconstruction_fid`);
- memorisation: the median Euclidean distance (pixel units 0..16) from a sample to its nearest
  training digit, beside the same figure for held-out real digits (about 17). A generator that
  recites its training set scores far below the real figure while its FD stays near the floor.

The split is ``train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)`` on pixel values 0..16.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from typing import Dict

import numpy as np
import torch
from sklearn.svm import SVC

from mmgen_pytorch.evaluation import (FeatureStats, digits_pca_extractor, digits_split, feature_stats, frechet_distance,
                                      reconstruction_fid)


@lru_cache(maxsize=1)
def split():
    return digits_split()


@lru_cache(maxsize=1)
def fitted():
    """The classifier, the PCA-20 feature extractor (both fitted on the training split) and the held-out accuracy."""
    x_train, x_test, y_train, y_test = split()
    classifier = SVC(kernel="rbf", gamma="scale", C=10.0).fit(x_train, y_train)
    return classifier, digits_pca_extractor(), float(classifier.score(x_test, y_test))


def as_uint8_images(pixels: np.ndarray) -> torch.Tensor:
    """Pixel rows (N, 64) in 0..16 -> uint8 RGB images (N, 3, 8, 8), the extractor's input (16 -> 255)."""
    grey = torch.from_numpy(np.clip(pixels, 0.0, 16.0) / 16.0 * 255.0).round().to(torch.uint8).view(-1, 1, 8, 8)
    return grey.expand(-1, 3, -1, -1)


def pca_stats(pixels: np.ndarray) -> FeatureStats:
    """The PCA-feature statistics of pixel rows (N, 64) in 0..16."""
    return feature_stats([as_uint8_images(pixels)], fitted()[1], max_features=0)


@lru_cache(maxsize=1)
def heldout_stats() -> FeatureStats:
    return pca_stats(split()[1])


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] of shape (N, 8, 8) -> the data set's 0..16 pixel rows (N, 64)."""
    return np.clip(images.reshape(len(images), 64), 0.0, 1.0) * 16.0


def real_floor(count: int, seed: int = 0) -> float:
    """Fréchet distance between ``count`` real digits (train split) and the held-out real digits."""
    x_train = split()[0]
    rng = np.random.default_rng(seed)
    chosen = x_train[rng.choice(len(x_train), size=min(count, len(x_train)), replace=False)]
    return frechet_distance(heldout_stats(), pca_stats(chosen))


def nearest_train_distance(pixels: np.ndarray) -> float:
    """Median over ``pixels`` (N, 64), in 0..16, of the Euclidean distance to the nearest training digit."""
    x_train = split()[0]
    squared = (pixels ** 2).sum(1)[:, None] - 2 * pixels @ x_train.T + (x_train ** 2).sum(1)[None]
    return float(np.median(np.sqrt(np.clip(squared.min(1), 0.0, None))))


def tokenizer_rfid(tokenizer: torch.nn.Module) -> float:
    """rFID in the PCA space: the held-out digits against their reconstructions through ``tokenizer``, which
    takes and returns one-channel 8x8 images in [-1, 1] (the digits recipes' VQVAE / RQVAE)."""
    def reconstruct(images: torch.Tensor) -> torch.Tensor:  # RGB -> the tokenizer's grey channel -> RGB
        with torch.no_grad():
            return tokenizer(images[:, :1]).recon.expand(-1, 3, -1, -1)

    return reconstruction_fid([as_uint8_images(split()[1])], reconstruct, fitted()[1])


def evaluate(images: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    classifier, _, classifier_accuracy = fitted()
    _, x_test, _, _ = split()
    pixels = to_pixels(images)
    predicted = classifier.predict(pixels)
    return {
        "conditional_accuracy": float((predicted == labels).mean()),
        "frechet_distance": frechet_distance(heldout_stats(), pca_stats(pixels)),
        "frechet_floor_real": real_floor(len(images)),
        "classifier_heldout_accuracy": classifier_accuracy,
        "nearest_train_distance": nearest_train_distance(pixels),
        "nearest_train_distance_real": nearest_train_distance(x_test),
        "num_samples": int(len(images)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="a samples.npz with `images` (N, 8, 8) in [0, 1] and `labels` (N,)")
    args = parser.parse_args()
    data = np.load(args.samples)
    print(json.dumps(evaluate(data["images"], data["labels"]), indent=2))


if __name__ == "__main__":
    main()
