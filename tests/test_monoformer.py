"""MonoFormer: the Gaussian objective through the shared objective interface, the image layers, LLaMA
initialisation against a Hugging Face golden, CFG (empty-prompt twins, ε-only and 3-channel guidance),
cached vs uncached sampling, an overfitting run and input errors."""

import pytest
import torch
from torch import randn

from _helpers import perturbed
from mmgen_pytorch.monoformer import MonoFormer, patchify, sincos_2d, unpatchify
from mmgen_pytorch.objectives import ContinuousObjective, GaussianObjective, RectifiedFlow
from mmgen_pytorch.objectives.gaussian import space_timesteps
from mmgen_pytorch.pretrained import CheckpointMismatchError

PROMPTS = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]


def tiny(**kwargs):
    config = dict(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2, attn_backend="sdpa"),
                  latent_channels=4, latent_size=4, patch_size=2)
    config.update(kwargs)
    return MonoFormer(**config)


def assert_latents_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


# the Gaussian objective through the interface

@pytest.mark.parametrize("objective", [RectifiedFlow(), GaussianObjective()], ids=["flow", "ddpm"])
def test_both_objectives_keep_the_interface_contract(objective):
    """What Transfusion's shared machinery relies on, for either objective."""
    assert isinstance(objective, ContinuousObjective)
    x, noise = randn(5, 4), randn(5, 4)
    times = objective.sample_times(5, generator=torch.Generator().manual_seed(0))
    assert times.shape == (5,) and not (times == objective.clean_time).any()
    for t in times.tolist():
        objective.check_time(t, name="times")  # drawn times are valid training times
    clean = torch.full((5,), objective.clean_time)
    assert torch.equal(objective.noised(x, noise, clean), x)  # a clean latent enters the context as is
    assert not torch.equal(objective.noised(x, noise, times), x)
    # guidance of a doubled batch: scale 1 is the conditional half, scale 0 the unconditional one's
    # guided features
    out = randn(6, 3, objective.output_dim(4))
    guided = out.shape[-1] if isinstance(objective, RectifiedFlow) else 4
    torch.testing.assert_close(objective.guide(out, 1.0), out[:3])
    torch.testing.assert_close(objective.guide(out, 0.0)[..., :guided], out[3:, ..., :guided])


def test_gaussian_objective_noising_loss_and_time_input():
    objective = GaussianObjective(schedule="linear")
    diffusion = objective.diffusion
    x, noise = randn(6, 8), randn(6, 8)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0, -1.0, 3.0])
    x_t = objective.noised(x, noise, t)
    torch.testing.assert_close(x_t[:4], diffusion.q_sample(x[:4], t[:4].long(), noise[:4]))
    assert torch.equal(x_t[4], x[4])  # clean_time: the latent itself
    assert objective.time_embedding_input(t).tolist() == [0, 10, 500, 999, 0, 3]  # integer steps, no rescaling
    assert objective.output_dim(8) == 16
    output = randn(6, 16)
    keep = t >= 0
    per_token = objective.loss(output[keep], x[keep], noise[keep], x_t[keep], t[keep])
    expected = diffusion.losses(output[keep], x[keep], x_t[keep], t[keep].long(), noise[keep]).loss
    assert per_token.shape == (5,)
    torch.testing.assert_close(per_token, expected)


def test_uniform_timesteps_and_their_range():
    objective = GaussianObjective(num_timesteps=1000)
    t = objective.sample_times(4000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.round()) and t.float().mean().sub(499.5).abs() < 20
    for bad in (1000, -1, 2.5):
        with pytest.raises(ValueError, match="`times`"):
            objective.check_time(bad, name="`times`")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_feeds_original_timesteps_and_a_perfect_model_recovers_x0(sampler):
    objective = GaussianObjective(schedule="linear")
    alpha_bar = objective.diffusion.schedule["alphas_cumprod"].float()
    x0 = torch.rand(2, 3, 4) * 2 - 1
    fed = []

    def perfect(x_t, t):
        fed.append(int(t))
        eps = (x_t - alpha_bar[t].sqrt() * x0) / (1 - alpha_bar[t]).sqrt()
        return torch.cat((eps, torch.zeros_like(eps)), -1)  # learned variance values v = 0

    noise = randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    out = objective.generate(perfect, noise, 20, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert fed == space_timesteps(1000, 20)[::-1]
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)


