"""Our LlamaGen generation against the official code's `generate`, with the same weights, in one process
(issue 19, part 4). Run by hand, never by CI: it needs LlamaGen's repository beside the checkout.

    git clone https://github.com/FoundationVision/LlamaGen ../upstream/LlamaGen   # commit ce98ec4, as tests/golden
    python benchmarks/compare_official.py --upstream ../upstream --markdown benchmarks/results_official.md

The official GPT-B (class-conditional, 16384 codes, 256 positions) gets seeded random weights (normal, std
0.02 everywhere, so that no logit ties: upstream zero-initialises its output layer); our `LlamaGen` loads the
same tensors through `from_official`. Both generate 256 codes for one class with CFG 4, top-k 2000 and greedy
choice (upstream: `sample_logits=False`), alternating official / ours `--repeats` times after a warm-up each;
the table shows medians, the codes are compared, and the time of the linear layers alone (the same matmuls
run back to back, the floor at this precision) is measured too. Nothing of upstream's code is copied here:
it is imported from the checkout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = dict(gpt_model="GPT-B", vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
              model_type="c2i")


def official_model(upstream: Path):
    sys.path.insert(0, str(upstream / "LlamaGen"))
    from autoregressive.models import generate as official_generate
    from autoregressive.models.gpt import GPT_B

    torch.manual_seed(0)
    model = GPT_B(vocab_size=CONFIG["vocab_size"], block_size=CONFIG["block_size"], num_classes=CONFIG["num_classes"],
                  cls_token_num=CONFIG["cls_token_num"], model_type=CONFIG["model_type"]).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            tensor.normal_(0, 0.02) if not name.endswith("norm.weight") else tensor.fill_(1.0)
    return model, official_generate.generate


def timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def linear_floor(model, rows: int, tokens: int) -> float:
    """Seconds for every linear layer of ``model`` applied to ``rows`` vectors, ``tokens`` times in a row."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    inputs = [torch.randn(rows, 1, layer.in_features) for layer in layers]
    with torch.no_grad():
        started = time.perf_counter()
        for _ in range(tokens):
            for layer, x in zip(layers, inputs):
                layer(x)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, default=ROOT.parent / "upstream",
                        help="the folder holding the LlamaGen checkout")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    if not (args.upstream / "LlamaGen" / "autoregressive").is_dir():
        raise SystemExit(f"compare_official: no LlamaGen checkout at {args.upstream / 'LlamaGen'} (see the docstring)")
    torch.set_num_threads(args.threads)

    from _common import load_line, machine_lines, report
    from mmgen_pytorch import LlamaGen

    started, load_before = time.time(), os.getloadavg()[0]
    official, official_generate = official_model(args.upstream)
    ours = LlamaGen.from_official(official.state_dict(), config=CONFIG).eval()
    labels = torch.tensor([207])

    def run_official(tokens):
        return official_generate(official, labels, tokens, cfg_scale=4.0, cfg_interval=-1, temperature=1.0,
                                 top_k=2000, top_p=1.0, sample_logits=False)

    def run_ours(tokens):
        with torch.no_grad():
            return ours.generate(labels, max_new_tokens=tokens, cfg_scale=4.0, top_k=2000, greedy=True, progress=False)

    run_official(8), run_ours(8)  # warm-up
    seconds = {"official": [], "ours": []}
    codes = {}
    for _ in range(args.repeats):
        codes["official"], spent = timed(lambda: run_official(args.tokens))
        seconds["official"].append(spent)
        codes["ours"], spent = timed(lambda: run_ours(args.tokens))
        seconds["ours"].append(spent)
    floor = statistics.median(linear_floor(ours, 2, args.tokens) for _ in range(args.repeats))
    same = torch.equal(codes["official"].long().reshape(-1), codes["ours"].long().reshape(-1))
    agree = (codes["official"].long().reshape(-1) == codes["ours"].long().reshape(-1)).float().mean().item()

    official_s, ours_s = statistics.median(seconds["official"]), statistics.median(seconds["ours"])
    lines = ["# Against the official code: LlamaGen GPT-B generate (CPU)", "",
             "`python benchmarks/compare_official.py --upstream ../upstream --markdown benchmarks/results_official.md`",
             "", *machine_lines(torch.__version__, args.threads),
             f"- LlamaGen at commit ce98ec4 (its `autoregressive/models/generate.py`), GPT-B c2i with seeded random "
             f"weights, fp32, batch 1 (2 rows with CFG 4), top-k 2000, greedy, {args.tokens} codes; "
             f"median of {args.repeats} alternating runs after a warm-up",
             f"- linear layers alone (the floor): {floor:.2f} s", "",
             "| code | s | overhead above the floor, s | official / this |", "|---|---|---|---|",
             f"| official `generate` | {official_s:.2f} | {official_s - floor:.2f} | 1.00 |",
             f"| `LlamaGen.generate` | {ours_s:.2f} | {ours_s - floor:.2f} | {official_s / ours_s:.2f} |", "",
             f"- identical codes: {'yes' if same else f'no ({agree:.1%} of positions agree)'}",
             load_line(time.time() - started, load_before)]
    report(lines, args.markdown)


if __name__ == "__main__":
    main()
