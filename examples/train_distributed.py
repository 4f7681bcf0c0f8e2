"""Data-parallel training of any mmgen_pytorch model: DDP, FSDP2 (``--fsdp``) or Hugging Face Accelerate.

One process per device. Every rank builds the same model (same seed), takes its own shard of each
global batch (the training entry point's ``StepBatchSampler``: the global batches depend only on the seed
and the step, so 1 and N processes see the same ones), draws its own noise / times / masks (seed + rank),
and the gradients are averaged across ranks. Rank 0 logs the loss averaged over ranks and writes the
checkpoint (``model.safetensors`` + ``config.json``). CUDA (NCCL) when available, else CPU (gloo).

    torchrun --nproc_per_node=2 examples/train_distributed.py --steps 3                # CPU works too
    torchrun --nproc_per_node=8 examples/train_distributed.py --model transfusion --steps 3000
    torchrun --nproc_per_node=8 examples/train_distributed.py --model mar --fsdp       # FSDP2 fully_shard
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
        examples/train_distributed.py --model llamagen                                  # and node_rank=1
    python examples/train_distributed.py --steps 3                                      # one process

    pip install accelerate && accelerate config                                         # once
    accelerate launch --num_processes=2 examples/train_distributed.py --accelerate --model dnd   # GPUs
    torchrun --nproc_per_node=2 examples/train_distributed.py --accelerate --model dnd          # CPU

With ``--accelerate`` the same loop runs through ``accelerate.Accelerator`` (``prepare`` wraps the
model with DDP, or FSDP when ``accelerate config`` chose it; ``backward``, ``reduce``, ``get_state_dict``); Accelerate is optional and not a dependency of the library. On a
CPU-only machine ``accelerate launch`` starts a single process (several need MPI): start the
processes with torchrun instead, which Accelerate joins.

Data: scikit-learn's 8x8 digits (``--data digits``, the default when scikit-learn is installed) or
random images (``--data random``), as pixel levels 0..16, fed to each model in a toy encoding:
Transfusion a ``[label]`` caption then 2x2 patches as a 4x4 latent with 4 channels; MonoFormer the
same caption and a 1-channel 8x8 latent; MAR the class and the 8x8 image as 16 tokens of 2x2 pixels;
LlamaGen the level of each pixel as a code (vocabulary 17); DnD two codes per pixel, coarse
(``4 * (level // 4)``) and fine (the rest), whose sum is the level.

Unused parameters: in steps like these every parameter of every model receives a gradient, so DDP
runs with ``find_unused_parameters=False`` (cheaper; tests/test_distributed.py checks it). Pass
``--find-unused-parameters`` when a step can leave part of a model idle by design: Transfusion /
MonoFormer batches in which no sample has a modality of some type (text-only steps), MAR trained
class-unconditionally (``labels=None``), or a DnDTransformer whose last head is not after its last block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from mmgen_pytorch import MAR, DnDTransformer, LlamaGen, MonoFormer, Transfusion
from mmgen_pytorch.backbone.transformer import Block
from mmgen_pytorch.train import StepBatchSampler

LEVELS = 17  # digits pixels are integers 0..16


# the models and how a batch of pixel levels reaches each


class Recipe(NamedTuple):
    model: nn.Module
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]  # (wrapped model, levels [b, 8, 8], labels [b]) -> loss


def to_unit(levels: Tensor) -> Tensor:
    """Pixel levels -> images in [-1, 1]."""
    return levels.float() / (LEVELS - 1) * 2 - 1


def patches(images: Tensor) -> Tensor:
    """``[b, 8, 8]`` -> ``[b, 4, 4, 4]``: channel-last 2x2 patches."""
    return images.unflatten(1, (4, 2)).unflatten(3, (4, 2)).permute(0, 1, 3, 2, 4).flatten(3)


def captioned(latents: Tensor, labels: Tensor) -> List[list]:
    return [[label.view(1), latent] for label, latent in zip(labels, latents)]


def transfusion(args) -> Recipe:
    model = Transfusion(num_text_tokens=10, dim_latent=4, modality_default_shape=(4, 4),
                        transformer=dict(dim=args.dim, depth=args.depth, heads=args.heads))
    return Recipe(model, lambda m, levels, labels: m(captioned(patches(to_unit(levels)), labels)))


def monoformer(args) -> Recipe:
    model = MonoFormer(num_text_tokens=10, transformer=dict(dim=args.dim, depth=args.depth, heads=args.heads),
                       latent_channels=1, latent_size=8, patch_size=2)
    return Recipe(model, lambda m, levels, labels: m(captioned(to_unit(levels)[:, None], labels)))


def mar(args) -> Recipe:
    model = MAR(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, encoder_dim=args.dim,
                encoder_depth=args.depth, encoder_heads=args.heads, num_classes=10, buffer_size=4,
                diffloss_depth=2, diffloss_width=args.dim)
    return Recipe(model, lambda m, levels, labels: m(to_unit(levels)[:, None], labels))


def llamagen(args) -> Recipe:
    model = LlamaGen(dim=args.dim, depth=args.depth, heads=args.heads, vocab_size=LEVELS, grid_size=8, num_classes=10)
    return Recipe(model, lambda m, levels, labels: m(levels, class_labels=labels))


def dnd(args) -> Recipe:
    depth = max(args.depth, 2)
    model = DnDTransformer(dim=args.dim, depth=depth, heads=args.heads, head_positions=(depth - 2, depth - 1),
                           vocab_size=LEVELS, grid_size=8, num_classes=10)

    def loss(m, levels, labels):
        coarse = levels // 4 * 4
        return m(torch.stack((coarse, levels - coarse), dim=-1), class_labels=labels)

    return Recipe(model, loss)


RECIPES = dict(transfusion=transfusion, monoformer=monoformer, mar=mar, llamagen=llamagen, dnd=dnd)


def dataset(kind: str, seed: int) -> TensorDataset:
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return TensorDataset(torch.as_tensor(digits.images).long(), torch.as_tensor(digits.target).long())
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, LEVELS, (2048, 8, 8), generator=generator),
                         torch.randint(0, 10, (2048,), generator=generator))


def default_data() -> str:
    from importlib.util import find_spec

    return "digits" if find_spec("sklearn") is not None else "random"


# torchrun / DDP / FSDP2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_distributed() -> Tuple[int, int, torch.device, bool]:
    """Join the process group torchrun describes (a one-process group when run with plain python), or
    use the one the caller already started. Returns rank, world size, device and whether it started one."""
    if dist.is_initialized():
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device, False
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device, True


def wrap(model: nn.Module, args, device: torch.device) -> nn.Module:
    """DDP, or FSDP2: every transformer block is its own shard group, the rest belongs to the root."""
    if not args.fsdp:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=args.find_unused_parameters)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    return fully_shard(model)


def full_state_dict(model: nn.Module, fsdp: bool) -> dict:
    """The whole model's weights on rank 0 (a collective: every rank calls it)."""
    if not fsdp:
        return model.module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(state: dict, args, step: int) -> None:
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**vars(args), "step": step}, indent=2))


