"""transfusion-pytorch's Transformer options on our backbone, each against a reference written out here.

The reference (float64, causal, no rotary) reads the module's own weights and redoes every block by
hand: RMSNorm, fused qkv split, grouped heads, the value residual mix, soft-capped logits, LASER's
``log(softmax(qk) @ exp(softclamp(v)))``, per-head output gates, SwiGLU, and the U-ViT long skips.
Weights are redrawn first so that no option hides behind its init.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from _helpers import assert_close_f32, reinitialised
from mmgen_pytorch.backbone import AttentionMask, Transformer
from mmgen_pytorch.backbone.attention import laser_attend
from mmgen_pytorch.saving import load_model
from mmgen_pytorch.transfusion import Transfusion

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")

DIM, HEADS, KV_HEADS = 16, 4, 2


def make_model(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed)
    config = dict(dim=DIM, depth=2, heads=HEADS, kv_heads=KV_HEADS, rotary_axes=0, attn_backend="sdpa")
    return reinitialised(Transformer(**{**config, **kwargs}), seed)


# the reference

def ref_rmsnorm(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight.double()


def ref_linear(x, linear):
    return x @ linear.weight.double().T + (linear.bias.double() if linear.bias is not None else 0)


def ref_heads(t, dim_head):
    return t.reshape(*t.shape[:2], -1, dim_head).transpose(1, 2)  # b h n d


def ref_attention(attn, h, first_values):
    """One attention layer on normed input ``h``; returns its output and its unmixed values."""
    b, n, _ = h.shape
    dh, groups = attn.dim_head, attn.heads // attn.kv_heads
    qkv = ref_linear(h, attn.to_qkv)
    q, k, v = (ref_heads(t, dh) for t in qkv.split([attn.heads * dh, attn.kv_heads * dh, attn.kv_heads * dh], -1))
    if not isinstance(attn.q_norm, torch.nn.Identity):
        q, k = ref_rmsnorm(q, attn.q_norm), ref_rmsnorm(k, attn.k_norm)
    values = v
    if first_values is not None:
        mix = torch.sigmoid(ref_linear(h, attn.to_value_mix)).transpose(1, 2)[..., None]  # b kvh n 1
        v = v * mix + first_values * (1 - mix)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if attn.softcap:
        logits = attn.softcap * torch.tanh(logits / attn.softcap)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    if attn.laser:
        v = torch.exp(attn.laser_softclamp_value * torch.tanh(v / attn.laser_softclamp_value))
    out = logits.softmax(dim=-1) @ v
    if attn.laser:
        out = out.log()
    if attn.to_gates is not None:
        out = out * torch.sigmoid(ref_linear(h, attn.to_gates)).transpose(1, 2)[..., None]
    return ref_linear(out.transpose(1, 2).reshape(b, n, -1), attn.to_out), values


def ref_swiglu(ff, h):
    gate, up = ref_linear(h, ff.proj_in).chunk(2, dim=-1)
    return ref_linear(F.silu(gate) * up, ff.proj_out)


def ref_forward(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    x, depth = x.double(), len(model.layers)
    skips, first_values = [], None
    for index, block in enumerate(model.layers):
        if model.skip_projs is not None and index < depth // 2:
            skips.append(x)
        elif model.skip_projs is not None and index >= depth - depth // 2:  # mirror of block depth - 1 - index
            x = x + ref_linear(torch.cat((x, skips.pop()), dim=-1), model.skip_projs[index - (depth - depth // 2)])
        attn_out, values = ref_attention(block.attn, ref_rmsnorm(x, block.attn_norm), first_values)
        if model.use_value_residual and index == 0:
            first_values = values
        x = x + attn_out
        x = x + ref_swiglu(block.ff, ref_rmsnorm(x, block.ff_norm))
    return ref_rmsnorm(x, model.norm)


OPTIONS = {
    "plain": {},
    "value_residual": dict(use_value_residual=True, depth=3),
    "laser": dict(attn_laser=True),
    "laser_tight_clamp": dict(attn_laser=True, attn_kwargs=dict(laser_softclamp_value=0.5)),
    "unet_even": dict(unet_skips=True, depth=4),
    "unet_odd": dict(unet_skips=True, depth=5),
    "softcap": dict(attn_kwargs=dict(softcap_value=0.5)),
    "gates": dict(attn_kwargs=dict(gate_values=True)),
    "qk_rmsnorm": dict(qk_rmsnorm=True),
    "all": dict(depth=4, unet_skips=True, use_value_residual=True, attn_laser=True, qk_rmsnorm=True,
                attn_kwargs=dict(softcap_value=2.0, gate_values=True, laser_softclamp_value=3.0)),
}


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_against_reference(name, backend):
    model = make_model(**OPTIONS[name])
    x = torch.randn(2, 7, DIM)
    assert_close_f32(model(x, backend=backend), ref_forward(model, x).float(), tol=1e-5, amplification=10)


@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "plain"])
def test_cached_decode_equals_full_forward(name):
    model = make_model(**OPTIONS[name])
    x = torch.randn(2, 8, DIM)
    full = model(x)
    cache = model.new_cache(2, 8)
    steps = [model(x[:, :3], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(3, 8)]
    assert_close_f32(torch.cat(steps, dim=1), full, amplification=10)


def test_unet_skips_shapes_pairs_and_gradients():
    model = make_model(depth=5, unet_skips=True, use_value_residual=True)
    assert [tuple(p.shape) for p in model.skip_projs.parameters()] == [(DIM, 2 * DIM)] * 2
    visited = []
    hooks = [projection.register_forward_hook(lambda module, inputs, out, i=i: visited.append(i))
             for i, projection in enumerate(model.skip_projs)]
    model(torch.randn(2, 5, DIM)).square().mean().backward()
    for hook in hooks:
        hook.remove()
    assert visited == [0, 1]
    for name, param in model.named_parameters():
        if "skip_projs" in name or "to_value_mix" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.layers[0].attn.to_value_mix is None  # the first block is the source of the residual


@pytest.mark.parametrize("depth, count", [(1, 0), (2, 1), (3, 1), (6, 3)])
def test_unet_skip_count_follows_depth(depth, count):
    model = make_model(depth=depth, unet_skips=True)
    assert len(model.skip_projs) == count
    assert model(torch.randn(1, 3, DIM)).shape == (1, 3, DIM)


# seeded init and recorded config

# position-weighted sums of the seeded init of this config, recorded before these options existed
SEEDED_FINGERPRINT = {
    "layers.0.attn.to_qkv.weight": 1.9265051, "layers.0.attn.to_out.weight": 1.7681921,
    "layers.0.ff.proj_in.weight": 6.5670544, "layers.0.ff.proj_out.weight": 2.537214,
    "layers.1.attn.to_qkv.weight": 0.0092201, "layers.1.attn.to_out.weight": -2.1982667,
    "layers.1.ff.proj_in.weight": -8.0414791, "layers.1.ff.proj_out.weight": -0.7078034,
    "layers.2.attn.to_qkv.weight": -1.7478212, "layers.2.attn.to_out.weight": -0.5571885,
    "layers.2.ff.proj_in.weight": 1.916686, "layers.2.ff.proj_out.weight": 0.6338835,
}
NORMS_AND_ZEROS = ["attn_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight", "ff_norm.weight",
                   "modulation.to_modulation.weight", "modulation.to_modulation.bias"]
OFF = dict(use_flex_attn=None, unet_skips=False, use_value_residual=False, attn_laser=False, ff_expansion_factor=None,
           qk_rmsnorm=None, dropout=None, attn_kwargs=None, ff_kwargs=None)


def seeded(**kwargs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dim=32, depth=3, heads=4, kv_heads=2, dim_cond=8, qk_norm=True, **kwargs)


def weighted_sum(t: torch.Tensor) -> float:
    return float((t.double().flatten() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64)).sum())


def test_existing_config_keeps_its_keys_and_seeded_init():
    state = seeded().state_dict()
    expected_keys = [f"layers.{i}.{name}" for i in range(3) for name in
                     ["attn_norm.weight", "attn.to_qkv.weight", "attn.to_out.weight", "attn.q_norm.weight",
                      "attn.k_norm.weight", "ff_norm.weight", "ff.proj_in.weight", "ff.proj_out.weight",
                      "modulation.to_modulation.weight", "modulation.to_modulation.bias"]] + ["norm.weight"]
    assert list(state) == expected_keys
    for key, value in SEEDED_FINGERPRINT.items():
        assert weighted_sum(state[key]) == pytest.approx(value, rel=1e-6, abs=1e-6), key
    off = seeded(**OFF).state_dict()
    assert all(torch.equal(off[key], state[key]) for key in state) and list(off) == list(state)


def test_unet_skips_leave_the_blocks_seeded_init_alone():
    plain, skipped = seeded().state_dict(), seeded(unet_skips=True).state_dict()
    assert sorted(set(skipped) - set(plain)) == ["skip_projs.0.weight"]
    assert all(torch.equal(skipped[key], plain[key]) for key in plain)


ALL_ON = dict(use_flex_attn=False, unet_skips=True, use_value_residual=True, attn_laser=True, ff_expansion_factor=3,
              qk_rmsnorm=True, dropout=0.1, attn_kwargs=dict(softcap_value=30.0, gate_values=True),
              ff_kwargs=dict(dropout=0.2))


def test_transformer_with_every_option_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Transformer(dim=DIM, depth=3, heads=2, **ALL_ON).eval()
    loaded = load_model(model.save(tmp_path / "transformer"))
    x = torch.randn(2, 5, DIM)
    assert type(loaded) is Transformer and loaded.attn_backend == "sdpa"
    assert torch.equal(loaded(x), model(x))


def test_transfusion_with_transformer_options_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=8, dim_latent=4, modality_default_shape=(3,),
                        transformer=dict(dim=DIM, depth=2, dim_head=8, **ALL_ON)).eval()
    loaded = load_model(model.save(tmp_path / "transfusion"))
    x = torch.randn(1, 6, DIM)
    assert loaded.transformer.skip_projs is not None and loaded.transformer.attn_backend == "sdpa"
    assert torch.equal(loaded.transformer(x), model.transformer(x))


# aliases and forwarded options

@pytest.mark.parametrize("use_flex_attn, attn_backend, resolved", [
    (None, "auto", "auto"), (True, "auto", "auto"), (False, "auto", "sdpa"), (True, "flex", "flex"),
    (False, "sdpa", "sdpa"), (None, "flex", "flex")])
def test_use_flex_attn_resolves_the_backend(use_flex_attn, attn_backend, resolved):
    assert make_model(use_flex_attn=use_flex_attn, attn_backend=attn_backend).attn_backend == resolved


@torch.no_grad()
def test_use_flex_attn_runs_where_flex_is_unavailable():
    """On CPU ``use_flex_attn=True`` means SDPA, as transfusion-pytorch falls back off CUDA."""
    model, sdpa = make_model(use_flex_attn=True, attn_backend="auto"), make_model()
    x = torch.randn(2, 6, DIM)
    assert model.resolve_backend(x, 6) == "sdpa"
    assert torch.equal(model(x), sdpa(x))


def test_aliases_set_our_options():
    model = make_model(qk_rmsnorm=True, dropout=0.25, ff_kwargs=dict(dropout=0.5))
    attn, ff = model.layers[0].attn, model.layers[0].ff
    assert not isinstance(attn.q_norm, torch.nn.Identity) and attn.attn_dropout == 0.25
    assert ff.hidden_dropout.p == 0.5 and ff.dropout.p == 0.0  # after the activation, as upstream's ff dropout
    assert make_model(qk_rmsnorm=True, qk_norm=True).layers[0].attn.k_norm.weight.shape == (DIM // HEADS,)


@torch.no_grad()
def test_qk_rmsnorm_makes_attention_invariant_to_the_scale_of_queries_and_keys():
    x = torch.randn(2, 6, DIM)
    outputs = {}
    for qk_rmsnorm in (True, False):
        model = make_model(qk_rmsnorm=qk_rmsnorm, depth=1)
        before = model(x)
        model.layers[0].attn.to_qkv.weight[:(HEADS + KV_HEADS) * (DIM // HEADS)] *= 10.0  # q and k rows
        outputs[qk_rmsnorm] = before, model(x)
    assert_close_f32(*outputs[True], tol=1e-4)  # up to the norm's eps
    assert (outputs[False][0] - outputs[False][1]).abs().max() > 0.1


def test_dropout_acts_on_the_attention_weights_in_training_only():
    model = make_model(dropout=0.5, depth=1)
    x = torch.randn(2, 6, DIM)
    model.train()
    torch.manual_seed(1)
    dropped = model(x)
    model.eval()
    assert not torch.allclose(dropped, model(x))
    assert model.resolve_backend(x, 6) == "sdpa"


def test_auto_backend_on_cuda_is_flex_except_for_dropout_and_decode_steps():
    """The rule of ``attn_backend="auto"`` for a CUDA input (only ``is_cuda`` is read): a training
    forward with attention dropout runs SDPA (flex has no dropout), never an error."""
    cuda_input = SimpleNamespace(is_cuda=True)
    model = make_model(attn_dropout=0.1, attn_backend="auto")
    assert model.train().resolve_backend(cuda_input, 6) == "sdpa"
    assert model.eval().resolve_backend(cuda_input, 6) == "flex"
    assert model.resolve_backend(cuda_input, 1) == "sdpa"  # a one-token decode step


@pytest.mark.parametrize("ff, factor, hidden", [("swiglu", 4, 42), ("swiglu", 2.5, 26), ("gelu", 4, 64)])
def test_ff_expansion_factor_is_upstreams_unrounded_width(ff, factor, hidden):
    model = make_model(ff=ff, ff_expansion_factor=factor)
    assert model.layers[0].ff.proj_out.in_features == hidden  # int(16 * f * 2 / 3) gated, 16 * f plain


@torch.no_grad()
def test_laser_stays_finite_in_half_precision_where_exp_overflows():
    """exp(softclamp(v)) reaches e^15 > float16's 65504; the max-shifted form does not overflow."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    v = 14.0 + torch.randn(1, 2, 5, 8)
    visible = torch.ones(5, 5, dtype=torch.bool).tril()
    half = laser_attend(q.half(), k.half(), v.half(), AttentionMask(dense=visible), softclamp_value=15.0)
    weights = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(~visible, -math.inf).softmax(-1)
    expected = (weights @ torch.exp(15 * torch.tanh(v.double() / 15))).log()
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.double(), expected, rtol=5e-3, atol=5e-3 * float(expected.abs().max()))