def test_guidance_on_eps_only_and_the_three_channel_quirk_in_token_layout():
    """Tokens carry ε then v, each in (C, ph, pw) order: guiding "the first 3 latent channels" must act on
    exactly those channels of the unpatchified ε image."""
    cond, uncond = randn(1, 4, 32), randn(1, 4, 32)  # 4 tokens (2x2 grid) of 2 x (4 channels x 2 x 2)
    image = lambda tokens: unpatchify(tokens, (2, 2), 2)  # noqa: E731  [C, H, W]
    for features, channels in ((None, 4), (3 * 4, 3)):
        guided = GaussianObjective(guide_features=features).guide(torch.cat((cond, uncond)), 5.0)[0]
        eps, eps_c, eps_u = image(guided[:, :16]), image(cond[0, :, :16]), image(uncond[0, :, :16])
        torch.testing.assert_close(eps[:channels], eps_u[:channels] + 5.0 * (eps_c[:channels] - eps_u[:channels]))
        assert torch.equal(eps[channels:], eps_c[channels:])
        assert torch.equal(guided[:, 16:], cond[0, :, 16:])  # the variance is never guided


# image layers

def test_patchify_order_and_sincos_column_half_first():
    latent = torch.arange(4 * 4 * 6.0).reshape(4, 4, 6)
    tokens = patchify(latent, 2)
    assert tokens.shape == (6, 16)
    assert torch.equal(tokens[1], latent[:, 0:2, 2:4].flatten())  # row 0, column 1: features (C, ph, pw)
    assert torch.equal(unpatchify(tokens, (2, 3), 2), latent)
    table = sincos_2d((2, 3), 8)  # per half: [sin(p), sin(p / 100), cos(p), cos(p / 100)]
    col, row = torch.tensor(2.0), torch.tensor(1.0)
    expected = torch.stack([col.sin(), (col / 100).sin(), col.cos(), (col / 100).cos(),
                            row.sin(), (row / 100).sin(), row.cos(), (row / 100).cos()])
    torch.testing.assert_close(table[1 * 3 + 2], expected)


def test_final_layer_reads_upstream_ph_pw_c_order():
    model = tiny()
    with torch.no_grad():  # feature j of the final linear outputs j
        model.modality_layers[0].final_layer.linear.weight.zero_()
        model.modality_layers[0].final_layer.linear.bias.copy_(torch.arange(32.0))
    out = model.modality_output(torch.randn(1, 4, 32), 0, torch.arange(4), torch.full((4,), 5.0))
    # upstream unpatchify: each token's features are (ph, pw, 2C); channels [0, C) are ε, [C, 2C) variance
    raw = torch.arange(32.0).expand(4, 32).reshape(2, 2, 2, 2, 8).permute(4, 0, 2, 1, 3).reshape(8, 4, 4)
    assert torch.equal(unpatchify(out[:, :16], (2, 2), 2), raw[:4])
    assert torch.equal(unpatchify(out[:, 16:], (2, 2), 2), raw[4:])


def test_zero_initialised_input_and_injection_and_no_block_adaln():
    for injection in ("adaln_before_decoder", "token"):
        model = tiny(timestep_injection=injection)
        assert model.transformer.dim_cond is None and model.transformer.rotary.axes == 1
        assert model.modality_layers[0].x_embedder.weight.abs().max() == 0 and model.modality_layers[0].x_embedder.bias.abs().max() == 0
        last = model.time_injection.to_modulation if injection != "token" else model.time_injection.projector[2]
        assert last.weight.abs().max() == 0
        assert 0.015 < model.modality_layers[0].final_layer.linear.weight.std() < 0.025


