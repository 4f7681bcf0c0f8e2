"""The training configuration: a YAML / JSON file checked against a dataclass schema.

Every key is checked (known name, type, range, the sections agreeing with each other) before any data
is read or any model is built; a :class:`ConfigError` names the key (``optim.lr``), what was expected
and what came. ``--section.key value`` overrides on the command line go through the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

TOKENIZERS = ("VQVAE", "AutoencoderKL", "RQVAE")  # trained on images with TokenizerLoss (`tokenizer_loss`)
GENERATORS = ("MAR", "LlamaGen", "DnDTransformer", "Transfusion", "MonoFormer")  # they draw images
MODELS = (*GENERATORS, *TOKENIZERS)
NEEDS_TOKENIZER = {"LlamaGen": "vq", "DnDTransformer": "rq"}  # what their images go through, always
# the one kind each model takes; MAR, Transfusion and MonoFormer also train on the images themselves
TOKENIZER_KINDS = {**NEEDS_TOKENIZER, "MAR": "kl", "Transfusion": "kl", "MonoFormer": "kl"}
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    name: str = ""                            # one of MODELS
    preset: Optional[str] = None              # mar_base / GPT-B / VQ-16 / ... (the class's PRESETS)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # constructor arguments (override the preset)


@dataclass
class DataConfig:
    folder: Optional[str] = None              # an image folder (class sub-folders -> labels)
    hf: Optional[str] = None                  # a Hugging Face `datasets` name or saved folder
    hf_split: str = "train"
    cache: Optional[str] = None               # a folder written by `cache_dataset`
    captions: Optional[str] = None            # a captions file for `folder` (.jsonl / .csv), UTF-8 byte ids
    max_caption_length: int = 120
    resolution: int = 256
    channels: int = 3                         # 3: RGB; 1: greyscale (the luma of each image)
    batch_size: int = 256                     # global, per optimizer step (all processes, all accumulation)
    num_workers: int = 0
    random_flip: bool = True
    in_memory: bool = False                   # data.folder decoded once into memory (small datasets: digits, CIFAR);
                                              # with a frozen tokenizer, encoded once too (the mirrors with random_flip)
    image_first: float = 0.0                  # Transfusion: the share of samples laid out [image, text] (trains
                                              # captioning / classification); the rest are [text, image]


@dataclass
class TokenizerConfig:
    path: Optional[str] = None                # a folder saved by this library (save / save_pretrained), or a
                                              # tokenizer's training output folder (its latest checkpoint)
    from_official: Optional[str] = None       # an upstream checkpoint, with `kind`
    kind: Optional[Literal["kl", "vq", "rq"]] = None
    official_config: Optional[str] = None     # the preset name from_official takes (KL-16, VQ-16, ...)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    decay_1d: bool = False                    # weight decay on biases / norms too (upstream: no)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: Optional[float] = 1.0
    ema_beta: Optional[float] = 0.9999        # None: no EMA
    ema_start: int = 0                        # the EMA copies the model until this step
    ema_warmup: bool = False                  # ema-pytorch's ramp (decay 1 - (1 + t)^(-2/3), up to ema_beta), as
                                              # transfusion-pytorch's create_ema; False: ema_beta from ema_start on


@dataclass
class TokenizerLossConfig:
    """Training a tokenizer (``model.name`` VQVAE / AutoencoderKL / RQVAE): the arguments of
    :class:`~mmgen_pytorch.tokenizers.losses.TokenizerLoss` and its PatchGAN; the discriminator's optimizer
    is ``optim``'s (as upstream), stepped after the tokenizer's in every step."""
    reconstruction: Literal["l1", "l2"] = "l2"
    reduction: Literal["mean", "sum"] = "mean"   # sum: per-image sums over pixels (LDM)
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    vgg16_path: Optional[str] = None          # torchvision's vgg16 ImageNet weights (vgg16-397923af.pth)
    lpips_path: Optional[str] = None          # the lpips package's weights/v0.1/vgg.pth
    random_lpips: bool = False                # untrained LPIPS weights: tests and smoke runs only
    disc_start: int = 0                       # GAN terms on from this step (counted from 0)
    disc_weight: float = 0.5                  # the generator's GAN weight (times the adaptive weight)
    disc_loss_weight: float = 1.0             # the discriminator's loss weight
    disc_loss: Literal["hinge", "non-saturating"] = "hinge"
    gen_loss: Literal["hinge", "non-saturating"] = "hinge"
    adaptive_weight: bool = False             # taming's gradient-norm balance at the decoder's last layer
    disc_layers: int = 3                      # PatchGAN n_layers
    disc_channels: int = 64                   # PatchGAN ndf


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0                     # 0: only at the end
    checkpoint_every: int = 0                 # 0: only at the end
    output_dir: str = "results/train"
    tracker: Literal["auto", "tensorboard", "none"] = "auto"
    progress: bool = True
    find_unused_parameters: bool = False


@dataclass
class SampleConfig:
    num: int = 16
    cfg: float = 1.0
    steps: Optional[int] = None               # MAR num_iter / MonoFormer, Transfusion ODE or DDPM steps
    temperature: float = 1.0
    top_p: Optional[float] = None             # LlamaGen / DnD nucleus filter (null: off)
    labels: Optional[List[int]] = None        # class labels of the grid (default: cycling 0..)
    seed: int = 0


@dataclass
class EvalConfig:
    """Metrics during training (off while ``every`` is 0), every ``every`` optimizer steps on the main process,
    from the EMA model (the model without EMA), with their own seeded generators: a generator draws
    ``num_samples`` class-balanced images (the ``sample`` section's cfg / steps / temperature), scored against
    ``reference`` (FID, IS, precision, recall: those computable); a tokenizer reconstructs the first
    ``num_samples`` images of ``reference`` (held-out images: a folder or an ADM .npz's arr_0), scored by rFID."""
    every: int = 0
    num_samples: int = 2000
    reference: Optional[str] = None           # image folder, ADM reference .npz or statistics (FeatureStats.save)
    extractor: Literal["inception", "pca-digits", "tiny"] = "inception"
    inception_weights: Optional[str] = None   # torch-fidelity's Inception weights file (default: its download)
    batch_size: int = 50                      # images per sampling and feature batch
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tokenizer_loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# reading


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """A YAML (``.yaml`` / ``.yml``) or JSON file, or the name of a shipped config (``mar-b``)."""
    path = resolve_config_path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{str(path)!r} is not valid JSON: {error}") from None
    else:
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of sections {list(section_names())}, "
                          f"got {type(raw).__name__}")
    return raw


def shipped_configs() -> List[str]:
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))


