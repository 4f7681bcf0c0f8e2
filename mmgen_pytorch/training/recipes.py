"""What differs between the five models in training: how the model and its tokenizer are built, how a
batch of dataset items becomes the model's loss, and how a grid of samples is drawn.

A batch is a dict of the dataset items' fields, stacked: ``image`` (``[b, 3, R, R]`` in [-1, 1]) from an
image dataset, ``moments`` (KL) or ``codes`` (VQ / RQ) from a cache, ``label`` (-1: none) and optionally
``caption_ids`` / ``caption_mask``.

- MAR: KL latents ``sample_latent(moments) * vae_scale`` (cached moments, or the frozen tokenizer's
  posterior of the images) or, without a tokenizer, the images themselves times ``vae_scale`` (1 unless
  given: a pixel MAR, ``vae_stride`` 1 and ``vae_embed_dim`` 3); class labels (unconditional when every
  label is -1).
- LlamaGen / DnDTransformer: VQ codes ``[b, h, w]`` / RQ codes ``[b, h, w, D]`` (cached, or encoded by the
  frozen tokenizer); class labels (c2i) or caption ids through the model's ``caption_encoder`` (t2i).
- Transfusion / MonoFormer: one sample per image, ``[text, latent]``: the text is the caption ids (their
  valid part) or, without captions, the class label as a one-token text (none when -1); the latent is the
  KL tokenizer's (scaled by its ``scale_factor``) or the image itself, channel-last for Transfusion and
  channel-first where the model cuts it into patches (MonoFormer, or a Transfusion built with
  ``model.kwargs.modalities: [{latent_channels, latent_size, patch_size}]``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..data import sample_latent
from .._utils import check
from ..data.cache import TOKENIZER_KINDS as CACHED_FIELDS, encode_images
from ..data.images import images_to_unit, unit_to_uint8
from ..files import CheckpointMismatchError
from ..transfusion.patches import PatchedLatents
from .config import GENERATORS, TOKENIZER_KINDS, TOKENIZERS, Config, ConfigError, model_presets

Batch = Dict[str, Tensor]
TOKENIZER_CLASSES = {kind: cls for cls, (kind, _) in CACHED_FIELDS.items()}  # "kl" -> AutoencoderKL, ...


def byte_tokenizer(text: str) -> List[int]:
    """Caption text -> ids: UTF-8 bytes shifted by one (0 is padding); 257 ids."""
    return [byte + 1 for byte in text.encode("utf-8")]


# building


def load_tokenizer(config: Config) -> Optional[nn.Module]:
    """The frozen tokenizer of ``config.tokenizer`` (None when none is given), in eval mode. ``tokenizer.path``:
    a saved model folder, or a tokenizer's training output folder (its latest checkpoint's model weights)."""
    from ..saving import load_model
    from .runs import saved_model_folder

    spec = config.tokenizer
    if spec.path is not None:
        try:
            folder, _ = saved_model_folder(spec.path, name="`tokenizer.path`")
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
        with _naming("tokenizer.path", spec.path):  # a truncated or mismatched weights file
            tokenizer = load_model(folder)
    elif spec.from_official is not None:
        tokenizer = TOKENIZER_CLASSES[spec.kind].from_official(spec.from_official, config=spec.official_config)
    else:
        return None
    needed = TOKENIZER_CLASSES[TOKENIZER_KINDS[config.model.name]]
    if not isinstance(tokenizer, needed):
        raise ConfigError(f"`tokenizer`: {config.model.name} takes a tokenizer of class {needed.__name__}, got a "
                          f"{type(tokenizer).__name__}")
    return tokenizer.eval().requires_grad_(False)


def build_model(config: Config, tokenizer: Optional[nn.Module]) -> nn.Module:
    """``model.name`` from its preset and kwargs; a constructor's refusal becomes a ConfigError naming it."""
    import mmgen_pytorch

    spec = config.model
    cls = getattr(mmgen_pytorch, spec.name)
    kwargs = dict(spec.kwargs)
    if isinstance(kwargs.get("caption_encoder"), dict):
        kwargs["caption_encoder"] = mmgen_pytorch.CaptionEncoder(**kwargs["caption_encoder"])
    if spec.name == "MAR" and (tokenizer is not None or config.data.cache is None):  # pixels: unscaled
        kwargs.setdefault("vae_scale", tokenizer.scale_factor if tokenizer is not None else 1.0)
    try:
        if spec.name == "Transfusion" and isinstance(kwargs.get("modalities"), list):
            kwargs["modalities"] = [patched_latents(entry) for entry in kwargs["modalities"]]
        if spec.name == "Transfusion" and isinstance(kwargs.get("objective"), dict):  # RectifiedFlow's options
            kwargs["objective"] = mmgen_pytorch.RectifiedFlow(**kwargs["objective"])
        if spec.name in TOKENIZERS:  # a config dataclass (preset) with field overrides; lists -> tuples
            overrides = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
            return cls(spec.preset, **overrides) if spec.preset is not None else cls(**overrides)
        if spec.preset is None:
            return cls(**kwargs)
        if hasattr(cls, "from_preset"):
            return cls.from_preset(spec.preset, **kwargs)
        return cls(**{**model_presets(spec.name)[spec.preset], **kwargs})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"`model` ({spec.name}, preset {spec.preset}, kwargs {sorted(spec.kwargs)}): {error}") from error


