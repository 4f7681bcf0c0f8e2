"""Every model under DistributedDataParallel and FSDP2 (``fully_shard``) on 2 CPU ranks (gloo).

Each rank builds the same model and takes half of a fixed global batch; the all-reduced gradients
must equal those of one process on the whole batch. The random draws of a training forward (times,
noise, orders, masks, label drop) are passed explicitly so both sides see the same numbers, and every
sample has the same structure so the two half-batch means average to the global mean. Two more steps
with the models' own random draws check that no parameter is left without a gradient
(``find_unused_parameters=False``: DDP raises on the next iteration otherwise). FSDP2 (every block,
then the root) must give the same gradients and train. One spawn runs all of it, and at the end
``examples/train_distributed.py`` in the same process group (what ``torchrun --nproc_per_node=2``
gives it), with DDP and with ``--fsdp``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import re
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from _helpers import perturbed
from mmgen_pytorch import MAR, DnDTransformer, LlamaGen, MonoFormer, Transfusion
from mmgen_pytorch.backbone.transformer import Block

WORLD_SIZE = 2
GLOBAL_BATCH = 4
TOLERANCE = dict(atol=1e-5, rtol=1e-4)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_STEPS, EXAMPLE_RUNS = 2, ("ddp", "fsdp")

# a loss on the given rows of the global batch: exact (explicit draws) or free (the model's own draws)
LossFn = Callable[[nn.Module, nn.Module, List[int]], torch.Tensor]


class Case(NamedTuple):
    model: nn.Module
    exact: LossFn   # (called module, inner model, rows) -> loss with the draws fixed per global row
    free: LossFn    # the same rows, the model's own random draws (dropout of conditions, times, ...)


# the five models, tiny, with a fixed global batch each


def pick(values, rows):
    return [values[i] for i in rows]


def transfusion_case() -> Case:
    model = Transfusion(num_text_tokens=32, dim_latent=8, modality_default_shape=(2, 2),
                        transformer=dict(dim=32, depth=2, heads=2, dim_head=16, attn_backend="sdpa"))
    g = torch.Generator().manual_seed(1)
    # same structure in every sample: each half has the same number of text labels and latent tokens
    samples = [[torch.randint(0, 32, (5,), generator=g), torch.randn(2, 2, 8, generator=g),
                torch.randint(0, 32, (3,), generator=g)] for _ in range(GLOBAL_BATCH)]
    times = [[float(t)] for t in torch.rand(GLOBAL_BATCH, generator=g)]
    noise = [[torch.randn(4, 8, generator=g)] for _ in range(GLOBAL_BATCH)]
    return Case(perturbed(model),
                lambda call, inner, rows: call(pick(samples, rows), times=pick(times, rows), noise=pick(noise, rows),
                                               prob_uncond=0.0),
                lambda call, inner, rows: call(pick(samples, rows), prob_uncond=0.5))


def monoformer_case() -> Case:
    model = MonoFormer(num_text_tokens=8, transformer=dict(dim=32, depth=2, heads=2, attn_backend="sdpa"),
                       latent_channels=4, latent_size=4, patch_size=2)
    g = torch.Generator().manual_seed(2)
    samples = [[torch.randint(0, 8, (3,), generator=g), torch.randn(4, 4, 4, generator=g)] for _ in range(GLOBAL_BATCH)]
    times = [[int(t)] for t in torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)]
    noise = [[torch.randn(4, 16, generator=g)] for _ in range(GLOBAL_BATCH)]  # 4 patches of 4·2·2 features
    return Case(perturbed(model),
                lambda call, inner, rows: call(pick(samples, rows), times=pick(times, rows), noise=pick(noise, rows),
                                               prob_uncond=0.0),
                lambda call, inner, rows: call(pick(samples, rows), prob_uncond=0.5))


@contextlib.contextmanager
def fixed_mar_draws(model: MAR, orders, num_masked: int, timesteps, noise):
    """MAR's orders, mask ratio and diffusion timesteps / noise fixed for these rows (instance overrides).

    The head's rows are ``[repeat, sample, masked position]``, so the draws of a subset of samples are
    the same slice of the global ``[diffusion_batch_mul, b, num_masked, ...]`` draws."""
    diffusion = model.diffloss.train_diffusion
    real_losses = diffusion.training_losses
    model.random_orders = lambda batch, generator=None: orders
    model.sample_num_masked = lambda generator=None: num_masked
    diffusion.training_losses = lambda net, target, generator=None: real_losses(
        net, target, timesteps.reshape(-1), noise=noise.reshape(target.shape))
    try:
        yield
    finally:
        del model.random_orders, model.sample_num_masked, diffusion.training_losses


def mar_case() -> Case:
    model = MAR(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1, diffloss_width=32,
                num_sampling_steps="4", diffusion_batch_mul=2, attn_dropout=0.0, proj_dropout=0.0,
                label_drop_prob=0.0)  # no drop: the null class must still get a gradient
    g = torch.Generator().manual_seed(3)
    latents, labels = torch.randn(GLOBAL_BATCH, 4, 4, 4, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    num_masked = 11
    orders = torch.stack([torch.randperm(model.seq_len, generator=g) for _ in range(GLOBAL_BATCH)])
    timesteps = torch.randint(0, 1000, (model.diffusion_batch_mul, GLOBAL_BATCH, num_masked), generator=g)
    noise = torch.randn(model.diffusion_batch_mul, GLOBAL_BATCH, num_masked, model.token_dim, generator=g)

    def exact(call, inner, rows):
        with fixed_mar_draws(inner, orders[rows], num_masked, timesteps[:, rows], noise[:, rows]):
            return call(latents[rows], labels[rows])

    def free(call, inner, rows):
        inner.label_drop_prob = 0.5
        return call(latents[rows], labels[rows])

    return Case(perturbed(model), exact, free)


def llamagen_case() -> Case:
    model = LlamaGen(dim=32, depth=2, heads=2, vocab_size=24, grid_size=3, num_classes=5)
    g = torch.Generator().manual_seed(4)
    codes, labels = torch.randint(0, 24, (GLOBAL_BATCH, 3, 3), generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    return Case(perturbed(model),
                lambda call, inner, rows: call(codes[rows], class_labels=labels[rows], cond_drop_prob=0.0),
                lambda call, inner, rows: call(codes[rows], class_labels=labels[rows]))


def dnd_case() -> Case:
    # the last head reads the last block: blocks after it would affect no output and get no gradient
    model = DnDTransformer(dim=32, depth=4, heads=2, head_positions=(1, 3), vocab_size=24, grid_size=3, num_classes=5)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 24, (GLOBAL_BATCH, 3, 3, 2), generator=g)
    labels = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    return Case(perturbed(model),
                lambda call, inner, rows: call(codes[rows], class_labels=labels[rows], cond_drop_prob=0.0),
                lambda call, inner, rows: call(codes[rows], class_labels=labels[rows]))


CASES: Dict[str, Callable[[], Case]] = dict(transfusion=transfusion_case, monoformer=monoformer_case, mar=mar_case,
                                           llamagen=llamagen_case, dnd=dnd_case)


# the checks, run on every rank


def build(name: str) -> Case:
    """The same model, batch and draws on every rank (FSDP2, unlike DDP, does not broadcast weights)."""
    torch.manual_seed(0)
    return CASES[name]()


def reference_gradients(case: Case) -> Dict[str, torch.Tensor]:
    """One process, the whole global batch."""
    model = copy.deepcopy(case.model)
    case.exact(model, model, list(range(GLOBAL_BATCH))).backward()
    return {name: None if param.grad is None else param.grad.clone() for name, param in model.named_parameters()}


def local_rows(rank: int) -> List[int]:
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def assert_gradients(name: str, model: nn.Module, expected: Dict[str, torch.Tensor], full=lambda g: g) -> None:
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: `{param_name}` got no gradient"
        torch.testing.assert_close(full(param.grad), expected[param_name], **TOLERANCE,
                                   msg=lambda m: f"{name}: gradient of `{param_name}` differs: {m}")


def check_ddp(name: str, rank: int) -> None:
    case = build(name)
    expected = reference_gradients(case)
    ddp = DistributedDataParallel(case.model)  # find_unused_parameters=False
    rows = local_rows(rank)
    case.exact(ddp, case.model, rows).backward()
    assert_gradients(name, case.model, expected)
    for _ in range(2):  # an unused parameter makes DDP raise in the next iteration
        case.model.zero_grad(set_to_none=True)
        case.free(ddp, case.model, rows).backward()
        missing = [n for n, p in case.model.named_parameters() if p.grad is None]
        assert not missing, f"{name}: no gradient for {missing}"


def check_fsdp(name: str, rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    case = build(name)
    expected = reference_gradients(case)
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    model = case.model
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = case.exact(model, model, local_rows(rank))
    loss.backward()
    assert_gradients(name, model, expected, full=lambda g: g.full_tensor())
    optimizer.step()
    assert torch.isfinite(loss)
    for param_name, param in model.named_parameters():
        assert not torch.equal(param.full_tensor(), before[param_name]), f"{name}: `{param_name}` did not change"


def run_example(out: str) -> None:
    """``examples/train_distributed.py`` in this process group (torchrun would only have set the
    environment that started it), once with DDP and once with FSDP2."""
    sys.path.insert(0, str(ROOT / "examples"))
    import train_distributed

    for kind in EXAMPLE_RUNS:
        train_distributed.main(["--model", "mar", "--steps", str(EXAMPLE_STEPS), "--log-every", "1",
                                "--batch-size", "8", "--data", "random", "--out", f"{out}/{kind}"]
                               + (["--fsdp"] if kind == "fsdp" else []))


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        for name in CASES:
            check_ddp(name, rank)
        for name in CASES:
            check_fsdp(name, rank)
        run_example(out)
    finally:
        # FSDP / DDP state that still refers to the gloo group sits in reference cycles; left to the
        # interpreter's exit, gloo's threads are torn down mid-finalisation and the rank aborts
        gc.collect()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_and_fsdp2_on_two_ranks(tmp_path, capfd):
    """The gradient checks run inside the workers; then the example's logs and checkpoints."""
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    losses = re.findall(rf"^step \d+/{EXAMPLE_STEPS} loss (\S+)", capfd.readouterr().out, flags=re.MULTILINE)
    assert len(losses) == EXAMPLE_STEPS * len(EXAMPLE_RUNS)  # rank 0 alone logs
    assert all(math.isfinite(float(loss)) for loss in losses)
    ddp, fsdp = (load_file(tmp_path / kind / "model.safetensors") for kind in EXAMPLE_RUNS)
    assert ddp.keys() == fsdp.keys()
    for name in ddp:  # the same seeds and shards: both strategies train the same weights
        torch.testing.assert_close(fsdp[name], ddp[name], **TOLERANCE)
    config = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert config["step"] == EXAMPLE_STEPS and config["fsdp"]
