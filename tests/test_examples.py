"""Smoke test of the main job: every model of `examples/train_digits.py` trains a couple of steps,
samples, evaluates and writes its outputs in the documented format; `--resume` continues."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_digits  # noqa: E402


@pytest.mark.parametrize("model", sorted(train_digits.RECIPES))
def test_train_digits_smoke(model, tmp_path):
    out = tmp_path / model
    argv = ["--model", model, "--steps", "2", "--num-samples", "20", "--modality-steps", "2", "--out", str(out),
            "--checkpoint-every", "1", "--caption-samples", "10", "--tokenizer-steps", "2", "--no-progress"]
    metrics = train_digits.run(train_digits.parse_args(argv))

    data = np.load(out / "samples.npz")
    assert data["images"].shape == (20, 8, 8) and data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["labels"].dtype == np.int64 and sorted(set(data["labels"].tolist())) == list(range(10))
    assert Image.open(out / "samples.png").size[0] > 8 * 10
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("conditional_accuracy", "frechet_distance", "frechet_floor_real", "nearest_train_distance",
                "nearest_train_distance_real", "train_minutes", "sampling_seconds"):
        assert key in saved and key in metrics
    assert (out / "checkpoint" / "model.safetensors").exists()

    resumed = train_digits.parse_args(argv[:-1] + ["--resume", "--steps", "3", "--no-progress"])
    train_digits.run(resumed)
