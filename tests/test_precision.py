"""Mixed precision on CPU: every model and tokenizer trains under bf16 autocast with finite gradients
and the fp32 loss (within bf16 rounding), every generator samples under bf16, and MAR trains under
fp16 autocast with a GradScaler without NaN (upstream MAR issues #29 / #69)."""

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn, randint, randn

from _helpers import perturbed, smooth_images
from mmgen_pytorch import MAR, DnDTransformer, LlamaGen, MonoFormer, Transfusion
from mmgen_pytorch.objectives.gaussian import GaussianDiffusion
from mmgen_pytorch.tokenizers import AutoencoderKL, KLConfig, RQConfig, RQVAE, VQConfig, VQVAE


BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@dataclass
class Case:
    """A tiny model and one training step of it returning the loss (global RNG seeded before each call)."""

    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module], torch.Tensor]
    # the whole gradient must point the fp32 way; off for the quantizers, whose straight-through
    # gradients follow the discrete code choice, which bf16 rounding (and the RQ EMA restarts) can flip
    compare_gradients: bool = True


def _transfusion():
    return perturbed(Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                                  transformer=dict(dim=32, depth=2, heads=2, dim_head=16, attn_backend="sdpa")))


def _monoformer():
    return perturbed(MonoFormer(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2, attn_backend="sdpa"),
                                 latent_channels=4, latent_size=4, patch_size=2))


def _mar(**kwargs):
    config = dict(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                  decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1, diffloss_width=32,
                  num_sampling_steps="4", diffusion_batch_mul=2, attn_dropout=0.0, proj_dropout=0.0)
    return perturbed(MAR(**{**config, **kwargs}))


def _llamagen():
    return perturbed(LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, num_classes=5), std=0.2)


def _dnd():
    return perturbed(DnDTransformer(dim=32, depth=4, heads=2, head_positions=(1, 3), vocab_size=24, grid_size=3,
                                     num_classes=5, cls_token_num=2), std=0.2)


VQ = VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
              z_channels=32, num_res_blocks=1, usage_window=256)
RQ = RQConfig(embed_dim=8, n_embed=16, depth=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=8)
KL = KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(), decoder_attn_levels=())

_g = torch.Generator().manual_seed(0)
TEXT = [randint(0, 32, (5,), generator=_g), randint(0, 32, (3,), generator=_g), randint(0, 32, (4,), generator=_g)]
TRANSFUSION_BATCH = [[TEXT[0], randn(2, 2, 8, generator=_g), TEXT[1]], [TEXT[2], randn(3, 2, 8, generator=_g)]]
MONOFORMER_BATCH = [[randint(0, 8, (3,), generator=_g), randn(4, 4, 4, generator=_g)],
                    [randint(0, 8, (2,), generator=_g), randn(4, 4, 4, generator=_g), randint(0, 8, (2,), generator=_g)]]
LATENTS = randn(3, 4, 4, 4, generator=_g)
CODES = randint(0, 24, (2, 3, 3), generator=_g)
DND_CODES = randint(0, 24, (2, 3, 3, 2), generator=_g)
LABELS = torch.tensor([1, 3])

CASES = {
    "transfusion": Case(_transfusion, lambda m: m(TRANSFUSION_BATCH)),
    "monoformer": Case(_monoformer, lambda m: m(MONOFORMER_BATCH)),
    "mar": Case(_mar, lambda m: m(LATENTS, torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0))),
    "llamagen": Case(_llamagen, lambda m: m(CODES, class_labels=LABELS)),
    "dnd": Case(_dnd, lambda m: m(DND_CODES, class_labels=LABELS)),
    "vqvae": Case(lambda: VQVAE(VQ, entropy_loss_ratio=0.1), lambda m: m(smooth_images()).loss,
                  compare_gradients=False),
    "rqvae": Case(lambda: RQVAE(RQ), lambda m: m(smooth_images()).loss,  # training mode: EMA codebook update
                  compare_gradients=False),
    "autoencoder_kl": Case(lambda: AutoencoderKL(KL), lambda m: m(smooth_images(),
                                                                  generator=torch.Generator().manual_seed(0)).loss),
}


def loss_and_grads(case: Case, model: nn.Module, *, bf16: bool):
    model = copy.deepcopy(model).train()  # the same weights and buffers (RQ codebook, VQ usage) for both runs
    torch.manual_seed(0)
    with torch.autocast(**BF16, enabled=bf16):
        loss = case.loss(model)
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten().float() for g in grads.values()])


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_training_step_is_finite_and_matches_fp32(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    loss32, grads32 = loss_and_grads(case, model, bf16=False)
    loss16, grads16 = loss_and_grads(case, model, bf16=True)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert grads16.keys() == grads32.keys() and len(grads16) > 0  # bf16 reaches every parameter fp32 reaches
    assert all(bool(torch.isfinite(g).all()) for g in grads16.values())
    if not case.compare_gradients:
        return
    a, b = flat(grads16), flat(grads32)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a.norm() / b.norm()).item() == pytest.approx(1.0, rel=5e-2)


