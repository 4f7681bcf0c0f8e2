"""Throughput of the training entry point (``python -m mmgen_pytorch.train``) against the loop the digits job
ran before it moved onto the entry point (a plain loop over tensors, kept here as the baseline), the same
model on the same data.

The model is the MonoFormer digits recipe's (dim 128, depth 4, 2x2 patches of an 8x8 image, the class as a
one-token text), but with 3 latent channels, since the entry point reads images as RGB: the digits are
written as 8x8 PNGs into class folders for it; the digits loop gets the same images as tensors. Both
loops take batches of 64 with AdamW, gradient clipping, an EMA updated every step and a cosine rate.

Each loop runs ``--steps`` steps in a fresh process (the loops alternating, ``--repeats`` times); a hook
on the model stamps the time of every training forward, so one step is the time from one forward to the
next: data, loss, backward, clipping, the optimizer, the EMA and the loop's own bookkeeping. The table shows
the median step after the first ``--warmup``, the median over the repeats; start-up, the final checkpoint
and the entry point's final sample grid are outside it. The entry point runs twice: decoding
each item's PNG when it is read (the default) and with ``data.in_memory`` (decoded once). A median is robust to the spikes a shared machine adds.

    python benchmarks/bench_train_loop.py --markdown benchmarks/results_train_loop.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

BATCH, LR, EMA_BETA = 64, 1e-3, 0.995
LOOPS = {"digits": "the former digits loop", "entry": "python -m mmgen_pytorch.train, images decoded per item",
         "entry-memory": "python -m mmgen_pytorch.train, `data.in_memory: true`"}
TRANSFORMER = dict(dim=128, depth=4, heads=4, ff_mult=2, ff_multiple_of=32, attn_backend="sdpa")
MODEL = dict(num_text_tokens=128, latent_channels=3, latent_size=8, patch_size=2, schedule="cosine",
             max_prompt_length=8, transformer=TRANSFORMER)


def training_data():
    """The digits' training split: images ``[N, 8, 8]`` in [0, 1] and labels."""
    import torch
    from mmgen_pytorch.evaluation.features import digits_split

    x_train, _, y_train, _ = digits_split()
    return torch.tensor(x_train, dtype=torch.float32).view(-1, 8, 8) / 16, torch.tensor(y_train)


def stamping(model, stamps: list):
    """``model`` with a forward pre-hook appending the time of each call made with gradients (training)."""
    import torch

    model.register_forward_pre_hook(lambda *args: stamps.append(time.perf_counter()) if torch.is_grad_enabled() else None)
    return model


def run_entry_point(steps: int, folder: str, out: str, *, in_memory: bool, stamps: list) -> None:
    from mmgen_pytorch import train
    from mmgen_pytorch.training.config import parse_config

    build_model = train.build_model
    train.build_model = lambda *args: stamping(build_model(*args), stamps)
    config = parse_config(dict(
        model=dict(name="MonoFormer", kwargs=MODEL),
        data=dict(folder=folder, resolution=8, batch_size=BATCH, random_flip=False, in_memory=in_memory),
        optim=dict(lr=LR, betas=[0.9, 0.999], weight_decay=0.01, decay_1d=True, warmup_steps=100,
                   schedule="cosine", grad_clip=1.0, ema_beta=EMA_BETA),
        train=dict(steps=steps, log_every=50, output_dir=out, tracker="none", progress=False),
        sample=dict(num=4, steps=4)))
    train.run(config)


class DigitsMonoFormer:
    """The digits loop's recipe interface (``model``, ``lr``, ``batch_size``, ``loss``) for the RGB model."""

    lr, batch_size = LR, BATCH

    def __init__(self, stamps: list):
        import torch
        from mmgen_pytorch import MonoFormer

        torch.manual_seed(0)
        self.model = stamping(MonoFormer(**MODEL), stamps)

    def loss(self, images, labels):
        import torch

        rgb = (images * 2 - 1)[:, None].expand(-1, 3, -1, -1)
        return self.model([[torch.tensor([label]), image] for image, label in zip(rgb, labels.tolist())])


def run_digits_loop(steps: int, out: str, *, stamps: list) -> None:
    """The former digits loop: random batches with replacement, AdamW with warm-up and cosine decay, clipping,
    an EMA updated every step (after 100), a final checkpoint."""
    import math

    import torch
    from ema_pytorch import EMA
    from mmgen_pytorch import save_training_state

    recipe = DigitsMonoFormer(stamps)
    model, (images, labels) = recipe.model, training_data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    ema = EMA(model, beta=EMA_BETA, update_after_step=100, update_every=1)
    model.train()
    for step in range(steps):
        warm = (step + 1) / 100 if step < 100 else 0.5 * (1 + math.cos(math.pi * (step - 100) / max(1, steps - 100)))
        for group in optimizer.param_groups:
            group["lr"] = LR * warm
        index = torch.randint(0, len(images), (BATCH,))
        loss = recipe.loss(images[index], labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update()
    save_training_state(Path(out) / "checkpoint", model=model, optimizer=optimizer, ema=ema, step=steps)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    stamps: list = []
    with tempfile.TemporaryDirectory() as out:
        if args.child == "digits":
            run_digits_loop(args.steps, out, stamps=stamps)
        else:
            run_entry_point(args.steps, args.folder, out, in_memory=args.child == "entry-memory", stamps=stamps)
    steps = [later - earlier for earlier, later in zip(stamps[args.warmup:args.steps], stamps[args.warmup + 1:args.steps])]
    print(json.dumps(dict(step=statistics.median(steps))))


def measure(loop: str, args, folder: str) -> float:
    command = [sys.executable, __file__, "--child", loop, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--folder", folder, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child", choices=list(LOOPS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must be at least --warmup + 2 ({args.warmup + 2}), got {args.steps}")

    import torch
    from _common import load_line, machine_lines, report

    started, load_before = time.time(), os.getloadavg()[0]
    per_step = {loop: [] for loop in LOOPS}
    from mmgen_pytorch.data.digits import write_digits_folder

    with tempfile.TemporaryDirectory() as folder:
        folder = str(write_digits_folder(Path(folder)))
        for _ in range(args.repeats):
            for loop in LOOPS:
                per_step[loop].append(measure(loop, args, folder))
    lines = ["# Training loop throughput: the entry point against the former digits loop (CPU)", "",
             "`python benchmarks/bench_train_loop.py --markdown benchmarks/results_train_loop.md`", "",
             *machine_lines(torch.__version__, args.threads),
             f"- MonoFormer digits model with 3 latent channels, batch {BATCH}, {args.steps} steps a run; one step = "
             f"forward to forward, median after the first {args.warmup}, then the median of {args.repeats} "
             f"alternating runs in fresh processes", "",
             "| loop | ms / step | steps / s | vs the digits loop | runs (ms / step) |", "|---|---|---|---|---|"]
    base = statistics.median(per_step["digits"])
    for loop, name in LOOPS.items():
        step = statistics.median(per_step[loop])
        runs = " / ".join(f"{value * 1e3:.1f}" for value in per_step[loop])
        lines.append(f"| {name} | {step * 1e3:.1f} | {1 / step:.2f} | {base / step:.2f} | {runs} |")
    lines += ["", "- vs the digits loop: its time per step / this loop's (above 1: the entry point is faster)", "",
              load_line(time.time() - started, load_before)]
    report(lines, args.markdown)


if __name__ == "__main__":
    main()
