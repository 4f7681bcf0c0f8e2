"""DnD-Transformer vs LlamaGen generation speed on CPU: codes/s at the same number of codes per image.

DnD's efficiency claim: with ``D`` codes per position it needs one backbone step per position, where a
next-token model over the same codes needs ``D`` steps. Measured here with ``D = 2`` (ImageNet's
16x16x2 layout): DnD generates a 16x16x2 grid (256 backbone steps, 512 codes), LlamaGen generates 512
codes one per step (``max_new_tokens=512`` on a 23x23 grid; only the 2-D RoPE coordinates differ from
a real flattened layout, which does not change the cost).

Both models share the backbone size (dim, blocks, heads), vocab 16384 and the class prefix; DnD has one
more norm + output head (its heads sit after the last block and 5/6 of the way, like upstream's
[39, 47] of 48). Weights are random (heads too, so sampling is not uniform); sampling uses top-k 2000,
temperature 1, the static KV cache, batch ``--batch`` images, with and without CFG (a [cond; uncond]
batch of 2B rows). ``codes/s`` = batch x codes per image / median seconds of ``--repeats`` runs after
one short warm-up call (CFG's unconditional rows not counted); the fastest run is reported too, since
the CPU may be shared, and the two models' runs alternate so that both see the same background load.
One intra-op thread by default (two threads on a shared 2-core CPU gave erratic timings).

Run from the repository root::

    python benchmarks/bench_dnd.py                               # full table, a few minutes on 2 cores
    python benchmarks/bench_dnd.py --quick                       # a smoke test
    python benchmarks/bench_dnd.py --markdown benchmarks/results_dnd.md
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import generation_parser, load_line, machine_lines, run_generation_benchmark  # noqa: E402

from mmgen_pytorch.dnd import DnDTransformer  # noqa: E402
from mmgen_pytorch.llamagen import LlamaGen  # noqa: E402

SIZES = {  # name -> (dim, blocks, heads)
    "small": (256, 6, 4),
    "medium": (512, 12, 8),
}
DEPTH, GRID, VOCAB = 2, 16, 16384
FLAT_GRID = 23  # the smallest square grid holding GRID * GRID * DEPTH = 512 codes


def build(kind: str, size: str) -> torch.nn.Module:
    dim, blocks, heads = SIZES[size]
    torch.manual_seed(0)
    if kind == "DnD":
        first = round(blocks * 5 / 6) - 1
        model = DnDTransformer(dim=dim, depth=blocks, heads=heads, head_positions=(first, blocks - 1),
                               vocab_size=VOCAB, grid_size=GRID)
    else:
        model = LlamaGen(dim=dim, depth=blocks, heads=heads, vocab_size=VOCAB, grid_size=FLAT_GRID)
    for name, param in model.named_parameters():
        if "to_logits" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def codes_per_image(kind: str, positions: int) -> tuple:
    """(backbone steps, codes) for ``positions`` grid positions."""
    return (positions, positions * DEPTH) if kind == "DnD" else (positions * DEPTH, positions * DEPTH)


def generate(model, labels, steps: int, cfg_scale: float, seed: int) -> float:
    start = time.perf_counter()
    model.generate(labels, max_new_tokens=steps, cfg_scale=cfg_scale, top_k=2000, progress=False,
                   generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - start


def time_pair(models: dict, *, batch: int, positions: int, cfg_scale: float, repeats: int) -> dict:
    """Seconds per run of each model; the runs alternate between the models so that both see the same
    background load on a shared CPU."""
    labels = torch.arange(batch) % 1000
    for model in models.values():
        generate(model, labels, 2, cfg_scale, seed=1)  # warm-up
    seconds = {kind: [] for kind in models}
    for repeat in range(repeats):
        for kind, model in models.items():
            seconds[kind].append(generate(model, labels, codes_per_image(kind, positions)[0], cfg_scale, repeat))
    return seconds


def run(args) -> list:
    rows = []
    for size in args.sizes:
        models = {kind: build(kind, size) for kind in ("LlamaGen", "DnD")}
        for cfg_scale in (1.0, 2.0):
            seconds = time_pair(models, batch=args.batch, positions=args.positions, cfg_scale=cfg_scale,
                                repeats=args.repeats)
            for kind, times in seconds.items():
                rows.append(row(kind, size, models[kind], times, cfg_scale, args))
    return rows


def row(kind: str, size: str, model, times: list, cfg_scale: float, args) -> dict:
    steps, codes = codes_per_image(kind, args.positions)
    seconds = statistics.median(times)
    out = dict(size=size, kind=kind, params=sum(p.numel() for p in model.parameters()),
               backbone=sum(p.numel() for p in model.backbone.parameters()), steps=steps, codes=codes,
               cfg_scale=cfg_scale, seconds=seconds, codes_s=args.batch * codes / seconds,
               best_codes_s=args.batch * codes / min(times))
    print(f"{size:6s} {kind:8s} cfg_scale={cfg_scale} steps={steps} codes={codes}: {seconds:7.2f} s, "
          f"{out['codes_s']:8.1f} codes/s (best {out['best_codes_s']:.1f})", flush=True)
    return out


def speedup(rows: list, row: dict) -> str:
    if row["kind"] != "DnD":
        return ""
    base = next(r for r in rows if r["kind"] == "LlamaGen" and r["size"] == row["size"] and r["cfg_scale"] == row["cfg_scale"])
    return f"{row['codes_s'] / base['codes_s']:.2f}x (best {row['best_codes_s'] / base['best_codes_s']:.2f}x)"


def markdown(rows: list, args, wall: float, load_before: float) -> str:
    lines = [
        "# DnD-Transformer vs LlamaGen: generation speed at the same number of codes (CPU)", "",
        "`python benchmarks/bench_dnd.py --markdown benchmarks/results_dnd.md`", "",
        *machine_lines(torch.__version__, torch.get_num_threads()),
        f"- random weights, fp32, vocab {VOCAB}, batch {args.batch}, class-conditional, top-k 2000, temperature 1, "
        f"static KV cache; codes/s = batch x codes / median seconds of {args.repeats} runs after a warm-up call "
        f"(CFG's unconditional rows not counted); best codes/s uses the fastest run; the runs of the two models "
        f"alternate, so both see the same background load",
        f"- DnD: {args.positions} positions x D={DEPTH} codes in {args.positions} backbone steps (heads after blocks "
        f"5/6 of the way and the last); LlamaGen: the same {args.positions * DEPTH} codes flattened, one per step",
        f"- sizes (dim, blocks, heads): " + ", ".join(f"{k} {v}" for k, v in SIZES.items() if k in args.sizes), "",
        "| size | model | params (backbone) | backbone steps | codes / image | cfg_scale | median s | codes/s "
        "| best codes/s | DnD / LlamaGen codes/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} | {r['kind']} | {r['params'] / 1e6:.1f}M ({r['backbone'] / 1e6:.1f}M) | "
                     f"{r['steps']} | {r['codes']} | {r['cfg_scale']:g} | {r['seconds']:.2f} | {r['codes_s']:.1f} | "
                     f"{r['best_codes_s']:.1f} | {speedup(rows, r)} |")
    lines += ["", "- DnD halves the backbone steps per code; the per-code work (an output head of vocab x dim, top-k "
                  "sampling over the vocab) stays, so the ratio approaches 2x as the backbone's share of a step grows "
                  "(deeper / wider models, upstream's 48 blocks of dim 1536)", load_line(wall, load_before)]
    return "\n".join(lines) + "\n"


def main():
    parser = generation_parser(__doc__.split("\n")[0], quick="small model, 16 positions, one run")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--positions", type=int, default=GRID * GRID, help="grid positions per image (<= 256)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.positions, args.repeats = ["small"], 16, 1
    run_generation_benchmark(args, run, markdown)


if __name__ == "__main__":
    main()
