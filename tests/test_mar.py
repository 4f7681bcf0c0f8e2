"""MAR + DiffLoss against the official code (golden ``mar.pt``), the mask schedule, sampling
behaviour, checkpoint loading and input validation."""

import argparse

import pytest
import torch

from mmgen_pytorch.guidance import guide_both_halves, scheduled_cfg_scale
from mmgen_pytorch.mar import MAR, PRESETS, mar_base, mar_huge, mar_large, mask_schedule
from mmgen_pytorch.pretrained import CheckpointMismatchError

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def data(golden):
    return golden("mar.pt")


@pytest.fixture
def model(data):
    return MAR.from_official(data["state_dict"], config=data["config"])


def tiny(**kwargs):
    config = dict(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                  decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1, diffloss_width=32,
                  num_sampling_steps="4", diffusion_batch_mul=2)
    return MAR(**{**config, **kwargs})


# golden

def test_patchify_roundtrip_matches_official(model, data):
    tokens = model.patchify(data["inputs"]["x"])
    torch.testing.assert_close(tokens, data["outputs"]["tokens"], rtol=0, atol=0)
    torch.testing.assert_close(model.unpatchify(tokens), data["outputs"]["unpatchify_tokens"], rtol=0, atol=0)


def test_patchify_with_patches_is_channel_major():
    m = tiny(img_size=128, patch_size=2)
    latents = torch.randn(1, 4, 8, 8)
    tokens = m.patchify(latents)
    assert tokens.shape == (1, 16, 16)
    assert torch.equal(tokens[0, 1, :4], latents[0, 0, 0:2, 2:4].flatten())  # (c p q): channels slowest
    assert torch.equal(m.unpatchify(tokens), latents)


def test_encoder_decoder_condition_matches_official(model, data):
    inputs, outputs = data["inputs"], data["outputs"]
    tokens = model.patchify(inputs["x"])
    z = model.condition(tokens, inputs["mask"], model.class_emb(inputs["labels"]))
    torch.testing.assert_close(z, outputs["z_cond"], **TOL)
    z = model.condition(tokens, inputs["mask"], model.fake_latent.repeat(2, 1))
    torch.testing.assert_close(z, outputs["z_uncond"], **TOL)


def test_diffloss_head_matches_official(model, data):
    inputs, outputs = data["inputs"], data["outputs"]
    net = model.diffloss.net
    torch.testing.assert_close(net(inputs["dl_x"], inputs["dl_t"], inputs["dl_c"]), outputs["dl_net_out"], **TOL)
    losses = model.diffloss.train_diffusion.training_losses(lambda x, t: net(x, t, inputs["dl_c"]), inputs["dl_x"],
                                                            inputs["dl_t"], noise=inputs["dl_noise"])
    torch.testing.assert_close(losses.loss, outputs["dl_loss"], **TOL)

    chain = model.diffloss.gen_diffusion
    assert torch.equal(chain.timestep_map, outputs["gen_timestep_map"])
    x, c = inputs["gen_xt"], inputs["gen_c"]
    for i in range(chain.num_timesteps):
        t = torch.full((3,), i)
        prediction = chain.p_mean_variance(net(x, chain.model_timesteps(t), c), x, t)
        atol = 1e-5 + 1e-6 * outputs["gen_mean"][i].abs().max().item()
        torch.testing.assert_close(prediction.mean, outputs["gen_mean"][i], rtol=1e-5, atol=atol)
        torch.testing.assert_close(prediction.log_variance, outputs["gen_log_variance"][i], **TOL)


@pytest.mark.parametrize("seq_len", [16, 256])
@pytest.mark.parametrize("num_iter", [4, 8, 64])
def test_mask_schedule_matches_official(data, seq_len, num_iter):
    outputs, name = data["outputs"], f"L{seq_len}_N{num_iter}"
    steps = mask_schedule(seq_len, num_iter)
    assert [s.mask_len for s in steps] == outputs[f"mask_len_{name}"].tolist()
    assert [s.num_pred for s in steps] == outputs[f"num_pred_{name}"].tolist()
    scales = torch.tensor([scheduled_cfg_scale(3.0, "linear", known=seq_len - s.mask_len, total=seq_len) for s in steps], dtype=torch.float32)
    assert torch.equal(scales, outputs[f"cfg_linear_{name}"])
    assert sum(s.num_pred for s in steps) == seq_len and steps[-1].remaining == 0


