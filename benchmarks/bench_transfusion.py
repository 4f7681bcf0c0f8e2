"""Transfusion on CPU: ``mmgen_pytorch`` against upstream ``transfusion-pytorch``, time and peak memory.

Both libraries are built at the same transformer dims (``dim``, ``depth``, ``heads``, ``dim_head``;
ours also gets upstream's feed-forward width ``int(dim * 4 * 2 / 3)`` and qk RMSNorm, which upstream
has on by default) and run in fp32 with ``torch.manual_seed`` fixed before every call. Everything else
is each library's default: upstream's ``modality_processing='auto'`` router, its dense einsum
attention on CPU, its adaptive-norm conditioning; our SDPA backend and cached sampler. The printed
parameter counts show that the two models are not the same size (upstream's per-token adaptive
norms are wider).

Tasks
-----
1. ``train README batch``: forward + backward on transfusion-pytorch's README batch (2 samples: text
   16, modality (4, 384), text 8, modality (6, 384) / text 16, modality (7, 384), text 5, modality
   (2, 384), text 9), ``num_text_tokens=256``, ``dim_latent=384``, ``modality_default_shape=(4,)``.
2. ``train long``: forward + backward on 2 samples of ``[text 100, image 8x8] x 6`` (2-D latents
   ``(8, 8, 16)``, channel-last, ``modality_default_shape=(8, 8)`` on both sides): 1022 tokens per
   sample as upstream lays it out. Our training sequence also appends a noised copy of every image
   that is followed by more content (5 of the 6; see ``packing.py``), so ours packs 1342 tokens per
   sample: the printed ``work`` column gives both packed lengths.
3. ``sample()``: a 512-token text prompt, then one 8x8 image forced right after it, CFG on (scale 3)
   on both sides, midpoint ODE with the same number of function evaluations (NFE): ours
   ``modality_steps=16`` = 16 midpoint steps = 32 NFE; upstream integrates over
   ``linspace(0, 1, modality_steps)``, so ``modality_steps=17`` = 32 NFE. Both NFE are counted (by
   wrapping the ODE function) and printed. Ours: ``sample(..., force_modality_at_start=0,
   max_modalities=1)`` (cached, the default). Upstream: ``force_modality_at_start=(0, (8, 8))``
   and ``max_length=63`` (upstream counts only generated tokens, so the loop stops right after the
   64 image tokens) with three samplers: ``sample`` = ``sample_one`` with ``cache_kv=False`` (its
   default), ``sample_one`` with ``cache_kv=True``, and ``sample_many`` (always cached). Note:
   ``sample_one``'s cache is only filled by text decoding steps, so with the modality forced at the
   start its ``cache_kv=True`` does the same work as ``cache_kv=False`` (the printed work says so);
   ``sample_many`` is upstream's cached modality path. The speed-up goal against "their cached
   sampler" is checked against the faster of the two.
4. ``generate_text_only``: 256 new tokens after a 16-token prompt, batch 1, cache on on both sides.

Work per call is recorded in one extra, untimed call per variant: transformer forward calls, ODE
function evaluations, and query tokens (rows x tokens entering the first attention layer).

Timing
------
All variants of a task live in one process. Each is called once as a warm-up (upstream's ``auto``
router benchmarks its strategies on its first call for a batch structure), then ``--repeats`` rounds
call every variant once, in alternating order (ours first, then upstream first, ...), timed with
``time.perf_counter``; the table gives the median. ``--threads`` (default 1) sets torch's intra-op
threads: this 2-core machine is often shared with another process, and two OpenMP threads
competing with it for one core make every timing erratic; 1 thread keeps the ratios stable.

Peak memory
-----------
For the ``--memory`` tasks (default: the two training tasks), each variant runs in a fresh Python
subprocess (so no allocator state or cache survives from another variant) that builds its model and
inputs, makes one warm-up call and then two measured calls. Before each measured call it hands freed
memory back to the OS (glibc ``mallopt``: mmap threshold 64 KiB and trim threshold 0 — set before
anything is built — plus ``malloc_trim(0)``), records its RSS, and resets the kernel's resident-set
high-water mark (``echo 5 > /proc/self/clear_refs``); after the call it reads ``VmHWM`` from
``/proc/self/status``. ``peak MB`` = the smaller of the two ``VmHWM - RSS before``: the memory one
call (forward, backward and the new gradients) needs on top of the resident model and inputs. Where
``clear_refs`` cannot be written it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss`` minus the RSS
after building model and inputs (which then includes the warm-up call) and the notes say so.

Run
---
From the repository root (the package need not be installed; ``pip install transfusion-pytorch``
for the baseline, otherwise the script prints why it skips and exits 0)::

    python benchmarks/bench_transfusion.py --quick        # tiny sizes, a smoke test
    python benchmarks/bench_transfusion.py --markdown benchmarks/results_transfusion.md
    python benchmarks/bench_transfusion.py --tasks long --repeats 3 --profile

``--profile`` also runs ``torch.profiler`` on our side of every selected task and prints the top
operators by self CPU time. The full run takes about 5 to 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # upstream shows tqdm bars unconditionally; read when tqdm is imported

import argparse
import gc
import json
import random
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg as _loadavg, reset_peak as _reset_peak, rss_kib as _rss_kib  # noqa: E402
from _common import machine_lines, run_json_subprocess, strict_allocator as _strict_allocator, trim as _trim  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS = ("readme", "long", "sample", "text")
SEED = 1234
DEFAULT_REPEATS = {"readme": 7, "long": 5, "sample": 3, "text": 5}


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------


def _import_package():
    try:
        import mmgen_pytorch  # noqa: F401
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(REPO_ROOT))


def upstream_available() -> Optional[str]:
    """None if transfusion_pytorch imports, else the reason it does not."""
    try:
        import transfusion_pytorch  # noqa: F401
    except Exception as error:  # ImportError, or a broken dependency
        return f"{type(error).__name__}: {error}"
    return None


def _quiet_upstream():
    try:
        from loguru import logger
        logger.disable("transfusion_pytorch")
    except ImportError:
        pass
    warnings.filterwarnings("ignore")


@dataclass
class Sizes:
    dims: dict
    long_pairs: int = 6            # (text, image) pairs per sample
    long_text: int = 100
    image_shape: tuple = (8, 8)
    image_channels: int = 16
    prompt_len: int = 512
    ode_steps: int = 16            # ours: midpoint steps (2 NFE each)
    text_prompt: int = 16
    text_new: int = 256

    @property
    def image_tokens(self) -> int:
        count = 1
        for s in self.image_shape:
            count *= s
        return count


FULL = Sizes(dims=dict(dim=256, depth=4, heads=8, dim_head=32))
QUICK = Sizes(dims=dict(dim=64, depth=2, heads=4, dim_head=16), long_pairs=2, long_text=20, image_shape=(4, 4),
              prompt_len=32, ode_steps=4, text_prompt=8, text_new=16)


def build_model(side: str, kind: str, sizes: Sizes):
    """``kind``: 'readme' (1-D latents of 384) or 'image' (2-D latents (H, W, C))."""
    import torch
    torch.manual_seed(0)
    dim_latent, shape = (384, (4,)) if kind == "readme" else (sizes.image_channels, tuple(sizes.image_shape))
    if side == "ours":
        from mmgen_pytorch import Transfusion
        dims = dict(sizes.dims, ff_hidden=int(sizes.dims["dim"] * 4 * 2 / 3), qk_norm=True)
        model = Transfusion(num_text_tokens=256, dim_latent=dim_latent, modality_default_shape=shape, transformer=dims)
    else:
        from transfusion_pytorch import Transfusion
        model = Transfusion(num_text_tokens=256, dim_latent=dim_latent, modality_default_shape=shape,
                            transformer=dict(sizes.dims))
    return model


def readme_batch():
    import torch
    from torch import randint, randn
    torch.manual_seed(42)
    return [[randint(0, 256, (16,)), randn(4, 384), randint(0, 256, (8,)), randn(6, 384)],
            [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), randn(2, 384), randint(0, 256, (9,))]]


def long_batch(sizes: Sizes):
    import torch
    torch.manual_seed(43)
    batch = []
    for _ in range(2):
        sample = []
        for _ in range(sizes.long_pairs):
            sample.append(torch.randint(0, 256, (sizes.long_text,)))
            sample.append(torch.randn(*sizes.image_shape, sizes.image_channels))
        batch.append(sample)
    return batch


def seeded(fn: Callable):
    import torch
    torch.manual_seed(SEED)
    random.seed(SEED)
    return fn()


def train_step(model, batch) -> Callable:
    def run():
        model.train()
        loss = model(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss
    return run


# the variants of every task: name -> (side, model kind, maker(model, sizes) -> zero-argument callable)

def _sample_prompt(sizes: Sizes):
    import torch
    return torch.randint(0, 256, (sizes.prompt_len,), generator=torch.Generator().manual_seed(44))


def _ours_sample(model, sizes):
    prompt = _sample_prompt(sizes)
    max_length = sizes.prompt_len + 32 + sizes.image_tokens  # room for [sos] [meta] shape [som], image, [eom]
    return lambda: model.sample([prompt], max_length=max_length, cfg_scale=3.0, modality_steps=sizes.ode_steps,
                                force_modality_at_start=0, max_modalities=1, progress=False)


def _theirs_sample_one(cache_kv: bool):
    def make(model, sizes):
        prompt = _sample_prompt(sizes)
        return lambda: model.sample_one([prompt], max_length=sizes.image_tokens - 1, cfg_scale=3.0,
                                        modality_steps=sizes.ode_steps + 1, cache_kv=cache_kv,
                                        force_modality_at_start=(0, tuple(sizes.image_shape)))
    return make


def _theirs_sample_many(model, sizes):
    prompt = _sample_prompt(sizes)
    return lambda: model.sample_many([[prompt]], max_length=sizes.image_tokens - 1, cfg_scale=3.0,
                                     modality_steps=sizes.ode_steps + 1,
                                     force_modality_at_start=(0, tuple(sizes.image_shape)))


def _text_prompt(sizes: Sizes):
    import torch
    return torch.randint(0, 256, (1, sizes.text_prompt), generator=torch.Generator().manual_seed(45))


def _ours_text(model, sizes):
    prompt = _text_prompt(sizes)
    return lambda: model.generate_text_only(prompt, sizes.text_prompt + sizes.text_new, progress=False)


def _theirs_text(model, sizes):
    prompt = _text_prompt(sizes)
    return lambda: model.generate_text_only(prompt, sizes.text_prompt + sizes.text_new, cache_kv=True)


VARIANTS: Dict[str, Dict[str, tuple]] = {
    "readme": {"ours": ("ours", "readme", lambda m, s: train_step(m, readme_batch())),
               "theirs": ("theirs", "readme", lambda m, s: train_step(m, readme_batch()))},
    "long": {"ours": ("ours", "image", lambda m, s: train_step(m, long_batch(s))),
             "theirs": ("theirs", "image", lambda m, s: train_step(m, long_batch(s)))},
    "sample": {"ours": ("ours", "image", _ours_sample),
               "theirs": ("theirs", "image", _theirs_sample_one(False)),
               "theirs cache_kv=True": ("theirs", "image", _theirs_sample_one(True)),
               "theirs sample_many": ("theirs", "image", _theirs_sample_many)},
    "text": {"ours": ("ours", "image", _ours_text),
             "theirs": ("theirs", "image", _theirs_text)},
}

def task_label(task: str, sizes: Sizes) -> str:
    image = "x".join(map(str, sizes.image_shape))
    shape_chars = len(",".join(map(str, sizes.image_shape)))  # [meta] shape [som] image [eom]
    long_tokens = 2 + sizes.long_pairs * (sizes.long_text + 3 + shape_chars + sizes.image_tokens)
    return {
        "readme": "train step, README batch",
        "long": f"train step, long (2 x {long_tokens} tokens, {sizes.long_pairs} {image} images each)",
        "sample": f"sample(): {sizes.prompt_len}-token prompt + one {image} image, CFG 3, {2 * sizes.ode_steps} NFE",
        "text": f"generate_text_only: {sizes.text_new} new tokens",
    }[task]


# ----------------------------------------------------------------------------------------------
# work accounting (one untimed call per variant)
# ----------------------------------------------------------------------------------------------


def _first_attention(model, side: str):
    return model.transformer.layers[0].attn if side == "ours" else model.transformer.layers[0][1].fn


def measure_work(model, side: str, fn: Callable) -> dict:
    counts = {"calls": 0, "nfe": 0, "query_tokens": 0, "shapes": []}

    def on_transformer(module, args, kwargs):
        counts["calls"] += 1
        x = args[0] if args else kwargs["x"]
        counts["shapes"].append(tuple(x.shape[:2]))

    def on_attention(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        counts["query_tokens"] += x.shape[0] * x.shape[1]

    def counting(f):
        def wrapped(t, x):
            counts["nfe"] += 1
            return f(t, x)
        return wrapped

    hooks = [model.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True),
             _first_attention(model, side).register_forward_pre_hook(on_attention, with_kwargs=True)]
    if side == "ours":
        flow = model.objective
        original = flow.integrate
        flow.integrate = lambda velocity, noise, steps, **kw: original(counting(velocity), noise, steps, **kw)
    else:
        original = model.odeint_fn
        model.odeint_fn = lambda f, y0, t, **kw: original(counting(f), y0, t, **kw)
    try:
        out = seeded(fn)
    finally:
        for hook in hooks:
            hook.remove()
        if side == "ours":
            del model.objective.integrate
        else:
            model.odeint_fn = original
    counts["output"] = describe_output(out)
    return counts


def describe_output(out) -> str:
    import torch
    if isinstance(out, torch.Tensor):
        return f"tensor {tuple(out.shape)}" if out.ndim else "loss"
    if isinstance(out, list) and out and isinstance(out[0], list):  # sample_many: a list of samples
        out = out[0]
    if isinstance(out, list):
        modalities = [tuple(item[1].shape) for item in out if not isinstance(item, torch.Tensor)]
        text = sum(item.numel() for item in out if isinstance(item, torch.Tensor))
        return f"{text} text tokens, modalities {modalities}"
    return type(out).__name__


def work_summary(task: str, work: dict) -> str:
    if task in ("readme", "long"):
        b, n = work["shapes"][0]
        return f"packed {b}x{n}"
    parts = [f"{work['calls']} fwd", f"{work['query_tokens']} query tok"]
    if work["nfe"]:
        parts.insert(1, f"{work['nfe']} NFE")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# memory: one variant in a fresh process
# ----------------------------------------------------------------------------------------------












def memory_worker(config: dict) -> dict:
    strict = _strict_allocator()
    _import_package()
    _quiet_upstream()
    import torch
    torch.set_num_threads(config["threads"])
    sizes = QUICK if config["quick"] else FULL
    side, kind, make = VARIANTS[config["task"]][config["variant"]]
    model = build_model(side, kind, sizes)
    fn = make(model, sizes)
    gc.collect()
    rss_built = _rss_kib()[0]
    seeded(fn)  # warm-up
    peaks, exact = [], True
    for _ in range(2):
        gc.collect()
        _trim()
        if not _reset_peak():
            exact = False
            seeded(fn)
            break
        before = _rss_kib()[0]
        seeded(fn)
        peaks.append(_rss_kib()[1] - before)
    peak_kib = min(peaks) if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_built
    return {"peak_mb": peak_kib / 1024, "exact": exact, "strict": strict, "rss_built_mb": rss_built / 1024}


def run_memory(task: str, variant: str, threads: int, quick: bool, timeout: float) -> dict:
    config = {"task": task, "variant": variant, "threads": threads, "quick": quick}
    return run_json_subprocess(str(Path(__file__).resolve()), "--memory-worker", config, timeout)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def time_variants(fns: Dict[str, Callable], repeats: int):
    """Wall-clock and process CPU times (ms) of ``repeats`` alternating rounds (the caller warmed up)."""
    names = list(fns)
    wall: Dict[str, List[float]] = {name: [] for name in names}
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            fn = fns[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            seeded(fn)
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def profile_ours(fn: Callable, label: str, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seeded(fn)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"\n### profile of ours: {label}\n\n```\n{table}\n```\n"


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------




def machine_description(threads: int) -> List[str]:
    import torch
    from importlib.metadata import PackageNotFoundError, version
    try:
        upstream = version("transfusion-pytorch")
    except PackageNotFoundError:  # imported from a checkout on PYTHONPATH: its pyproject.toml says
        import re

        import transfusion_pytorch
        pyproject = Path(transfusion_pytorch.__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        upstream = f"{found[1]} (a checkout)" if found else "? (not installed)"
    import mmgen_pytorch
    lines = machine_lines(torch.__version__, threads)
    lines[-1] += f"; transfusion-pytorch {upstream}, mmgen_pytorch {mmgen_pytorch.__version__}; fp32"
    return lines


@dataclass
class TaskResult:
    task: str
    medians: Dict[str, float] = field(default_factory=dict)
    cpu_medians: Dict[str, float] = field(default_factory=dict)
    times: Dict[str, List[float]] = field(default_factory=dict)
    cpu_times: Dict[str, List[float]] = field(default_factory=dict)
    work: Dict[str, dict] = field(default_factory=dict)
    memory: Dict[str, dict] = field(default_factory=dict)


def work_notes(results: Dict[str, "TaskResult"]) -> List[str]:
    """What the measured work says about the comparison (facts of this run, not assumptions)."""
    notes = []
    for task in ("readme", "long"):
        if task in results:
            work = results[task].work
            (b, n_ours), (_, n_theirs) = work["ours"]["shapes"][0], work["theirs"]["shapes"][0]
            if n_ours != n_theirs:
                notes.append(f"{task}: the same samples pack into {b}x{n_ours} tokens on our side and {b}x{n_theirs} "
                             f"upstream: ours appends a noised copy of every modality followed by more content "
                             f"(trained clean in place, as the sampler conditions on it); upstream drops the last "
                             f"token for next-token targets")
    if "sample" in results:
        work = results["sample"].work
        default_work, cached = work.get("theirs"), work.get("theirs cache_kv=True")
        if default_work and cached and (default_work["calls"], default_work["query_tokens"]) == (
                cached["calls"], cached["query_tokens"]):
            notes.append("sample: upstream's sample_one does the same work with cache_kv=True as with False here: its "
                         "cache is only filled by text decoding steps, and the image is forced right after the "
                         "prompt; sample_many is its cached path for this workload")
    if "text" in results:
        work = results["text"].work
        if work["ours"]["calls"] > work["theirs"]["calls"]:
            notes.append(f"text: ours makes {work['ours']['calls']} transformer calls for "
                         f"{work['ours']['calls'] - 1} new tokens: it also feeds the last sampled token, whose "
                         f"output is never used")
    return notes


def fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def goal_lines(results: Dict[str, TaskResult]) -> List[str]:
    def speedup(task, theirs="theirs"):
        r = results.get(task)
        if r is None or theirs not in r.medians:
            return None
        return r.medians[theirs] / r.medians["ours"]

    def mem_ratio(task):
        r = results.get(task)
        ours, theirs = (r.memory.get(name, {}).get("peak_mb") if r else None for name in ("ours", "theirs"))
        return ours / theirs if ours is not None and theirs else None

    def verdict(value, ok):
        return "not measured" if value is None else ("met" if ok(value) else "MISSED")

    def x(value, spec):
        return "—" if value is None else format(value, spec) + "x"

    lines = []
    s = speedup("readme")
    lines.append(f"- not slower on the README batch (speed-up >= 1): {x(s, '.2f')} -> {verdict(s, lambda v: v >= 1.0)}")
    s, m = speedup("long"), mem_ratio("long")
    lines.append(f"- long sequences >= 1.5x faster: {x(s, '.2f')} -> {verdict(s, lambda v: v >= 1.5)}")
    lines.append(f"- long sequences <= 0.5x peak memory: {x(m, '.2f')} -> {verdict(m, lambda v: v <= 0.5)}")
    s = speedup("sample")
    lines.append(f"- sampling >= 10x faster than their default sampler (sample_one, cache_kv=False): "
                 f"{x(s, '.1f')} -> {verdict(s, lambda v: v >= 10)}")
    cached = [v for v in (speedup("sample", "theirs cache_kv=True"), speedup("sample", "theirs sample_many"))
              if v is not None]
    s = min(cached) if cached else None
    lines.append(f"- sampling >= 1.5x faster than their fastest cached sampler (sample_one cache_kv=True, "
                 f"sample_many): {x(s, '.2f')} -> {verdict(s, lambda v: v >= 1.5)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: a smoke test")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per task (default: README 7, long 5, sample 3, text 5; --quick: 2)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see the docstring)")
    parser.add_argument("--memory", nargs="*", choices=TASKS, default=["readme", "long"],
                        help="tasks whose peak memory is measured in subprocesses (default: the training tasks)")
    parser.add_argument("--memory-timeout", type=float, default=300.0, help="seconds per memory subprocess")
    parser.add_argument("--profile", nargs="*", choices=TASKS, default=None,
                        help="also profile our side of these tasks (all selected ones if none is named) with "
                             "torch.profiler and print the top operators")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    reason = upstream_available()
    if reason is not None:
        print(f"SKIPPED: transfusion-pytorch is not importable ({reason}); "
              f"`pip install transfusion-pytorch` to compare against it.")
        return 0

    if args.memory_worker is not None:
        print("RESULT " + json.dumps(memory_worker(json.loads(args.memory_worker))), flush=True)
        return 0

    _import_package()
    _quiet_upstream()
    import torch
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    repeats = ({task: args.repeats for task in TASKS} if args.repeats else
               {task: 2 for task in TASKS} if args.quick else DEFAULT_REPEATS)
    began, load_before = time.perf_counter(), _loadavg()

    models = {}
    for side in ("ours", "theirs"):
        for kind in ("readme", "image"):
            if any(VARIANTS[t][v][:2] == (side, kind) for t in args.tasks for v in VARIANTS[t]):
                models[side, kind] = build_model(side, kind, sizes)
    params = {key: sum(p.numel() for p in m.parameters()) for key, m in models.items()}

    header_lines = [f"dims: {sizes.dims} on both sides (ours: ff_hidden {int(sizes.dims['dim'] * 8 / 3)}, qk_norm); "
                    f"parameters " + ", ".join(f"{side} {kind} {n / 1e6:.2f}M" for (side, kind), n in params.items())]
    print(header_lines[0], flush=True)

    results: Dict[str, TaskResult] = {}
    profiles: List[str] = []
    details: List[str] = []
    for task in args.tasks:
        result = TaskResult(task)
        fns, sides = {}, {}
        for name, (side, kind, make) in VARIANTS[task].items():
            fns[name] = make(models[side, kind], sizes)
            sides[name] = (side, models[side, kind])
        print(f"\n== {task_label(task, sizes)}", flush=True)
        for name, fn in fns.items():
            side, model = sides[name]
            result.work[name] = measure_work(model, side, fn)  # also the warm-up call
            work = result.work[name]
            print(f"   {name:22s} work: {work_summary(task, work)}; output: {work['output']}", flush=True)
        task_repeats = repeats.get(task, 5)
        result.times, result.cpu_times = time_variants(fns, task_repeats)
        result.medians = {name: statistics.median(t) for name, t in result.times.items()}
        result.cpu_medians = {name: statistics.median(t) for name, t in result.cpu_times.items()}
        for name, t in result.times.items():
            line = (f"   {name:22s} median {result.medians[name]:9.1f} ms (CPU {result.cpu_medians[name]:9.1f} ms)"
                    f"   runs " + " ".join(f"{v:.0f}" for v in t))
            details.append(f"{task_label(task, sizes)} | {name}: wall ms " + " ".join(f"{v:.0f}" for v in t)
                           + "; CPU ms " + " ".join(f"{v:.0f}" for v in result.cpu_times[name]))
            print(line, flush=True)
        if args.profile is not None and (not args.profile or task in args.profile):
            profiles.append(profile_ours(fns["ours"], task_label(task, sizes)))
            print(profiles[-1], flush=True)
        results[task] = result

    # memory, each variant in its own process (after the timings, so they do not compete)
    notes = []
    for task in args.tasks:
        if task not in (args.memory or []):
            continue
        for name in ("ours", "theirs"):
            measured = run_memory(task, name, args.threads, args.quick, args.memory_timeout)
            results[task].memory[name] = measured
            if "error" in measured:
                notes.append(f"memory of {name} on {task}: {measured['error']}")
            else:
                if not measured["exact"]:
                    notes.append(f"memory of {name} on {task}: fell back to ru_maxrss (includes the warm-up call)")
                if not measured["strict"]:
                    notes.append(f"memory of {name} on {task}: malloc's cache could not be disabled; may undercount")
            print(f"   peak memory {task} {name}: {fmt(measured.get('peak_mb'), '.1f')} MB", flush=True)

    header = ["task", "ours (ms)", "theirs (ms)", "speed-up (theirs/ours)", "CPU-time speed-up",
              "peak MB ours / theirs (ratio)", "work ours / theirs"]
    rows = []
    for task, result in results.items():
        theirs_names = [n for n in VARIANTS[task] if n != "ours"]
        for name in theirs_names:
            label = task_label(task, sizes) + ("" if name == "theirs" else f" — vs {name}")
            if task == "sample" and name == "theirs":
                label += " — vs sample_one cache_kv=False (default)"
            memory = "—"
            mo, mt = result.memory.get("ours", {}), result.memory.get(name, {})
            if "peak_mb" in mo and "peak_mb" in mt:
                ratio = mo["peak_mb"] / mt["peak_mb"] if mt["peak_mb"] > 0 else None
                memory = f"{mo['peak_mb']:.0f} / {mt['peak_mb']:.0f} ({fmt(ratio, '.2f')})"
            rows.append([label, f"{result.medians['ours']:.1f}", f"{result.medians[name]:.1f}",
                         f"{result.medians[name] / result.medians['ours']:.2f}",
                         f"{result.cpu_medians[name] / result.cpu_medians['ours']:.2f}", memory,
                         f"{work_summary(task, result.work['ours'])} / {work_summary(task, result.work[name])}"])

    elapsed = time.perf_counter() - began
    notes += work_notes(results)
    notes.insert(0, "timed rounds per task: " + ", ".join(f"{t} {repeats[t]}" for t in args.tasks)
                 + "; one untimed call per variant before them (warm-up and work count); total wall time "
                    f"{elapsed:.0f} s; 1-minute load average {load_before} before, {_loadavg()} after "
                    f"(above the thread count: other processes competed for the CPU)")
    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
             *("| " + " | ".join(row) + " |" for row in rows)]
    goals = goal_lines(results)
    if args.quick:
        goals = [g + " (quick sizes: the goals are meant for the full sizes)" for g in goals]
    print("\n" + "\n".join(table), flush=True)
    print("\ngoals:\n" + "\n".join(goals))
    for note in notes:
        print(f"note: {note}")

    if args.markdown is not None:
        lines = ["# Transfusion: mmgen_pytorch vs transfusion-pytorch (CPU)", "",
                 "`" + " ".join(["python", "benchmarks/bench_transfusion.py",
                                 *(argv if argv is not None else sys.argv[1:])]) + "`", "",
                 *machine_description(torch.get_num_threads()), f"- {header_lines[0]}",
                 "- time: median of the timed rounds, variants alternating in one process; peak MB: memory one "
                 "call needs above the resident model and inputs (RSS high-water mark in a fresh subprocess, "
                 "malloc cache off); see the module docstring for the method and the task definitions.",
                 "- work: `packed b x n` = the token grid the transformer runs on; `fwd` = transformer calls, "
                 "`NFE` = ODE function evaluations, `query tok` = rows x tokens entering the first attention layer.",
                 "- `CPU-time speed-up`: the same ratio on the medians of process CPU time (`time.process_time`); "
                 "with 1 intra-op thread it is the work actually done, insensitive to other processes taking "
                 "the CPU away (which inflates wall-clock times).",
                 "", *table, "", "Goals (wall-clock medians):", "", *goals, "", *(f"- {note}" for note in notes), "",
                 "## All timed runs", "", *(f"- {line}" for line in details), ""]
        if profiles:
            lines += ["## Profiles (ours)", *profiles]
        args.markdown.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
