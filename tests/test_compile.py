"""``torch.compile`` of every model's training forward on CPU: the compiled loss equals the eager one and
the compiled backward gives the eager gradients. Transfusion goes through inductor (generated C++, built
with the system compiler); the others through ``aot_eager`` (Dynamo capture + AOTAutograd, no codegen),
which keeps the file within its CI budget. Graph breaks are allowed, errors are not."""

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch import nn, randint, randn

from _helpers import perturbed
from mmgen_pytorch import MAR, DnDTransformer, LlamaGen, MonoFormer, Transfusion
from mmgen_pytorch.backbone import Transformer

# about 3 minutes of compilation on 2 cores (half of it the Transfusion inductor test); CI runs it (plain
# `pytest` deselects no marker)
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")]

LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-3, atol=1e-5)  # inductor fuses and reorders reductions


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(model: nn.Module, step, forward=None):
    """Loss and gradients of ``model`` after one training step through ``forward`` (default: ``model``)
    with torch's global RNG seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = step(model if forward is None else forward)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_compiled_matches_eager(model: nn.Module, step, backend: str) -> None:
    eager_loss, eager_grads = run(model, step)
    loss, grads = run(model, step, torch.compile(model, backend=backend, dynamic=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was really compiled
    torch.testing.assert_close(loss, eager_loss, **LOSS_TOL)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], **GRAD_TOL, msg=lambda m: f"{name}: {m}")


@torch._inductor.config.patch(compile_threads=1)  # no pool of compile workers to start on a 2-core runner
def test_transfusion_inductor():
    """Random draws differ under inductor (its own RNG), so times and noise are given."""
    torch.manual_seed(0)
    model = perturbed(Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2), prob_uncond=0.0,
                                   transformer=dict(dim=32, depth=1, heads=2, dim_head=16, attn_backend="sdpa")))
    # equal text lengths and latent shapes in both samples keep the number of shape specialisations low
    batch = [[randint(0, 32, (4,)), randn(2, 2, 8), randint(0, 32, (4,))] for _ in range(2)]
    times, noise = [[0.3], [0.8]], [[randn(4, 8)], [randn(4, 8)]]
    assert_compiled_matches_eager(model, lambda m: m(batch, times=times, noise=noise), "inductor")


def test_monoformer_aot_eager():
    torch.manual_seed(0)
    model = perturbed(MonoFormer(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2, attn_backend="sdpa"),
                                  latent_channels=4, latent_size=4, patch_size=2, prob_uncond=0.5))
    batch = [[randint(0, 8, (3,)), randn(4, 4, 4)] for _ in range(2)]
    assert_compiled_matches_eager(model, lambda m: m(batch), "aot_eager")


def test_mar_aot_eager():
    torch.manual_seed(0)
    model = perturbed(MAR(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1,
                           encoder_heads=2, decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1,
                           diffloss_width=32, num_sampling_steps="4", diffusion_batch_mul=2, label_drop_prob=0.5))
    latents, labels = randn(2, 4, 4, 4), torch.tensor([1, 2])  # dropout layers draw from the seeded global RNG
    assert_compiled_matches_eager(model, lambda m: m(latents, labels, generator=torch.Generator().manual_seed(0)),
                                  "aot_eager")


def test_llamagen_aot_eager():
    torch.manual_seed(0)
    model = perturbed(LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, num_classes=5,
                                class_dropout_prob=0.5), std=0.2)
    codes, labels = randint(0, 24, (2, 3, 3)), torch.tensor([1, 3])
    assert_compiled_matches_eager(model, lambda m: m(codes, class_labels=labels), "aot_eager")


def test_dnd_aot_eager():
    torch.manual_seed(0)
    model = perturbed(DnDTransformer(dim=32, depth=4, heads=2, head_positions=(1, 3), vocab_size=24, grid_size=3,
                                      num_classes=5, cls_token_num=2), std=0.2)
    codes, labels = randint(0, 24, (2, 3, 3, 2)), torch.tensor([1, 3])
    assert_compiled_matches_eager(model, lambda m: m(codes, class_labels=labels), "aot_eager")


# the flex backend inside a compiled model (forward only: flex has no backward on CPU)

def with_backend(model: nn.Module, backend: str) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Transformer):
            module.attn_backend = backend
    return model


FLEX_CASES = {
    "transfusion": (lambda: Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                                        transformer=dict(dim=32, depth=1, heads=2, dim_head=16)),
                    lambda m: m([[randint(0, 32, (4,)), randn(2, 2, 8), randint(0, 32, (3,))]] * 2,
                                times=[[0.3], [0.8]], noise=[[randn(4, 8)]] * 2)),
    "monoformer": (lambda: MonoFormer(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2), latent_channels=4,
                                      latent_size=4, patch_size=2),
                   lambda m: m([[randint(0, 8, (3,)), randn(4, 4, 4)]] * 2)),
    "mar": (lambda: MAR(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                        decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1, diffloss_width=32,
                        num_sampling_steps="4", diffusion_batch_mul=2),
            lambda m: m(randn(2, 4, 4, 4), torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))),
    "llamagen": (lambda: LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, num_classes=5),
                 lambda m: m(randint(0, 24, (2, 3, 3)), class_labels=torch.tensor([1, 3]))),
    "dnd": (lambda: DnDTransformer(dim=32, depth=4, heads=2, head_positions=(1, 3), vocab_size=24, grid_size=3,
                                   num_classes=5, cls_token_num=2),
            lambda m: m(randint(0, 24, (2, 3, 3, 2)), class_labels=torch.tensor([1, 3]))),
}


@pytest.mark.parametrize("name", FLEX_CASES)
@torch.no_grad()
def test_compiled_model_with_flex_equals_eager_sdpa(name):
    """``torch.compile(model)`` with every transformer on the flex backend: the graph takes flex attention
    in (dynamo's flex operator, no separate kernel compile) and the loss equals the eager SDPA one."""
    build, step = FLEX_CASES[name]
    torch.manual_seed(0)
    inputs_seed = torch.randint(0, 2**31, ()).item()
    model = perturbed(build()).eval()

    def loss(forward):
        torch.manual_seed(inputs_seed)
        return step(forward)
    eager = loss(with_backend(model, "sdpa"))
    compiled = loss(torch.compile(with_backend(model, "flex"), backend="aot_eager", dynamic=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(compiled, eager, **LOSS_TOL)