def test_cfg_schedules():
    assert scheduled_cfg_scale(2.9, "constant", known=156, total=256) == 2.9
    assert scheduled_cfg_scale(3.0, "linear", known=0, total=256) == 1.0


# presets

@pytest.mark.parametrize("factory,params,keys", [(mar_base, 207_924_768, 364), (mar_large, 478_326_304, 476),
                                                 (mar_huge, 942_403_104, 604)])
def test_presets_have_upstream_sizes(factory, params, keys):
    with torch.device("meta"):
        m = factory()
    assert sum(p.numel() for p in m.parameters()) == params and len(m.state_dict()) == keys
    assert m.seq_len == 256 and m.token_dim == 16 and m.encoder_pos_embed_learned.shape[1] == 320


def test_custom_geometry():
    m = tiny(img_size=128, vae_stride=8, patch_size=2)
    assert (m.seq_h, m.seq_len, m.token_dim) == (8, 64, 16)
    assert m.diffusion_pos_embed_learned.shape == (1, 64, 32)


# training

def test_training_forward_is_seeded_and_trains_every_part():
    m = tiny(attn_dropout=0.0, proj_dropout=0.0).train()  # dropout draws from the global RNG
    for p in m.diffloss.parameters():  # the head's zero init would block every gradient upstream of it
        torch.nn.init.normal_(p, std=0.05)
    latents, labels = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3])
    loss = m(latents, labels, generator=torch.Generator().manual_seed(0))
    again = m(latents, labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() == again.item()
    loss.backward()
    for name in ("z_proj.weight", "encoder.layers.0.attn.to_qkv.weight", "decoder.layers.0.ff.proj_in.weight",
                 "diffloss.net.final_layer.linear.weight", "mask_token", "class_emb.weight"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_loss_rows_are_the_masked_tokens_of_each_sample_repeated_diffusion_batch_mul_times():
    """The head sees exactly the masked tokens (the same count in every sample: one ratio per batch; a
    different set per sample: one order each), each with its own condition, ``diffusion_batch_mul`` times."""
    model = tiny(img_size=128, diffusion_batch_mul=3).train()  # 8 x 8 = 64 tokens
    latents, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    seen = {}

    def recording(target, z, z_rows=None, generator=None):
        seen.update(target=target, z=z[z_rows], z_once=z)
        return target.sum() * 0
    model.diffloss.forward = recording
    model(latents, labels, generator=torch.Generator().manual_seed(0))
    tokens = model.patchify(latents)  # [2, 64, 4]
    target, z = seen["target"], seen["z"]
    chunks, zs = target.chunk(3), z.chunk(3)
    assert all(torch.equal(c, chunks[0]) for c in chunks) and all(torch.equal(c, zs[0]) for c in zs)
    assert torch.equal(zs[0], seen["z_once"])  # each token's condition is passed once
    match = (chunks[0][:, None, None] == tokens[None]).all(-1)  # [rows, 2, 64]
    assert (match.flatten(1).sum(1) == 1).all()  # every row is one token of one sample
    per_sample = match.any(0)  # [2, 64]: the masked positions
    count = int(per_sample[0].sum())
    assert int(per_sample[1].sum()) == count and 0.7 * 64 <= count <= 64 and target.shape[0] == 3 * 2 * count
    assert count == 64 or not torch.equal(per_sample[0], per_sample[1])


def test_diffloss_with_shared_conditions_equals_the_repeated_rows(model):
    """``z_rows`` (each condition embedded once, each distinct timestep once) gives the loss and gradients of
    the conditions repeated row by row (upstream's ``z.repeat``)."""
    torch.manual_seed(0)
    head = model.diffloss
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(5, head.net.cond_embed.in_features, requires_grad=True)
    rows = torch.tensor([0, 1, 2, 3, 4, 2, 2, 0, 4, 1, 3, 3])
    target = torch.randn(len(rows), head.in_channels)

    def loss_and_grad(**kwargs):
        z.grad = None
        loss = head(target, generator=torch.Generator().manual_seed(1), **kwargs)
        loss.backward()
        return loss.detach(), z.grad.clone()
    shared, repeated = loss_and_grad(z=z, z_rows=rows), loss_and_grad(z=z[rows])
    for ours, reference in zip(shared, repeated):
        torch.testing.assert_close(ours, reference, **TOL)
    with pytest.raises(ValueError, match="`z_rows` must be an integer tensor \\[12\\]"):
        head(target, z, z_rows=rows.float())
    with pytest.raises(ValueError, match="`z_rows` must be an integer tensor \\[12\\]"):
        head(target, z, z_rows=rows > 0)  # a mask is not a row index
    with pytest.raises(ValueError, match="`z_rows` must be"):
        head(target, z, z_rows=rows[:5])


def test_diffloss_size_is_read_off_the_weights(data):
    config = {k: v for k, v in data["config"].items() if k not in ("diffloss_d", "diffloss_w")}
    model = MAR.from_official(data["state_dict"], config=config)
    assert (model.diffloss.net.input_proj.out_features, len(model.diffloss.net.res_blocks)) == (64, 2)
    x = data["inputs"]
    z = model.condition(model.patchify(x["x"]), x["mask"], model.class_emb(x["labels"]))
    torch.testing.assert_close(z, data["outputs"]["z_cond"], **TOL)


def test_mask_ratio_is_a_truncated_normal_on_the_support():
    m = tiny(img_size=256)  # 256 tokens
    counts = torch.tensor([m.sample_num_masked(generator=torch.Generator().manual_seed(i)) for i in range(400)])
    assert counts.min() >= 180 and counts.max() <= 256  # ceil(0.7 · 256) = 180
    assert abs(counts.float().mean().item() / 256 - 0.867) < 0.02


def test_label_drop_uses_the_null_class():
    m = tiny(label_drop_prob=1.0)
    dropped = m.class_embedding(torch.tensor([1, 2]), 2, drop=True)
    assert torch.equal(dropped, m.fake_latent.expand(2, -1))
    assert torch.equal(m.class_embedding(torch.tensor([1, 2]), 2), m.class_emb.weight[[1, 2]])


# sampling

def test_sample_shapes_cfg_and_determinism():
    m = tiny().eval()
    for p in m.diffloss.parameters():  # a zero-initialised head ignores its condition, so CFG would do nothing
        torch.nn.init.normal_(p, std=0.05)
    run = lambda seed, **kw: m.sample([1, 2], num_iter=4, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                      progress=False, **kw).latents
    plain, guided = run(0), run(0, cfg_scale=3.0)
    assert plain.shape == guided.shape == (2, 4, 4, 4)
    assert torch.equal(plain, run(0)) and torch.equal(guided, run(0, cfg_scale=3.0))
    assert not torch.equal(plain, run(1)) and not torch.equal(plain, guided)
    assert run(0, cfg_scale=2.0, cfg_schedule="constant").shape == (2, 4, 4, 4)
    unconditional = m.sample(batch_size=3, num_iter=20, progress=False)  # more steps than tokens
    assert unconditional.latents.shape == (3, 4, 4, 4) and unconditional.images is None


def test_fast_sampler_equals_an_upstream_style_loop():
    """Ours: only the conditional half through the diffusion chain, orders sliced instead of
    boolean xor/nonzero. With a deterministic head both loops must give the same tokens."""
    m = tiny(num_classes=5).eval()
    for p in m.diffloss.parameters():
        torch.nn.init.normal_(p, std=0.3)
    labels, cfg, steps = torch.tensor([0, 4]), 2.5, 5
    chain = m.diffloss.gen_diffusion

    def head(z, cfg_iter):  # upstream DiffLoss.sample on the doubled batch, x_T = 0, temperature 0
        x = torch.zeros(z.shape[0], m.token_dim)
        for i in reversed(range(chain.num_timesteps)):
            t = torch.full((z.shape[0],), i)
            out = guide_both_halves(m.diffloss.net(x, chain.model_timesteps(t), z), cfg_iter, features=m.token_dim,
                                    feature_dim=1)
            x = chain.p_mean_variance(out, x, t).mean
        return x

    generator = torch.Generator().manual_seed(3)
    orders = m.random_orders(2, generator=torch.Generator().manual_seed(3))
    tokens, mask = torch.zeros(2, m.seq_len, m.token_dim), torch.ones(2, m.seq_len, dtype=torch.bool)
    embedding = torch.cat((m.class_emb(labels), m.fake_latent.expand(2, -1)))
    for k, step in enumerate(mask_schedule(m.seq_len, steps)):
        z = m.condition(torch.cat((tokens, tokens)), torch.cat((mask, mask)), embedding)
        next_mask = m.mask_from_orders(orders, step.mask_len)
        to_pred = mask if k == steps - 1 else mask ^ next_mask
        rows = torch.cat((to_pred, to_pred)).nonzero(as_tuple=True)
        sampled = head(z[rows], scheduled_cfg_scale(cfg, "linear", known=m.seq_len - step.mask_len, total=m.seq_len)).chunk(2)[0]
        tokens[to_pred.nonzero(as_tuple=True)] = sampled
        mask = next_mask

    original = m.diffloss.sample
    m.diffloss.sample = lambda z, **kw: original(z, **{**kw, "temperature": 0.0, "noise": torch.zeros(len(z), 4)})
    fast = m.sample(labels, num_iter=steps, cfg_scale=cfg, generator=generator, progress=False).latents
    expected = m.unpatchify(tokens)  # 1/√ᾱ amplifies rounding: the golden README's loop tolerance
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5 + 1e-5 * expected.abs().max().item())


# bf16 / fp16 training and sampling: tests/test_precision.py


class FakeVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :3] * self.scale, scale_factor=16)


