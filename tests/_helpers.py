"""Helpers shared by the tests: deterministic images, models moved off their initialisation, short
training runs, and reference re-draws of a model's training-time randomness."""

from typing import Any, Callable, List, Tuple

import torch
from torch import nn


def perturbed(model: nn.Module, *, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Seeded noise on every parameter, in place. Zero-initialised heads and gates would otherwise make
    outputs constant or context-free, hiding a weight that did not load or a path that was cut."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight redrawn (norm gains around 1, the rest N(0, 0.2²)) from ``torch.manual_seed(seed)``, in
    eval mode: the official inits zero the output heads, which would make every logit equal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.1 if "norm" in name else 0.2)
    return model.eval()


def smooth_images(n=2, size=8, seed=0):
    """``[n, 3, size, size]`` smooth sinusoidal images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    freq = 1 + 2 * torch.rand(n, 3, 1, 1, generator=g)
    return torch.sin(freq * xx + freq.flip(1) * yy)


def train_steps(model: nn.Module, forward: Callable[[int], Any], *, steps: int = 4,
                lr: float = 3e-3) -> Tuple[List[float], Any]:
    """``steps`` Adam steps on ``forward(step).loss``; returns the losses and the last output."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        out = forward(step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses, out


def saved_and_reloaded(build: Callable[[], nn.Module], path) -> Tuple[nn.Module, nn.Module]:
    """A model built from seed 0 and a second one built the same way, loaded from the first's state dict
    saved at ``path`` (read back with ``weights_only=True``); both in eval mode."""
    torch.manual_seed(0)
    model = build().eval()
    torch.save(model.state_dict(), path)
    loaded = build().eval()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    return model, loaded


def corrupted_like_the_model(codes, p, vocab_size, seed):
    """The inputs ``codes[:, :-1]`` with each position swapped for random codes with probability p, drawn
    from the same seed in the model's order (one uniform per position, then the random codes)."""
    torch.manual_seed(seed)
    inputs = codes[:, :-1]
    swap = torch.rand(inputs.shape[:2]) < p
    swap = swap.view(*swap.shape, *(1,) * (inputs.ndim - 2))
    return torch.where(swap, torch.randint_like(inputs, vocab_size), inputs), swap


def assert_close_f32(actual, expected, *, tol: float = 1e-5, amplification: float = 1.0, **kwargs):
    """Two float32 computations of the same math agree up to rounding (tests/TOLERANCES.md): the allowed error is
    ``tol · amplification`` relative to the largest magnitude compared, so it holds on every CPU whatever the scale
    of the values. ``amplification`` is how much the computation after the point where rounding differs can grow
    an error, e.g. ``2·s − 1`` for classifier-free guidance at scale ``s ≥ 1``."""
    scale = tol * amplification
    finite = torch.as_tensor(expected).detach().abs().nan_to_num(nan=0.0, posinf=0.0)  # NaN / inf: compared as equal_nan says
    magnitude = float(finite.max()) if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=scale, atol=scale * max(magnitude, 1.0), **kwargs)


def guidance_amplification(scale: float) -> float:
    """``uncond + (cond − uncond)·s`` turns errors ε in both halves into at most ``(|s| + |1 − s|)·ε``."""
    return abs(scale) + abs(1 - scale)


# the training entry point (tests/test_train*.py): a folder of coloured squares, tiny tokenizers, short runs

TRAIN_COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}


