"""Compiled flex attention over ragged lengths: exact shapes, dynamic shapes, or 128-token buckets.

A training stream of ragged packed lengths (``--calls`` lengths drawn uniformly from ``--min-length`` to
``--max-length`` with a fixed seed; a causal sequence with one bidirectional block per 64 tokens, batch
2, 8 heads, dim_head 64, fp32, forward only: flex has no CPU backward) goes through three ways of
running the compiled kernel:

- ``exact``    ``torch.compile(flex_attention, dynamic=False)`` with a BlockMask of the exact length
               (what the backbone did before: one compile per length, unfused fallback past dynamo's
               recompile limit of 8);
- ``dynamic``  the same with ``dynamic=True``;
- ``buckets``  the backbone's path: ``attend`` with ``TokenLayout.block_mask()``, whose lengths are
               rounded up to multiples of 128 (inputs padded, padding masked out).

Each variant runs in a fresh subprocess (no compiled kernel survives between variants) that makes every
call once (``first pass s``: cold compiles included, inductor's on-disk caches disabled), then times a second pass over the same lengths
(``steady pass s``: no compiles). ``shapes``: distinct input shapes; ``compiled kernels``: the compiled
entries dynamo holds for ``flex_attention`` afterwards; the shapes without one ran torch's unfused
fallback (dynamo stops compiling a function past its recompile limit). Ratios are against ``buckets``.

    python benchmarks/bench_flex_buckets.py [--calls 20] [--markdown benchmarks/results_flex_buckets.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_line, loadavg, machine_lines, run_json_subprocess  # noqa: E402

VARIANTS = ("exact", "dynamic", "buckets")
BATCH, HEADS, DIM_HEAD, BLOCK_EVERY = 2, 8, 64, 64


def layout_for(length: int):
    from mmgen_pytorch.backbone import TokenLayout
    spans = [(start, 16) for start in range(8, length - 16, BLOCK_EVERY)]
    return TokenLayout.from_spans(lengths=[length] * BATCH, blocks=[spans] * BATCH)


def worker(config: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from mmgen_pytorch.backbone import AttentionMask, attend

    torch.set_num_threads(config["threads"])
    variant, lengths = config["variant"], config["lengths"]
    compiled = torch.compile(flex_attention, dynamic=variant == "dynamic") if variant != "buckets" else None

    def call(length: int):
        layout = layout_for(length)
        q, k, v = (torch.randn(BATCH, HEADS, length, DIM_HEAD) for _ in range(3))
        if variant == "buckets":
            return attend(q, k, v, AttentionMask(block_mask=layout.block_mask()))
        mask = create_block_mask(layout.mask_mod(), B=BATCH, H=None, Q_LEN=length, KV_LEN=length, device="cpu")
        return compiled(q, k, v, block_mask=mask)

    with torch.no_grad():
        passes = []
        for _ in range(2):
            start = time.perf_counter()
            for length in lengths:
                call(length)
            passes.append(time.perf_counter() - start)
    shapes = {-(-n // 128) if variant == "buckets" else n for n in lengths}
    kernels = len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(flex_attention.__code__))
    return {"first": passes[0], "steady": passes[1], "shapes": len(shapes), "kernels": kernels,
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        try:
            result = worker(json.loads(args.worker))
        except Exception as error:  # reported in the table (e.g. inductor failing to build the kernel)
            result = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"}
        print("RESULT " + json.dumps(result))
        return

    import os
    import random
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # cold compiles, as a fresh machine pays them
    draw = random.Random(0)
    lengths = [draw.randint(args.min_length, args.max_length) for _ in range(args.calls)]
    wall, load_before = time.perf_counter(), float(loadavg())
    results = {variant: run_json_subprocess(__file__, "--worker", dict(variant=variant, lengths=lengths,
                                                                       threads=args.threads), args.timeout)
               for variant in VARIANTS}
    base = results["buckets"]
    rows = ["| variant | shapes | compiled kernels | unfused shapes | first pass s | vs buckets | steady pass s | vs buckets |",
            "|---|---|---|---|---|---|---|---|"]
    for variant, result in results.items():
        if "error" in result:
            rows.append(f"| {variant} | error: {result['error']} | | | | | | |")
            continue
        rows.append(f"| {variant} | {result['shapes']} | {result['kernels']} | {result['shapes'] - result['kernels']} | "
                    f"{result['first']:.1f} | "
                    f"{result['first'] / base['first']:.2f} | {result['steady']:.2f} | "
                    f"{result['steady'] / base['steady']:.2f} |")
    torch_version = next((r["torch"] for r in results.values() if "torch" in r), "?")
    text = "\n".join([f"`python benchmarks/bench_flex_buckets.py --calls {args.calls}`", "",
                      *machine_lines(torch_version, args.threads),
                      f"- {args.calls} ragged lengths in [{args.min_length}, {args.max_length}], "
                      f"{len({-(-n // 128) for n in lengths})} distinct 128-token buckets", "", *rows, "",
                      load_line(time.perf_counter() - wall, load_before)])
    print(text)
    if args.markdown:
        args.markdown.write_text(f"# Compiled flex attention over ragged lengths (CPU)\n\n{text}\n")


if __name__ == "__main__":
    main()
