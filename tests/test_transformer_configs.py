"""Every configuration of the one Transformer against a naive forward written out here.

The reference reads the module's own weights and redoes the math step by step: norms, fused qkv
split, qk-norm, rotary as complex multiplication of adjacent channel pairs, grouped heads by
``repeat_interleave``, masked softmax with the layout's dense mask, SwiGLU / GELU, adaLN-Zero on
the tokens that carry a condition, final norm. Weights are randomised first (the zero-initialised
adaLN projection and the unit norm weights included) so no term can hide behind its init.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import assert_close_f32
from mmgen_pytorch.backbone import AttentionMask, RMSNorm, TokenLayout, Transformer, swiglu_hidden_dim

pytestmark = pytest.mark.usefixtures("eager_flex")  # flex uncompiled: these check masks, not the kernel

DIM, DEPTH, HEADS, DIM_COND, BASE = 64, 2, 4, 12, 10000.0


# the naive reference

def ref_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.Identity):
        return x
    if isinstance(norm, RMSNorm):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight
    assert isinstance(norm, nn.LayerNorm)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def ref_rotate(t: torch.Tensor, positions: torch.Tensor, axes: int) -> torch.Tensor:
    """``t`` [b, h, n, d]; positions [b, n, axes]. Pair ``p`` of axis group ``a = p // (d / 2 axes)``
    turns by ``positions[..., a] * base^(-2j / (d / axes))`` with ``j = p mod (d / 2 axes)``."""
    d = t.shape[-1]
    per_axis = d // axes
    j = torch.arange(per_axis // 2, dtype=torch.float64)
    freqs = BASE ** (-2 * j / per_axis)
    angles = torch.cat([positions[..., a, None].double() * freqs for a in range(axes)], dim=-1)  # b n d/2
    turn = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None]  # b 1 n d/2
    pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def ref_attention(attn, x, dense_mask, positions, axes) -> torch.Tensor:
    b, n, _ = x.shape
    h, kvh, dh = attn.heads, attn.kv_heads, attn.dim_head
    qkv = x @ attn.to_qkv.weight.T + (attn.to_qkv.bias if attn.to_qkv.bias is not None else 0)
    q, k, v = qkv[..., :h * dh], qkv[..., h * dh:(h + kvh) * dh], qkv[..., (h + kvh) * dh:]
    q, k, v = (t.reshape(b, n, -1, dh).transpose(1, 2) for t in (q, k, v))
    if isinstance(attn.q_norm, RMSNorm):
        q, k = ref_norm(attn.q_norm, q), ref_norm(attn.k_norm, k)
    if axes:
        q, k = ref_rotate(q, positions, axes), ref_rotate(k, positions, axes)
    k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
    scores = scores.masked_fill(~dense_mask, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, n, h * dh)
    return out @ attn.to_out.weight.T + (attn.to_out.bias if attn.to_out.bias is not None else 0)


def ref_feed_forward(ff, x) -> torch.Tensor:
    hidden = x @ ff.proj_in.weight.T + (ff.proj_in.bias if ff.proj_in.bias is not None else 0)
    if ff.kind == "swiglu":
        width = hidden.shape[-1] // 2
        hidden = F.silu(hidden[..., :width]) * hidden[..., width:]
    else:
        hidden = F.gelu(hidden)
    return hidden @ ff.proj_out.weight.T + (ff.proj_out.bias if ff.proj_out.bias is not None else 0)


def ref_block(block, x, dense_mask, positions, axes, cond, cond_mask) -> torch.Tensor:
    attn = lambda t: ref_attention(block.attn, t, dense_mask, positions, axes)  # noqa: E731
    if cond is None:
        x = x + attn(ref_norm(block.attn_norm, x))
        return x + ref_feed_forward(block.ff, ref_norm(block.ff_norm, x))
    linear = block.modulation.to_modulation
    mod = F.silu(cond) @ linear.weight.T + linear.bias
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.chunk(6, dim=-1)
    carries = cond_mask[..., None]
    normed = ref_norm(block.attn_norm, x)
    x = x + torch.where(carries, gate_a, 1.0) * attn(torch.where(carries, normed * (1 + scale_a) + shift_a, normed))
    normed = ref_norm(block.ff_norm, x)
    update = ref_feed_forward(block.ff, torch.where(carries, normed * (1 + scale_f) + shift_f, normed))
    return x + torch.where(carries, gate_f, 1.0) * update


def reference_forward(model, x, *, layout, positions, axes, cond=None, cond_mask=None) -> torch.Tensor:
    """``layout=None``: every token sees every token."""
    n = x.shape[1]
    dense_mask = layout.dense_mask() if layout is not None else torch.ones(1, 1, n, n, dtype=torch.bool)
    if positions is not None and positions.ndim == 2:
        positions = positions[..., None].expand(-1, -1, max(axes, 1))
    for block in model.layers:
        x = ref_block(block, x, dense_mask, positions, axes, cond, cond_mask)
    return ref_norm(model.norm, x)


# helpers

def randomize(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = parameter.shape[-1] ** -0.5 if parameter.ndim > 1 else 0.5  # keeps activations O(1)
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)
    return model


def random_layout(batch: int, n: int) -> TokenLayout:
    return TokenLayout.from_spans(lengths=[n, n - 3, n - 5][:batch], starts=[0, 3, 1][:batch],
                                  blocks=[[(2, 4), (9, 3)], [(5, 5)], [(1, 2), (4, 1), (7, 5)]][:batch],
                                  total_length=n)


def random_positions(batch: int, n: int, axes: int, generator) -> Optional[torch.Tensor]:
    if axes == 0:
        return None
    shape = (batch, n) if axes == 1 else (batch, n, axes)
    return torch.randint(0, 20, shape, generator=generator)


# the configuration table: a pairwise covering of the options

FACTORS = dict(norm=["rmsnorm", "layernorm"], ff=["swiglu", "gelu"], grouped=[False, True], qkv_bias=[False, True],
               ff_bias=[False, True], qk_norm=[False, True], cond=[False, True], rotary_axes=[0, 1, 2])
CONFIGS = [
    ("layernorm", "swiglu", False, True, False, False, True, 1),
    ("rmsnorm", "gelu", True, False, True, True, False, 1),
    ("layernorm", "gelu", True, False, False, False, True, 0),
    ("rmsnorm", "swiglu", False, True, True, True, False, 0),
    ("layernorm", "gelu", False, True, False, True, False, 2),
    ("rmsnorm", "swiglu", True, False, True, False, True, 2),
    ("rmsnorm", "swiglu", False, False, False, False, False, 1),
    ("layernorm", "swiglu", True, True, True, True, True, 1),
]


def config_id(config) -> str:
    return "-".join(f"{name}={value}" for name, value in zip(FACTORS, config))


def test_config_table_covers_every_pair_of_options():
    names = list(FACTORS)
    for a, b in itertools.combinations(range(len(names)), 2):
        seen = {(row[a], row[b]) for row in CONFIGS}
        for pair in itertools.product(FACTORS[names[a]], FACTORS[names[b]]):
            assert pair in seen, f"{names[a]}={pair[0]}, {names[b]}={pair[1]} is never tested"


def build(config, seed: int = 0) -> Transformer:
    norm, ff, grouped, qkv_bias, ff_bias, qk_norm, cond, axes = config
    torch.manual_seed(seed)
    model = Transformer(dim=DIM, depth=DEPTH, heads=HEADS, kv_heads=HEADS // 2 if grouped else HEADS, norm=norm,
                        ff=ff, ff_hidden=48, qkv_bias=qkv_bias, ff_bias=ff_bias, out_bias=qkv_bias, qk_norm=qk_norm,
                        dim_cond=DIM_COND if cond else None, rotary_axes=axes, rotary_base=BASE, attn_backend="sdpa")
    return randomize(model, seed).eval()


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_naive_reference(config):
    *_, with_cond, axes = config
    model = build(config)
    generator = torch.Generator().manual_seed(1)
    batch, n = 3, 16
    x = torch.randn(batch, n, DIM, generator=generator)
    layout = random_layout(batch, n)
    positions = random_positions(batch, n, axes, generator)
    cond = cond_mask = None
    if with_cond:
        cond = torch.randn(batch, n, DIM_COND, generator=generator)
        cond_mask = torch.rand(batch, n, generator=generator) < 0.5
    expected = reference_forward(model, x, layout=layout, positions=positions, axes=axes, cond=cond, cond_mask=cond_mask)
    kwargs = dict(layout=layout, positions=positions, cond=cond, cond_mask=cond_mask)
    with torch.no_grad():
        assert_close_f32(model(x, **kwargs), expected)
        assert_close_f32(model(x, backend="flex", **kwargs), expected)
    # gradients flow to every parameter through the SDPA path
    model(x, **kwargs).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached {missing}"


def test_default_positions_and_partial_rotary():
    torch.manual_seed(0)
    model = randomize(Transformer(dim=DIM, depth=DEPTH, heads=HEADS, rotary_dim=8, attn_backend="sdpa"), 2).eval()
    x = torch.randn(2, 10, DIM)
    layout = TokenLayout.causal(2, 10)
    with torch.no_grad():
        out = model(x)
    dh = DIM // HEADS

    # reference: rotary on the first 8 channels only, positions arange
    def rotate_partial(t, positions, axes):
        return torch.cat((ref_rotate(t[..., :8], positions, axes), t[..., 8:]), dim=-1)

    positions = torch.arange(10)[None, :, None].expand(2, -1, 1)
    dense = layout.dense_mask()
    h = x
    for block in model.layers:
        attn = block.attn
        b, n, _ = h.shape
        normed = ref_norm(block.attn_norm, h)
        q, k, v = (normed @ attn.to_qkv.weight.T).split(HEADS * dh, dim=-1)
        q, k, v = (t.reshape(b, n, HEADS, dh).transpose(1, 2) for t in (q, k, v))
        q, k = rotate_partial(q, positions, 1), rotate_partial(k, positions, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~dense, float("-inf"))
        h = h + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, DIM) @ attn.to_out.weight.T
        h = h + ref_feed_forward(block.ff, ref_norm(block.ff_norm, h))
    assert_close_f32(out, ref_norm(model.norm, h))


# adaLN

def cond_model(seed: int = 0, random_weights: bool = True) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(dim=32, depth=DEPTH, heads=HEADS, dim_cond=DIM_COND, attn_backend="sdpa")
    return (randomize(model, seed) if random_weights else model).eval()


@torch.no_grad()
def test_text_tokens_before_the_first_conditioned_token_are_untouched():
    model = cond_model()
    x, cond = torch.randn(2, 12, 32), torch.randn(2, 12, DIM_COND)
    cond_mask = torch.zeros(2, 12, dtype=torch.bool)
    cond_mask[0, 5:9] = True
    cond_mask[1, 7:] = True
    plain = model(x)
    conditioned = model(x, cond=cond, cond_mask=cond_mask)
    assert torch.equal(conditioned[0, :5], plain[0, :5])
    assert torch.equal(conditioned[1, :7], plain[1, :7])
    assert not torch.allclose(conditioned[0, 5:], plain[0, 5:])  # the condition does act
    # no token carrying the condition: the unconditioned model, bit for bit
    assert torch.equal(model(x, cond=cond, cond_mask=torch.zeros_like(cond_mask)), plain)
    # cond_mask defaults to every token
    assert torch.equal(model(x, cond=cond), model(x, cond=cond, cond_mask=torch.ones_like(cond_mask)))


@torch.no_grad()
def test_cond_table_with_index_equals_per_token_cond():
    model = cond_model(1)
    x, table = torch.randn(2, 9, 32), torch.randn(3, DIM_COND)
    index = torch.tensor([[-1, -1, 0, 0, 0, -1, 2, 2, -1], [1, 1, 1, -1, -1, -1, -1, 0, 0]])
    out = model(x, cond=table, cond_index=index)
    per_token = model(x, cond=table[index.clamp_min(0)], cond_mask=index >= 0)
    assert_close_f32(out, per_token)
    layout = TokenLayout.causal(2, 9)
    expected = reference_forward(model, x, layout=layout, positions=torch.arange(9)[None].expand(2, -1), axes=1,
                                 cond=table[index.clamp_min(0)], cond_mask=index >= 0)
    assert_close_f32(out, expected)


@torch.no_grad()
def test_zero_init_adaln():
    """adaLN-Zero as in DiT: a fresh model's modulation is all zeros, so for conditioned tokens
    shift = scale = gate = 0 and every block is the identity; unconditioned tokens that do not
    see a conditioned token equal the unconditioned model exactly."""
    model = cond_model(random_weights=False)
    for block in model.layers:  # randomise everything but the adaLN projections
        for parameter in block.attn.parameters():
            parameter.normal_()
    x, cond = torch.randn(2, 10, 32), torch.randn(2, 10, DIM_COND)
    cond_mask = torch.zeros(2, 10, dtype=torch.bool)
    cond_mask[:, 6:] = True
    plain = model(x)
    out, hiddens = model(x, cond=cond, cond_mask=cond_mask, return_hiddens=True)
    assert torch.equal(out[:, :6], plain[:, :6])
    for hidden in hiddens:
        assert torch.equal(hidden[:, 6:], x[:, 6:])
    assert torch.equal(out[:, 6:], model.norm(x[:, 6:]))
    assert torch.equal(model(x, cond=cond, cond_mask=torch.zeros_like(cond_mask)), plain)


# the SwiGLU width rule

@pytest.mark.parametrize("dim, hidden", [(768, 2048), (1024, 2816), (1280, 3584), (1536, 4096), (2560, 6912),
                                         (2048, 5632), (3200, 8704), (4096, 11008)])
def test_swiglu_hidden_dim_matches_llamagen(dim, hidden):
    def find_multiple(n: int, k: int) -> int:  # LlamaGen's helper
        return n if n % k == 0 else n + k - (n % k)

    assert find_multiple(int(2 * 4 * dim / 3), 256) == hidden
    assert swiglu_hidden_dim(dim) == hidden


@pytest.mark.parametrize("dim, multiplier, multiple_of, hidden", [(4096, 1.3, 1024, 14336), (8192, 1.3, 4096, 28672)])
def test_swiglu_hidden_dim_with_llama_multiplier(dim, multiplier, multiple_of, hidden):
    assert swiglu_hidden_dim(dim, multiplier=multiplier, multiple_of=multiple_of) == hidden


def test_ff_hidden_defaults():
    assert Transformer(dim=768, depth=1, heads=12).layers[0].ff.proj_in.out_features == 2 * 2048
    gelu = Transformer(dim=64, depth=1, heads=4, ff="gelu", ff_mult=3.0).layers[0].ff
    assert (gelu.proj_in.out_features, gelu.proj_out.in_features) == (192, 192)


# intermediate layers

@torch.no_grad()
def test_return_hiddens():
    model = randomize(Transformer(dim=32, depth=3, heads=4, attn_backend="sdpa"), 3).eval()
    x = torch.randn(2, 7, 32)
    out, hiddens = model(x, return_hiddens=True)
    assert len(hiddens) == 3 and all(h.shape == x.shape for h in hiddens)
    assert torch.equal(out, model(x))
    torch.testing.assert_close(model.norm(hiddens[-1]), out, atol=0, rtol=0)
    # each hidden is the previous one through the next block
    mask, rotary = AttentionMask(is_causal=True), model.rotary(torch.arange(7)[None].expand(2, -1))
    previous = x
    for block, hidden in zip(model.layers, hiddens):
        assert_close_f32(block(previous, mask=mask, rotary=rotary), hidden)
        previous = hidden


@torch.no_grad()
@pytest.mark.parametrize("inject_after", [0, 1])
def test_block_hook_replaces_the_residual_stream(inject_after):
    model = randomize(Transformer(dim=32, depth=3, heads=4, attn_backend="sdpa"), 4).eval()
    x, extra = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    seen = []

    def hook(index, hidden):
        seen.append(index)
        return hidden + extra if index == inject_after else None

    out, hiddens = model(x, block_hook=hook, return_hiddens=True)
    assert seen == [0, 1, 2]
    mask, rotary = AttentionMask(is_causal=True), model.rotary(torch.arange(7)[None].expand(2, -1))
    h = x
    for index, block in enumerate(model.layers):
        h = block(h, mask=mask, rotary=rotary, layer_index=index)
        if index == inject_after:
            h = h + extra
        assert_close_f32(hiddens[index], h)
    assert_close_f32(out, model.norm(h))
    assert not torch.allclose(out, model(x))


# dropout

@pytest.mark.parametrize("knob", ["attn_dropout", "resid_dropout", "ff_dropout", "ff_hidden_dropout"])
def test_dropout_only_in_train_mode(knob):
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=2, heads=4, attn_backend="sdpa", **{knob: 0.5})
    x = torch.randn(2, 8, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    # without dropout, train and eval agree
    torch.manual_seed(0)
    plain = Transformer(dim=32, depth=2, heads=4, attn_backend="sdpa")
    assert torch.equal(plain.train()(x), plain.eval()(x))


# non-causal encoders and gradient checkpointing

@torch.no_grad()
def test_non_causal_sees_every_token():
    config = ("layernorm", "gelu", True, True, True, True, False, 1)
    model = build(config)
    model.causal = False
    x = torch.randn(2, 10, DIM)
    expected = reference_forward(model, x, layout=None, positions=torch.arange(10)[None].expand(2, -1), axes=1)
    assert_close_f32(model(x), expected)
    fresh = Transformer(dim=32, depth=1, heads=4, causal=False, attn_backend="sdpa").eval()
    y = torch.randn(1, 6, 32)
    changed = y.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(fresh(y)[:, 0], fresh(changed)[:, 0])  # the first token sees the last
    # a layout still decides when one is given
    layout = TokenLayout.causal(1, 6)
    torch.testing.assert_close(fresh(y, layout=layout)[:, 0], fresh(changed, layout=layout)[:, 0], atol=0, rtol=0)


def test_grad_checkpointing_changes_nothing():
    config = ("rmsnorm", "swiglu", True, False, True, True, True, 2)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, DIM, generator=generator)
    kwargs = dict(layout=random_layout(3, 16), positions=random_positions(3, 16, 2, generator),
                  cond=torch.randn(3, 16, DIM_COND, generator=generator),
                  cond_mask=torch.rand(3, 16, generator=generator) < 0.5)
    results = []
    for checkpointing in (False, True):
        model = build(config).train()
        model.grad_checkpointing = checkpointing
        out = model(x, **kwargs)
        out.square().mean().backward()
        results.append((out.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain, atol=0, rtol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
