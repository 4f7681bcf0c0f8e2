"""Train a model of this library on scikit-learn's bundled 8x8 handwritten digits, sample, evaluate.

    python examples/train_digits.py --model transfusion      # default
    python examples/train_digits.py --model transfusion --steps 200 --out /tmp/quick

Each recipe is a config of the training entry point (``mmgen_pytorch/configs/digits-<model>.yaml``; LlamaGen
and DnD first train their tokenizer with ``digits-vqvae`` / ``digits-rqvae``), run here on the digits written
as a greyscale image folder (:mod:`mmgen_pytorch.data.digits`; nothing is downloaded). The split is the one
``evaluate_digits.py`` uses; only the training split is trained on. Outputs in ``--out`` (default
``results/<model>/``): ``samples.png`` (one row per class), ``samples.npz`` (``images`` float32 (N, 8, 8) in
[0, 1], ``labels`` int64 (N,)), ``metrics.json``, ``run/`` (the entry point's run: ``config.yaml``,
``log.jsonl``, ``checkpoints/``, sample grids) that ``--resume`` continues, ``data/`` (the digits as PNGs) and,
for LlamaGen and DnD, ``tokenizer/`` (the tokenizer's run, reused by later runs unless ``--retrain-tokenizer``).

Every flag is checked before any data is written or any training starts; what the entry point checks (a
``--resume`` without a checkpoint, a kept tokenizer of the wrong kind) is refused before its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_digits import evaluate, split, tokenizer_rfid  # noqa: E402

from mmgen_pytorch import train as entry_point  # noqa: E402
from mmgen_pytorch._utils import check, check_finite_number  # noqa: E402
from mmgen_pytorch.data.digits import DIGIT_NAMES, write_digits_folder  # noqa: E402
from mmgen_pytorch.guidance import check_cfg_scale  # noqa: E402
from mmgen_pytorch.sample import load_for_sampling, resolve_source  # noqa: E402
from mmgen_pytorch.sampling import check_sampling_options  # noqa: E402
from mmgen_pytorch.saving import read_config  # noqa: E402
from mmgen_pytorch.training.config import load_config  # noqa: E402
from mmgen_pytorch.training.recipes import byte_tokenizer, generate_images  # noqa: E402
from mmgen_pytorch.training.runs import checkpoint_step, latest_checkpoint  # noqa: E402

HELDOUT_DIGITS = 540  # the evaluation split holds out 30 % of the 1,797 digits
DDPM_STEPS = 1000  # MonoFormer's and MAR's training chains; they sample 3 x --modality-steps respaced steps


# recipes: the entry point's config of each model, and how its samples are drawn


@dataclass(frozen=True)
class Recipe:
    """``config``: the generator's entry-point config (its ``sample`` section: the CFG and top-p the recipe was
    measured with, the defaults of ``--cfg`` / ``--top-p``); ``tokenizer``: its tokenizer's (LlamaGen, DnD);
    ``captions``: trained on the digits' names (else their classes); ``sampling``: the sampler options from the
    flags."""
    config: str
    sampling: Callable[[argparse.Namespace], Dict[str, Any]]
    tokenizer: Optional[str] = None
    captions: bool = False
    ddpm: bool = False  # samples 3 x --modality-steps steps of a DDPM chain


RECIPES = {
    # 2200 steps fit the 10-minute budget on 2 cores; one sample in four image-first trains captioning
    "transfusion": Recipe("digits-transfusion", lambda a: dict(steps=a.modality_steps), captions=True),
    # CFG 1.25: at 1.5 the samples of a class grow alike
    "monoformer": Recipe("digits-monoformer", lambda a: dict(steps=3 * a.modality_steps, clip_denoised=1.0),
                         captions=True, ddpm=True),
    # one token of the 4x4 grid per AR step (--mar-iters 16), 3 x 16 diffusion-head steps
    "mar": Recipe("digits-mar", lambda a: dict(steps=a.mar_iters, temperature=a.temperature,
                                               num_sampling_steps=str(3 * a.modality_steps), clip_denoised=1.0),
                  ddpm=True),
    "llamagen": Recipe("digits-llamagen", lambda a: dict(temperature=a.temperature, top_p=a.top_p),
                       tokenizer="digits-vqvae"),
    "dnd": Recipe("digits-dnd", lambda a: dict(temperature=a.temperature, top_p=a.top_p), tokenizer="digits-rqvae"),
}


def trained_by() -> Dict[str, str]:
    """The ``--model`` whose recipe trains each model class (e.g. "DnDTransformer" -> "dnd")."""
    return {load_config(recipe.config, check_values=False).model.name: name for name, recipe in RECIPES.items()}


def sampling_options(args) -> Dict[str, Any]:
    """The keyword arguments of ``generate_images`` that the flags ``args`` ask for (CFG and the recipe's)."""
    return dict(cfg=args.cfg, **RECIPES[args.model].sampling(args))


def condition(recipe: Recipe, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What the samples are drawn from: the digits' names as captions, or their labels."""
    if not recipe.captions:
        return {"label": labels}
    ids = [byte_tokenizer(DIGIT_NAMES[label]) for label in labels.tolist()]
    width = max(map(len, ids))
    caption_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    return {"caption_ids": caption_ids, "caption_mask": caption_ids > 0}


# training: the entry point, on the digits folder


def data_folder(args) -> Path:
    """``<out>/data`` with the digits written once."""
    root = Path(args.out) / "data"
    if not (root / "train-captions.jsonl").is_file():
        write_digits_folder(root, split="train")
    return root


def run_entry_point(config: str, output_dir: Path, options: List[str], *, resume: bool) -> float:
    """``python -m mmgen_pytorch.train config --train.output_dir output_dir options [--resume]``; its minutes."""
    from accelerate.state import AcceleratorState, GradientState

    started = time.time()
    try:
        entry_point.main([config, "--train.output_dir", str(output_dir), *options, *(["--resume"] if resume else [])])
    finally:  # Accelerate's singletons, for the next run in this process (a notebook's), refused or not
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return (time.time() - started) / 60


def train_tokenizer(recipe: Recipe, args, data: Path) -> float:
    """The recipe's tokenizer in ``<out>/tokenizer``: trained, continued where an earlier run of it stopped, or
    reused when finished; the minutes it took here."""
    folder = Path(args.out) / "tokenizer"
    if args.retrain_tokenizer and folder.exists():
        shutil.rmtree(folder)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        done, total = checkpoint_step(checkpoint), load_config(folder / "config.yaml", check_values=False).train.steps
        if done >= total:
            print(f"reusing the tokenizer trained earlier in {folder}; --tokenizer-steps is ignored: pass "
                  f"--retrain-tokenizer to train a new one")
            return 0.0
        print(f"the tokenizer run in {folder} stopped at step {done} of {total}: continuing it")
        return run_entry_point(str(folder / "config.yaml"), folder, ["--train.progress", str(args.progress).lower()],
                               resume=True)
    options = ["--data.folder", str(data / "train"), "--train.seed", str(args.seed), "--train.checkpoint_every",
               str(args.checkpoint_every), "--train.progress", str(args.progress).lower()]
    options += ["--train.steps", str(args.tokenizer_steps)] if args.tokenizer_steps else []
    return run_entry_point(recipe.tokenizer, folder, options, resume=False)


def train_model(recipe: Recipe, args, data: Path) -> float:
    """The generator in ``<out>/run`` (continued with ``--resume``; replaced without it, saying so); minutes."""
    run = Path(args.out) / "run"
    if not args.resume and latest_checkpoint(run) is not None:
        print(f"note: starting fresh; the run in {run} is replaced (--resume continues it)")
        shutil.rmtree(run)
    options = ["--data.folder", str(data / "train"), "--train.seed", str(training_seed(args)),
               "--train.checkpoint_every", str(args.checkpoint_every), "--train.progress", str(args.progress).lower(),
               "--optim.ema_beta", str(args.ema_beta)]
    options += ["--train.steps", str(args.steps)] if args.steps else []
    options += ["--data.captions", str(data / "train-captions.jsonl")] if recipe.captions else []
    options += ["--tokenizer.path", str(Path(args.out) / "tokenizer")] if recipe.tokenizer else []
    return run_entry_point(recipe.config, run, options, resume=args.resume)


def training_seed(args) -> int:
    """``--seed``, or for ``--resume`` the seed the run was started with (``--seed`` then seeds sampling only)."""
    saved = Path(args.out) / "run" / "config.yaml"
    if args.resume and saved.is_file():
        return load_config(saved, check_values=False).train.seed
    return args.seed


def train(recipe: Recipe, args) -> Dict[str, float]:
    """Tokenizer (if any), then the model; the minutes each took (``train_minutes.json``): a kept tokenizer's
    from the run that trained it (a continued one's: the part run here), a resumed model's summed over its runs,
    a fresh one's from this run."""
    timing = Path(args.out) / "train_minutes.json"
    spent = json.loads(timing.read_text()) if timing.is_file() else {"tokenizer": 0.0, "model": 0.0}
    data = data_folder(args)
    if recipe.tokenizer is not None:
        minutes = train_tokenizer(recipe, args, data)  # 0.0: the kept one was reused
        spent["tokenizer"] = minutes or spent["tokenizer"]
    else:
        spent["tokenizer"] = 0.0
    minutes = train_model(recipe, args, data)
    spent["model"] = spent["model"] + minutes if args.resume else minutes
    timing.write_text(json.dumps(spent))
    return spent


# sampling and scoring


def sample_grid(images: np.ndarray, labels: np.ndarray, path: Optional[Path] = None, per_row: Optional[int] = None,
                scale: int = 6) -> Image.Image:
    """One row per class present in ``labels``, ``per_row`` samples each (default: as many as the
    largest class has, at most 10); a class short of samples is padded with black. Saved to ``path``
    when given; returns the image."""
    digits = sorted(set(labels.tolist()))
    per_row = per_row or min(10, max(int((labels == digit).sum()) for digit in digits))
    rows = []
    for digit in digits:
        chosen = images[labels == digit][:per_row]
        chosen = np.concatenate([chosen, np.zeros((per_row - len(chosen), 8, 8))]) if len(chosen) < per_row else chosen
        rows.append(np.concatenate([np.pad(c, 1) for c in chosen], axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if path is not None:
        image.save(path)
    return image


@torch.no_grad()
def caption_accuracy(model, count: int, progress: bool) -> Dict[str, Any]:
    """Transfusion: each held-out image as the prompt, its caption read greedily; the share naming its digit."""
    _, x_test, _, y_test = split()
    images = torch.tensor(x_test[:count], dtype=torch.float32).view(-1, 1, 8, 8) / 16 * 2 - 1
    samples = model.sample([[(0, image)] for image in images], max_length=40, cfg_scale=1.0, text_temperature=0.0,
                           max_modalities=0, progress=progress)

    def read(sample) -> str:
        ids = [int(i) for item in sample[1:] if isinstance(item, torch.Tensor) for i in item.view(-1)]
        return bytes(i - 1 for i in ids if 1 <= i <= 128).decode(errors="replace")  # byte_tokenizer's ids
    captions = [read(sample) for sample in samples]
    correct = [caption == DIGIT_NAMES[label] for caption, label in zip(captions, y_test[:count].tolist())]
    return {"caption_accuracy": float(np.mean(correct)), "caption_examples": captions[:10]}


def draw(model, tokenizer, recipe: Recipe, settings: Dict[str, Any], *, num: int, seed: int,
         progress: bool = False) -> Tuple[np.ndarray, np.ndarray, float]:
    """``num`` samples (classes 0..9 in turn) drawn with the sampler ``settings``: images float32 ``[num, 8, 8]``
    in [0, 1], their labels, the seconds it took."""
    labels = torch.arange(num) % 10
    started = time.time()
    drawn = generate_images(model, tokenizer, condition(recipe, labels), generator=seed, progress=progress, **settings)
    images = drawn[:, 0].numpy().astype(np.float32)  # greyscale: the three channels are equal
    return images, labels.numpy().astype(np.int64), time.time() - started


def model_scores(name: str, model, tokenizer, *, captions: int, progress: bool = False) -> Dict[str, Any]:
    """What is scored once per model rather than per sample set: the tokenizer's rFID (LlamaGen, DnD) and
    Transfusion's caption accuracy on ``captions`` held-out digits."""
    scores: Dict[str, Any] = {}
    if tokenizer is not None:
        scores["tokenizer_rfid"] = tokenizer_rfid(tokenizer.eval())
    if name == "transfusion":
        scores.update(caption_accuracy(model, captions, progress))
    return scores


def run(args) -> Dict:
    recipe = RECIPES[args.model]
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minutes = train(recipe, args)

    model, tokenizer, weights = load_for_sampling(resolve_source(str(out / "run")),
                                                  argparse.Namespace(tokenizer=None, no_ema=args.no_ema), "cpu")
    images, labels, seconds = draw(model, tokenizer, recipe, sampling_options(args), num=args.num_samples,
                                   seed=args.seed, progress=args.progress)
    np.savez(out / "samples.npz", images=images, labels=labels)
    sample_grid(images, labels, out / "samples.png")
    metrics = {"model": args.model, "train_minutes": minutes["tokenizer"] + minutes["model"],
               "tokenizer_minutes": minutes["tokenizer"], "sampling_seconds": seconds,
               "steps": checkpoint_step(latest_checkpoint(out / "run")), "weights": weights,
               "sampling": {"cfg": args.cfg, "top_p": args.top_p, "temperature": args.temperature,
                            "modality_steps": args.modality_steps, "mar_iters": args.mar_iters},
               **evaluate(images, labels),
               **model_scores(args.model, model, tokenizer, captions=args.caption_samples, progress=args.progress)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


# command line: every flag is checked here, before any data is written or any training starts


def checked(convert, validate):
    """An argparse ``type=``: ``convert`` the text, then ``validate`` the value (a ValueError becomes
    argparse's "argument --flag: ..." error)."""
    def parse(text: str):
        value = convert(text)
        try:
            validate(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value
    parse.__name__ = convert.__name__  # argparse's "invalid int value: 'x'"
    return parse


def at_least(minimum: int, maximum: Optional[int] = None):
    if maximum is None:
        return checked(int, lambda value: check(value >= minimum, f"must be an int >= {minimum}, got {value}"))
    return checked(int, lambda value: check(minimum <= value <= maximum,
                                            f"must be an int in [{minimum}, {maximum}], got {value}"))


def default_threads() -> int:
    """``OMP_NUM_THREADS`` where it is set (so that processes sharing the cores can be told to take one each),
    else up to 2: the digits models are too small to gain from more."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return int(threads) if threads.isdigit() and int(threads) > 0 else min(2, os.cpu_count() or 1)


def non_negative(name: str):
    return checked(float, lambda value: check_finite_number(name, value, minimum=0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RECIPES), default="transfusion")
    parser.add_argument("--out", default=None, help="output folder (default results/<model>/)")
    parser.add_argument("--steps", type=at_least(1), default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--tokenizer-steps", type=at_least(1), default=None,
                        help="LlamaGen / DnD: tokenizer training steps (default: the recipe's); a tokenizer kept in "
                             "<out>/tokenizer from an earlier run is reused instead unless --retrain-tokenizer")
    parser.add_argument("--retrain-tokenizer", action="store_true",
                        help="LlamaGen / DnD: train a new tokenizer even if <out>/tokenizer holds one")
    parser.add_argument("--num-samples", type=at_least(2), default=500,
                        help="samples to draw and score (at least 2: the Fréchet distance needs a covariance)")
    parser.add_argument("--cfg", type=checked(float, lambda value: check_cfg_scale(value, "cfg")), default=None,
                        help="classifier-free guidance scale for sampling (default: the recipe's)")
    parser.add_argument("--temperature", type=non_negative("temperature"), default=1.0,
                        help="LlamaGen / DnD: token sampling temperature; MAR: the diffusion head's noise temperature")
    parser.add_argument("--top-p", type=checked(float, lambda value: check_sampling_options(top_p=value)), default=None,
                        help="LlamaGen / DnD: nucleus sampling (default: the recipe's)")
    parser.add_argument("--modality-steps", type=at_least(1), default=16,
                        help="Transfusion: flow steps; MonoFormer / MAR: 3x this many DDPM steps (at most "
                             f"{DDPM_STEPS // 3})")
    parser.add_argument("--ema-beta", default=0.995,
                        type=checked(float, lambda value: check(0 < value < 1, f"must be in (0, 1), got {value}")))
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights")
    parser.add_argument("--checkpoint-every", type=at_least(1), default=500,
                        help="steps between checkpoints of the model's run and the tokenizer's")
    parser.add_argument("--resume", action="store_true", help="continue the run in <out>/run (it must exist)")
    parser.add_argument("--mar-iters", type=at_least(1), default=16,
                        help="MAR: autoregressive steps when sampling (16: one token of the 4x4 grid per step)")
    parser.add_argument("--caption-samples", type=at_least(1, HELDOUT_DIGITS), default=HELDOUT_DIGITS,
                        help="held-out images to caption (Transfusion; default all 540)")
    parser.add_argument("--seed", type=at_least(0, 2**32 - 1), default=0,
                        help="training seed (a resumed run keeps its own) and sampling seed")
    parser.add_argument("--threads", type=at_least(1), default=default_threads(),
                        help="torch CPU threads (default: OMP_NUM_THREADS where set, else up to 2)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def parse_args(argv: List[str] | None = None):
    parser = build_parser()
    args = with_recipe_defaults(parser.parse_args(argv))
    validate(parser, args)
    return args


def with_recipe_defaults(args):
    """``args`` with what ``--model``'s recipe fills in: ``--out``, ``--cfg``, ``--top-p``."""
    measured = load_config(RECIPES[args.model].config, check_values=False).sample
    args.out = args.out or os.path.join("results", args.model)
    args.cfg = measured.cfg if args.cfg is None else args.cfg
    args.top_p = (measured.top_p or 1.0) if args.top_p is None else args.top_p
    return args


def recipe_defaults(model: str):
    """The flags of ``--model model`` at their defaults (nothing checked against a folder)."""
    return with_recipe_defaults(build_parser().parse_args(["--model", model]))


def validate(parser: argparse.ArgumentParser, args) -> None:
    """What the flags ask of each other and of ``--out``; ``parser.error`` (exit 2) names the flag."""
    recipe, out = RECIPES[args.model], Path(args.out)
    if recipe.ddpm and args.modality_steps > DDPM_STEPS // 3:
        parser.error(f"argument --modality-steps: --model {args.model} samples 3 x this many steps of its "
                     f"{DDPM_STEPS}-step DDPM chain: must be <= {DDPM_STEPS // 3}, got {args.modality_steps}")
    if args.resume and args.retrain_tokenizer:
        parser.error("argument --retrain-tokenizer: not with --resume (the checkpoint's GPT was trained on the codes "
                     f"of the tokenizer in {out / 'tokenizer'})")
    if recipe.tokenizer is not None:
        check_kept_tokenizer(parser, args, recipe)
    if args.resume:
        check_resumable(parser, args, recipe)


def saved_model_class(run: Path) -> Optional[str]:
    """The class of the model in ``run``'s latest checkpoint, None without one."""
    checkpoint = latest_checkpoint(run)
    return None if checkpoint is None else read_config(checkpoint)["class"]


def check_kept_tokenizer(parser: argparse.ArgumentParser, args, recipe: Recipe) -> None:
    folder = Path(args.out) / "tokenizer"
    needed = load_config(recipe.tokenizer, check_values=False).model.name
    found = saved_model_class(folder)
    if args.resume and found is None:
        parser.error(f"argument --resume: {folder} holds no tokenizer; the checkpoint's GPT needs the one it was "
                     f"trained with")
    if found is not None and found != needed and not args.retrain_tokenizer:
        parser.error(f"{folder} holds a {found} tokenizer, but --model {args.model} needs a {needed}: pass "
                     f"--retrain-tokenizer to replace it, or another --out")


def check_resumable(parser: argparse.ArgumentParser, args, recipe: Recipe) -> None:
    run = Path(args.out) / "run"
    found, needed = saved_model_class(run), load_config(recipe.config, check_values=False).model.name
    if found is None:
        parser.error(f"argument --resume: {run} holds no checkpoint; leave out --resume to start fresh")
    if found != needed:
        other = trained_by().get(found, "...")
        parser.error(f"argument --resume: {run} holds a {found} checkpoint (--model {other}), but --model "
                     f"{args.model} trains a {needed}: pass --model {other} or another --out")


if __name__ == "__main__":
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    try:
        run(arguments)
    except SystemExit as error:  # the entry point's one-line refusals, named as this script's
        raise SystemExit(f"train_digits: {error}") from None