def write_colour_folder(root, *, per_class: int = 8, size: int = 32):
    """``root/images/class{k}/{i}.png``: noisy squares of one colour per class, and ``root/captions.jsonl``
    giving each image the caption ``"<colour> square <i>"``. Returns the images folder."""
    import json

    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    lines = []
    for label, (name, colour) in enumerate(TRAIN_COLOURS.items()):
        folder = root / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            noise = torch.randint(0, 60, (size, size, 3), generator=generator)
            pixels = (torch.tensor(colour) * 0.8 + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{index}.png")
            lines.append(json.dumps({"file": f"class{label}/{index}.png", "caption": f"{name} square {index}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "images"


def tiny_tokenizer(kind: str) -> nn.Module:
    """A KL (stride 2, 4 channels), VQ (stride 8, 16 codes) or RQ (stride 8, 16 codes, depth 2) tokenizer
    for 32x32 images (weights from torch's global RNG), in eval mode."""
    from mmgen_pytorch.tokenizers import RQVAE, VQVAE, AutoencoderKL, KLConfig, RQConfig, VQConfig

    if kind == "kl":
        return AutoencoderKL(KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(),
                                      decoder_attn_levels=())).eval()
    if kind == "vq":
        return VQVAE(VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2, 2, 2),
                              decoder_ch_mult=(1, 2, 2, 2), z_channels=16, num_res_blocks=1, usage_window=256)).eval()
    return RQVAE(RQConfig(embed_dim=4, n_embed=16, depth=2, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                          attn_levels=(), z_channels=16)).eval()


def training_data(root, kinds):
    """The colour folder, and per tokenizer kind (built in this order from seed 0) the tokenizer saved in
    ``root/<kind>`` and the folder cached through it (unflipped images, the flip cached) in
    ``root/cache-<kind>``. Returns ``root``."""
    from mmgen_pytorch.data import ImageFolderDataset, cache_dataset

    images = ImageFolderDataset(write_colour_folder(root), resolution=32, random_flip=False)
    torch.manual_seed(0)
    for kind in kinds:
        tokenizer = tiny_tokenizer(kind)
        tokenizer.save(root / kind)
        cache_dataset(images, tokenizer, root / f"cache-{kind}", batch_size=24, progress=False)
    return root


def under(root, options) -> list:
    """``--key value`` options with each value that names an entry of ``root`` made its full path."""
    return [str(root / value) if index % 2 and (root / value).exists() else value for index, value in enumerate(options)]


def reset_accelerate_state() -> None:
    """Accelerate keeps its process state in singletons: reset them between runs in one process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_run(name: str, out, *extra: str) -> list:
    """``python -m mmgen_pytorch.train name --train.output_dir out *extra`` in this process: the logged losses."""
    from mmgen_pytorch import train

    return train.main([name, "--train.output_dir", str(out), *extra])


def checkpoint_weights(out, step: int) -> dict:
    """The model's and the EMA's (``ema.`` keys) weights of the run's step-``step`` checkpoint."""
    from safetensors.torch import load_file

    from mmgen_pytorch import train

    folder = train.checkpoint_dir(out, step)
    return {**load_file(folder / "model.safetensors"),
            **{f"ema.{k}": v for k, v in load_file(folder / "ema.safetensors").items()}}


def assert_resumes_bit_identically(name: str, tmp_path, common) -> list:
    """4 steps straight == 2 steps, then ``--resume`` from the step-2 checkpoint for 2 more: the same losses
    and the same model and EMA weights, bit for bit (``common``: the options of both runs, which must save a
    checkpoint at step 2). A fresh run into the resumed folder and a resume with a changed config are
    refused first, and a fresh run whose config is wrong is told that first. Returns the straight run's losses."""
    import shutil

    import pytest

    from mmgen_pytorch import train

    straight = train_run(name, tmp_path / "straight", *common)
    assert len(straight) == 4 and all(torch.isfinite(torch.tensor(straight)))
    shutil.copytree(train.checkpoint_dir(tmp_path / "straight", 2), train.checkpoint_dir(tmp_path / "resumed", 2))
    shutil.copy(tmp_path / "straight" / "config.yaml", tmp_path / "resumed" / "config.yaml")
    with pytest.raises(SystemExit, match="^config error: .*already holds checkpoints"):  # a fresh run into it
        train_run(name, tmp_path / "resumed", *common)
    with pytest.raises(SystemExit, match="^config error: .*fewer than one global micro-batch"):  # its own error first
        train_run(name, tmp_path / "resumed", *common, "--data.batch_size", "100000")
    with pytest.raises(SystemExit, match="^config error: .*config differs .* in optim.lr"):
        train_run(name, tmp_path / "resumed", *common, "--resume", "--optim.lr", "0.5")
    resumed = train_run(name, tmp_path / "resumed", *common, "--resume")
    assert resumed == straight[2:]
    a, b = checkpoint_weights(tmp_path / "straight", 4), checkpoint_weights(tmp_path / "resumed", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


def fake_llamagen_run(root, model: nn.Module, vq: nn.Module):
    """``root/run``: a training output folder of the tiny-llamagen config as ``mmgen_pytorch.train`` leaves it
    (config.yaml, a step-4 checkpoint whose EMA weights differ from the model's), its tokenizer in
    ``root/vq``; returns the EMA wrapper."""
    from ema_pytorch import EMA

    from mmgen_pytorch import train
    from mmgen_pytorch.checkpoint import save_training_state
    from mmgen_pytorch.training.config import load_config

    vq.save(root / "vq")
    config = load_config("tiny-llamagen", ["--data.cache", str(root / "cache"), "--tokenizer.path", str(root / "vq"),
                                           "--train.output_dir", str(root / "run")])
    train.write_config(config, root / "run")
    ema = EMA(model, beta=0.9, include_online_model=False)
    perturbed(ema.ema_model, std=0.5)
    save_training_state(train.checkpoint_dir(root / "run", 4), model=model,
                        optimizer=torch.optim.AdamW(model.parameters()), step=4, ema=ema)
    return ema


def fake_run(root, name: str, *overrides: str, tokenizer_kind: str = "kl") -> nn.Module:
    """``root/run``: a training output folder of config ``name`` (with ``overrides``) as ``mmgen_pytorch.train``
    leaves it, without training: config.yaml and a step-1 checkpoint of the model built from seed 0 (no EMA),
    its tiny tokenizer in ``root/<tokenizer_kind>``. Returns the model, in eval mode."""
    from mmgen_pytorch import train
    from mmgen_pytorch.checkpoint import save_training_state
    from mmgen_pytorch.training.config import load_config
    from mmgen_pytorch.training.recipes import build_model

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tokenizer_kind)
    tokenizer.save(root / tokenizer_kind)
    config = load_config(name, ["--tokenizer.path", str(root / tokenizer_kind), "--train.output_dir",
                                str(root / "run"), *overrides])
    train.write_config(config, root / "run")
    model = build_model(config, tokenizer)
    save_training_state(train.checkpoint_dir(root / "run", 1), model=model,
                        optimizer=torch.optim.AdamW(model.parameters()), step=1)
    return model.eval()