# bad values

@pytest.mark.parametrize("kwargs, error, names", [
    (dict(use_flex_attn="yes"), TypeError, "use_flex_attn"),
    (dict(use_flex_attn=True, attn_backend="sdpa"), ValueError, "use_flex_attn"),
    (dict(use_flex_attn=False, attn_backend="flex"), ValueError, "attn_backend"),
    (dict(unet_skips=1), TypeError, "unet_skips"),
    (dict(use_value_residual="true"), TypeError, "use_value_residual"),
    (dict(attn_laser=None), TypeError, "attn_laser"),
    (dict(qk_rmsnorm=1), TypeError, "qk_rmsnorm"),
    (dict(qk_rmsnorm=False, qk_norm=True), ValueError, "qk_rmsnorm"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(dropout=0.1, attn_dropout=0.2), ValueError, "attn_dropout"),
    (dict(ff_expansion_factor=0), ValueError, "ff_expansion_factor"),
    (dict(ff_expansion_factor=2, ff_hidden=32), ValueError, "ff_hidden"),
    (dict(ff_expansion_factor=2, ff_mult=3.0), ValueError, "ff_mult"),
    (dict(ff_expansion_factor=0.01), ValueError, "no hidden units"),
    (dict(attn_kwargs=[("gate_values", True)]), TypeError, "attn_kwargs"),
    (dict(attn_kwargs=dict(dropout=0.1)), TypeError, "'dropout'"),
    (dict(attn_kwargs=dict(softcap_value=-1.0)), ValueError, "softcap_value"),
    (dict(attn_kwargs=dict(laser_softclamp_value=0.0)), ValueError, "laser_softclamp_value"),
    (dict(attn_kwargs=dict(gate_values="no")), TypeError, "gate_values"),
    (dict(ff_kwargs=dict(expansion_factor=2)), TypeError, "'expansion_factor'"),
    (dict(ff_kwargs=dict(dropout=-0.1)), ValueError, "ff_kwargs['dropout']"),
    (dict(ff_kwargs=dict(dropout=0.1), ff_hidden_dropout=0.3), ValueError, "ff_hidden_dropout"),
])
def test_bad_option_values_raise_naming_the_argument(kwargs, error, names):
    with pytest.raises(error, match=names.replace("[", r"\[").replace("]", r"\]")):
        Transformer(dim=DIM, depth=2, heads=HEADS, **kwargs)