def build_dataset(config: Config, tokenizer: Optional[nn.Module]):
    from ..data import CachedDataset, HFImageDataset, ImageFolderDataset
    from ..data.cache import read_manifest

    data = config.data
    if data.cache is not None:
        with _naming("data.cache", data.cache):
            check_cache_kind(config, read_manifest(Path(data.cache)))  # before the tokenizer's fingerprint is compared
            return CachedDataset(data.cache, tokenizer=tokenizer, flip=data.random_flip)
    captions = dict(tokenizer=byte_tokenizer, max_caption_length=data.max_caption_length) if data.captions else {}
    if data.folder is not None:
        with _naming("data.folder", data.folder):
            flip = data.random_flip and not encodes_once(config, tokenizer)  # then the mirrors are encoded
            return ImageFolderDataset(data.folder, resolution=data.resolution, random_flip=flip,
                                      captions=data.captions, in_memory=data.in_memory, channels=data.channels,
                                      progress=config.train.progress, **captions)
    with _naming("data.hf", data.hf):
        return HFImageDataset(_hf_dataset(data.hf, data.hf_split), resolution=data.resolution,
                              random_flip=data.random_flip, channels=data.channels)


def encodes_once(config: Config, tokenizer: Optional[nn.Module]) -> bool:
    """``data.in_memory`` with a frozen tokenizer: the images are encoded once, not at every step."""
    return config.data.in_memory and tokenizer is not None and config.model.name not in TOKENIZERS


def encode_once(config: Config, dataset, tokenizer: Optional[nn.Module], *, batch_size: int, progress: bool):
    """The dataset of :func:`build_dataset` encoded through ``tokenizer`` into memory where
    :func:`encodes_once` (after the checks of the tokenizer against the model and data), else itself;
    ``batch_size`` images (each with its mirror) a tokenizer call: give the per-process micro-batch."""
    from ..data import EncodedDataset

    if not encodes_once(config, tokenizer):
        return dataset
    return EncodedDataset(dataset, tokenizer, flip=config.data.random_flip, batch_size=batch_size, progress=progress)


