"""The training entry point (mmgen_pytorch.train): config checks, then end to end on CPU: a folder of
32x32 PNGs in 3 colour classes, cached through tiny KL / VQ tokenizers, MAR and LlamaGen trained a few
steps, resumed bit-identically, sample grids written, and a 2-process run (torchrun, gloo) whose loss
curve equals the 1-process run on the same global batches. DnD, Transfusion and MonoFormer:
tests/test_train_models.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("yaml")
pytest.importorskip("PIL")

from _helpers import (assert_resumes_bit_identically, reset_accelerate_state, train_run as run,  # noqa: E402
                      training_data, under)
from mmgen_pytorch import train  # noqa: E402
from mmgen_pytorch.training.config import (TOKENIZERS, ConfigError, load_config, parse_config,  # noqa: E402
                                           read_config_file, shipped_configs)

ROOT = Path(__file__).resolve().parents[1]
VALID = {"model": {"name": "LlamaGen", "kwargs": {"dim": 32, "depth": 1, "heads": 2}}, "data": {"cache": "x"}}


def with_key(section: str, key: str, value):
    raw = json.loads(json.dumps(VALID))
    raw.setdefault(section, {})[key] = value
    return raw


# config checks: the key named, before anything is read or built


@pytest.mark.parametrize("raw, words", [
    (with_key("optim", "lrr", 1e-4), ["optim.lrr", "lr"]),
    (with_key("optim", "lr", "fast"), ["optim.lr", "float"]),
    (with_key("optim", "lr", -1.0), ["optim.lr", "> 0"]),
    (with_key("optim", "betas", [0.9]), ["optim.betas", "2 values"]),
    (with_key("optim", "schedule", "linear"), ["optim.schedule", "cosine"]),
    (with_key("train", "steps", 0), ["train.steps", ">= 1"]),
    (with_key("train", "steps", True), ["train.steps", "int"]),
    (with_key("train", "mixed_precision", "fp8"), ["train.mixed_precision", "bf16"]),
    (with_key("train", "grad_accum", 3), ["data.batch_size", "train.grad_accum"]),
    (with_key("model", "name", "DiT"), ["model.name", "MAR"]),
    (with_key("sample", "top_p", 0.0), ["sample.top_p", "(0, 1]"]),
    ({"model": {"name": "MAR"}, "data": {"cache": "x"}, "sample": {"top_p": 0.9}}, ["sample.top_p", "MAR draws none"]),
    (with_key("model", "preset", "GPT-Z"), ["model.preset", "GPT-B"]),
    ({**VALID, "trainer": {}}, ["trainer", "model"]),
    ({**VALID, "data": {"cache": "x", "folder": "y"}}, ["data.folder", "data.cache"]),
    ({**VALID, "data": {"folder": "y"}}, ["tokenizer.path", "LlamaGen"]),
    ({**VALID, "data": {"cache": "x", "in_memory": True}}, ["data.in_memory", "data.folder"]),
    (with_key("tokenizer", "from_official", "x.ckpt"), ["tokenizer.kind"]),
    (with_key("tokenizer_loss", "disc_start", 5), ["tokenizer_loss.disc_start", "tokenizer training", "LlamaGen"]),
    ({"model": {"name": "VQVAE"}, "data": {"cache": "x"}}, ["VQVAE", "data.cache", "data.folder"]),
    ({"model": {"name": "VQVAE"}, "data": {"folder": "x"}}, ["tokenizer_loss.vgg16_path", "random_lpips"]),
    ({"model": {"name": "RQVAE"}, "data": {"folder": "x"}, "tokenizer_loss": {"random_lpips": True, "lpips_path": "v"}},
     ["random_lpips", "tokenizer_loss.lpips_path", "not both"]),
    ({"model": {"name": "AutoencoderKL"}, "data": {"folder": "x"},
      "tokenizer_loss": {"random_lpips": True, "disc_weight": -1}}, ["tokenizer_loss.disc_weight", ">= 0"]),
    ({"model": {"name": "VQVAE", "preset": "VQ-32"}, "data": {"folder": "x"}}, ["model.preset", "VQ-16"]),
    (with_key("tokenizer", "kind", "kl"), ["tokenizer.kind", "'vq'", "LlamaGen"]),
    ({"model": {"name": "MonoFormer"}, "data": {"cache": "x"}}, ["tokenizer.path", "MonoFormer", "scale_factor"]),
    ({"model": {"name": "VQVAE"}, "data": {"folder": "x"}, "tokenizer": {"kind": "vq"},
      "tokenizer_loss": {"random_lpips": True}}, ["`tokenizer.kind`", "VQVAE is the model being trained"]),
    ({"model": {"name": "AutoencoderKL"}, "data": {"folder": "x", "captions": "c.jsonl"},
      "tokenizer_loss": {"random_lpips": True}}, ["`data.captions`", "AutoencoderKL trains on images alone"]),
])
def test_config_errors_name_the_key(raw, words):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    for word in words:
        assert word in str(info.value)


def test_overrides_and_shipped_configs(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(VALID))
    config = load_config(path, ["--optim.lr", "3e-4", "--optim.betas", "[0.9, 0.99]", "--model.kwargs.dim", "64"])
    assert config.optim.lr == 3e-4 and config.optim.betas == (0.9, 0.99) and config.model.kwargs["dim"] == 64
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(path, ["--train.stepz", "3"])
    with pytest.raises(ConfigError, match="pairs"):
        load_config(path, ["--train.steps"])
    names = shipped_configs()
    assert {"mar-b", "mar-l", "mar-h", "llamagen-gpt-b-c2i", "llamagen-gpt-l-t2i", "dnd", "monoformer",
            "transfusion", "tiny-mar", "tiny-llamagen", "tiny-dnd", "tiny-transfusion", "tiny-monoformer",
            "llamagen-vq-16", "mar-kl-16", "dnd-rqvae", "tiny-vqgan", "tiny-kl", "tiny-rqvae",
            *(f"digits-{name}" for name in ("transfusion", "monoformer", "mar", "llamagen", "dnd", "vqvae", "rqvae"))
            } <= set(names)
    lpips = ["--tokenizer_loss.vgg16_path", "v", "--tokenizer_loss.lpips_path", "l"]
    for name in names:  # every shipped config passes the schema (data given as a cache, with its tokenizer;
        raw = read_config_file(name)  # tokenizers train on images)
        if raw["model"]["name"] in TOKENIZERS:
            data = ["--data.folder", "x"] + ([] if raw["tokenizer_loss"].get("random_lpips") else lpips)
        elif raw["data"].get("in_memory") or raw["data"].get("channels", 3) != 3:  # settings of image folders
            data = ["--data.folder", "x", "--tokenizer.path", "x"]
        else:
            data = ["--data.cache", "x", "--data.folder", "null", "--tokenizer.path", "x"]
        assert load_config(name, data).model.name


def test_step_batch_sampler_resumes_and_shards():
    whole = list(train.StepBatchSampler(10, global_batch=4, seed=3, rank=0, world=1, start=0, total=6))
    resumed = list(train.StepBatchSampler(10, global_batch=4, seed=3, rank=0, world=1, start=2, total=6))
    halves = [list(train.StepBatchSampler(10, global_batch=4, seed=3, rank=r, world=2, start=0, total=6))
              for r in range(2)]
    assert resumed == whole[2:]
    assert [a + b for a, b in zip(*halves)] == whole
    assert all(len(set(batch)) == 4 for batch in whole)


# end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("train"), kinds=("kl", "vq"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state(one_torch_thread):
    yield
    reset_accelerate_state()


@pytest.mark.parametrize("name, kind", [("tiny-mar", "kl"), ("tiny-llamagen", "vq")])
def test_train_resume_bit_identical_and_sample(data, tmp_path, name, kind):
    """4 steps straight == 2 steps + --resume for 2 more (losses, model and EMA weights, bit for bit); a
    sample grid from the EMA model at the end."""
    common = ["--data.cache", str(data / f"cache-{kind}"), "--tokenizer.path", str(data / kind),
              "--train.checkpoint_every", "2", "--train.sample_every", "0"]
    assert_resumes_bit_identically(name, tmp_path, common)
    grid = tmp_path / "resumed" / "samples" / "step-0000004.png"
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == (2 * 32, 2 * 32)  # 4 samples of 32x32
    logged = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4] and logged[0]["lr"] == pytest.approx(5e-4)


def test_relative_paths_are_saved_absolute_and_resume_from_any_folder(data, tmp_path, monkeypatch):
    """Paths given relative to the working folder are written absolute into config.yaml (so `sample` reads the
    run from any folder); a run saved by an earlier version with them relative (and with the generator's unused
    `tokenizer_loss` section written out) still resumes from its folder."""
    import yaml

    monkeypatch.chdir(data)
    common = ["--data.cache", "cache-kl", "--tokenizer.path", "kl", "--train.steps", "2", "--train.checkpoint_every",
              "1", "--train.sample_every", "0"]
    run("tiny-mar", tmp_path / "run", *common, "--train.steps", "1")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["tokenizer"]["path"], saved["data"]["cache"]) == (str(data / "kl"), str(data / "cache-kl"))
    assert "tokenizer_loss" not in saved
    saved["tokenizer"]["path"], saved["data"]["cache"] = "kl", "cache-kl"  # as an earlier version wrote them
    saved["tokenizer_loss"] = json.loads(json.dumps(load_config("tiny-kl", check_values=False).to_dict()["tokenizer_loss"]))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    reset_accelerate_state()
    assert len(run("tiny-mar", tmp_path / "run", *common, "--resume")) == 1


def test_resume_with_more_steps_follows_the_new_schedule(data, tmp_path):
    """A resumed run given more `train.steps` continues on the cosine schedule of its new length from its
    first step (before: one step at the old schedule's final rate, 0)."""
    common = ["--data.cache", str(data / "cache-kl"), "--tokenizer.path", str(data / "kl"), "--train.sample_every", "0"]
    run("tiny-mar", tmp_path, *common)
    reset_accelerate_state()
    run("tiny-mar", tmp_path, *common, "--resume", "--train.steps", "6")
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    config = load_config("tiny-mar", ["--data.cache", "x"])
    expected = [config.optim.lr * train.learning_rate_factor(step, warmup=config.optim.warmup_steps, total=6,
                                                             schedule="cosine") for step in (4, 5)]
    assert [entry["step"] for entry in logged[-2:]] == [5, 6] and expected[0] > 0
    assert [entry["lr"] for entry in logged[-2:]] == pytest.approx(expected, rel=1e-12)


T2I = ["--model.kwargs.model_type", "t2i", "--model.kwargs.cls_token_num", "16", "--data.max_caption_length", "16",
       "--model.kwargs.caption_encoder", "{num_tokens: 257, dim: 32, depth: 1, heads: 2, max_seq_len: 16}"]


@pytest.mark.parametrize("name, options, words", [
    ("tiny-llamagen", ["--data.cache", "cache-vq", *T2I], ["LlamaGen t2i", "captions", "data.captions"]),
    ("tiny-llamagen", ["--data.folder", "images", "--tokenizer.path", "vq", "--data.captions", "captions.jsonl", *T2I,
                       "--model.kwargs.caption_encoder.num_tokens", "8"],
     ["model.kwargs.caption_encoder.num_tokens", "is 8", "at least 257"]),
    ("tiny-mar", ["--data.cache", "cache-kl", "--model.kwargs.num_classes", "2"], ["model.kwargs.num_classes", "is 2"]),
    # the latents / codes the data becomes against the grid and channels the model takes
    ("tiny-llamagen", ["--data.cache", "cache-vq", "--model.kwargs.grid_size", "8"],
     ["`model.kwargs.grid_size` 8", "gives 4x4", "`data.cache`", "what would fit: `model.kwargs.grid_size` 4"]),
    ("tiny-llamagen", ["--data.folder", "images", "--tokenizer.path", "vq", "--data.resolution", "16"],
     ["`model.kwargs.grid_size` 4", "gives 2x2", "`data.resolution` 16", "stride 8", "`model.kwargs.grid_size` 2",
      "or `data.resolution` 32"]),
    ("tiny-llamagen", ["--data.folder", "images", "--tokenizer.path", "vq", "--data.resolution", "36"],
     ["`data.resolution` 36", "stride 8", "use 32 or 40"]),
    ("tiny-llamagen", ["--data.folder", "images", "--tokenizer.path", "vq", "--model.kwargs.vocab_size", "32"],
     ["codebook of 16 codes", "`vocab_size` is 32"]),
    ("tiny-transfusion", ["--data.folder", "images"],  # no tokenizer: the grid and the channels in one message
     ["a 16x16 grid (`model.kwargs.modality_default_shape`", "and 4 latent channels (`model.kwargs.dim_latent`)",
      "gives 32x32 and 3 channels", "`model.kwargs.modality_default_shape` [32, 32], `model.kwargs.dim_latent` 3"]),
    ("tiny-mar", ["--data.folder", "images", "--tokenizer.path", "kl", "--model.kwargs.vae_embed_dim", "8"],
     ["8 latent channels (`model.kwargs.vae_embed_dim`)", "gives 4", "`model.kwargs.vae_embed_dim` 4"]),
    ("tiny-mar", ["--data.folder", "images", "--tokenizer.path", "kl", "--model.kwargs.vae_stride", "4",
                  "--model.kwargs.patch_size", "2"],
     ["8x8 grid (`model.kwargs.img_size` 32, `model.kwargs.vae_stride` 4)", "gives 16x16", "stride 2",
      "`model.kwargs.img_size` 32, `model.kwargs.vae_stride` 2", "or `data.resolution` 16"]),
])
def test_data_the_model_cannot_take_is_refused_before_training(data, tmp_path, name, options, words):
    """Refused with the key to change before any step (these failed inside the first one); DnD,
    Transfusion and MonoFormer: tests/test_train_models.py."""
    with pytest.raises(SystemExit, match="^config error: ") as info:
        run(name, tmp_path, *under(data, options))
    assert all(word in str(info.value) for word in words), str(info.value)
    assert not (tmp_path / train.LOG_FILE).exists()


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_accelerate_setups_are_refused_before_anything_is_built(data, tmp_path, monkeypatch, flag):
    """FSDP / DeepSpeed shard the weights, which the loop's checkpoints and EMA need whole; on CPU Accelerate
    would ignore the flag and run DDP, so asking is refused too. What Accelerate chose is checked as well."""
    monkeypatch.setenv(flag, "true")
    with pytest.raises(SystemExit, match=f"not Accelerate's {flag[len('ACCELERATE_USE_'):]}.*accelerate config"):
        run("tiny-llamagen", tmp_path / "out", "--data.cache", str(data / "cache-vq"))
    assert not (tmp_path / "out" / "config.yaml").exists()
    with pytest.raises(ConfigError, match="not Accelerate's FSDP"):
        train.check_unsharded("FSDP")
    train.check_unsharded("MULTI_GPU")


def test_train_from_image_folder_through_the_frozen_tokenizer(data, tmp_path):
    losses = run("tiny-llamagen", tmp_path, "--data.folder", str(data / "images"), "--tokenizer.path",
                 str(data / "vq"), "--train.steps", "2", "--sample.num", "2")
    assert len(losses) == 2
    assert (tmp_path / "samples" / "step-0000002.png").is_file()


def test_two_processes_give_the_one_process_loss_curve(data, tmp_path):
    """LlamaGen without class dropout on unflipped cached codes: the loss is a function of the weights and
    the batch, so 2 processes x 4 items (DDP-averaged gradients) must follow the 1 process x 8 curve."""
    options = ["--data.cache", str(data / "cache-vq"), "--data.random_flip", "false",
               "--model.kwargs.class_dropout_prob", "0.0", "--optim.ema_beta", "null", "--train.steps", "3",
               "--sample.num", "1"]
    single = run("tiny-llamagen", tmp_path / "one", *options)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmgen_pytorch.train", "tiny-llamagen", "--train.output_dir", str(tmp_path / "two"), *options]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line)["loss"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(single), rtol=1e-4, atol=0)
    one, two = (load_file(train.checkpoint_dir(tmp_path / n, 3) / "model.safetensors") for n in ("one", "two"))
    for key in one:
        scale = one[key].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5 * float(scale))


