"""Encode an image dataset once with a tokenizer into sharded safetensors files, and read it back.

What is cached per image, as upstream trains:

- :class:`~mmgen_pytorch.tokenizers.AutoencoderKL`: the posterior moments ``[mean | logvar]``
  ``[2c, h, w]`` (float32), as MAR's ``main_cache.py``, so every epoch draws a fresh latent
  (:func:`sample_latent`);
- :class:`~mmgen_pytorch.tokenizers.VQVAE`: the code indices ``[h, w]``; :class:`~mmgen_pytorch.tokenizers.RQVAE`:
  the codes ``[h, w, depth]`` (LlamaGen's / DnD's code extraction).

Each image is encoded in several *views*: with ``flip`` the image and its horizontal flip (MAR,
LlamaGen); with ``ten_crop`` (LlamaGen's and DnD's option) the ten crops of :func:`ten_crops`. The
label and, when the items carry them, ``caption_ids`` / ``caption_mask`` are stored alongside.

Layout of ``out_dir``: ``cache.json`` (the manifest: tokenizer class, config and weight fingerprint,
dataset length, views, shard count and size, format version) and ``shard-00000.safetensors``, ... ;
shard ``i`` holds dataset items ``[i * shard_size, (i + 1) * shard_size)`` in dataset order, as
tensors ``moments`` / ``codes`` ``[n, views, ...]``, ``label`` ``[n]`` and the caption fields.
A shard is written to a temporary name and renamed when complete, so a killed run never leaves a
partial shard under a final name, and a rerun skips the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._utils import (GeneratorLike, as_generator, as_int, check, check_finite_number, check_flag, check_positive_int,
                      describe, eval_mode)
from ..files import CheckpointFileError, checkpoint_format, read_json_file
from ..saving import encode_config, write_atomically
from ..tokenizers import AutoencoderKL, DiagonalGaussian, RQVAE, VQVAE
from .batching import StackedItems, StackFields

FORMAT_VERSION = 1
MANIFEST_FILE = "cache.json"
CROP_RANGE = 1.1  # LlamaGen's default: ten crops of the resolution from an image enlarged 1.1x
FIVE_CROPS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")  # torchvision's five_crop order
CAPTION_FIELDS = ("caption_ids", "caption_mask")
TOKENIZER_KINDS = {AutoencoderKL: ("kl", "moments"), VQVAE: ("vq", "codes"), RQVAE: ("rq", "codes")}

PathLike = Union[str, os.PathLike]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# views: the plain image, its flip, or the ten crops

def view_names(*, flip: bool, ten_crop: bool) -> List[str]:
    """The views cached per image, in storage order; flipped views are named ``flipped*``."""
    unflipped = list(FIVE_CROPS) if ten_crop else ["plain"]
    flipped = ["flipped_" + name for name in FIVE_CROPS] if ten_crop else ["flipped"]
    return unflipped + (flipped if flip else [])


def five_crops(images: Tensor, size: Sequence[int]) -> Tensor:
    """The four corner crops and the centre crop ``[b, 5, c, h, w]`` of ``images`` ``[b, c, H, W]``
    (order :data:`FIVE_CROPS`; the centre offset rounds as torchvision's ``center_crop``)."""
    (height, width), (full_h, full_w) = size, images.shape[-2:]
    top, left = int(round((full_h - height) / 2.0)), int(round((full_w - width) / 2.0))
    corners = [(0, 0), (0, full_w - width), (full_h - height, 0), (full_h - height, full_w - width), (top, left)]
    return torch.stack([images[..., y:y + height, x:x + width] for y, x in corners], dim=1)


def ten_crops(images: Tensor, crop_range: float = CROP_RANGE) -> Tensor:
    """LlamaGen's ten-crop augmentation on tensors: ``images`` ``[b, c, H, W]`` in [-1, 1] are enlarged
    (bicubic, clamped to [-1, 1]) to ``int(H * crop_range) x int(W * crop_range)``, then cut into the
    five crops of size ``H x W`` and the five crops of the horizontally flipped enlargement
    (torchvision ``TenCrop`` order) -> ``[b, 10, c, H, W]``. Upstream crops an ADM centre crop taken
    at the enlarged size from the original picture; a tensor already at the resolution can only be
    upsampled, so the crops hold the same content, resampled."""
    size = images.shape[-2:]
    enlarged_size = [int(side * crop_range) for side in size]
    enlarged = F.interpolate(images, size=enlarged_size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    return torch.cat((five_crops(enlarged, size), five_crops(enlarged.flip(-1), size)), dim=1)


def image_views(images: Tensor, *, flip: bool, ten_crop: bool, crop_range: float = CROP_RANGE) -> Tensor:
    """``[b, views, c, H, W]`` in the order of :func:`view_names`."""
    if ten_crop:
        crops = ten_crops(images, crop_range)
        return crops if flip else crops[:, :len(FIVE_CROPS)]
    return torch.stack((images, images.flip(-1)) if flip else (images,), dim=1)


# the tokenizer: what it encodes to, and its identity

def tokenizer_kind(tokenizer: Any) -> tuple:
    """``(kind, cached field)``: ``("kl", "moments")``, ``("vq", "codes")`` or ``("rq", "codes")``."""
    for cls, kind in TOKENIZER_KINDS.items():
        if isinstance(tokenizer, cls):
            return kind
    names = ", ".join(cls.__name__ for cls in TOKENIZER_KINDS)
    raise TypeError(f"`tokenizer` must be one of this library's tokenizers ({names}), got {type(tokenizer).__name__}")


@torch.no_grad()
def encode_images(tokenizer: nn.Module, images: Tensor) -> Tensor:
    """What the cache stores for ``images`` ``[b, 3, H, W]`` in [-1, 1] (on their device): KL moments
    ``[b, 2c, h, w]`` float32, VQ indices ``[b, h, w]`` or RQ codes ``[b, h, w, depth]``. The training
    entry point encodes uncached batches with it too."""
    kind, _ = tokenizer_kind(tokenizer)
    with eval_mode(tokenizer), torch.no_grad():
        if kind == "kl":
            return tokenizer.encode(images).parameters.float()
        return tokenizer.encode_to_indices(images) if kind == "vq" else tokenizer.encode_to_codes(images)


def code_dtype(tokenizer: nn.Module) -> torch.dtype:
    """The smallest integer dtype that holds every code (int16 for LlamaGen's 16384 codes)."""
    return torch.int16 if tokenizer.codebook_size <= 2 ** 15 else torch.int32


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict in key order: each key, dtype, shape and the tensor's bytes."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def tokenizer_record(tokenizer: nn.Module) -> Dict[str, Any]:
    """The tokenizer's class, resolved config (as ``config.json`` writes dataclasses) and weight
    fingerprint, as the manifest records them."""
    tokenizer_kind(tokenizer)
    config = json.loads(json.dumps(encode_config(tokenizer.config)))  # tuples -> lists, as read back
    cls = type(tokenizer)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "config": config,
            "fingerprint": weights_fingerprint(tokenizer)}


def _flattened(record: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(record, Mapping):
        return {prefix: record}
    items = {}
    for key, value in record.items():
        items.update(_flattened(value, f"{prefix}.{key}" if prefix else str(key)))
    return items


def differences(cached: Mapping, given: Mapping) -> List[str]:
    """``"field: cache X, given Y"`` for every (dotted) field where two records differ."""
    old, new = _flattened(cached), _flattened(given)
    return [f"{key}: cache {old.get(key, '(absent)')!r}, given {new.get(key, '(absent)')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


# writing

def _check_first_item(dataset: Dataset) -> List[str]:
    """The stored fields besides the views (``label`` and the caption fields item 0 has)."""
    item = dataset[0]
    check(isinstance(item, Mapping) and "image" in item and "label" in item,
          f"`dataset` items must be dicts with 'image' and 'label' (and optionally {', '.join(CAPTION_FIELDS)}), "
          f"got {describe(item) if not isinstance(item, Mapping) else sorted(item)} for item 0")
    image = item["image"]
    check(isinstance(image, Tensor) and image.ndim == 3 and image.is_floating_point(),
          f"`dataset` item 0 'image' must be a float tensor [3, H, W] in [-1, 1], got {describe(image)}")
    return ["label"] + [name for name in CAPTION_FIELDS if name in item]


def _shard_rows(index: int, length: int, shard_size: int) -> range:
    return range(index * shard_size, min((index + 1) * shard_size, length))


def _shard_length(index: int, manifest: Mapping) -> int:
    return len(_shard_rows(index, manifest["dataset_length"], manifest["shard_size"]))


def _shard_is_complete(path: Path, field: str, rows: int) -> bool:
    """A shard under its final name that holds ``rows`` items; a damaged one is reported and redone."""
    if not path.exists():
        return False
    try:
        checkpoint_format(path, expected="safetensors")
        with safe_open(str(path), "pt") as handle:
            if handle.get_slice(field).get_shape()[0] == rows:
                return True
    except (CheckpointFileError, OSError, RuntimeError) as error:
        warnings.warn(f"{str(path)!r} is not a readable shard ({error}); encoding it again")
        return False
    warnings.warn(f"{str(path)!r} holds another number of items than {rows}; encoding it again")
    return False


def _write_manifest(out_dir: Path, manifest: Dict[str, Any], rank: int) -> None:
    """Write ``cache.json``, or check that the one there describes the same cache. Every rank writes the
    same text, each through its own temporary name (ranks may run at once)."""
    path = out_dir / MANIFEST_FILE
    if path.exists():
        diff = differences(_comparable(read_json_file(path)), _comparable(manifest))
        check(not diff, f"{str(out_dir)!r} holds a cache of another tokenizer, dataset or settings; use another "
                        f"`out_dir` or delete it. Differences: " + "; ".join(diff))
        return
    temporary = out_dir / f"{MANIFEST_FILE}.rank{rank}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _comparable(manifest: Mapping) -> Dict[str, Any]:
    return {key: value for key, value in manifest.items() if key != "library_version"}


def cache_dataset(dataset: Dataset, tokenizer: nn.Module, out_dir: PathLike, *, batch_size: int = 64,
                  flip: bool = True, ten_crop: bool = False, crop_range: float = CROP_RANGE, shard_size: int = 4096,
                  rank: int = 0, world_size: int = 1, progress: bool = True, num_workers: int = 0) -> Path:
    """Encode ``dataset`` once with ``tokenizer`` into ``out_dir`` (see the module docstring); returns it.

    ``dataset`` items are dicts with ``image`` (float ``[3, H, W]`` in [-1, 1]; give a dataset
    *without* random augmentation: the flip is cached here), ``label`` and optionally
    ``caption_ids`` / ``caption_mask``. ``flip``: cache the horizontal flip too; ``ten_crop``: cache
    the :func:`ten_crops` (with ``crop_range``) instead, their flipped five only with ``flip``.
    ``batch_size`` images are encoded at a time (each in all its views), on the tokenizer's device.
    ``rank`` / ``world_size``: this process writes shards ``rank, rank + world_size, ...`` (run one
    process per rank, e.g. under ``torchrun`` with the environment's RANK / WORLD_SIZE; no
    communication is needed). Shards already complete are skipped, so a rerun resumes.
    ``progress``: a tqdm bar; ``num_workers``: DataLoader workers that load the images."""
    kind, field = tokenizer_kind(tokenizer)
    batch_size, shard_size = check_positive_int("batch_size", batch_size), check_positive_int("shard_size", shard_size)
    world_size = check_positive_int("world_size", world_size)
    num_workers = check_positive_int("num_workers", num_workers, minimum=0)
    check(as_int(rank) is not None and 0 <= as_int(rank) < world_size,
          f"`rank` must be an int in [0, {world_size}) (`world_size` {world_size}), got {rank!r}")
    rank = as_int(rank)
    for name, value in (("flip", flip), ("ten_crop", ten_crop), ("progress", progress)):
        check_flag(name, value)
    check_finite_number("crop_range", crop_range, minimum=1.0)
    length = len(dataset)
    check(length > 0, "`dataset` is empty: nothing to cache")
    fields = _check_first_item(dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .. import __version__
    manifest = {"format": "mmgen_pytorch.data.cache", "version": FORMAT_VERSION, "library_version": __version__,
                "tokenizer": tokenizer_record(tokenizer), "kind": kind, "field": field,
                "views": view_names(flip=flip, ten_crop=ten_crop), "crop_range": crop_range if ten_crop else None,
                "fields": fields, "dataset_length": length, "shard_size": shard_size,
                "shard_count": -(-length // shard_size)}
    _write_manifest(out_dir, manifest, rank)
    pending = [index for index in range(rank, manifest["shard_count"], world_size)
               if not _shard_is_complete(out_dir / shard_name(index), field, _shard_length(index, manifest))]
    _encode_shards(dataset, tokenizer, out_dir, pending, fields, manifest, batch_size=batch_size,
                   num_workers=num_workers, progress=progress, rank=rank, world_size=world_size)
    return out_dir


def _encode_shards(dataset: Dataset, tokenizer: nn.Module, out_dir: Path, shards: Sequence[int], fields: Sequence[str],
                   manifest: Mapping, *, batch_size: int, num_workers: int, progress: bool, rank: int,
                   world_size: int) -> None:
    """Encode ``shards`` in order, batches never straddling two shards, and write each when it is full."""
    length, shard_size = manifest["dataset_length"], manifest["shard_size"]
    batches = [list(rows[start:start + batch_size]) for index in shards
               for rows in [_shard_rows(index, length, shard_size)] for start in range(0, len(rows), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=StackFields(["image", *fields]))
    description = "caching" if world_size == 1 else f"caching (rank {rank} of {world_size})"
    parts: List[Dict[str, Tensor]] = []
    remaining = list(shards)
    with tqdm(total=sum(map(len, batches)), disable=not progress, desc=description, unit="image") as bar:
        for batch in loader:
            images = batch.pop("image")
            parts.append({manifest["field"]: _encoded_views(tokenizer, images, manifest), **batch})
            bar.update(len(images))
            if sum(len(part["label"]) for part in parts) == _shard_length(remaining[0], manifest):
                _write_shard(out_dir, remaining.pop(0), parts, manifest)
                parts = []


def _encoded_views(tokenizer: nn.Module, images: Tensor, manifest: Mapping) -> Tensor:
    """``[b, views, ...]``: every view of every image, encoded in one tokenizer call on its device."""
    flip, crop_range = manifest["views"][-1].startswith("flipped"), manifest["crop_range"]
    views = image_views(images.to(next(tokenizer.parameters()).device), flip=flip, ten_crop=crop_range is not None,
                        crop_range=crop_range or CROP_RANGE)
    encoded = encode_images(tokenizer, views.flatten(0, 1)).cpu()
    return (encoded if manifest["kind"] == "kl" else encoded.to(code_dtype(tokenizer))).unflatten(0, views.shape[:2])


def _write_shard(out_dir: Path, index: int, parts: Sequence[Mapping[str, Tensor]], manifest: Mapping) -> None:
    tensors = {name: torch.cat([part[name] for part in parts]).contiguous() for name in parts[0]}
    metadata = {"format": manifest["format"], "version": str(FORMAT_VERSION), "shard": str(index),
                "first_item": str(index * manifest["shard_size"])}
    write_atomically(out_dir / shard_name(index), lambda tmp: save_file(tensors, tmp, metadata=metadata))


# reading

def read_manifest(out_dir: PathLike) -> Dict[str, Any]:
    """The parsed ``cache.json`` of a cache folder, checked for the format this version reads."""
    path = Path(out_dir) / MANIFEST_FILE
    check(path.is_file(), f"{str(out_dir)!r} has no {MANIFEST_FILE}: not a folder written by `cache_dataset`",
          error=FileNotFoundError)
    manifest = read_json_file(path)
    needed = {"format", "version", "tokenizer", "kind", "field", "views", "fields", "dataset_length", "shard_size",
              "shard_count"}
    check(isinstance(manifest, dict) and needed <= set(manifest) and manifest["format"] == "mmgen_pytorch.data.cache"
          and isinstance(manifest["version"], int) and manifest["version"] <= FORMAT_VERSION,
          f"{str(path)!r} is not a cache manifest this version reads (format version {FORMAT_VERSION}); it lacks "
          f"{sorted(needed - set(manifest)) if isinstance(manifest, dict) else 'everything'} or is newer",
          error=CheckpointFileError)
    return manifest


def _position(index: Any, length: int) -> int:
    """``index`` as a position in ``[0, length)`` (negative ones count from the end); IndexError otherwise."""
    position = as_int(index)
    check(position is not None and -length <= position < length,
          f"`index` must be an int in [-{length}, {length}), got {index!r}", error=IndexError)
    return position % length


class CachedDataset(Dataset):
    """The items of a cache written by :func:`cache_dataset`: dicts with ``moments`` (float32
    ``[2c, h, w]``, KL; draw a latent with :func:`sample_latent`) or ``codes`` (long ``[h, w]`` VQ,
    ``[h, w, depth]`` RQ), ``label`` (long) and the caption fields when cached.

    Lazy: the shards are memory-mapped (safetensors) and each item reads only its own rows; nothing is
    unpickled. Construction checks that every shard is present and complete, and, given ``tokenizer``,
    that it is the one the cache was written with (class, config, weights).
    ``flip=True``: each item is one of the cached views drawn at random (plain or flipped; one of the
    ten crops); ``flip=False``: one of the unflipped views (the plain image; one of the five crops).
    ``generator`` draws the views (None: torch's global RNG, which DataLoader seeds per worker; a
    Generator is copied into every worker, so give one only for single-process loading)."""

    def __init__(self, out_dir: PathLike, *, tokenizer: Optional[nn.Module] = None, flip: bool = True,
                 generator: GeneratorLike = None):
        check_flag("flip", flip)
        self.out_dir = Path(out_dir)
        self.manifest = manifest = read_manifest(self.out_dir)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        self.paths = [self.out_dir / shard_name(index) for index in range(manifest["shard_count"])]
        missing = [path.name for path in self.paths if not path.is_file()]
        check(not missing, f"the cache in {str(self.out_dir)!r} is incomplete: {len(missing)} of "
                           f"{len(self.paths)} shards are missing ({', '.join(missing[:10])}"
                           f"{' ...' if len(missing) > 10 else ''}); run `cache_dataset` again to finish it",
              error=FileNotFoundError)
        for index, path in enumerate(self.paths):
            self._check_shard(index, path)
        views = manifest["views"]
        self.choices = [i for i, name in enumerate(views) if flip or not name.startswith("flipped")]
        self.generator = as_generator(generator)
        self._handles: Dict[int, Any] = {}

    def _check_tokenizer(self, tokenizer: nn.Module) -> None:
        diff = differences(self.manifest["tokenizer"], tokenizer_record(tokenizer))
        check(not diff, f"`tokenizer` is not the one the cache in {str(self.out_dir)!r} was written with: "
                        + "; ".join(diff))

    def _check_shard(self, index: int, path: Path) -> None:
        checkpoint_format(path, expected="safetensors")
        rows = _shard_length(index, self.manifest)
        names = [self.manifest["field"], *self.manifest["fields"]]
        with safe_open(str(path), "pt") as handle:
            shapes = {name: handle.get_slice(name).get_shape() for name in names if name in handle.keys()}
        check(sorted(shapes) == sorted(names) and all(shape[0] == rows for shape in shapes.values()),
              f"{str(path)!r} does not fit the manifest: expected tensors {names} of {rows} items, got "
              f"{ {name: list(shape) for name, shape in shapes.items()} }", error=CheckpointFileError)

    def __len__(self) -> int:
        return self.manifest["dataset_length"]

    def labels(self) -> Tensor:
        """Every item's label (long), read from the shards without the encoded images."""
        return torch.cat([self._handle(shard).get_tensor("label") for shard in range(len(self.paths))]).long()

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        shard, row = divmod(_position(index, len(self)), self.manifest["shard_size"])
        handle = self._handle(shard)
        view = self.choices[int(torch.randint(len(self.choices), (), generator=self.generator))]
        field = self.manifest["field"]
        encoded = handle.get_slice(field)[row, view]
        item = {field: encoded if encoded.is_floating_point() else encoded.long()}
        item.update({name: handle.get_slice(name)[row] for name in self.manifest["fields"]})
        item["label"] = item["label"].long()
        return item

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.paths[shard]), "pt")
        return self._handles[shard]

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files stay in their process


class EncodedDataset(Dataset):
    """A dataset encoded once, in memory, through a frozen tokenizer: the items of :class:`CachedDataset`
    (``moments`` / ``codes``, ``label``, the caption fields) without writing files. For data small enough
    to hold (digits, CIFAR), this spares a run encoding every batch at every step; the training entry point
    uses it for ``data.in_memory`` with a tokenizer.

    ``dataset`` yields unaugmented images (``random_flip=False``); ``flip=True`` encodes each mirror too and
    each read picks the plain or mirrored copy with the one draw :func:`random_horizontal_flip` makes, so a
    seeded run sees the flips it would see encoding each batch. ``batch_size`` images are encoded at a time
    on the tokenizer's device; ``progress``: a tqdm bar. ``classes`` / ``captions`` / :meth:`labels` are
    those of ``dataset``."""

    def __init__(self, dataset: Dataset, tokenizer: nn.Module, *, flip: bool = True, batch_size: int = 256,
                 progress: bool = True):
        check_flag("flip", flip)
        check_flag("progress", progress)
        batch_size = check_positive_int("batch_size", batch_size)
        check(not getattr(dataset, "random_flip", False),
              "`dataset` flips its images at random; give it `random_flip=False` (`flip` encodes the mirrors)")
        kind, self.field = tokenizer_kind(tokenizer)
        check(len(dataset) > 0, "`dataset` is empty: nothing to encode")
        fields = _check_first_item(dataset)
        views = {"kind": kind, "views": view_names(flip=flip, ten_crop=False), "crop_range": None}
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=StackFields(["image", *fields]))
        parts = []
        for batch in tqdm(loader, desc="encoding images", disable=not progress, unit="batch"):
            parts.append({self.field: _encoded_views(tokenizer, batch.pop("image"), views), **batch})
        self.tensors = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        self.flip = flip
        self.classes = getattr(dataset, "classes", None)
        self.captions = getattr(dataset, "captions", None)

    def __len__(self) -> int:
        return len(self.tensors["label"])

    def labels(self) -> Tensor:
        return self.tensors["label"].long()

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> StackedItems:
        """The items at ``indices`` gathered as one batch (for a DataLoader; what stacking them one by one
        gives): each picks its view with its own draw, in order."""
        positions = [_position(index, len(self)) for index in indices]
        views = torch.tensor([int(bool(torch.rand(()) < 0.5)) if self.flip else 0  # random_horizontal_flip's draw
                              for _ in positions], dtype=torch.long)
        batch = {name: tensor[positions] for name, tensor in self.tensors.items()}
        encoded = batch[self.field][torch.arange(len(positions)), views]
        batch[self.field] = encoded if encoded.is_floating_point() else encoded.long()
        batch["label"] = batch["label"].long()
        return StackedItems(batch)


def sample_latent(moments: Tensor, *, generator: GeneratorLike = None, scale: float = 1.0) -> Tensor:
    """A latent ``(mean + std * eps) * scale`` drawn from cached KL moments ``[2c, h, w]`` or a batch
    ``[b, 2c, h, w]`` (through :class:`~mmgen_pytorch.tokenizers.DiagonalGaussian`, logvar clamped as
    there). For MAR pass ``scale=mar.vae_scale``: this is then what ``MAR.encode`` returns for the image."""
    check(isinstance(moments, Tensor) and moments.ndim in (3, 4) and moments.is_floating_point(),
          f"`moments` must be float [2c, h, w] or [b, 2c, h, w] KL moments, got {describe(moments)}")
    check_finite_number("scale", scale)
    batched = moments if moments.ndim == 4 else moments[None]
    latent = DiagonalGaussian(batched).sample(as_generator(generator, moments.device)) * scale
    return latent if moments.ndim == 4 else latent[0]
