"""DnD-Transformer against the official code's outputs (golden file), the depth-head injection rule,
cached vs uncached generation, presets, strict official checkpoint loading and bad input."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_close_f32, corrupted_like_the_model, guidance_amplification, reinitialised
from mmgen_pytorch.code_heads import DepthHeads
from mmgen_pytorch.dnd import ARXIV_HEAD_POSITIONS, PRESETS, DnDTransformer, official_config_dnd
from mmgen_pytorch.llamagen import LlamaGen
from mmgen_pytorch.pretrained import CheckpointMismatchError

ATOL = 1e-5


def official(golden):
    data = golden("dnd.pt")
    return data, DnDTransformer.from_official(data["state_dict"], config=data["config"])


def tiny(**kwargs):
    """Three depths, a head that is not after the last block, blocks after the last head, two class tokens."""
    kwargs = {**dict(dim=32, depth=5, heads=2, head_positions=(0, 2, 3), vocab_size=24, grid_size=3,
                     num_classes=5, cls_token_num=2), **kwargs}
    return reinitialised(DnDTransformer(**kwargs))


# golden


def test_golden_per_depth_logits_and_loss(golden):
    data, model = official(golden)
    inputs, outputs = data["inputs"], data["outputs"]
    loss, logits = model(inputs["codes"], class_labels=inputs["cond_idx"], return_logits=True)
    assert logits.shape == (3, 16, 2, 64) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.transpose(1, 2), outputs["logits"], atol=ATOL, rtol=0)  # upstream: [b, D, n, V]
    torch.testing.assert_close(loss, outputs["loss"], atol=ATOL, rtol=0)
    grid = model(inputs["codes"].view(3, 4, 4, 2), class_labels=inputs["cond_idx"])
    torch.testing.assert_close(grid, loss, atol=0, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("guided", [True, False])
def test_golden_greedy_generation(golden, use_cache, guided):
    data, model = official(golden)
    labels = data["inputs"]["cond_idx"]
    codes = model.generate(labels, cfg_scale=2.0 if guided else 1.0, greedy=True, progress=False, use_cache=use_cache)
    assert codes.shape == (3, 4, 4, 2) and codes.dtype == torch.long
    assert torch.equal(codes.flatten(1, 2), data["outputs"]["greedy_cfg" if guided else "greedy_nocfg"])


def test_sample_with_the_official_rqvae(golden):
    from mmgen_pytorch.tokenizers import RQVAE

    rq_data = golden("dnd_rqvae.pt")
    tokenizer = RQVAE.from_official(rq_data["state_dict"], config=rq_data["config"]).eval()
    data = golden("dnd.pt")
    model = DnDTransformer.from_official(data["state_dict"], config=data["config"], tokenizer=tokenizer)
    images = model.sample(data["inputs"]["cond_idx"], cfg_scale=2.0, greedy=True, progress=False)
    with torch.no_grad():
        expected = (tokenizer.decode_code(data["outputs"]["greedy_cfg"].view(3, 4, 4, 2)) + 1) / 2
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, expected.clamp(0, 1), atol=1e-6, rtol=0)
    assert "tokenizer" not in str(list(model.state_dict()))


def test_one_head_after_the_last_block_is_llamagen(golden):
    """D = 1 with the head after the last block is LlamaGen: its golden weights, renamed, give its outputs."""
    data = golden("llamagen_c2i.pt")
    rename = {"norm.weight": "norm.0.weight", "output.weight": "output.0.weight"}
    state = {rename.get(k, k): v for k, v in data["state_dict"].items()}
    config = {**data["config"], "num_pred_heads": 1, "pred_head_positions": [data["config"]["n_layer"] - 1]}
    model = DnDTransformer.from_official(state, config=config)
    z, labels = data["inputs"]["z"], data["inputs"]["cond_idx"]
    loss, logits = model(z[..., None], class_labels=labels, return_logits=True)
    torch.testing.assert_close(logits[:, :, 0], data["outputs"]["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, data["outputs"]["loss"], atol=ATOL, rtol=0)
    codes = model.generate(labels, cfg_scale=2.0, greedy=True, progress=False)
    assert torch.equal(codes.view(3, 16), data["outputs"]["greedy_cfg"].long())


# the depth heads


def test_injection_rule_depth_k_code_of_the_predicted_position():
    """The depth-1 prediction for position t sees the depth-0 code of position t (injected after head 0);
    head 0 does not, and no earlier position does."""
    model = tiny(head_positions=(1, 3))
    labels, codes = torch.tensor([1, 3]), torch.randint(0, 24, (2, 9, 2))
    changed = codes.clone()
    changed[:, 4, 0] = (codes[:, 4, 0] + 1) % 24
    before = model(codes, class_labels=labels, return_logits=True)[1]
    after = model(changed, class_labels=labels, return_logits=True)[1]
    torch.testing.assert_close(after[:, :5, 0], before[:, :5, 0], atol=0, rtol=0)
    torch.testing.assert_close(after[:, :4, 1], before[:, :4, 1], atol=0, rtol=0)
    assert (after[:, 4, 1] - before[:, 4, 1]).abs().amax() > 1e-3


def test_llamagen_with_depth_heads_is_dnd():
    """The depth heads are a part LlamaGen takes: the same weights give DnD's outputs bit for bit."""
    model = tiny()
    heads = DepthHeads(dim=32, vocab_size=24, head_positions=(0, 2, 3))
    generic = LlamaGen(dim=32, depth=5, heads=2, vocab_size=24, grid_size=3, num_classes=5, cls_token_num=2,
                       code_heads=heads)
    generic.load_state_dict(model.state_dict())
    labels, codes = torch.tensor([1, 3]), torch.randint(0, 24, (2, 3, 3, 3))
    for a, b in zip(model(codes, class_labels=labels, return_logits=True),
                    generic.eval()(codes, class_labels=labels, return_logits=True)):
        assert torch.equal(a, b)
    kwargs = dict(cfg_scale=2.0, top_k=10, generator=3, progress=False, return_logits=True)
    for a, b in zip(model.generate(labels, **kwargs), generic.generate(labels, **kwargs)):
        assert torch.equal(a, b)
    assert "head_positions=(0, 2, 3)" in generic._summary() and generic.backbone.norm.__class__.__name__ == "Identity"