def test_sample_grid_draws_in_eval_mode_and_restores_the_mode(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mmgen_pytorch import train

    model, modes = torch.nn.Linear(1, 1), []

    def draw(config, drawn, tokenizer, classes):
        modes.append(drawn.training)
        raise RuntimeError("draw failed")
    monkeypatch.setattr(train, "draw_samples", draw)
    state = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True), sampling_model=lambda: model,
                            tokenizer=None)
    with pytest.raises(RuntimeError, match="draw failed"):
        train.sample_grid(None, state, tmp_path, 1, None)
    assert modes == [False] and model.training


# refused before any step: one line on stderr, no traceback


def refusal(capsys, argv) -> str:
    """``main(argv)``'s exit message, checked to be one ``config error:`` line with no traceback."""
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    message = str(info.value)
    assert message.startswith("config error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def test_refusals_while_building_are_one_config_error_line(data, tmp_path, capsys):
    base = ["--train.output_dir", str(tmp_path / "out"), "--train.tracker", "none"]
    vq = ["--data.folder", str(data / "images"), "--tokenizer.path", str(data / "vq")]
    message = refusal(capsys, ["tiny-llamagen", *base, *vq, "--model.kwargs.grid_size", "0"])  # the constructor's
    assert "`model` (LlamaGen" in message and "grid_size" in message
    message = refusal(capsys, ["tiny-llamagen", *base, "--data.folder", str(tmp_path / "none"), "--tokenizer.path",
                               str(data / "vq")])
    assert "`data.folder`" in message and "does not exist" in message
    message = refusal(capsys, ["tiny-llamagen", *base, *vq, "--data.batch_size", "48"])
    assert "`data.folder`" in message and "24 items" in message and "`data.batch_size`" in message
    message = refusal(capsys, ["tiny-llamagen", *base, *vq, "--resume"])
    assert "--resume: no checkpoint" in message
    assert not (tmp_path / "out" / train.LOG_FILE).exists()


def test_a_tokenizer_whose_grid_does_not_fit_is_refused_before_any_step(data, tmp_path, capsys):
    """tiny-vqgan's tokenizer (stride 4) under tiny-llamagen at 32x32 (a 4x4 grid needs stride 8)."""
    from mmgen_pytorch.tokenizers import VQVAE, VQConfig

    VQVAE(VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                   z_channels=16, num_res_blocks=1)).save(tmp_path / "vq4")
    message = refusal(capsys, ["tiny-llamagen", "--data.folder", str(data / "images"), "--tokenizer.path",
                               str(tmp_path / "vq4"), "--train.output_dir", str(tmp_path / "out")])
    for words in ("LlamaGen takes a 4x4 grid (`model.kwargs.grid_size` 4)", "gives 8x8", "`data.resolution` 32",
                  "stride 4", "what would fit: `model.kwargs.grid_size` 8; or `data.resolution` 16"):
        assert words in message, message
    assert not (tmp_path / "out" / train.LOG_FILE).exists()


