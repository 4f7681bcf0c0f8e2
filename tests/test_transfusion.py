import pytest
import torch
from torch import nn, randint, randn

from _helpers import assert_close_f32, perturbed
from mmgen_pytorch import Transfusion, print_modality_sample
from mmgen_pytorch.transfusion.packing import Vocabulary


def tiny(**kwargs):
    config = dict(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                  transformer=dict(dim=32, depth=2, heads=2, dim_head=16, attn_backend="sdpa"))
    config.update(kwargs)
    return Transfusion(**config)


# the four usage examples of transfusion-pytorch's README, with smaller dims, unchanged otherwise

def test_readme_one_modality():
    model = Transfusion(num_text_tokens=256, dim_latent=384, modality_default_shape=(4,),
                        transformer=dict(dim=64, depth=2))
    text_and_images = [
        [randint(0, 256, (16,)), randn(4, 384), randint(0, 256, (8,)), randn(6, 384)],
        [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), randn(2, 384), randint(0, 256, (9,))],
    ]
    loss = model(text_and_images)
    loss.backward()
    sample = model.sample(max_length=48, progress=False)
    assert all(isinstance(i, torch.Tensor) or i[1].shape[-1] == 384 for i in sample)


def test_readme_two_modalities():
    model = Transfusion(num_text_tokens=256, dim_latent=(384, 192), modality_default_shape=((4,), (2,)),
                        transformer=dict(dim=64, depth=2))
    batch = [
        [randint(0, 256, (16,)), (0, randn(4, 384)), randint(0, 256, (8,)), (1, randn(6, 192))],
        [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), (1, randn(2, 192)), randint(0, 256, (9,))],
    ]
    loss, breakdown = model(batch, return_breakdown=True)
    loss.backward()
    assert len(breakdown.flow) == 2 and all(f > 0 for f in breakdown.flow)
    model.sample(max_length=48, progress=False)


def test_readme_encoder_decoder_channel_first(capsys):
    mock_encoder = nn.Conv2d(3, 384, 3, padding=1)
    mock_decoder = nn.Conv2d(384, 3, 3, padding=1)
    model = Transfusion(num_text_tokens=12, dim_latent=384, channel_first_latent=True, modality_default_shape=(4, 4),
                        modality_encoder=mock_encoder, modality_decoder=mock_decoder, transformer=dict(dim=64, depth=2))
    batch = [
        [randint(0, 12, (16,)), randn(3, 8, 8), randint(0, 12, (8,)), randn(3, 7, 7)],
        [randint(0, 12, (16,)), randn(3, 8, 5), randint(0, 12, (5,)), randn(3, 2, 16), randint(0, 12, (9,))],
    ]
    loss = model(batch)
    loss.backward()
    assert mock_encoder.weight.grad is None  # the encoder stays frozen
    sample = model.sample(max_length=64, force_modality_at_start=0, progress=False)
    print_modality_sample(sample)
    assert "modality 0: (3, 4, 4)" in capsys.readouterr().out


def test_readme_text_only_pretraining():
    model = Transfusion(num_text_tokens=256, dim_latent=384, transformer=dict(dim=64, depth=2))
    text = torch.randint(0, 256, (2, 64))
    loss = model(text)
    loss.backward()
    sampled = model.generate_text_only(text[:, :1], 24, progress=False)
    assert sampled.shape == (2, 23) and int(sampled.max()) < 256


# sequence format and shapes

@pytest.mark.parametrize("shape", [(7,), (3, 3), (2, 10, 4), ()])
def test_shape_text_round_trip(shape):
    vocab = Vocabulary(10, 2)
    assert vocab.parse_shape(vocab.shape_ids(shape), rank=len(shape)) == shape


def test_shape_parser_rejects_invalid():
    vocab = Vocabulary(10, 1)
    ids = lambda text: [vocab.first_char + ord(c) for c in text]  # noqa: E731
    assert vocab.parse_shape(ids("3,3")) == (3, 3)
    for bad in ("3,", ",3", "3,,3", "a", "0,2", "3;3"):
        assert vocab.parse_shape(ids(bad)) is None
    assert vocab.parse_shape(ids("3,3"), rank=1) is None
    assert vocab.parse_shape([vocab.meta]) is None


