"""LlamaGen against the official code's outputs (golden files), cached vs uncached generation, presets,
official checkpoint loading and bad input."""

import argparse

import pytest
import torch

from _helpers import assert_close_f32, corrupted_like_the_model, guidance_amplification, reinitialised
from mmgen_pytorch.llamagen import PRESETS, CaptionEncoder, LlamaGen, official_config
from mmgen_pytorch.pretrained import CheckpointMismatchError

ATOL = 1e-5


def official(golden, name):
    data = golden(name)
    return data, LlamaGen.from_official(data["state_dict"], config=data["config"])


def condition_kwargs(inputs):
    if "cond_idx" in inputs:
        return dict(class_labels=inputs["cond_idx"])
    return dict(caption_embeds=inputs["caption"], caption_mask=inputs["emb_mask"].bool())


def tiny(model_type="c2i", **kwargs):
    kwargs = {**dict(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, model_type=model_type, num_classes=5,
                     caption_dim=12, cls_token_num=1 if model_type == "c2i" else 6), **kwargs}
    return reinitialised(LlamaGen(**kwargs))


# golden: class-conditional


@pytest.mark.parametrize("name", ["llamagen_c2i.pt", "llamagen_t2i.pt"])
def test_golden_logits_and_loss(golden, name):
    data, model = official(golden, name)
    loss, logits = model(data["inputs"]["z"], return_logits=True, **condition_kwargs(data["inputs"]))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, data["outputs"]["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, data["outputs"]["loss"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, scale", [("llamagen_c2i.pt", 2.0), ("llamagen_t2i.pt", 3.0)])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("guided", [True, False])
def test_golden_greedy_generation_and_step_logits(golden, name, scale, use_cache, guided):
    data, model = official(golden, name)
    inputs, outputs, key = data["inputs"], data["outputs"], "cfg" if guided else "nocfg"
    condition = inputs.get("cond_idx", inputs.get("caption"))
    mask = {"caption_mask": inputs["emb_mask"]} if "emb_mask" in inputs else {}
    codes, step_logits = model.generate(condition, cfg_scale=scale if guided else 1.0, greedy=True, progress=False,
                                        use_cache=use_cache, return_logits=True, **mask)
    assert codes.shape == (condition.shape[0], 4, 4)
    assert torch.equal(codes.flatten(1), outputs[f"greedy_{key}"].long())
    torch.testing.assert_close(step_logits, outputs[f"step_logits_{key}"], atol=ATOL, rtol=0)


def test_golden_rope_table(golden):
    data, model = official(golden, "llamagen_t2i.pt")
    from mmgen_pytorch.backbone import llamagen_positions
    positions, zero = llamagen_positions(model.grid_size, model.cls_token_num)
    torch.testing.assert_close(model.backbone.rotary(positions, zero).pairs()[0], data["outputs"]["freqs_cis"],
                               atol=ATOL, rtol=0)


# golden: caption padding


def test_t2i_padding_layout_is_the_upstream_training_mask(golden):
    data = golden("llamagen_t2i.pt")
    mask = data["inputs"]["train_attn_mask"]
    layout = LlamaGen._layout(data["inputs"]["emb_mask"].bool(), mask.shape[-1])
    assert torch.equal(layout.dense_mask(), mask)


def test_t2i_short_caption_is_left_padded(golden):
    data, model = official(golden, "llamagen_t2i.pt")
    inputs = data["inputs"]
    valid = int(inputs["emb_mask"][0].sum())
    logits = model(inputs["z"][:1], caption_embeds=inputs["caption"][:1, -valid:], return_logits=True)[1]
    torch.testing.assert_close(logits, data["outputs"]["logits"][:1], atol=ATOL, rtol=0)


def test_t2i_right_padding_is_moved_to_the_left():
    """The last prefix token predicts the first image token, so padding must come first; a right-padded
    caption is left-aligned (valid tokens keep their order) and gives the same result."""
    model = tiny("t2i")
    caption, codes = torch.randn(1, 4, 12), torch.randint(0, 24, (1, 9))
    left = model(codes, caption_embeds=torch.cat((torch.zeros(1, 2, 12), caption), 1),
                 caption_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]), return_logits=True)[1]
    right = model(codes, caption_embeds=torch.cat((caption, torch.full((1, 2, 12), float("nan"))), 1),
                  caption_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]), return_logits=True)[1]
    torch.testing.assert_close(left, right, atol=ATOL, rtol=0)


# generation


