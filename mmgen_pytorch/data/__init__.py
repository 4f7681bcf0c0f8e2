"""Datasets of images for training: a folder (class sub-folders -> labels, an optional captions file) or a
Hugging Face ``datasets`` dataset, with the ADM centre crop, a random horizontal flip and pixels in [-1, 1].
Needs Pillow (``pip install mmgen-pytorch[data]``), imported on first use."""

from .captions import CaptionTokenizer, read_captions
from .images import (IMAGE_EXTENSIONS, NO_LABEL, HFImageDataset, ImageFolderDataset, adm_center_crop,
                     random_horizontal_flip, to_tensor_image)

__all__ = [
    "CaptionTokenizer", "HFImageDataset", "IMAGE_EXTENSIONS", "ImageFolderDataset", "NO_LABEL", "adm_center_crop",
    "random_horizontal_flip", "read_captions", "to_tensor_image",
]
