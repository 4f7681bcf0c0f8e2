"""Bad input -> a clear error at the entry point, for every model and tokenizer.

One table: each case calls a public entry point with one bad argument and names the exception type and
a message pattern that names the argument (or, for checkpoints, the kind that was given and the kind
expected). The models are tiny and built once per module; every call fails before any real work: the
table runs with every backbone, MAR's transformers, the caption encoder and the tokenizers' conv stacks
made to fail if reached. Below it, the bad inputs of issue 16 that are now accepted, and their results.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import randn

from _helpers import smooth_images
from mmgen_pytorch import MAR, CaptionEncoder, DnDTransformer, LlamaGen, MonoFormer, Transfusion, print_modality_sample
from mmgen_pytorch.pretrained import CheckpointMismatchError, checkpoint_kind
from mmgen_pytorch.tokenizers import RQVAE, VQVAE, AutoencoderKL
from mmgen_pytorch.tokenizers.blocks import Decoder, Encoder
from mmgen_pytorch.tokenizers.kl import KLConfig
from mmgen_pytorch.tokenizers.rq import RQConfig
from mmgen_pytorch.tokenizers.vq import VQConfig

NAN, INF = float("nan"), float("inf")
BACKBONE = dict(dim=32, depth=1, heads=2, attn_backend="sdpa")
LLAMAGEN_CONFIG = dict(dim=32, n_layer=2, n_head=2, vocab_size=24, block_size=9, num_classes=5)
DND_CONFIG = dict(LLAMAGEN_CONFIG, num_pred_heads=2, pred_head_positions=[0, 1])


@pytest.fixture(scope="module")
def m():
    torch.manual_seed(0)
    conv = dict(ch=32, num_res_blocks=1)
    return SimpleNamespace(
        transfusion=Transfusion(num_text_tokens=16, dim_latent=4, modality_default_shape=(2, 2), modality_num_dim=2,
                                transformer=BACKBONE),
        transfusion2=Transfusion(num_text_tokens=16, dim_latent=(4, 4), modality_default_shape=((2, 2), (2, 2)),
                                 transformer=BACKBONE),
        monoformer=MonoFormer(num_text_tokens=8, transformer=BACKBONE, latent_channels=4, latent_size=4, patch_size=2),
        llamagen=LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, num_classes=5, attn_backend="sdpa"),
        t2i=LlamaGen(dim=32, depth=1, heads=2, vocab_size=24, grid_size=3, model_type="t2i", cls_token_num=4,
                     caption_dim=8, attn_backend="sdpa"),
        t2i_ids=LlamaGen(dim=32, depth=1, heads=2, vocab_size=24, grid_size=3, model_type="t2i", cls_token_num=4,
                         caption_encoder=CaptionEncoder(num_tokens=10, dim=8, depth=1, heads=2, max_seq_len=6),
                         attn_backend="sdpa"),
        dnd=DnDTransformer(dim=32, depth=2, heads=2, head_positions=(0, 1), vocab_size=24, grid_size=3, num_classes=5,
                           attn_backend="sdpa"),
        mar=MAR(img_size=32, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                num_classes=5, buffer_size=2, diffloss_depth=1, diffloss_width=32, num_sampling_steps="5"),
        vq=VQVAE(VQConfig(codebook_size=16, codebook_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                          attn_levels=(), **conv)).eval(),
        kl=AutoencoderKL(KLConfig(embed_dim=4, ch_mult=(1, 2), encoder_attn_levels=(), decoder_attn_levels=(),
                                  **conv)).eval(),
        rq=RQVAE(RQConfig(embed_dim=8, n_embed=16, depth=2, ch_mult=(1, 2), attn_levels=(), **conv)).eval(),
    )


def codes(*shape, value=0, dtype=torch.long):
    return torch.full(shape, value, dtype=dtype)


LABELS = torch.tensor([0, 1])
NAN_LATENT = torch.full((2, 2, 4), NAN)

CASES = [
    # (id, call, exception, message pattern)
    # Transfusion
    ("transfusion/compile-without-cache", lambda m: m.transfusion.sample(max_length=8, compile=True, use_cache=False,
                                                                          progress=False),
     ValueError, r"`compile=True` needs `use_cache=True`"),
    ("transfusion/compile-not-bool", lambda m: m.transfusion.sample(max_length=8, compile="yes", progress=False),
     TypeError, r"`compile` must be a bool, got 'yes'"),
    ("transfusion/zero-batch-text", lambda m: m.transfusion(codes(0, 3)), ValueError,
     r"`x` must hold at least one sample, got Tensor\(shape=\(0, 3\)"),
    ("transfusion/empty-latent-grid", lambda m: m.transfusion([[codes(2), randn(0, 2, 4)]]), ValueError,
     r"`x\[0\]\[1\]`: modality 0 got an empty latent grid \(0, 2\)"),
    ("transfusion/nan-latent", lambda m: m.transfusion([[codes(2), NAN_LATENT]]), ValueError,
     r"`x\[0\]\[1\]` contains NaN or inf"),
    ("transfusion/prob-uncond", lambda m: m.transfusion([[randn(2, 2, 4)]], prob_uncond=2.0), ValueError,
     r"`prob_uncond` must be in \[0, 1\], got 2.0"),
    ("transfusion/nan-noise", lambda m: m.transfusion([[randn(2, 2, 4)]], noise=[[torch.full((4, 4), NAN)]]),
     ValueError, r"`noise` for modality 0 of sample 0 contains NaN or inf"),
    ("transfusion/sample-top-k", lambda m: m.transfusion.sample(max_length=8, text_top_k=-1, progress=False),
     ValueError, r"`text_top_k` must be an int >= 0 \(0: off\), got -1"),
    ("transfusion/sample-cfg-nan", lambda m: m.transfusion.sample(max_length=8, cfg_scale=NAN, progress=False),
     ValueError, r"`cfg_scale` must be a finite number >= 0, got nan"),
    ("transfusion/sample-batch-size", lambda m: m.transfusion.sample(batch_size=0, progress=False), ValueError,
     r"`batch_size` must be an int >= 1, got 0"),
    ("transfusion/sample-shape-rank", lambda m: m.transfusion.sample(
        max_length=30, fixed_modality_shape=(4,), force_modality_at_start=0, progress=False), ValueError,
     r"`fixed_modality_shape` must be a tuple of 2 positive ints, got \(4,\)"),
    ("transfusion/forced-shape", lambda m: m.transfusion.sample(
        max_length=30, force_modality_at_start=(0, (2, 0)), progress=False), ValueError,
     r"`force_modality_at_start` must be a tuple of 2 positive ints, got \(2, 0\)"),
    ("transfusion/text-only-zero-batch", lambda m: m.transfusion.generate_text_only(codes(0, 3), 8, progress=False),
     ValueError, r"`prompt` must be Int\[batch, seq\] with batch >= 1, got Tensor\(shape=\(0, 3\)"),
    ("transfusion/text-only-temperature", lambda m: m.transfusion.generate_text_only(
        codes(1, 2), 8, temperature=INF, progress=False), ValueError, r"`temperature` must be a finite number >= 0"),
    ("transfusion/modality-only-type", lambda m: m.transfusion.generate_modality_only(modality_type=2, progress=False),
     ValueError, r"`modality_type` must be a modality type in \[0, 1\), got 2"),
    ("transfusion/modality-only-shape", lambda m: m.transfusion.generate_modality_only(
        fixed_modality_shape=(0, 2), progress=False), ValueError, r"`fixed_modality_shape` .* got \(0, 2\)"),
    ("transfusion/modality-only-batch", lambda m: m.transfusion.generate_modality_only(0, progress=False),
     ValueError, r"`batch_size` must be an int >= 1, got 0"),
    # MonoFormer
    ("monoformer/foreign-grid", lambda m: m.monoformer.sample(
        max_length=40, fixed_modality_shape=(3, 3), force_modality_at_start=0, progress=False), ValueError,
     r"`fixed_modality_shape`: only the \(2, 2\) patch grid .*is generated, got \(3, 3\)"),
    ("monoformer/cfg", lambda m: m.monoformer.generate_images([codes(2)], cfg_scale=-1.0), ValueError,
     r"`cfg_scale` must be a finite number >= 0, got -1.0"),
    ("monoformer/zero-batch-latents", lambda m: m.monoformer(randn(0, 4, 4, 4)), ValueError,
     r"`x` must hold at least one sample"),
    # LlamaGen
    ("llamagen/compile-without-cache", lambda m: m.llamagen.generate(LABELS, compile=True, use_cache=False,
                                                                      progress=False),
     ValueError, r"`compile=True` needs `use_cache=True`: the compiled decode step runs on the static KV cache"),
    ("llamagen/bool-codes", lambda m: m.llamagen(codes(2, 9, dtype=torch.bool), class_labels=LABELS), ValueError,
     r"`codes` must be an integer tensor \[b, h, w\] or \[b, n\] with b >= 1, got .*torch.bool"),
    ("llamagen/zero-batch", lambda m: m.llamagen(codes(0, 9), class_labels=LABELS[:0]), ValueError,
     r"`codes` must be .* with b >= 1, got Tensor\(shape=\(0, 9\)"),
    ("llamagen/negative-code", lambda m: m.llamagen(codes(2, 9, value=-3), class_labels=LABELS), ValueError,
     r"`codes` must be token ids in \[0, 24\) \(vocab_size\), got values in \[-3, -3\]"),
    ("llamagen/bool-labels", lambda m: m.llamagen(codes(2, 9), class_labels=torch.tensor([True, False])), ValueError,
     r"`class_labels` must be integer class ids \[batch=2\], got .*torch.bool"),
    ("llamagen/cfg-negative", lambda m: m.llamagen.generate([1], cfg_scale=-2.0, progress=False), ValueError,
     r"`cfg_scale` must be a finite number >= 0, got -2.0"),
    ("llamagen/top-k-float", lambda m: m.llamagen.generate([1], top_k=1.5, progress=False), ValueError,
     r"`top_k` must be an int >= 0 \(0: off\), got 1.5"),
    ("llamagen/nan-caption", lambda m: m.t2i(codes(2, 9), caption_embeds=torch.full((2, 3, 8), NAN)), ValueError,
     r"`caption_embeds` contains NaN or inf"),
    ("llamagen/official-vq-weights", lambda m: LlamaGen.from_official(m.vq.state_dict(), config=LLAMAGEN_CONFIG),
     CheckpointMismatchError, r"looks like a LlamaGen VQ tokenizer checkpoint, not a LlamaGen / DnD GPT .*VQVAE"),
    ("llamagen/official-our-weights", lambda m: LlamaGen.from_official(m.llamagen.state_dict(),
                                                                        config=LLAMAGEN_CONFIG),
     CheckpointMismatchError, r"looks like an mmgen_pytorch LlamaGen / DnD state dict .*`load_state_dict`"),
    # DnD-Transformer
    ("dnd/compile-without-cache", lambda m: m.dnd.generate(LABELS, compile=True, use_cache=False, progress=False),
     ValueError, r"`compile=True` needs `use_cache=True`"),
    ("dnd/bool-codes", lambda m: m.dnd(codes(2, 9, 2, dtype=torch.bool), class_labels=LABELS), ValueError,
     r"`codes` must be an integer tensor \[b, h, w, D\] or \[b, n, D\] with b >= 1, got .*torch.bool"),
    ("dnd/zero-batch", lambda m: m.dnd(codes(0, 9, 2), class_labels=LABELS[:0]), ValueError,
     r"`codes` must be .* with b >= 1, got Tensor\(shape=\(0, 9, 2\)"),
    ("dnd/cfg-inf", lambda m: m.dnd.generate([1], cfg_scale=INF, progress=False), ValueError,
     r"`cfg_scale` must be a finite number >= 0, got inf"),
    ("dnd/official-mar-weights", lambda m: DnDTransformer.from_official(m.mar.state_dict(), config=DND_CONFIG),
     CheckpointMismatchError, r"looks like a MAR checkpoint, not a LlamaGen / DnD GPT checkpoint.*MAR.from_official"),
    # MAR
    ("mar/nan-latents", lambda m: m.mar(torch.full((2, 4, 2, 2), NAN), LABELS), ValueError,
     r"`latents` contains NaN or inf"),
    ("mar/zero-batch", lambda m: m.mar(randn(0, 4, 2, 2)), ValueError,
     r"`latents` must be a float tensor \[b >= 1, 4, 2, 2\], got Tensor\(shape=\(0, 4, 2, 2\)"),
    ("mar/label-range", lambda m: m.mar(randn(2, 4, 2, 2), torch.tensor([0, 5])), ValueError,
     r"`labels` must be in \[0, 5\) \(num_classes\), got values in \[0, 5\]"),
    ("mar/cfg_scale", lambda m: m.mar.sample([1], num_iter=2, cfg_scale=-1.0, progress=False), ValueError,
     r"`cfg_scale` must be a finite number >= 0, got -1.0"),
    ("mar/official-kl-weights", lambda m: MAR.from_official(m.kl.state_dict(), config="mar_base"),
     CheckpointMismatchError, r"looks like a KL autoencoder checkpoint, not a MAR .*AutoencoderKL.from_official"),
    # tokenizers
    ("vq/nan-images", lambda m: m.vq.encode(torch.full((1, 3, 8, 8), NAN)), ValueError, r"`images` contains NaN"),
    ("vq/zero-batch-images", lambda m: m.vq.encode_to_indices(randn(0, 3, 8, 8)), ValueError,
     r"`images` must hold at least one non-empty image, got Tensor\(shape=\(0, 3, 8, 8\)"),
    ("vq/bool-indices", lambda m: m.vq.decode_code(codes(1, 2, 2, dtype=torch.bool)), ValueError,
     r"`indices` must be an integer tensor, got .*torch.bool"),
    ("vq/index-range", lambda m: m.vq.decode_code(codes(1, 2, 2, value=16)), ValueError,
     r"`indices` must be code ids in \[0, 16\) \(codebook size\), got values in \[16, 16\]"),
    ("vq/official-rq-weights", lambda m: VQVAE.from_official(m.rq.state_dict()), CheckpointMismatchError,
     r"looks like an RQ-VAE checkpoint, not a LlamaGen VQ tokenizer checkpoint; load it with RQVAE.from_official"),
    ("kl/inf-latent", lambda m: m.kl.decode(torch.full((1, 4, 2, 2), INF)), ValueError, r"`z` contains NaN or inf"),
    ("kl/empty-images", lambda m: m.kl.encode(randn(1, 3, 0, 0)), ValueError,
     r"`images` must hold at least one non-empty image"),
    ("kl/official-mar-weights", lambda m: AutoencoderKL.from_official(m.mar.state_dict()), CheckpointMismatchError,
     r"looks like a MAR checkpoint, not a KL autoencoder checkpoint; load it with MAR.from_official"),
    ("rq/code-range", lambda m: m.rq.decode_code(codes(1, 2, 2, 2, value=-1)), ValueError,
     r"`codes` must be code ids in \[0, 16\) \(codebook size\), got values in \[-1, -1\]"),
    ("rq/nan-quant", lambda m: m.rq.decode(torch.full((1, 8, 2, 2), NAN)), ValueError, r"`quant` contains NaN"),
    ("rq/official-vq-weights", lambda m: RQVAE.from_official(m.vq.state_dict()), CheckpointMismatchError,
     r"looks like a LlamaGen VQ tokenizer checkpoint, not an RQ-VAE checkpoint"),
    ("rq/official-empty", lambda m: RQVAE.from_official({}), CheckpointMismatchError,
     r"the checkpoint holds no weights, expected an RQ-VAE checkpoint"),
    # issue 16: silent or confusing bad input
    ("transfusion/text-with-modality-type", lambda m: m.transfusion(codes(2, 3), modality_type=0), ValueError,
     r"`modality_type` \(0\) is for modalities, but `x` is text only"),
    ("transfusion/untagged-modality-type-range", lambda m: m.transfusion2([[codes(2), randn(2, 2, 4)]], modality_type=2),
     ValueError, r"`modality_type` must be a modality type in \[0, 2\), got 2"),
    ("transfusion/tuple-float-type", lambda m: m.transfusion2([[codes(2), (0.5, randn(2, 2, 4))]]), ValueError,
     r"`x\[0\]\[1\]` must be a modality type in \[0, 2\), got 0.5"),
    ("transfusion/meta-text", lambda m: m.transfusion([[codes(3).to("meta"), randn(2, 2, 4)]]), ValueError,
     r"`x\[0\]\[0\]` is a meta tensor"),
    ("transfusion/meta-latent", lambda m: m.transfusion([[codes(3), randn(2, 2, 4, device="meta")]]), ValueError,
     r"`x\[0\]\[1\]` is a meta tensor"),
    ("transfusion/sample-empty-prompt-list", lambda m: m.transfusion.sample([], progress=False), ValueError,
     r"`prompt` is an empty list: pass `prompt=None` for one unconditional sample, `batch_size=n`"),
    ("transfusion/sample-batch-size-vs-prompts", lambda m: m.transfusion.sample([[codes(2)], [codes(3)]], batch_size=5,
                                                                               progress=False), ValueError,
     r"`batch_size` \(5\) disagrees with the 2 prompts in `prompt`"),
    ("transfusion/modality-steps-float", lambda m: m.transfusion.sample(
        [codes(2)], max_length=30, force_modality_at_start=0, modality_steps=2.5, progress=False), ValueError,
     r"`modality_steps` must be an int >= 1, got 2.5"),
    ("transfusion/flow-given-diffusion-options", lambda m: m.transfusion.sample(
        [codes(2)], max_length=30, force_modality_at_start=0, objective_kwargs=dict(temperature=0.5), progress=False),
     ValueError, r"`objective_kwargs`: RectifiedFlow.generate takes no options, got \['temperature'\]"),
    ("transfusion/objective-kwargs-not-a-dict", lambda m: m.transfusion.sample(
        [codes(2)], max_length=30, objective_kwargs=["temperature"], progress=False),
     ValueError, r"`objective_kwargs` must be a dict of the objective's generate options, got list"),
    ("transfusion/meta-times", lambda m: m.transfusion([[codes(2), randn(2, 2, 4)]],
                                                       times=torch.zeros(1, 1, device="meta")),
     ValueError, r"`times` is a meta tensor"),
    ("transfusion/generator-str", lambda m: m.transfusion.sample([codes(2)], max_length=8, generator="0",
                                                                  progress=False), ValueError,
     r"`generator` must be a torch.Generator or an int seed in \[0, 2\*\*64\), got str\('0'\)"),
    ("transfusion/print-not-a-sample", lambda m: print_modality_sample(codes(3)), ValueError,
     r"`sample` must be one sample \(a list of text tensors and \(modality_type, tensor\) tuples\) or a list"),
    ("monoformer/ddim-eta-above-1", lambda m: m.monoformer.generate_images([codes(2)], sampler="ddim", eta=1.5),
     ValueError, r"`eta` must be a finite number in \[0, 1\], got 1.5"),
    ("monoformer/ddim-eta-nan", lambda m: m.monoformer.generate_images([codes(2)], sampler="ddim", eta=NAN),
     ValueError, r"`eta` must be a finite number in \[0, 1\], got nan"),
    ("monoformer/eta-without-ddim", lambda m: m.monoformer.generate_images([codes(2)], eta=0.5), ValueError,
     r"`eta` \(0.5\) is DDIM's noise level: it needs `sampler='ddim'`"),
    ("monoformer/clip-negative", lambda m: m.monoformer.generate_images([codes(2)], clip_denoised=-1.0), ValueError,
     r"`clip_denoised` must be a finite number > 0, got -1.0"),
    ("monoformer/steps-float", lambda m: m.monoformer.generate_images([codes(2)], steps=2.5), ValueError,
     r"`steps` must be an int, 'N', 'a,b,...', 'ddimN' or a list of ints, got 2.5"),
    ("monoformer/steps-zero-string", lambda m: m.monoformer.generate_images([codes(2)], steps="0"), ValueError,
     r"`steps` '0': cannot take 0 steps"),
    ("llamagen/cfg-interval-nan", lambda m: m.llamagen.generate([1], cfg_scale=2.0, cfg_interval=NAN, progress=False),
     ValueError, r"`cfg_interval` must be a finite number >= -1, got nan"),
    ("llamagen/meta-codes", lambda m: m.llamagen(codes(2, 9).to("meta"), class_labels=LABELS), ValueError,
     r"`codes` is a meta tensor"),
    ("llamagen/generator-float", lambda m: m.llamagen.generate([1], generator=1.5, progress=False), ValueError,
     r"`generator` must be a torch.Generator or an int seed"),
    ("llamagen/tokenizer-codebook", lambda m: LlamaGen(dim=32, depth=1, heads=2, vocab_size=24, grid_size=2,
                                                        tokenizer=m.vq), ValueError,
     r"`tokenizer` has a codebook of 16 codes but the model's `vocab_size` is 24"),
    ("llamagen/caption-ids-too-long", lambda m: m.t2i_ids(codes(2, 9), caption_ids=codes(2, 5, value=1)), ValueError,
     r"`caption_ids` must hold 1..4 tokens \(cls_token_num\), got 5"),
    ("llamagen/caption-ids-too-long-generate", lambda m: m.t2i_ids.generate(codes(2, 5, value=1), progress=False),
     ValueError, r"`caption_ids` must hold 1..4 tokens \(cls_token_num\), got 5"),
    ("dnd/cfg-interval-nan", lambda m: m.dnd.generate([1], cfg_interval=NAN, progress=False), ValueError,
     r"`cfg_interval` must be a finite number >= -1, got nan"),
    ("dnd/tokenizer-codebook", lambda m: m.dnd.set_tokenizer(m.rq), ValueError,
     r"`tokenizer` has a codebook of 16 codes but the model's `vocab_size` is 24"),
    ("mar/bare-int-labels", lambda m: m.mar.sample(7, num_iter=2, progress=False), ValueError,
     r"`class_labels` must be class ids \[b\], got the bare int 7: pass `class_labels=\[7\]` for one sample of "
     r"class 7, or `batch_size=7` \(no `class_labels`\) for 7 class-unconditional samples"),
    ("mar/clip-negative", lambda m: m.mar.sample([1], num_iter=2, clip_denoised=-1.0, progress=False), ValueError,
     r"`clip_denoised` must be a finite number > 0, got -1.0"),
    ("mar/num-sampling-steps-zero", lambda m: m.mar.sample([1], num_iter=2, num_sampling_steps="0", progress=False),
     ValueError, r"`num_sampling_steps` '0': cannot take 0 steps"),
    ("mar/meta-latents", lambda m: m.mar(randn(2, 4, 2, 2, device="meta"), LABELS), ValueError,
     r"`latents` is a meta tensor"),
    ("mar/generator-bool", lambda m: m.mar.sample([1], num_iter=2, generator=True, progress=False), ValueError,
     r"`generator` must be a torch.Generator or an int seed"),
    ("vq/pixels-0-255", lambda m: m.vq.encode_to_indices(torch.rand(1, 3, 8, 8) * 255), ValueError,
     r"`images` must be pixels in \[-1, 1\], got values in \[[0-9.]+, [0-9.]+\] \(0..255 pixels: pass "
     r"`images / 127.5 - 1`"),
    ("kl/pixels-0-255", lambda m: m.kl.encode(torch.rand(1, 3, 8, 8) * 255), ValueError,
     r"`images` must be pixels in \[-1, 1\]"),
    ("kl/pixels-below", lambda m: m.kl(torch.full((1, 3, 8, 8), -2.0)), ValueError,
     r"`images` must be pixels in \[-1, 1\], got values in \[-2, -2\]"),
    ("rq/pixels-0-255", lambda m: m.rq.encode_to_codes(torch.rand(1, 3, 8, 8) * 255), ValueError,
     r"`images` must be pixels in \[-1, 1\]"),
    ("rq/meta-images", lambda m: m.rq.encode_to_codes(randn(1, 3, 8, 8, device="meta")), ValueError,
     r"`images` is a meta tensor"),
]


def _unreachable(*args, **kwargs):
    raise AssertionError("the bad input reached real work before it was refused")


@pytest.fixture
def no_real_work(monkeypatch):
    """Every expensive step of the models and tokenizers fails if a bad call gets that far."""
    for owner, method in ((Transfusion, "run_backbone"), (MAR, "condition"), (LlamaGen, "_transformer"),
                          (CaptionEncoder, "forward"), (Encoder, "forward"), (Decoder, "forward")):
        monkeypatch.setattr(owner, method, _unreachable)


@pytest.mark.parametrize("call, error, pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_raises_a_clear_error(m, no_real_work, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(m)


def test_the_table_covers_every_model_and_tokenizer():
    families = {case[0].split("/")[0] for case in CASES}
    assert families == {"transfusion", "monoformer", "llamagen", "dnd", "mar", "vq", "kl", "rq"}
    assert len(CASES) >= 24


def test_each_official_layout_is_recognised_as_its_own_kind(m):
    """The kind check names what a state dict is; each loader's own layout must pass it."""
    assert checkpoint_kind(m.llamagen.official_state_dict()) == "llamagen_gpt"
    assert checkpoint_kind(m.dnd.official_state_dict()) == "llamagen_gpt"
    assert checkpoint_kind(m.vq.state_dict()) == "vq"
    assert checkpoint_kind(m.kl.state_dict()) == "kl"
    assert checkpoint_kind(m.rq.state_dict()) == "rq"
    assert checkpoint_kind(m.llamagen.state_dict()) == "llamagen_ours"
    assert checkpoint_kind({"something.else": torch.zeros(1)}) is None
    reloaded = LlamaGen.from_official(m.llamagen.official_state_dict(), config=LLAMAGEN_CONFIG, attn_backend="sdpa")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), m.llamagen.state_dict().values()))