def scripted_logits(model, script):
    """Make the text head emit ``script`` (then eos), whatever the input."""
    class Scripted(nn.Module):
        def __init__(self):
            super().__init__()
            self.queue = list(script)

        def forward(self, hidden):
            logits = torch.full((*hidden.shape[:-1], model.vocab.size), -1e4)
            logits[..., self.queue.pop(0) if self.queue else model.vocab.eos] = 1e4
            return logits

    model.to_text_logits = Scripted()


def test_model_emitted_shape_is_used():
    model = tiny().eval()
    vocab = model.vocab
    scripted_logits(model, [5, vocab.meta, *vocab.shape_ids((3, 1)), vocab.som(0)])
    sample = model.sample(max_length=64, cfg_scale=1.0, progress=False)
    assert [tuple(i[1].shape) for i in sample if isinstance(i, tuple)] == [(3, 1, 8)]


def test_invalid_emitted_shape_falls_back_to_default_and_fixed_shape_wins():
    model = tiny(modality_num_dim=2, fallback_to_default_shape_if_invalid=True).eval()
    vocab = model.vocab
    scripted_logits(model, [vocab.meta, *vocab.shape_ids((3,)), vocab.som(0)])  # rank 1 for a rank-2 modality
    with pytest.warns(UserWarning, match="default shape"):
        sample = model.sample(max_length=64, cfg_scale=1.0, progress=False)
    assert [tuple(i[1].shape) for i in sample if isinstance(i, tuple)] == [(2, 2, 8)]
    model.fallback_to_default_shape_if_invalid = False  # transfusion-pytorch's default: a clear error
    scripted_logits(model, [vocab.meta, *vocab.shape_ids((3,)), vocab.som(0)])
    with pytest.raises(ValueError, match="fallback_to_default_shape_if_invalid"):
        model.sample(max_length=64, cfg_scale=1.0, progress=False)
    scripted_logits(model, [vocab.meta, *vocab.shape_ids((3, 1)), vocab.som(0)])
    sample = model.sample(max_length=64, cfg_scale=1.0, fixed_modality_shape=(1, 2), progress=False)
    assert [tuple(i[1].shape) for i in sample if isinstance(i, tuple)] == [(1, 2, 8)]


def test_no_duplicate_meta_tokens_in_sampled_sequence():
    model = tiny().eval()
    vocab = model.vocab
    scripted_logits(model, [vocab.meta, *vocab.shape_ids((2, 2)), vocab.som(0), 3])
    from mmgen_pytorch.transfusion.sampler import Sampler
    sampler = Sampler(model, max_length=64, cfg_scale=1.0, progress=False)
    sampler([[]], [[]])
    fed = sampler.decoder.cache.segment_ids  # one row, all real tokens
    assert int((fed[0] == 0).sum()) == 1 + 5 + 4 + 1 + 1  # sos, meta 2 , 2 som, 4 latents, eom, 3


# losses

def test_text_after_a_modality_sees_it_clean():
    """The loss of text that follows a modality cannot depend on that modality's training noise."""
    model = tiny().eval()
    torch.manual_seed(0)
    sample = [randint(0, 32, (5,)), randn(2, 2, 8), randint(0, 32, (6,))]
    first = model([sample], return_breakdown=True, times=[[0.1]], noise=[[randn(4, 8)]])[1]
    second = model([sample], return_breakdown=True, times=[[0.9]], noise=[[randn(4, 8)]])[1]
    torch.testing.assert_close(first.text, second.text, atol=1e-6, rtol=0)
    assert not torch.allclose(first.flow[0], second.flow[0])