@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_cached_generation_equals_uncached(model_type):
    model = tiny(model_type)
    condition = torch.tensor([1, 4]) if model_type == "c2i" else torch.randn(2, 5, 12)
    mask = {} if model_type == "c2i" else {"caption_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    runs = []
    for use_cache in (True, False):
        runs.append(model.generate(condition, cfg_scale=3.0, temperature=1.3, top_k=12, top_p=0.95, progress=False,
                                   generator=torch.Generator().manual_seed(7), use_cache=use_cache,
                                   return_logits=True, **mask))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_close_f32(runs[0][1], runs[1][1], amplification=guidance_amplification(3.0))


@pytest.mark.parametrize("cfg_interval", [-1, 1])
def test_step_logits_are_the_guided_teacher_forced_logits(cfg_interval):
    model, labels, scale = tiny("c2i"), torch.tensor([0, 3, 2]), 2.5
    codes, steps = model.generate(labels, cfg_scale=scale, cfg_interval=cfg_interval, greedy=True, progress=False,
                                  return_logits=True)
    cond = model(codes, class_labels=labels, return_logits=True)[1]
    uncond = model(codes, class_labels=labels, cond_drop_prob=1.0, return_logits=True)[1]
    guided = uncond + (cond - uncond) * scale
    expected = guided if cfg_interval < 0 else torch.cat((guided[:, :cfg_interval + 2], cond[:, cfg_interval + 2:]), 1)
    assert_close_f32(steps, expected, amplification=guidance_amplification(scale))
    assert torch.equal(codes.flatten(1), steps.argmax(-1))


def test_generation_modes_progress_and_guidance_zero_is_the_null_class():
    model = tiny("c2i", class_dropout_prob=0.1).train()
    assert model.generate([1, 2], max_new_tokens=4, progress=True).shape == (2, 4)
    assert model.training  # restored after generating in eval mode
    codes = model.generate(torch.tensor([0, 3]), cfg_scale=0.0, greedy=True, progress=False)
    assert codes.shape == (2, 3, 3) and codes.dtype == torch.long
    # at scale 0 only the null-class stream counts: every label gives the same codes, and they are the
    # argmax of the teacher-forced null-class logits (an independent, uncached reference)
    assert torch.equal(codes[0], codes[1])
    with torch.no_grad():
        _, logits = model.eval()(codes, class_labels=torch.tensor([0, 3]), cond_drop_prob=1.0, return_logits=True)
    assert torch.equal(codes.flatten(1), logits.argmax(-1))


def test_condition_dropout_uses_the_null_class():
    model, codes = tiny("c2i"), torch.randint(0, 24, (2, 9))
    a = model(codes, class_labels=torch.tensor([0, 1]), cond_drop_prob=1.0)
    b = model(codes, class_labels=torch.tensor([4, 2]), cond_drop_prob=1.0)
    assert torch.equal(a, b) and not torch.equal(a, model(codes, class_labels=torch.tensor([4, 2])))


def test_input_corruption_swaps_inputs_but_not_targets():
    """Training mode: the logits are those of the clean model fed the corrupted sequence, and the loss
    is their cross-entropy against the TRUE codes. Eval mode: no corruption."""
    model, labels, codes = tiny("c2i", input_corruption=0.5), torch.tensor([1, 3]), torch.randint(0, 24, (2, 9))
    torch.manual_seed(7)
    loss, logits = model.train()(codes, class_labels=labels, cond_drop_prob=0.0, return_logits=True)
    corrupted, swap = corrupted_like_the_model(codes, 0.5, 24, seed=7)
    assert swap.any() and not swap.all() and not torch.equal(corrupted, codes[:, :-1])
    reference = model.eval()(torch.cat((corrupted, codes[:, -1:]), dim=1), class_labels=labels, return_logits=True)[1]
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(reference.flatten(0, 1), codes.flatten()),
                               atol=1e-6, rtol=0)
    clean = tiny("c2i")
    clean.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(codes, class_labels=labels), clean.eval()(codes, class_labels=labels))
    with pytest.raises(ValueError, match=r"`input_corruption` must be in \[0, 1\), got 1.0"):
        tiny("c2i", input_corruption=1.0)


def test_sample_decodes_through_the_tokenizer():
    class Tokenizer:
        def decode_code(self, codes):
            assert codes.shape == (2, 3, 3)
            return (codes.float() / 23 * 4 - 2)[:, None].repeat(1, 3, 2, 2)  # partly outside [-1, 1]

    model = tiny("c2i", tokenizer=Tokenizer())
    images = model.sample([1, 2], cfg_scale=2.0, progress=False)
    assert images.shape == (2, 3, 6, 6) and images.min() >= 0 and images.max() <= 1
    assert "tokenizer" not in str(list(model.state_dict()))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny("c2i").sample([1])


