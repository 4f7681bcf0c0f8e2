"""Score a run of a ``digits-*`` config of the training entry point as the digits job scores its recipes.

    python -m mmgen_pytorch.data.digits digits
    python -m mmgen_pytorch.train digits-mar --data.folder digits/train --train.output_dir runs/digits-mar
    python examples/score_digits_run.py runs/digits-mar            # sampling seeds 0, 1, 2

For each sampling seed: 500 samples (50 per class) from the run's EMA weights with the digits recipe's sampling
settings (``train_digits.py``'s defaults for the recipe that trains the run's model), scored by ``evaluate_digits.py``
(conditional accuracy, Fréchet distance in its PCA space); then the mean and range over the seeds, the
tokenizer's rFID (LlamaGen, DnD) and, for Transfusion, the share of the 540 held-out digits it captions with
their names. Written to ``RUN/digits_scores.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_digits import evaluate  # noqa: E402
from train_digits import RECIPES, draw, model_scores, recipe_defaults, sampling_options, trained_by  # noqa: E402

from mmgen_pytorch._utils import check  # noqa: E402
from mmgen_pytorch.sample import load_for_sampling, resolve_source  # noqa: E402


def score(run: str, *, seeds=(0, 1, 2), num: int = 500, captions: int = 540) -> Dict[str, Any]:
    source = resolve_source(run)
    model, tokenizer, weights = load_for_sampling(source, argparse.Namespace(tokenizer=None, no_ema=False), "cpu")
    check(source.model_name in trained_by(), f"{run} holds a {source.model_name}; the digits recipes train "
                                              f"{sorted(trained_by())}")
    name = trained_by()[source.model_name]
    settings = sampling_options(recipe_defaults(name))
    report: Dict[str, Any] = {"run": str(Path(run).resolve()), "model": source.model_name, "weights": weights,
                              "settings": settings, "seeds": {}}
    for seed in seeds:
        images, labels, seconds = draw(model, tokenizer, RECIPES[name], settings, num=num, seed=seed)
        report["seeds"][str(seed)] = {**evaluate(images, labels), "sampling_seconds": seconds}
    accuracy = [m["conditional_accuracy"] for m in report["seeds"].values()]
    frechet = [m["frechet_distance"] for m in report["seeds"].values()]
    report["mean"] = {"conditional_accuracy": float(np.mean(accuracy)), "accuracy_range": [min(accuracy), max(accuracy)],
                      "frechet_distance": float(np.mean(frechet)), "frechet_range": [min(frechet), max(frechet)]}
    report.update(model_scores(name, model, tokenizer, captions=captions))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the entry point's output folder of a digits-* config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--caption-samples", type=int, default=540, help="Transfusion: held-out digits to caption")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = score(args.run, seeds=args.seeds, num=args.num_samples, captions=args.caption_samples)
    (Path(args.run) / "digits_scores.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