def test_batch_invariance_of_per_sample_losses():
    model = tiny(dim_latent=(8, 4), modality_default_shape=((2, 2), (3,))).eval()
    torch.manual_seed(1)
    samples = [
        [randint(0, 32, (5,)), randn(2, 2, 8), randint(0, 32, (3,))],
        [randint(0, 32, (9,)), (1, randn(3, 4))],
        [(1, randn(5, 4)), randint(0, 32, (2,)), randn(3, 2, 8)],
    ]
    times = [[0.3], [0.6], [0.2, 0.8]]
    noise = [[randn(4, 8)], [randn(3, 4)], [randn(5, 4), randn(6, 8)]]
    _, together = model(samples, return_breakdown=True, times=times, noise=noise)
    for i in range(3):
        _, alone = model([samples[i]], return_breakdown=True, times=[times[i]], noise=[noise[i]])
        torch.testing.assert_close(alone.text_per_sample[0], together.text_per_sample[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.flow_per_sample[0], together.flow_per_sample[i], atol=1e-5, rtol=1e-5,
                                   equal_nan=True)


@torch.no_grad()
def test_training_forward_flex_equals_sdpa():
    model = tiny(dim_latent=(8, 4), modality_default_shape=((2, 2), (3,))).eval()
    torch.manual_seed(2)
    samples = [[randint(0, 32, (5,)), randn(2, 3, 8), randint(0, 32, (3,)), (1, randn(4, 4))],
               [(1, randn(5, 4)), randint(0, 32, (2,))]]
    kwargs = dict(return_loss=False, times=[[0.3, 0.5], [0.7]], noise=[[randn(6, 8), randn(4, 4)], [randn(5, 4)]])
    sdpa_logits, sdpa_flows = model(samples, **kwargs)
    model.transformer.attn_backend = "flex"
    flex_logits, flex_flows = model(samples, **kwargs)
    assert_close_f32(flex_logits, sdpa_logits)  # flex runs compiled: fused, reordered reductions
    for a, b in zip(flex_flows, sdpa_flows):
        assert_close_f32(a, b)


def test_modality_only_and_rank_1_and_3_modalities():
    model = tiny(dim_latent=(8, 4), modality_default_shape=((2, 2, 2), (3,))).train()
    loss = model(randn(2, 2, 2, 2, 8), modality_type=0)
    loss.backward()
    out = model.generate_modality_only(2, modality_type=1, modality_steps=2, progress=False)
    assert out.shape == (2, 3, 4)


# sampling

def test_cached_sampling_equals_uncached():
    model = tiny(dim_latent=(8, 4), modality_default_shape=((2, 2), (3,))).eval()
    prompts = [[randint(0, 32, (3,))], [randint(0, 32, (6,)), randn(2, 2, 8), randint(0, 32, (2,))], None]
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        outputs.append(model.sample(prompts, max_length=40, cfg_scale=2.0, modality_steps=3, text_min_p=0.0,
                                    use_cache=use_cache, generator=generator, progress=False))
    for cached, uncached in zip(*outputs):
        assert len(cached) == len(uncached)
        for a, b in zip(cached, uncached):
            if isinstance(a, tuple):
                assert a[0] == b[0]
                torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=0)
            else:
                assert torch.equal(a, b)


def test_cached_modality_generation_equals_uncached_with_forced_modalities():
    model = tiny().eval()
    prompts = [[randint(0, 32, (4,))], [randint(0, 32, (7,))]]
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        outputs.append(model.sample(prompts, max_length=30, cfg_scale=3.0, modality_steps=4, max_modalities=1,
                                    force_modality_at_start=0, use_cache=use_cache, generator=generator,
                                    progress=False))
    for cached, uncached in zip(*outputs):
        (a,), (b,) = ([item for item in out if isinstance(item, tuple)] for out in (cached, uncached))
        assert a[0] == b[0] == 0
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=0)


