"""MAR sampling time per image on CPU: AR steps x diffusion steps x CFG, plus an upstream-style loop.

A small random-weight MAR with the real token geometry (256-pixel images, stride 16: 256 tokens of
16 channels, 64 buffer rows) but narrow transformers and diffusion MLP, so the table shows how the
cost splits between the transformer passes (one per AR step, doubled rows with CFG) and the
diffusion head (every token goes through ``steps`` denoiser calls, doubled rows with CFG),
rather than the absolute speed of a released model.

Variants:

- ``ours``       ``MAR.sample``: only the predicted tokens go through the head, positions sliced
                 from the orders, the head's time and condition embeddings computed once per
                 call, only the conditional half of the CFG chain carried;
- ``upstream``   the same model driven by an upstream-style loop (``sample_tokens`` semantics):
                 boolean xor / nonzero gathers, and the head run on the whole doubled CFG chain
                 with its embeddings recomputed at every diffusion step.

Both give the same tokens (``tests/test_mar.py::test_fast_sampler_equals_an_upstream_style_loop``).
After one global warm-up call, each row is the median of ``--repeats`` timed calls (``torch.no_grad``,
fp32), divided by the batch size. ``cpu s`` is the process CPU time (``time.process_time``): with one
intra-op thread it is the compute a call costs, and it stays meaningful on a machine shared with
other jobs, where the wall time (``wall s``) also counts the time spent waiting for a core.

Run from the repository root::

    python benchmarks/bench_mar.py                       # full grid, a few minutes on 2 cores
    python benchmarks/bench_mar.py --quick               # smoke test
    python benchmarks/bench_mar.py --markdown benchmarks/results_mar.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen_pytorch.guidance import guide_both_halves, scheduled_cfg_scale  # noqa: E402
from mmgen_pytorch.mar import MAR, mask_schedule  # noqa: E402


def build(args) -> MAR:
    torch.manual_seed(0)
    model = MAR(img_size=256, vae_stride=16, vae_embed_dim=16, encoder_dim=args.dim, encoder_depth=args.depth,
                encoder_heads=4, num_classes=10, buffer_size=64, diffloss_depth=args.head_depth,
                diffloss_width=args.head_width, num_sampling_steps="100").eval()
    for param in model.diffloss.parameters():  # a zero-initialised head would ignore its condition
        torch.nn.init.normal_(param, std=0.02)
    return model


def upstream_style(model: MAR, labels, *, num_iter: int, cfg_scale: float, steps: int, generator) -> torch.Tensor:
    """``sample_tokens`` semantics: boolean masks and nonzero gathers; the head samples the whole
    doubled batch, every diffusion step embedding t and z for every row."""
    batch, guided = labels.shape[0], cfg_scale != 1.0
    chain = model.diffloss.sampling_diffusion(str(steps))
    tokens = torch.zeros(batch, model.seq_len, model.token_dim)
    mask = torch.ones(batch, model.seq_len, dtype=torch.bool)
    orders = model.random_orders(batch, generator=generator)
    embedding = model.class_emb(labels)
    if guided:
        embedding = torch.cat((embedding, model.fake_latent.expand(batch, -1)))
    for k, step in enumerate(mask_schedule(model.seq_len, num_iter)):
        doubled = (lambda x: torch.cat((x, x))) if guided else (lambda x: x)
        z = model.condition(doubled(tokens), doubled(mask), embedding)
        next_mask = model.mask_from_orders(orders, step.mask_len)
        to_pred = mask if k == num_iter - 1 else mask ^ next_mask
        z = z[doubled(to_pred).nonzero(as_tuple=True)]
        scale = scheduled_cfg_scale(cfg_scale, "linear", known=model.seq_len - step.mask_len, total=model.seq_len)
        half = torch.randn(z.shape[0] // (2 if guided else 1), model.token_dim, generator=generator)
        x = doubled(half)
        for i in reversed(range(chain.num_timesteps)):
            t = torch.full((x.shape[0],), i)
            out = model.diffloss.net(doubled(x[: half.shape[0]]), chain.model_timesteps(t), z)
            out = guide_both_halves(out, scale, features=model.token_dim, feature_dim=1) if guided else out
            x = chain.p_sample(chain.p_mean_variance(out, x, t), t, torch.randn(x.shape, generator=generator))
        tokens[to_pred.nonzero(as_tuple=True)] = x[: half.shape[0]]
        mask = next_mask
    return model.unpatchify(tokens)


def measure(fn, repeats: int):
    """Median (wall, cpu) seconds of ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