def patched_latents(entry: Any) -> PatchedLatents:
    """A ``model.kwargs.modalities`` entry of a Transfusion: image latents (or pixels) ``[C, H, W]`` cut into
    ``patch_size`` patches, ``{latent_channels, latent_size (an int or [H, W]), patch_size}``."""
    keys = {"latent_channels", "latent_size", "patch_size"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise TypeError(f"`model.kwargs.modalities` entries must be {{{', '.join(sorted(keys))}}}, got {entry!r}")
    size = entry["latent_size"]
    return PatchedLatents(latent_channels=entry["latent_channels"], patch_size=entry["patch_size"],
                          latent_size=(size, size) if isinstance(size, int) else tuple(size))


def image_modality(model: nn.Module) -> Any:
    """A Transfusion's (or MonoFormer's) image record: its first modality, inside an encoder / decoder wrapper."""
    spec = model.modalities[0]
    return getattr(spec, "inner", spec)


def patched(model: nn.Module) -> bool:
    """Whether a Transfusion / MonoFormer takes its images ``[C, H, W]`` in patches (else ``[H, W, C]``)."""
    return isinstance(image_modality(model), PatchedLatents)


def image_channels(model: nn.Module) -> int:
    """The channels of the images (or latents) a Transfusion / MonoFormer takes and draws."""
    spec = image_modality(model)
    return spec.latent_channels if isinstance(spec, PatchedLatents) else spec.dim_latent


@contextmanager
def _naming(key: str, value: Any):
    """Refusals of what ``key`` names (a missing folder, no images, a bad captions file, a tokenizer's bad
    weights file) as ConfigErrors naming it."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, CheckpointMismatchError) as error:
        raise ConfigError(f"`{key}` {value!r}: {error}") from error


def check_cache_kind(config: Config, manifest: dict) -> None:
    """A ConfigError unless the cache holds what ``model.name`` trains on (KL moments, VQ or RQ codes)."""
    held, needed = manifest["kind"], TOKENIZER_KINDS[config.model.name]
    if held != needed:
        cls = TOKENIZER_CLASSES[needed]
        raise ConfigError(f"`data.cache` {config.data.cache!r} holds {held.upper()} {manifest['field']}, but "
                          f"{config.model.name} trains on {needed.upper()} {CACHED_FIELDS[cls][1]}: cache the "
                          f"images through a {cls.__name__}")


# what the data conditions on, against what the model takes: checked before any step

TEXT_MODELS = ("Transfusion", "MonoFormer")  # conditioned on a text: the caption, else the class as one token
BYTE_IDS = 257  # byte_tokenizer's ids: 0 (padding) .. 256


def has_captions(dataset) -> bool:
    return getattr(dataset, "captions", None) is not None or "caption_ids" in getattr(dataset, "manifest", {}).get(
        "fields", ())


def dataset_labels(dataset) -> Optional[Tensor]:
    """Every item's label where the dataset holds them apart from the images (an image folder, a cache);
    None where they would have to be read item by item."""
    if hasattr(dataset, "labels"):
        return dataset.labels()
    if hasattr(dataset, "samples"):
        return torch.tensor([label for _, label in dataset.samples], dtype=torch.long)
    return None


def check_conditions(config: Config, model: nn.Module, dataset) -> None:
    """Class labels, captions or one-token class texts, as the model takes them, against the data: a
    :class:`ConfigError` naming the key to change instead of a failure inside the first step. A tokenizer
    being trained takes images only."""
    if config.model.name in TOKENIZERS:
        return
    if config.model.name in TEXT_MODELS and has_captions(dataset):
        _check_byte_captions(config, model.vocab.num_text_tokens, "model.kwargs.num_text_tokens")
    elif getattr(model, "model_type", None) == "t2i":
        if not has_captions(dataset):
            raise ConfigError(f"{config.model.name} t2i trains on captions, the data has none: give `data.folder` "
                              f"with `data.captions` (or a `data.cache` written with captions)")
        if model.caption_encoder is not None:
            _check_byte_captions(config, model.caption_encoder.num_tokens, "model.kwargs.caption_encoder.num_tokens")
    else:
        labels = dataset_labels(dataset)
        if labels is not None:
            _check_labels(config.model.name, model, labels)


def _check_byte_captions(config: Config, vocabulary: int, key: str) -> None:
    if config.data.captions is not None:  # byte ids (a cache holds the ids of whatever tokenizer wrote it)
        _check_bound(torch.tensor([BYTE_IDS - 1]), vocabulary, key, "caption ids (UTF-8 bytes + 1)")


def _check_labels(name: str, model: nn.Module, labels: Tensor) -> None:
    if name in TEXT_MODELS:
        _check_bound(labels, model.vocab.num_text_tokens, "model.kwargs.num_text_tokens",
                     "class labels (each the one-token text before its image)")
    elif name == "MAR":  # all -1: trained unconditionally
        _check_bound(labels, model.num_classes, "model.kwargs.num_classes", "class labels")
    else:
        if bool((labels < 0).all()):
            raise ConfigError(f"{name} (c2i) trains on class labels, but the data has none (a flat folder): give "
                              f"a folder of class sub-folders")
        _check_bound(labels, model.prefix_embed.num_classes, "model.kwargs.num_classes", "class labels")


# what one image becomes (the tokenizer's latents or codes, or the image itself), against what the model takes


@dataclass(frozen=True)
class LatentGrid:
    """What one image is for a generator: ``grid`` positions ``(h, w)``, ``channels`` (KL latents, pixels; None
    for codes), and where it comes from (for messages)."""
    grid: Tuple[int, int]
    channels: Optional[int]
    origin: str


@dataclass(frozen=True)
class ModelGrid:
    """Which ``model.kwargs`` set the grid and channels a generator takes, how they give the grid, and the
    values of those keys that would take a given grid (``fit(arguments, grid, tokenizer stride or None)``)."""
    grid_keys: Tuple[str, ...]
    grid: Callable[[dict], Any]            # constructor arguments -> an int, an (h, w) pair or None (any)
    fit: Callable[[dict, Tuple[int, int], Optional[int]], dict]
    channels_key: Optional[str] = None


def _pair(value, key: str = "the grid") -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ConfigError(f"{key} must be an int or a list of two ints ([32, 32]; on the command line "
                          f"'[32,32]'), got {value!r}")
    return tuple(value)


def _fit_mar(arguments: dict, grid: Tuple[int, int], stride: Optional[int]) -> dict:
    vae_stride = stride or arguments["vae_stride"]
    return dict(img_size=grid[0] * vae_stride, vae_stride=vae_stride)


def _fit_side(key: str) -> Callable[[dict, Tuple[int, int], Optional[int]], dict]:
    return lambda arguments, grid, stride: {key: grid[0] if grid[0] == grid[1] else list(grid)}


MODEL_GRIDS: Dict[str, ModelGrid] = {
    "MAR": ModelGrid(("img_size", "vae_stride"), lambda a: a["img_size"] // a["vae_stride"], _fit_mar,
                     "vae_embed_dim"),
    "LlamaGen": ModelGrid(("grid_size",), lambda a: a["grid_size"], _fit_side("grid_size")),
    "DnDTransformer": ModelGrid(("grid_size",), lambda a: a["grid_size"], _fit_side("grid_size")),
    "MonoFormer": ModelGrid(("latent_size",), lambda a: a["latent_size"], _fit_side("latent_size"), "latent_channels"),
    "Transfusion": ModelGrid(("modality_default_shape",), lambda a: a["modality_default_shape"],
                             lambda a, grid, stride: dict(modality_default_shape=list(grid)), "dim_latent"),
}


def _kwargs(values: dict) -> str:
    return ", ".join(f"`model.kwargs.{key}` {value}" for key, value in values.items())


def data_latents(config: Config, tokenizer: Optional[nn.Module], dataset) -> LatentGrid:
    """What one image of the data is for the model: a cache's stored latents / codes (their shape), the
    tokenizer's latents of a ``data.resolution`` image, or the image itself."""
    resolution = config.data.resolution
    if config.data.cache is not None:
        from safetensors import safe_open

        field = dataset.manifest["field"]
        with safe_open(str(dataset.paths[0]), "pt") as handle:  # [items, views, *one item's]
            shape = tuple(handle.get_slice(field).get_shape()[2:])
        channels = shape[0] // 2 if field == "moments" else None
        grid = shape[1:3] if field == "moments" else shape[:2]
        return LatentGrid(grid, channels, f"`data.cache` {config.data.cache!r} ({field} of "
                                          f"{'x'.join(map(str, grid))}{f' x {channels} channels' if channels else ''})")
    if tokenizer is None:
        channels = config.data.channels
        return LatentGrid((resolution, resolution), channels, f"the images themselves (`data.resolution` "
                                                              f"{resolution}, `data.channels` {channels}, no tokenizer)")
    stride = tokenizer.downsample_factor
    channels = tokenizer.config.embed_dim if isinstance(tokenizer, TOKENIZER_CLASSES["kl"]) else None  # codes: none
    if resolution % stride:
        raise ConfigError(f"`data.resolution` {resolution} is not a multiple of the tokenizer's stride {stride} "
                          f"({type(tokenizer).__name__} from `tokenizer`): use {resolution // stride * stride or stride}"
                          f" or {(resolution // stride + 1) * stride}")
    size = resolution // stride
    what = f"{size}x{size}" + (f" x {channels} channels" if channels else " codes")
    return LatentGrid((size, size), channels, f"`data.resolution` {resolution} through the tokenizer's stride "
                                              f"{stride} ({type(tokenizer).__name__}: {what})")


def check_latent_fit(config: Config, model: nn.Module, tokenizer: Optional[nn.Module], dataset) -> None:
    """The grid and channels of what the data becomes (:func:`data_latents`) against those the model's
    ``model.kwargs`` set (:data:`MODEL_GRIDS`), and a code model's vocabulary / code depth against the
    tokenizer's codebook: a ConfigError naming the keys and what would fit, before any step."""
    from ..saving import constructor_arguments

    name = config.model.name
    if name not in MODEL_GRIDS:
        return
    spec, arguments = MODEL_GRIDS[name], constructor_arguments(model)
    data = data_latents(config, tokenizer, dataset)
    stride = None if config.data.cache is not None else getattr(tokenizer, "downsample_factor", 1)  # pixels: 1
    grid_keys = {key: arguments[key] for key in spec.grid_keys}
    grid = _pair(spec.grid(arguments), _kwargs(grid_keys))
    channels_key = spec.channels_key
    channels = arguments.get(channels_key) if channels_key else None
    if name == "Transfusion" and patched(model):  # `model.kwargs.modalities`: the image record holds both
        record = image_modality(model)
        grid, channels, channels_key = record.latent_size, record.latent_channels, "modalities[0].latent_channels"
        grid_keys = {"modalities[0].latent_size": list(grid)}
    wrong_grid = grid is not None and grid != data.grid
    wrong_channels = isinstance(channels, int) and data.channels is not None and channels != data.channels
    if wrong_grid or wrong_channels:  # both in one message, each with what would fit
        takes, gives, fits = [], [], {}
        if wrong_grid:
            takes.append(f"a {grid[0]}x{grid[1]} grid ({_kwargs(grid_keys)})")
            gives.append(f"{data.grid[0]}x{data.grid[1]}")
            fits.update(spec.fit(arguments, data.grid, stride) if "modalities[0].latent_size" not in grid_keys
                        else {"modalities[0].latent_size": list(data.grid)})
        if wrong_channels:
            takes.append(f"{channels} latent channels (`model.kwargs.{channels_key}`)")
            gives.append(f"{data.channels} channel{'s' if data.channels != 1 else ''}")
            fits[channels_key] = data.channels
        pixel_mar = name == "MAR" and tokenizer is None and config.data.cache is None  # its stride must be 1
        also = (f"; or `data.resolution` {grid[0] * stride}" if wrong_grid and not wrong_channels and stride
                and grid[0] == grid[1] and not pixel_mar else "")
        raise ConfigError(f"{name} takes {' and '.join(takes)}, but the data gives {' and '.join(gives)}: "
                          f"{data.origin}; what would fit: {_kwargs(fits)}{also}")
    if name == "MAR" and tokenizer is None and config.data.cache is None and not draws_pixels(model):
        raise ConfigError(f"MAR without a tokenizer trains on the pixels themselves: give `model.kwargs.vae_stride` 1 "
                          f"(got {model.vae_stride}) and `model.kwargs.img_size` {config.data.resolution}, or a KL "
                          f"`tokenizer.path`")
    heads = getattr(model, "code_heads", None)
    if heads is not None and tokenizer is not None:
        try:
            heads.check_tokenizer(tokenizer)
        except ValueError as error:
            raise ConfigError(f"`model.kwargs` against `tokenizer`: {error}") from None


def check_image_channels(config: Config, model: nn.Module, tokenizer: Optional[nn.Module]) -> None:
    """The images' ``data.channels`` against those the tokenizer takes: the one being trained, or the frozen
    one that encodes them (a cache was encoded already)."""
    training = config.model.name in TOKENIZERS
    encoder = model if training else tokenizer
    if config.data.cache is not None or encoder is None:
        return
    takes, given = encoder.config.in_channels, config.data.channels
    if takes != given:
        source = "`model.kwargs.in_channels`" if training else "`tokenizer`"
        fixes = ([f"`data.channels` {takes}"] if takes in (1, 3) else []) + (
            [f"`model.kwargs.in_channels` {given}"] if training else [])
        raise ConfigError(f"`data.channels` is {given} (images have 1 or 3), but the {type(encoder).__name__} ({source}) "
                          f"takes {takes}-channel images: set {' or '.join(fixes) or 'another tokenizer'}")


def check_idle_blocks(config: Config, model: nn.Module, processes: int) -> None:
    """DnD's blocks after its last head get no gradient, which DDP (several processes) refuses in the second
    step unless told: a ConfigError naming ``train.find_unused_parameters`` before the model is wrapped."""
    positions = getattr(model, "head_positions", None)
    if processes > 1 and not config.train.find_unused_parameters and positions is not None:
        depth = model.backbone.depth
        if positions[-1] < depth - 1:
            raise ConfigError(f"{config.model.name}: blocks {positions[-1] + 1}..{depth - 1} come after the last head "
                              f"(`model.kwargs.head_positions` {list(positions)}, depth {depth}) and get no gradient; "
                              f"under DDP set `train.find_unused_parameters: true` (or end the heads at the last block)")


def _check_bound(values: Tensor, bound: int, key: str, what: str) -> None:
    if values.numel() and int(values.max()) >= bound:
        raise ConfigError(f"`{key}` is {bound}, but the data's {what} go up to {int(values.max())}: it must be at "
                          f"least {int(values.max()) + 1}")


def _hf_dataset(name: str, split: str):
    try:
        import datasets
    except ImportError as error:
        raise ImportError("`data.hf` needs Hugging Face datasets: pip install datasets") from error

    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name, split=split)


