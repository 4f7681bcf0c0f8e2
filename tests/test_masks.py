"""The one mask rule against a brute-force reference built from the spans themselves.

The reference never touches ``masks.visible`` or ``TokenLayout``: it reads the lengths, starts and
block spans a layout was built from, decides visibility per (query, key) pair with plain Python,
and computes attention with an explicit softmax over the allowed keys. Both backends (dense SDPA
mask and flex ``BlockMask``, flex eagerly and forward-only on CPU) must match it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from _helpers import assert_close_f32
from mmgen_pytorch.backbone import NO_BLOCK, PADDING, AttentionMask, TokenLayout, attend

pytestmark = pytest.mark.usefixtures("eager_flex")  # flex uncompiled: these check masks, not the kernel

HEAD_CONFIGS = [(2, 2), (4, 2), (4, 1)]  # (query heads, kv heads)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which costs a lot
    when another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Spans:
    lengths: List[int]
    starts: List[int]
    blocks: List[List[Tuple[int, int]]]  # (start, length) in row coordinates, in any order
    total_length: int

    def layout(self) -> TokenLayout:
        return TokenLayout.from_spans(lengths=self.lengths, blocks=self.blocks, starts=self.starts,
                                      total_length=self.total_length)


# strategies

@st.composite
def block_spans(draw, start: int, end: int) -> List[Tuple[int, int]]:
    """0-3 non-overlapping (possibly adjacent) blocks inside ``[start, end)``, shuffled."""
    spans, position = [], start
    for _ in range(draw(st.integers(0, 3))):
        if position >= end:
            break
        gap = draw(st.integers(0, end - position - 1))
        length = draw(st.integers(1, end - position - gap))
        spans.append((position + gap, length))
        position += gap + length
    return draw(st.permutations(spans))


@st.composite
def span_layouts(draw, max_batch: int = 4, max_length: int = 48) -> Spans:
    batch = draw(st.integers(1, max_batch))
    lengths = draw(st.lists(st.integers(1, max_length), min_size=batch, max_size=batch))
    total_length = max(lengths) + draw(st.integers(0, 8))
    starts, blocks = [], []
    for length in lengths:
        padding = draw(st.sampled_from(["right", "left", "anywhere"]))
        start = {"right": 0, "left": total_length - length}.get(padding)
        if start is None:
            start = draw(st.integers(0, total_length - length))
        starts.append(start)
        blocks.append(draw(block_spans(start, start + length)))
    return Spans(lengths, starts, blocks, total_length)


# the brute-force reference

def reference_allowed(spans: Spans, causal_limits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool ``[b, n, n]`` from the documented definition, pair by pair (``j <= limit`` instead of
    ``j <= i`` where per-query ``causal_limits`` are given)."""
    n = spans.total_length
    allowed = []
    for row, (start, length, blocks) in enumerate(zip(spans.starts, spans.lengths, spans.blocks)):
        end = start + length
        block_of = {}
        for index, (block_start, block_length) in enumerate(blocks):
            for position in range(block_start, block_start + block_length):
                block_of[position] = index
        limits = list(range(n)) if causal_limits is None else causal_limits[row].tolist()
        allowed.append([[i == j or (start <= i < end and start <= j < end
                                    and (j <= limits[i] or (i in block_of and block_of.get(j) == block_of[i])))
                         for j in range(n)] for i in range(n)])
    return torch.tensor(allowed, dtype=torch.bool)


def reference_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Explicit softmax over each query's allowed keys; query head ``h`` reads kv head ``h // groups``."""
    batch, heads, n, dim = q.shape
    kv_head = torch.arange(heads) // (heads // k.shape[1])
    rows = []
    for b in range(batch):
        keys_b, values_b = k[b, kv_head], v[b, kv_head]  # [h, n, d]
        scores_b = q[b] @ keys_b.transpose(-1, -2) / math.sqrt(dim)  # [h, n, n]; only allowed entries are read
        queries = []
        for i in range(n):
            keys = allowed[b, i].nonzero().flatten()
            scores = scores_b[:, i, keys]
            weights = (scores - scores.max(dim=-1, keepdim=True).values).exp()
            weights = weights / weights.sum(dim=-1, keepdim=True)
            queries.append((weights[:, :, None] * values_b[:, keys]).sum(dim=1))
        rows.append(torch.stack(queries, dim=1))
    return torch.stack(rows)