def test_sample_with_the_official_vq_tokenizer(golden):
    from mmgen_pytorch.tokenizers import VQVAE

    vq_data = golden("llamagen_vq.pt")
    tokenizer = VQVAE.from_official(vq_data["state_dict"], config=vq_data["config"]).eval()
    data = golden("llamagen_c2i.pt")
    model = LlamaGen.from_official(data["state_dict"], config=data["config"], tokenizer=tokenizer)
    labels = data["inputs"]["cond_idx"]
    images = model.sample(labels, cfg_scale=2.0, greedy=True, progress=False)
    codes = data["outputs"]["greedy_cfg"].long().view(3, 4, 4)
    with torch.no_grad():
        expected = ((tokenizer.decode_code(codes) + 1) / 2).clamp(0, 1)
    assert images.shape == (3, 3, 8, 8)
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_caption_encoder_trains_end_to_end():
    encoder = CaptionEncoder(num_tokens=50, dim=16, depth=1, heads=2, max_seq_len=8)
    model = tiny("t2i", caption_dim=None, caption_encoder=encoder).train()
    ids = torch.tensor([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7]])  # 0 = padding
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.randint(0, 24, (2, 3, 3)), caption_ids=ids)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and any("attn_layers" in k for k in changed)
    assert model.generate(ids, cfg_scale=2.0, max_new_tokens=2, progress=False).shape == (2, 2)


# presets

PARAMS = {"GPT-B": 110_888_448, "GPT-L": 342_910_976, "GPT-XL": 774_699_520, "GPT-XXL": 1_410_972_672,
          "GPT-XXXL": 3_893_027_840, "GPT-1B": 1_199_616_000, "GPT-3B": 3_096_659_200, "GPT-7B": 6_614_589_440}


def test_preset_parameter_counts():
    assert set(PARAMS) == set(PRESETS)
    for name, count in PARAMS.items():
        with torch.device("meta"):
            model = LlamaGen.from_preset(name)
        assert sum(p.numel() for p in model.parameters()) == count, name
    with torch.device("meta"):
        t2i = LlamaGen.from_preset("GPT-XL", model_type="t2i")
    assert sum(p.numel() for p in t2i.parameters()) == 777_678_080
    assert t2i.cls_token_num == 120 and t2i.prefix_embed.uncond_embedding.shape == (120, 2048)
    assert model.backbone.dim_head == 128 and len(model.official_state_dict()) == 2 + 7 * 32 + 2


def test_gpt_3b_has_head_dim_100():
    with torch.device("meta"):
        model = LlamaGen.from_preset("GPT-3B")
    assert model.backbone.dim_head == 100 and model.backbone.rotary.inv_freq.shape == (25,)


# official checkpoints


def test_official_wrappers_files_and_round_trip(golden, tmp_path):
    data, reference = official(golden, "llamagen_c2i.pt")
    state, config = data["state_dict"], data["config"]
    inputs = dict(codes=data["inputs"]["z"], class_labels=data["inputs"]["cond_idx"])
    expected = reference(**inputs)
    for checkpoint in (state, {"model": state}, {"module": state}, {"state_dict": state}, {"ema": state},
                       {**state, "freqs_cis": torch.zeros(17, 8, 2)}, reference.official_state_dict()):
        assert torch.equal(LlamaGen.from_official(checkpoint, config=config)(**inputs), expected)
    path = tmp_path / "c2i.pt"
    torch.save({"model": {k: v * 0 for k, v in state.items()}, "ema": state, "steps": 1,
                "args": argparse.Namespace(gpt_model=None, vocab_size=64, image_size=64, downsample_size=16)}, path)
    model = LlamaGen.from_official(path, config={k: v for k, v in config.items() if k != "block_size"}, use_ema=True)
    assert not model.training and torch.equal(model(**inputs), expected)


