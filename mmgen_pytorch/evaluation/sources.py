"""What an evaluation reads, recognised from a path and checked cheaply (file lists, ``.npy`` headers)
before any feature is extracted; images are then read lazily as uint8 batches ``(n, 3, H, W)``.

Generated images (:func:`open_generated`):

- a folder written by :func:`~.sampling.sample_images` / ``python -m mmgen_pytorch.sample`` (it holds
  ``sampling.json``): its ``images/NNNNNN.png``, every one of them;
- an ADM ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``), streamed from the archive;
- a folder of images (searched recursively, sorted by path), read as they are: one size, no crop.

References (:func:`open_reference`):

- a folder of real images, ADM-centre-cropped to the generated images' size
  (:func:`~.metrics.image_folder_batches`), optionally cached (:func:`~.metrics.reference_stats`);
- an ADM reference ``.npz``: its images ``arr_0`` and / or its precomputed ``mu`` / ``sigma``. As ADM's
  evaluator, the FID uses the file's ``mu`` / ``sigma`` when it holds them (taken as features of the given
  extractor: ADM's are TensorFlow Inception pool features, which torch-fidelity's Inception reproduces),
  and precision / recall the features of its images; without images, only the FID;
- statistics written by :meth:`~.metrics.FeatureStats.save` (their extractor identity is checked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._utils import check, check_positive_int
from .features import FeatureExtractor
from .metrics import STATS_KEYS, FeatureStats, check_cache_path, feature_stats, image_folder_batches, reference_stats

PathLike = Union[str, os.PathLike]
MOMENT_KEYS = ("mu", "sigma")
SAMPLE_FOLDER, ADM_NPZ, IMAGE_FOLDER, STATISTICS = "sample folder", "ADM .npz", "image folder", "statistics"


# sets of images


@dataclass(frozen=True)
class ImageSet:
    """Images to read: ``kind`` (one of the module's kinds), ``count`` and ``size`` ``(H, W)`` (None for
    an image folder that is cropped to the size it is asked for)."""
    kind: str
    path: Path
    count: int
    size: Optional[Tuple[int, int]]
    files: Tuple[Path, ...] = ()

    def batches(self, batch_size: int, *, resolution: Optional[int] = None,
                limit: Optional[int] = None) -> Iterator[Tensor]:
        """uint8 batches ``(n, 3, H, W)`` of ``batch_size`` images (the first ``limit`` when given); an image
        folder is cropped to ``resolution``."""
        batch_size = check_positive_int("batch_size", batch_size)
        count = self.count if limit is None else min(self.count, check_positive_int("limit", limit))
        if self.kind == ADM_NPZ:
            from .adm_npz import adm_npz_batches

            return (torch.from_numpy(rows.copy()).permute(0, 3, 1, 2)
                    for rows in adm_npz_batches(self.path, batch_size, limit=count))
        if self.kind == IMAGE_FOLDER and self.size is None:
            check(resolution is not None, f"{self.path}: give the `resolution` the image folder is cropped to")
            return _first(image_folder_batches(self.path, resolution=resolution, batch_size=batch_size), count)
        return _file_batches(self.files[:count], batch_size)


def _first(batches: Iterator[Tensor], count: int) -> Iterator[Tensor]:
    """The first ``count`` images of ``batches``."""
    left = count
    for batch in batches:
        if left <= 0:
            return
        yield batch[:left]
        left -= len(batch)


def _file_batches(files: Sequence[Path], batch_size: int) -> Iterator[Tensor]:
    """The image files as uint8 batches, each checked to have the first file's size."""
    import numpy as np

    from .adm_npz import read_png

    first = None
    for start in range(0, len(files), batch_size):
        images = []
        for file in files[start:start + batch_size]:
            image = read_png(file)
            first = image.shape if first is None else first
            check(image.shape == first, f"{str(file)!r} is {image.shape[1]}x{image.shape[0]}, but {str(files[0])!r} "
                                        f"is {first[1]}x{first[0]}: the generated images must have one size")
            images.append(image)
        yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def _image_size(file: Path) -> Tuple[int, int]:
    from ..data.images import pil_image_module

    with pil_image_module().open(file) as image:
        return image.height, image.width