# batches -> losses


def _labels(batch: Batch) -> Optional[Tensor]:
    labels = batch["label"]
    return None if bool((labels < 0).all()) else labels


@torch.no_grad()
def kl_latents(batch: Batch, tokenizer: Optional[nn.Module], scale: float) -> Tensor:
    """Scaled KL latents ``[b, c, h, w]``: drawn from cached moments or from the images' posterior."""
    moments = batch["moments"] if "moments" in batch else encode_images(tokenizer, batch["image"])
    return sample_latent(moments, scale=scale)


def codes(batch: Batch, tokenizer: Optional[nn.Module]) -> Tensor:
    """Cached codes, or the frozen tokenizer's codes of the images."""
    return batch["codes"] if "codes" in batch else encode_images(tokenizer, batch["image"])


def mar_loss(model, inner, batch: Batch, tokenizer) -> Tensor:
    if "moments" not in batch and tokenizer is None:  # a pixel MAR
        return model(batch["image"] * inner.vae_scale, _labels(batch))
    return model(kl_latents(batch, tokenizer, inner.vae_scale), _labels(batch))


def code_loss(model, inner, batch: Batch, tokenizer) -> Tensor:
    if inner.model_type == "t2i":
        return model(codes(batch, tokenizer), caption_ids=batch["caption_ids"])
    return model(codes(batch, tokenizer), class_labels=_labels(batch))