@torch.no_grad()
def test_image_block_bidirectional_prompt_causal_and_any_number_of_images():
    model = perturbed(tiny()).eval()
    first, second = randn(4, 4, 4), randn(4, 4, 4)
    changed = second.clone()
    changed[:, 3, 3] += 1.0  # the last token of the second image
    # [sos] 1 2 3 [meta] 2,2 [som] first(9..12) [eom] 6 [meta] 2,2 [som] second(20..23) [eom] [eos] first'(26..29)
    kwargs = dict(return_loss=False, times=[[700, 500]], noise=[[randn(4, 16), randn(4, 16)]])
    logits, (outputs,) = model([[PROMPTS[0], first, torch.tensor([6]), second]], **kwargs)
    logits2, (outputs2,) = model([[PROMPTS[0], first, torch.tensor([6]), changed]], **kwargs)
    torch.testing.assert_close(logits2[0, :20], logits[0, :20])  # what precedes the image never sees it
    torch.testing.assert_close(outputs2[:4], outputs[:4])        # the first image (clean) ...
    torch.testing.assert_close(outputs2[8:], outputs[8:])        # ... and its noised copy neither
    assert not torch.allclose(outputs2[4], outputs[4])            # the first token of the image sees its last


def test_dropped_prompt_is_the_empty_prompt():
    model = perturbed(tiny()).eval()
    image, noise = randn(4, 4, 4), [[randn(4, 16)]]
    dropped = model([[PROMPTS[0], image]], return_breakdown=True, times=[[300]], noise=noise, prob_uncond=1.0)[1]
    empty = model([[torch.tensor([], dtype=torch.long), image]], return_breakdown=True, times=[[300]], noise=noise)[1]
    torch.testing.assert_close(dropped.total, empty.total)


# LLaMA initialisation (golden: a HF LlamaForCausalLM)

def golden_model(golden):
    data = golden("hf_llama.pt")
    return data, MonoFormer.from_llama(data["state_dict"], data["config"], latent_channels=4, latent_size=4,
                                       patch_size=2, attn_backend="sdpa").eval()


@torch.no_grad()
def test_from_llama_text_logits_match_hf(golden):
    data, model = golden_model(golden)
    logits, _ = model(data["inputs"]["input_ids"], return_loss=False)
    torch.testing.assert_close(logits, data["outputs"]["logits"], atol=1e-5, rtol=0)
    vocab = data["config"]["vocab_size"]
    assert not torch.equal(model.token_emb.weight[vocab:], torch.zeros_like(model.token_emb.weight[vocab:]))
    assert model.token_emb.weight[vocab:].std() < 0.05  # fresh normal(0.02) rows for the special tokens


@pytest.mark.parametrize("use_cache", [True, False])
def test_from_llama_greedy_continuation_matches_hf(golden, use_cache):
    data, model = golden_model(golden)
    greedy = data["outputs"]["greedy"]
    continuation = model.generate_text_only(greedy[:, :4], greedy.shape[1], temperature=0.0, use_cache=use_cache,
                                            progress=False)
    assert torch.equal(continuation, greedy[:, 4:])