def test_official_config_by_preset_name_and_gqa():
    kwargs = official_config("GPT-L", argparse.Namespace(gpt_type="t2i", image_size=384, downsample_size=16))
    assert (kwargs["dim"], kwargs["depth"], kwargs["heads"], kwargs["grid_size"]) == (1024, 24, 16, 24)
    assert kwargs["model_type"] == "t2i" and kwargs["cls_token_num"] == 120 and kwargs["token_dropout"] == 0.1
    gqa = tiny("c2i", kv_heads=1)
    config = dict(dim=32, n_layer=2, n_head=2, n_kv_head=1, vocab_size=24, num_classes=5, block_size=9)
    codes, labels = torch.randint(0, 24, (2, 9)), torch.tensor([1, 2])
    again = LlamaGen.from_official(gqa.official_state_dict(), config=config)
    assert torch.equal(again(codes, class_labels=labels), gqa(codes, class_labels=labels))


def test_checkpoint_of_another_size_names_the_keys(golden):
    data = golden("llamagen_c2i.pt")
    config = {**data["config"], "dim": 96}
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape.*tok_embeddings\.weight"):
        LlamaGen.from_official(data["state_dict"], config=config)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(7\).*layers\.2\.attention\.wqkv"):
        LlamaGen.from_official(data["state_dict"], config={**data["config"], "n_layer": 3})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*cls_embedding\.embedding_table"):
        LlamaGen.from_official(data["state_dict"], config={**data["config"], "model_type": "t2i", "cls_token_num": 1})


def test_grid_mismatch_is_an_error_not_a_silent_reload(golden):
    data = golden("llamagen_c2i.pt")
    with pytest.raises(ValueError, match="block_size.*image_size"):
        LlamaGen.from_official(data["state_dict"], config={**data["config"], "image_size": 96, "downsample_size": 16})
    trained_at_384 = {"model": data["state_dict"], "args": argparse.Namespace(image_size=384, downsample_size=16)}
    with pytest.raises(ValueError, match="576"):
        LlamaGen.from_official(trained_at_384, config={**data["config"], "block_size": 256})
    without_grid = {k: v for k, v in data["config"].items() if k != "block_size"}
    with pytest.raises(ValueError, match="block_size"):
        LlamaGen.from_official(data["state_dict"], config=without_grid)
    with pytest.raises(ValueError, match="square"):
        LlamaGen.from_official(data["state_dict"], config={**data["config"], "block_size": 15})


def test_bad_config_and_checkpoint_arguments(golden):
    data = golden("llamagen_c2i.pt")
    with pytest.raises(ValueError, match="unknown fields.*'layers'"):
        LlamaGen.from_official(data["state_dict"], config={**data["config"], "layers": 2})
    with pytest.raises(ValueError, match="use_ema"):
        LlamaGen.from_official({"model": data["state_dict"]}, config=data["config"], use_ema=True)
    with pytest.raises(ValueError, match="gpt_model GPT-B has dim=768"):
        LlamaGen.from_official(data["state_dict"], config={**data["config"], "gpt_model": "GPT-B"})
    with pytest.raises(ValueError, match="`name` must be one of"):
        LlamaGen.from_preset("GPT-S")
    with pytest.raises(ValueError, match="fixes dim"):
        LlamaGen.from_preset("GPT-B", dim=64)


# bad input


def test_bad_inputs_name_the_argument():
    c2i, t2i = tiny("c2i"), tiny("t2i")
    codes = torch.randint(0, 24, (2, 9))
    with pytest.raises(ValueError, match=r"`class_labels` must be in \[0, 5\).*\[1, 5\]"):
        c2i(codes, class_labels=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="class_labels"):
        c2i.generate(torch.tensor([-1]), progress=False)
    with pytest.raises(ValueError, match=r"`codes` must be token ids in \[0, 24\) \(vocab_size\)"):
        c2i(codes + 20, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"`codes` \[b, h, w\] must be \[b, 3, 3\]"):
        c2i(codes.view(2, 1, 9), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="`codes` must be an integer tensor"):
        c2i(codes.float(), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="`caption_embeds` must have width caption_dim=12, got 7"):
        t2i(codes, caption_embeds=torch.randn(2, 6, 7))
    with pytest.raises(ValueError, match=r"1\.\.6 tokens"):
        t2i(codes, caption_embeds=torch.randn(2, 7, 12))
    with pytest.raises(ValueError, match="not on `class_labels`"):
        t2i(codes, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="caption_ids.*caption_encoder"):
        t2i(codes, caption_ids=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        c2i.generate([1], max_new_tokens=10, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        c2i.generate([1], top_p=0.0, progress=False)
    no_null = tiny("c2i", class_dropout_prob=0.0)
    assert no_null.prefix_embed.table.num_embeddings == 5
    with pytest.raises(ValueError, match="class_dropout_prob"):
        no_null.generate([1], cfg_scale=2.0, progress=False)
