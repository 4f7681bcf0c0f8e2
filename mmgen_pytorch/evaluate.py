"""Score generated images against a reference: FID, IS, precision and recall (those computable), printed
as a Markdown table and written to ``metrics.json``.

    python -m mmgen_pytorch.evaluate GENERATED --reference REF [--extractor inception] [--out DIR]
    python -m mmgen_pytorch.evaluate RUN_DIR --preset mar-b --out DIR --reference REF   # sample, then score
    torchrun --nproc_per_node 8 -m mmgen_pytorch.evaluate RUN_DIR --preset mar-b --out DIR --reference REF

GENERATED is a folder written by ``python -m mmgen_pytorch.sample``, an ADM ``.npz`` (``arr_0``) or a folder
of images; or a training output folder / saved model folder, which is first sampled into ``--out`` with
``mmgen_pytorch.sample``'s flags (``--preset``, ``--num``, ``--cfg``, ...: the same checks, the same images,
resumable; under torchrun the processes share the sampling and rank 0 scores). REF is a folder of real
images (resized and centre-cropped to the generated size, said in the output and recorded in ``metrics.json``;
``--reference-cache FILE`` keeps its statistics for that size and folder only), an ADM
reference ``.npz`` (images ``arr_0`` and / or precomputed ``mu`` / ``sigma``: FID only without images) or
statistics saved by this library. ``metrics.json`` goes into ``--out`` (default: GENERATED's folder).
Every argument is checked before the extractor or any model is loaded (the extractor's packages first; a saved
model folder's image size once the model is loaded, before any image is drawn).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from . import sample

METRICS_FILE = "metrics.json"
DEFAULT_EXTRACTOR = "inception"
IS_SPLITS = 10
LABELS = {"fid": "FID", "is": "IS", "precision": "Precision", "recall": "Recall"}


# flags


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.features import EXTRACTOR_USES, EXTRACTORS

    parser = argparse.ArgumentParser(prog="python -m mmgen_pytorch.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("generated", help="a sample folder, an ADM .npz, an image folder, or a run / model folder")
    parser.add_argument("--reference", required=True,
                        help="an image folder, an ADM reference .npz (arr_0 and / or mu, sigma) or saved statistics")
    parser.add_argument("--extractor", choices=EXTRACTORS,
                        help="the feature space (default: inception): " + ", ".join(f"{name} ({use})" for name, use
                                                                                  in EXTRACTOR_USES.items()))
    parser.add_argument("--inception-weights", help="a local copy of torch-fidelity's Inception weights file")
    parser.add_argument("--reference-cache", help="an image-folder reference's statistics: read from this .npz "
                                                  "when it exists, else computed and written there")
    parser.add_argument("--eval-batch-size", type=int, default=50, help="images per feature-extraction batch")
    parser.add_argument("--out", help="where metrics.json goes (default: GENERATED's folder); for a run / model "
                                      "folder, the folder the samples are drawn into (required)")
    sampling = parser.add_argument_group("sampling (GENERATED a run / model folder: mmgen_pytorch.sample's flags)")
    sample.add_sampling_flags(sampling)
    return parser


# sampling-only flags: refused when GENERATED is already images (--device also places the extractor)
SCORING_DESTS = ("generated", "reference", "extractor", "inception_weights", "reference_cache", "eval_batch_size",
                 "out", "device", "no_progress")


@dataclass
class Plan:
    """What the checked arguments say to do."""
    reference: Any                          # evaluation.sources.Reference
    metrics_file: Path
    generated: Any = None                   # evaluation.sources.ImageSet; None until sampled
    source: Optional[sample.Source] = None  # a model to sample first
    settings: Optional[Dict[str, Any]] = None


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / "config.json").is_file())


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """Every argument checked, nothing loaded but configs and file headers."""
    from ._utils import check, check_positive_int
    from .evaluation.features import EXTRACTOR_FEATURES, check_extractor_installed, check_extractor_name
    from .evaluation.sources import open_generated, open_reference

    by_default, args.extractor = args.extractor is None, args.extractor or DEFAULT_EXTRACTOR
    check_extractor_installed(args.extractor, option="--extractor", by_default=by_default)  # before reading images
    check_extractor_name(args.extractor, inception_weights=args.inception_weights, option="--extractor",
                         weights_option="--inception-weights")
    if args.inception_weights is not None:
        check(Path(args.inception_weights).is_file(), f"--inception-weights {args.inception_weights!r} does not "
                                                      f"exist", error=FileNotFoundError)
    check_positive_int("--eval-batch-size", args.eval_batch_size)
    if args.out is not None:
        check(not Path(args.out).is_file(), f"--out {args.out!r} is a file, not a folder", error=NotADirectoryError)
    reference = open_reference(args.reference, num_features=EXTRACTOR_FEATURES[args.extractor],
                               cache=args.reference_cache)
    generated_path = Path(args.generated)
    if is_model_folder(generated_path):
        check(args.out is not None, "--out: GENERATED is a run / model folder: give the folder to draw the samples "
                                    "into (rerunning resumes it)")
        args.source = args.generated
        source, settings = sample.check_flags(args)
        if source.config is not None:  # a run folder: its images' size is known before loading (a saved model
            size = (source.config.data.resolution,) * 2  # folder's once loaded: score checks it before drawing)
            check_image_size(args, reference, size, f"SOURCE's images (data.resolution {size[0]})")
        return Plan(reference, Path(args.out) / METRICS_FILE, source=source, settings=settings)
    given = [f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
             if dest not in SCORING_DESTS and value != parser.get_default(dest)]
    check(not given, f"{', '.join(given)}: sampling flags, but GENERATED {args.generated!r} holds images already "
                     f"(they apply to a run / model folder)")
    generated = open_generated(generated_path)
    check_image_size(args, reference, generated.size, f"the images of GENERATED {args.generated!r}")
    folder = Path(args.out) if args.out is not None else (generated.path.parent if generated.path.is_file()
                                                          else generated.path)
    return Plan(reference, folder / METRICS_FILE, generated=generated)


def check_image_size(args: argparse.Namespace, reference: Any, size: Tuple[int, int], images: str) -> None:
    """``images`` of ``size`` ``(H, W)`` must suit the reference and the extractor (errors name ``images``)."""
    from .evaluation.features import check_extractor_name

    reference.check_size(size, name=images)
    check_extractor_name(args.extractor, option="--extractor", image_size=size, images=images)


def size_check_before_drawing(args: argparse.Namespace, plan: Plan) -> Callable[[Optional[Tuple[int, int]]], None]:
    """What ``sample.draw`` calls with the size the loaded model draws, before its first image: a one-line
    ``evaluate: ...`` exit when the reference or the extractor does not take it."""
    def check_drawn(size: Optional[Tuple[int, int]]) -> None:
        if size is None:  # the model fixes no size: checked once drawn
            return
        try:
            check_image_size(args, plan.reference, size, f"SOURCE's images (the model draws {size[1]}x{size[0]})")
        except ValueError as error:
            raise SystemExit(f"evaluate: {error}") from None
    return check_drawn


# scoring


def score(plan: Plan, args: argparse.Namespace) -> Dict[str, Any]:
    """The extractor, the reference statistics, one pass over the generated images: the report."""
    from .evaluation.features import build_extractor
    from .evaluation.metrics import computable_metrics, evaluate

    device = sample.device_for(args.device)
    extractor = build_extractor(args.extractor, inception_weights=args.inception_weights, device=device)
    if plan.source is not None:  # sampled after the extractor loaded: a missing Inception fails first
        sample.draw(args, plan.source, plan.settings, check_size=size_check_before_drawing(args, plan))
        if int(os.environ.get("RANK", "0")) != 0:
            return {}
        from .evaluation.sources import open_generated

        plan.generated = open_generated(args.out, name="--out")
        plan.reference.check_size(plan.generated.size)  # what was drawn (a model that fixes no size: first here)
    generated = plan.generated
    resolution = generated.size[0]
    resized = plan.reference.resize_notes(resolution)
    for warning in (note for note in resized if note.startswith("WARNING")):  # seen before the feature pass too
        print(warning, file=sys.stderr)
    stats = plan.reference.stats(extractor, resolution=resolution, batch_size=args.eval_batch_size,
                                 cache=args.reference_cache)
    names, reasons = computable_metrics(extractor, stats, generated.count, is_splits=IS_SPLITS)
    scores = evaluate(generated.batches(args.eval_batch_size), stats, extractor, metrics=names, is_splits=IS_SPLITS)
    return dict(generated=str(generated.path), generated_kind=generated.kind, num_samples=generated.count,
                reference=str(plan.reference.path), reference_kind=plan.reference.kind, extractor=extractor.identity,
                **_reference_resolution(plan.reference, resolution),
                metrics={key: value for key, value in scores.items() if key != "num_samples"},
                notes=[*plan.reference.notes, *resized, *reasons])


def _reference_resolution(reference: Any, resolution: int) -> Dict[str, Any]:
    """An image folder's ``reference_resolution`` (the side it is resized to) and ``reference_resized_from``
    (its first image's ``[H, W]`` when its short side is resized, else None)."""
    if reference.first_size is None:
        return {}
    resized = min(reference.first_size) != resolution
    return dict(reference_resolution=resolution, reference_resized_from=list(reference.first_size) if resized else None)


def markdown_table(metrics: Dict[str, float]) -> str:
    """``| metric | value |`` rows for the metrics present (IS as mean ± std)."""
    rows = ["| metric | value |", "| --- | --- |"]
    for name, label in LABELS.items():
        if name in metrics:
            value = f"{metrics[name]:.4f}"
            if name == "is" and "is_std" in metrics:
                value += f" ± {metrics['is_std']:.4f}"
            rows.append(f"| {label} | {value} |")
    return "\n".join(rows)


def report_text(report: Dict[str, Any]) -> str:
    lines = [markdown_table(report["metrics"]), "",
             f"{report['num_samples']} generated images ({report['generated_kind']}: {report['generated']}) against "
             f"{report['reference']} ({report['reference_kind']}), features: {report['extractor']}"]
    return "\n".join(lines + [f"- {note}" for note in report["notes"]])


def write_report(report: Dict[str, Any], path: Path) -> None:
    from .saving import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Returns the report written to ``metrics.json`` (None on the other ranks of a sharded sampling)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = check_arguments(args, parser)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as error:
        raise SystemExit(f"evaluate: {sample.as_flags(error)}") from None
    report = score(plan, args)
    if not report:
        return None
    write_report(report, plan.metrics_file)
    print(report_text(report))
    print(f"written to {plan.metrics_file}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