def test_a_rejected_sampling_call_leaves_the_training_mode_alone(m):
    model = m.transfusion.train()
    with pytest.raises(ValueError, match="text_top_p"):
        model.sample(max_length=8, text_top_p=0.0, progress=False)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="text_top_p"):
        model.sample(max_length=8, text_top_p=0.0, progress=False)
    assert not model.training


def test_float64_and_float16_latents_train_like_float32(m):
    """Modality latents are float32 targets whatever their input precision (float64 used to crash)."""
    model = m.transfusion.eval()
    latent, noise = randn(2, 2, 4), randn(4, 4)
    losses = [model([[codes(3, value=1), latent.to(dtype)]], times=[[0.3]], noise=[[noise]])
              for dtype in (torch.float32, torch.float64, torch.float16)]
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-2, atol=1e-3)


# issue 16: inputs that are now taken, and what they give

def test_modality_type_types_the_untagged_float_tensors_of_a_list_batch(m):
    """It used to be ignored for a list batch: every bare float tensor trained modality 0's head."""
    model = m.transfusion2.eval()
    latent, fixed = randn(2, 2, 4), dict(times=[[0.3]], noise=[[randn(4, 4)]], return_breakdown=True)
    untagged = model([[codes(3, value=1), latent]], modality_type=1, **fixed)[1]
    tagged = model([[codes(3, value=1), (1, latent)]], **fixed)[1]
    tensor_tagged = model([[codes(3, value=1), (torch.tensor(1), latent)]], **fixed)[1]
    default = model([[codes(3, value=1), latent]], **fixed)[1]
    assert untagged.flow[0] == 0 and untagged.flow[1] > 0
    assert default.flow[1] == 0 and default.flow[0] > 0  # upstream's rule: an untagged tensor is modality 0
    torch.testing.assert_close(untagged.total, tagged.total, rtol=0, atol=0)
    torch.testing.assert_close(tensor_tagged.total, tagged.total, rtol=0, atol=0)