# bf16 sampling (autocast around the public sampling entry points)

def test_bf16_sampling_transfusion():
    model = _transfusion().eval()
    with torch.autocast(**BF16):
        images = model.generate_modality_only(2, modality_steps=3, progress=False)
        text = model.generate_text_only(TEXT[0][None], 8, progress=False)
    assert images.shape == (2, 2, 2, 8) and bool(torch.isfinite(images).all())
    assert text.shape == (1, 3) and 0 <= int(text.min()) and int(text.max()) < 32


def test_bf16_sampling_monoformer():
    model = _monoformer().eval()
    with torch.autocast(**BF16):
        latents = model.generate_images([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], cfg_scale=2.0,
                                        steps=4, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 4, 4) and bool(torch.isfinite(latents).all())


def test_bf16_sampling_mar():
    model = _mar().eval()
    with torch.autocast(**BF16):
        samples = model.sample([1, 2], num_iter=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert samples.latents.shape == (2, 4, 4, 4) and samples.latents.dtype == torch.float32
    assert bool(torch.isfinite(samples.latents).all())


def test_bf16_weights_mar_samples_and_trains():
    """Weights stored in bf16 (not autocast): the diffusion head's math still runs in float32."""
    model = _mar().to(torch.bfloat16)
    out = model.sample([1], num_iter=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0), progress=False).latents
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    loss = model.train()(LATENTS.bfloat16(), torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("build, codes_shape", [(_llamagen, (2, 3, 3)), (_dnd, (2, 3, 3, 2))])
def test_bf16_sampling_discrete_generators(build, codes_shape):
    model = build().eval()
    for cfg_scale in (1.0, 2.0):
        with torch.autocast(**BF16):
            codes = model.generate(LABELS, cfg_scale=cfg_scale, top_k=10, progress=False,
                                   generator=torch.Generator().manual_seed(0))
        assert codes.shape == codes_shape and codes.dtype == torch.long
        assert 0 <= int(codes.min()) and int(codes.max()) < 24


@pytest.mark.parametrize("tokenizer", ["vq", "rq"])
def test_bf16_autocast_code_search_picks_the_fp32_codes(tokenizer):
    """Nearest-code search runs in float32 under autocast: bf16 distances (|z|² + |c|² − 2 z·c) flip
    near ties, which these 2048 latents contain."""
    torch.manual_seed(0)
    if tokenizer == "vq":
        search, latent = VQVAE(VQ).quantize, randn(8, VQ.codebook_dim, 16, 16) * 10
        codes = lambda z: search.nearest(z)[2]  # noqa: E731
    else:
        search, latent = RQVAE(RQ).quantizer, randn(8, RQ.embed_dim, 16, 16)
        codes = lambda z: search(z, update=False).codes  # noqa: E731
    reference = codes(latent)
    with torch.autocast(**BF16):
        assert torch.equal(codes(latent), reference)


# fp16 + GradScaler (CPU autocast takes float16: checked on torch 2.13)

def test_diffusion_loss_is_float32_for_half_outputs():
    """The hybrid loss casts the network output to float32 before the log-variance / KL / NLL math, so an
    fp16 output gives the float32 loss of the same (fp16-representable) values, even far out in range."""
    diffusion = GaussianDiffusion.create(schedule="cosine", num_timesteps=1000)
    generator = torch.Generator().manual_seed(0)
    x_start, noise = randn(64, 4, generator=generator), randn(64, 4, generator=generator)
    t = torch.cat((torch.zeros(8, dtype=torch.long), torch.randint(0, 1000, (56,), generator=generator)))
    x_t = diffusion.q_sample(x_start, t, noise)
    output = (randn(64, 8, generator=generator) * 4).half()  # v far outside [-1, 1]: extreme variances
    with torch.autocast("cpu", dtype=torch.float16):
        half = diffusion.losses(output, x_start, x_t, t, noise)
    full = diffusion.losses(output.float(), x_start, x_t, t, noise)
    assert half.loss.dtype == torch.float32 and bool(torch.isfinite(half.loss).all())
    torch.testing.assert_close(half.loss, full.loss)


def test_mar_fp16_autocast_with_grad_scaler_trains_without_nan():
    torch.manual_seed(0)
    model = _mar().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu")
    labels = torch.tensor([1, 2, 3])
    losses, skipped = [], 0
    for step in range(20):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(LATENTS, labels, generator=torch.Generator().manual_seed(step))
        assert loss.dtype == torch.float32
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale  # an inf/NaN gradient halves the scale and skips the step
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert skipped <= 2 and scaler.get_scale() >= 2.0 ** 14  # the scale does not collapse
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # and the fp16 loss is the fp32 one
        half = model(LATENTS, labels, generator=torch.Generator().manual_seed(99))
    full = model(LATENTS, labels, generator=torch.Generator().manual_seed(99))
    assert half.item() == pytest.approx(full.item(), rel=2e-2)
