"""transfusion-pytorch's sampling API on Transfusion: sample_one / sample_many, cache_kv,
init_modality_noise, structure-token prompts, the max_length_counts / keep_structure_tokens switches,
the token-id attributes, get_modality_info, and the exported list helpers."""

import pytest
import torch
from torch import nn

from mmgen_pytorch.transfusion import (ModalitySpec, Transfusion, apply_fn_modality_type, exists,
                                       filter_with_inverse, flex_attention, stack_same_shape_tensors_with_inverse)
from _helpers import reinitialised

N = 16  # text tokens


def tiny(**kwargs):
    torch.manual_seed(0)
    options = dict(num_text_tokens=N, dim_latent=8, modality_default_shape=(4,),
                   transformer=dict(dim=16, depth=1, heads=2, dim_head=8))
    options.update(kwargs)
    return reinitialised(Transfusion(**options))


def two_modalities():
    return tiny(dim_latent=(8, 6), modality_default_shape=((4,), (2, 2)))


def greedy(**kwargs):
    return dict(text_temperature=0.0, modality_steps=3, progress=False, **kwargs)


def assert_same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0] and x[1].shape == y[1].shape
            torch.testing.assert_close(x[1], y[1], rtol=1e-4, atol=1e-4 * max(1.0, x[1].abs().max().item()))
        else:
            assert torch.equal(x, y)


def forward_counter(model):
    calls = []
    model.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


# sample_one / sample_many


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sample_many_gives_sample_one_per_prompt(cfg_scale):
    model = two_modalities()
    prompts = [[torch.tensor(model.som_ids[0])], torch.randint(0, N, (3,)), None, (1, torch.randn(2, 2, 6))]
    noise = torch.randn(8, 8)
    options = greedy(init_modality_noise=noise, max_length=10, cfg_scale=cfg_scale)
    many = model.sample_many(prompts, **options)
    for prompt, sample in zip(prompts, many):
        assert_same_samples(model.sample_one(prompt, **options), sample)


def test_cached_equals_uncached():
    model = tiny()
    prompt = [torch.randint(0, N, (3,)), torch.tensor([model.som_ids[0]])]
    noise = torch.randn(4, 8)
    cached = model.sample_one(prompt, cache_kv=True, init_modality_noise=noise, **greedy(max_length=8))
    uncached = model.sample_one(prompt, cache_kv=False, init_modality_noise=noise, **greedy(max_length=8))
    assert_same_samples(cached, uncached)


def test_cache_kv_and_use_cache_must_agree():
    model = tiny()
    calls = forward_counter(model)
    with pytest.raises(ValueError, match="use_cache.*cache_kv"):
        model.sample_one(None, use_cache=True, cache_kv=False, progress=False)
    with pytest.raises(ValueError, match="use_cache.*cache_kv"):
        model.generate_text_only(torch.randint(0, N, (1, 2)), 4, use_cache=False, cache_kv=True, progress=False)
    assert not calls
    assert model.sample_one(None, use_cache=False, cache_kv=False, **greedy(max_length=2))


def test_init_modality_noise_is_the_top_left_corner_of_the_starting_noise():
    model = tiny()
    drawn = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(7))  # what seed 7 draws first
    bigger = torch.randn(6, 10)
    bigger[:4, :8] = drawn[0]
    options = greedy(force_modality_at_start=0, max_length=1, max_modalities=1)
    from_seed = model.sample_one(None, generator=7, **options)
    from_noise = model.sample_one(None, generator=1, init_modality_noise=bigger, **options)
    assert_same_samples(from_seed, from_noise)
    other = model.sample_one(None, generator=1, init_modality_noise=-bigger, **options)
    assert not torch.allclose(other[1][1], from_noise[1][1])


def test_init_modality_noise_too_small_fails_before_compute():
    model = tiny()
    calls = forward_counter(model)
    with pytest.raises(ValueError, match=r"init_modality_noise.*\(4, 8\)"):
        model.sample_one(None, force_modality_at_start=0, init_modality_noise=torch.randn(3, 8), progress=False)
    with pytest.raises(ValueError, match="init_modality_noise"):
        model.sample_one(None, init_modality_noise=torch.randn(4, 8, 1), progress=False)
    assert not calls


# prompts with structure tokens, and prompt forms


