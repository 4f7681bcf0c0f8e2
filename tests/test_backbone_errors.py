"""Bad inputs to the backbone fail early, with the right exception and a message naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

from mmgen_pytorch.backbone import KVCache, RotaryEmbedding, TokenLayout, Transformer

DIM = 32


def model(**kwargs) -> Transformer:
    return Transformer(**{**dict(dim=DIM, depth=1, heads=4, attn_backend="sdpa"), **kwargs})


def x(batch=2, length=5, dim=DIM, dtype=torch.float32):
    return torch.zeros(batch, length, dim, dtype=dtype)


def full_cache_call():
    m = model()
    cache = m.new_cache(2, 6)
    m(x(length=4), cache=cache)
    m(x(length=3), cache=cache)


def layout(batch=2, length=5):
    return TokenLayout.causal(batch, length)


CONSTRUCTION = [
    # (id, callable, exception, message fragment)
    ("kv_heads", lambda: model(heads=4, kv_heads=3), ValueError, "`heads` (4) must be divisible by `kv_heads` (3)"),
    ("dim_by_heads", lambda: model(dim=30, heads=4), ValueError, "`dim` (30) must be divisible by `heads` (4)"),
    ("non_positive_dim", lambda: model(dim=0), ValueError, "`dim`, `depth` and `heads` must be positive"),
    ("non_positive_depth", lambda: model(depth=0), ValueError, "`dim`, `depth` and `heads` must be positive"),
    ("norm", lambda: model(norm="batchnorm"), ValueError, "`norm` must be one of"),
    ("ff", lambda: model(ff="relu"), ValueError, "`ff` must be one of"),
    ("attn_backend", lambda: model(attn_backend="flash"), ValueError, "`attn_backend` must be one of"),
    ("rotary_axes", lambda: model(rotary_axes=-1), ValueError, "`rotary_axes` must be >= 1"),
    ("rotary_dim_axes", lambda: model(dim=48, heads=4, rotary_axes=4), ValueError,
     "rotary dim (12) must be <= dim_head (12) and divisible by 2 * axes (8)"),
    ("rotary_dim_partial", lambda: model(rotary_axes=2, rotary_dim=6), ValueError, "rotary dim (6)"),
    ("rotary_dim_too_big", lambda: RotaryEmbedding(8, rot_dim=16), ValueError, "rotary dim (16) must be <= dim_head (8)"),
    ("cache_sizes", lambda: KVCache(num_layers=1, batch_size=0, max_length=4, kv_heads=1, dim_head=8), ValueError,
     "KVCache sizes"),
    ("layout_shapes", lambda: TokenLayout(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)),
     ValueError, "`segment_ids` and `block_ids` must both be [batch, length]"),
    ("layout_rank", lambda: TokenLayout(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)),
     ValueError, "`segment_ids` and `block_ids` must both be [batch, length]"),
    ("layout_float", lambda: TokenLayout(torch.zeros(2, 5), torch.zeros(2, 5)), ValueError,
     "`segment_ids` and `block_ids` must be integer tensors"),
    ("layout_float_blocks", lambda: TokenLayout(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5)), ValueError,
     "must be integer tensors"),
]

FORWARD = [
    ("x_rank", lambda: model()(torch.zeros(5, DIM)), ValueError, "`x` must be a float tensor [batch, length, 32]"),
    ("x_width", lambda: model()(x(dim=16)), ValueError, "`x` must be a float tensor [batch, length, 32], got (2, 5, 16)"),
    ("x_not_a_tensor", lambda: model()([[0.0] * DIM]), ValueError, "`x` must be a float tensor"),
    ("x_integer", lambda: model()(x(dtype=torch.long)), ValueError, "`x` must be floating point"),
    ("x_empty", lambda: model()(x(length=0)), ValueError, "`x` must hold at least one token"),
    ("backend", lambda: model()(x(), backend="flash"), ValueError, "`backend` must be one of"),
    ("positions_float", lambda: model()(x(), positions=torch.zeros(2, 5)), ValueError,
     "`positions` must be an integer tensor"),
    ("positions_shape", lambda: model()(x(), positions=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     "`positions` must be [batch=2, length=5] or [batch, length, axes], got (2, 4)"),
    ("positions_rank", lambda: model()(x(), positions=torch.zeros(2, 5, 1, 1, dtype=torch.long)), ValueError,
     "`positions` must be [batch=2, length=5] or [batch, length, axes], got (2, 5, 1, 1)"),
    ("positions_axes", lambda: model(rotary_axes=2)(x(), positions=torch.zeros(2, 5, 3, dtype=torch.long)),
     ValueError, "`positions` must have 2 coordinate(s) per token"),
    ("zero_rotation_dtype", lambda: model()(x(), zero_rotation=torch.zeros(2, 5, dtype=torch.long)), ValueError,
     "`zero_rotation` must be a bool tensor [2, 5]"),
    ("zero_rotation_shape", lambda: model()(x(), zero_rotation=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     "`zero_rotation` must be a bool tensor [2, 5]"),
    ("cond_without_dim_cond", lambda: model()(x(), cond=torch.zeros(2, 5, 8)), ValueError,
     "`cond` was given but the transformer was built without `dim_cond`"),
    ("cond_shape", lambda: model(dim_cond=8)(x(), cond=torch.zeros(2, 5, 7)), ValueError,
     "`cond` must be [batch=2, length=5, dim_cond=8]"),
    ("cond_mask_without_cond", lambda: model(dim_cond=8)(x(), cond_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "`cond_mask` was given without `cond`"),
    ("cond_mask_dtype", lambda: model(dim_cond=8)(x(), cond=torch.zeros(2, 5, 8), cond_mask=torch.ones(2, 5)),
     ValueError, "`cond_mask` must be a bool tensor [2, 5]"),
    ("layout_shape", lambda: model()(x(), layout=layout(length=4)), ValueError,
     "`layout` must describe [batch=2, length=5] tokens, got (2, 4)"),
    ("layout_type", lambda: model()(x(), layout=torch.zeros(2, 5, dtype=torch.long)), ValueError,
     "`layout` must be a TokenLayout, got Tensor"),
    ("layout_batch", lambda: model()(x(), layout=layout(batch=3)), ValueError, "`layout` must describe"),
    ("cache_overflow", full_cache_call, RuntimeError, "KV cache overflow: 4 cached + 3 new tokens exceed max_length=6"),
    ("cache_batch", lambda: model()(x(), cache=model().new_cache(3, 8)), ValueError,
     "the cache holds a batch of 3, but the input has a batch of 2"),
    ("cache_truncate", lambda: model().new_cache(2, 8).truncate(1), ValueError, "`length` must be in [0, 0]"),
    ("compiled_cache_not_static", lambda: model().new_cache(2, 8, compiled=True), ValueError,
     "a KVCache with `compiled=True` needs `static=True`"),
    ("compiled_hook_without_blocks", lambda: model()(x(), cache=model().new_cache(2, 8, static=True, compiled=True),
                                                     block_hook=lambda index, hidden: None), ValueError,
     "a `block_hook` run through a compiled KV cache must name the blocks after which it acts in its attribute "
     "`blocks` (block indices in [0, 1)), got None"),
    ("flex_attn_dropout", lambda: model(attn_dropout=0.1).train()(x(), backend="flex"), ValueError,
     "flex attention does not support attention dropout"),
    ("flex_backward_on_cpu", lambda: model()(x(), backend="flex"), NotImplementedError,
     "flex attention has no backward pass on CPU: run it under torch.no_grad()"),
]


@pytest.mark.parametrize("make, error, fragment", [case[1:] for case in CONSTRUCTION + FORWARD],
                         ids=[case[0] for case in CONSTRUCTION + FORWARD])
def test_bad_input_raises(make, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        make()


def test_errors_are_raised_before_any_cache_write():
    m = model()
    cache = m.new_cache(2, 8)
    m(x(length=3), cache=cache)
    keys = cache.keys.clone()
    for bad in (dict(positions=torch.zeros(2, 5)), dict(layout=layout(length=4))):
        with pytest.raises(ValueError):
            m(x(), cache=cache, **bad)
        assert cache.length == 3 and torch.equal(cache.keys, keys)


def test_a_hook_the_compiled_step_cannot_place_is_refused_before_the_cache_is_touched():
    m = model()
    cache = m.new_cache(2, 8, static=True, compiled=True)
    ids = cache.segment_ids.clone()
    with pytest.raises(ValueError, match="block_hook"):
        m(x(), cache=cache, block_hook=lambda index, hidden: None)
    assert cache.length == 0 and torch.equal(cache.segment_ids, ids)