def test_vae_decodes_outside_the_state_dict():
    m = tiny(vae=FakeVAE())
    assert not any(k.startswith("vae") or k.startswith("_vae") for k in m.state_dict())
    out = m.sample([1], num_iter=2, progress=False)
    assert out.images.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out.images, FakeVAE().decode(out.latents / 0.2325))


# bad input

def test_bad_input_names_the_argument():
    m = tiny()
    with pytest.raises(ValueError, match="class_labels"):
        m.sample([0, 10], num_iter=2, progress=False)
    with pytest.raises(ValueError, match="num_iter"):
        m.sample([0], num_iter=0, progress=False)
    with pytest.raises(ValueError, match="cfg_schedule"):
        m.sample([0], cfg_schedule="cosine", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        m.sample(progress=False)
    with pytest.raises(ValueError, match="latents"):
        m(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        m(torch.randn(2, 4, 4, 4), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="img_size"):
        tiny(img_size=72)


# checkpoints

def test_from_official_raw_wrapped_and_file(data, tmp_path):
    state, config, x = data["state_dict"], data["config"], data["inputs"]
    reference = data["outputs"]["z_cond"]
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    args = argparse.Namespace(model="mar_base", **{k: v for k, v in config.items() if k != "norm_layer"})
    wrapped = {"model": state, "model_ema": ema, "epoch": 3, "args": args}
    torch.save(wrapped, tmp_path / "checkpoint-last.pth")

    def z_of(m):
        return m.condition(m.patchify(x["x"]), x["mask"], m.class_emb(x["labels"]))

    loaded = [MAR.from_official(state, config=config),
              MAR.from_official(wrapped, config=config, use_ema=False),
              MAR.from_official(tmp_path / "checkpoint-last.pth", use_ema=False)]  # config from the pickled args
    for m in loaded:
        torch.testing.assert_close(z_of(m), reference, **TOL)
        assert (m.diffloss.net.input_proj.out_features, len(m.diffloss.net.res_blocks)) == (64, 2)  # inferred
    ema_model = MAR.from_official(tmp_path / "checkpoint-last.pth")
    assert torch.equal(ema_model.fake_latent, ema["fake_latent"])


def test_from_official_strict_keys_have_a_readable_diff(data):
    state = dict(data["state_dict"])
    state.pop("mask_token")
    state["encoder_blocks.0.ls1.gamma"] = torch.zeros(64)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): mask_token") as error:
        MAR.from_official(state, config=data["config"])
    assert "encoder.layers.0.ls1.gamma" in str(error.value) or "encoder_blocks.0.ls1.gamma" in str(error.value)
    with pytest.raises(ValueError, match="config"):
        MAR.from_official(data["state_dict"])
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        MAR.from_official(data["state_dict"], config={**data["config"], "class_num": 11})


def test_preset_names_are_accepted_as_config():
    assert set(PRESETS) == {"mar_base", "mar_large", "mar_huge"}
    with pytest.raises(ValueError, match="config"):
        MAR.from_official({}, config="mar_tiny")


def test_with_the_kl_autoencoder():
    from mmgen_pytorch.tokenizers import kl
    torch.manual_seed(0)
    vae = kl.AutoencoderKL(kl.KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1))
    m = tiny(img_size=8, vae_stride=2, vae=vae)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = m.encode(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 4, 4)
    torch.testing.assert_close(m.encode(images, sample_posterior=False), vae.encode(images).mean * 0.2325)
    assert torch.isfinite(m(latents, torch.tensor([0, 1])))
    out = m.sample([3], num_iter=2, progress=False)
    assert out.images.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out.images, vae.decode(out.latents / 0.2325))  # [-1, 1], as the VAE decodes