def test_structure_token_prompt_means_the_typed_prompt():
    model = two_modalities()
    text, x, y, tail = torch.randint(0, N, (3,)), torch.randn(4, 8), torch.randn(2, 2, 6), torch.randint(0, N, (2,))
    spelled = [text, torch.tensor([model.meta_id]), model.char_tokenizer("4"), torch.tensor(model.som_ids[0]), x,
               torch.tensor([model.eom_ids[0]]), tail, torch.tensor([model.meta_id]), model.char_tokenizer("2,2"),
               torch.tensor([model.som_ids[1]]), (1, y), torch.tensor([model.eom_ids[1]]), tail]
    typed = [text, x, tail, (1, y), tail]
    noise = torch.randn(4, 8)
    options = greedy(max_length=6, init_modality_noise=noise)
    assert_same_samples(model.sample_one(spelled, **options), model.sample_one(typed, **options))


def test_a_prompt_ending_in_a_modality_start_forces_that_modality():
    model = two_modalities()
    text = torch.randint(0, N, (3,))
    options = greedy(max_length=4, init_modality_noise=torch.randn(4, 8))
    header = [text, torch.tensor([model.meta_id]), model.char_tokenizer("1,3"), torch.tensor([model.som_ids[1]])]
    forced = model.sample_one([text], force_modality_at_start=(1, (1, 3)), **options)
    assert_same_samples(model.sample_one(header, **options), forced)
    assert forced[1][0] == 1 and forced[1][1].shape == (1, 3, 6)
    bare_som = model.sample_one([text, torch.tensor([model.som_ids[1]])], **options)  # the default shape
    assert_same_samples(bare_som, model.sample_one([text], force_modality_at_start=1, **options))


def test_text_prompt_forms_agree():
    model = tiny()
    ids = torch.randint(0, N, (4,))
    options = greedy(max_length=6)
    one_d = model.sample_one(ids, **options)
    assert_same_samples(model.sample_one(ids[None], **options), one_d)                      # [1, n]
    assert_same_samples(model.sample_one(list(ids.unbind()), **options), one_d)             # 0-dim parts
    assert_same_samples(model.sample_one([None, ids, None], **options), one_d)              # None parts
    assert_same_samples(model.sample_one([torch.tensor([model.sos_id]), ids], **options), one_d)  # leading [sos]


def test_zero_dim_modality_prompt():
    model = tiny(dim_latent=None, modality_default_shape=None,
                 modalities=[ModalitySpec(dim_latent=16, default_shape=(), rank=0)])
    prompt = torch.randn(16)
    sample = model.sample_one(prompt, **greedy(max_length=3))
    assert torch.equal(sample[1][1], prompt) and sample[0][-2:].tolist() == [model.meta_id, model.som_ids[0]]
    assert model.sample(prompt, **greedy(max_length=8))[0] is prompt


@pytest.mark.parametrize("prompt, where, message", [
    (lambda m: torch.randint(0, N, (2, 3)), "prompt", r"\[1, n\]"),
    (lambda m: [torch.randint(0, N, (2,)), torch.tensor([m.eom_ids[0]])], r"prompt\[1\]", "structure token"),
    (lambda m: [torch.tensor([m.meta_id]), m.char_tokenizer("4")], "prompt", r"\[meta\] shape header"),
    (lambda m: [torch.tensor([m.som_ids[0], 3])], r"prompt\[0\]", "followed by that modality"),
    (lambda m: [torch.tensor([m.meta_id]), m.char_tokenizer("5"), torch.tensor([m.som_ids[0]]),
                torch.randn(4, 8)], r"prompt\[3\]", r"spells shape \(5,\)"),
    (lambda m: [torch.tensor([m.meta_id]), m.char_tokenizer("x"), torch.tensor([m.som_ids[0]])], r"prompt\[2\]",
     "not a shape"),
    (lambda m: [torch.tensor([m.vocab.size])], r"prompt\[0\]", "token ids must be in"),
    (lambda m: [torch.tensor([m.eos_id])], r"prompt\[0\]", "not text"),
    (lambda m: "hello", "prompt", "must be None, a tensor"),
])
def test_bad_prompts_fail_before_compute(prompt, where, message):
    model = tiny()
    calls = forward_counter(model)
    with pytest.raises(ValueError, match=message) as error:
        model.sample_one(prompt(model), progress=False)
    assert f"`{where.replace(chr(92), '')}" in str(error.value)
    assert not calls


# the two switches


