"""Where MAR's sampling time goes on a CPU: one denoising step of the MAR-B DiffLoss head (6 residual blocks of
width 1024, adaLN) against the floors its matmuls allow (issue 19, part 4: the goal of MAR >= 1.35x the official
sampler, "the head's many small steps fused or batched to >= 85 % of matmul throughput").

    python benchmarks/bench_mar_head.py --markdown benchmarks/results_mar_head.md

Per step the head reads every weight once (33.6 M parameters, 134 MB in fp32) for ``rows`` tokens: 2 images
under CFG put 64 rows through each step (16 tokens per image per AR step of 16, doubled by guidance). The table
gives, for each row count, the step's time and rate, the time of its linear layers alone, the six blocks'
adaLN modulations as six matmuls against one fused matmul (every block's modulation reads the same
``SiLU(y)``, so they can be concatenated), and the rate of one large matmul and of a plain memory copy on the
same machine: where the step's weight traffic over its time is close to the copy rate, the step is bound by
memory bandwidth, not by the number of kernels, and fusing them cannot make it faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_lines, report  # noqa: E402

from mmgen_pytorch.diffloss import DiffLoss  # noqa: E402


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median of ``repeats`` timed calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_flops(net, rows: int) -> float:
    return sum(2 * rows * m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)
               and m is not net.cond_embed and m not in list(net.time_embed.modules()))


def measure(rows: int, repeats: int, width: int, depth: int) -> dict:
    head = DiffLoss(target_channels=16, z_channels=768, depth=depth, width=width, num_sampling_steps="100").eval()
    net = head.net
    for p in net.parameters():  # adaLN and output layers start at zero: give them values
        torch.nn.init.normal_(p, std=0.02)
    x, y = torch.randn(rows, 16), torch.randn(rows, width)
    step = seconds(lambda: net.forward_embedded(x, y), repeats)
    flops = linear_flops(net, rows)
    hidden = torch.randn(rows, width)
    mlp = [layer for block in net.res_blocks for layer in block.mlp if isinstance(layer, torch.nn.Linear)]
    modulations = [block.adaLN_modulation[-1] for block in net.res_blocks] + [net.final_layer.adaLN_modulation[-1]]
    fused = torch.nn.Linear(width, sum(m.out_features for m in modulations))
    linears = seconds(lambda: [m(hidden) for m in mlp + modulations], repeats)
    separate = seconds(lambda: [m(hidden) for m in modulations], repeats)
    one = seconds(lambda: fused(hidden), repeats)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters()
                       if not n.startswith(("time_embed", "cond_embed")))
    return dict(rows=rows, step=step, gflops=flops / step / 1e9, linears=linears, separate=separate, fused=one,
                traffic=weight_bytes / step / 1e9, weight_mb=weight_bytes / 1e6)


def large_matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 1024), torch.randn(1024, 4096)
    return 2 * 2048 * 1024 * 4096 / seconds(lambda: a @ b, repeats) / 1e9


def copy_gbytes(repeats: int) -> float:
    source = torch.randn(32 * 1024 * 1024)  # 128 MB, about one step's weights
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / seconds(lambda: target.copy_(source), repeats) / 1e9  # read + write


def table(results: List[dict], args, matmul: float, copy: float) -> List[str]:
    lines = ["# MAR-B DiffLoss head: one denoising step against its matmul and memory floors", "",
             *machine_lines(torch.__version__, args.threads), "",
             f"Head: depth {args.depth}, width {args.width} ({results[0]['weight_mb']:.0f} MB of weights read per "
             f"step); median of {args.repeats} calls. One large matmul (2048 x 1024 x 4096): **{matmul:.0f} "
             f"GFLOP/s**; a 128 MB copy: **{copy:.1f} GB/s** (read + write).", "",
             "| rows | step (ms) | step GFLOP/s | % of large matmul | weights read GB/s | linears alone (ms) "
             "| 7 adaLN matmuls (ms) | 1 fused adaLN matmul (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']} | {r['step'] * 1e3:.1f} | {r['gflops']:.0f} | {100 * r['gflops'] / matmul:.0f} % "
                     f"| {r['traffic']:.1f} | {r['linears'] * 1e3:.1f} | {r['separate'] * 1e3:.1f} "
                     f"| {r['fused'] * 1e3:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 1024])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: as compare_official_mar.py)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        matmul, copy = large_matmul_gflops(args.repeats), copy_gbytes(args.repeats)
        results = [measure(rows, args.repeats, args.width, args.depth) for rows in args.rows]
    report(table(results, args, matmul, copy), args.markdown)


if __name__ == "__main__":
    main()