@torch.no_grad()
def run(args):
    torch.set_num_threads(args.threads)
    model = build(args)
    labels = torch.arange(args.batch) % 10
    model.sample(labels, num_iter=4, cfg_scale=2.0, num_sampling_steps="4", progress=False)  # warm-up
    upstream_style(model, labels, num_iter=4, cfg_scale=2.0, steps=4, generator=torch.Generator().manual_seed(0))
    rows = []
    grid = [(n, s, c) for n in args.num_iter for s in args.steps for c in (1.0, args.cfg)]
    for num_iter, steps, cfg in grid:
        def ours():
            model.sample(labels, num_iter=num_iter, cfg_scale=cfg, num_sampling_steps=str(steps),
                         generator=torch.Generator().manual_seed(0), progress=False)
        rows.append(("ours", num_iter, steps, cfg, *(t / args.batch for t in measure(ours, args.repeats))))
        print(rows[-1], flush=True)
        if (num_iter, steps) in args.compare:
            def reference():
                upstream_style(model, labels, num_iter=num_iter, cfg_scale=cfg, steps=steps,
                               generator=torch.Generator().manual_seed(0))
            rows.append(("upstream-style", num_iter, steps, cfg,
                         *(t / args.batch for t in measure(reference, args.repeats))))
            print(rows[-1], flush=True)
    return model, rows


def markdown(args, model, rows) -> str:
    ours = {(n, s, c): cpu for v, n, s, c, _, cpu in rows if v == "ours"}
    params = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.diffloss.parameters())
    lines = [
        "# MAR sampling benchmark (CPU)", "",
        f"`python benchmarks/bench_mar.py{' --quick' if args.quick else ''} --markdown {args.markdown}`", "",
        f"- date: {datetime.date.today()}",
        f"- machine: {os.cpu_count()}-core CPU, {platform.system()} {platform.release()} (shared with other jobs)",
        f"- python {platform.python_version()}, torch {torch.__version__}, intra-op threads: {args.threads}",
        f"- model: random weights, 256 tokens x 16 channels (img 256, stride 16), buffer 64, encoder/decoder "
        f"{args.depth}+{args.depth} blocks of width {args.dim}, DiffLoss {args.head_depth}x{args.head_width}; "
        f"{params / 1e6:.2f}M parameters ({head / 1e6:.2f}M in the head)",
        f"- batch {args.batch}, fp32, torch.no_grad; times are medians of {args.repeats} call(s) after one warm-up, "
        f"per image; `cpu s` is process CPU time (the machine is shared, so `wall s` also counts waiting); "
        f"`vs ours` compares CPU time",
        f"- CFG rows use scale {args.cfg} with the linear schedule (the transformer and the head see doubled rows)",
        "", "| AR steps | diffusion steps | CFG | variant | cpu s / image | wall s / image | vs ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, n, s, c, wall, cpu in rows:
        lines.append(f"| {n} | {s} | {'on' if c != 1.0 else 'off'} | {variant} | {cpu:.3f} | {wall:.3f} | "
                     f"{cpu / ours[(n, s, c)]:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-iter", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--head-depth", type=int, default=2)
    parser.add_argument("--head-width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="num_iter 16, 10 diffusion steps")
    parser.add_argument("--markdown", type=str, default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.quick:
        args.num_iter, args.steps = [16], [10]
    args.compare = {(64, 100)} if not args.quick else {(16, 10)}
    model, rows = run(args)
    table = markdown(args, model, rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