def test_code_heads_must_fit_the_model():
    for heads, message in ((DepthHeads(dim=16, vocab_size=24, head_positions=(0,)), "read width 16 .* dim=32"),
                           (DepthHeads(dim=32, vocab_size=12, head_positions=(0,)), "predict 12 codes.* vocab_size=24"),
                           (DepthHeads(dim=32, vocab_size=24, head_positions=(0, 5)), r"`head_positions`.*\[0, 5\)"),
                           (torch.nn.Linear(32, 24), "`code_heads` must be a CodeHeads module")):
        with pytest.raises(ValueError, match=message):
            LlamaGen(dim=32, depth=5, heads=2, vocab_size=24, grid_size=3, num_classes=5, code_heads=heads)


def test_loss_is_the_mean_over_depths():
    model, labels, codes = tiny(), torch.tensor([0, 4]), torch.randint(0, 24, (2, 3, 3, 3))
    loss, logits = model(codes, class_labels=labels, return_logits=True)
    flat = codes.flatten(1, 2)
    per_depth = [F.cross_entropy(logits[:, :, k].flatten(0, 1), flat[..., k].flatten()) for k in range(3)]
    assert_close_f32(loss, torch.stack(per_depth).mean())


def test_training_step_reaches_every_head_and_the_shared_table():
    model = tiny().train()
    loss = model(torch.randint(0, 24, (2, 3, 3, 3)), class_labels=torch.tensor([1, 2]))
    loss.backward()
    for name in ("token_embed.weight", "code_heads.depths.0.to_logits.weight", "code_heads.depths.2.norm.weight",
                 "backbone.layers.3.attn.to_qkv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.get_parameter("backbone.layers.4.attn.to_qkv.weight").grad is None  # after the last head: unused


def test_input_corruption_swaps_whole_input_positions_not_targets_or_injected_codes():
    """Head 0 reads the stream before any code is injected, so its logits are the clean model's on the
    corrupted sequence (all D codes of a swapped position replaced). The deeper heads get the TRUE codes
    of every position injected (also at earlier, swapped positions, which no eval-mode sequence can
    express): they are the teacher-forced pass on the corrupted inputs with the true codes injected.
    The loss is against the true codes; eval mode is clean."""
    model, labels, codes = tiny(input_corruption=0.5), torch.tensor([1, 3]), torch.randint(0, 24, (2, 9, 3))
    torch.manual_seed(3)
    loss, logits = model.train()(codes, class_labels=labels, cond_drop_prob=0.0, return_logits=True)
    corrupted, swap = corrupted_like_the_model(codes, 0.5, 24, seed=3)
    assert swap.any() and not swap.all()
    model.eval()
    reference = model(torch.cat((corrupted, codes[:, -1:]), dim=1), class_labels=labels, return_logits=True)[1]
    torch.testing.assert_close(logits[:, :, 0], reference[:, :, 0], atol=1e-6, rtol=0)
    prefix, _ = model._prefix(2, None, class_labels=labels)
    inputs = torch.cat((prefix, model.code_heads.embed_codes(corrupted, model.token_embed)), dim=1)
    teacher_forced = model.code_heads.teacher_forced_logits(
        lambda block_hook: model._transformer(inputs, block_hook=block_hook), codes, model.token_embed)
    torch.testing.assert_close(logits, teacher_forced, atol=1e-6, rtol=0)
    assert (logits[:, :, 1:] - reference[:, :, 1:]).abs().amax() > 1e-4  # the true injections matter
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 2), codes.flatten()), atol=1e-6, rtol=0)
    clean = tiny()
    clean.load_state_dict(model.state_dict())
    assert torch.equal(model(codes, class_labels=labels), clean.eval()(codes, class_labels=labels))


