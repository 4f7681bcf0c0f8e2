"""Training on your own images.

- :mod:`.images` / :mod:`.captions`: datasets of images: a folder (class sub-folders -> labels, an
  optional captions file) or a Hugging Face ``datasets`` dataset, with the ADM centre crop, a random
  horizontal flip and pixels in [-1, 1]. Needs Pillow (``pip install mmgen-pytorch[data]``), imported on
  first use.
- :mod:`.cache`: such a dataset encoded once through a tokenizer (KL moments, VQ / RQ codes, with the
  flipped copy or ten crops) into sharded safetensors files, and read back as a dataset; or, for small
  datasets, in memory (:class:`EncodedDataset`).
"""

from .cache import CachedDataset, EncodedDataset, StackFields, cache_dataset, sample_latent, ten_crops
from .captions import CaptionTokenizer, read_captions
from .images import (IMAGE_EXTENSIONS, NO_LABEL, HFImageDataset, ImageFolderDataset, adm_center_crop,
                     random_horizontal_flip, to_tensor_image)

__all__ = [
    "CachedDataset", "CaptionTokenizer", "EncodedDataset", "HFImageDataset", "IMAGE_EXTENSIONS", "ImageFolderDataset", "NO_LABEL", "StackFields",
    "adm_center_crop", "cache_dataset", "random_horizontal_flip", "read_captions", "sample_latent", "ten_crops",
    "to_tensor_image",
]