def resolve_config_path(path: Union[str, Path]) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = CONFIGS_DIR / f"{path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config {str(path)!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def section_names() -> List[str]:
    return [f.name for f in dataclasses.fields(Config)]


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``["--train.steps", "10", "--model.kwargs.dim", "64"]``: each value parsed as YAML (numbers,
    lists, null); the key must name a section and a key (checked with the rest by :func:`parse_config`)."""
    import yaml

    check_pairs(overrides)
    raw = json.loads(json.dumps(raw))  # a deep copy of plain data
    for flag, text in zip(overrides[::2], overrides[1::2]):
        keys = flag[2:].split(".")
        if len(keys) < 2:
            raise ConfigError(f"override {flag!r} must name a section and a key, e.g. --train.steps 10")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {flag!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(text)
    return raw


def check_pairs(overrides: Sequence[str]) -> None:
    flags = list(overrides[::2])
    bad = [flag for flag in flags if not flag.startswith("--")]
    if len(overrides) % 2 or bad:
        raise ConfigError(f"overrides must come as `--section.key value` pairs, got {list(overrides)}")


def load_config(path: Union[str, Path], overrides: Sequence[str] = (), *, check_values: bool = True) -> Config:
    """The config of ``path`` with ``overrides``; ``check_values=False``: keys and types checked, the values'
    ranges and agreement left to :func:`check_config` (``--show`` prints a config that is not complete yet)."""
    return parse_config(apply_overrides(read_config_file(path), overrides), check_values=check_values)


# file paths: made absolute when a run starts, so that its config.yaml means the same from any folder

PATH_KEYS = {"data": ("folder", "cache", "captions"), "tokenizer": ("path", "from_official"),
             "tokenizer_loss": ("vgg16_path", "lpips_path"), "eval": ("reference", "inception_weights")}


def absolute_paths(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """``raw`` (a config as plain data) with each :data:`PATH_KEYS` value that names an existing file or folder
    made absolute (relative to the working folder); other values, missing paths included, as they are."""
    resolved = {section: dict(values) if isinstance(values, Mapping) else values for section, values in raw.items()}
    for section, keys in PATH_KEYS.items():
        values = resolved.get(section)
        for key in keys if isinstance(values, dict) else ():
            if isinstance(values.get(key), str) and Path(values[key]).exists():
                values[key] = str(Path(values[key]).resolve())
    return resolved


def with_absolute_paths(config: Config) -> Config:
    """``config`` with its existing file and folder paths absolute (:func:`absolute_paths`)."""
    return parse_config(absolute_paths(json.loads(json.dumps(config.to_dict()))))  # tuples as the files give them


# checking


def parse_config(raw: Mapping[str, Any], *, check_values: bool = True) -> Config:
    """A checked :class:`Config` from plain data; :class:`ConfigError` naming the first bad key."""
    config = _build(Config, raw, "")
    if check_values:
        check_config(config)
    return config


def check_config(config: Config) -> None:
    """Every value in range and the sections agreeing with each other; ConfigError naming the first bad key."""
    _check_values(config)


def _build(cls: type, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"`{where}` must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key `{prefix}{unknown[0]}` in {where}: expected one of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(hint, value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as ``hint`` (ints accepted for floats, lists for tuples); ConfigError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{key}` must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            size = f" of {len(args)} values" if origin is tuple else ""
            raise ConfigError(f"`{key}` must be a list{size}, got {value!r}")
        items = args if origin is tuple else args * len(value)
        coerced = [_coerce(item, v, f"{key}[{i}]") for i, (item, v) in enumerate(zip(items, value))]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` must be a mapping, got {value!r}")
        return dict(value)
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"`{key}` must be {hint.__name__}, got {value!r}")
    return value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_values(config: Config) -> None:
    _check_model(config.model)
    _check_data(config)
    _check_optim(config.optim)
    _check_tokenizer_loss(config)
    _check_train(config.train, config.data)
    _check_eval(config.eval)
    _require(config.sample.num >= 1, f"`sample.num` must be >= 1, got {config.sample.num}")
    _require(config.sample.steps is None or config.sample.steps >= 1,
             f"`sample.steps` must be >= 1 or null, got {config.sample.steps}")
    top_p = config.sample.top_p
    _require(top_p is None or 0 < top_p <= 1, f"`sample.top_p` must be in (0, 1] or null, got {top_p}")
    _require(top_p is None or config.model.name in ("LlamaGen", "DnDTransformer"),
             f"`sample.top_p` filters LlamaGen's and DnD's tokens; {config.model.name} draws none: leave it null")


def _check_model(model: ModelConfig) -> None:
    _require(model.name in MODELS, f"`model.name` must be one of {list(MODELS)}, got {model.name!r}")
    if model.preset is not None:
        presets = model_presets(model.name)
        _require(model.preset in presets, f"`model.preset` must be one of {sorted(presets)} for {model.name}, "
                                          f"got {model.preset!r}")


def model_presets(name: str) -> Dict[str, Any]:
    from .. import mar, dnd, llamagen
    from ..tokenizers.kl import KL_PRESETS
    from ..tokenizers.vq import VQ_PRESETS

    return {"MAR": mar.PRESETS, "LlamaGen": llamagen.PRESETS, "DnDTransformer": dnd.PRESETS, "VQVAE": VQ_PRESETS,
            "AutoencoderKL": KL_PRESETS}.get(name, {})


def _check_data(config: Config) -> None:
    data, tokenizer = config.data, config.tokenizer
    sources = [name for name in ("folder", "hf", "cache") if getattr(data, name) is not None]
    _require(len(sources) == 1, f"give exactly one of `data.folder`, `data.hf`, `data.cache`, got "
                                f"{[f'data.{s}' for s in sources] or 'none'}")
    _require(data.captions is None or data.folder is not None, "`data.captions` goes with `data.folder`")
    _require(not data.in_memory or data.folder is not None, "`data.in_memory` goes with `data.folder` (a cache is "
                                                              "memory-mapped already)")
    for name in ("resolution", "batch_size"):
        _require(getattr(data, name) >= 1, f"`data.{name}` must be >= 1, got {getattr(data, name)}")
    _require(data.num_workers >= 0, f"`data.num_workers` must be >= 0, got {data.num_workers}")
    _require(0 <= data.image_first <= 1, f"`data.image_first` must be in [0, 1], got {data.image_first}")
    _require(data.channels in (1, 3), f"`data.channels` must be 3 (RGB) or 1 (greyscale), got {data.channels}")
    _require(data.channels == 3 or data.cache is None, "`data.channels` is for images (`data.folder` / `data.hf`); "
                                                       "a cache holds what its tokenizer made of them")
    _require(data.image_first == 0 or config.model.name == "Transfusion",
             f"`data.image_first` lays out Transfusion's samples [image, text]; it does not apply to "
             f"{config.model.name or 'this model'}: leave it 0")
    if config.model.name in TOKENIZERS:
        return  # it is the model being trained: its data rules are in _check_tokenizer_loss
    _require(tokenizer.path is None or tokenizer.from_official is None,
             "give one of `tokenizer.path` and `tokenizer.from_official`, not both")
    _require(tokenizer.from_official is None or tokenizer.kind is not None,
             "`tokenizer.from_official` needs `tokenizer.kind` (kl, vq or rq)")
    kind = TOKENIZER_KINDS[config.model.name]
    _require(tokenizer.kind in (None, kind), f"`tokenizer.kind` must be {kind!r} for {config.model.name}, "
                                             f"got {tokenizer.kind!r}")
    needed = NEEDS_TOKENIZER.get(config.model.name)
    has_tokenizer = tokenizer.path is not None or tokenizer.from_official is not None
    _require(needed is None or data.cache is not None or has_tokenizer,
             f"{config.model.name} trains on {needed.upper()} {'latents' if needed == 'kl' else 'codes'}: with "
             f"`data.folder` / `data.hf` give `tokenizer.path` or `tokenizer.from_official` (or train on a "
             f"`data.cache`)" if needed else "")
    # the latents of a cache are scaled by the tokenizer's scale_factor (MAR has its own vae_scale)
    _require(config.model.name == "MAR" or needed is not None or data.cache is None or has_tokenizer,
             f"{config.model.name} on a `data.cache` trains on KL latents scaled by the tokenizer's scale_factor "
             f"(and decodes its sample grids with it): give `tokenizer.path` or `tokenizer.from_official`")


def _check_optim(optim: OptimConfig) -> None:
    _require(optim.lr > 0, f"`optim.lr` must be > 0, got {optim.lr}")
    _require(all(0 <= beta < 1 for beta in optim.betas), f"`optim.betas` must be in [0, 1), got {list(optim.betas)}")
    _require(optim.weight_decay >= 0, f"`optim.weight_decay` must be >= 0, got {optim.weight_decay}")
    _require(optim.warmup_steps >= 0, f"`optim.warmup_steps` must be >= 0, got {optim.warmup_steps}")
    _require(optim.grad_clip is None or optim.grad_clip > 0, f"`optim.grad_clip` must be > 0 or null, "
                                                             f"got {optim.grad_clip}")
    _require(optim.ema_beta is None or 0 < optim.ema_beta < 1,
             f"`optim.ema_beta` must be in (0, 1) or null, got {optim.ema_beta}")
    _require(optim.ema_start >= 0, f"`optim.ema_start` must be >= 0, got {optim.ema_start}")


def _check_train(train: TrainConfig, data: DataConfig) -> None:
    for name in ("steps", "grad_accum", "log_every"):
        _require(getattr(train, name) >= 1, f"`train.{name}` must be >= 1, got {getattr(train, name)}")
    for name in ("sample_every", "checkpoint_every"):
        _require(getattr(train, name) >= 0, f"`train.{name}` must be >= 0, got {getattr(train, name)}")
    _require(data.batch_size % train.grad_accum == 0,
             f"`data.batch_size` ({data.batch_size}, the global batch per optimizer step) must be divisible by "
             f"`train.grad_accum` ({train.grad_accum})")


def _check_eval(spec: EvalConfig) -> None:
    _require(spec.every >= 0, f"`eval.every` must be >= 0 (0: no metrics during training), got {spec.every}")
    _require(spec.num_samples >= 2, f"`eval.num_samples` must be >= 2, got {spec.num_samples}")
    _require(spec.batch_size >= 1, f"`eval.batch_size` must be >= 1, got {spec.batch_size}")
    _require(spec.seed >= 0, f"`eval.seed` must be >= 0, got {spec.seed}")
    _require(spec.every == 0 or spec.reference is not None,
             f"`eval.every` is {spec.every}: give `eval.reference` (an image folder, an ADM reference .npz or "
             f"saved statistics)")
    _require(spec.inception_weights is None or spec.extractor == "inception",
             f"`eval.inception_weights` goes with `eval.extractor: inception`, not {spec.extractor!r}")


def _check_tokenizer_loss(config: Config) -> None:
    spec, name = config.tokenizer_loss, config.model.name
    if name not in TOKENIZERS:
        changed = [key for key, value in dataclasses.asdict(spec).items()
                   if value != getattr(TokenizerLossConfig, key)]
        _require(not changed, f"`tokenizer_loss.{changed[0] if changed else ''}` applies to tokenizer training "
                              f"(model.name one of {list(TOKENIZERS)}), not to {name}")
        return
    _require(config.data.cache is None, f"{name} trains on images: give `data.folder` or `data.hf`, not `data.cache`")
    given = [f"`tokenizer.{key}`" for key in ("path", "from_official", "kind") if getattr(config.tokenizer, key)]
    _require(not given, f"`tokenizer` is the frozen tokenizer of a generator; {name} is the model being trained: "
                        f"leave {', '.join(given)} unset")
    _require(config.data.captions is None, f"{name} trains on images alone: leave `data.captions` unset")
    for key in ("reconstruction_weight", "perceptual_weight", "disc_weight", "disc_loss_weight"):
        _require(getattr(spec, key) >= 0, f"`tokenizer_loss.{key}` must be >= 0, got {getattr(spec, key)}")
    _require(spec.disc_start >= 0, f"`tokenizer_loss.disc_start` must be >= 0, got {spec.disc_start}")
    for key in ("disc_layers", "disc_channels"):
        _require(getattr(spec, key) >= 1, f"`tokenizer_loss.{key}` must be >= 1, got {getattr(spec, key)}")
    paths = [key for key in ("vgg16_path", "lpips_path") if getattr(spec, key) is not None]
    if spec.perceptual_weight > 0:
        _require(spec.random_lpips or len(paths) == 2,
                 f"`tokenizer_loss.perceptual_weight` is {spec.perceptual_weight}: give `tokenizer_loss.vgg16_path` "
                 f"(torchvision's vgg16-397923af.pth) and `tokenizer_loss.lpips_path` (the lpips package's "
                 f"weights/v0.1/vgg.pth), or `tokenizer_loss.random_lpips: true` for a smoke run")
    _require(not (spec.random_lpips and paths), f"give `tokenizer_loss.random_lpips` or "
                                                f"{', '.join(f'`tokenizer_loss.{p}`' for p in paths)}, not both")


def check_world_size(config: Config, world_size: int) -> int:
    """The per-process micro-batch: ``batch_size / (grad_accum * world_size)``, which must be whole."""
    data, train = config.data, config.train
    _require(data.batch_size % (train.grad_accum * world_size) == 0,
             f"`data.batch_size` ({data.batch_size}) must be divisible by `train.grad_accum` x processes "
             f"({train.grad_accum} x {world_size})")
    return data.batch_size // (train.grad_accum * world_size)
