"""Transfusion on random ragged batches: properties that must hold whatever the batch holds.

A batch is 1-4 samples; a sample interleaves text segments (possibly empty, possibly none at all) with
0-3 modalities of three types of rank 1, 2 and 3, of random small shapes. One tiny model serves every
test. Its text head carries a bias towards ``[meta]``, shape characters and ``[som]`` so that sampling
emits modalities (valid shapes, invalid ones that fall back to the default) instead of only text.

The properties: the flex and SDPA backends agree with each other and with every sample run alone;
a sample's losses and logits do not depend on its batch; cached decoding equals the uncached replay;
a seed fixes every random draw. ``HYPOTHESIS_PROFILE=thorough`` scales every example count up.
"""

from __future__ import annotations

import functools
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _helpers import assert_close_f32
from mmgen_pytorch import Transfusion

pytestmark = pytest.mark.usefixtures("eager_flex")  # flex uncompiled: these check masks, not the kernel

NUM_TEXT_TOKENS = 16
DIM_LATENTS = (4, 6, 3)
DEFAULT_SHAPES = ((3,), (2, 2), (1, 2, 2))  # ranks 1, 2, 3
MAX_SIDE = 3

# the loaded profile's example count (100 under "ci"); each test takes a share of it
BUDGET = settings().max_examples


def examples(percent: int):
    return settings(max_examples=max(1, BUDGET * percent // 100))


# the model

@functools.cache
def shared_model() -> Transfusion:
    """Built once, outside the tests' arguments (hypothesis would print it with every failing example)."""
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=NUM_TEXT_TOKENS, dim_latent=DIM_LATENTS, modality_default_shape=DEFAULT_SHAPES,
                        transformer=dict(dim=32, depth=2, heads=2, dim_head=16, attn_backend="sdpa"))
    model.to_text_logits = structure_biased_head(model)
    return model.eval()


def structure_biased_head(model: Transfusion, bias: float = 3.0) -> nn.Linear:
    """The model's text head plus a bias that makes ``[meta]``, ``1``-``3``, ``,`` and ``[som]`` likely."""
    vocab = model.vocab
    head = nn.Linear(model.dim, vocab.size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.to_text_logits.weight)
        head.bias.zero_()
        favoured = [vocab.meta, *vocab.shape_ids((1, 2, 3)), *(vocab.som(m) for m in range(len(DIM_LATENTS)))]
        head.bias[favoured] = bias
    return head


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def backend(model: Transfusion, name: str):
    previous = model.transformer.attn_backend
    model.transformer.attn_backend = name
    try:
        yield
    finally:
        model.transformer.attn_backend = previous


# random ragged batches: specs drawn by hypothesis, tensors from a seeded generator

@dataclass(frozen=True)
class Text:
    length: int


@dataclass(frozen=True)
class Latent:
    modality: int
    shape: Tuple[int, ...]
    time: float

    @property
    def count(self) -> int:
        return math.prod(self.shape)


SampleSpec = List[object]  # Text and Latent items, in order

TIMES = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))  # repeated times share a table row


@st.composite
def latents(draw) -> Latent:
    modality = draw(st.integers(0, len(DIM_LATENTS) - 1))
    rank = len(DEFAULT_SHAPES[modality])
    shape = tuple(draw(st.lists(st.integers(1, MAX_SIDE), min_size=rank, max_size=rank)))
    return Latent(modality, shape, draw(TIMES))


@st.composite
def sample_specs(draw, max_text: int = 6) -> SampleSpec:
    """0-3 modalities and 0-3 text segments (0-``max_text`` tokens each), shuffled; never no item at all."""
    modalities = draw(st.lists(latents(), max_size=3))
    texts = draw(st.lists(st.builds(Text, st.integers(0, max_text)), min_size=0 if modalities else 1, max_size=3))
    return draw(st.permutations(modalities + texts))


def batch_specs(max_batch: int = 4):
    return st.lists(sample_specs(), min_size=1, max_size=max_batch)


@dataclass
class Sample:
    items: list           # the model's input: text tensors and (modality, latent) tuples
    times: List[float]    # one per modality
    noise: List[torch.Tensor]


