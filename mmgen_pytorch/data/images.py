"""Image datasets (a folder, a Hugging Face ``datasets`` dataset) with the preprocessing of MAR, LlamaGen
and ADM: the ADM centre crop to a square resolution, a random horizontal flip, pixels in [-1, 1].

Pillow decodes and resizes (the ``data`` extra: ``pip install mmgen-pytorch[data]``); it is imported on
first use, as ``datasets`` is never imported at all (the wrapper takes any sequence of dict rows).
Every image is converted to RGB when read (greyscale is repeated over the channels, an alpha channel is
dropped, a palette is expanded), as the upstream loaders do; with ``channels=1`` the crop is then turned
into one luma channel (Pillow's ``L``: ``(299 R + 587 G + 114 B) / 1000``, exact for a greyscale image).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._utils import (GeneratorLike, as_generator, as_int, check, check_finite_number, check_flag, check_positive_int,
                      describe, install_hint)
from .batching import StackedItems
from .captions import CaptionsSource, caption_tokenizer, read_captions

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
NO_LABEL = -1  # the label of every item when there are no classes (a flat folder, no label_key)


def pil_image_module():
    """``PIL.Image``, imported on first use; ImportError naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(f"mmgen_pytorch.data needs Pillow to read images: {install_hint('data')} "
                          f"(or pip install pillow)") from error
    return Image


# --- transforms ---------------------------------------------------------------------------------------


def adm_center_crop(image, resolution: int):
    """ADM's centre crop (``center_crop_arr``, also MAR's and LlamaGen's): a ``resolution`` x ``resolution``
    PIL image. While the short side is at least twice ``resolution`` the image is halved (BOX filter, sizes
    floored); one BICUBIC resize then brings the short side to ``resolution`` (the long side to the rounded
    proportional size; an image smaller than ``resolution`` is enlarged); the centre square is cut out, its
    offset ``(size - resolution) // 2`` on each axis. Give an RGB image (the datasets convert first): Pillow
    resizes palette images with nearest-neighbour only."""
    Image = pil_image_module()
    resolution = check_positive_int("resolution", resolution)
    check(isinstance(image, Image.Image), f"`image` must be a PIL image, got {describe(image)}", error=TypeError)
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = ((side - resolution) // 2 for side in image.size)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor_image(image) -> Tensor:
    """A PIL image as a float32 tensor ``[3, H, W]`` in [-1, 1] (``x / 255`` then ``(x - 0.5) / 0.5``, the
    upstream ToTensor + Normalize(0.5, 0.5)); a non-RGB image is converted to RGB first."""
    Image = pil_image_module()
    check(isinstance(image, Image.Image), f"`image` must be a PIL image, got {describe(image)}", error=TypeError)
    return uint8_to_images(to_uint8_pixels(image))


IMAGE_CHANNELS = {3: "RGB", 1: "L"}  # the channels an item may have -> the Pillow mode that gives them


def to_uint8_pixels(image, channels: int = 3) -> Tensor:
    """A PIL image as uint8 pixels ``[channels, H, W]``: RGB (3) or luma (1); another mode is converted first."""
    mode = IMAGE_CHANNELS[channels]
    image = image if image.mode == mode else image.convert(mode)
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, channels)
    return pixels.permute(2, 0, 1).contiguous()


def luma_pixels(pixels: Tensor) -> Tensor:
    """uint8 RGB pixels ``[..., 3, H, W]`` as their luma ``[..., 1, H, W]``, exactly as Pillow's ``L``
    conversion computes it (``(19595 R + 38470 G + 7471 B + 2^15) >> 16``)."""
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=pixels.device).view(3, 1, 1)
    total = (pixels.to(torch.int32) * weights).sum(dim=-3, keepdim=True)
    return ((total + 0x8000) >> 16).to(torch.uint8)


def check_image_channels(channels: Any) -> int:
    check(as_int(channels) in IMAGE_CHANNELS, f"`channels` must be 3 (RGB) or 1 (greyscale), got {channels!r}")
    return int(channels)


# the one place pixels and float images convert (datasets, sample grids, sampled PNGs, metrics)


def uint8_to_images(pixels: Tensor) -> Tensor:
    """uint8 pixels 0..255 as float32 images in [-1, 1]: ``x / 255`` then ``(x - 0.5) / 0.5``."""
    return pixels.float().div(255).sub(0.5).div(0.5)