def batches(data: TensorDataset, args, rank: int, world: int) -> DataLoader:
    """This rank's rows of the ``args.steps`` global batches: a new shuffle per epoch (seed + epoch)."""
    sampler = StepBatchSampler(len(data), global_batch=args.batch_size, seed=args.seed, rank=rank, world=world,
                               start=0, total=args.steps)
    return DataLoader(data, batch_sampler=sampler)


def step(recipe: Recipe, model: nn.Module, optimizer, levels: Tensor, labels: Tensor, backward) -> Tensor:
    loss = recipe.loss(model, levels, labels)
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


def check_batch_size(args, world: int) -> int:
    if args.batch_size % world:
        raise SystemExit(f"--batch-size ({args.batch_size}) is the global batch and must be divisible by the "
                         f"number of processes ({world})")
    return args.batch_size // world


def train(args) -> None:
    rank, world, device, started = setup_distributed()
    try:
        per_rank = check_batch_size(args, world)
        torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
        recipe = RECIPES[args.model](args)
        model = wrap(recipe.model.to(device), args, device)
        torch.manual_seed(args.seed + rank)  # but each rank its own noise, times and masks
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        stream = iter(batches(dataset(args.data, args.seed), args, rank, world))
        if rank == 0:
            count = sum(p.numel() for p in recipe.model.parameters())
            print(f"{args.model}: {count / 1e6:.2f}M parameters, {world} x {per_rank} samples per step on {device} "
                  f"({'FSDP2' if args.fsdp else 'DDP'}, {args.data} data)", flush=True)
        start = time.time()
        for index in range(1, args.steps + 1):
            levels, labels = (t.to(device) for t in next(stream))
            loss = step(recipe, model, optimizer, levels, labels, lambda value: value.backward())
            if index % args.log_every == 0 or index == args.steps:
                dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
                if rank == 0:
                    print(f"step {index}/{args.steps} loss {loss.item() / world:.4f} "
                          f"({(time.time() - start) / index:.2f} s/step)", flush=True)
            if index % args.checkpoint_every == 0 or index == args.steps:
                state = full_state_dict(model, args.fsdp)
                if rank == 0:
                    save_checkpoint(state, args, index)
    finally:
        if started:
            gc.collect()  # DDP / FSDP state in reference cycles holds the group: free it before the group goes
            dist.destroy_process_group()


# Hugging Face Accelerate


def train_with_accelerate(args) -> None:
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError:
        raise SystemExit("--accelerate needs Hugging Face Accelerate, which is not installed: `pip install accelerate`, "
                         "then `accelerate launch examples/train_distributed.py --accelerate ...` (or run this script "
                         "under torchrun without --accelerate)") from None
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)]
    # cpu=True lets a CPU-only run join the gloo group that torchrun describes (MULTI_CPU)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
    per_rank = check_batch_size(args, accelerator.num_processes)
    torch.manual_seed(args.seed)
    recipe = RECIPES[args.model](args)
    optimizer = torch.optim.AdamW(recipe.model.parameters(), lr=args.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(recipe.model, optimizer)
    torch.manual_seed(args.seed + accelerator.process_index)
    accelerator.print(f"{args.model}: {accelerator.num_processes} x {per_rank} samples per step on {accelerator.device}")
    stream = iter(batches(dataset(args.data, args.seed), args, accelerator.process_index, accelerator.num_processes))
    for index in range(1, args.steps + 1):
        levels, labels = (t.to(accelerator.device) for t in next(stream))
        loss = step(recipe, model, optimizer, levels, labels, accelerator.backward)
        if index % args.log_every == 0 or index == args.steps:
            accelerator.print(f"step {index}/{args.steps} loss {accelerator.reduce(loss, reduction='mean').item():.4f}")
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(state, args, args.steps)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="llamagen")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split evenly over the processes")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--data", choices=("digits", "random"), default=default_data())
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block and root) instead of DDP")
    parser.add_argument("--accelerate", action="store_true", help="run through Hugging Face Accelerate")
    parser.add_argument("--find-unused-parameters", action="store_true",
                        help="for steps that leave part of a model idle (see the module docstring)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/distributed")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.accelerate:
        train_with_accelerate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