def test_tokenizer_path_must_exist_and_hold_a_model(data, tmp_path, capsys):
    common = ["tiny-llamagen", "--data.folder", str(data / "images"), "--train.output_dir", str(tmp_path / "out")]
    message = refusal(capsys, [*common, "--tokenizer.path", str(tmp_path / "none")])
    assert "`tokenizer.path`" in message and "does not exist" in message and "config.json" not in message
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    message = refusal(capsys, [*common, "--tokenizer.path", str(tmp_path / "run")])
    assert "`tokenizer.path`" in message and "without a complete checkpoint" in message
    import shutil

    shutil.copytree(data / "vq", tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    message = refusal(capsys, [*common, "--tokenizer.path", str(tmp_path / "truncated")])
    assert "`tokenizer.path`" in message and "model.safetensors" in message


def test_show_prints_the_resolved_config_and_builds_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    def not_built(*args, **kwargs):
        raise AssertionError("--show built the run")
    monkeypatch.setattr(train, "prepare", not_built)
    argv = ["tiny-mar", "--data.cache", "c", "--train.steps", "7", "--train.output_dir", str(tmp_path / "out")]
    assert train.main([*argv, "--show"]) == []
    shown = yaml.safe_load(capsys.readouterr().out)
    resolved = json.loads(json.dumps(load_config("tiny-mar", argv[1:]).to_dict()))
    assert shown == {key: value for key, value in resolved.items() if key != "tokenizer_loss"}  # a generator's
    train.main(["tiny-kl", "--data.folder", "x", "--show"])
    assert "tokenizer_loss" in yaml.safe_load(capsys.readouterr().out)  # a tokenizer's
    assert shown["train"]["steps"] == 7 and shown["model"]["kwargs"]["vae_stride"] == 2
    assert not (tmp_path / "out").exists()
    message = refusal(capsys, [*argv, "--train.stepz", "1", "--show"])  # an unknown key: nothing to show
    assert "train.stepz" in message
    with pytest.raises(SystemExit, match="config error: give exactly one of `data.folder`, `data.hf`, `data.cache`"):
        train.main(["tiny-mar", "--show"])  # a shipped config without its data: shown, then what it lacks
    assert yaml.safe_load(capsys.readouterr().out)["model"]["kwargs"]["vae_stride"] == 2


# the eval section: every process checks what can fail, the main process builds


class NotMainProcess:
    """An accelerator seen from a process other than the main one (one process really runs)."""

    def __init__(self, accelerator):
        self._accelerator = accelerator

    is_main_process = False

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def test_eval_checks_run_on_every_process(data, tmp_path, monkeypatch):
    make_accelerator = train.make_accelerator
    monkeypatch.setattr(train, "make_accelerator", lambda config: (NotMainProcess(make_accelerator(config)[0]),
                                                                   "none"))

    def refuse(*args):
        raise ConfigError("`eval`: checked")
    monkeypatch.setattr(train, "evaluation_conditioning", refuse)
    monkeypatch.setattr(train, "build_evaluator", lambda *args: pytest.fail("built on a process other than the main"))
    eval_options = ["--eval.every", "1", "--eval.extractor", "tiny", "--eval.reference", str(data / "images"),
                    "--eval.num_samples", "2"]
    with pytest.raises(SystemExit, match="config error: `eval`: checked"):
        run("tiny-mar", tmp_path, "--data.cache", str(data / "cache-kl"), "--tokenizer.path", str(data / "kl"),
            *eval_options)
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)  # the extractor's package: before building
    with pytest.raises(SystemExit, match="config error: `eval.extractor` pca-digits: .*scikit-learn"):
        run("tiny-mar", tmp_path, "--data.cache", str(data / "cache-kl"), "--eval.every", "1", "--eval.extractor",
            "pca-digits", "--eval.reference", str(data / "images"), "--data.resolution", "8")
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # the metrics' package, for every extractor
    with pytest.raises(SystemExit, match="config error: mmgen_pytorch.evaluation's metrics need torchmetrics"):
        run("tiny-mar", tmp_path, "--data.cache", str(data / "cache-kl"), *eval_options)