def test_max_length_counts_total_generates_a_requested_modality_past_the_cap_and_says_so():
    """Like Hugging Face's ``max_length``: a prompt that fills the cap gets nothing more (with a warning),
    but a modality the prompt or ``force_modality_at_start`` asks for is never dropped."""
    model = tiny()
    prompt = [torch.tensor([model.som_ids[0]])]
    with pytest.warns(UserWarning, match=r"`prompt\[0\]` and the modality it starts need .*max_length_counts"):
        sample = model.sample(prompt, max_length=4, **greedy())  # [sos] [som] + 4 latents + [eom] > 4
    assert isinstance(sample[1], tuple) and sample[1][1].shape == (4, 8)
    assert len(sample) == 2  # nothing after it
    with pytest.warns(UserWarning, match="the modality it starts"):
        forced = model.sample(None, force_modality_at_start=0, max_length=3, **greedy())
    assert len(forced) == 1 and forced[0][1].shape == (4, 8)
    text = torch.randint(0, N, (6,))
    with pytest.warns(UserWarning, match="nothing is generated after it"):
        full = model.sample([text], max_length=5, **greedy())
    assert len(full) == 1 and torch.equal(full[0], text)
    calls = forward_counter(model)
    with pytest.raises(ValueError, match="max_length_counts"):
        model.sample(None, max_length_counts="prompt", progress=False)
    assert not calls


def test_max_length_counts_generated_finishes_a_started_modality():
    model = tiny()
    prompt = [torch.tensor([model.som_ids[0]])]
    sample = model.sample(prompt, max_length=1, max_length_counts="generated", **greedy())
    assert isinstance(sample[1], tuple) and sample[1][1].shape == (4, 8)


class FavourToken(nn.Module):
    """Text logits that always favour one text token (never [eos] nor a [som])."""

    def __init__(self, token, vocab_size):
        super().__init__()
        self.token, self.vocab_size = token, vocab_size

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.token] = 1.0
        return logits


def test_max_length_counts_generated_spends_exactly_the_budget():
    model = tiny()
    model.to_text_logits = FavourToken(5, model.vocab.size)
    prompt = torch.randint(0, N, (3,))
    out = model.sample_one(prompt, max_length=7, **greedy())
    assert len(out) == 1 and out[0].tolist() == [model.sos_id, *prompt.tolist()] + [5] * 7
    total = model.sample(prompt, max_length=7, **greedy())
    assert total[0] is prompt and total[1].tolist() == [5] * 3  # [sos] + 3 prompt ids + 3 new = 7
    long_prompt = torch.randint(0, N, (20,))  # longer than max_length: fine when it counts after the prompt
    assert model.sample(long_prompt, max_length=2, max_length_counts="generated", **greedy())[1].tolist() == [5, 5]


def test_keep_structure_tokens():
    model = tiny()
    prompt = [torch.randint(0, N, (2,)), torch.randn(4, 8)]
    options = greedy(max_length=5, force_modality_at_start=0, init_modality_noise=torch.randn(4, 8))
    kept = model.sample_one(prompt, **options)
    clean = model.sample_one(prompt, keep_structure_tokens=False, **options)
    shape_4 = [model.meta_id, *model.char_tokenizer("4").tolist(), model.som_ids[0]]
    assert kept[0].tolist() == [model.sos_id, *prompt[0].tolist(), *shape_4]
    assert torch.equal(kept[1][1], prompt[1]) and kept[2].tolist()[:1 + len(shape_4)] == [model.eom_ids[0], *shape_4]
    assert kept[3][0] == 0 and torch.equal(kept[3][1], clean[2][1])  # transfusion-pytorch's samples[0][3][1]
    assert clean[0] is prompt[0] and clean[1] is prompt[1]
    assert all((part < N).all() for part in clean[3:] if not isinstance(part, tuple))


@pytest.mark.parametrize("seed", range(4))
def test_clean_text_after_the_last_modality_is_kept_even_when_empty(seed):
    """What the model writes after its last modality is one text item in both forms; in the clean form it
    holds the text ids of the kept form's item (empty when the model wrote structure ids only, e.g. a
    [meta] header cut off by max_length)."""
    torch.manual_seed(seed)
    model = Transfusion(num_text_tokens=N, dim_latent=8, modality_default_shape=(4,), transformer=dict(dim=16, depth=1))
    prime = [torch.tensor([model.som_ids[0]])]
    options = dict(max_length=16, cfg_scale=2.5, progress=False, init_modality_noise=torch.randn(4, 8))
    kept, clean = (model.sample(prime, keep_structure_tokens=keep, generator=seed, **options) for keep in (True, False))
    assert len(clean) == len(kept) == 3 and torch.equal(clean[1][1], kept[1][1])
    assert clean[2].tolist() == [i for i in kept[2].tolist() if i < N]


# token ids and modality records


