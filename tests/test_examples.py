"""Smoke test of the main job: every model of `examples/train_digits.py` trains a couple of steps,
samples, evaluates and writes its outputs in the documented format; `--resume` continues. Bad flags,
a `--resume` with nothing (or the wrong model) to resume and a kept tokenizer of the wrong kind are
refused while parsing, before any data is loaded or any training starts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
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
    assert Image.open(out / "samples.png").size == (2 * 10 * 6, 10 * 10 * 6)  # 10 classes x 2 samples, 6x scale
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("conditional_accuracy", "frechet_distance", "frechet_floor_real", "nearest_train_distance",
                "nearest_train_distance_real", "train_minutes", "sampling_seconds"):
        assert key in saved and key in metrics
    if model in ("llamagen", "dnd"):  # the tokenizer's rFID on the held-out digits (PCA features)
        assert saved["tokenizer_rfid"] > 0
    assert (out / "checkpoint" / "model.safetensors").exists()

    resumed = train_digits.parse_args(argv[:-1] + ["--resume", "--steps", "3", "--no-progress"])
    train_digits.run(resumed)


def refused(argv, capsys) -> str:
    """parse_args(argv) must exit with argparse's status 2 at once; returns its stderr."""
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        train_digits.parse_args(argv)
    assert exit_info.value.code == 2
    assert time.perf_counter() - started < 2.0  # parsing only: no data, no training
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--checkpoint-every", "0"], "--checkpoint-every"),   # was a ZeroDivisionError after training
    (["--steps", "0"], "--steps"),                         # was a missing-file error
    (["--num-samples", "0"], "--num-samples"),             # was StopIteration
    (["--num-samples", "1"], "--num-samples"),
    (["--caption-samples", "0"], "--caption-samples"),     # was a torch.cat error
    (["--caption-samples", "541"], "--caption-samples"),   # was silently cut to the 540 held-out digits
    (["--tokenizer-steps", "0"], "--tokenizer-steps"),
    (["--cfg", "-1"], "--cfg"),
    (["--cfg", "nan"], "--cfg"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--modality-steps", "0"], "--modality-steps"),
    (["--model", "mar", "--modality-steps", "334"], "--modality-steps"),
    (["--model", "monoformer", "--modality-steps", "334"], "--modality-steps"),
    (["--mar-iters", "0"], "--mar-iters"),
    (["--ema-beta", "1"], "--ema-beta"),
    (["--threads", "0"], "--threads"),
    (["--steps", "ten"], "--steps"),
])
def test_bad_flags_are_refused_before_any_work(argv, flag, tmp_path, capsys):
    err = refused(argv + ["--out", str(tmp_path / "out")], capsys)
    assert f"argument {flag}:" in err
    assert not (tmp_path / "out").exists()


def test_bad_flag_exits_at_once_from_the_command_line(tmp_path):
    script = EXAMPLES / "train_digits.py"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "--checkpoint-every", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)})
    assert done.returncode == 2 and "argument --checkpoint-every: must be an int >= 1, got 0" in done.stderr
    assert time.perf_counter() - started < 60  # imports only: training would take minutes
    assert not (tmp_path / "out").exists()


def saved_checkpoint(out: Path, model: str, step: int) -> None:
    """A checkpoint of ``model`` at ``step`` in ``out/checkpoint``, as train() writes it (no training)."""
    args = train_digits.parse_args(["--model", model, "--out", str(out), "--no-progress"])
    recipe = train_digits.RECIPES[model](args)
    optimizer = torch.optim.AdamW(recipe.model.parameters())
    train_digits.save_training_state(out / "checkpoint", model=recipe.model, optimizer=optimizer, step=step,
                                     ema=train_digits.EMA(recipe.model))


def test_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    err = refused(["--resume", "--out", str(tmp_path)], capsys)
    assert "argument --resume:" in err and str(tmp_path / "checkpoint") in err and "training_state.pt" in err


def test_resume_names_the_model_kind_it_found(tmp_path, capsys):
    saved_checkpoint(tmp_path, "transfusion", step=40)
    err = refused(["--model", "mar", "--resume", "--out", str(tmp_path)], capsys)
    assert "holds a Transfusion checkpoint (--model transfusion)" in err and "--model mar trains a MAR" in err


