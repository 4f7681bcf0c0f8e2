"""The compiled decode step (``compile=True``): the same generations as eager decoding, and a graph
compiled once per chunk shape, never once per position.

The LlamaGen test goes through inductor (the default mode on CPU, what users get); the others capture
with ``aot_eager`` (Dynamo + AOTAutograd, no code generation), which checks the same things (one full
graph per chunk shape, no recompile per position, the host side kept out of the graph) within the
file's CI budget. Graph counts come from ``torch._dynamo.utils.counters``.
"""

from functools import lru_cache

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from _helpers import perturbed
from mmgen_pytorch import DnDTransformer, LlamaGen, Transfusion
from mmgen_pytorch.backbone import Decoder, Transformer, transformer as transformer_module
from test_decoding import EmbedChunk, run_with

pytestmark = pytest.mark.slow

LOGITS_TOL = dict(rtol=1e-4, atol=1e-4)  # logits of magnitude ~1-10; inductor reorders reductions


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    """The compiled step captured by Dynamo and AOTAutograd, without inductor's code generation."""
    @lru_cache(maxsize=None)
    def compiled_step(mode: str):
        return torch.compile(Transformer._blocks, fullgraph=True, dynamic=False, backend="aot_eager")

    monkeypatch.setattr(transformer_module, "_compiled_step", compiled_step)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def generate_both(model, positions: int, **kwargs):
    kwargs = dict(cfg_scale=2.0, greedy=True, return_logits=True, progress=False, max_new_tokens=positions, **kwargs)
    return model.generate([1, 3], **kwargs), model.generate([1, 3], compile=True, **kwargs)


def assert_same_generation(eager, compiled):
    (codes, logits), (compiled_codes, compiled_logits) = eager, compiled
    assert torch.equal(codes, compiled_codes)
    torch.testing.assert_close(compiled_logits, logits, **LOGITS_TOL)


@torch._inductor.config.patch(compile_threads=1)  # no pool of compile workers to start on a 2-core runner
def test_llamagen_inductor_equals_eager_with_one_graph_for_every_position():
    """4 positions compile the step once (the prefill runs eagerly); 8 positions, a later call whose
    positions 5..8 the graph never saw, compile nothing more."""
    torch.manual_seed(0)
    model = perturbed(LlamaGen(dim=32, depth=1, heads=2, vocab_size=64, grid_size=4, num_classes=10), std=0.3).eval()
    assert_same_generation(*generate_both(model, 4))
    assert graphs() == 1
    assert_same_generation(*generate_both(model, 8))
    assert graphs() == 1


def test_dnd_equals_eager_and_stops_only_at_its_heads(aot_eager):
    """The depth heads sample eagerly between compiled segments: blocks 0-1, then block 2."""
    torch.manual_seed(0)
    model = perturbed(DnDTransformer(dim=32, depth=3, heads=2, head_positions=(1, 2), vocab_size=64, grid_size=4,
                                     num_classes=10), std=0.3).eval()
    assert_same_generation(*generate_both(model, 3))
    assert graphs() == 2
    assert_same_generation(*generate_both(model, 6))
    assert graphs() == 2


def test_transfusion_text_and_modality_sampling_equal_eager(aot_eager):
    """One graph for the text steps, one for the modality's denoising steps and its final write."""
    torch.manual_seed(0)
    model = perturbed(Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                                  transformer=dict(dim=32, depth=1, heads=2, dim_head=16, attn_backend="sdpa"))).eval()
    prompts = [[torch.randint(0, 32, (4,))], [torch.randint(0, 32, (7,))]]

    def sample(compile: bool):
        return model.sample(prompts, max_length=30, cfg_scale=3.0, modality_steps=3, text_top_k=1,
                            force_modality_at_start=0, generator=torch.Generator().manual_seed(3), progress=False,
                            compile=compile)

    eager, compiled = sample(False), sample(True)
    assert graphs() == 2
    for eager_sample, compiled_sample in zip(eager, compiled):
        kinds = [type(item) for item in eager_sample]
        assert kinds == [type(item) for item in compiled_sample] and tuple in kinds and kinds[-1] is torch.Tensor
        for a, b in zip(eager_sample, compiled_sample):
            if isinstance(a, tuple):
                assert a[0] == b[0]
                torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5 * a[1].abs().max().item())
            else:
                assert torch.equal(a, b)


def test_growth_and_row_selection_under_compile(aot_eager):
    """The host side grows the cache (``reserve``) and drops rows (``select``); each new buffer shape is
    one more graph, and the outputs stay the eager decoder's."""
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=1, heads=2, attn_backend="sdpa").eval()
    rows, prefix = 3, 250
    x = torch.randn(rows, prefix + 11, 32)
    outputs = []
    with torch.no_grad():
        for compile in (False, True):
            decoder = Decoder(run_with(model), new_cache=model.new_cache, rows=rows, max_length=prefix + 1,
                              compile=compile)
            out = [decoder.write(EmbedChunk(x[:, :prefix]))]  # the prefill: eager either way
            out.append(decoder.write(EmbedChunk(x[:, prefix:prefix + 1])))
            out.append(decoder.read(EmbedChunk(x[:, prefix + 1:prefix + 9])))  # 259 > 256 slots: grows
            out.append(decoder.write(EmbedChunk(x[:, prefix + 1:prefix + 9])))
            out.append(decoder.write(EmbedChunk(x[:, prefix + 9:prefix + 10])))
            decoder.keep_rows([2, 0])
            out.append(decoder.write(EmbedChunk(x[[2, 0], prefix + 10:prefix + 11])))
            assert decoder.length == prefix + 11
            outputs.append(out)
    assert graphs() == 4  # 1 token on 256 slots; 8 tokens, 1 token on 512; 1 token of 2 rows
    for eager, compiled in zip(*outputs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


def test_a_hook_after_the_last_block_comes_before_the_final_norm(aot_eager):
    """A transformer with its final norm and a hook acting after its last block: the hook sees (and the
    hidden states return) the last block's output, the norm comes after, as in eager decoding."""
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=2, heads=2, attn_backend="sdpa").eval()
    seen = []

    def hook(index, hidden):
        if index == 1:
            seen.append(hidden.clone())
            return hidden * 2.0
    hook.blocks = (1,)
    x = torch.randn(2, 5, 32)
    results = []
    with torch.no_grad():
        for compiled in (False, True):
            cache = model.new_cache(2, 256, static=True, compiled=compiled)
            model(x[:, :4], cache=cache, block_hook=hook)
            results.append(model(x[:, 4:], cache=cache, block_hook=hook, return_hiddens=True))
    (eager, eager_hiddens), (out, hiddens) = results
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hiddens[-1], eager_hiddens[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[3], seen[1], rtol=1e-5, atol=1e-5)  # the hook's input: not normed
    assert graphs() == 2  # one segment (blocks 0-1) per chunk length (4, 1); the norm after the hook runs eagerly