def materialize(spec: SampleSpec, generator: torch.Generator) -> Sample:
    items, times, noise = [], [], []
    for item in spec:
        if isinstance(item, Text):
            items.append(torch.randint(0, NUM_TEXT_TOKENS, (item.length,), generator=generator))
            continue
        dim = DIM_LATENTS[item.modality]
        items.append((item.modality, torch.randn(*item.shape, dim, generator=generator)))
        times.append(item.time)
        noise.append(torch.randn(item.count, dim, generator=generator))
    return Sample(items, times, noise)


def materialize_batch(specs: List[SampleSpec], seed: int) -> List[Sample]:
    generator = torch.Generator().manual_seed(seed)
    return [materialize(spec, generator) for spec in specs]


def token_count(spec: SampleSpec) -> int:
    """Training sequence length: [sos] ... [eos], each modality ``[meta] shape [som] latents [eom]``, plus a
    noised copy of every modality that is not the last item."""
    count = 2
    for index, item in enumerate(spec):
        if isinstance(item, Text):
            count += item.length
            continue
        count += 3 + len(",".join(map(str, item.shape))) + item.count
        count += item.count if index < len(spec) - 1 else 0
    return count


@dataclass
class Run:
    logits: torch.Tensor             # [b, n, vocab]: a linear image of every hidden state (latents included)
    outputs: List[torch.Tensor]      # per modality type present: the objective's predictions
    text: torch.Tensor               # [b] per-sample text loss
    flow: torch.Tensor               # [b, types] per-sample flow loss (nan where absent)


@torch.no_grad()
def run(model: Transfusion, samples: List[Sample]) -> Run:
    kwargs = dict(times=[s.times for s in samples], noise=[s.noise for s in samples])
    logits, outputs = model([s.items for s in samples], return_loss=False, **kwargs)
    _, breakdown = model([s.items for s in samples], return_breakdown=True, **kwargs)
    return Run(logits, outputs, breakdown.text_per_sample, breakdown.flow_per_sample)


def assert_same_sample(actual: Run, row: int, expected: Run, expected_row: int, length: int, atol: float = 1e-5):
    """Row ``row`` of ``actual`` holds the sample that ``expected`` holds in ``expected_row``."""
    close = dict(atol=atol, rtol=1e-5)
    torch.testing.assert_close(actual.logits[row, :length], expected.logits[expected_row, :length], atol=atol, rtol=0)
    torch.testing.assert_close(actual.text[row], expected.text[expected_row], **close)
    torch.testing.assert_close(actual.flow[row], expected.flow[expected_row], equal_nan=True, **close)


# (a) flex == SDPA == each sample alone

@examples(100)
@given(specs=batch_specs(), seed=st.integers(0, 2**31 - 1))
def test_flex_equals_sdpa_equals_each_sample_alone(specs, seed):
    model = shared_model()
    samples = materialize_batch(specs, seed)
    sdpa = run(model, samples)
    with backend(model, "flex"):
        flex = run(model, samples)
    assert_close_f32(flex.logits, sdpa.logits)
    assert len(flex.outputs) == len(sdpa.outputs)
    for a, b in zip(flex.outputs, sdpa.outputs):
        assert_close_f32(a, b)
    torch.testing.assert_close(flex.text, sdpa.text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex.flow, sdpa.flow, atol=1e-5, rtol=1e-5, equal_nan=True)

    for row, (spec, sample) in enumerate(zip(specs, samples)):
        alone = run(model, [sample])
        assert alone.logits.shape[1] == token_count(spec)
        assert_same_sample(sdpa, row, alone, 0, token_count(spec))
        present = {item.modality for item in spec if isinstance(item, Latent)}
        assert {m for m in range(len(DIM_LATENTS)) if not alone.flow[0, m].isnan()} == present


# (b) batch invariance

