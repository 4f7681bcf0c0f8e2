"""LlamaGen generation speed on CPU: tokens/s of ``generate`` with and without the KV cache and CFG.

Models have random weights (the output head too, so sampling is not uniform) and generate class-
conditional image tokens (vocab 16384, 16x16 grid, top-k 2000 as upstream's demo, temperature 1):

- ``GPT-B``: the upstream preset (111M parameters; dim 768, 12 layers, 12 heads);
- ``small``: dim 256, 4 layers, 4 heads (the same vocab and grid).

For every model, ``generate`` runs with ``use_cache=True`` (static KV cache: one prefill of the class
token, then one token per step) and ``use_cache=False`` (the whole sequence recomputed every step,
the test reference), each with ``cfg_scale=1`` (batch B) and ``cfg_scale=4`` (a [cond; uncond] batch
of 2B rows). The uncached path costs O(n^2) token-forwards, so it generates fewer tokens
(``--uncached-tokens``); the cached path is also timed at that length for a like-for-like ratio.
``tokens/s`` counts the image tokens returned (batch x tokens; CFG's unconditional rows are not
counted). Each configuration runs ``--repeats`` times (default 3) after one short warm-up call of the
same model and mode; the table reports the median (and the fastest run, since the CPU may be shared).
It uses one intra-op thread by default: with other processes on a 2-core machine, two threads made
single runs up to 30x slower at random (OpenMP workers waiting on a descheduled sibling).

Run from the repository root::

    python benchmarks/bench_llamagen.py                        # full table, a few minutes on 2 cores
    python benchmarks/bench_llamagen.py --quick                # a smoke test
    python benchmarks/bench_llamagen.py --markdown benchmarks/results_llamagen.md
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import generation_parser, load_line, machine_lines, run_generation_benchmark  # noqa: E402

from mmgen_pytorch.llamagen import LlamaGen  # noqa: E402

MODELS = {
    "GPT-B": lambda: LlamaGen.from_preset("GPT-B"),
    "small": lambda: LlamaGen(dim=256, depth=4, heads=4),
}


def build(name: str) -> LlamaGen:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    torch.nn.init.normal_(model.code_heads.to_logits.weight, std=0.02)
    return model


def time_generate(model: LlamaGen, *, batch: int, tokens: int, use_cache: bool, cfg_scale: float,
                  repeats: int) -> list:
    labels = torch.arange(batch) % 1000
    kwargs = dict(cfg_scale=cfg_scale, top_k=2000, use_cache=use_cache, progress=False)
    model.generate(labels, max_new_tokens=min(4, tokens), generator=torch.Generator().manual_seed(1), **kwargs)
    seconds = []
    for repeat in range(repeats):
        start = time.perf_counter()
        model.generate(labels, max_new_tokens=tokens, generator=torch.Generator().manual_seed(repeat), **kwargs)
        seconds.append(time.perf_counter() - start)
    return seconds


def run(args) -> list:
    rows = []
    for name in args.models:
        model = build(name)
        params = sum(p.numel() for p in model.parameters())
        plan = [(True, args.tokens), (True, args.uncached_tokens), (False, args.uncached_tokens)]
        for use_cache, tokens in dict.fromkeys(plan):
            for cfg_scale in (1.0, 4.0):
                times = time_generate(model, batch=args.batch, tokens=tokens, use_cache=use_cache,
                                      cfg_scale=cfg_scale, repeats=args.repeats)
                seconds = statistics.median(times)
                row = dict(model=name, params=params, cache=use_cache, cfg_scale=cfg_scale, batch=args.batch,
                           tokens=tokens, seconds=seconds, tok_s=args.batch * tokens / seconds,
                           best_tok_s=args.batch * tokens / min(times))
                rows.append(row)
                print(f"{name:6s} cache={use_cache!s:5s} cfg_scale={cfg_scale} tokens={tokens:3d}: "
                      f"{seconds:7.2f} s, {row['tok_s']:8.1f} tok/s (best {row['best_tok_s']:.1f})", flush=True)
    return rows


def speedups(rows: list) -> dict:
    """Cached / uncached tokens/s at the same length, per model and CFG setting."""
    out = {}
    for row in rows:
        if not row["cache"]:
            twin = next(r for r in rows if r["cache"] and r["model"] == row["model"] and r["cfg_scale"] == row["cfg_scale"]
                        and r["tokens"] == row["tokens"])
            out[(row["model"], row["cfg_scale"])] = twin["tok_s"] / row["tok_s"]
    return out


def markdown(rows: list, args, wall: float, load_before: float) -> str:
    ratio = speedups(rows)
    lines = [
        "# LlamaGen generation benchmark (CPU)", "",
        "`python benchmarks/bench_llamagen.py --markdown benchmarks/results_llamagen.md`", "",
        *machine_lines(torch.__version__, torch.get_num_threads()),
        f"- random weights, fp32, batch {args.batch}, class-conditional, top-k 2000, temperature 1; "
        f"tokens/s = batch x tokens / median seconds of {args.repeats} runs after a warm-up call "
        f"(CFG's unconditional rows not counted); best tokens/s uses the fastest run",
        f"- the uncached path recomputes the whole sequence each step, so it generates {args.uncached_tokens} "
        f"tokens (not {args.tokens}); the cached path is timed at both lengths", "",
        "| model | params | KV cache | cfg_scale | batch | tokens | median s | tokens/s | best tokens/s "
        "| cached / uncached |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{ratio[(r['model'], r['cfg_scale'])]:.1f}x" if not r["cache"] else ""
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {'yes' if r['cache'] else 'no'} | {r['cfg_scale']:g} | "
                     f"{r['batch']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} | "
                     f"{r['best_tok_s']:.1f} | {speedup} |")
    lines += ["", load_line(wall, load_before)]
    return "\n".join(lines) + "\n"


def main():
    parser = generation_parser(__doc__.split("\n")[0], quick="small model, 16 / 8 tokens")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--uncached-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.models, args.tokens, args.uncached_tokens, args.repeats = ["small"], 16, 8, 1
    run_generation_benchmark(args, run, markdown)


if __name__ == "__main__":
    main()