def _flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return [torch.tensor(value)]


SEEDED_CALLS = {
    "transfusion": lambda m, g: m.transfusion.sample([codes(2)], max_length=16, force_modality_at_start=0,
                                                     modality_steps=2, generator=g, progress=False),
    "monoformer": lambda m, g: m.monoformer.generate_images([codes(2)], steps=2, generator=g),
    "llamagen": lambda m, g: m.llamagen.generate([1, 2], generator=g, progress=False),
    "dnd": lambda m, g: m.dnd.generate([1], cfg_scale=2.0, generator=g, progress=False),
    "mar": lambda m, g: m.mar.sample([1, 2], num_iter=2, generator=g, progress=False).latents,
    "mar-forward": lambda m, g: m.mar(randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1)), LABELS,
                                      generator=g),
    "kl-forward": lambda m, g: m.kl(torch.zeros(1, 3, 8, 8), generator=g).loss,
}


@pytest.mark.parametrize("name", list(SEEDED_CALLS))
def test_an_int_seed_is_a_generator_seeded_with_it(m, name):
    """``generator=42`` used to fail deep inside (a beartype dump, an AttributeError)."""
    call = SEEDED_CALLS[name]
    results = []
    for generator in (7, torch.Generator().manual_seed(7), 8):
        torch.manual_seed(0)  # dropout draws from the global RNG
        results.append(_flat(call(m, generator)))
    seeded, reference, other = results
    assert len(seeded) == len(reference) > 0
    assert all(torch.equal(a, b) for a, b in zip(seeded, reference))
    assert not all(torch.equal(a, b) for a, b in zip(seeded, other))


