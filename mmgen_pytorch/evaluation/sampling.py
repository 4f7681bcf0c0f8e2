"""Sampling at scale for evaluation: N images from a model, in batches, sharded across processes, resumable,
written as PNGs and gathered into ADM's ``.npz`` (:mod:`~mmgen_pytorch.evaluation.adm_npz`).

The images are cut into global batches ``[k * batch_size, (k + 1) * batch_size)``; process ``rank`` of
``world_size`` draws batches ``k = rank, rank + world_size, ...``, each from its own seed, a function of
``(seed, first index of the batch)`` only. So a run gives the same images, byte for byte, whether it ran on
one process or several and whether it was interrupted and resumed (on one kind of device: GPU kernels may
differ between cards). A batch whose PNGs all exist is skipped; each PNG appears under its name only once
written in full. The settings of a run are kept in ``sampling.json``; a run into a folder written with other
settings is refused before any image is drawn (a ``sampling.json`` left by a run that failed before its first
image is replaced).

Layout of the output folder::

    sampling.json                  the settings (number, batch size, seed, conditioning, sampler options)
    images/000000.png ...          one PNG per image, by global index
    samples_NxHxWx3.npz            ADM's format: arr_0 uint8 [N, H, W, 3], arr_1 the class labels if any

Conditioning: class labels spread evenly over the classes in a fixed order (image ``i`` of ``N`` has class
``i * C // N``: ``N / C`` images per class, in class order, as upstream MAR's evaluation), captions from a
prompts file (image ``i`` takes prompt ``i mod P``), or none (unconditional).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import as_int, check, check_finite_number, check_positive_int, describe, eval_mode
from ..guidance import check_cfg_scale, check_cfg_schedule
from ..saving import write_atomically
from ..data.images import unit_to_uint8
from ..training.recipes import (TEXT_MODELS, Batch, byte_tokenizer, class_count, generate_images, image_modality,
                                model_name, sampling_problem)
from ..transfusion.patches import PatchedLatents
from .adm_npz import save_adm_npz_from_pngs

PathLike = Union[str, os.PathLike]
SETTINGS_FILE, IMAGES_DIR = "sampling.json", "images"
SETTINGS_FORMAT = 1
RESERVED_OPTIONS = ("generator", "progress")  # set per batch by sample_images itself


# what each image is conditioned on


def balanced_labels(num: int, num_classes: int) -> List[int]:
    """Class ``i * num_classes // num`` for image ``i``: every class ``num / num_classes`` times (counts
    differ by at most one when it does not divide), in class order."""
    return [index * num_classes // num for index in range(num)]


def read_prompts(path: PathLike) -> List[str]:
    """Prompts from a text file, one per line, or from JSON Lines (``.jsonl``: each line a JSON string or
    an object with a ``"prompt"``, ``"caption"`` or ``"text"`` key); blank lines are skipped."""
    path = Path(path)
    check(path.is_file(), f"prompts file {str(path)!r} does not exist", error=FileNotFoundError)
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                prompts.append(_jsonl_prompt(line, f"{path}, line {number}") if path.suffix == ".jsonl"
                               else line.rstrip("\r\n"))
    check(len(prompts) > 0, f"prompts file {str(path)!r} holds no prompts")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg})") from None
    if isinstance(entry, dict):
        entry = next((entry[key] for key in ("prompt", "caption", "text") if key in entry), None)
    check(isinstance(entry, str), f"{where}: expected a JSON string or an object with a 'prompt', 'caption' or "
                                  f"'text' string, got {line.strip()[:80]!r}")
    return entry


class Conditioning:
    """The condition of every image index: a class label, a caption (byte ids, as training tokenizes
    captions, padded to ``max_caption_length``) or nothing."""

    def __init__(self, num: int, *, num_classes: Optional[int], prompts: Optional[Sequence[str]],
                 max_caption_length: int):
        self.labels = balanced_labels(num, num_classes) if num_classes else None
        self.prompts = list(prompts) if prompts else None
        if self.prompts:
            from ..data.captions import CaptionTokenizer

            self.tokenize = CaptionTokenizer(byte_tokenizer, max_length=max_caption_length)

    def batch(self, indices: range) -> Batch:
        if self.prompts:
            ids, masks = zip(*(self.tokenize(self.prompts[i % len(self.prompts)]) for i in indices))
            return {"caption_ids": torch.stack(ids), "caption_mask": torch.stack(masks)}
        labels = [self.labels[i] for i in indices] if self.labels else [-1] * len(indices)
        return {"label": torch.tensor(labels, dtype=torch.long)}


# batches, shards and seeds


def shard_batches(num: int, batch_size: int, rank: int, world_size: int) -> List[range]:
    """The global batches this process draws: ``k = rank, rank + world_size, ...``."""
    starts = range(rank * batch_size, num, world_size * batch_size)
    return [range(start, min(start + batch_size, num)) for start in starts]


def batch_seed(seed: int, first_index: int) -> int:
    """The seed of the batch starting at ``first_index``: a hash of both, so batches of different seeds
    never share a stream (``seed + index`` would)."""
    digest = hashlib.sha256(f"mmgen-sampling:{seed}:{first_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def process_rank(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """``(rank, world_size)`` as given, or torch.distributed's when it is initialised, else ``(0, 1)``."""
    import torch.distributed as dist

    if rank is None and world_size is None:
        return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    check(rank is not None and world_size is not None,
          f"give both `rank` and `world_size` or neither, got rank={rank!r}, world_size={world_size!r}")
    world_size = check_positive_int("world_size", world_size)
    number = as_int(rank)
    check(number is not None and 0 <= number < world_size,
          f"`rank` must be an int in [0, {world_size}) (`world_size` {world_size}), got {describe(rank)}")
    return number, world_size