def test_a_failure_on_the_main_process_is_raised_on_every_process(monkeypatch):
    from types import SimpleNamespace

    import accelerate.utils

    told = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: told.append(objects[0]) or
                        ["OSError: 'ref/3.png' is not an image"])
    other = SimpleNamespace(is_main_process=False, num_processes=2)
    with pytest.raises(ConfigError, match=r"`eval`: the main process failed to build it: OSError: 'ref/3.png'"):
        train.on_main_process(other, lambda: pytest.fail("built on another process"), what="`eval`")
    assert told == [None]

    def fail():
        raise OSError("'ref/3.png' is not an image")
    main = SimpleNamespace(is_main_process=True, num_processes=2)
    with pytest.raises(OSError, match="is not an image"):
        train.on_main_process(main, fail, what="`eval`")
    assert told[-1] == "OSError: 'ref/3.png' is not an image"
    assert train.on_main_process(SimpleNamespace(is_main_process=True, num_processes=1), lambda: 5, what="x") == 5


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_decay_is_constant_from_ema_start_or_ramps_with_ema_warmup(warmup):
    """Default: the EMA copies the model for `ema_start` steps, then decays at `ema_beta`. `ema_warmup`:
    ema-pytorch's ramp 1 - (1 + t)^(-2/3) after `ema_start`, capped at `ema_beta` (transfusion-pytorch's
    create_ema, the digits loop)."""
    config = load_config("tiny-mar", ["--data.cache", "c", "--optim.ema_beta", "0.995", "--optim.ema_start", "3",
                                      "--optim.ema_warmup", str(warmup).lower()])
    ema = train.make_ema(config, torch.nn.Linear(2, 2))
    decays = []
    for _ in range(40):
        ema.update()
        decays.append(ema.get_current_decay())
    ramp = [min(0.995, 1 - (1 + t) ** (-2 / 3)) for t in range(1, 37)]
    assert decays[:4] == [0.0] * 4
    assert decays[4:] == pytest.approx(ramp if warmup else [0.995] * 36, rel=1e-6)
