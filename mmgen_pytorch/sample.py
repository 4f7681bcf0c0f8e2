"""Draw N images for evaluation from a trained model: PNGs plus ADM's ``.npz`` (see
:mod:`mmgen_pytorch.evaluation.sampling` for the folder layout, sharding and resuming).

    python -m mmgen_pytorch.sample SOURCE --num N --out DIR [--cfg S] [--temperature T] [--steps K]
        [--batch-size B] [--seed S] [--prompts FILE] [--num-classes C] [--tokenizer DIR] [--preset NAME]
    torchrun --nproc_per_node 2 -m mmgen_pytorch.sample SOURCE --num-images N ...   # each process its shard
    python -m mmgen_pytorch.sample --list-presets

SOURCE is a training output folder (``config.yaml`` + ``checkpoints/step-*``: the latest complete
checkpoint, its EMA weights when saved, the tokenizer of the config) or a model folder written by
``save`` / ``save_pretrained`` (``config.json`` + ``model.safetensors``; ``ema.safetensors`` beside them
is used too), whose tokenizer ``--tokenizer`` names (a folder saved by this library). ``--preset`` sets
an upstream paper's evaluation settings (:data:`EVAL_PRESETS`); flags given as well win over it. A run's
``sample:`` section gives ``--cfg`` / ``--temperature`` / ``--steps`` / ``--top-p`` where neither does. Class-conditional
models draw class-balanced images over their classes; a Transfusion / MonoFormer run over its data's classes
(fed to it as one-token texts), unconditionally when its data had none; stderr says where each setting came
from. Every flag is checked before the model is loaded (``--num-classes`` against the model's classes right after), and
``sampling.json`` is written only once all checks passed. Rerunning the same command resumes: written images are kept;
a run that failed before its first image may be rerun with other settings.
Under torchrun, spell ``--num`` as ``--num-images``: torchrun's parser reads ``--num`` as an ambiguous
abbreviation of its own ``--numa-binding`` and stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .training.config import GENERATORS, NEEDS_TOKENIZER, Config

# the CLI's sampler flags (argparse dest = the option generate_images takes) and the models that take them
SAMPLER_FLAGS = {
    "cfg": ("guidance scale (1: none)", float, GENERATORS),
    "temperature": ("sampling temperature (MAR, MonoFormer: the diffusion noise; LlamaGen, DnD: the logits)",
                    float, ("MAR", "LlamaGen", "DnDTransformer", "MonoFormer")),
    "steps": ("MAR autoregressive steps; MonoFormer DDPM / Transfusion ODE steps", int,
              ("MAR", "MonoFormer", "Transfusion")),
    "cfg_schedule": ("MAR's guidance schedule: linear or constant", str, ("MAR",)),
    "num_sampling_steps": ("MAR's diffusion-head steps (a respacing such as 100)", str, ("MAR",)),
    "top_k": ("LlamaGen / DnD top-k filter (0: off)", int, ("LlamaGen", "DnDTransformer")),
    "top_p": ("LlamaGen / DnD nucleus filter (1: off)", float, ("LlamaGen", "DnDTransformer")),
}


@dataclass(frozen=True)
class EvalPreset:
    """An upstream paper's published evaluation settings, as data; ``notes`` say where a value comes from
    or that the reference documents do not give it (then the library default is used)."""
    model: str
    num: int
    options: Dict[str, Any]
    notes: Tuple[str, ...] = field(default_factory=tuple)


_MAR_NOTES = ("MAR paper Table 4 / README (reference mar.md section 6): ImageNet 256, 256 AR steps, 100 "
              "diffusion steps, linear CFG, temperature 1.0 with CFG and 0.95 without; FID on 50k images, "
              "50 per class, against ADM's in256 statistics",)
_LLAMAGEN_NOTES = ("LlamaGen sample_c2i_ddp.py (reference llamagen.md sections 3 and 6): cfg 2.0 for GPT-B / GPT-L, "
                   "top-k 0, 50k images; published c2i FIDs B (16x16 tokens) 5.46, L (16x16) 3.80",
                   "upstream draws 50k random labels; here 50 per class (class-balanced)",
                   "the reference says the FID script generates at 384 px and bicubic-downsamples to 256; a 16x16-"
                   "token model draws 256 px images, and whether its published FID went through a resize is not "
                   "stated: no resize here (the images are the model's)",
                   "temperature and top-p of the FID script are not in the reference documents: the library "
                   "defaults (1.0, 1.0; the demo script's values) are used")
_DND_NOTES = ("DnD-Transformer README and sample_c2i_ddp_v3.py (reference dnd.md sections 2.5, 2.8, 5): ImageNet "
              "256 16x16x2, cfg 2.0 (XXL) / 1.7 (XXXL), temperature 1.0, top-k 0, top-p 1.0; 50k images, guided-"
              "diffusion's evaluator (FID 2.58 / 2.21)",
              "how the 50k labels are drawn is not in the reference documents: here 50 per class")


def _mar(cfg: float, temperature: float) -> EvalPreset:
    options = dict(cfg=cfg, temperature=temperature, steps=256, cfg_schedule="linear", num_sampling_steps="100")
    return EvalPreset("MAR", 50_000, options, _MAR_NOTES)


def _gpt(model: str, cfg: float, notes: Tuple[str, ...]) -> EvalPreset:
    return EvalPreset(model, 50_000, dict(cfg=cfg, temperature=1.0, top_k=0, top_p=1.0), notes)


EVAL_PRESETS: Dict[str, EvalPreset] = {
    "mar-b": _mar(2.9, 1.0), "mar-l": _mar(3.0, 1.0), "mar-h": _mar(3.2, 1.0),
    "mar-b-nocfg": _mar(1.0, 0.95), "mar-l-nocfg": _mar(1.0, 0.95), "mar-h-nocfg": _mar(1.0, 0.95),
    "llamagen-gpt-b-c2i": _gpt("LlamaGen", 2.0, _LLAMAGEN_NOTES),
    "llamagen-gpt-l-c2i": _gpt("LlamaGen", 2.0, _LLAMAGEN_NOTES),
    "dnd-xxl": _gpt("DnDTransformer", 2.0, _DND_NOTES), "dnd-xxxl": _gpt("DnDTransformer", 1.7, _DND_NOTES),
}


# the source: read its config files only (cheap), load later


@dataclass
class Source:
    model_dir: Path                 # config.json + model.safetensors (+ ema.safetensors)
    model_name: str                 # one of GENERATORS
    config: Optional[Config]        # a training run's config
    required: Tuple[str, ...]       # constructor arguments config.json cannot hold


def resolve_source(path: str) -> Source:
    from .saving import read_config
    from .training.runs import saved_model_folder
    from .training.config import load_config

    folder, from_run = saved_model_folder(path, name="SOURCE")
    config = load_config(Path(path) / "config.yaml") if from_run else None
    record = read_config(folder)
    name = record["class"]
    if name not in GENERATORS:
        raise ValueError(f"SOURCE {path!r} holds a {name}; sampling draws images from {', '.join(GENERATORS)}")
    return Source(folder, name, config, tuple(record["required"]))


# flags


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say how to draw (all but SOURCE, --out and --list-presets): shared with
    ``python -m mmgen_pytorch.evaluate``."""
    # `--num-images` too: torchrun's own parser refuses `--num` (an abbreviation of its --numa-binding)
    parser.add_argument("--num", "--num-images", dest="num", type=int, help="number of images (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (the images depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", help="captions: a text file, one per line, or JSON Lines")
    parser.add_argument("--num-classes", type=int,
                        help="class-balanced labels over this many classes (default: the model's; a Transfusion / "
                             "MonoFormer run: its data's; 0: unconditional)")
    parser.add_argument("--tokenizer", help="the tokenizer that decodes the samples: a folder saved by this library "
                                            "or a tokenizer's training output folder")
    parser.add_argument("--preset", help="an upstream evaluation setting: " + ", ".join(EVAL_PRESETS))
    for name, (text, kind, models) in SAMPLER_FLAGS.items():
        run = f"; default: the preset's, else the run's sample.{name}" if name in RUN_SAMPLE_KEYS else ""
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{text} [{', '.join(models)}]{run}")
    parser.add_argument("--device", help="default: cuda (this process's local rank) when available, else cpu")
    parser.add_argument("--no-ema", action="store_true", help="the model's weights even when EMA weights exist")
    parser.add_argument("--no-progress", action="store_true")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmgen_pytorch.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a training output folder or a saved model folder")
    parser.add_argument("--out", help="output folder (PNGs, sampling.json, the .npz)")
    add_sampling_flags(parser)
    parser.add_argument("--list-presets", action="store_true")
    args = parser.parse_args(argv)
    if not args.list_presets and (args.source is None or args.out is None):
        parser.error("give SOURCE and --out DIR")
    return args


