"""Attention kernels on a mixed causal / bidirectional mask, on CPU: time and peak memory.

The mask is the one the backbone uses for interleaved modalities: a causal sequence with some
bidirectional blocks inside it (``TokenLayout.from_spans``). For every sequence length and number
of blocks, four forward-only implementations (``torch.no_grad``, batch 1, 8 heads, dim_head 64,
fp32) are compared:

- ``sdpa``          ``attend`` with ``AttentionMask(dense=layout.dense_mask())`` (bool ``[b, 1, n, n]``)
- ``flex``          ``attend`` with ``AttentionMask(block_mask=layout.block_mask())`` inside
                    ``eager_flex_attention()``: flex attention's unfused, uncompiled path
- ``flex-compiled`` ``attend`` with the same ``BlockMask`` as the backbone runs it: the compiled kernel
                    (``torch.compile(flex_attention, dynamic=False)``) on inputs padded to the mask's
                    128-token buckets; ``n/a`` when compiling fails or runs past ``--compile-timeout``
- ``einsum``        naive attention: ``q @ k^T * scale``, ``masked_fill``, ``softmax``, ``@ v``

Blocks are ``--block-len`` tokens long (shrunk to ``n // (2 * blocks)`` when needed, so that at
least half the sequence stays causal) and spread evenly over the sequence.

How it measures
---------------
Every (length, blocks, variant) runs in a fresh Python subprocess, so no allocator cache, compiled
kernel or mask survives from one measurement into the next. The subprocess builds q, k, v and the
mask, makes one warm-up call (reported as ``first call s``; it includes compilation for
``flex-compiled``), then times ``--repeats`` calls with ``time.perf_counter`` and reports the
median. Each timed call frees the previous output first.

Peak memory is read from the kernel, not from Python: ``tracemalloc`` does not see torch's CPU
allocations, and ``ru_maxrss`` is a whole-process peak (here it would be dominated by torch.compile
for ``flex-compiled`` and by building the ``BlockMask``, which on CPU evaluates the ``mask_mod``
densely). After the timed calls the subprocess makes two more calls; before each it resets its
resident-set high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and records its
RSS, after it reads ``VmHWM`` from ``/proc/self/status``. ``peak MB`` is the smaller of the two
``VmHWM - RSS``: the transient memory of one attention call (its output included) on top of the
inputs and the mask, which are already resident. For these two calls glibc malloc's mmap threshold
is fixed at 64 KiB (``mallopt``) and ``malloc_trim(0)`` runs before each, so freed buffers go back
to the OS instead of being reused silently by the next call, which would hide them from RSS; the
timed calls run with the default allocator. The mask's own size is reported separately as ``mask MB`` (the bytes of the dense bool
tensor, or of the BlockMask's tensors), with the time it took to build as ``mask ms``. Where
``clear_refs`` cannot be written the script falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` minus
the RSS before the first call, which then includes the warm-up call (and compilation); the printed
notes say so.

After measuring, each subprocess computes the SDPA reference on the same inputs and reports the
largest absolute difference of its output from it (``max abs diff``).

Run
---
From the repository root (the package need not be installed)::

    python benchmarks/bench_attention.py                 # full run: 512, 2048, 4096 x 1, 4, 8 blocks
    python benchmarks/bench_attention.py --quick         # smoke test, a few seconds
    python benchmarks/bench_attention.py --lengths 1024 --blocks 2 --repeats 10 --variants sdpa flex
    python benchmarks/bench_attention.py --markdown benchmarks/results_attention.md

``--threads`` sets torch's intra-op threads (default: torch's own default). The full run takes
about 3 to 5 minutes on 2 CPU cores, most of it flex attention's eager path and compilation.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg as _loadavg, reset_peak as _reset_peak, rss_kib as _rss_kib  # noqa: E402
from _common import machine_lines, run_json_subprocess, strict_allocator as _strict_allocator, trim as _trim  # noqa: E402

VARIANTS = ("sdpa", "flex", "flex-compiled", "einsum")
HEADS, DIM_HEAD, BATCH = 8, 64, 1
MEMORY_CALLS = 2
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# the worker: one variant, one configuration, in its own process
# ----------------------------------------------------------------------------------------------


def _import_package():
    try:
        import mmgen_pytorch  # noqa: F401
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(REPO_ROOT))


def block_spans(length: int, blocks: int, block_len: int) -> Tuple[List[Tuple[int, int]], int]:
    """``blocks`` bidirectional spans spread evenly over a causal sequence of ``length`` tokens."""
    if blocks == 0:
        return [], 0
    block_len = max(1, min(block_len, length // (2 * blocks)))
    gap = (length - blocks * block_len) / (blocks + 1)
    return [(int(round(gap * (i + 1) + block_len * i)), block_len) for i in range(blocks)], block_len












def _tensor_bytes(obj) -> int:
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(_tensor_bytes(t) for t in obj.as_tuple() if isinstance(t, torch.Tensor))


def worker(config: dict) -> dict:
    _import_package()
    import torch
    from mmgen_pytorch.backbone import AttentionMask, TokenLayout, attend, eager_flex_attention, flex_available

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    length, variant, repeats = config["length"], config["variant"], config["repeats"]
    spans, _ = block_spans(length, config["blocks"], config["block_len"])
    layout = TokenLayout.from_spans(lengths=[length], blocks=[spans])

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, length, DIM_HEAD, generator=generator) for _ in range(3))
    scale = DIM_HEAD ** -0.5

    if variant in ("flex", "flex-compiled") and not flex_available():
        return {"error": "flex attention unavailable in this torch"}

    start = time.perf_counter()
    if variant in ("sdpa", "einsum"):
        mask = layout.dense_mask()
    else:
        mask = layout.block_mask()
    mask_ms = (time.perf_counter() - start) * 1e3
    mask_mb = _tensor_bytes(mask) / 2**20

    if variant == "sdpa":
        def run():
            return attend(q, k, v, AttentionMask(dense=mask), scale=scale)
    elif variant == "flex":
        def run():
            with eager_flex_attention():
                return attend(q, k, v, AttentionMask(block_mask=mask), scale=scale)
    elif variant == "flex-compiled":
        def run():  # the backbone's own path: compiled, inputs padded to the mask's 128-token buckets
            return attend(q, k, v, AttentionMask(block_mask=mask), scale=scale)
    elif variant == "einsum":
        def run():
            scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
            scores = scores.masked_fill(~mask, float("-inf"))
            return torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), v)
    else:
        raise ValueError(f"unknown variant {variant!r}")

    with torch.no_grad():
        rss_before_first = _rss_kib()[0]
        start = time.perf_counter()
        out = run()
        first_s = time.perf_counter() - start

        times = []
        for _ in range(repeats):
            out = None  # free the previous output first, as in the memory calls below
            start = time.perf_counter()
            out = run()
            times.append((time.perf_counter() - start) * 1e3)

        # memory: two more calls, each from a reset high-water mark, with malloc's cache disabled
        strict_allocator = _strict_allocator()
        exact_peak, peaks = True, []
        for _ in range(MEMORY_CALLS):
            out = None
            _trim()
            if not _reset_peak():
                exact_peak = False
                out = run()
                break
            rss_before = _rss_kib()[0]
            out = run()
            peaks.append(_rss_kib()[1] - rss_before)
        if exact_peak:
            peak_kib = min(peaks)
        else:  # ru_maxrss is in KiB on Linux; includes the warm-up call (and compilation)
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_first

        reference = attend(q, k, v, AttentionMask(dense=layout.dense_mask()), scale=scale)
        diff = (out - reference).abs().max().item()

    return {"time_ms": statistics.median(times), "times_ms": times, "first_s": first_s,
            "peak_mb": peak_kib / 1024, "exact_peak": exact_peak, "strict_allocator": strict_allocator, "mask_mb": mask_mb,
            "mask_ms": mask_ms, "max_abs_diff": diff, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------


def run_worker(config: dict, timeout: float) -> dict:
    return run_json_subprocess(str(Path(__file__).resolve()), "--worker", config, timeout)


def repeats_for(length: int, requested: Optional[int]) -> int:
    if requested is not None:
        return requested
    return 10 if length <= 512 else 5 if length <= 2048 else 3




def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def machine_description(torch_version: str, threads: Optional[int]) -> List[str]:
    return machine_lines(torch_version, threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 8],
                        help="numbers of bidirectional blocks inside the causal sequence")
    parser.add_argument("--block-len", type=int, default=64, help="tokens per bidirectional block")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement (default: 10 up to length 512, 5 up to 2048, else 3)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement")
    parser.add_argument("--compile-timeout", type=float, default=180.0,
                        help="seconds for one flex-compiled measurement, compilation included")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: length 256, 1 and 2 blocks, 2 repeats, no torch.compile")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the table and the machine description to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    if args.quick:
        args.lengths, args.blocks = [256], [1, 2]
        args.repeats = args.repeats or 2
        args.variants = [v for v in args.variants if v != "flex-compiled"]

    header = ["seq_len", "blocks", "variant", "time ms", "min ms", "time / sdpa", "peak MB", "peak / sdpa",
              "mask MB", "mask ms", "first call s", "max abs diff"]
    rows, notes, torch_version, threads, exact, strict = [], [], "?", args.threads, True, True
    print("| " + " | ".join(header) + " |", flush=True)
    print("|" + "|".join("---" for _ in header) + "|", flush=True)
    began, load_before = time.perf_counter(), _loadavg()
    for length in args.lengths:
        for blocks in args.blocks:
            _, block_len = block_spans(length, blocks, args.block_len)
            results = {}
            for variant in args.variants:
                config = {"length": length, "blocks": blocks, "block_len": args.block_len,
                          "variant": variant, "repeats": repeats_for(length, args.repeats),
                          "threads": args.threads}
                timeout = args.compile_timeout if variant == "flex-compiled" else args.timeout
                result = run_worker(config, timeout)
                results[variant] = result
                if "error" in result:
                    notes.append(f"{variant} at seq_len {length}, {blocks} blocks: {result['error']}")
                else:
                    torch_version, threads = result["torch"], result["threads"]
                    exact = exact and result["exact_peak"]
                    strict = strict and result["strict_allocator"]
                base = results.get("sdpa", {})
                ok = "error" not in result
                row = [str(length), f"{blocks}x{block_len}", variant,
                       fmt(result.get("time_ms"), ".1f"),
                       fmt(min(result["times_ms"]) if ok else None, ".1f"),
                       fmt(result["time_ms"] / base["time_ms"] if ok and "time_ms" in base else None, ".2f"),
                       fmt(result.get("peak_mb"), ".1f"),
                       fmt(result["peak_mb"] / base["peak_mb"]
                           if ok and base.get("peak_mb", 0) > 0 else None, ".2f"),
                       fmt(result.get("mask_mb"), ".3f"), fmt(result.get("mask_ms"), ".1f"),
                       fmt(result.get("first_s"), ".2f"), fmt(result.get("max_abs_diff"), ".1e")]
                rows.append(row)
                print("| " + " | ".join(row) + " |", flush=True)
    elapsed = time.perf_counter() - began

    notes.insert(0, f"total wall time {elapsed:.0f} s; 1-minute load average {load_before} before, "
                    f"{_loadavg()} after (well above the thread count means other processes competed for the CPU)")
    if not exact:
        notes.insert(0, "peak MB fell back to ru_maxrss (includes the warm-up call and compilation)")
    if not strict:
        notes.insert(0, "malloc's cache could not be disabled (not glibc?): peak MB may undercount")
    for note in notes:
        print(f"note: {note}")

    if args.markdown is not None:
        lines = ["# Attention benchmark (CPU, forward only)", "",
                 "`" + " ".join(["python", "benchmarks/bench_attention.py",
                                 *(argv if argv is not None else sys.argv[1:])]) + "`", "",
                 *machine_description(torch_version, threads),
                 f"- batch {BATCH}, {HEADS} heads, dim_head {DIM_HEAD}, fp32, torch.no_grad; "
                 f"time = median (and min) over the timed calls after one warm-up call", "",
                 "Columns: `blocks` is number x length of the bidirectional blocks; `peak MB` is the "
                 "transient memory of one attention call above the resident inputs and mask "
                 "(RSS high-water mark, reset before the call, malloc cache off); `mask MB` / `mask ms` are the "
                 "mask's size and build time; `first call s` is the warm-up call (compilation for "
                 "flex-compiled). See the module docstring for the method.", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                 *("| " + " | ".join(row) + " |" for row in rows), "",
                 *(f"- {note}" for note in notes), ""]
        args.markdown.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