def _texts(batch: Batch) -> List[Optional[Tensor]]:
    if "caption_ids" in batch:
        return [ids[mask] for ids, mask in zip(batch["caption_ids"], batch["caption_mask"].bool())]
    return [None if label < 0 else label.view(1) for label in batch["label"]]


def image_latents(batch: Batch, tokenizer: Optional[nn.Module]) -> Tensor:
    """``[b, c, h, w]``: the KL tokenizer's scaled latents, or the images themselves."""
    if "moments" in batch or tokenizer is not None:
        return kl_latents(batch, tokenizer, getattr(tokenizer, "scale_factor", 1.0))
    return batch["image"]


def multimodal_samples(batch: Batch, tokenizer, channel_last: bool, image_first: float = 0.0) -> List[list]:
    """One sample per item: ``[text, latent]`` or, for a share ``image_first`` of them (drawn from torch's
    global RNG, only when it is above 0), ``[latent, text]``; ``[latent]`` where there is no text."""
    latents = image_latents(batch, tokenizer)
    latents = latents.permute(0, 2, 3, 1) if channel_last else latents
    texts = _texts(batch)
    texted = any(text is not None for text in texts)
    flipped = (torch.rand(len(texts)) < image_first).tolist() if image_first > 0 and texted else [False] * len(texts)
    return [[latent] if text is None else [latent, text] if after else [text, latent]
            for text, latent, after in zip(texts, latents, flipped)]