def test_condition_dropout_uses_the_null_class():
    model, codes = tiny(), torch.randint(0, 24, (2, 9, 3))
    a = model(codes, class_labels=torch.tensor([0, 1]), cond_drop_prob=1.0)
    b = model(codes, class_labels=torch.tensor([4, 2]), cond_drop_prob=1.0)
    assert torch.equal(a, b) and not torch.equal(a, model(codes, class_labels=torch.tensor([4, 2])))


# generation


def test_cached_generation_equals_uncached():
    model, labels = tiny(), torch.tensor([1, 4])
    runs = [model.generate(labels, cfg_scale=3.0, temperature=1.3, top_k=12, top_p=0.95, progress=False,
                           generator=torch.Generator().manual_seed(7), use_cache=use_cache, return_logits=True)
            for use_cache in (True, False)]
    assert runs[0][0].shape == (2, 3, 3, 3) and runs[0][1].shape == (2, 9, 3, 24)
    assert torch.equal(runs[0][0], runs[1][0])
    assert_close_f32(runs[0][1], runs[1][1], amplification=guidance_amplification(3.0))


@pytest.mark.parametrize("use_cache", [True, False])
def test_step_logits_are_the_guided_teacher_forced_logits(use_cache):
    """Every head's guided logits in generation equal the teacher-forced forward on the generated codes,
    so the sampled code was injected into both CFG halves exactly as the ground truth is in training."""
    model, labels, scale = tiny(), torch.tensor([0, 3, 2]), 2.5
    codes, steps = model.generate(labels, cfg_scale=scale, greedy=True, progress=False, use_cache=use_cache,
                                  return_logits=True)
    cond = model(codes, class_labels=labels, return_logits=True)[1]
    uncond = model(codes, class_labels=labels, cond_drop_prob=1.0, return_logits=True)[1]
    assert_close_f32(steps, uncond + (cond - uncond) * scale, amplification=guidance_amplification(scale))
    assert torch.equal(codes.flatten(1, 2), steps.argmax(-1))


def test_generation_shapes_modes_and_progress():
    model = tiny().train()
    partial = model.generate([1, 2], max_new_tokens=4, progress=True)
    assert partial.shape == (2, 4, 3) and model.training  # restored after generating in eval mode
    codes = model.generate(torch.tensor([0]), cfg_scale=0.0, greedy=True, progress=False)
    assert codes.shape == (1, 3, 3, 3) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 24
    sampled = [model.generate([3], top_k=5, generator=torch.Generator().manual_seed(1), progress=False)
               for _ in range(2)]
    assert torch.equal(*sampled)


