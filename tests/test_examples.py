"""Smoke test of the main job: every model of `examples/train_digits.py` trains a couple of steps through the
training entry point, samples, evaluates and writes its outputs in the documented format; `--resume`
continues. Bad flags, a `--resume` with nothing (or the wrong model) to resume and a kept tokenizer of the
wrong kind are refused while parsing, before any data is written or any training starts."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("accelerate")
pytest.importorskip("yaml")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_digits  # noqa: E402
from _helpers import reset_accelerate_state  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state(one_torch_thread):
    yield
    reset_accelerate_state()


def smoke_argv(model: str, out: Path) -> list:
    return ["--model", model, "--steps", "2", "--num-samples", "20", "--modality-steps", "2", "--out", str(out),
            "--checkpoint-every", "1", "--caption-samples", "10", "--tokenizer-steps", "2", "--no-progress"]


@pytest.mark.parametrize("model", sorted(train_digits.RECIPES))
def test_train_digits_smoke(model, tmp_path):
    out = tmp_path / model
    argv = smoke_argv(model, out)
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
    if model == "transfusion":
        assert 0 <= saved["caption_accuracy"] <= 1 and len(saved["caption_examples"]) == 10
    assert (out / "run" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()
    assert (out / "data" / "train-captions.jsonl").is_file()

    reset_accelerate_state()
    train_digits.run(train_digits.parse_args(argv[:-1] + ["--resume", "--steps", "3", "--no-progress"]))
    assert (out / "run" / "checkpoints" / "step-0000003").is_dir()


def refused(argv, capsys) -> str:
    """parse_args(argv) must exit with argparse's status 2; returns its stderr. Parsing writes no data and
    trains nothing: the folders it checks are only read."""
    with pytest.raises(SystemExit) as exit_info:
        train_digits.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--steps", "0"], "--steps"),
    (["--num-samples", "0"], "--num-samples"),
    (["--num-samples", "1"], "--num-samples"),
    (["--caption-samples", "0"], "--caption-samples"),
    (["--caption-samples", "541"], "--caption-samples"),   # beyond the 540 held-out digits
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
    (["--ema-beta", "0"], "--ema-beta"),
    (["--threads", "0"], "--threads"),
    (["--steps", "ten"], "--steps"),
])
def test_bad_flags_are_refused_before_any_work(argv, flag, tmp_path, capsys):
    err = refused(argv + ["--out", str(tmp_path / "out")], capsys)
    assert f"argument {flag}:" in err
    assert not (tmp_path / "out").exists()


UP_TO_TWO = min(2, os.cpu_count() or 1)


@pytest.mark.parametrize("omp, expected", [("3", 3), (None, UP_TO_TWO), ("", UP_TO_TWO), ("two", UP_TO_TWO),
                                           ("0", UP_TO_TWO)])
def test_threads_default_to_omp_num_threads_else_up_to_two(omp, expected, monkeypatch):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert train_digits.parse_args([]).threads == expected
    assert train_digits.parse_args(["--threads", "5"]).threads == 5


def test_bad_flag_exits_at_once_from_the_command_line(tmp_path):
    script = EXAMPLES / "train_digits.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint-every", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)})
    assert done.returncode == 2 and "argument --checkpoint-every: must be an int >= 1, got 0" in done.stderr
    assert not (tmp_path / "out").exists()


def test_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    err = refused(["--resume", "--out", str(tmp_path)], capsys)
    assert "argument --resume:" in err and str(tmp_path / "run") in err and "holds no checkpoint" in err


def test_resume_names_the_model_kind_it_found_and_a_fresh_run_replaces_it(tmp_path, capsys):
    train_digits.run(train_digits.parse_args(smoke_argv("mar", tmp_path)))
    capsys.readouterr()
    err = refused(["--model", "monoformer", "--resume", "--out", str(tmp_path)], capsys)
    assert "holds a MAR checkpoint (--model mar)" in err and "--model monoformer trains a MonoFormer" in err
    reset_accelerate_state()
    train_digits.run(train_digits.parse_args(smoke_argv("mar", tmp_path)))  # fresh, into the same --out
    assert f"starting fresh; the run in {tmp_path / 'run'} is replaced" in capsys.readouterr().out


def test_resume_samples_with_its_own_seed_and_keeps_the_training_seed(tmp_path, capsys):
    """`--resume --seed S` at the run's steps trains nothing and samples with seed S; the run keeps the
    seed it was started with (its config may not change on resume)."""
    first = train_digits.run(train_digits.parse_args(smoke_argv("llamagen", tmp_path)))
    reset_accelerate_state()
    again = train_digits.run(train_digits.parse_args(smoke_argv("llamagen", tmp_path)[:-1] + [
        "--resume", "--seed", "3", "--no-progress"]))
    assert "nothing to train" in capsys.readouterr().out
    assert train_digits.training_seed(train_digits.parse_args(["--model", "llamagen", "--out", str(tmp_path),
                                                               "--resume", "--seed", "3"])) == 0
    assert again["conditional_accuracy"] != first["conditional_accuracy"] or \
        again["frechet_distance"] != first["frechet_distance"]


def test_kept_tokenizer_is_reused_saying_so_and_its_kind_checked(tmp_path, capsys):
    train_digits.run(train_digits.parse_args(smoke_argv("llamagen", tmp_path)))
    folder = tmp_path / "tokenizer"
    capsys.readouterr()
    reset_accelerate_state()
    train_digits.run(train_digits.parse_args(smoke_argv("llamagen", tmp_path)))
    said = capsys.readouterr().out
    assert f"reusing the tokenizer trained earlier in {folder}" in said and "--retrain-tokenizer" in said

    err = refused(["--model", "dnd", "--out", str(tmp_path)], capsys)
    assert f"{folder} holds a VQVAE tokenizer, but --model dnd needs a RQVAE" in err
    err = refused(["--model", "dnd", "--resume", "--retrain-tokenizer", "--out", str(tmp_path)], capsys)
    assert "argument --retrain-tokenizer: not with --resume" in err
    reset_accelerate_state()
    train_digits.run(train_digits.parse_args(smoke_argv("dnd", tmp_path) + ["--retrain-tokenizer"]))
    assert train_digits.saved_model_class(folder) == "RQVAE"


def test_an_unfinished_tokenizer_run_is_continued_not_reused(tmp_path, capsys):
    argv = smoke_argv("llamagen", tmp_path)
    argv[argv.index("--tokenizer-steps") + 1] = "3"
    train_digits.run(train_digits.parse_args(argv))
    folder = tmp_path / "tokenizer"
    shutil.rmtree(folder / "checkpoints" / "step-0000003")  # as if stopped after its checkpoint at step 2
    capsys.readouterr()
    reset_accelerate_state()
    train_digits.run(train_digits.parse_args(argv))
    assert f"the tokenizer run in {folder} stopped at step 2 of 3: continuing it" in capsys.readouterr().out
    assert train_digits.checkpoint_step(train_digits.latest_checkpoint(folder)) == 3


def test_resume_needs_the_kept_tokenizer(tmp_path, capsys):
    err = refused(["--model", "dnd", "--resume", "--out", str(tmp_path)], capsys)
    assert "argument --resume:" in err and str(tmp_path / "tokenizer") in err


def test_sample_grid_is_sized_to_the_samples(tmp_path):
    images = np.ones((5, 8, 8), dtype=np.float32)
    train_digits.sample_grid(images, np.arange(5), tmp_path / "grid.png", scale=1)
    assert Image.open(tmp_path / "grid.png").size == (10, 5 * 10)  # 5 classes x 1 sample, 8 px + 1 px border each side


def test_the_caption_flag_limit_is_the_heldout_split():
    assert len(train_digits.split()[3]) == train_digits.HELDOUT_DIGITS


def test_sampling_defaults_are_the_configs_sample_sections():
    """``--cfg`` / ``--top-p`` default to what each digits config's ``sample`` section says (the settings the
    recipe was measured with), which the entry point's grids and ``mmgen_pytorch.sample`` use too."""
    from mmgen_pytorch.training.config import load_config
    from mmgen_pytorch.training.recipes import sample_options

    for name, recipe in train_digits.RECIPES.items():
        args, config = train_digits.recipe_defaults(name), load_config(recipe.config, check_values=False)
        assert args.cfg == config.sample.cfg and args.top_p == (config.sample.top_p or 1.0)
        assert ("top_p" in sample_options(config)) == (config.sample.top_p is not None)
    assert train_digits.recipe_defaults("dnd").top_p == 0.95 and train_digits.recipe_defaults("llamagen").top_p == 1.0