def test_prefix_cached_ode_step_equals_full_recompute():
    from mmgen_pytorch.transfusion.sampler import Sampler
    model = tiny().eval()
    prompt = [[randint(0, 32, (5,))]]
    forced = [[model.vocab.meta, *model.vocab.shape_ids((2, 2)), model.vocab.som(0)]]
    cached, uncached = (Sampler(model, max_length=30, cfg_scale=2.0, use_cache=c, progress=False) for c in (True, False))
    from mmgen_pytorch.transfusion.sampler import Row
    for sampler in (cached, uncached):
        sampler.rows = [Row(items=[])]
        sampler.prefill([prompt[0]], forced, sampler.rows)
    x, t = randn(1, 4, 8), torch.tensor(0.4)
    outs = []
    for sampler in (cached, uncached):
        chunk = sampler.modality_chunk(sampler.rows, [0, 1], 0, (2, 2), 4, 2)
        outs.append(sampler.modality_forward(chunk, x.repeat(2, 1, 1), t, write=False))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    assert cached.decoder.cache.length == len(forced[0]) + 1 + 5  # the step wrote nothing


def test_overfits_two_prompt_image_pairs():
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=8, dim_latent=4, modality_default_shape=(2, 2), prob_uncond=0.0,
                        transformer=dict(dim=64, depth=2, heads=4, attn_backend="sdpa"))
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])]
    images = [torch.ones(2, 2, 4), -torch.ones(2, 2, 4)]
    images[1][0] = 1.0  # not just the negative of the first
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss = model([[p, i] for p, i in zip(prompts, images)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = model.sample([[p] for p in prompts], max_length=32, cfg_scale=1.0, modality_steps=16,
                           force_modality_at_start=0, max_modalities=1, progress=False)
    gap = (images[0] - images[1]).pow(2).mean()
    for sample, image in zip(samples, images):
        generated = sample[-1][1]
        assert (generated - image).pow(2).mean() < 0.1 * gap


# bad input

BAD_INPUTS = [
    ("float text", lambda: [[randn(5), randn(2, 2, 8)]], ValueError, "8 channels"),
    ("int modality", lambda: [[(0, randint(0, 3, (2, 2, 8)))]], ValueError, "must be a float tensor"),
    ("wrong latent dim", lambda: [[randint(0, 32, (3,)), randn(2, 2, 5)]], ValueError, "expects latents with 8 channels"),
    ("unknown modality", lambda: [[(3, randn(2, 2, 8))]], ValueError, r"modality type in \[0, 1\), got 3"),
    ("empty sample", lambda: [[]], ValueError, "is empty"),
    ("empty batch", lambda: [], ValueError, "non-empty list"),
    ("token out of range", lambda: [[torch.tensor([1, 40])]], ValueError, r"\[0, 32\)"),
    ("nan latent", lambda: [[randint(0, 32, (3,)), torch.full((2, 2, 8), float("nan"))]], ValueError, "NaN"),
    ("inf latent", lambda: [[randint(0, 32, (3,)), torch.full((2, 2, 8), float("inf"))]], ValueError, "inf"),
    ("negative token", lambda: [[torch.tensor([1, -2])]], ValueError, r"\[0, 32\).*-2"),
    ("text 2-D in a sample", lambda: [[randint(0, 32, (2, 3))]], ValueError, "1-D"),
]


@pytest.mark.parametrize("name, make, error, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, make, error, message):
    model = tiny()
    with pytest.raises(error, match=message):
        model(make())


def test_a_modality_of_unknown_rank_takes_any_grid_but_a_bare_vector():
    model = tiny(modality_default_shape=None)  # rank unknown: 1-D rotary
    model([[randint(0, 32, (3,)), randn(5, 8)]]).backward()  # a 1-D latent fits
    model([[randint(0, 32, (3,)), randn(2, 2, 8)]]).backward()  # a 2-D one is placed as a run of 4
    with pytest.raises(ValueError, match="rank is unknown.*text must be a long tensor"):
        model([[randint(0, 32, (3,)), randn(8)]])  # float "text" of length dim_latent
    model = tiny(modality_default_shape=None, modality_num_dim=2)
    model([[randint(0, 32, (3,)), randn(2, 3, 8)]]).backward()


def test_a_transformer_instance_must_have_the_modalities_rotary_axes():
    from mmgen_pytorch import Transformer
    backbone = Transformer(dim=32, depth=1, heads=2, rotary_axes=1, dim_cond=32)
    with pytest.raises(ValueError, match="`transformer`.*rotary_axes=2"):
        Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2), transformer=backbone)
    Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                transformer=Transformer(dim=32, depth=1, heads=2, rotary_axes=2, dim_cond=32))