def images_to_unit(images: Tensor) -> Tensor:
    """Float images in [-1, 1] (the models' range) as float32 in [0, 1], clipped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def unit_to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] as uint8 pixels ``round(255 x)``, clipped (as when writing an image file)."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def random_horizontal_flip(image: Tensor, *, p: float = 0.5, generator: GeneratorLike = None) -> Tensor:
    """``image`` (``[..., H, W]``) mirrored left-right with probability ``p``: one draw from ``generator``
    (a torch.Generator or an int seed), or from torch's global RNG when None, which DataLoader workers seed
    each (from the loader's ``generator`` / ``torch.manual_seed``), so seeded runs repeat their flips."""
    check(isinstance(image, Tensor) and image.ndim >= 2, f"`image` must be a tensor [..., H, W], got {describe(image)}",
          error=TypeError)
    check_finite_number("p", p, minimum=0.0, maximum=1.0)
    flip = bool(torch.rand((), generator=as_generator(generator, name="generator")) < p)
    return image.flip(-1) if flip else image


# --- datasets ----------------------------------------------------------------------------------------


def _open_rgb(source, where: str):
    """An image file / file object decoded and converted to RGB; OSError naming ``where`` if Pillow can't."""
    Image = pil_image_module()
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read the image {where}: {error}") from error


class _ImageDataset(Dataset):
    """What both datasets share: the options, and image + label + caption -> an item."""

    def __init__(self, *, resolution: Any, random_flip: Any, captions_given: bool, captions_name: str,
                 tokenizer: Any, max_caption_length: Any, pad_id: Any, channels: Any = 3):
        self.resolution = check_positive_int("resolution", resolution)
        self.channels = check_image_channels(channels)
        check_flag("random_flip", random_flip)
        self.random_flip = random_flip
        self.caption_tokenizer = caption_tokenizer(captions_given, tokenizer, max_caption_length, pad_id,
                                                   captions_name=captions_name)

    def check_index(self, index: Any) -> int:
        position = as_int(index)
        check(position is not None, f"dataset index must be an int, got {describe(index)}", error=TypeError)
        check(-len(self) <= position < len(self), f"dataset index {position} is out of range for {len(self)} items",
              error=IndexError)
        return position % len(self)

    def crop(self, image) -> Tensor:
        """A decoded PIL image as the item's uint8 pixels ``[channels, resolution, resolution]`` (ADM's centre
        crop)."""
        return to_uint8_pixels(adm_center_crop(image, self.resolution), self.channels)

    def make_item(self, pixels: Tensor, label: int, caption: Optional[str]) -> Dict[str, Tensor]:
        """An item from its cropped uint8 pixels: the image in [-1, 1], mirrored at random with ``random_flip``."""
        image = uint8_to_images(pixels)
        item = {"image": random_horizontal_flip(image) if self.random_flip else image,
                "label": torch.tensor(label, dtype=torch.long)}
        if self.caption_tokenizer is not None:
            item["caption_ids"], item["caption_mask"] = self.caption_tokenizer(caption)
        return item

    def probe_tokenizer(self, caption: Optional[str]) -> None:
        """Tokenize one caption now, so that a tokenizer returning the wrong thing fails at construction."""
        if self.caption_tokenizer is not None:
            self.caption_tokenizer(caption)


def _normalized_extensions(extensions: Any) -> Tuple[str, ...]:
    valid = (isinstance(extensions, (list, tuple, set, frozenset)) and len(extensions) > 0
             and all(isinstance(suffix, str) and suffix.strip(".") for suffix in extensions))
    check(valid, f"`extensions` must be a non-empty list of file suffixes such as ['.png', '.jpg'], got {extensions!r}",
          error=TypeError)
    return tuple(sorted({"." + suffix.lower().lstrip(".") for suffix in extensions}))


def _image_files(folder: Path, extensions: Tuple[str, ...], *, recursive: bool) -> List[Path]:
    """Image files under ``folder`` (sorted; hidden files and folders skipped; symlinked folders followed)."""
    if not recursive:
        return sorted(path for path in folder.iterdir()
                      if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions)
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        found += [Path(directory) / name for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in extensions]
    return sorted(found)


def scan_image_folder(root: Path, extensions: Tuple[str, ...]) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """``(classes, [(path, label)])``: class sub-folders (sorted names, images searched recursively inside
    each) when any sub-folder holds images, else the images directly in ``root`` with label ``NO_LABEL``."""
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    per_folder = {folder.name: _image_files(folder, extensions, recursive=True) for folder in folders}
    top_level = _image_files(root, extensions, recursive=False)
    if not any(per_folder.values()):
        check(len(top_level) > 0, f"`root` {str(root)!r} holds no images with the suffixes {list(extensions)} "
                                  f"(neither directly nor in class sub-folders)", error=FileNotFoundError)
        return [], [(path, NO_LABEL) for path in top_level]
    if top_level:
        raise ValueError(f"`root` {str(root)!r} mixes images at its top level ({top_level[0].name!r}, ...) with "
                         f"class sub-folders: put every image in a class folder, or use a flat folder")
    empty = [name for name, files in per_folder.items() if not files]
    check(not empty, f"`root` {str(root)!r}: the class folder {empty[:1]} holds no images with the suffixes "
                     f"{list(extensions)}; remove it or add images (labels are the sorted folder names)",
          error=FileNotFoundError)
    classes = sorted(per_folder)
    return classes, [(path, label) for label, name in enumerate(classes) for path in per_folder[name]]


class ImageFolderDataset(_ImageDataset):
    """Images from a folder as items ``{"image": [channels, resolution, resolution] float in [-1, 1], "label":
    long}``,
    plus ``"caption_ids"`` / ``"caption_mask"`` (``[max_caption_length]`` long / bool) with captions.

    Layout: class sub-folders ``root/<class>/**/<image>`` give labels ``0..C-1`` in sorted folder-name order
    (``classes``, ``class_to_index``); a flat folder (images directly in ``root``, no sub-folder holding
    images) gives every item the label -1 (``classes == []``). Hidden files and folders are skipped; files
    are matched by suffix, case-insensitively.

    Args:
        root: the image folder.
        resolution: the side of the square crop (:func:`adm_center_crop`).
        random_flip: mirror each item left-right with probability 0.5 (torch's RNG; seed the DataLoader).
        captions: a ``.jsonl`` or ``.csv`` captions file or a dict ``{file: caption}`` (formats in
            :mod:`mmgen_pytorch.data.captions`); every image needs exactly one caption and every caption
            must name an image found under ``root``.
        tokenizer: with captions: an object with ``encode(text) -> list[int]`` or a callable doing that.
        max_caption_length: with captions: ids are truncated or padded (with ``pad_id``) to this length.
        pad_id: the id of padding positions (their mask is False).
        extensions: the image file suffixes to use.
        channels: 3 (RGB, the default) or 1 (greyscale: the luma of the RGB crop).
        in_memory: decode and crop every image once, here, and keep the uint8 crops in memory
            (``len * 3 * resolution**2`` bytes: for datasets that fit, such as CIFAR or the digits, where
            decoding each item at every step would cost more than the model's step); items then only
            convert and flip, captions are tokenized once too, and a DataLoader batch is gathered at once
            (``__getitems__``). ``progress``: a progress bar while they are decoded.

    Images are decoded when an item is read (or, ``in_memory``, at construction); an unreadable file raises
    OSError naming it then.
    """

    def __init__(self, root: Any, *, resolution: int, random_flip: bool = True,
                 captions: Optional[CaptionsSource] = None, tokenizer: Any = None,
                 max_caption_length: Optional[int] = None, pad_id: int = 0,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, in_memory: bool = False, progress: bool = True,
                 channels: int = 3):
        check_flag("in_memory", in_memory)
        super().__init__(resolution=resolution, random_flip=random_flip, captions_given=captions is not None,
                         captions_name="captions", tokenizer=tokenizer, max_caption_length=max_caption_length,
                         pad_id=pad_id, channels=channels)
        check(isinstance(root, (str, os.PathLike)), f"`root` must be a folder path, got {describe(root)}",
              error=TypeError)
        self.root = Path(root)
        check(self.root.exists(), f"`root` folder {str(self.root)!r} does not exist", error=FileNotFoundError)
        check(self.root.is_dir(), f"`root` {str(self.root)!r} is not a folder", error=NotADirectoryError)
        self.extensions = _normalized_extensions(extensions)
        self.classes, self.samples = scan_image_folder(self.root, self.extensions)
        self.class_to_index = {name: index for index, name in enumerate(self.classes)}
        self.captions = None if captions is None else self.match_captions(read_captions(captions))
        self.probe_tokenizer(None if self.captions is None else self.captions[0])
        self.pixels = self.decode_all(progress) if in_memory else None
        self.fields = self.stack_fields() if in_memory else None

    def decode_all(self, progress: bool) -> Tensor:
        """Every image's uint8 crop ``[len, channels, resolution, resolution]``, in sample order."""
        from tqdm.auto import tqdm

        pixels = torch.empty(len(self.samples), self.channels, self.resolution, self.resolution, dtype=torch.uint8)
        for position, (path, _) in enumerate(tqdm(self.samples, desc="decoding images", disable=not progress)):
            pixels[position] = self.crop(_open_rgb(path, str(path)))
        return pixels

    def stack_fields(self) -> Dict[str, Tensor]:
        """Every item's label and, with captions, tokenized caption, stacked in sample order (``in_memory``)."""
        fields = {"label": torch.tensor([label for _, label in self.samples], dtype=torch.long)}
        if self.caption_tokenizer is not None:
            ids, masks = zip(*map(self.caption_tokenizer, self.captions))
            fields.update(caption_ids=torch.stack(ids), caption_mask=torch.stack(masks))
        return fields

    def relative_path(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def match_captions(self, table: Mapping[str, Tuple[str, str]]) -> List[str]:
        """The caption of each sample, in sample order; every caption names an image and every image has one."""
        files = [self.relative_path(path) for path, _ in self.samples]
        known = set(files)
        for entry, (_, where) in table.items():
            if entry not in known:
                on_disk = (self.root / entry).is_file()
                reason = (f"a file whose suffix is not in `extensions` {list(self.extensions)}" if on_disk
                          else f"no such image under `root` {str(self.root)!r}")
                raise FileNotFoundError(f"{where}: the captions name {entry!r}, {reason}")
        missing = [file for file in files if file not in table]
        check(not missing, f"`captions`: {len(missing)} of {len(files)} images have no caption, e.g. {missing[:3]}")
        return [table[file][0] for file in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        if self.fields is not None:  # in memory: the labels and tokenized captions are stacked already
            return self.__getitems__([index])[0]
        position = self.check_index(index)
        path, label = self.samples[position]
        caption = None if self.captions is None else self.captions[position]
        pixels = self.pixels[position] if self.pixels is not None else self.crop(_open_rgb(path, str(path)))
        return self.make_item(pixels, label, caption)

    def __getitems__(self, indices: Sequence[int]) -> Union[StackedItems, List[Dict[str, Tensor]]]:
        """The items at ``indices`` for a DataLoader: ``in_memory``, gathered as one batch (what stacking the
        items gives, flips drawn in the same order), else read one by one."""
        if self.fields is None:
            return [self[index] for index in indices]
        positions = [self.check_index(index) for index in indices]
        images = uint8_to_images(self.pixels[positions])
        if self.random_flip:
            flipped = torch.tensor([bool(torch.rand(()) < 0.5) for _ in positions])  # random_horizontal_flip's draws
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        return StackedItems(dict(image=images, **{name: field[positions] for name, field in self.fields.items()}))


def _row_image(value: Any, where: str):
    """An image cell of a row as an RGB PIL image: a PIL image (``datasets``' decoded Image feature), a
    ``{"bytes", "path"}`` dict (the undecoded feature), a file path, or an ``[H, W(, C)]`` uint8 array."""
    Image = pil_image_module()
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        return _open_rgb(source, where)
    if isinstance(value, (str, os.PathLike)):
        return _open_rgb(value, f"{where} ({str(value)!r})")
    array = value.numpy() if isinstance(value, Tensor) and value.device.type == "cpu" else value
    if hasattr(array, "__array_interface__"):
        check(str(array.dtype) == "uint8" and (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))),
              f"{where} must be a uint8 array [H, W] or [H, W, 1 | 3 | 4], got a {type(value).__name__} of "
              f"dtype {array.dtype} and shape {tuple(array.shape)}", error=TypeError)
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).convert("RGB")
    raise TypeError(f"{where} must be a PIL image, a {{'bytes', 'path'}} dict, a file path or a uint8 array "
                    f"(NumPy or a CPU tensor, [H, W, C]), got {describe(value)}")