def test_the_latent_scale_comes_from_the_vae_unless_given():
    from mmgen_pytorch.tokenizers import KL16_LATENT_SCALE, AutoencoderKL, KLConfig
    vae = AutoencoderKL(KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.5))
    assert AutoencoderKL(KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2))).scale_factor == KL16_LATENT_SCALE == 0.2325
    assert tiny(img_size=8, vae_stride=2, vae=vae).vae_scale == 0.5
    assert tiny(img_size=8, vae_stride=2, vae=vae, vae_scale=0.1).vae_scale == 0.1
    assert tiny().vae_scale == 0.2325


# the backbone options MAR configures

def test_bidirectional_backbone_equals_a_full_block_mask():
    from mmgen_pytorch.backbone import TokenLayout, Transformer
    torch.manual_seed(0)
    full = Transformer(dim=32, depth=2, heads=2, rotary_axes=0, causal=False)
    x = torch.randn(2, 7, 32)
    layout = TokenLayout(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))
    torch.testing.assert_close(full(x), full(x, layout=layout))
    assert not torch.allclose(full(x), full(x, layout=TokenLayout.causal(2, 7)))


def test_backbone_grad_checkpointing_and_hidden_dropout():
    from mmgen_pytorch.backbone import Transformer
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=2, heads=2, ff="gelu", causal=False, ff_hidden_dropout=0.3).train()
    assert model.layers[0].ff.hidden_dropout.p == 0.3
    model.layers[0].ff.hidden_dropout.p = 0.0
    model.layers[1].ff.hidden_dropout.p = 0.0
    x = torch.randn(2, 5, 32)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    model(x).square().sum().backward()
    for a, b in zip(plain, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


def test_preset_configs_leave_the_head_size_to_the_weights():
    from mmgen_pytorch.pretrained.mar import official_config
    kwargs = official_config("mar_large", None, cls=MAR)
    assert kwargs["encoder_dim"] == 1024 and not any(k.startswith("diffloss") for k in kwargs)
    args = argparse.Namespace(model="mar_huge", diffloss_d=3, diffloss_w=512, class_num=10, vae_path="kl16.ckpt")
    kwargs = official_config(None, args, cls=MAR)
    assert (kwargs["encoder_dim"], kwargs["diffloss_depth"], kwargs["diffloss_width"], kwargs["num_classes"]) == \
        (1280, 3, 512, 10)
    assert "vae_path" not in kwargs
