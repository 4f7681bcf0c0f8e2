"""Datasets for training on your own images, and caching them through a tokenizer."""

from .cache import CachedDataset, cache_dataset, sample_latent, ten_crops

__all__ = ["CachedDataset", "cache_dataset", "sample_latent", "ten_crops"]
