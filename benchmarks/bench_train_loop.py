"""Throughput of the training entry point (``python -m mmgen_pytorch.train``), which the digits job runs,
against the loop the digits job ran before (a plain loop over tensors, kept here as the baseline): the same
model on the same data.

The digits recipes, each as its entry-point config (``digits-monoformer``, ``digits-mar``, ``digits-llamagen``,
``digits-dnd``, ``digits-vqvae``):

- MonoFormer: the digit's name -> its 8x8 greyscale image, 2x2 pixel patches (dim 128, depth 4);
- MAR: the class -> 2x2 pixel patches, with its diffusion head;
- LlamaGen: a class-conditional GPT over the 4x4 codes of the recipe's VQVAE (an untrained one here:
  the codes' values do not change the work). The former loop encoded every digit once before training;
- DnD: the same over the 4x4x2 codes of the recipe's RQ-VAE;
- VQVAE: LlamaGen's tokenizer (``digits-vqvae``: MSE and the codebook terms, no perceptual loss, no GAN).

The entry point reads the digits written as PNG class folders (``mmgen_pytorch.data.digits``) with
``data.in_memory: true`` (the recipes' setting: decoded once and, with a tokenizer, encoded once); LlamaGen
also runs without it (each item's PNG decoded when read and every batch encoded through the tokenizer).
The former loop gets the same digits as tensors. Both take batches of 64 with AdamW, gradient clipping, an
EMA updated every step and a warm-up + cosine rate.

Each loop runs ``--steps`` steps in a fresh process (the loops alternating, ``--repeats`` times); a hook on
the model stamps the wall and CPU time of every training forward, so one step is the time from one forward to the next:
data, loss, backward, clipping, the optimizer, the EMA and the loop's own bookkeeping. The table shows the
median step after the first ``--warmup``, the median over the repeats; start-up (decoding and encoding
included), the final checkpoint and the entry point's final sample grid are outside it. A median is robust
to the spikes a shared machine adds.

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
sys.path.insert(0, str(ROOT / "benchmarks"))

WORKLOADS = ("monoformer", "mar", "llamagen", "dnd", "vqvae")
TOKENIZERS = {"llamagen": "digits-vqvae", "dnd": "digits-rqvae"}  # saved untrained under the data folder
LOOPS = {"digits": "the former digits loop", "entry-memory": "entry point, `data.in_memory: true` (the recipe)",
         "entry": "entry point, `data.in_memory: false`"}
PER_ITEM = ("llamagen",)  # the workloads also run without data.in_memory (LlamaGen: every batch encoded)


def recipe(workload: str, folder: str, out: str, *, in_memory: bool, steps: int = 150):
    """The workload's digits config on ``folder`` (see :func:`write_data`)."""
    from mmgen_pytorch.training.config import load_config

    data = Path(folder)
    options = ["--data.folder", str(data / "train"), "--data.in_memory", str(in_memory).lower(),
               "--train.output_dir", out, "--train.steps", str(steps), "--train.tracker", "none", "--train.progress", "false",
               "--train.log_every", "50", "--train.checkpoint_every", "100000", "--sample.num", "4"]
    if workload == "monoformer":
        options += ["--data.captions", str(data / "train-captions.jsonl"), "--sample.steps", "4"]
    elif workload in TOKENIZERS:
        options += ["--tokenizer.path", str(data / TOKENIZERS[workload])]
    return load_config(f"digits-{workload}", options)


def stamping(model, stamps: list):
    """``model`` with a forward pre-hook appending the wall and CPU (process) time of each call made with
    gradients (training)."""
    import torch

    def stamp(*args):
        if torch.is_grad_enabled():
            stamps.append((time.perf_counter(), time.process_time()))
    model.register_forward_pre_hook(stamp)
    return model


def run_entry_point(workload: str, steps: int, folder: str, out: str, *, in_memory: bool, stamps: list) -> None:
    import torch
    from mmgen_pytorch import train
    from mmgen_pytorch.training.allocator import keep_freed_memory

    if not torch.cuda.is_available():
        keep_freed_memory()  # as `python -m mmgen_pytorch.train` (and so the digits job) does before its run
    build_model = train.build_model
    train.build_model = lambda *args: stamping(build_model(*args), stamps)
    train.run(recipe(workload, folder, out, in_memory=in_memory, steps=steps))


def former_loop_inputs(workload: str, folder: str):
    """The workload's config, its model (built as the entry point builds it), the number of training digits
    and a function of a batch of their indices -> the loss, over the digits held as tensors (LlamaGen: their codes, encoded once)."""
    import torch
    from mmgen_pytorch.data.digits import DIGIT_NAMES
    from mmgen_pytorch.evaluation.features import digits_split
    from mmgen_pytorch.training.recipes import build_model, byte_tokenizer, load_tokenizer

    config = recipe(workload, folder, tempfile.mkdtemp(), in_memory=True)
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    x_train, _, y_train, _ = digits_split()
    images = torch.tensor(x_train, dtype=torch.float32).view(-1, 1, 8, 8) / 16 * 2 - 1
    labels = torch.tensor(y_train)
    if workload == "vqvae":
        return config, model, len(labels), lambda index: model(images[index]).loss
    if workload == "mar":
        return config, model, len(labels), lambda index: model(images[index] * model.vae_scale, labels[index])
    if workload in TOKENIZERS:
        from mmgen_pytorch.data.cache import encode_images

        codes = torch.cat([encode_images(tokenizer, chunk) for chunk in images.split(256)])
        return config, model, len(labels), lambda index: model(codes[index], class_labels=labels[index])
    names = [torch.tensor(byte_tokenizer(DIGIT_NAMES[label])) for label in range(10)]
    return config, model, len(labels), lambda index: model([[names[label], image] for image, label in
                                                            zip(images[index], labels[index].tolist())])


