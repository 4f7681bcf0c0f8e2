"""The static KV cache: chunked forwards through a cache equal one full forward over the sequence.

Every chunk of more than one token is run with both kernels (SDPA dense mask and eager flex);
single-token decode steps use SDPA.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import pytest
import torch

from _helpers import assert_close_f32
from mmgen_pytorch.backbone import KVCache, TokenLayout, Transformer, grid_positions

pytestmark = pytest.mark.usefixtures("eager_flex")  # flex uncompiled: these check masks, not the kernel

DIM = 32


def make_model(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    config = dict(dim=DIM, depth=2, heads=4, kv_heads=2, attn_backend="sdpa")
    return Transformer(**{**config, **kwargs}).eval()


def sliced(layout: Optional[TokenLayout], start: int, end: int) -> Optional[TokenLayout]:
    if layout is None:
        return None
    return TokenLayout(layout.segment_ids[:, start:end], layout.block_ids[:, start:end])


def chunk_backend(start: int, end: int, backend: str) -> str:
    return backend if end - start > 1 else "sdpa"


def run_chunks(model, x, bounds: Sequence[int], *, cache: KVCache, backend: str, layout=None, positions=None,
               **kwargs) -> torch.Tensor:
    """Run ``x`` chunk by chunk (``bounds`` are the chunk edges) through ``cache``; concatenate the outputs."""
    outputs: List[torch.Tensor] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        outputs.append(model(x[:, start:end], cache=cache, layout=sliced(layout, start, end),
                             positions=None if positions is None else positions[:, start:end],
                             backend=chunk_backend(start, end, backend), **kwargs))
    return torch.cat(outputs, dim=1)


def assert_close(actual, expected):
    assert_close_f32(actual, expected)


def snapshot(cache: KVCache):
    return dict(keys=cache.keys.clone(), values=cache.values.clone(), segment_ids=cache.segment_ids.clone(),
                block_ids=cache.block_ids.clone(), length=cache.length)


def assert_unchanged(cache: KVCache, before) -> None:
    """The cached contents [0, length), their layout ids and the length are untouched (a read-only chunk
    may use the free slots after `length` as scratch space)."""
    assert cache.length == before["length"]
    valid = before["length"]
    for name in ("keys", "values"):
        assert torch.equal(getattr(cache, name)[:, :, :, :valid], before[name][:, :, :, :valid]), f"cache.{name} changed"
    for name in ("segment_ids", "block_ids"):
        assert torch.equal(getattr(cache, name)[:, :valid], before[name][:, :valid]), f"cache.{name} changed"


BACKENDS = ["sdpa", "flex"]


# prefill + decode

@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefill", [1, 5])
def test_prefill_then_decode_equals_full_causal_forward(backend, prefill):
    model = make_model()
    x = torch.randn(2, 9, DIM)
    full = model(x)
    cache = model.new_cache(2, 12)
    steps = run_chunks(model, x, [0, prefill, *range(prefill + 1, 10)], cache=cache, backend=backend)
    assert_close(steps, full)
    assert cache.length == 9


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_ragged_left_padding(backend):
    model = make_model(1)
    lengths, total = [9, 4, 6], 9
    starts = [total - n for n in lengths]
    layout = TokenLayout.from_spans(lengths=lengths, starts=starts, total_length=total)
    positions = (torch.arange(total)[None] - torch.tensor(starts)[:, None]).clamp_min(0)
    x = torch.randn(3, total, DIM)
    full = model(x, layout=layout, positions=positions)
    cache = model.new_cache(3, total)
    # the prefill ends inside the padding of the shortest sample: its first decoded tokens are padding
    steps = run_chunks(model, x, [0, 4, *range(5, total + 1)], cache=cache, backend=backend, layout=layout,
                       positions=positions)
    assert_close(steps, full)  # padding rows included: they attend only to themselves
    assert torch.equal(cache.segment_ids, layout.segment_ids)
    # the padding tokens really are ignored: changing them changes no real token
    noisy = x.clone()
    noisy[layout.is_padding] = 100.0
    real = ~layout.is_padding
    assert_close(model(noisy, layout=layout, positions=positions)[real], full[real])


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_2d_positions(backend):
    model = make_model(2, rotary_axes=2)
    prefix, grid = 2, 3
    positions = torch.cat((torch.zeros(prefix, 2, dtype=torch.long), grid_positions(grid, grid)))
    positions = positions[None].expand(2, -1, -1)
    zero = (torch.arange(prefix + grid * grid) < prefix)[None].expand(2, -1)
    x = torch.randn(2, prefix + grid * grid, DIM)
    full = model(x, positions=positions, zero_rotation=zero)
    cache = model.new_cache(2, 16)
    outputs = [model(x[:, :4], positions=positions[:, :4], zero_rotation=zero[:, :4], cache=cache, backend=backend)]
    for t in range(4, x.shape[1]):
        outputs.append(model(x[:, t:t + 1], positions=positions[:, t:t + 1], zero_rotation=zero[:, t:t + 1],
                             cache=cache))
    assert_close(torch.cat(outputs, dim=1), full)


# a bidirectional chunk against a cached prefix

def prefix_and_block_layout(prefix: int, chunk: int, tail: int = 0):
    """Three left-padded rows: a block in the prefix, then a block spanning exactly the chunk."""
    total = prefix + chunk + tail
    lengths = [total, total - 2, total - 3]
    starts = [total - n for n in lengths]
    blocks = [[(4, 2), (prefix, chunk)], [(3, 3), (prefix, chunk)], [(prefix, chunk)]]
    layout = TokenLayout.from_spans(lengths=lengths, starts=starts, blocks=blocks, total_length=total)
    positions = (torch.arange(total)[None] - torch.tensor(starts)[:, None]).clamp_min(0)
    return layout, positions


def model_cache_with_prefix(model, x, layout, positions, prefix) -> KVCache:
    cache = model.new_cache(x.shape[0], 16)
    model(x[:, :prefix], layout=sliced(layout, 0, prefix), positions=positions[:, :prefix], cache=cache)
    return cache


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write_cache", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_bidirectional_chunk_against_cached_prefix(backend, write_cache, static):
    model = make_model(3)
    prefix, chunk = 7, 5
    layout, positions = prefix_and_block_layout(prefix, chunk)
    x = torch.randn(3, prefix + chunk, DIM)
    full = model(x, layout=layout, positions=positions)
    full_flex = model(x, layout=layout, positions=positions, backend="flex")
    assert_close(full_flex, full)
    cache = model.new_cache(3, 16, static=static)
    model(x[:, :prefix], layout=sliced(layout, 0, prefix), positions=positions[:, :prefix], cache=cache, backend=backend)
    out = model(x[:, prefix:], layout=sliced(layout, prefix, prefix + chunk), positions=positions[:, prefix:],
                cache=cache, write_cache=write_cache, backend=backend)
    assert_close(out, full[:, prefix:])
    written = prefix + chunk if write_cache else prefix
    assert cache.length == written
    assert torch.equal(cache.layout.segment_ids, layout.segment_ids[:, :written])
    assert torch.equal(cache.layout.block_ids, layout.block_ids[:, :written])
    # the chunk is bidirectional: its first token depends on its last one
    changed = x.clone()
    changed[:, -1] += 1.0
    again = model(changed[:, prefix:], layout=sliced(layout, prefix, prefix + chunk), positions=positions[:, prefix:],
                  cache=model_cache_with_prefix(model, changed, layout, positions, prefix), write_cache=False, backend=backend)
    assert not torch.allclose(again[:, 0], out[:, 0])


# read-only chunks (denoising steps)

@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("static", [False, True])
def test_read_only_chunk_leaves_the_cache_unchanged(backend, static):
    """Static windows expose all 16 slots; the scratch left by longer read-only chunks stays hidden."""
    model = make_model(4)
    prefix, chunk, tail = 6, 4, 3
    layout, positions = prefix_and_block_layout(prefix, chunk, tail)
    x = torch.randn(3, prefix + chunk + tail, DIM)
    full = model(x, layout=layout, positions=positions)

    cache = model.new_cache(3, 16, static=static)
    out_prefix = model(x[:, :prefix], layout=sliced(layout, 0, prefix), positions=positions[:, :prefix], cache=cache)
    chunk_args = dict(layout=sliced(layout, prefix, prefix + chunk), positions=positions[:, prefix:prefix + chunk],
                      cache=cache, backend=backend)
    before = snapshot(cache)
    # "denoising steps": other inputs in the chunk's place, never written
    for _ in range(3):
        model(torch.randn(3, chunk, DIM), write_cache=False, **chunk_args)
        assert_unchanged(cache, before)
    longer = dict(layout=sliced(layout, prefix, prefix + chunk + tail), positions=positions[:, prefix:], cache=cache,
                  backend=backend)
    model(torch.randn(3, chunk + tail, DIM), write_cache=False, **longer)  # leaves scratch past the chunk
    assert_unchanged(cache, before)
    read_only = model(x[:, prefix:prefix + chunk], write_cache=False, **chunk_args)
    assert_unchanged(cache, before)
    written = model(x[:, prefix:prefix + chunk], write_cache=True, **chunk_args)
    assert_close(read_only, written)
    assert cache.length == prefix + chunk
    # the tail continues after the written chunk, token by token
    tail_out = run_chunks(model, x, list(range(prefix + chunk, prefix + chunk + tail + 1)), cache=cache,
                          backend="sdpa", layout=layout, positions=positions)
    assert_close(torch.cat((out_prefix, written, tail_out), dim=1), full)


# CFG-style doubled batch

@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_doubled_batch_in_one_cache(backend):
    model = make_model(5)
    cond, uncond = torch.randn(2, 8, DIM), torch.randn(2, 8, DIM)
    doubled = torch.cat((cond, uncond))  # conditional rows first
    cache = model.new_cache(4, 8)
    assert cache.batch_size == 4
    steps = run_chunks(model, doubled, [0, 3, 4, 5, 6, 7, 8], cache=cache, backend=backend)
    assert_close(steps, model(doubled))
    # each half equals running it alone
    for half, rows in ((cond, slice(0, 2)), (uncond, slice(2, 4))):
        alone = run_chunks(model, half, [0, 3, 4, 5, 6, 7, 8], cache=model.new_cache(2, 8), backend=backend)
        assert_close(steps[rows], alone)


# roll back

@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_rolls_back(backend):
    model = make_model(6)
    x = torch.randn(2, 10, DIM)
    cache = model.new_cache(2, 10)
    model(x[:, :4], cache=cache, backend=backend)
    first = model(x[:, 4:7], cache=cache, backend=backend)
    assert cache.length == 7
    cache.truncate(4)
    assert cache.length == 4
    assert torch.equal(model(x[:, 4:7], cache=cache, backend=backend), first)
    # roll back again and take a different continuation: equal to the full forward of that sequence
    cache.truncate(4)
    other = x.clone()
    other[:, 4:] = torch.randn(2, 6, DIM)
    rest = run_chunks(model, other, [4, 7, 8, 9, 10], cache=cache, backend=backend)
    assert_close(rest, model(other)[:, 4:])
    cache.reset()
    assert cache.length == 0
    assert_close(run_chunks(model, x, [0, 6, 10], cache=cache, backend=backend), model(x))
    with pytest.raises(ValueError, match="`length`"):
        cache.truncate(11)
    with pytest.raises(ValueError, match="`length`"):
        cache.truncate(-1)


@torch.no_grad()
def test_select_keeps_rows():
    model = make_model(7)
    x = torch.randn(3, 6, DIM)
    cache = model.new_cache(3, 6)
    model(x[:, :4], cache=cache)
    cache.select(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    out = run_chunks(model, x[[2, 0]], [4, 5, 6], cache=cache, backend="sdpa")
    assert_close(out, model(x[[2, 0]])[:, 4:])


# growth

@torch.no_grad()
@pytest.mark.parametrize("static", [False, True])
def test_reserve_grows_and_keeps_the_sequence(static):
    model = make_model(8)
    x = torch.randn(2, 11, DIM)
    cache = model.new_cache(2, 4, static=static)
    outputs = [model(x[:, :3], cache=cache)]
    for start in range(3, 11):
        cache.reserve(1)
        outputs.append(model(x[:, start:start + 1], cache=cache))
    assert cache.length == 11 and cache.max_length >= 11
    assert_close(torch.cat(outputs, dim=1), model(x))
    before = cache.max_length
    cache.reserve(cache.max_length - cache.length)  # fits: nothing moves
    assert cache.max_length == before


# errors

@torch.no_grad()
def test_overflow_raises():
    model = make_model()
    cache = model.new_cache(2, 6)
    model(torch.randn(2, 4, DIM), cache=cache)
    before = snapshot(cache)
    with pytest.raises(RuntimeError, match=r"overflow.*max_length=6"):
        model(torch.randn(2, 3, DIM), cache=cache)
    assert_unchanged(cache, before)
    with pytest.raises(RuntimeError, match=r"overflow.*max_length=6"):
        model(torch.randn(2, 3, DIM), cache=cache, write_cache=False)
    model(torch.randn(2, 2, DIM), cache=cache)  # exactly full is fine
    assert cache.length == 6


@torch.no_grad()
def test_batch_mismatch_raises():
    model = make_model()
    cache = model.new_cache(4, 6)
    with pytest.raises(ValueError, match="batch of 4.*batch of 2"):
        model(torch.randn(2, 3, DIM), cache=cache)
    assert cache.length == 0


# one mask per chunk layout: every denoising step of a modality reuses it

@pytest.fixture
def mask_builds(monkeypatch):
    """Query lengths of every dense mask and BlockMask built."""
    built: List[int] = []
    for name in ("dense_mask", "block_mask"):
        original = getattr(TokenLayout, name)

        def counted(self, *args, _original=original, **kwargs):
            built.append(self.shape[1])
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(TokenLayout, name, counted)
    return built


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_builds_one_mask_per_modality(backend, mask_builds):
    """A 16-step modality: its denoising steps and its final write share one mask; the prefill and every
    text step build their own (a text step's mask is one query row)."""
    from mmgen_pytorch import Transfusion

    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=16, dim_latent=4, modality_default_shape=(2, 3),
                        transformer=dict(dim=DIM, depth=2, heads=2, attn_backend=backend)).eval()
    prompt = torch.randint(0, 16, (5,))
    sample = model.sample(prompt, force_modality_at_start=0, modality_steps=16, max_length=24, cfg_scale=2.0,
                          progress=False, generator=0)
    modalities = sum(isinstance(item, tuple) for item in sample)
    chunk_length = model.placement.time_tokens + 6  # a modality's latents, after its time tokens
    assert mask_builds[0] > 5  # the prefill: the prompt plus the forced [meta] shape [som]
    assert mask_builds.count(chunk_length) == modalities >= 1
    assert len(mask_builds) > 1 + modalities  # and some one-token text steps
    assert all(length in (1, chunk_length) for length in mask_builds[1:])


def test_a_changed_sequence_rebuilds_the_mask(mask_builds):
    """The same chunk layout after the cached sequence changed (a commit, a truncation, kept rows) gets a
    new mask."""
    model = make_model()
    cache = model.new_cache(2, 16)
    chunk = TokenLayout.from_spans(lengths=[3, 3], blocks=[[(0, 3)], [(0, 3)]])
    x = torch.randn(2, 3, DIM)
    model(torch.randn(2, 4, DIM), cache=cache)
    for _ in range(3):
        model(x, layout=chunk, cache=cache, write_cache=False)
    assert mask_builds.count(3) == 1
    model(x, layout=chunk, cache=cache)  # the final write still shares it ...
    model(x, layout=chunk, cache=cache, write_cache=False)  # ... but after it the sequence is longer
    cache.truncate(4)
    model(x, layout=chunk, cache=cache, write_cache=False)
    cache.select(torch.tensor([1, 0]))
    model(x, layout=chunk, cache=cache, write_cache=False)
    assert mask_builds.count(3) == 4