def _cell(row: Mapping, key: str, option: str, position: int) -> Any:
    check(key in row, f"`hf_dataset` row {position} has no column `{option}` {key!r}; it has {list(row)}",
          error=KeyError)
    return row[key]


class HFImageDataset(_ImageDataset):
    """A Hugging Face ``datasets`` dataset (one split, map-style) — or any sequence of dict rows — as the
    items of :class:`ImageFolderDataset`: ``image`` from ``row[image_key]``, ``label`` from
    ``row[label_key]`` (-1 for every item with ``label_key=None``), captions from ``row[caption_key]``.

    ``datasets`` is not imported: rows are read by ``hf_dataset[index]``. Image cells may be PIL images (what
    an ``Image`` feature decodes to), ``{"bytes", "path"}`` dicts, file paths or uint8 ``[H, W(, C)]`` arrays /
    CPU tensors (``with_format("numpy" | "torch")``). ``classes``
    holds the label feature's names when the dataset has a ``ClassLabel`` feature, else None.

    Args mirror :class:`ImageFolderDataset`; ``caption_key`` takes the place of ``captions``.
    """

    def __init__(self, hf_dataset: Any, *, resolution: int, image_key: str = "image",
                 label_key: Optional[str] = "label", caption_key: Optional[str] = None, tokenizer: Any = None,
                 max_caption_length: Optional[int] = None, pad_id: int = 0, random_flip: bool = True,
                 channels: int = 3):
        super().__init__(resolution=resolution, random_flip=random_flip, captions_given=caption_key is not None,
                         captions_name="caption_key", tokenizer=tokenizer, max_caption_length=max_caption_length,
                         pad_id=pad_id, channels=channels)
        if isinstance(hf_dataset, Mapping):
            raise TypeError(f"`hf_dataset` is a mapping (a DatasetDict of splits?) with keys {list(hf_dataset)[:5]}: "
                            f"pass one split, e.g. dataset['train']")
        indexable = hasattr(hf_dataset, "__len__") and hasattr(hf_dataset, "__getitem__")
        check(indexable and not isinstance(hf_dataset, str),
              f"`hf_dataset` must be a map-style dataset (len() and indexing; not a streaming IterableDataset) "
              f"or a list of dict rows, got {describe(hf_dataset)}", error=TypeError)
        check(len(hf_dataset) > 0, "`hf_dataset` is empty")
        self.rows = hf_dataset
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.check_keys()
        self.classes = self.label_names()
        self.class_to_index = None if self.classes is None else {name: i for i, name in enumerate(self.classes)}
        self.probe_tokenizer(None if caption_key is None else self.row_caption(self.rows[0], 0))

    def check_keys(self) -> None:
        """Every key names a column: from ``column_names`` when the dataset has them (no row is decoded),
        else from the first row."""
        named = {"image_key": self.image_key, "label_key": self.label_key, "caption_key": self.caption_key}
        for option, key in named.items():
            check(key is None or isinstance(key, str), f"`{option}` must be a column name (str), got {key!r}",
                  error=TypeError)
        check(self.image_key is not None, "`image_key` must be a column name (str), got None", error=TypeError)
        columns = getattr(self.rows, "column_names", None)
        if not isinstance(columns, (list, tuple)):
            row = self.rows[0]
            check(isinstance(row, Mapping), f"`hf_dataset` rows must be dicts (column -> value), got "
                                            f"{describe(row)} at index 0", error=TypeError)
            columns = list(row)
        for option, key in named.items():
            check(key is None or key in columns,
                  f"`{option}` {key!r} is not a column of `hf_dataset`; its columns are {list(columns)}",
                  error=KeyError)

    def label_names(self) -> Optional[List[str]]:
        features = getattr(self.rows, "features", None)
        if self.label_key is None or not isinstance(features, Mapping):
            return None
        names = getattr(features.get(self.label_key), "names", None)
        return list(names) if isinstance(names, (list, tuple)) else None

    def row_label(self, row: Mapping, position: int) -> int:
        if self.label_key is None:
            return NO_LABEL
        value = _cell(row, self.label_key, "label_key", position)
        label = as_int(value)
        check(label is not None, f"`hf_dataset` row {position}: `label_key` {self.label_key!r} holds "
                                 f"{describe(value)}, expected an int class index", error=TypeError)
        return label

    def row_caption(self, row: Mapping, position: int) -> Optional[str]:
        if self.caption_key is None:
            return None
        caption = _cell(row, self.caption_key, "caption_key", position)
        check(isinstance(caption, str), f"`hf_dataset` row {position}: `caption_key` {self.caption_key!r} holds "
                                        f"{describe(caption)}, expected a string", error=TypeError)
        return caption

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        position = self.check_index(index)
        row = self.rows[position]
        check(isinstance(row, Mapping), f"`hf_dataset` rows must be dicts (column -> value), got {describe(row)} "
                                        f"at index {position}", error=TypeError)
        where = f"`hf_dataset` row {position}, `image_key` {self.image_key!r}"
        image = _row_image(_cell(row, self.image_key, "image_key", position), where)
        return self.make_item(self.crop(image), self.row_label(row, position), self.row_caption(row, position))