def test_sample_needs_a_tokenizer_of_the_same_depth():
    class Tokenizer:
        depth = 3

        def decode_code(self, codes):
            assert codes.shape == (2, 3, 3, 3)
            return (codes.float().sum(-1) / 69 * 4 - 2)[:, None].repeat(1, 3, 2, 2)  # partly outside [-1, 1]

    images = tiny(tokenizer=Tokenizer()).sample([1, 2], cfg_scale=2.0, progress=False)
    assert images.shape == (2, 3, 6, 6) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="tokenizer"):
        tiny().sample([1])
    Tokenizer.depth = 2
    with pytest.raises(ValueError, match="`tokenizer` quantizes 2 depths but the model predicts 3"):
        tiny(tokenizer=Tokenizer())


# presets

PARAMS = {"GPT-XXL": 1_436_140_032, "GPT-XXXL": 2_569_164_800}  # dnd.md, = the released fp32 file sizes


def test_preset_parameter_counts_and_head_positions():
    assert set(PARAMS) == set(PRESETS)
    for name, count in PARAMS.items():
        with torch.device("meta"):
            model = DnDTransformer.from_preset(name)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert model.head_positions == (39, 47) and model.backbone.depth == 48
    assert model.backbone.layers[0].ff.proj_out.in_features == 5632 and model.backbone.dim_head == 64
    assert len(model.official_state_dict()) == 2 + 7 * 48 + 2 * 2
    with torch.device("meta"):
        arxiv = DnDTransformer.from_preset("GPT-XXL", head_positions=ARXIV_HEAD_POSITIONS, num_classes=1)
    assert arxiv.code_depth == 8 and arxiv.backbone.layers[0].ff.proj_out.in_features == 4096
    with pytest.raises(ValueError, match=r"`name` must be one of \['GPT-XXL', 'GPT-XXXL'\]"):
        DnDTransformer.from_preset("GPT-B")


def test_head_positions_are_checked():
    for positions, message in (((2, 1), "strictly increasing"), ((1, 5), r"in \[0, 5\)"), ((), "at least one"),
                               ((1.5,), "sequence of block indices")):
        with pytest.raises(ValueError, match=f"`head_positions`.*{message}"):
            DnDTransformer(dim=32, depth=5, heads=2, head_positions=positions)


# official checkpoints


def test_official_wrappers_files_and_round_trip(golden, tmp_path):
    data, reference = official(golden)
    state, config = data["state_dict"], data["config"]
    inputs = dict(codes=data["inputs"]["codes"], class_labels=data["inputs"]["cond_idx"])
    expected = reference(**inputs)
    assert sorted(reference.official_state_dict()) == sorted(state)
    for checkpoint in ({"model": state}, {"module": state}, {**state, "freqs_cis": torch.zeros(17, 8, 2)},
                       reference.official_state_dict()):
        assert torch.equal(DnDTransformer.from_official(checkpoint, config=config)(**inputs), expected)
    path = tmp_path / "dnd.pt"
    torch.save({"model": {k: v * 0 for k, v in state.items()}, "ema": state, "steps": 1,
                "args": argparse.Namespace(gpt_model=None, vocab_size=64, image_size=64, downsample_size=16)}, path)
    model = DnDTransformer.from_official(path, config={k: v for k, v in config.items() if k != "block_size"},
                                         use_ema=True)
    assert not model.training and torch.equal(model(**inputs), expected)