def image_file(out_dir: PathLike, index: int) -> Path:
    return Path(out_dir) / IMAGES_DIR / f"{index:06d}.png"


# settings: a resumed run must be the same run


def sampling_settings(*, num: int, batch_size: int, seed: int, num_classes: Optional[int],
                      prompts: Optional[Sequence[str]], max_caption_length: int, options: Mapping[str, Any],
                      record: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Everything the images depend on, checked (a :class:`ValueError` / :class:`TypeError` naming the
    argument), as the JSON ``sampling.json`` holds."""
    num = check_positive_int("num", num)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_positive_int("seed", seed, minimum=0)
    num_classes = None if num_classes is None else check_positive_int("num_classes", num_classes, minimum=0)
    if prompts is not None:
        check(isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(p, str) for p in prompts),
              f"`prompts` must be a non-empty list of strings, got {describe(prompts)}", error=TypeError)
        check(not num_classes, f"give `prompts` or `num_classes`, not both (got num_classes={num_classes})")
    max_caption_length = check_positive_int("max_caption_length", max_caption_length)
    options = check_sampler_options(options)
    prompts_hash = None if prompts is None else hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    settings = dict(format=SETTINGS_FORMAT, num=num, batch_size=batch_size, seed=seed,
                    conditioning="captions" if prompts else "classes" if num_classes else "none",
                    num_classes=num_classes or None, prompts_sha256=prompts_hash,
                    max_caption_length=max_caption_length if prompts else None, options=options)
    extra = dict(record or {})
    clash = sorted(set(extra) & set(settings))
    check(not clash, f"`record` may not redefine the settings {clash}")
    return _as_json({**settings, **extra}, "record")


def check_sampler_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``cfg``, ``temperature``, ``steps`` and ``cfg_schedule`` checked; the other options must be JSON values
    (they are recorded) and not the ones :func:`sample_images` sets itself."""
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    check(not reserved, f"{', '.join(f'`{name}`' for name in reserved)}: set by sample_images per batch (from "
                        f"`seed`); do not pass it", error=TypeError)
    check_cfg_scale(options.get("cfg", 1.0), name="cfg")
    check_finite_number("temperature", options.get("temperature", 1.0), minimum=0)
    if options.get("steps") is not None:
        check_positive_int("steps", options["steps"])
    if "cfg_schedule" in options:
        check_cfg_schedule(options["cfg_schedule"])
    return _as_json(dict(options), "sampler options")


def _as_json(value: Dict[str, Any], name: str) -> Dict[str, Any]:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(f"the {name} must be JSON values (they are recorded in {SETTINGS_FILE}): {error}") from None


def check_settings(out_dir: PathLike, settings: Mapping[str, Any]) -> None:
    """A folder with images must have been written with ``settings``: a :class:`ValueError` naming the
    settings that differ (or the images without a ``sampling.json``). A ``sampling.json`` without any image
    (a run that failed before its first image) binds nothing: :func:`write_settings` replaces it."""
    folder = Path(out_dir)
    check(not folder.exists() or folder.is_dir(), f"`out_dir` {str(folder)!r} is a file, not a folder",
          error=NotADirectoryError)
    file = folder / SETTINGS_FILE
    image = first_image(folder)
    if not file.is_file():
        check(image is None, f"`out_dir` {str(folder)!r} holds images ({image.name if image else ''}, ...) but no "
                             f"{SETTINGS_FILE}: not a folder written by sample_images; choose another")
        return
    changed = changed_settings(file, settings)
    check(not changed or image is None,
          f"`out_dir` {str(folder)!r} was sampled with other settings ({str(file)!r}): "
          + "; ".join(f"{key}: {there!r} there, {now!r} now" for key, (there, now) in changed.items())
          + f". Resume with the same settings, or choose another `out_dir` (or delete its {IMAGES_DIR}/ and "
            f"{SETTINGS_FILE} to start over)")


def first_image(folder: Path) -> Optional[Path]:
    """A PNG written in full under ``folder/images`` (partial writes end in ``.tmp``), or None."""
    return next((folder / IMAGES_DIR).glob("*.png"), None)


def changed_settings(file: Path, settings: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (in file, in settings)}`` for each setting that differs."""
    from ..files import read_json_file

    saved = read_json_file(file)
    return {key: (saved.get(key), settings.get(key)) for key in sorted(set(saved) | set(settings))
            if saved.get(key) != settings.get(key)}


def write_settings(out_dir: PathLike, settings: Mapping[str, Any], rank: int) -> None:
    """``sampling.json``, unless it holds ``settings`` already (:func:`check_settings` allowed any other
    only in a folder without images)."""
    folder = Path(out_dir)
    (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    file = folder / SETTINGS_FILE
    if not file.is_file() or changed_settings(file, settings):  # processes may race: each its own temporary
        text = json.dumps(settings, indent=2) + "\n"
        write_atomically(file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), tmp_suffix=f".{rank}.tmp")


# sampling


def sample_images(model: nn.Module, tokenizer: Optional[nn.Module], out_dir: PathLike, *, num: int,
                  batch_size: int = 16, seed: int = 0, num_classes: Optional[int] = None,
                  prompts: Optional[Sequence[str]] = None, max_caption_length: int = 120,
                  rank: Optional[int] = None, world_size: Optional[int] = None, progress: bool = True,
                  gather: bool = True, record: Optional[Mapping[str, Any]] = None, cfg: float = 1.0,
                  temperature: float = 1.0, steps: Optional[int] = None, **sampler_options) -> Optional[Path]:
    """Draw ``num`` images from ``model`` (decoded by ``tokenizer``) into ``out_dir`` (layout in this
    module's docstring); returns the ``.npz`` path when this call wrote it, else None.

    Args:
        num_classes: class-balanced labels over that many classes (default: the model's own class table,
            MAR's or a c2i LlamaGen's; 0: unconditional). ``prompts``: captions instead (tokenized as
            training does, UTF-8 bytes padded to ``max_caption_length``).
        batch_size, seed: the images depend on both (and on nothing else of the run).
        rank, world_size: this process's shard (default: torch.distributed's when initialised, else the
            whole). With torch.distributed, every process waits at a barrier and rank 0 gathers the
            ``.npz``; without it, rank 0 gathers when it finds every image written (run a shard again
            once the others finished: it skips its images and gathers).
        gather: write the ``.npz`` at the end (rank 0). ``progress``: a tqdm bar (rank 0).
        record: extra JSON facts kept in ``sampling.json`` and compared on resume (the CLI: the checkpoint).
        cfg, temperature, steps, sampler_options: the model's sampler options
            (:func:`~mmgen_pytorch.training.recipes.generate_images`), e.g. ``cfg_schedule``, ``top_k``.
    Everything is checked before the first image is drawn: the arguments, the folder's settings and
    whether the model (with this tokenizer) can draw this conditioning.
    """
    rank, world_size = process_rank(rank, world_size)
    settings, conditioning = checked_sampling(model, tokenizer, out_dir, num=num, batch_size=batch_size, seed=seed,
                                              num_classes=num_classes, prompts=prompts,
                                              max_caption_length=max_caption_length, record=record, cfg=cfg,
                                              temperature=temperature, steps=steps, **sampler_options)
    write_settings(out_dir, settings, rank)
    _draw_shard(model, tokenizer, Path(out_dir), conditioning, settings, rank, world_size, progress)
    _barrier()
    if not gather or rank != 0:
        return None
    return gather_npz(out_dir)


def checked_sampling(model: nn.Module, tokenizer: Optional[nn.Module], out_dir: PathLike, *, num: int,
                     batch_size: int, seed: int, num_classes: Optional[int], prompts: Optional[Sequence[str]],
                     max_caption_length: int, record: Optional[Mapping[str, Any]] = None, cfg: float = 1.0,
                     temperature: float = 1.0, steps: Optional[int] = None,
                     **sampler_options) -> Tuple[Dict[str, Any], Conditioning]:
    """``(settings, conditioning)`` of a :func:`sample_images` run (same arguments), every check passed and
    nothing written: the arguments, ``num_classes`` against the model's classes, whether the model can draw
    this conditioning, and the settings of a folder already sampled."""
    options = dict(cfg=cfg, temperature=temperature, steps=steps, **sampler_options)
    classes = class_count(model)
    num_classes = classes if num_classes is None and prompts is None else num_classes
    settings = sampling_settings(num=num, batch_size=batch_size, seed=seed, num_classes=num_classes, prompts=prompts,
                                 max_caption_length=max_caption_length, options=options, record=record)
    check(not num_classes or classes is None or num_classes <= classes,
          f"`num_classes` {num_classes}: the model has {classes} classes; give at most {classes} (default: all)")
    tokens = text_tokens(model)
    check(not num_classes or tokens is None or num_classes <= tokens,
          f"`num_classes` {num_classes}: {model_name(model)} takes a class label as a one-token text, and its texts "
          f"have {tokens} tokens; give at most {tokens}")
    conditioning = Conditioning(num, num_classes=num_classes, prompts=prompts, max_caption_length=max_caption_length)
    problem = sampling_problem(model, tokenizer, conditioning.batch(range(min(num, batch_size))))
    unconditional = " (`num_classes` 0 asks for unconditional images)" if num_classes == 0 else ""
    check(problem is None, f"`model`: {problem}{unconditional}")
    check_settings(out_dir, settings)
    return settings, conditioning


def drawn_size(model: nn.Module, tokenizer: Optional[nn.Module]) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of the images :func:`generate_images` draws with ``model`` and ``tokenizer``, from their
    configuration (nothing is drawn); None where the model fixes none (a Transfusion without a default shape)."""
    name = model_name(model)
    if name == "MAR":
        return (model.img_size,) * 2
    factor = tokenizer.downsample_factor if tokenizer is not None else 1
    if name in ("LlamaGen", "DnDTransformer"):
        grid = (model.grid_size,) * 2
    else:  # Transfusion / MonoFormer: latents [h, w, c] (or [c, h, w] in patches); a wrapper keeps `inner`'s shape
        spec = image_modality(model)
        grid = spec.latent_size if isinstance(spec, PatchedLatents) else spec.default_shape
        if grid is None or len(grid) != 2:
            return None
    return grid[0] * factor, grid[1] * factor


def text_tokens(model: nn.Module) -> Optional[int]:
    """The text vocabulary of a Transfusion / MonoFormer (its class labels are text ids); None for the others."""
    return model.vocab.num_text_tokens if model_name(model) in TEXT_MODELS else None


def _draw_shard(model: nn.Module, tokenizer: Optional[nn.Module], out_dir: Path, conditioning: Conditioning,
                settings: Mapping[str, Any], rank: int, world_size: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    batches = shard_batches(settings["num"], settings["batch_size"], rank, world_size)
    todo = [indices for indices in batches if not all(image_file(out_dir, i).is_file() for i in indices)]
    bar = tqdm(total=sum(map(len, batches)), initial=sum(map(len, batches)) - sum(map(len, todo)),
               disable=not progress or rank != 0, desc="sample", unit="img")
    for indices, images in draw_batches(model, tokenizer, conditioning, todo, seed=settings["seed"],
                                        options=settings["options"]):
        save_pngs(images, [image_file(out_dir, i) for i in indices])
        bar.update(len(indices))
    bar.close()


def draw_batches(model: nn.Module, tokenizer: Optional[nn.Module], conditioning: Conditioning,
                 batches: Sequence[range], *, seed: int, options: Mapping[str, Any]) -> Iterator[Tuple[range, Tensor]]:
    """``(indices, images [n, 3, H, W] in [0, 1])`` for each batch of image indices, the model in eval mode,
    each batch drawn from :func:`batch_seed` ``(seed, first index)``: the one way sampling at scale draws."""
    with eval_mode(model):
        for indices in batches:
            yield indices, generate_images(model, tokenizer, conditioning.batch(indices),
                                           generator=batch_seed(seed, indices[0]), **options)


def save_pngs(images: Tensor, files: Sequence[Path]) -> None:
    """``images`` ``[n, 3, H, W]`` in [0, 1] as one PNG each; a file appears only once written in full."""
    from ..data.images import pil_image_module

    pixels = unit_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    image_module = pil_image_module()
    for array, file in zip(pixels, files):
        write_atomically(file, lambda tmp: image_module.fromarray(array).save(tmp, format="PNG"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_npz(out_dir: PathLike) -> Optional[Path]:
    """``samples_NxHxWx3.npz`` (ADM's format, the class labels as ``arr_1`` for class-conditional samples) from
    the PNGs of a :func:`sample_images` folder; None (and a note on stderr) while some are missing."""
    from ..files import read_json_file
    from .adm_npz import read_png

    folder = Path(out_dir)
    file = folder / SETTINGS_FILE
    check(file.is_file(), f"`out_dir` {str(folder)!r} has no {SETTINGS_FILE}: not a folder written by "
                          f"sample_images", error=FileNotFoundError)
    settings = read_json_file(file)
    num = settings["num"]
    files = [image_file(folder, index) for index in range(num)]
    missing = [path for path in files if not path.is_file()]
    if missing:
        print(f"{len(missing)} of {num} images are not written yet (the first: {missing[0].name}), e.g. other "
              f"shards still running: no .npz gathered", file=sys.stderr)
        return None
    height, width, _ = read_png(files[0]).shape
    labels = balanced_labels(num, settings["num_classes"]) if settings["conditioning"] == "classes" else None
    import numpy as np

    return save_adm_npz_from_pngs(folder / f"samples_{num}x{height}x{width}x3.npz", files,
                                  labels=None if labels is None else np.asarray(labels, dtype=np.int64))