def test_from_llama_rejects_foreign_keys(golden):
    data = golden("hf_llama.pt")
    state = dict(data["state_dict"], **{"vision_tower.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="vision_tower"):
        MonoFormer.from_llama(state, data["config"], latent_channels=4, latent_size=4, patch_size=2)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_from_llama_reads_files_and_a_config_path(golden, tmp_path, fmt):
    import json

    from safetensors.torch import save_file
    data, expected = golden_model(golden)
    weights = tmp_path / f"model.{'safetensors' if fmt == 'safetensors' else 'bin'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in data["state_dict"].items()}, weights)
    else:
        torch.save(data["state_dict"], weights)
    (tmp_path / "config.json").write_text(json.dumps(data["config"]))
    model = MonoFormer.from_llama(weights, tmp_path / "config.json", latent_channels=4, latent_size=4, patch_size=2,
                                  attn_backend="sdpa").eval()
    logits, _ = model(data["inputs"]["input_ids"], return_loss=False)
    torch.testing.assert_close(logits, data["outputs"]["logits"], atol=1e-5, rtol=0)


def test_from_llama_ties_a_missing_lm_head_and_rejects_other_sizes(golden):
    data = golden("hf_llama.pt")
    tied = {k: v for k, v in data["state_dict"].items() if k != "lm_head.weight"}
    model = MonoFormer.from_llama(tied, data["config"], latent_channels=4, latent_size=4, patch_size=2)
    vocab = data["config"]["vocab_size"]
    assert torch.equal(model.to_text_logits.weight[:vocab], tied["model.embed_tokens.weight"])
    wider = dict(data["config"], intermediate_size=data["config"]["intermediate_size"] * 2)
    with pytest.raises(CheckpointMismatchError, match="mlp|ff"):
        MonoFormer.from_llama(data["state_dict"], wider, latent_channels=4, latent_size=4, patch_size=2)


# the loss

def test_loss_is_diffusion_plus_weighted_text_and_prompts_are_not_lm_targets():
    model = perturbed(tiny(prob_uncond=0.0)).train()
    image, noise, text = randn(4, 4, 4), [[randn(4, 16)], []], torch.randint(0, 8, (7,))
    batch = [[PROMPTS[0], image], [text]]  # an image row and a text-only row
    _, parts = model(batch, return_breakdown=True, times=[[300], []], noise=noise)
    torch.testing.assert_close(parts.total, parts.flow[0] + 0.01 * parts.text)
    assert torch.isnan(parts.text_per_sample[0]) and torch.isfinite(parts.text_per_sample[1])
    torch.testing.assert_close(parts.text, parts.text_per_sample[1])  # only the text-only row is an LM target
    _, text_only = model([[text]], return_breakdown=True)
    torch.testing.assert_close(parts.text, text_only.text)

    lm_everywhere = perturbed(tiny(prob_uncond=0.0, text_loss_on_image_rows=True, text_loss_weight=0.5)).train()
    _, parts = lm_everywhere(batch, return_breakdown=True, times=[[300], []], noise=noise)
    assert torch.isfinite(parts.text_per_sample).all()
    torch.testing.assert_close(parts.total, parts.flow[0] + 0.5 * parts.text)


# sampling

@pytest.mark.parametrize("injection", ["adaln_before_decoder", "token"])
def test_cached_image_sampling_equals_uncached(injection):
    model = perturbed(tiny(timestep_injection=injection)).eval()
    out = [model.generate_images(PROMPTS, cfg_scale=3.0, steps=6, use_cache=use_cache,
                                 generator=torch.Generator().manual_seed(5)) for use_cache in (True, False)]
    assert out[0].shape == (2, 4, 4, 4)
    assert_latents_close(out[0], out[1])


def test_cfg_scale_zero_is_the_empty_prompt_and_one_is_unguided():
    """At temperature 0 only ε matters: guidance 0 must reproduce sampling from the empty prompt, which
    checks that the unconditional twin is the empty prompt with its own positions."""
    model = perturbed(tiny()).eval()

    def run(prompts, scale, **kwargs):
        return model.generate_images(prompts, cfg_scale=scale, steps=5, temperature=0.0,
                                     generator=torch.Generator().manual_seed(0), **kwargs)

    empty = run([torch.tensor([], dtype=torch.long)] * 2, 1.0)
    assert_latents_close(run(PROMPTS, 0.0), empty)
    assert_latents_close(run(PROMPTS, 0.0, use_cache=False), empty)
    unguided = run(PROMPTS, 1.0)
    assert not torch.allclose(unguided, empty) and not torch.allclose(run(PROMPTS, 3.0), unguided)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_text_is_left_out_of_the_unconditional_twin(use_cache):
    """The model writes text before its image; the empty-prompt twin skips it (padding), so at guidance 0
    the image is still the empty prompt's."""
    model = perturbed(tiny()).eval()
    vocab = model.vocab
    script = [5, vocab.meta, *vocab.shape_ids((2, 2)), vocab.som(0)]

    class Scripted(torch.nn.Module):
        def forward(self, hidden):
            logits = torch.full((*hidden.shape[:-1], vocab.size), -1e4)
            logits[..., script.pop(0) if script else vocab.eos] = 1e4
            return logits

    empty = model.generate_images([torch.tensor([], dtype=torch.long)], cfg_scale=1.0, steps=5, temperature=0.0,
                                  generator=torch.Generator().manual_seed(0))
    model.to_text_logits = Scripted()
    sample = model.sample([[PROMPTS[0]]], max_length=32, cfg_scale=0.0, text_temperature=0.0, modality_steps=5,
                          max_modalities=1, use_cache=use_cache, objective_kwargs=dict(temperature=0.0), progress=False,
                          generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(sample[1], torch.tensor([5]))
    assert_latents_close(sample[-1][1], empty[0])


def test_three_channel_guidance_quirk_changes_only_guided_sampling():
    full = perturbed(tiny()).eval()
    quirk = tiny(cfg_channels=3)
    quirk.load_state_dict(full.state_dict())
    quirk.eval()
    for scale, same in ((1.0, True), (4.0, False)):
        a, b = (m.generate_images(PROMPTS, cfg_scale=scale, steps=4, generator=torch.Generator().manual_seed(2))
                for m in (full, quirk))
        assert torch.allclose(a, b) == same
    ddim = quirk.generate_images(PROMPTS, cfg_scale=4.0, steps=4, sampler="ddim")
    assert ddim.shape == (2, 4, 4, 4) and bool(torch.isfinite(ddim).all())


def test_overfits_two_prompt_image_pairs():
    torch.manual_seed(0)
    model = tiny(prob_uncond=0.0)
    images = [torch.ones(4, 4, 4), -torch.ones(4, 4, 4)]
    images[1][0] = 1.0  # not just the negative of the first
    steps, copies = 250, 8
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    for _ in range(steps):
        count = 2 * copies  # stratified timesteps: every tenth of the chain in every batch
        times = ((torch.arange(count) + torch.rand(count)) * 1000 / count).long()
        loss = model([[p, x] for p, x in zip(PROMPTS, images)] * copies, times=[[int(t)] for t in times])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    generated = model.generate_images(PROMPTS, cfg_scale=1.0, steps=20, generator=torch.Generator().manual_seed(0))
    gap = (images[0] - images[1]).pow(2).mean()
    for sample, image in zip(generated, images):
        assert (sample - image).pow(2).mean() < 0.1 * gap


# bad input

BAD_INPUTS = [
    ("prompt too long", lambda m: m([[torch.zeros(9, dtype=torch.long), randn(4, 4, 4)]]),
     r"x\[0\]\[0\].*max_prompt_length"),
    ("wrong latent shape", lambda m: m([[PROMPTS[0], randn(4, 4, 6)]]), r"x\[0\]\[1\].*\(4, 4, 4\)"),
    ("wrong latent channels", lambda m: m(randn(2, 3, 4, 4)), r"x\[0\].*\(C, H, W\)"),
    ("timestep too large", lambda m: m([[PROMPTS[0], randn(4, 4, 4)]], times=[[1000]]), r"`times`.*\[0, 1000\)"),
    ("timestep negative", lambda m: m([[PROMPTS[0], randn(4, 4, 4)]], times=[[-1]]), r"`times`"),
    ("timestep fractional", lambda m: m([[PROMPTS[0], randn(4, 4, 4)]], times=[[2.5]]), r"`times`.*integer"),
    ("sampling prompt too long", lambda m: m.generate_images([torch.zeros(9, dtype=torch.long)]),
     r"prompts\[0\].*max_prompt_length"),
    ("sampling prompt not ids", lambda m: m.generate_images([randn(3)]), r"prompts\[0\]"),
    ("sampling steps", lambda m: m.generate_images(PROMPTS, steps=0), r"`steps`"),
]


@pytest.mark.parametrize("name, call, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(name, call, message):
    model = tiny(max_prompt_length=8)
    with pytest.raises(ValueError, match=message):
        call(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(timestep_injection="add_at_each_layer"), "timestep_injection"),
    (dict(cfg_channels=5), "cfg_channels"),
    (dict(latent_size=5), "latent_size"),
    (dict(schedule="quadratic"), "schedule"),
])
def test_bad_config_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_monoformer_equals_transfusion_built_from_the_same_pieces():
    """The composition is the whole of MonoFormer: a Transfusion given its pieces by hand has the same
    weights (same keys, same init under one seed) and the same loss and samples."""
    from mmgen_pytorch import PatchedLatents, Transfusion
    from mmgen_pytorch.transfusion import InputAdaLN

    torch.manual_seed(0)
    mono = tiny(max_prompt_length=8).eval()
    torch.manual_seed(0)
    wired = Transfusion(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2, attn_backend="sdpa"),
                        modalities=[PatchedLatents(latent_channels=4, latent_size=(4, 4), patch_size=2)],
                        time_injection=InputAdaLN(dim=32), objective=GaussianObjective(), positions="flat",
                        uncond_text="empty", text_loss="rows_without_modality", text_loss_weight=0.01,
                        max_prompt_length=8).eval()
    expected, got = mono.state_dict(), wired.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    batch = [[PROMPTS[0], randn(4, 4, 4)], [PROMPTS[1]]]
    losses = []
    for model in (mono, wired):
        torch.manual_seed(1)
        losses.append(model(batch))
    assert torch.equal(*losses)
    samples = [model.sample([[PROMPTS[0]]], max_length=16, cfg_scale=2.0, modality_steps=3,
                            force_modality_at_start=0, max_modalities=1, generator=3, progress=False)
               for model in (mono, wired)]
    assert torch.equal(samples[0][0][-1][1], samples[1][0][-1][1])


def test_patch_layers_take_flat_and_grid_positions_alike():
    from mmgen_pytorch import PatchedLatents

    layers = PatchedLatents(latent_channels=2, latent_size=(4, 6), patch_size=2).build_layers(dim=16, output_dim=8,
                                                                                              axes=2)
    values = randn(6, 8)
    rows, columns = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    grid = torch.stack((rows.flatten(), columns.flatten()), dim=1)
    assert torch.equal(layers.embed(values, grid), layers.embed(values, torch.arange(6)[:, None]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(positions="diagonal"), r"`positions` must be one of \['grid', 'flat'\].*got 'diagonal'"),
    (dict(uncond_text="none"), r"`uncond_text` must be one of \['null', 'empty'\]"),
    (dict(text_loss="some_rows"), r"`text_loss` must be one of"),
    (dict(max_prompt_length=0), r"`max_prompt_length` must be None or positive"),
    (dict(modalities=[(4, 4)]), r"`modalities` must be a non-empty list of modality records"),
    (dict(modalities=[], dim_latent=4), r"`modalities`"),
])
def test_transfusion_pieces_are_checked(kwargs, message):
    from mmgen_pytorch import Transfusion

    with pytest.raises(ValueError, match=message):
        Transfusion(num_text_tokens=8, transformer=dict(dim=32, depth=1, heads=2), **kwargs)


def test_modalities_and_per_modality_arguments_do_not_mix():
    from mmgen_pytorch import ModalitySpec, Transfusion

    with pytest.raises(ValueError, match=r"either `modalities` or the per-modality arguments.*dim_latent"):
        Transfusion(num_text_tokens=8, transformer=dict(dim=32, depth=1, heads=2), dim_latent=4,
                    modalities=[ModalitySpec(dim_latent=4)])
