"""The compiled flex kernel: ragged batches fall into a few padded lengths and each compiles once.

Random ragged Transfusion batches (the strategy of test_transfusion_properties.py, two samples each, long
enough to span several 128-token buckets) run through the flex backend, compiled as it always is outside
``eager_flex_attention()``, and through SDPA. Dynamo's counters must show at most one graph per bucket,
and torch's unfused fallback warning is an error here (as in the whole suite, pyproject.toml).
"""

import warnings
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import assert_close_f32
from mmgen_pytorch import MAR
from mmgen_pytorch.backbone import AttentionMask, TokenLayout, attend
from mmgen_pytorch.backbone.masks import FLEX_BLOCK
from test_transfusion_properties import Text, backend, materialize_batch, run, sample_specs, shared_model

pytestmark = pytest.mark.slow  # about 30 s of compilation on 2 cores

LEAD_TEXT = (0, 100, 230)
RAGGED_BATCHES = st.lists(st.tuples(st.lists(sample_specs(max_text=60), min_size=2, max_size=2),
                                    st.integers(0, 2**31 - 1)), min_size=20, max_size=20)


@contextmanager
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        yield torch._dynamo.utils.counters
    finally:
        torch._dynamo.reset()


@contextmanager
def recorded_bucket_shapes():
    """(batch, padded query length, padded key length) of every BlockMask built inside."""
    shapes = set()
    original = TokenLayout.block_mask

    def recorded(self, *args, **kwargs):
        block_mask = original(self, *args, **kwargs)
        shapes.add((self.shape[0], *block_mask.seq_lengths))
        return block_mask
    with mock.patch.object(TokenLayout, "block_mask", recorded):
        yield shapes


@settings(max_examples=1, deadline=None)  # one example: twenty batches
@given(batches=RAGGED_BATCHES)
def test_ragged_batches_compile_once_per_bucket(batches):
    model = shared_model()
    with fresh_dynamo() as counters, recorded_bucket_shapes() as bucket_shapes, warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")
        for index, (specs, seed) in enumerate(batches):
            lead = [Text(LEAD_TEXT[index % len(LEAD_TEXT)])]  # even the simplest draw spans several buckets
            samples = materialize_batch([lead + spec for spec in specs], seed)
            with backend(model, "flex"):
                flex = run(model, samples)
            sdpa = run(model, samples)
            assert_close_f32(flex.logits, sdpa.logits)
            assert_close_f32(flex.flow, sdpa.flow, equal_nan=True)
    assert all(q % FLEX_BLOCK == 0 and kv % FLEX_BLOCK == 0 for _, q, kv in bucket_shapes)
    assert len(bucket_shapes) >= 2  # the batches really were ragged across buckets
    assert 0 < counters["stats"]["unique_graphs"] <= len(bucket_shapes)


def test_lengths_in_one_bucket_share_the_kernel():
    """Ragged lengths up to 128: one compile; the outputs match SDPA's."""
    torch.manual_seed(0)
    with fresh_dynamo() as counters:
        check_lengths((5, 77, 128))
        assert counters["stats"]["unique_graphs"] == 1


def check_lengths(lengths):
    for length in lengths:
        layout = TokenLayout.from_spans(lengths=[length, length - 1], blocks=[[(0, length)], []])
        q, k, v = (torch.randn(2, 2, length, 16) for _ in range(3))
        flex = attend(q, k, v, AttentionMask(block_mask=layout.block_mask()))
        dense = attend(q, k, v, AttentionMask(dense=layout.dense_mask()))
        real = ~layout.is_padding[:, None, :, None]
        assert_close_f32(flex * real, dense * real)


@torch.no_grad()
def test_mar_runs_flex_by_name():
    """MAR's attention is unmasked: "auto" runs SDPA; "flex" by name runs the compiled flex kernel over
    one all-visible block, with the same loss."""
    config = dict(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                  decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1, diffloss_width=32,
                  num_sampling_steps="4")
    torch.manual_seed(0)
    sdpa = MAR(**config).eval()
    flex = MAR(**config, attn_backend="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    latents, labels = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    with fresh_dynamo() as counters:
        losses = [model(latents, labels, generator=torch.Generator().manual_seed(0)) for model in (sdpa, flex)]
        assert counters["stats"]["unique_graphs"] == 1  # the flex kernel (SDPA is not compiled)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