def test_wrong_head_count_names_the_head_keys(golden):
    data = golden("dnd.pt")
    more = {**data["config"], "num_pred_heads": 3, "pred_head_positions": [0, 1, 2]}
    with pytest.raises(CheckpointMismatchError, match=r"has 2 prediction heads but the model has 3.*"
                                                      r"missing norm\.2\.weight, output\.2\.weight; unexpected none"):
        DnDTransformer.from_official(data["state_dict"], config=more)
    fewer = {**data["config"], "num_pred_heads": 1, "pred_head_positions": [2]}
    with pytest.raises(CheckpointMismatchError, match=r"has 2 prediction heads but the model has 1.*"
                                                      r"missing none; unexpected norm\.1\.weight, output\.1\.weight"):
        DnDTransformer.from_official(data["state_dict"], config=fewer)
    with pytest.raises(ValueError, match=r"`config\['num_pred_heads'\]` is 3 but `pred_head_positions` lists 2"):
        DnDTransformer.from_official(data["state_dict"], config={**data["config"], "num_pred_heads": 3})


def test_wrong_block_count_or_size_names_the_keys(golden):
    data = golden("dnd.pt")
    with pytest.raises(CheckpointMismatchError, match=r"missing \(7\).*layers\.3\.attention\.wqkv"):
        DnDTransformer.from_official(data["state_dict"], config={**data["config"], "n_layer": 4})
    with pytest.raises(ValueError, match=r"`head_positions`.*in \[0, 2\)"):
        DnDTransformer.from_official(data["state_dict"], config={**data["config"], "n_layer": 2})
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape.*output\.0\.weight"):
        DnDTransformer.from_official(data["state_dict"], config={**data["config"], "vocab_size": 32})
    llamagen = golden("llamagen_c2i.pt")
    config = {**llamagen["config"], "pred_head_positions": [0, 1]}  # LlamaGen's keys: norm.weight, output.weight
    with pytest.raises(CheckpointMismatchError, match=r"has 0 prediction heads.*unexpected norm\.weight, output\.w"):
        DnDTransformer.from_official(llamagen["state_dict"], config=config)


def test_official_config_fields():
    kwargs = official_config_dnd({"gpt_model": "GPT-XXXL", "block_size": 256})
    assert (kwargs["dim"], kwargs["depth"], kwargs["heads"], kwargs["head_positions"]) == (2048, 48, 32, [39, 47])
    with pytest.raises(ValueError, match="share_prediction_heads"):
        official_config_dnd({"block_size": 16, "share_prediction_heads": 1})
    with pytest.raises(ValueError, match="'c2i'"):
        official_config_dnd({"block_size": 16, "model_type": "t2i"})
    with pytest.raises(ValueError, match="unknown fields.*'num_heads'"):
        official_config_dnd({"block_size": 16, "num_heads": 2})
    assert issubclass(DnDTransformer, LlamaGen)


# bad input


def test_bad_inputs_name_the_argument():
    model, labels = tiny(), torch.tensor([1, 2])
    codes = torch.randint(0, 24, (2, 9, 3))
    with pytest.raises(ValueError, match=r"`codes` must be code ids in \[0, 24\) \(vocab_size\), got .*, 24\]"):
        model(torch.cat((codes[:, :-1], torch.full((2, 1, 3), 24)), 1), class_labels=labels)
    with pytest.raises(ValueError, match=r"`codes` must hold D=3 codes per position in the last axis.*got 2"):
        model(codes[..., :2], class_labels=labels)
    with pytest.raises(ValueError, match=r"`codes` must be an integer tensor \[b, h, w, D\] or \[b, n, D\].*\(2, 9\)"):
        model(codes[..., 0], class_labels=labels)  # a LlamaGen-style [b, n] input
    with pytest.raises(ValueError, match=r"`codes` \[b, h, w, D\] must be \[b, 3, 3, 3\]"):
        model(codes.view(2, 1, 9, 3), class_labels=labels)
    with pytest.raises(ValueError, match=r"1\.\.9 positions"):
        model(torch.randint(0, 24, (2, 10, 3)), class_labels=labels)
    with pytest.raises(ValueError, match="`codes` must be an integer tensor"):
        model(codes.float(), class_labels=labels)
    with pytest.raises(ValueError, match=r"`class_labels` must be in \[0, 5\).*\[1, 5\]"):
        model(codes, class_labels=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="class_labels"):
        model.generate(torch.tensor([-1]), progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1], max_new_tokens=10, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([1], top_p=0.0, progress=False)
    no_null = tiny(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        no_null.generate([1], cfg_scale=2.0, progress=False)