def random_qkv(spans: Spans, heads: int, kv_heads: int, dim: int, seed: int, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    batch, n = len(spans.lengths), spans.total_length
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [torch.randn(shape, generator=generator).requires_grad_(requires_grad) for shape in shapes]


def assert_close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# properties of the attention output

@given(spans=span_layouts(), heads=st.sampled_from(HEAD_CONFIGS), dim=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**31 - 1))
def test_dense_and_flex_match_brute_force(spans, heads, dim, seed):
    heads, kv_heads = heads
    layout = spans.layout()
    q, k, v = random_qkv(spans, heads, kv_heads, dim, seed)
    with torch.no_grad():
        dense = attend(q, k, v, AttentionMask(dense=layout.dense_mask()))
        flex = attend(q, k, v, AttentionMask(block_mask=layout.block_mask()))
        expected = reference_attention(q, k, v, reference_allowed(spans))
    assert_close(dense, expected)
    assert_close(flex, expected)
    assert_close(flex, dense)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_grouped_heads_on_a_fixed_layout(heads, kv_heads):
    spans = Spans(lengths=[5, 9, 3], starts=[4, 0, 2], blocks=[[(5, 3)], [(0, 2), (4, 5)], []], total_length=9)
    layout = spans.layout()
    q, k, v = random_qkv(spans, heads, kv_heads, 8, seed=0)
    expected = reference_attention(q, k, v, reference_allowed(spans))
    with torch.no_grad():
        assert_close(attend(q, k, v, AttentionMask(dense=layout.dense_mask())), expected)
        assert_close(attend(q, k, v, AttentionMask(block_mask=layout.block_mask())), expected)


@given(spans=span_layouts(), heads=st.sampled_from(HEAD_CONFIGS),
       seed=st.integers(0, 2**31 - 1))
def test_sdpa_gradients_match_brute_force(spans, heads, seed):
    heads, kv_heads = heads
    layout = spans.layout()
    q, k, v = random_qkv(spans, heads, kv_heads, 8, seed, requires_grad=True)
    upstream = torch.randn(len(spans.lengths), heads, spans.total_length, 8,
                           generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad((attend(q, k, v, AttentionMask(dense=layout.dense_mask())) * upstream).sum(), (q, k, v))
    expected = torch.autograd.grad((reference_attention(q, k, v, reference_allowed(spans)) * upstream).sum(), (q, k, v))
    for name, actual, wanted in zip("qkv", grads, expected):
        assert_close_f32(actual, wanted, msg=lambda m: f"grad of {name}: {m}")


@given(spans=span_layouts(max_batch=3, max_length=24), heads=st.sampled_from(HEAD_CONFIGS), data=st.data())
def test_causal_limits_match_brute_force(spans, heads, data):
    """With ``causal_limits`` the limit replaces the query index in ``j <= i``; all else is unchanged."""
    heads, kv_heads = heads
    batch, n = len(spans.lengths), spans.total_length
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="limits seed"))
    # about half the queries keep their own index as the limit, the rest get any index in [-1, n)
    limits = torch.where(torch.rand(batch, n, generator=generator) < 0.5, torch.arange(n).expand(batch, n),
                         torch.randint(-1, n, (batch, n), generator=generator))
    base = spans.layout()
    layout = TokenLayout(base.segment_ids, base.block_ids, limits)
    allowed = reference_allowed(spans, limits)
    assert torch.equal(layout.dense_mask()[:, 0], allowed)
    q, k, v = random_qkv(spans, heads, kv_heads, 8, data.draw(st.integers(0, 2**31 - 1), label="seed"))
    expected = reference_attention(q, k, v, allowed)
    with torch.no_grad():
        assert_close(attend(q, k, v, AttentionMask(dense=layout.dense_mask())), expected)
        assert_close(attend(q, k, v, AttentionMask(block_mask=layout.block_mask())), expected)


def test_padding_query_outputs_its_own_value():
    spans = Spans(lengths=[3], starts=[2], blocks=[[(2, 2)]], total_length=7)
    layout = spans.layout()
    q, k, v = random_qkv(spans, 2, 2, 8, seed=3)
    padding = layout.is_padding[0]
    with torch.no_grad():
        for mask in (AttentionMask(dense=layout.dense_mask()), AttentionMask(block_mask=layout.block_mask())):
            out = attend(q, k, v, mask)
            assert_close(out[0][:, padding], v[0][:, padding])


# properties of the mask itself

@given(spans=span_layouts())
def test_dense_mask_equals_the_rule_elementwise(spans):
    layout = spans.layout()
    mask = layout.dense_mask()
    assert mask.dtype == torch.bool and mask.shape == (len(spans.lengths), 1, spans.total_length, spans.total_length)
    assert torch.equal(mask[:, 0], reference_allowed(spans))
    assert bool(mask.any(dim=-1).all()), "every query row must see at least one key"


@given(spans=span_layouts(), data=st.data())
def test_suffix_chunk_mask_equals_rows_of_the_full_mask(spans, data):
    layout = spans.layout()
    split = data.draw(st.integers(0, spans.total_length - 1), label="split")
    chunk = TokenLayout(layout.segment_ids[:, split:], layout.block_ids[:, split:])
    full = layout.dense_mask()
    assert torch.equal(chunk.dense_mask(layout, query_offset=split), full[:, :, split:])
    # the flex mask of the chunk is the same mask
    flex = create_mask(chunk.mask_mod(layout, split), len(spans.lengths), None, chunk.shape[1], layout.shape[1], device="cpu")
    assert torch.equal(flex, full[:, :, split:])