def test_resume_past_steps_is_refused_and_at_steps_samples_only(tmp_path, capsys):
    saved_checkpoint(tmp_path, "transfusion", step=40)
    err = refused(["--resume", "--steps", "20", "--out", str(tmp_path)], capsys)
    assert "argument --steps:" in err and "already at step 40" in err and "--steps 20" in err
    train_digits.parse_args(["--resume", "--steps", "40", "--out", str(tmp_path)])
    assert "already at --steps 40: nothing to train" in capsys.readouterr().out
    assert train_digits.parse_args(["--resume", "--steps", "41", "--out", str(tmp_path)]).steps == 41


def test_kept_tokenizer_is_reused_saying_so_and_its_kind_checked(tmp_path, capsys):
    llamagen = ["--model", "llamagen", "--out", str(tmp_path), "--no-progress"]
    train_digits.LlamaGenRecipe(train_digits.parse_args(llamagen + ["--tokenizer-steps", "1"]))
    folder = tmp_path / "tokenizer"
    assert json.loads((folder / "config.json").read_text())["class"] == "VQVAE"
    capsys.readouterr()

    args = train_digits.parse_args(llamagen + ["--tokenizer-steps", "5"])
    train_digits.LlamaGenRecipe(args)
    said = capsys.readouterr().out
    assert f"reusing the VQVAE tokenizer trained earlier in {folder} (1 steps" in said
    assert "--tokenizer-steps is ignored" in said and "--retrain-tokenizer" in said

    err = refused(["--model", "dnd", "--out", str(tmp_path)], capsys)
    assert f"{folder} holds a VQVAE tokenizer, but --model dnd needs a RQVAE" in err
    err = refused(["--model", "dnd", "--resume", "--retrain-tokenizer", "--out", str(tmp_path)], capsys)
    assert "argument --retrain-tokenizer: not with --resume" in err

    train_digits.DnDRecipe(train_digits.parse_args(["--model", "dnd", "--out", str(tmp_path), "--no-progress",
                                                     "--retrain-tokenizer", "--tokenizer-steps", "2"]))
    assert json.loads((folder / "config.json").read_text())["class"] == "RQVAE"
    assert json.loads((folder / "train_minutes.json").read_text())["steps"] == 2


def test_resume_needs_the_kept_tokenizer(tmp_path, capsys):
    err = refused(["--model", "dnd", "--resume", "--out", str(tmp_path)], capsys)
    assert "argument --resume:" in err and str(tmp_path / "tokenizer") in err


def test_sample_grid_is_sized_to_the_samples(tmp_path):
    images = np.ones((5, 8, 8), dtype=np.float32)
    train_digits.sample_grid(images, np.arange(5), tmp_path / "grid.png", scale=1)
    assert Image.open(tmp_path / "grid.png").size == (10, 5 * 10)  # 5 classes x 1 sample, 8 px + 1 px border each side


def test_kept_tokenizer_without_config_is_checked_by_its_weights(tmp_path):
    train_digits.LlamaGenRecipe(train_digits.parse_args(["--model", "llamagen", "--out", str(tmp_path),
                                                          "--tokenizer-steps", "1", "--no-progress"]))
    (tmp_path / "tokenizer" / "config.json").unlink()  # as an older version of the script left it
    args = train_digits.parse_args(["--model", "dnd", "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="(?s)does not hold the RQVAE --model dnd needs.*--retrain-tokenizer") as error:
        train_digits.DnDRecipe(args)
    assert str(tmp_path / "tokenizer") in str(error.value)


def test_the_caption_flag_limit_is_the_heldout_split():
    assert len(train_digits.heldout_data()[1]) == train_digits.HELDOUT_DIGITS


def test_resume_names_a_broken_training_state(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / train_digits.TRAINING_STATE_FILE).write_text("<!DOCTYPE html><html>502</html>")
    (checkpoint / train_digits.CONFIG_FILE).write_text(json.dumps({"class": "Transfusion", "config": {}, "required": {}}))
    parser = train_digits.build_parser()
    args = parser.parse_args(["--out", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit):
        train_digits.check_resumable(parser, args, train_digits.Transfusion)
    error = capsys.readouterr().err
    assert "argument --resume:" in error and "is not a checkpoint: it is an HTML" in error
