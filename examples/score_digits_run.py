"""Score a run of a ``digits-*`` config of the training entry point as the digits job scores its recipes.

    python -m mmgen_pytorch.data.digits digits
    python -m mmgen_pytorch.train digits-mar --data.folder digits/train --train.output_dir runs/digits-mar
    python examples/score_digits_run.py runs/digits-mar            # sampling seeds 0, 1, 2

For each sampling seed: 500 samples (50 per class) from the run's EMA weights with the digits recipe's sampling
settings (those of ``train_digits.py``'s defaults, chosen by the run's model), scored by ``evaluate_digits.py``
(conditional accuracy, Fréchet distance in its PCA space); then the mean and range over the seeds, the
tokenizer's rFID (LlamaGen, DnD) and, for Transfusion, the share of the 540 held-out digits it captions with
their names. Written to ``RUN/digits_scores.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_digits import evaluate, split, tokenizer_rfid  # noqa: E402

from mmgen_pytorch.data.digits import DIGIT_NAMES  # noqa: E402
from mmgen_pytorch.sample import load_for_sampling, resolve_source  # noqa: E402
from mmgen_pytorch.training.recipes import byte_tokenizer, generate_images  # noqa: E402

# the digits recipes' sampling settings (train_digits.py's defaults: CFG, 16 flow / 48 DDPM / 16 AR steps, top-p)
SETTINGS: Dict[str, Dict[str, Any]] = {
    "Transfusion": dict(cfg=1.5, steps=16),
    "MonoFormer": dict(cfg=1.25, steps=48, clip_denoised=1.0),
    "MAR": dict(cfg=1.5, steps=16, temperature=1.0, num_sampling_steps="48", clip_denoised=1.0),
    "LlamaGen": dict(cfg=1.1, temperature=1.0),
    "DnDTransformer": dict(cfg=1.25, temperature=1.0, top_p=0.95),
}
TEXT_MODELS = ("Transfusion", "MonoFormer")  # prompted with the digit's name (byte ids), the others with its class


def condition(model_name: str, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    if model_name not in TEXT_MODELS:
        return {"label": labels}
    ids = [byte_tokenizer(DIGIT_NAMES[label]) for label in labels.tolist()]
    width = max(map(len, ids))
    caption_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    return {"caption_ids": caption_ids, "caption_mask": caption_ids > 0}


@torch.no_grad()
def caption_accuracy(model, count: int) -> Dict[str, Any]:
    """Each held-out digit as the prompt (1 x 8 x 8 pixels in [-1, 1]), its caption read greedily."""
    _, x_test, _, y_test = split()
    images = torch.tensor(x_test[:count], dtype=torch.float32).view(-1, 1, 8, 8) / 16 * 2 - 1
    samples = model.sample([[(0, image)] for image in images], max_length=40, cfg_scale=1.0, text_temperature=0.0,
                           max_modalities=0, progress=False)

    def read(sample) -> str:
        ids = [int(i) for item in sample[1:] if isinstance(item, torch.Tensor) for i in item.view(-1)]
        return bytes(i - 1 for i in ids if 1 <= i <= 128).decode(errors="replace")  # byte_tokenizer: bytes + 1
    captions = [read(sample) for sample in samples]
    correct = [caption == DIGIT_NAMES[label] for caption, label in zip(captions, y_test[:count].tolist())]
    return {"caption_accuracy": float(np.mean(correct)), "caption_examples": captions[:10]}


def score(run: str, *, seeds=(0, 1, 2), num: int = 500, captions: int = 540) -> Dict[str, Any]:
    source = resolve_source(run)
    model, tokenizer, weights = load_for_sampling(source, argparse.Namespace(tokenizer=None, no_ema=False), "cpu")
    settings = SETTINGS[source.model_name]
    labels = torch.arange(num) % 10
    report: Dict[str, Any] = {"run": str(Path(run).resolve()), "model": source.model_name, "weights": weights,
                              "settings": settings, "seeds": {}}
    for seed in seeds:
        started = time.time()
        images = generate_images(model, tokenizer, condition(source.model_name, labels), generator=seed, **settings)
        metrics = evaluate(images[:, 0].numpy().astype(np.float32), labels.numpy())  # greyscale: channels equal
        report["seeds"][str(seed)] = {**metrics, "sampling_seconds": time.time() - started}
    accuracy = [m["conditional_accuracy"] for m in report["seeds"].values()]
    frechet = [m["frechet_distance"] for m in report["seeds"].values()]
    report["mean"] = {"conditional_accuracy": float(np.mean(accuracy)), "accuracy_range": [min(accuracy), max(accuracy)],
                      "frechet_distance": float(np.mean(frechet)), "frechet_range": [min(frechet), max(frechet)]}
    if tokenizer is not None:
        report["tokenizer_rfid"] = tokenizer_rfid(tokenizer.eval())
    if source.model_name == "Transfusion":
        report.update(caption_accuracy(model, captions))
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
