"""ADM's sample / reference-batch format (openai/guided-diffusion's evaluator): one ``.npz`` file, as
``np.savez`` writes it, holding ``arr_0``, the images as uint8 ``[N, H, W, 3]``, and ``arr_1``, their
class labels ``[N]``, when the samples are class-conditional.

:func:`save_adm_npz` writes arrays held in memory; :func:`save_adm_npz_from_pngs` streams PNG files into
the same layout one image at a time (50k 256² images are 9.8 GB: never held at once). Both go through one
writer that stores each array uncompressed as ``np.savez`` does, so ``np.load`` and the ADM evaluator
read the result; the file appears under its name only once complete. :func:`load_adm_npz` reads and
checks one.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .._utils import check, describe
from ..saving import write_atomically

PathLike = Union[str, os.PathLike]
IMAGES_KEY, LABELS_KEY = "arr_0", "arr_1"


class ADMBatch(NamedTuple):
    images: np.ndarray             # uint8 [N, H, W, 3]
    labels: Optional[np.ndarray]   # int64 [N], or None when the file holds no labels


# writing


def save_adm_npz(path: PathLike, images, labels=None) -> Path:
    """``images`` (uint8 ``[N, H, W, 3]``, a NumPy array or a CPU tensor) and optional ``labels``
    (integers ``[N]``) written to ``path`` as ``arr_0`` / ``arr_1``."""
    images = _as_array("images", images)
    check(images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3 and images.shape[0] > 0,
          f"`images` must be uint8 [N, H, W, 3] with N >= 1 (channel-last RGB), got {_describe_array(images)}")
    labels = None if labels is None else _checked_labels("labels", _as_array("labels", labels), len(images))
    return _write_npz(Path(path), images.shape, (np.ascontiguousarray(image) for image in images), labels)


def save_adm_npz_from_pngs(path: PathLike, files: Sequence[PathLike], labels=None) -> Path:
    """The PNG ``files`` (RGB, all of one size), in order, as ``arr_0`` of ``path`` (plus ``labels`` as
    ``arr_1``); each file is read when it is written, so memory holds one image at a time."""
    check(len(files) > 0, "`files` is empty: give at least one PNG")
    missing = [str(file) for file in files if not Path(file).is_file()]
    if missing:
        raise FileNotFoundError(f"`files`: {len(missing)} of {len(files)} do not exist, the first {missing[0]!r}")
    labels = None if labels is None else _checked_labels("labels", _as_array("labels", labels), len(files))
    first = read_png(files[0])
    shape = (len(files), *first.shape)

    def rows():
        yield first
        for file in files[1:]:
            image = read_png(file)
            check(image.shape == first.shape, f"{str(file)!r} is {image.shape[1]}x{image.shape[0]}, but "
                                              f"{str(files[0])!r} is {first.shape[1]}x{first.shape[0]}: one size only")
            yield image
    return _write_npz(Path(path), shape, rows(), labels)


def read_png(path: PathLike) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` RGB."""
    from ..data.images import pil_image_module

    with pil_image_module().open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _write_npz(path: Path, shape: Tuple[int, ...], rows: Iterable[np.ndarray], labels: Optional[np.ndarray]) -> Path:
    """``np.savez``'s layout (a zip of uncompressed ``.npy`` members) written row by row."""
    check(path.suffix == ".npz", f"`path` must end in .npz (np.load tells the format by it), got {str(path)!r}")
    check(path.parent.is_dir(), f"`path`: the folder {str(path.parent)!r} does not exist", error=FileNotFoundError)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            _write_member(archive, IMAGES_KEY, shape, np.dtype(np.uint8), rows)
            if labels is not None:
                _write_member(archive, LABELS_KEY, labels.shape, labels.dtype, [labels])
    write_atomically(path, write)
    return path


def _write_member(archive: zipfile.ZipFile, name: str, shape: Tuple[int, ...], dtype: np.dtype,
                  chunks: Iterable[np.ndarray]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


# reading


def read_npz(path: PathLike, *, required: Sequence[str], optional: Sequence[str] = (), what: str = "the file",
             written_by: str = "np.savez") -> Dict[str, np.ndarray]:
    """The arrays ``required`` (all of them) and ``optional`` (those present) of an ``.npz`` file, read without
    pickles. Every error names the file: missing, not an archive of arrays, or lacking a required array."""
    path = Path(path)
    check(path.is_file(), f"{what} {str(path)!r} does not exist", error=FileNotFoundError)
    not_archive = f"{what} {str(path)!r} is not an .npz archive of arrays ({written_by})"
    try:
        archive = np.load(path, allow_pickle=False)
        check(hasattr(archive, "files"), f"{not_archive}: it holds a single array")
        with archive:
            keys = list(archive.files)
            arrays = {key: archive[key] for key in (*required, *optional) if key in keys}
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{not_archive}: {error}") from None
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith(not_archive) else f"{not_archive}: {error}") from None
    missing = [key for key in required if key not in arrays]
    check(not missing, f"{what} {str(path)!r} lacks {missing} (written by {written_by}); it holds {keys}")
    return arrays