def test_token_ids_and_char_tokenizer_match_the_vocabulary_the_parser_reads():
    model = two_modalities()
    vocab = model.vocab
    assert model.som_ids == [vocab.som(0), vocab.som(1)] and model.eom_ids == [vocab.eom(0), vocab.eom(1)]
    assert model.meta_id == vocab.meta and model.sos_id == N and model.eos_id == N + 1 and model.null_text_id == N + 2
    assert model.som_ids == [N + 3, N + 4] and model.eom_ids == [N + 5, N + 6] and model.meta_id == N + 7
    ids = model.char_tokenizer("3,12")
    assert ids.tolist() == [N + 8 + ord(c) for c in "3,12"] == vocab.shape_ids((3, 12))
    assert vocab.parse_shape(ids.tolist()) == (3, 12)
    with pytest.raises(ValueError, match="`text`"):
        model.char_tokenizer("é")


def test_get_modality_info():
    encoder, decoder = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)
    model = tiny(dim_latent=(8, 6), modality_default_shape=((2, 2), (3,)), channel_first_latent=(True, False),
                 modality_encoder=(encoder, None), modality_decoder=(decoder, None), add_pos_emb=(False, True))
    info = model.get_modality_info(0)
    assert info.encoder is encoder and info.decoder is decoder and info.channel_first_latent
    assert (info.dim_latent, info.default_shape, info.num_dim, info.modality_type) == (8, (2, 2), 2, 0)
    assert (info.som_id, info.eom_id) == (model.som_ids[0], model.eom_ids[0]) and not info.add_pos_emb
    assert info.latent_to_model is model.modality_layers[0].embed_latent and info.to_shape_fn("3,4") == (3, 4)
    second = model.get_modality_info(1)
    assert second.add_pos_emb and second.pos_emb_mlp is not None and second.encoder is None
    assert [i.modality_type for i in model.get_all_modality_info()] == [0, 1]
    with pytest.raises(ValueError, match="modality_type"):
        model.get_modality_info(2)


def test_generate_modality_only_names_its_own_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="fixed_modality_shape") as error:
        model.generate_modality_only(fixed_modality_shape=(0,), progress=False)
    assert "force_modality_at_start" not in str(error.value)
    with pytest.raises(ValueError, match="modality_default_shape") as error:
        tiny(modality_default_shape=None).generate_modality_only(progress=False)
    assert "force_modality_at_start" not in str(error.value)
    images = model.generate_modality_only(2, init_modality_noise=torch.randn(4, 8), modality_steps=3, progress=False)
    assert images.shape == (2, 4, 8) and torch.equal(images[0], images[1])


# exported helpers


def test_stack_same_shape_tensors_with_inverse():
    tensors = [torch.full((2,), 1.0), torch.full((3,), 2.0), torch.full((2,), 3.0)]
    stacks, inverse = stack_same_shape_tensors_with_inverse(tensors)
    assert set(stacks) == {(2,), (3,)} and stacks[(2,)].tolist() == [[1, 1], [3, 3]]
    back = inverse({shape: stack * 10 for shape, stack in stacks.items()})
    assert [t.tolist() for t in back] == [[10, 10], [20, 20, 20], [30, 30]]
    with pytest.raises(ValueError, match="inverse"):
        inverse({(2,): stacks[(2,)]})


def test_filter_with_inverse():
    kept, inverse = filter_with_inverse(lambda v: v > 2, [5, 1, 3, 0])
    assert kept == [5, 3] and inverse(["a", "b"]) == ["a", 1, "b", 0]
    with pytest.raises(ValueError, match="2 replacements"):
        inverse(["a"])


def test_apply_fn_modality_type():
    calls = []

    def double(batch):
        calls.append(tuple(batch.shape))
        return batch * 2

    text = torch.tensor([1, 2])
    samples = [[text, torch.ones(2, 3)], [(1, torch.ones(4)), (0, torch.ones(2, 3)), torch.ones(5)]]
    out = apply_fn_modality_type(double, samples)
    assert out[0][0] is text and out[0][1][0] == 0 and (out[0][1][1] == 2).all()
    assert out[1][0][0] == 1 and (out[1][0][1] == 1).all() and (out[1][1][1] == 2).all() and (out[1][2][1] == 2).all()
    assert sorted(calls) == [(1, 5), (2, 2, 3)]  # once per distinct shape, on the stacked batch
    untouched = apply_fn_modality_type(double, (1, torch.ones(3)), modality_type=1, return_untransformed=True)
    assert (untouched[1] == 2).all() and (untouched[2] == 1).all()


def test_exists_and_flex_attention_exports():
    assert exists(0) and not exists(None)
    assert flex_attention is None or callable(flex_attention)
