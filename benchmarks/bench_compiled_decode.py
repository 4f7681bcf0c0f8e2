"""Compiled vs eager decoding on CPU: ``generate(compile=True)`` against ``generate()`` (issue 19, part 4).

For each model, one process builds it with random weights (the output heads too, so the logits are
not flat), then

1. runs a short eager warm-up (4 tokens);
2. runs the first compiled call (4 tokens): it compiles the decode step (inductor, default mode on CPU),
   so its time minus the eager 4-token time is the **compile time**;
3. times one eager and one compiled ``generate`` of ``--tokens`` image positions (the steady state:
   the compiled call reuses the graph of step 2, since a compiled cache always holds a multiple of 256
   slots), and asserts that both return identical greedy codes.

Settings as issue 19 asks: batch 1, CFG 4 (a [cond; uncond] batch of 2 rows), top-k 2000, greedy, fp32,
class-conditional, vocab 16384, 16x16 grid. Models:

- ``LlamaGen GPT-B``: ``LlamaGen.from_preset("GPT-B")`` (dim 768, 12 blocks, 12 heads; 111M parameters);
- ``DnD GPT-B size``: DnD's presets are GPT-XXL / GPT-XXXL (1.4B+ parameters, too slow for this CPU), so
  the GPT-B size with ImageNet's 16x16x2 layout and heads after blocks 9 and 11 (5/6 of the way and the
  last, as upstream's (39, 47) of 48): 256 backbone steps, 512 codes.

The ratio eager / compiled is the speed-up of the steady state. One intra-op thread by default (as the
other generation benchmarks: two threads on a shared 2-core CPU gave erratic timings).

Run from the repository root (it takes minutes: compiling GPT-B is the bulk)::

    nice -n 10 python benchmarks/bench_compiled_decode.py --markdown benchmarks/results_compiled_decode.md
    python benchmarks/bench_compiled_decode.py --quick     # a smoke test: a small model, 16 tokens
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import generation_parser, load_line, machine_lines, run_generation_benchmark  # noqa: E402

from mmgen_pytorch.dnd import DnDTransformer  # noqa: E402
from mmgen_pytorch.llamagen import LlamaGen  # noqa: E402

VOCAB, GRID, WARM_TOKENS = 16384, 16, 4
MODELS = {
    "LlamaGen GPT-B": lambda: LlamaGen.from_preset("GPT-B", vocab_size=VOCAB, grid_size=GRID),
    "DnD GPT-B size": lambda: DnDTransformer(dim=768, depth=12, heads=12, head_positions=(9, 11),
                                             vocab_size=VOCAB, grid_size=GRID),
    "LlamaGen small": lambda: LlamaGen(dim=128, depth=2, heads=4, vocab_size=VOCAB, grid_size=GRID),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    for parameter_name, param in model.named_parameters():
        if "to_logits" in parameter_name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def timed_generate(model, *, tokens: int, compile: bool, batch: int):
    labels = torch.arange(batch) % 1000
    start = time.perf_counter()
    codes = model.generate(labels, max_new_tokens=tokens, cfg_scale=4.0, top_k=2000, greedy=True, progress=False,
                           compile=compile)
    return codes, time.perf_counter() - start


def run(args) -> list:
    rows = []
    for name in args.models:
        model = build(name)
        _, eager_warm = timed_generate(model, tokens=WARM_TOKENS, compile=False, batch=args.batch)
        _, first_compiled = timed_generate(model, tokens=WARM_TOKENS, compile=True, batch=args.batch)
        eager_codes, eager = timed_generate(model, tokens=args.tokens, compile=False, batch=args.batch)
        compiled_codes, compiled = timed_generate(model, tokens=args.tokens, compile=True, batch=args.batch)
        assert torch.equal(eager_codes, compiled_codes), f"{name}: compiled greedy codes differ from eager ones"
        row = dict(model=name, params=sum(p.numel() for p in model.parameters()), tokens=args.tokens,
                   compile_s=first_compiled - eager_warm, eager_s=eager, compiled_s=compiled)
        print(row, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list, args, wall: float, load_before: float) -> str:
    lines = ["# Compiled vs eager decoding (CPU)", "",
             "`nice -n 10 python benchmarks/bench_compiled_decode.py --markdown benchmarks/results_compiled_decode.md`",
             "", *machine_lines(torch.__version__, args.threads),
             f"- random weights, fp32, batch {args.batch}, class-conditional, CFG 4 (2 rows), top-k 2000, greedy; "
             f"one eager and one compiled `generate` of {args.tokens} positions after a warm-up, identical codes "
             "asserted; compile time = the first compiled 4-token call minus an eager 4-token call",
             "- the machine's 2 cores are shared with other processes (other sessions' tests and builds), "
             "so single timings carry noise; the ratio is the figure to read",
             "", "| model | params | positions | compile s | eager s | compiled s | eager / compiled |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tokens']} | {r['compile_s']:.1f} | "
                     f"{r['eager_s']:.2f} | {r['compiled_s']:.2f} | {r['eager_s'] / r['compiled_s']:.2f}x |")
    return "\n".join([*lines, "", load_line(wall, load_before), ""])


def main() -> None:
    parser = generation_parser(__doc__.splitlines()[0], quick="a small model, 16 positions")
    parser.set_defaults(batch=1, repeats=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=["LlamaGen GPT-B", "DnD GPT-B size"], choices=list(MODELS))
    args = parser.parse_args()
    if args.quick:
        args.models, args.tokens = ["LlamaGen small"], 16
    run_generation_benchmark(args, run, markdown)


if __name__ == "__main__":
    main()