@given(spans=span_layouts(max_batch=2, max_length=16), data=st.data())
def test_mask_mod_pointwise_equals_dense_mask(spans, data):
    layout = spans.layout()
    dense = layout.dense_mask()
    mask_mod = layout.mask_mod()
    n = spans.total_length
    # every point, through flex's own evaluation (vmap over b, h, q, kv)
    assert torch.equal(create_mask(mask_mod, len(spans.lengths), 1, n, n, device="cpu"), dense)
    # and some points one scalar at a time
    points = data.draw(st.lists(st.tuples(st.integers(0, len(spans.lengths) - 1), st.integers(0, n - 1),
                                          st.integers(0, n - 1)), min_size=1, max_size=20), label="points")
    for b, i, j in points:
        value = mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(i), torch.tensor(j))
        assert bool(value) == bool(dense[b, 0, i, j]), (b, i, j)


def test_from_spans_ids():
    layout = TokenLayout.from_spans(lengths=[3, 5], blocks=[[(2, 2)], [(3, 1), (0, 2)]], starts=[2, 0], total_length=6)
    P, N = PADDING, NO_BLOCK
    assert torch.equal(layout.segment_ids, torch.tensor([[P, P, 0, 0, 0, P], [0, 0, 0, 0, 0, P]]))
    assert torch.equal(layout.block_ids, torch.tensor([[N, N, 0, 0, N, N], [0, 0, N, 1, N, N]]))
    assert layout.segment_ids.dtype == layout.block_ids.dtype == torch.long
    # total_length defaults to the longest extent
    assert TokenLayout.from_spans(lengths=[2, 4], starts=[3, 0]).shape == (2, 5)


# packed rows

PACKED = [
    # segment ids, block ids (one row holding two samples, then padding)
    ([0, 0, 0, 1, 1, 1, 1, -1], [-1, 0, 0, -1, 1, 1, -1, -1]),
    ([0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, -1, -1, -1]),  # same block id in both samples
    ([-1, 0, 0, 0, 1, 1, 1, 1], [-1, -1, 3, 3, 3, 3, -1, -1]),
]


@pytest.mark.parametrize("segments, blocks", PACKED)
def test_packed_row_never_attends_across_samples(segments, blocks):
    layout = TokenLayout(torch.tensor([segments]), torch.tensor([blocks]))
    segment = layout.segment_ids[0]
    mask = layout.dense_mask()[0, 0]
    across = (segment[:, None] != segment[None, :]) & ~torch.eye(len(segments), dtype=torch.bool)
    assert not bool((mask & across).any())

    q, k, v = (torch.randn(1, 2, len(segments), 8) for _ in range(3))
    second = segment == 1
    index = second.nonzero().flatten()
    # sample 1 alone, in a row of its own, as a reference
    alone = TokenLayout(torch.zeros(1, len(index), dtype=torch.long), layout.block_ids[:, index])
    with torch.no_grad():
        expected = attend(q[:, :, index], k[:, :, index], v[:, :, index], AttentionMask(dense=alone.dense_mask()))
        k2, v2 = k.clone(), v.clone()
        k2[:, :, ~second], v2[:, :, ~second] = 100.0, -100.0  # the other tokens must not matter
        for mask in (AttentionMask(dense=layout.dense_mask()), AttentionMask(block_mask=layout.block_mask())):
            assert_close(attend(q, k, v, mask)[:, :, second], expected)
            assert_close(attend(q, k2, v2, mask)[:, :, second], expected)


# errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[6], blocks=[[(0, 3), (2, 2)]]), "overlaps"),
    (dict(lengths=[6], blocks=[[(3, 2), (0, 4)]]), "overlaps"),
    (dict(lengths=[4], blocks=[[(2, 3)]]), "exceeds the sample's extent"),
    (dict(lengths=[4], starts=[2], blocks=[[(0, 2)]]), "exceeds the sample's extent"),
    (dict(lengths=[4, 2], starts=[0, 3], total_length=4), r"sample 1 spans \[3, 5\)"),
    (dict(lengths=[4], starts=[-1]), "sample 0 spans"),
    (dict(lengths=[4], blocks=[[(1, 0)]]), "positive length"),
    (dict(lengths=[4], blocks=[[(1, -2)]]), "positive length"),
    (dict(lengths=[4, 4], starts=[0]), "`starts` and `blocks` need one entry per sample"),
    (dict(lengths=[4, 4], blocks=[[]]), "`starts` and `blocks` need one entry per sample"),
    (dict(lengths=[]), "`lengths`"),
])
def test_from_spans_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout.from_spans(**kwargs)