def run_former_loop(workload: str, steps: int, folder: str, out: str, *, stamps: list) -> None:
    """The former digits loop with the config's optimizer settings: random batches with replacement, AdamW
    with warm-up and cosine decay, clipping and an EMA updated every step (after 100) where the config has
    them, a final checkpoint."""
    import math

    import torch
    from ema_pytorch import EMA
    from mmgen_pytorch import save_training_state

    config, model, count, loss_of = former_loop_inputs(workload, folder)
    optim = config.optim
    stamping(model, stamps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    ema = EMA(model, beta=optim.ema_beta, update_after_step=100, update_every=1) if optim.ema_beta else None
    model.train()
    for step in range(steps):
        warm = (step + 1) / 100 if step < 100 else 0.5 * (1 + math.cos(math.pi * (step - 100) / max(1, steps - 100)))
        for group in optimizer.param_groups:
            group["lr"] = optim.lr * warm
        loss = loss_of(torch.randint(0, count, (config.data.batch_size,)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update()
    save_training_state(Path(out) / "checkpoint", model=model, optimizer=optimizer, ema=ema, step=steps)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    stamps: list = []
    with tempfile.TemporaryDirectory() as out:
        if args.child == "digits":
            run_former_loop(args.workload, args.steps, args.folder, out, stamps=stamps)
        else:
            run_entry_point(args.workload, args.steps, args.folder, out, in_memory=args.child == "entry-memory",
                            stamps=stamps)
    pairs = list(zip(stamps[args.warmup:args.steps], stamps[args.warmup + 1:args.steps]))
    print(json.dumps(dict(step=statistics.median(later[0] - earlier[0] for earlier, later in pairs),
                          cpu=statistics.median(later[1] - earlier[1] for earlier, later in pairs))))


def measure(workload: str, loop: str, args, folder: str) -> float:
    command = [sys.executable, __file__, "--child", loop, "--workload", workload, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--folder", folder, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{workload} / {loop} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_data(folder: Path) -> None:
    """The digits folder, and the code models' tokenizers (untrained, seed 0) in ``folder/digits-vqvae`` /
    ``folder/digits-rqvae``."""
    import torch
    from mmgen_pytorch.data.digits import write_digits_folder
    from mmgen_pytorch.training.config import load_config
    from mmgen_pytorch.training.recipes import build_model

    write_digits_folder(folder)
    for name in TOKENIZERS.values():
        torch.manual_seed(0)
        build_model(load_config(name, ["--data.folder", str(folder / "train")]), None).save(folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child", choices=list(LOOPS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must be at least --warmup + 2 ({args.warmup + 2}), got {args.steps}")

    import torch
    from _common import load_line, machine_lines, report

    started, load_before = time.time(), os.getloadavg()[0]
    per_step = {(workload, loop): [] for workload in args.workloads for loop in LOOPS
                if loop != "entry" or workload in PER_ITEM}
    with tempfile.TemporaryDirectory() as folder:
        write_data(Path(folder))
        for _ in range(args.repeats):
            for workload, loop in per_step:
                per_step[workload, loop].append(measure(workload, loop, args, folder))
    lines = ["# Training loop throughput: the entry point against the former digits loop (CPU)", "",
             f"`python benchmarks/bench_train_loop.py --steps {args.steps} --warmup {args.warmup} --repeats "
             f"{args.repeats} --markdown benchmarks/results_train_loop.md`", "",
             *machine_lines(torch.__version__, args.threads),
             f"- the digits recipes `digits-{'`, `digits-'.join(args.workloads)}`, batch 64, {args.steps} steps a run; "
             f"one step = forward to forward, median after the first {args.warmup}, then the median of "
             f"{args.repeats} alternating runs in fresh processes", "",
             "| recipe | loop | ms / step | steps / s | vs the former loop | runs (ms / step) | CPU ms / step | vs the "
             "former loop (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for workload in args.workloads:
        base = {kind: statistics.median(run[kind] for run in per_step[workload, "digits"]) for kind in ("step", "cpu")}
        for loop, name in LOOPS.items():
            if (workload, loop) not in per_step:
                continue
            runs = per_step[workload, loop]
            step, cpu = (statistics.median(run[kind] for run in runs) for kind in ("step", "cpu"))
            listed = " / ".join(f"{run['step'] * 1e3:.1f}" for run in runs)
            lines.append(f"| {workload} | {name} | {step * 1e3:.1f} | {1 / step:.2f} | {base['step'] / step:.2f} | "
                         f"{listed} | {cpu * 1e3:.1f} | {base['cpu'] / cpu:.2f} |")
    lines += ["", "- vs the former loop: its time per step / this loop's (above 1: the entry point is faster); CPU: the "
              "same in process CPU time (both threads), which time stolen by other guests of a shared host does not "
              "inflate", "",
              load_line(time.time() - started, load_before)]
    report(lines, args.markdown)


if __name__ == "__main__":
    main()
