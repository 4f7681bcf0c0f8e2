"""Evaluating generated images: feature extractors (:mod:`.features`) and metrics (:mod:`.metrics`:
FID, IS, precision / recall, rFID, cached reference statistics) through torchmetrics.

Needs the ``eval`` extra (``pip install mmgen-pytorch[eval]``: torchmetrics); the standard Inception also
needs the ``inception`` extra (torch-fidelity, which needs torchvision).
"""

from .features import (EXTRACTOR_FEATURES, EXTRACTORS, INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, FeatureExtractor,
                       InceptionExtractor, PCAExtractor, TinyConvExtractor, build_extractor, check_uint8_images,
                       digits_pca_extractor,
                       digits_split, images_to_uint8, inception_v3, uint8_to_images)
from .metrics import (METRICS, FeatureStats, computable_metrics, evaluate, feature_stats, frechet_distance, image_folder_batches,
                      inception_score, precision_recall, reconstruction_fid, reference_stats)

__all__ = [
    "EXTRACTORS", "EXTRACTOR_FEATURES", "build_extractor", "computable_metrics", "FeatureExtractor", "FeatureStats", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL",
    "InceptionExtractor", "METRICS", "PCAExtractor", "TinyConvExtractor", "check_uint8_images", "digits_pca_extractor",
    "digits_split", "evaluate", "feature_stats", "frechet_distance", "image_folder_batches", "images_to_uint8",
    "inception_score", "inception_v3", "precision_recall", "reconstruction_fid", "reference_stats", "uint8_to_images",
]