def transfusion_loss(model, inner, batch: Batch, tokenizer, *, image_first: float = 0.0) -> Tensor:
    """Transfusion's and MonoFormer's (patched latents, channel-first) loss on the batch's samples."""
    return model(multimodal_samples(batch, tokenizer, channel_last=not patched(inner), image_first=image_first))


LOSSES: Dict[str, Callable[..., Tensor]] = dict(MAR=mar_loss, LlamaGen=code_loss, DnDTransformer=code_loss,
                                               Transfusion=transfusion_loss, MonoFormer=transfusion_loss)


def loss_options(config: Config) -> Dict[str, Any]:
    """The keyword arguments ``LOSSES[config.model.name]`` takes from the config."""
    return dict(image_first=config.data.image_first) if config.model.name == "Transfusion" else {}


# sample grids and sampling at scale (mmgen_pytorch.evaluation.sampling): one way to draw images


def grid_labels(config: Config, num_classes: Optional[int]) -> Optional[List[int]]:
    spec = config.sample
    if spec.labels is not None:
        return [spec.labels[i % len(spec.labels)] for i in range(spec.num)]
    return None if not num_classes else [i % num_classes for i in range(spec.num)]


@torch.no_grad()
def draw_samples(config: Config, model: nn.Module, tokenizer: Optional[nn.Module],
                 num_classes: Optional[int]) -> Optional[Tensor]:
    """``[n, 3, H, W]`` in [0, 1] from ``model`` (the EMA), or None when this setup cannot draw a grid
    (a tokenizer being trained draws none: it reconstructs, it does not generate)."""
    spec = config.sample
    if config.model.name in TOKENIZERS:
        return None
    device = next(model.parameters()).device
    condition = {"label": torch.tensor(grid_labels(config, num_classes) or [-1] * spec.num, device=device)}
    if sampling_problem(model, tokenizer, condition) is not None:
        return None
    return generate_images(model, tokenizer, condition, generator=spec.seed, **sample_options(config))


