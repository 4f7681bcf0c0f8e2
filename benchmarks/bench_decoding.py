"""Generation through the public entry points, timed for two checkouts side by side (CPU).

A refactor of the decoding path must not make generation slower. This script times the same
generation calls with the package imported from two source trees, alternating between them run by
run (each run a fresh subprocess, so the two see the same machine load), and prints the median
seconds and the ratio ``after / before``:

- ``llamagen``: a small class-conditional LlamaGen (dim 256, 4 layers, 16x16 grid), CFG 4, cached;
- ``llamagen-uncached``: the same, 32 tokens, recomputing the sequence every step (the reference path);
- ``dnd``: a small DnD-Transformer (2 depth heads), CFG 2, cached;
- ``transfusion``: a 64-token text prompt, then an 8x8 image (16 midpoint steps, CFG 3), cached;
- ``monoformer``: one 8x8 latent (4 patches per side) from a 6-token prompt, 20 DDPM steps, CFG 4.

Every model has random weights (seeded) and one intra-op thread. Run from the repository root::

    git worktree add ../before <revision>
    python benchmarks/bench_decoding.py --before ../before --after . --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("llamagen", "llamagen-uncached", "dnd", "transfusion", "monoformer")


def run_task(task: str) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if task.startswith("llamagen") or task == "dnd":
        return _time_llamagen(task)
    if task == "transfusion":
        from mmgen_pytorch import Transfusion

        model = Transfusion(num_text_tokens=256, dim_latent=16, modality_default_shape=(8, 8),
                            transformer=dict(dim=128, depth=4, heads=4)).eval()
        prompt = torch.randint(0, 256, (64,))
        call = lambda: model.sample([prompt], max_length=140, cfg_scale=3.0, modality_steps=16,  # noqa: E731
                                    force_modality_at_start=0, max_modalities=1, progress=False, generator=0)
    else:
        from mmgen_pytorch import MonoFormer

        model = MonoFormer(num_text_tokens=256, latent_channels=4, latent_size=8, patch_size=2,
                           transformer=dict(dim=128, depth=4, heads=4, ff_multiple_of=32)).eval()
        call = lambda: model.generate_images([torch.randint(0, 256, (6,))], cfg_scale=4.0, steps=20,  # noqa: E731
                                             generator=0)
    call()  # warm-up
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _time_llamagen(task: str) -> float:
    import torch

    from mmgen_pytorch import DnDTransformer, LlamaGen

    if task == "dnd":
        model = DnDTransformer(dim=256, depth=4, heads=4, head_positions=(2, 3), vocab_size=1024, grid_size=16,
                               num_classes=10).eval()
        kwargs = dict(cfg_scale=2.0, max_new_tokens=64)
    else:
        model = LlamaGen(dim=256, depth=4, heads=4, vocab_size=4096, grid_size=16, num_classes=10).eval()
        cached = task == "llamagen"
        kwargs = dict(cfg_scale=4.0, max_new_tokens=256 if cached else 32, use_cache=cached)
    for parameter in model.parameters():  # random heads, so that sampling is not uniform
        torch.nn.init.normal_(parameter, std=0.05)
    labels = torch.tensor([1, 2, 3, 4])
    call = lambda: model.generate(labels, top_k=200, generator=0, progress=False, **kwargs)  # noqa: E731
    call()
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(tree: Path, task: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--worker", task], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="source tree of the baseline (holds mmgen_pytorch/)")
    parser.add_argument("--after", type=Path, default=Path("."), help="source tree measured against it")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"seconds": run_task(args.worker)}))
        return
    if args.before is None:
        parser.error("--before is required (a source tree with the baseline's mmgen_pytorch/)")
    times = {(task, side): [] for task in args.tasks for side in ("before", "after")}
    for _ in range(args.repeats):
        for task in args.tasks:
            for side, tree in (("before", args.before), ("after", args.after)):
                times[task, side].append(measure(tree, task))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"median of {args.repeats} runs, alternating before / after; one intra-op thread\n")
    print("| task | before s | after s | after / before |")
    print("|---|---|---|---|")
    for task in args.tasks:
        before, after = statistics.median(times[task, "before"]), statistics.median(times[task, "after"])
        print(f"| {task} | {before:.3f} | {after:.3f} | {after / before:.2f} |")


if __name__ == "__main__":
    main()