def open_generated(path: PathLike, *, name: str = "GENERATED") -> ImageSet:
    """The generated images at ``path`` (a sample folder, an ADM ``.npz`` or an image folder), checked:
    the sample folder complete, the ``.npz``'s ``arr_0`` uint8 ``[N, H, W, 3]``, the folder not empty."""
    path = Path(path)
    if path.is_file():
        check(path.suffix == ".npz", f"{name} {str(path)!r} is a file but not an .npz (ADM's arr_0 images)")
        from .adm_npz import check_adm_images

        shape, _ = check_adm_images(path)
        return ImageSet(ADM_NPZ, path, shape[0], shape[1:3])
    check(path.is_dir(), f"{name} {str(path)!r} does not exist", error=FileNotFoundError)
    from .sampling import SETTINGS_FILE

    if (path / SETTINGS_FILE).is_file():
        files = _sample_folder_files(path, name)
        return ImageSet(SAMPLE_FOLDER, path, len(files), _image_size(files[0]), tuple(files))
    from ..data.images import IMAGE_EXTENSIONS, _image_files

    files = _image_files(path, IMAGE_EXTENSIONS, recursive=True)
    check(len(files) > 0, f"{name} {str(path)!r} holds no images (suffixes {list(IMAGE_EXTENSIONS)})",
          error=FileNotFoundError)
    return ImageSet(IMAGE_FOLDER, path, len(files), _image_size(files[0]), tuple(files))


def _sample_folder_files(folder: Path, name: str) -> List[Path]:
    from ..files import read_json_file
    from .sampling import SETTINGS_FILE, image_file

    num = read_json_file(folder / SETTINGS_FILE)["num"]
    files = [image_file(folder, index) for index in range(num)]
    missing = [file for file in files if not file.is_file()]
    check(not missing, f"{name} {str(folder)!r}: {len(missing)} of its {num} images are not written (the first: "
                       f"{missing[0].name if missing else ''}); finish the sampling (rerun the same "
                       f"mmgen_pytorch.sample command: it resumes) before scoring", error=FileNotFoundError)
    return files


# references


@dataclass(frozen=True)
class Reference:
    """A reference, checked: ``kind``; its ``images`` (None for statistics or an ADM ``.npz`` holding
    only ``mu`` / ``sigma``); ``moments``: the ``.npz`` holds ``mu`` / ``sigma`` of the extractor's size;
    for an image folder, its statistics ``cache`` and the ``first_size`` ``(H, W)`` of its first image."""
    kind: str
    path: Path
    images: Optional[ImageSet]
    moments: bool = False
    notes: Tuple[str, ...] = ()
    cache: Optional[Path] = None
    first_size: Optional[Tuple[int, int]] = None

    @property
    def source(self) -> str:
        """The resolved path recorded in (and required of) an image folder's cached statistics."""
        return str(self.path.resolve())

    def check_size(self, size: Tuple[int, int], *, name: str = "the generated images") -> None:
        """An ADM batch's images must be as large as the generated ones (a folder is cropped to them)."""
        check(size[0] == size[1] or self.kind != IMAGE_FOLDER,
              f"{name} are {size[1]}x{size[0]}: an image-folder reference is cropped to squares")
        if self.images is not None and self.images.size is not None:
            check(tuple(self.images.size) == tuple(size),
                  f"the reference {str(self.path)!r} holds {self.images.size[1]}x{self.images.size[0]} images but "
                  f"{name} are {size[1]}x{size[0]}: compare images of one size")
        self._check_saved_origin(size[0])

    def _check_saved_origin(self, resolution: int) -> None:
        """Saved statistics (an image folder's existing cache, or a statistics file given as the reference)
        must come from images resized to ``resolution``; a cache must record it, and its folder."""
        if self.kind == STATISTICS:
            FeatureStats.load(self.path).check_origin(resolution=resolution, required=False,
                                                      where=f"the statistics in {str(self.path)!r}")
        elif self.cache is not None and self.cache.is_file():
            FeatureStats.load(self.cache).check_origin(resolution=resolution, source=self.source,
                                                       where=f"the reference cache {str(self.cache)!r}")

    def resize_notes(self, resolution: int) -> Tuple[str, ...]:
        """A note when an image folder's images are resized to ``resolution`` (judged by its first image),
        a warning when they are upscaled."""
        if self.first_size is None or min(self.first_size) == resolution:
            return ()
        height, width = self.first_size
        if min(self.first_size) > resolution:
            return (f"the reference images (the first: {width}x{height}) are resized down and centre-cropped to "
                    f"{resolution}x{resolution} (ADM's crop)",)
        return (f"WARNING: the reference images (the first: {width}x{height}) are UPSCALED to "
                f"{resolution}x{resolution}: FID against upscaled references is not comparable with published "
                f"numbers",)

    def stats(self, extractor: FeatureExtractor, *, resolution: int, batch_size: int,
              cache: Optional[PathLike] = None) -> FeatureStats:
        """The reference's :class:`~.metrics.FeatureStats` in ``extractor``'s space (folders cropped to
        ``resolution``; ``cache``: an image folder's statistics read from / written to that file)."""
        if self.kind == STATISTICS:
            return FeatureStats.load(self.path, extractor)
        if self.kind == IMAGE_FOLDER:
            batches = self.images.batches(batch_size, resolution=resolution)
            return reference_stats(batches, extractor, cache=cache, resolution=resolution, source=self.source)
        moments = _read_moments(self.path) if self.moments else None
        if self.images is None:  # mu / sigma only: no features kept; the count is not in the file (FID needs none)
            mu, sigma = moments
            return FeatureStats(mu=mu, sigma=sigma, count=2, features=torch.zeros(0, mu.shape[0]),
                                extractor=extractor.identity)
        stats = feature_stats(self.images.batches(batch_size), extractor)
        return stats if moments is None else replace(stats, mu=moments[0], sigma=moments[1])