def test_times_as_a_padded_tensor_equal_times_as_lists():
    torch.manual_seed(0)
    model = tiny(prob_uncond=0.0).eval()
    batch = [[randint(0, 32, (3,)), randn(2, 2, 8), randint(0, 32, (2,)), randn(2, 2, 8)],
             [randint(0, 32, (4,)), randn(2, 2, 8)]]
    noise = [[randn(4, 8), randn(4, 8)], [randn(4, 8)]]
    as_lists = model(batch, times=[[0.2, 0.7], [0.4]], noise=noise)
    padded = model(batch, times=torch.tensor([[0.2, 0.7], [0.4, 0.0]]), noise=noise)
    torch.testing.assert_close(padded, as_lists, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`times` as a tensor must be \[batch=2, >= 2\]"):
        model(batch, times=torch.tensor([[0.2], [0.4]]), noise=noise)


def test_prompt_longer_than_max_length_warns_and_generates_nothing_more():
    model = tiny()
    prompts = [[randint(0, 32, (2,))], [randint(0, 32, (20,))]]
    with pytest.warns(UserWarning, match=r"`prompt\[1\]` has 21 tokens .* nothing is generated after it"):
        samples = model.sample(prompts, max_length=8, progress=False)
    assert len(samples[1]) == 1 and torch.equal(samples[1][0], prompts[1][0])


def test_modality_only_needs_modality_type():
    model = tiny(dim_latent=(8, 4), modality_default_shape=((2, 2), (3,)))
    with pytest.raises(ValueError, match="modality_type"):
        model(randn(2, 2, 2, 8))


def test_dropped_text_keeps_every_structure_token():
    from mmgen_pytorch.transfusion.packing import Modality, Placement, build_training_sequence
    vocab = Vocabulary(32, 1)
    items = [randint(0, 32, (4,)), Modality(0, randn(4, 8), (2, 2)), randint(0, 32, (3,))]
    kept = build_training_sequence(items, vocab, Placement(axes=2))
    dropped = build_training_sequence(items, vocab, Placement(axes=2), drop_text=True, uncond_text="null")
    ids = lambda s: torch.cat([segment.token_ids for segment in s.segments])  # noqa: E731
    is_text = torch.cat([torch.full_like(seg.token_ids, seg.modality is None) for seg in kept.segments]).bool()
    original, null = ids(kept), ids(dropped)
    text = is_text & (original < vocab.num_text_tokens)  # the 4 + 3 caption ids; the rest is structure
    assert torch.equal(null[text], torch.full((7,), vocab.null_text))
    assert torch.equal(null[~text], original[~text])  # [sos], [meta], shape, [som], [eom], [eos], latents
    assert all(not seg.labelled for seg in dropped.segments if seg.modality is None and seg.token_ids[0] == vocab.null_text)
    empty = build_training_sequence(items, vocab, Placement(axes=2), drop_text=True, uncond_text="empty")
    assert torch.equal(ids(empty), original[~text])


def test_cfg_scale_zero_samples_the_unconditional_stream_whatever_the_prompt():
    """At cfg_scale 0 the guided prediction is the unconditional twin's alone, and the twin of any prompt
    of the same length is the same null-text row: the images must be identical."""
    torch.manual_seed(0)
    model = perturbed(tiny(prob_uncond=0.1), std=0.1).eval()  # zero-initialised gates: context-free outputs
    a, b = randint(0, 32, (5,)), randint(0, 32, (5,))

    def image(prompt, cfg_scale):
        out = model.sample([[prompt]], max_length=24, cfg_scale=cfg_scale, force_modality_at_start=0,
                           max_modalities=1, modality_steps=3, generator=torch.Generator().manual_seed(1),
                           progress=False)
        return next(item[1] for item in out[0] if isinstance(item, tuple))

    torch.testing.assert_close(image(a, 0.0), image(b, 0.0), rtol=0, atol=0)
    assert not torch.allclose(image(a, 1.0), image(b, 1.0))