@examples(100)
@given(specs=batch_specs(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_per_sample_results_do_not_depend_on_the_batch(specs, seed, data):
    """Any rearrangement of the samples (reordered, some left out, some repeated) keeps each sample's
    logits and losses."""
    model = shared_model()
    samples = materialize_batch(specs, seed)
    order = data.draw(st.lists(st.integers(0, len(specs) - 1), min_size=1, max_size=4), label="order")
    original = run(model, samples)
    rearranged = run(model, [samples[i] for i in order])
    for row, source in enumerate(order):
        assert_same_sample(rearranged, row, original, source, token_count(specs[source]))


# (c) cached == uncached decoding

@st.composite
def sampling_setups(draw):
    prompts = draw(st.lists(st.one_of(st.none(), sample_specs(max_text=4)), min_size=1, max_size=3))
    force = draw(st.one_of(st.none(), st.integers(0, len(DIM_LATENTS) - 1), latents()))
    if isinstance(force, Latent):
        force = (force.modality, force.shape)
    return dict(prompts=prompts, force=force, cfg_scale=draw(st.sampled_from([1.0, 2.5])),
                modality_steps=draw(st.integers(1, 2)), max_modalities=draw(st.sampled_from([None, 1, 2])),
                new_tokens=draw(st.integers(1, 14)), seed=draw(st.integers(0, 2**31 - 1)))


def prompt_length(spec: Optional[SampleSpec]) -> int:
    """Tokens of a prompt: [sos] and the items, without [eos] or noised copies."""
    spec = spec or []
    return 1 + sum(item.length if isinstance(item, Text) else 3 + len(",".join(map(str, item.shape))) + item.count
                   for item in spec)


def sample_with(model: Transfusion, setup: dict, *, use_cache: bool, generator: Optional[torch.Generator]):
    contents = torch.Generator().manual_seed(setup["seed"])
    prompts = [materialize(spec, contents).items if spec else None for spec in setup["prompts"]]
    forced = 0
    if setup["force"] is not None:  # [meta] "3,3,3" [som] at most, plus one; the forced modality and its [eom]
        modality, shape = setup["force"] if isinstance(setup["force"], tuple) else (setup["force"], None)
        shape = shape or model.modalities[modality].default_shape  # (a requested modality that cannot fit is refused)
        forced = 2 + 2 * MAX_SIDE + model.placement.length(shape) + 1
    max_length = max(prompt_length(p) for p in setup["prompts"]) + forced + setup["new_tokens"]
    return model.sample(prompts, max_length=max_length, cfg_scale=setup["cfg_scale"], text_min_p=0.0,
                        modality_steps=setup["modality_steps"], max_modalities=setup["max_modalities"],
                        force_modality_at_start=setup["force"], use_cache=use_cache, generator=generator,
                        progress=False)


def assert_same_samples(actual, expected, atol: float):
    assert len(actual) == len(expected)
    for got, wanted in zip(actual, expected):
        assert [type(i) for i in got] == [type(i) for i in wanted]
        for a, b in zip(got, wanted):
            if isinstance(a, tuple):
                assert a[0] == b[0] and a[1].shape == b[1].shape
                torch.testing.assert_close(a[1], b[1], atol=atol, rtol=0)
            else:
                assert torch.equal(a, b)


@examples(30)
@given(setup=sampling_setups(), cached_backend=st.sampled_from(["sdpa", "flex"]))
def test_cached_sampling_equals_uncached_replay(setup, cached_backend):
    model = shared_model()
    with backend(model, cached_backend):
        cached = sample_with(model, setup, use_cache=True, generator=torch.Generator().manual_seed(setup["seed"]))
    uncached = sample_with(model, setup, use_cache=False, generator=torch.Generator().manual_seed(setup["seed"]))
    assert_same_samples(cached, uncached, atol=1e-4)


# (d) determinism under a seed

@examples(20)
@given(specs=batch_specs(), seed=st.integers(0, 2**31 - 1), prob_uncond=st.sampled_from([0.0, 0.5]))
def test_forward_is_determined_by_the_torch_seed(specs, seed, prob_uncond):
    """Times, noise and the CFG text drop all come from torch's generator: Python's is irrelevant."""
    model = shared_model()
    samples = materialize_batch(specs, seed)
    results = []
    for call, draw_seed in enumerate((seed, seed, seed + 1)):
        torch.manual_seed(draw_seed)
        random.seed(call)
        with torch.no_grad():
            results.append(model([s.items for s in samples], return_breakdown=True, prob_uncond=prob_uncond)[1])
    first, again, other = results
    for name, a, b in zip(first._fields, first, again):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, y, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
    if any(isinstance(item, Latent) for spec in specs for item in spec):
        assert not torch.equal(first.total, other.total), "the seed must reach the drawn times and noise"


@examples(15)
@given(setup=sampling_setups(), through_generator=st.booleans())
def test_sampling_is_determined_by_the_seed(setup, through_generator):
    model = shared_model()
    outputs = []
    for _ in range(2):
        torch.manual_seed(setup["seed"])
        generator = torch.Generator().manual_seed(setup["seed"]) if through_generator else None
        outputs.append(sample_with(model, setup, use_cache=True, generator=generator))
    assert_same_samples(*outputs, atol=0.0)