# the run config's `sample:` keys that mean here what they mean for the training grid (its `num`, `labels` and
# `seed` lay out the grid: no meaning here)
RUN_SAMPLE_KEYS = ("cfg", "temperature", "steps", "top_p")

# sample_images' argument names, as this command's flags, in the refusals of the checks the two share
ARGUMENT_FLAGS = ("num", "batch_size", "seed", "num_classes", "prompts", *SAMPLER_FLAGS)


def as_flags(error: Exception) -> str:
    """``error``'s message with each backquoted argument name of :func:`sample_images` as its flag:
    "`num_classes` 10: ..." -> "--num-classes 10: ..."."""
    return re.sub(r"`(\w+)`", lambda match: "--" + match[1].replace("_", "-") if match[1] in ARGUMENT_FLAGS
                  else match[0], str(error))


def sampler_options(args: argparse.Namespace, source: Source) -> Dict[str, Tuple[Any, str]]:
    """Each sampler option and where it comes from: a flag given, else the preset's, else the run's ``sample:``
    section (cfg, temperature, steps, top_p, for the models whose sampler takes them); each must be one the model's
    sampler takes."""
    preset = EVAL_PRESETS[args.preset] if args.preset else None
    if preset is not None and preset.model != source.model_name:
        raise ValueError(f"--preset {args.preset} is for {preset.model}, but SOURCE holds a {source.model_name}")
    given = {name: getattr(args, name) for name in SAMPLER_FLAGS if getattr(args, name) is not None}
    for name in given:
        if source.model_name not in SAMPLER_FLAGS[name][2]:
            raise ValueError(f"--{name.replace('_', '-')}: {source.model_name}'s sampler has no such option "
                             f"(it is for {', '.join(SAMPLER_FLAGS[name][2])})")
    spec = source.config.sample if source.config is not None else None
    run = {name: getattr(spec, name) for name in RUN_SAMPLE_KEYS if spec is not None
           and source.model_name in SAMPLER_FLAGS[name][2] and getattr(spec, name) is not None}
    return {**{name: (value, f"the run's sample.{name}") for name, value in run.items()},
            **{name: (value, f"--preset {args.preset}") for name, value in (preset.options if preset else {}).items()},
            **{name: (value, f"--{name.replace('_', '-')}") for name, value in given.items()}}


