"""Tokenizer training as upstream: LPIPS (its formula, strict weight files), the PatchGAN, the GAN losses'
closed forms, the adaptive weight, the discriminator start step, and a tiny VQ GAN trained through the
training entry point and resumed bit-identically."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmgen_pytorch.checkpoint import TrainedPart, load_training_state, save_training_state
from mmgen_pytorch.files import CheckpointMismatchError
from mmgen_pytorch.tokenizers import RQVAE, VQVAE, AutoencoderKL, KLConfig, RQConfig, VQConfig
from mmgen_pytorch.tokenizers.losses import (LPIPS, LPIPS_SCALE, LPIPS_SHIFT, VGG16_TAPS, NLayerDiscriminator,
                                             TokenizerLoss, adaptive_weight, discriminator_loss, generator_loss,
                                             last_decoder_layer, regularization)

TINY = dict(ch=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return LPIPS.random()


def images(seed: int, size: int = 16, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# LPIPS


def reference_lpips(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out from the state dict with functional ops: the lpips package's formula."""
    weights = model.state_dict()
    shift, scale = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)

    def features(h):
        taps, index = [], 0
        h = (h - shift) / scale
        while index <= max(VGG16_TAPS):
            key = f"net.features.{index}.weight"
            if key in weights:
                h = F.relu(F.conv2d(h, weights[key], weights[f"net.features.{index}.bias"], padding=1))
                index += 2  # conv + ReLU
            else:
                h = F.max_pool2d(h, 2)
                index += 1
            if index - 1 in VGG16_TAPS:
                taps.append(h)
        return taps

    total = 0
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((a - b) ** 2 * weights[f"lin{k}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_zero_on_equal_images_positive_and_symmetric(lpips):
    x, y = images(1), images(2)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    forward, backward = lpips(x, y), lpips(y, x)
    assert (forward > 0).all()
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=0)
    torch.testing.assert_close(forward, reference_lpips(lpips, x, y), rtol=1e-4, atol=0)
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.train().training


def vgg16_state_dict(lpips: LPIPS, *, classifier: bool = True) -> dict:
    """What torchvision's ``vgg16().state_dict()`` holds (the classifier shrunk: only its names matter here)."""
    state_dict = {key: value.clone() + 1 for key, value in lpips.net.state_dict().items()}
    if classifier:
        state_dict.update({f"classifier.{i}.{p}": torch.zeros(2) for i in (0, 3, 6) for p in ("weight", "bias")})
    return state_dict


def linear_state_dict(lpips: LPIPS) -> dict:
    return {f"lin{k}.model.1.weight": layer.weight.clone() * 2 for k, layer in enumerate(lpips.linear_layers())}


def test_lpips_weights_load_strictly_by_torchvision_and_lpips_names(lpips, tmp_path):
    vgg, lin = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
    torch.save(vgg16_state_dict(lpips), vgg)
    torch.save(linear_state_dict(lpips), lin)
    loaded = LPIPS.from_files(vgg, lin)
    assert torch.equal(loaded.net.features[28].bias, lpips.net.features[28].bias + 1)
    assert torch.equal(loaded.lin4.model[1].weight, lpips.lin4.model[1].weight * 2)

    wrong = {**vgg16_state_dict(lpips), "features.1.weight": torch.zeros(3)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)wrong\.pth.*vgg16.*unexpected \(1\): features\.1\.weight"):
        LPIPS.from_files(tmp_path / "wrong.pth", lin)
    torch.save({**linear_state_dict(lpips), "lin5.model.1.weight": torch.zeros(1)}, tmp_path / "lin5.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)lin5\.pth.*lin0\.model\.1\.weight.*lin5\.model\.1\.weight"):
        LPIPS.from_files(vgg, tmp_path / "lin5.pth")
    with pytest.raises(FileNotFoundError, match=r"absent\.pth.*vgg16-397923af\.pth"):
        LPIPS.from_files(tmp_path / "absent.pth", lin)


def test_the_lpips_package_linear_weights_load():
    """The lpips package's v0.1 VGG linear weights, as torchmetrics ships them (when installed)."""
    metrics = pytest.importorskip("torchmetrics")
    path = Path(metrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
    if not path.is_file():
        pytest.skip("torchmetrics without its LPIPS weights")
    from mmgen_pytorch.tokenizers.losses import read_linear_weights

    weights = read_linear_weights(path, LPIPS())
    assert [tuple(w.shape) for w in weights.values()] == [(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]


# GAN losses


def test_gan_losses_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    hinge_d = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    vanilla_d = 0.5 * (sum(softplus(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(softplus(f) for f in (-2.0, 0.0, 1.0)) / 3)
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(hinge_d, rel=1e-6)
    assert discriminator_loss("non-saturating", real, fake).item() == pytest.approx(vanilla_d, rel=1e-6)
    assert generator_loss("hinge", fake).item() == pytest.approx(1 / 3, rel=1e-6)
    assert generator_loss("non-saturating", fake).item() == pytest.approx(
        sum(softplus(-f) for f in (-2.0, 0.0, 1.0)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="disc_loss"):
        discriminator_loss("wasserstein", real, fake)


def test_discriminator_shape_and_size_check():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(channels=8, layers=3)
    assert disc(images(3, size=32)).shape == (2, 1, 2, 2)
    assert sum(p.numel() for p in NLayerDiscriminator().parameters()) == 2_765_633  # taming's 3-layer PatchGAN
    with pytest.raises(ValueError, match="side >= 24"):
        disc(images(3, size=16))


# the tokenizer loss


def tiny_tokenizer(kind: str):
    torch.manual_seed(0)
    if kind == "vq":
        return VQVAE(VQConfig(codebook_size=16, codebook_dim=4, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
                              z_channels=16, usage_window=256, **TINY))  # tiny-vqgan's tokenizer
    if kind == "kl":
        return AutoencoderKL(KLConfig(embed_dim=4, ch_mult=(1, 2), encoder_attn_levels=(), **TINY))
    return RQVAE(RQConfig(embed_dim=8, n_embed=16, depth=2, ch_mult=(1, 2), attn_levels=(), z_channels=16, **TINY))


def make_loss(lpips, **options) -> TokenizerLoss:
    torch.manual_seed(1)
    return TokenizerLoss(discriminator=NLayerDiscriminator(channels=8, layers=2), perceptual=lpips, **options)


@pytest.mark.parametrize("kind, adaptive", [("vq", True), ("kl", False), ("rq", True)])
def test_generator_and_discriminator_steps(lpips, kind, adaptive):
    tokenizer, x = tiny_tokenizer(kind), images(4)
    loss = make_loss(lpips, disc_start=0, disc_weight=0.5, adaptive_weight=adaptive,
                     reduction="sum" if kind == "kl" else "mean", reconstruction="l1" if kind == "kl" else "l2")
    out = tokenizer(x)
    terms = loss.generator_losses(x, out.recon, regularization(tokenizer, out), step=0,
                                  last_layer=last_decoder_layer(tokenizer))
    raw = generator_loss("hinge", loss.discriminator(out.recon))
    expected_weight = 0.5 * (adaptive_weight(terms.reconstruction + terms.perceptual, raw,
                                             last_decoder_layer(tokenizer)) if adaptive else 1.0)
    torch.testing.assert_close(terms.gan_weight, torch.as_tensor(expected_weight), rtol=1e-5, atol=0)
    torch.testing.assert_close(terms.gan, terms.gan_weight * raw, rtol=1e-5, atol=1e-7)
    terms.total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # frozen in the generator's pass
    assert last_decoder_layer(tokenizer).grad.abs().sum() > 0
    disc = loss.discriminator_losses(x, out.recon, step=0)
    disc.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    weight = torch.tensor([[1.0, 2.0]], requires_grad=True)
    rec, gan = (weight * torch.tensor([[3.0, 4.0]])).sum(), (weight * torch.tensor([[0.6, 0.8]])).sum()
    assert adaptive_weight(rec, gan, weight).item() == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6)
    assert adaptive_weight(rec, 0 * gan, weight).item() == pytest.approx(1e4)  # clamped


def test_gan_terms_are_zero_before_the_start_step(lpips):
    tokenizer, x = tiny_tokenizer("vq"), images(5)
    loss = make_loss(lpips, disc_start=3, adaptive_weight=True)
    out = tokenizer(x)
    reg = regularization(tokenizer, out)
    before = loss.generator_losses(x, out.recon, reg, step=2, last_layer=last_decoder_layer(tokenizer))
    assert before.gan.item() == 0 and before.gan_weight.item() == 0
    torch.testing.assert_close(before.total, F.mse_loss(out.recon, x) + lpips(x, out.recon).mean() + reg)
    assert loss.discriminator_losses(x, out.recon, step=2) is None
    after = loss.generator_losses(x, out.recon, reg, step=3, last_layer=last_decoder_layer(tokenizer))
    assert after.gan_weight.item() > 0 and loss.discriminator_losses(x, out.recon, step=3) is not None


def test_loss_options_are_checked(lpips):
    with pytest.raises(ValueError, match="perceptual_weight.*LPIPS.from_files"):
        TokenizerLoss(perceptual=None, perceptual_weight=1.0)
    with pytest.raises(ValueError, match="gen_loss"):
        TokenizerLoss(perceptual=lpips, gen_loss="wgan")
    with pytest.raises(ValueError, match="disc_start"):
        TokenizerLoss(perceptual=lpips, disc_start=-1)


def test_training_state_keeps_the_parts(tmp_path):
    model, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    optimizers = [torch.optim.AdamW(m.parameters()) for m in (model, disc)]
    for m, optimizer in zip((model, disc), optimizers):
        m(torch.ones(1, 2)).sum().backward()
        optimizer.step()
    save_training_state(tmp_path, model=model, optimizer=optimizers[0], step=1,
                        parts={"discriminator": TrainedPart(disc, optimizers[1])})
    fresh = torch.nn.Linear(2, 1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    with pytest.raises(CheckpointMismatchError, match=r"parts \['discriminator'\].*gives \[\]"):
        load_training_state(tmp_path, model=torch.nn.Linear(2, 2), optimizer=torch.optim.AdamW(model.parameters()))
    load_training_state(tmp_path, model=model, optimizer=optimizers[0],
                        parts={"discriminator": TrainedPart(fresh, fresh_optimizer)})
    assert torch.equal(fresh.weight, disc.weight)
    saved, restored = (o.state_dict()["state"][0]["exp_avg"] for o in (optimizers[1], fresh_optimizer))
    assert torch.equal(restored, saved)


# through the training entry point


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(2):
        (tmp_path / "images" / f"c{label}").mkdir(parents=True)
        for index in range(4):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "images" / f"c{label}" / f"{index}.png")
    return tmp_path


@pytest.fixture
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_tiny_vqgan_trains_and_resumes_bit_identically(folder, fresh_accelerate_state):
    """4 steps straight == 2 steps + --resume for 2 (the GAN starts at step 2): the same logged terms and
    the same tokenizer, EMA and discriminator weights and discriminator optimizer state, bit for bit."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from mmgen_pytorch import train

    def run(out, *extra):
        return train.main(["tiny-vqgan", "--data.folder", str(folder / "images"), "--train.output_dir", str(out),
                           "--train.checkpoint_every", "2", *extra])

    straight = run(folder / "straight")
    shutil.copytree(train.checkpoint_dir(folder / "straight", 2), train.checkpoint_dir(folder / "resumed", 2))
    shutil.copy(folder / "straight" / "config.yaml", folder / "resumed" / "config.yaml")
    resumed = run(folder / "resumed", "--resume")
    assert resumed == straight[2:] and len(straight) == 4
    logs = [[json.loads(line) for line in (folder / name / "log.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")]
    assert logs[0][2:] == logs[1]
    assert "disc_loss" not in logs[0][1] and logs[0][2]["disc_loss"] > 0 and logs[0][2]["gan_weight"] > 0
    a, b = (train.checkpoint_dir(folder / name, 4) for name in ("straight", "resumed"))
    for file in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        first, second = load_file(a / file), load_file(b / file)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    states = [torch.load(path / "training_state.pt", weights_only=True)["parts"]["discriminator"] for path in (a, b)]
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in
               zip(states[0]["optimizer"]["state"].values(), states[1]["optimizer"]["state"].values()))
    assert VQVAE.load(b).config.codebook_size == 16  # the checkpoint is a loadable tokenizer
