"""What ``keep_freed_memory()`` saves a CPU training step: the digits-mar step (forward, backward, gradient
clipping, fused AdamW) in fresh processes, alternating without and with the call.

    python benchmarks/bench_allocator.py --rounds 4 --markdown benchmarks/results_allocator.md

Each process times ``--steps`` steps after 10 warm-up steps (median) and counts its minor page faults over
them. Ratios within one run only: the machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_lines, report  # noqa: E402


def child(keep: bool, steps: int, threads: int) -> None:
    import torch
    from mmgen_pytorch.training.allocator import keep_freed_memory
    from mmgen_pytorch.training.config import load_config
    from mmgen_pytorch.training.recipes import build_model

    if keep and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() did not apply here (not glibc?)")
    torch.set_num_threads(threads)
    config = load_config("digits-mar", ["--data.folder", "unused"], check_values=False)
    torch.manual_seed(0)
    model = build_model(config, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images, labels = torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (64,))
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = model(images, labels, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps(dict(step=statistics.median(times), faults=faults / steps)))


def measure(keep: bool, args) -> dict:
    command = [sys.executable, __file__, "--child", "keep" if keep else "default", "--steps", str(args.steps),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--child", choices=["default", "keep"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child == "keep", args.steps, args.threads)
    runs = {False: [], True: []}
    for _ in range(args.rounds):
        for keep in (False, True):
            runs[keep].append(measure(keep, args))
    lines = ["# keep_freed_memory(): a digits-mar training step on the CPU", "",
             *machine_lines(__import__("torch").__version__, args.threads), "",
             f"{args.rounds} alternating rounds of fresh processes, each the median of {args.steps} steps after 10.",
             "", "| allocator | ms / step, each round | median | page faults / step | vs default |",
             "|---|---|---:|---:|---:|"]
    base = statistics.median(r["step"] for r in runs[False])
    for keep, name in ((False, "glibc default"), (True, "keep_freed_memory()")):
        steps = [r["step"] for r in runs[keep]]
        lines.append(f"| {name} | {' / '.join(f'{s * 1e3:.1f}' for s in steps)} | {statistics.median(steps) * 1e3:.1f} "
                     f"| {statistics.median(r['faults'] for r in runs[keep]):.0f} | {base / statistics.median(steps):.2f}x |")
    report(lines, args.markdown)


if __name__ == "__main__":
    main()