def check_flags(args: argparse.Namespace) -> Tuple[Source, Dict[str, Any]]:
    """Every flag checked, nothing loaded but config files (and, for a Transfusion / MonoFormer run, its data's
    labels): the source, the settings sample_images records. Says on stderr where each setting comes from."""
    from .evaluation.sampling import read_prompts, sampling_settings

    if args.preset is not None and args.preset not in EVAL_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(EVAL_PRESETS)}, got {args.preset!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file, not a folder")
    source = resolve_source(args.source)
    chosen = sampler_options(args, source)
    num = args.num if args.num is not None else (EVAL_PRESETS[args.preset].num if args.preset else None)
    if num is None:
        raise ValueError("--num: give the number of images (or a --preset that sets it)")
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    if prompts is not None and source.model_name in ("MAR", "DnDTransformer"):
        raise ValueError(f"--prompts: {source.model_name} is class-conditional; it takes no captions")
    _check_tokenizer(args, source)
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except RuntimeError as error:
            raise ValueError(f"--device {args.device!r}: {error}") from None
    num_classes, conditioning = run_classes(source) if args.num_classes is None and prompts is None else (
        args.num_classes, "captions (--prompts)" if prompts else f"--num-classes {args.num_classes}")
    options = {name: value for name, (value, _) in chosen.items()}
    kwargs = dict(num=num, batch_size=args.batch_size, seed=args.seed, num_classes=num_classes, prompts=prompts,
                  max_caption_length=_max_caption_length(source))
    sampling_settings(**kwargs, options=options)  # raises naming the argument
    _say_settings(chosen, conditioning)
    return source, dict(kwargs, **options)


def run_classes(source: Source) -> Tuple[Optional[int], str]:
    """``(num_classes, what that draws and why)`` when no ``--num-classes`` is given. A training run draws over
    the classes its data had (as ``train`` counts them for its grid: a Transfusion / MonoFormer trained on class
    labels as one-token texts, a MAR on a folder of fewer classes than its ``num_classes``), unconditionally
    when its data had none or it trained on captions; a saved model folder draws over the model's own classes
    (None), a Transfusion / MonoFormer one unconditionally (it does not say which classes it was trained on)."""
    from .training.recipes import TEXT_MODELS

    if source.config is None:
        if source.model_name not in TEXT_MODELS:
            return None, "the model's classes, balanced, when it has classes"
        return None, ("unconditional (a saved model folder does not say which classes it was trained on: give "
                      "--num-classes C for class-balanced images)")
    from .train import num_classes
    from .training.recipes import build_dataset, has_captions

    data = source.config.data
    where = " ".join(f"data.{key} {value!r}" for key, value in (("folder", data.folder), ("cache", data.cache),
                                                                ("hf", data.hf)) if value is not None)
    try:
        counting = dataclasses.replace(source.config, data=dataclasses.replace(data, in_memory=False))  # no decoding
        dataset = build_dataset(counting, None)
    except (OSError, ValueError, TypeError, ImportError) as error:
        if source.model_name not in TEXT_MODELS:  # the model's own classes still say what it can draw
            return None, f"the model's classes, balanced (the run's {where} cannot be read now to count its own)"
        raise ValueError(f"--num-classes: the run trained {source.model_name} on {where}, which cannot be read "
                         f"now to count its classes ({error}); give --num-classes C (0: unconditional)") from None
    if has_captions(dataset) and source.model_name in TEXT_MODELS:
        return None, (f"unconditional (the run trained on the captions of {where}: give --prompts FILE to draw "
                      f"from captions)")
    count = num_classes(source.config, dataset)
    if count:
        return count, f"{count} classes, balanced (the class labels of the run's {where})"
    return 0, f"unconditional (the run's {where} has no class labels)"


def _say_settings(chosen: Dict[str, Tuple[Any, str]], conditioning: str) -> None:
    """One line on stderr (rank 0): each sampler option set and where it comes from, and the conditioning."""
    if int(os.environ.get("RANK", "0")) == 0:
        options = [f"{name} {value} ({origin})" for name, (value, origin) in chosen.items()]
        print(f"sample: sampler options {', '.join(options) or 'none set'} (the others: the sampler's defaults); "
              f"conditioning: {conditioning}", file=sys.stderr)


def _check_tokenizer(args: argparse.Namespace, source: Source) -> None:
    from .saving import read_config

    if args.tokenizer is not None:
        from .training.config import TOKENIZER_KINDS
        from .training.recipes import TOKENIZER_CLASSES

        from .training.runs import saved_model_folder

        held = read_config(saved_model_folder(args.tokenizer, name="--tokenizer")[0])["class"]  # a run / model folder
        needed = TOKENIZER_CLASSES[TOKENIZER_KINDS[source.model_name]].__name__
        if held != needed:
            raise ValueError(f"--tokenizer {args.tokenizer!r} holds a {held}, but {source.model_name} decodes "
                             f"through a {needed}")
        return
    spec = source.config.tokenizer if source.config is not None else None
    has_one = spec is not None and (spec.path is not None or spec.from_official is not None)
    if spec is not None and spec.path is not None and not Path(spec.path).is_dir():
        raise ValueError(f"--tokenizer: the run's tokenizer.path {spec.path!r} (from its config.yaml) is not a folder "
                         f"from here ({Path.cwd()}); give the tokenizer's folder with --tokenizer DIR")
    # a MAR trained on cached KL moments draws latents; one trained on images without a tokenizer, pixels
    on_cache = source.model_name == "MAR" and spec is not None and source.config.data.cache is not None
    if (source.model_name in NEEDS_TOKENIZER or on_cache) and not has_one:
        kind = NEEDS_TOKENIZER.get(source.model_name, "kl").upper()
        raise ValueError(f"--tokenizer: {source.model_name} draws {kind} latents / codes; give the folder of the "
                         f"{kind} tokenizer that decodes them")


def _max_caption_length(source: Source) -> int:
    from .training.config import DataConfig

    return (source.config.data if source.config is not None else DataConfig()).max_caption_length


# loading


def load_for_sampling(source: Source, args: argparse.Namespace, device: str):
    """``(model, tokenizer, weights)``: the model on ``device`` in eval mode, its EMA weights loaded unless
    ``--no-ema`` (``weights`` says which), and the tokenizer (``--tokenizer`` or the run's)."""
    from .checkpoint import EMA_WEIGHTS_FILE
    from .saving import load_model, load_weights
    from .training.config import ModelConfig, TokenizerConfig
    from .training.recipes import load_tokenizer

    config = source.config or Config(model=ModelConfig(name=source.model_name))
    if args.tokenizer is not None:
        config = dataclasses.replace(config, tokenizer=TokenizerConfig(path=args.tokenizer))
    tokenizer = load_tokenizer(config)
    attached = {name: tokenizer for name in ("vae", "tokenizer") if name in source.required}
    model = load_model(source.model_dir, **attached)
    ema = source.model_dir / EMA_WEIGHTS_FILE
    weights = "ema" if ema.is_file() and not args.no_ema else "model"
    if weights == "ema":
        load_weights(model, ema)
    model = model.to(device).eval().requires_grad_(False)
    return model, None if tokenizer is None else tokenizer.to(device), weights


def _tokenizer_name(source: Source, args: argparse.Namespace) -> Optional[str]:
    if args.tokenizer is not None:
        return str(Path(args.tokenizer).resolve())
    spec = source.config.tokenizer if source.config is not None else None
    return None if spec is None else spec.path or spec.from_official


def device_for(requested: Optional[str]) -> str:
    """The device a sampling process uses: ``requested`` when given, else as below (shared with evaluate)."""
    import torch

    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


def _init_distributed() -> bool:
    """torch.distributed from torchrun's environment; True when this call initialised it. Gloo on any
    device: the shards exchange nothing but the barrier before the .npz (so several processes may share
    one GPU, which NCCL refuses), which waits for the slowest shard: a generous timeout."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="gloo", timeout=timedelta(hours=6))
    return True


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    args = parse_args(argv)
    if args.list_presets:
        for name, preset in EVAL_PRESETS.items():
            print(f"{name}: {preset.model}, {preset.num} images, {preset.options}")
            print("".join(f"    {note}\n" for note in preset.notes), end="")
        return None
    try:
        source, settings = check_flags(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"sample: {as_flags(error)}") from None
    return draw(args, source, settings)


def draw(args: argparse.Namespace, source: Source, settings: Dict[str, Any],
         check_size: Optional[Callable[[Optional[Tuple[int, int]]], None]] = None) -> Optional[Path]:
    """Load the checked source and draw into ``args.out`` (this process's shard under torchrun); the
    ``.npz`` on rank 0, None on the other ranks. ``check_size``: called with the ``(H, W)`` the model will
    draw (None when it fixes none) once loaded, before any image is drawn."""
    from .evaluation.sampling import IMAGES_DIR, checked_sampling, drawn_size, sample_images

    device = device_for(args.device)
    started = _init_distributed()
    try:
        model, tokenizer, weights = load_for_sampling(source, args, device)
        record = dict(source=str(source.model_dir.resolve()), weights=weights, tokenizer=_tokenizer_name(source, args),
                      preset=args.preset)
        try:  # the checks that need the model, as the flags' errors (sample_images repeats them)
            checked_sampling(model, tokenizer, args.out, record=record, **settings)
        except (ValueError, TypeError) as error:
            raise SystemExit(f"sample: {as_flags(error)}") from None
        if check_size is not None:
            check_size(drawn_size(model, tokenizer))
        npz = sample_images(model, tokenizer, args.out, progress=not args.no_progress, record=record, **settings)
        if npz is not None:
            print(f"sample: wrote {settings['num']} images to {Path(args.out) / IMAGES_DIR} and {npz}")
        return npz
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