def sample_options(config: Config) -> Dict[str, Any]:
    """The sampler options of the ``sample`` section, as :func:`generate_images` takes them (grids, ``eval``)."""
    spec = config.sample
    return dict(cfg=spec.cfg, steps=spec.steps, temperature=spec.temperature,
                **({} if spec.top_p is None else dict(top_p=spec.top_p)))


def model_name(model: nn.Module) -> str:
    """Which of the five generators ``model`` is, subclasses first (DnD before LlamaGen, MonoFormer before
    Transfusion)."""
    import mmgen_pytorch

    for name in ("MAR", "DnDTransformer", "LlamaGen", "MonoFormer", "Transfusion"):
        if isinstance(model, getattr(mmgen_pytorch, name)):
            return name
    raise TypeError(f"`model` must be one of {list(GENERATORS)}, got {type(model).__name__}")


def class_count(model: nn.Module) -> Optional[int]:
    """The classes a class-conditional model takes (MAR, a c2i LlamaGen / DnD); None for the others."""
    name = model_name(model)
    if name == "MAR":
        return model.num_classes
    if name in ("LlamaGen", "DnDTransformer") and model.model_type == "c2i":
        return model.prefix_embed.num_classes
    return None


def sampling_problem(model: nn.Module, tokenizer: Optional[nn.Module], condition: Batch) -> Optional[str]:
    """Why :func:`generate_images` cannot draw ``condition`` with ``model`` (+ ``tokenizer``); None when it can.
    ``condition`` is a batch as in training: ``label`` ``[n]`` (-1: none) or ``caption_ids`` + ``caption_mask``."""
    name, captions = model_name(model), "caption_ids" in condition
    labelled = None if captions else (condition["label"] >= 0)
    if name == "MAR":
        if tokenizer is None and model.vae is None and not draws_pixels(model):
            return "MAR draws KL latents: give the KL tokenizer that decodes them"
        if tokenizer is not None and draws_pixels(model):
            return "this MAR draws pixels (`vae_stride` 1): it takes no tokenizer; leave it out"
        return "MAR is class-conditional: it takes no captions" if captions else _all_or_none(labelled, name)
    if name in ("LlamaGen", "DnDTransformer"):
        if tokenizer is None:
            return f"{name} draws VQ / RQ codes: give the tokenizer that decodes them"
        if model.model_type == "c2i":
            return (f"a c2i {name} takes class labels, not captions" if captions else
                    None if bool(labelled.all()) else
                    f"a c2i {name} is class-conditional: it needs a class label for every image")
        if not captions or model.caption_encoder is None:
            return (f"a t2i {name} needs captions" if not captions else
                    f"this t2i {name} has no `caption_encoder`: it cannot take caption text")
        return None
    channels = image_channels(model)
    if tokenizer is None and channels not in PIXEL_CHANNELS:
        return f"{name} draws {channels}-channel latents: give the KL tokenizer that decodes them"
    if tokenizer is not None and channels != tokenizer.config.embed_dim:
        return (f"{name} draws {channels}-channel latents, but the tokenizer ({type(tokenizer).__name__}) decodes "
                f"{tokenizer.config.embed_dim}-channel ones" + ("; pixels need no tokenizer: leave it out"
                                                               if channels in PIXEL_CHANNELS else ""))
    return None if captions else _all_or_none(labelled, name)


PIXEL_CHANNELS = (1, 3)  # a model drawing this many channels without a tokenizer draws greyscale / RGB pixels


def draws_pixels(mar: nn.Module) -> bool:
    """Whether a MAR's tokens are patches of pixels (``vae_stride`` 1, ``vae_embed_dim`` 3 or 1), not latents."""
    return mar.vae_stride == 1 and mar.vae_embed_dim in PIXEL_CHANNELS