def test_float64_and_float16_images_tokenize_like_float32(m):
    """The tokenizers take any float precision, converted to their parameters' as the models do."""
    images = smooth_images().half().float()  # exactly representable in float16
    for dtype in (torch.float64, torch.float16):
        assert torch.equal(m.vq.encode_to_indices(images.to(dtype)), m.vq.encode_to_indices(images))
        assert torch.equal(m.rq.encode_to_codes(images.to(dtype)), m.rq.encode_to_codes(images))
        assert torch.equal(m.kl.encode(images.to(dtype)).mean, m.kl.encode(images).mean)
        assert torch.equal(m.kl(images.to(dtype), sample=False).loss, m.kl(images, sample=False).loss)
    latent = randn(1, 4, 2, 2)
    assert torch.equal(m.kl.decode(latent.double()), m.kl.decode(latent))


def test_pixels_just_outside_the_range_pass(m):
    """Resampling overshoots [-1, 1] (bicubic up to ±1.49 at sharp edges): only values past ±1.5 are refused."""
    assert m.vq.encode_to_indices(torch.full((1, 3, 8, 8), 1.45)).shape == (1, 4, 4)
    assert m.kl.encode(torch.full((1, 3, 8, 8), -1.45)).mean.shape == (1, 4, 4, 4)


def test_ddim_with_eta_one_stays_real(m):
    """eta = 1 is the largest DDIM noise that keeps sqrt(1 - ᾱ_prev - σ²) real (eta 1.5 gave complex latents)."""
    latents = m.monoformer.generate_images([codes(2)], sampler="ddim", eta=1.0, steps=3, generator=0)
    assert latents.dtype == torch.float32 and bool(torch.isfinite(latents).all())


def test_print_modality_sample_prints_a_batch(capsys):
    batch = [[codes(2), (0, randn(2, 2, 4))], [codes(3)]]
    print_modality_sample(batch)
    assert capsys.readouterr().out.splitlines() == ["sample 0:", "text: (2,)", "modality 0: (2, 2, 4)",
                                                    "sample 1:", "text: (3,)"]
    print_modality_sample(batch[0])
    assert capsys.readouterr().out.splitlines() == ["text: (2,)", "modality 0: (2, 2, 4)"]