def load_adm_npz(path: PathLike) -> ADMBatch:
    """``(images uint8 [N, H, W, 3], labels int64 [N] or None)`` from an ADM ``.npz`` file, checked."""
    arrays = read_npz(path, required=[IMAGES_KEY], optional=[LABELS_KEY], what="ADM batch")
    path = Path(path)
    images = arrays[IMAGES_KEY]
    check(images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3,
          f"`{IMAGES_KEY}` in {str(path)!r} must be uint8 [N, H, W, 3], got {_describe_array(images)}")
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        labels = _checked_labels(f"`{LABELS_KEY}` in {str(path)!r}", labels, len(images), quoted=True)
    return ADMBatch(images, labels)


def npz_members(path: PathLike) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of every array of an ``.npz`` file, from the members' ``.npy`` headers
    only (nothing is loaded: a 50k-image batch is 9.8 GB)."""
    path = Path(path)
    check(path.is_file(), f"{str(path)!r} does not exist", error=FileNotFoundError)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {}
            for entry in archive.namelist():
                if entry.endswith(".npy"):
                    with archive.open(entry) as member:
                        members[entry[:-len(".npy")]] = _npy_header(member)[:2]
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{str(path)!r} is not an .npz archive of arrays (np.savez): {error}") from None
    return members


def _npy_header(member) -> Tuple[Tuple[int, ...], np.dtype, bool]:
    major, _ = np.lib.format.read_magic(member)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(member)
    return tuple(shape), dtype, fortran_order


def adm_npz_batches(path: PathLike, batch_size: int, *, limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """The images ``arr_0`` of an ADM ``.npz`` as uint8 ``[n, H, W, 3]`` arrays of ``batch_size`` rows (the
    first ``limit`` images when given), read from the archive as a stream: memory holds one batch."""
    path = Path(path)
    shape, dtype = check_adm_images(path)
    row = int(np.prod(shape[1:]))
    count = shape[0] if limit is None else min(limit, shape[0])
    with zipfile.ZipFile(path) as archive, archive.open(f"{IMAGES_KEY}.npy") as member:
        _npy_header(member)
        for start in range(0, count, batch_size):
            rows = min(batch_size, count - start)
            data = member.read(rows * row)
            check(len(data) == rows * row, f"{str(path)!r}: `{IMAGES_KEY}` ends before its {shape[0]} images")
            yield np.frombuffer(data, dtype=np.uint8).reshape(rows, *shape[1:])


def check_adm_images(path: PathLike) -> Tuple[Tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of ``arr_0`` in an ``.npz``, which must be uint8 ``[N, H, W, 3]`` (C order), N >= 1."""
    path = Path(path)
    members = npz_members(path)
    check(IMAGES_KEY in members, f"{str(path)!r} has no `{IMAGES_KEY}` (the images); it holds {sorted(members)}")
    shape, dtype = members[IMAGES_KEY]
    check(dtype == np.uint8 and len(shape) == 4 and shape[-1] == 3 and shape[0] > 0,
          f"`{IMAGES_KEY}` in {str(path)!r} must be uint8 [N, H, W, 3] with N >= 1, got "
          f"array(shape={shape}, dtype={dtype})")
    with zipfile.ZipFile(path) as archive, archive.open(f"{IMAGES_KEY}.npy") as member:
        check(not _npy_header(member)[2], f"`{IMAGES_KEY}` in {str(path)!r} is stored in Fortran order; "
                                          f"write it with np.savez from a C-ordered array")
    return shape, dtype


# checks


def _as_array(name: str, value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    check(isinstance(value, np.ndarray), f"`{name}` must be a NumPy array or a tensor, got {describe(value)}",
          error=TypeError)
    return value


def _checked_labels(name: str, labels: np.ndarray, count: int, *, quoted: bool = False) -> np.ndarray:
    where = name if quoted else f"`{name}`"
    check(labels.ndim == 1 and labels.shape[0] == count and np.issubdtype(labels.dtype, np.integer),
          f"{where} must be integer class labels [{count}] (one per image), got {_describe_array(labels)}")
    return labels.astype(np.int64)


def _describe_array(array: np.ndarray) -> str:
    return f"array(shape={tuple(array.shape)}, dtype={array.dtype})"