def _all_or_none(labelled: Tensor, name: str) -> Optional[str]:
    mixed = bool(labelled.any()) and not bool(labelled.all())
    return f"{name} draws one batch class-conditional or not: give labels for all images or for none" if mixed else None


@torch.no_grad()
def generate_images(model: nn.Module, tokenizer: Optional[nn.Module], condition: Batch, *, generator: Any,
                    cfg: float = 1.0, steps: Optional[int] = None, temperature: float = 1.0, progress: bool = False,
                    **options) -> Tensor:
    """``[n, 3, H, W]`` in [0, 1] (greyscale images as three equal channels): one image per row of
    ``condition`` (see :func:`sampling_problem`), drawn by
    the model's own sampler with ``generator`` (an int seed or a ``torch.Generator``). ``cfg``, ``temperature``
    and ``steps`` (MAR ``num_iter``, default 64; MonoFormer DDPM steps, default 20; Transfusion ODE steps,
    default 16; LlamaGen / DnD: none) are named alike for every model; ``options`` go to the sampler as
    they are (``cfg_schedule``, ``top_k``, ``top_p``, ``num_sampling_steps``, ...)."""
    problem = sampling_problem(model, tokenizer, condition)
    check(problem is None, problem or "")
    name, device = model_name(model), next(model.parameters()).device
    condition = {key: value.to(device) for key, value in condition.items()}
    common = dict(generator=generator, progress=progress, **options)
    if name == "MAR":
        labels = _labels(condition)
        out = model.sample(labels, batch_size=None if labels is not None else len(condition["label"]),
                           num_iter=steps or 64, cfg_scale=cfg, temperature=temperature, **common)
        decoder = tokenizer if tokenizer is not None else model.vae
        latents = out.latents.to(device) / model.vae_scale
        return as_rgb(images_to_unit(latents if decoder is None else decoder.decode(latents)))
    if name in ("LlamaGen", "DnDTransformer"):
        check(steps is None, f"`steps`: {name} draws one position per step, all of them; give no `steps`")
        generated = model.generate(condition.get("caption_ids", condition.get("label")), cfg_scale=cfg,
                                   temperature=temperature, **common)
        return as_rgb(images_to_unit(tokenizer.decode_code(generated)))
    texts = _texts(condition)
    if name == "MonoFormer":
        prompts = [text if text is not None else torch.zeros(0, dtype=torch.long, device=device) for text in texts]
        latents = model.generate_images(prompts, cfg_scale=cfg, steps=steps or 20, temperature=temperature, **common)
        return _decoded(latents, tokenizer)
    check(temperature == 1.0, f"`temperature`: Transfusion's flow sampler has none (1.0), got {temperature}")
    if texts[0] is None:
        latents = model.generate_modality_only(len(texts), modality_steps=steps or 16, **common)
    else:
        samples = model.sample([[text] for text in texts], max_length=1, max_length_counts="generated",
                               cfg_scale=cfg, modality_steps=steps or 16, force_modality_at_start=0,
                               max_modalities=1, **common)
        latents = torch.stack([next(item[1] for item in sample if isinstance(item, tuple)) for sample in samples])
    return _decoded(latents if patched(model) else latents.permute(0, 3, 1, 2), tokenizer)


def _decoded(latents: Tensor, tokenizer: Optional[nn.Module]) -> Tensor:
    if tokenizer is not None:
        return as_rgb(images_to_unit(tokenizer.decode(latents / tokenizer.scale_factor)))
    return as_rgb(images_to_unit(latents))


def as_rgb(images: Tensor) -> Tensor:
    """``[n, 3, H, W]``: greyscale ``[n, 1, H, W]`` images as three equal channels, RGB ones as they are."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def save_grid(images: Tensor, path, *, per_row: Optional[int] = None) -> None:
    """``images`` ``[n, 3, H, W]`` in [0, 1] tiled row-major into one PNG (Pillow)."""
    from ..data.images import pil_image_module

    count, _, height, width = images.shape
    per_row = per_row or max(1, round(count ** 0.5))
    rows = -(-count // per_row)
    canvas = torch.zeros(3, rows * height, per_row * width)
    for index, image in enumerate(images.cpu()):
        row, col = divmod(index, per_row)
        canvas[:, row * height:(row + 1) * height, col * width:(col + 1) * width] = image
    pixels = unit_to_uint8(canvas).permute(1, 2, 0).contiguous().numpy()
    pil_image_module().fromarray(pixels).save(path)
