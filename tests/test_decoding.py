"""The decoding engine (`backbone.Decoder`) against its own reference path and a full forward, the chunk
records it concatenates, and the guidance module every model's CFG goes through."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch
from torch import Tensor

from _helpers import assert_close_f32
from mmgen_pytorch.backbone import Decoder, SequenceChunk, TokenLayout, Transformer
from mmgen_pytorch.guidance import cfg_combine, guide, guide_both_halves, scheduled_cfg_scale
from mmgen_pytorch.transfusion.modalities import ModalitySpec, modality_specs

DIM = 32


@dataclasses.dataclass
class EmbedChunk(SequenceChunk):
    embeds: Tensor
    layout: Optional[TokenLayout] = None


def make_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(dim=DIM, depth=2, heads=4, kv_heads=2, attn_backend="sdpa").eval()


def run_with(model: Transformer):
    def run(chunk: EmbedChunk, *, cache, write: bool) -> Tensor:
        return model(chunk.embeds, layout=chunk.layout, cache=cache, write_cache=write)
    return run


def padded_prefix(rows: int, length: int, pad: int) -> TokenLayout:
    """Left padding of ``pad`` slots in the odd rows (as LlamaGen's caption padding)."""
    segments = torch.zeros(rows, length, dtype=torch.long)
    segments[1::2, :pad] = -1
    return TokenLayout(segments, torch.full_like(segments, -1))


# chunk records

def test_concat_and_select_rows_work_field_by_field():
    layout = padded_prefix(4, 3, 1)
    a = EmbedChunk(torch.randn(4, 3, DIM), layout)
    b = EmbedChunk(torch.randn(4, 2, DIM))  # no layout: plain causal tokens
    whole = EmbedChunk.concat([a, b])
    assert whole.length == 5 and whole.rows == 4
    assert torch.equal(whole.embeds, torch.cat((a.embeds, b.embeds), 1))
    assert torch.equal(whole.layout.segment_ids[:, :3], layout.segment_ids)
    assert torch.equal(whole.layout.segment_ids[:, 3:], torch.zeros(4, 2, dtype=torch.long))
    assert torch.equal(whole.layout.block_ids[:, 3:], torch.full((4, 2), -1))
    picked = whole.select_rows(torch.tensor([3, 0]))
    assert torch.equal(picked.embeds, whole.embeds[[3, 0]])
    assert torch.equal(picked.layout.segment_ids, whole.layout.segment_ids[[3, 0]])
    assert EmbedChunk.concat([b, b]).layout is None


def test_a_chunk_with_other_fields_must_say_how_to_concatenate():
    @dataclasses.dataclass
    class Odd(SequenceChunk):
        embeds: Tensor
        note: str = "x"

    with pytest.raises(ValueError, match="override `concat`"):
        Odd.concat([Odd(torch.randn(1, 2, DIM)), Odd(torch.randn(1, 1, DIM))])


# the engine

@torch.no_grad()
@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_equals_the_reference_and_the_full_forward(static):
    """prefill (with padding) -> read-only chunks -> written steps -> drop rows; cached == uncached ==
    one forward over the written sequence (a read-only chunk sees the same as when it is written)."""
    model = make_model()
    rows, prefix = 4, 5
    x = torch.randn(rows, prefix + 6, DIM)
    layout = padded_prefix(rows, prefix, 2)
    full_layout = TokenLayout(torch.cat((layout.segment_ids, torch.zeros(rows, 6, dtype=torch.long)), 1),
                              torch.full((rows, prefix + 6), -1))
    full = model(x, layout=full_layout)

    outputs = {}
    for use_cache in (True, False):
        new_cache = (lambda r, n: model.new_cache(r, n, static=static)) if use_cache else model.new_cache
        decoder = Decoder(run_with(model), new_cache=new_cache, rows=rows, max_length=prefix + 1, use_cache=use_cache)
        out = [decoder.write(EmbedChunk(x[:, :prefix], layout))]
        for _ in range(3):  # read-only steps leave the sequence as it was
            decoder.read(EmbedChunk(torch.randn(rows, 3, DIM)))
        peeked = decoder.read(EmbedChunk(x[:, prefix:prefix + 3]))
        assert decoder.length == prefix
        out.append(decoder.write(EmbedChunk(x[:, prefix:prefix + 3])))  # grows past max_length by itself
        assert_close_f32(peeked, out[-1])
        out.append(decoder.write(EmbedChunk(x[:, prefix + 3:prefix + 4])))
        decoder.keep_rows([2, 0])
        kept = decoder.write(EmbedChunk(x[[2, 0], prefix + 4:prefix + 6]))
        assert decoder.length == prefix + 6
        outputs[use_cache] = (torch.cat(out, 1), kept)

    for written, kept in outputs.values():
        assert_close_f32(written, full[:, :prefix + 4])
        assert_close_f32(kept, full[[2, 0], prefix + 4:])


def test_decoder_sizes_are_checked():
    model = make_model()
    with pytest.raises(ValueError, match="`rows` and `max_length`"):
        Decoder(run_with(model), new_cache=model.new_cache, rows=0, max_length=4)


# guidance

def test_guide_mixes_the_first_features_and_keeps_the_rest():
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    doubled = torch.cat((cond, uncond))
    assert torch.equal(guide(doubled, 3.0), cfg_combine(cond, uncond, 3.0))
    partial = guide(doubled, 3.0, features=5)
    assert torch.equal(partial[..., :5], cfg_combine(cond[..., :5], uncond[..., :5], 3.0))
    assert torch.equal(partial[..., 5:], cond[..., 5:])
    both = guide_both_halves(doubled, 3.0, features=5)
    assert torch.equal(both[:2], partial) and torch.equal(both[2:, :, :5], partial[..., :5])
    assert torch.equal(both[2:, :, 5:], uncond[..., 5:])
    channels_first = guide(doubled.movedim(-1, 1), 3.0, features=5, feature_dim=1)
    assert torch.equal(channels_first, partial.movedim(-1, 1))


def test_cfg_schedules():
    assert scheduled_cfg_scale(4.0, "constant", known=3, total=16) == 4.0
    assert scheduled_cfg_scale(4.0, "linear", known=0, total=16) == 1.0
    assert scheduled_cfg_scale(4.0, "linear", known=8, total=16) == 2.5
    with pytest.raises(ValueError, match="cfg_schedule"):
        scheduled_cfg_scale(4.0, "cosine", known=0, total=16)


# one record per modality

def test_modality_specs_from_per_argument_lists():
    first, second = modality_specs(dim_latent=[4, 6], channel_first_latent=[True, False],
                                   modality_default_shape=[(2, 3), None], modality_num_dim=[None, 1])
    assert first == ModalitySpec(dim_latent=4, channel_first=True, default_shape=(2, 3))  # rank free
    assert second == ModalitySpec(dim_latent=6, rank=1)
    (only,) = modality_specs(dim_latent=5, modality_default_shape=(4, 4))  # one shape, not a list of them
    assert only.default_shape == (4, 4) and only.rank is None
    (positioned,) = modality_specs(dim_latent=5, modality_default_shape=(4, 4), add_pos_emb=True)
    assert positioned.rank == 2  # a learned position embedding fixes the rank, as in transfusion-pytorch
    with pytest.raises(ValueError, match="`channel_first_latent` needs one entry per modality"):
        modality_specs(dim_latent=[4, 6], channel_first_latent=[True])
    tokens = torch.randn(6, 4)
    assert torch.equal(first.from_tokens(tokens, (2, 3)), tokens.reshape(2, 3, 4).movedim(-1, 0))
    assert torch.equal(first.to_latent_grid(first.from_tokens(tokens, (2, 3)), name="x"), tokens.reshape(2, 3, 4))