def open_reference(path: PathLike, *, num_features: int, name: str = "--reference",
                   cache: Optional[PathLike] = None, cache_name: str = "--reference-cache") -> Reference:
    """The reference at ``path`` (an image folder, an ADM ``.npz`` or saved statistics), checked against an
    extractor of ``num_features`` features without loading more than array headers."""
    path = Path(path)
    check(path.exists(), f"{name} {str(path)!r} does not exist", error=FileNotFoundError)
    check(cache is None or path.is_dir(), f"{cache_name} goes with an image-folder reference; {name} "
                                          f"{str(path)!r} is a file")
    if path.is_dir():
        if cache is not None:
            check_cache_path(cache, name=cache_name)
        from ..data import ImageFolderDataset

        samples = ImageFolderDataset(path, resolution=1, random_flip=False).samples  # lists the files: none is read
        return Reference(IMAGE_FOLDER, path, ImageSet(IMAGE_FOLDER, path, len(samples), None),
                         cache=None if cache is None else Path(cache), first_size=_image_size(samples[0][0]))
    check(path.suffix == ".npz", f"{name} {str(path)!r} must be an image folder or an .npz (ADM's reference batch, "
                                 f"or statistics written by FeatureStats.save)")
    from .adm_npz import IMAGES_KEY, check_adm_images, npz_members

    members = npz_members(path)
    if all(key in members for key in STATS_KEYS):
        _check_dimension(path, members["mu"][0], num_features, name)
        return Reference(STATISTICS, path, None)
    has_moments = all(key in members for key in MOMENT_KEYS)
    check(has_moments or IMAGES_KEY in members,
          f"{name} {str(path)!r} holds {sorted(members)}: expected ADM's reference batch (`{IMAGES_KEY}` images "
          f"and / or `mu`, `sigma`) or statistics written by FeatureStats.save ({list(STATS_KEYS)})")
    images = None
    if IMAGES_KEY in members:
        shape, _ = check_adm_images(path)
        images = ImageSet(ADM_NPZ, path, shape[0], shape[1:3])
    moments, notes = False, []
    if has_moments:
        dimension = members["mu"][0]
        if images is None:
            _check_dimension(path, dimension, num_features, name)
        moments = dimension == (num_features,)
        _check_moment_shapes(path, members, dimension)
        notes.append(f"FID against the precomputed mu / sigma of {path.name} (as ADM's evaluator)" if moments else
                     f"{path.name}'s mu / sigma ({dimension[0] if dimension else '?'} features) do not fit the "
                     f"extractor ({num_features}): the reference statistics come from its {images.count} images")
    return Reference(ADM_NPZ, path, images, moments, tuple(notes))


def _check_dimension(path: Path, shape: Tuple[int, ...], num_features: int, name: str) -> None:
    check(tuple(shape) == (num_features,),
          f"{name} {str(path)!r} holds statistics of {shape[0] if len(shape) == 1 else shape} features, but the "
          f"extractor gives {num_features} (ADM's and torch-fidelity's are Inception's 2048: --extractor inception)")


def _check_moment_shapes(path: Path, members: dict, dimension: Tuple[int, ...]) -> None:
    (mu_shape, mu_type), (sigma_shape, sigma_type) = members["mu"], members["sigma"]
    size = dimension[0] if len(dimension) == 1 else -1
    check(len(mu_shape) == 1 and tuple(sigma_shape) == (size, size) and mu_type.kind == "f" and sigma_type.kind == "f",
          f"{str(path)!r}: `mu` {tuple(mu_shape)} {mu_type} and `sigma` {tuple(sigma_shape)} {sigma_type} must be "
          f"float (D,) and (D, D)")


def _read_moments(path: Path) -> Tuple[Tensor, Tensor]:
    import numpy as np

    from .adm_npz import read_npz

    arrays = read_npz(path, required=MOMENT_KEYS, what="the reference")
    mu, sigma = (torch.from_numpy(arrays[key].astype(np.float64)) for key in MOMENT_KEYS)
    check(bool(torch.isfinite(mu).all() and torch.isfinite(sigma).all()),
          f"{str(path)!r}: `mu` / `sigma` hold NaN or inf values")
    return mu, sigma
