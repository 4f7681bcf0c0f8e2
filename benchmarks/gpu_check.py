"""The GPU check: CUDA correctness checks and one table of GPU measurements, in one prepared run.

One run on one CUDA GPU (sized for an H100: under 8 minutes in all) does three things:

(a) Checks, each printed ``PASS`` / ``FAIL`` (or ``n/a`` with the reason) with the largest relative
    error ``max|actual - expected| / max|expected|`` against its tolerance:

    - ``flex == sdpa``: a Transfusion with ``attn_backend="flex"`` and one with ``"sdpa"`` holding the
      same (perturbed, so no layer starts at zero) weights, on ragged text + image batches, with fixed
      flow times and noise: the loss, the text logits and every parameter's gradient, in fp32 (TF32
      off) and under bf16 autocast (wider tolerances, ``TOLERANCES`` below);
    - ``cached == uncached``: ``LlamaGen.generate`` (CFG, top-k sampling, a fixed generator: the same
      codes, and logits within tolerance) and ``Transfusion.sample`` (CFG, a forced image, a fixed
      generator: the same text, images within tolerance) with ``use_cache=True`` and ``False``;
    - ``compiled == eager``: the loss and gradients of a ``torch.compile``-d Transfusion training
      forward (inductor; SDPA and flex), and ``LlamaGen.generate(compile=True)`` /
      ``Transfusion.sample(compile=True)`` against eager where the signature has ``compile``
      (otherwise the check says ``n/a`` and why).

(b) One table of measurements:

    - a Transfusion "B" training step (dim 768, depth 12, heads 12, 32000 text tokens, 16 x 16 image
      latents of 16 channels) on 2 ragged text + image samples of 4096 packed tokens each, bf16
      autocast, AdamW: tokens/s, model FLOPs utilisation (MFU) and peak memory
      (``torch.cuda.max_memory_allocated``), SDPA and flex. MFU = model FLOPs per step / step time /
      peak, where model FLOPs = ``6 * N * T + 6 * depth * dim * sum_i n_i**2``: ``N`` the parameters
      applied to every token (not the embedding tables, a lookup, nor the adaLN time modulation, which
      runs once per distinct flow time), ``T = sum_i n_i`` the packed tokens (``n_i`` per sample), and the
      attention term the forward + backward products ``QK^T`` and ``PV`` (``12 * depth * dim * n_i**2``
      dense) halved for the causal mask. The peak is 989 TFLOP/s (H100 SXM, bf16 dense;
      ``--peak-tflops`` for another card); the timed steps run in bf16 only (no fp32/TF32 row);
    - LlamaGen GPT-B (``LlamaGen.from_preset("GPT-B")``, random weights) generating a 16 x 16 grid at
      batch 8, CFG 4, top-k 2000: image tokens/s, eager and, where ``generate`` has a ``compile``
      switch, compiled (its first, compiling call is timed separately);
    - MAR-B (``mar_base()``) sampling 8 latents, 64 iterations, 100 diffusion steps, CFG 2.9 linear:
      seconds and images/s;
    - recompiles: 20 random ragged batches through a flex Transfusion (forward + backward), the
      number of graphs dynamo compiled (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``
      before and after), the distinct packed lengths, and whether torch warned "flex_attention called
      without torch.compile", which announces the slow unfused fallback (it warns once per process).
      The tally is recorded after every batch.

(c) ``benchmarks/results_gpu.md`` (``--out``): date, device name, torch and CUDA versions, the command,
    the table and the check list; the same text is printed.

Timing: every timed call has warm-up calls first (compilation happens there) and
``torch.cuda.synchronize()`` before and after. Each section runs in its own Python process with a
time limit: the remaining budget (``--budget`` seconds, default 450) is shared among the sections not
yet run in proportion to their weights, so time a section leaves unused goes to the later ones. A
section stops starting new repeats near its limit and is killed at it; rows it recorded by then are
kept. A section that raises prints its traceback and the run goes on; the exit status is 1 if any
check failed or any section raised or was killed, else 0.

``--sections`` runs a subset (e.g. a rerun of one that failed) and ``--budget`` sets the time for them.

``--dry-run``: the same code path on the CPU at tiny sizes (dim 32, depth 2, a few short sequences
and steps; about 35 s of CPU time, one thread), so that CI keeps the script working. Flex attention has
no backward on the CPU, so there its rows run forward only (said in the row) and its backward checks
print ``n/a`` with the reason; compiled checks use the ``aot_eager`` backend (no C++ build); MFU is
``n/a (cpu)``; the results go to ``--out`` or a temporary file, never to ``results_gpu.md``.

Run from the repository root (the package need not be installed, its dependencies must be; the
dry run also passes on torch 2.11, older than the package's pin, and the report names the version)::

    python benchmarks/gpu_check.py                     # on a CUDA machine: writes benchmarks/results_gpu.md
    python benchmarks/gpu_check.py --dry-run           # CPU smoke run, results to a temporary file
    python benchmarks/gpu_check.py --sections train --budget 200 --out /tmp/train.md
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmgen_pytorch import MAR, LlamaGen, Transfusion  # noqa: E402
from mmgen_pytorch.mar import PRESETS as MAR_PRESETS  # noqa: E402
from mmgen_pytorch.transfusion.packing import build_training_sequence  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results_gpu.md"
GPU_BUDGET_S, DRY_BUDGET_S = 450.0, 300.0
TABLE_HEADER = "| measurement | variant | seconds | throughput | MFU | peak memory | note |"
CHECK_HEADER = "| check | result | max rel. error | tolerance | note |"
H100_BF16_DENSE_TFLOPS = 989.0
FALLBACK_WARNING = "flex_attention called without torch.compile"
# relative to max|expected|; bf16: both sides round activations to 8 bits of mantissa
TOLERANCES = {"fp32": {"forward": 1e-4, "grad": 1e-3}, "bf16": {"forward": 2e-2, "grad": 5e-2}}
GENERATION_TOL = 1e-4   # fp32 logits / latents of cached vs uncached and compiled vs eager sampling
COMPILE_TOL = {"forward": 1e-4, "grad": 1e-3}  # inductor fuses and reorders reductions


# sizes

@dataclass(frozen=True)
class ModelSize:
    dim: int
    depth: int
    heads: int


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    device: str
    check_model: ModelSize          # flex == sdpa, cached == uncached, compiled == eager
    check_tokens: Tuple[int, int]   # packed tokens per sample of a check batch, drawn in this range
    check_batches: int              # ragged batches, each checked in fp32 and under bf16 autocast
    image_side: int                 # image latents are [side, side, latent_channels]
    latent_channels: int
    text_vocab: int
    train_model: ModelSize          # the measured training step
    train_vocab: int
    train_image_side: int
    train_tokens: int               # packed tokens per sample
    train_batch: int
    warmup: int
    steps: int
    llamagen_preset: Optional[str]  # None: llamagen_dims
    llamagen_dims: dict
    gen_batch: int
    gen_top_k: int
    check_gen_tokens: int
    mar_config: dict
    mar_batch: int
    mar_iters: int
    mar_steps: str
    recompile_model: ModelSize
    recompile_batches: int
    recompile_tokens: Tuple[int, int]
    compile_backend: str


GPU = Sizes(device="cuda", check_model=ModelSize(256, 2, 4), check_tokens=(300, 900), check_batches=2,
            image_side=8, latent_channels=16, text_vocab=256,
            train_model=ModelSize(768, 12, 12), train_vocab=32000, train_image_side=16, train_tokens=4096,
            train_batch=2, warmup=3, steps=10,
            llamagen_preset="GPT-B", llamagen_dims={}, gen_batch=8, gen_top_k=2000,
            check_gen_tokens=32, mar_config=dict(MAR_PRESETS["mar_base"]), mar_batch=8, mar_iters=64,
            mar_steps="100", recompile_model=ModelSize(256, 2, 4), recompile_batches=20,
            recompile_tokens=(128, 1500), compile_backend="inductor")

DRY = Sizes(device="cpu", check_model=ModelSize(32, 2, 2), check_tokens=(24, 48), check_batches=1,
            image_side=2, latent_channels=4, text_vocab=32,
            train_model=ModelSize(32, 2, 2), train_vocab=64, train_image_side=2, train_tokens=64, train_batch=2,
            warmup=1, steps=2,
            llamagen_preset=None, llamagen_dims=dict(dim=32, depth=2, heads=2, vocab_size=64, grid_size=4,
                                                     num_classes=10),
            gen_batch=2, gen_top_k=16, check_gen_tokens=6,
            mar_config=dict(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_dim=32, encoder_depth=1,
                            encoder_heads=2, decoder_depth=1, num_classes=10, buffer_size=2, diffloss_depth=1,
                            diffloss_width=32),
            mar_batch=2, mar_iters=2, mar_steps="4", recompile_model=ModelSize(32, 2, 2), recompile_batches=4,
            recompile_tokens=(16, 48), compile_backend="aot_eager")


# results of one section, saved after every entry so that a killed section keeps what it recorded

class Recorder:
    def __init__(self, path: Path):
        self.path = path
        self.data: Dict[str, list] = {"checks": [], "rows": []}

    def check(self, name: str, passed: Optional[bool], *, error: Optional[float] = None,
              tolerance: Optional[float] = None, note: str = "") -> None:
        """``passed=None``: not applicable here (``note`` says why)."""
        entry = dict(name=name, result="n/a" if passed is None else "PASS" if passed else "FAIL",
                     error=error, tolerance=tolerance, note=note)
        print(f"  {entry['result']:4}  {name}" + (f"  max rel. error {error:.2e} (tol {tolerance:.0e})"
                                                   if error is not None else "") + (f"  [{note}]" if note else ""),
              flush=True)
        self._add("checks", entry)

    def row(self, measurement: str, variant: str, *, seconds: Optional[float] = None, throughput: str = "",
            mfu: str = "", memory: str = "", note: str = "", key: Optional[str] = None) -> None:
        """``key``: a later row with the same key replaces this one (a running tally)."""
        entry = dict(measurement=measurement, variant=variant, seconds=seconds, throughput=throughput, mfu=mfu,
                     memory=memory, note=note, key=key)
        shown = {**entry, "seconds": None if seconds is None else f"{seconds:.3f}"}
        print(f"  {measurement} [{variant}]: " + ", ".join(
            f"{k} {v}" for k, v in shown.items() if k not in ("measurement", "variant", "key")
            and v not in ("", None)), flush=True)
        self._add("rows", entry)

    def _add(self, kind: str, entry: dict) -> None:
        kept = [e for e in self.data[kind] if entry.get("key") is None or e.get("key") != entry["key"]]
        self.data[kind] = kept + [entry]
        self.path.write_text(json.dumps(self.data))


@dataclass
class Context:
    sizes: Sizes
    recorder: Recorder
    soft_deadline: float   # time.time() after which no new repeat starts
    peak_tflops: float

    @property
    def dry_run(self) -> bool:
        return self.sizes.device == "cpu"

    @property
    def device(self) -> torch.device:
        return torch.device(self.sizes.device)

    def time_left(self) -> bool:
        return time.time() < self.soft_deadline


# small helpers

def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in fp32 (0 when both are all zero)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def worst_error(pairs) -> float:
    """The largest :func:`relative_error` over ``(actual, expected)`` pairs."""
    return max((relative_error(a, e) for a, e in pairs), default=0.0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(ctx: Context, call: Callable[[], object], repeats: int) -> List[float]:
    """Seconds of ``repeats`` calls (synchronized; at least one, fewer when the section's time runs out)."""
    seconds = []
    for _ in range(repeats):
        synchronize(ctx.device)
        start = time.perf_counter()
        call()
        synchronize(ctx.device)
        seconds.append(time.perf_counter() - start)
        if not ctx.time_left():
            break
    return seconds


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add N(0, 0.02) to every parameter, so that zero-initialised layers (output heads, adaLN gates)
    carry signal and every gradient is informative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p) * 0.02)
    return model


def has_compile_switch(function: Callable) -> bool:
    return "compile" in inspect.signature(function).parameters


def attempt(ctx: Context, name: str, call: Callable[[], None]) -> None:
    """``call()``, unless the section's time has run out (then ``name`` is recorded as not run); an
    exception prints its traceback and records ``name`` as failed, and the section goes on."""
    if not ctx.time_left():
        ctx.recorder.check(name, None, note="not run: the section's time ran out")
        return
    try:
        call()
    except Exception as error:  # one broken check or row must not hide the others
        traceback.print_exc()
        ctx.recorder.check(name, False, note=f"raised {type(error).__name__}: {str(error)[:200]}")


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2 ** 30:.2f} GiB"


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict):
    """``into["bytes"]``: ``torch.cuda.max_memory_allocated`` over the block (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into["bytes"] = torch.cuda.max_memory_allocated(device)


def memory_text(peak: dict, dry_run: bool) -> str:
    return "n/a (cpu)" if dry_run else gib(peak["bytes"])


# ragged Transfusion batches

def transfusion(size: ModelSize, *, vocab: int, image_side: int, channels: int, backend: str) -> Transfusion:
    return Transfusion(num_text_tokens=vocab, dim_latent=channels, modality_default_shape=(image_side, image_side),
                       transformer=dict(dim=size.dim, depth=size.depth, heads=size.heads, attn_backend=backend))


def packed_length(model: Transfusion, items: list) -> int:
    """Tokens of one sample as training packs it ([sos], text, image headers, noised copies, [eos])."""
    samples, _ = model.normalize_batch([items], None)
    return build_training_sequence(samples[0], model.vocab, model.placement).length


def ragged_sample(model: Transfusion, target: int, generator: torch.Generator, *, image_side: int,
                  channels: int, vocab: int) -> list:
    """Text, image, text, ..., text of exactly ``target`` packed tokens (text runs of random length; the
    last text run fills up). Every image is followed by text, so each also gets its noised copy."""
    def text(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (n,), generator=generator)

    def image() -> torch.Tensor:
        return torch.randn(image_side, image_side, channels, generator=generator)

    items: list = []
    while True:
        pair = [text(int(torch.randint(1, 1 + max(2, target // 8), (1,), generator=generator))), image()]
        if packed_length(model, items + pair + [text(1)]) > target:
            break
        items += pair
    fill = target - packed_length(model, items + [text(1)]) + 1
    if fill < 1:
        raise ValueError(f"target {target} is too short for an image of side {image_side}")
    return items + [text(fill)]


def ragged_batch(model: Transfusion, targets: Sequence[int], seed: int, *, image_side: int, channels: int,
                 vocab: int) -> List[list]:
    generator = torch.Generator().manual_seed(seed)
    return [ragged_sample(model, t, generator, image_side=image_side, channels=channels, vocab=vocab)
            for t in targets]


def random_targets(low_high: Tuple[int, int], count: int, generator: torch.Generator) -> List[int]:
    low, high = low_high
    return [int(t) for t in torch.randint(low, high + 1, (count,), generator=generator)]


def fixed_times_and_noise(batch: List[list], seed: int) -> Tuple[list, list]:
    """One flow time and one noise tensor per image of every sample (images are the float tensors)."""
    generator = torch.Generator().manual_seed(seed)
    times = [[float(torch.rand((), generator=generator)) for i in s if i.is_floating_point()] for s in batch]
    noise = [[torch.randn(i.shape[0] * i.shape[1], i.shape[2], generator=generator) for i in s
              if i.is_floating_point()] for s in batch]
    return times, noise


def to_device(batch: List[list], device: torch.device) -> List[list]:
    return [[i.to(device) for i in s] for s in batch]


# (a) checks: flex == sdpa

def check_model_pair(sizes: Sizes, device: torch.device) -> Tuple[Transfusion, Transfusion]:
    """An sdpa and a flex Transfusion with the same perturbed weights, in training mode."""
    torch.manual_seed(0)
    config = dict(vocab=sizes.text_vocab, image_side=sizes.image_side, channels=sizes.latent_channels)
    sdpa = perturb(transfusion(sizes.check_model, backend="sdpa", **config)).to(device)
    flex = transfusion(sizes.check_model, backend="flex", **config).to(device)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def loss_and_grads(model: Transfusion, batch, times, noise, *, dtype: str = "fp32", backward: bool = True,
                   with_logits: bool = True, forward: Optional[Callable] = None):
    """Loss, text logits (None without ``with_logits``) and (with ``backward``) named gradients of one
    training forward of ``model`` through ``forward`` (default: the model itself; e.g. a compiled wrapper)."""
    forward = model if forward is None else forward
    model.zero_grad(set_to_none=True)
    autocast = (torch.autocast(model.device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    logits = None
    with autocast, torch.set_grad_enabled(backward):
        loss = forward(batch, times=times, noise=noise, prob_uncond=0.0)
        if with_logits:
            logits = forward(batch, times=times, noise=noise, prob_uncond=0.0, return_loss=False)[0].detach()
    if backward:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logits, grads


def compare_runs(ctx: Context, name: str, got, expected, tolerances: dict, *, backward: bool) -> None:
    loss, logits, grads = got
    loss_ref, logits_ref, grads_ref = expected
    forward_error = worst_error([(loss, loss_ref)] + ([(logits, logits_ref)] if logits is not None else []))
    ctx.recorder.check(f"{name} forward (loss{', text logits' if logits is not None else ''})",
                       forward_error <= tolerances["forward"],
                       error=forward_error, tolerance=tolerances["forward"])
    if not backward:
        return
    same_keys = grads.keys() == grads_ref.keys() and len(grads) > 0
    grad_error = worst_error((grads[k], grads_ref[k]) for k in grads_ref) if same_keys else float("inf")
    ctx.recorder.check(f"{name} backward (every parameter's gradient)", same_keys and grad_error <= tolerances["grad"],
                       error=grad_error, tolerance=tolerances["grad"],
                       note="" if same_keys else "the two models have gradients for different parameters")


def section_flex_vs_sdpa(ctx: Context) -> None:
    sizes, device = ctx.sizes, ctx.device
    sdpa, flex = check_model_pair(sizes, device)
    generator = torch.Generator().manual_seed(1)
    for index in range(sizes.check_batches):
        targets = random_targets(sizes.check_tokens, 3, generator)
        batch = ragged_batch(sdpa, targets, seed=100 + index, image_side=sizes.image_side,
                             channels=sizes.latent_channels, vocab=sizes.text_vocab)
        times, noise = fixed_times_and_noise(batch, seed=200 + index)
        batch, noise = to_device(batch, device), to_device(noise, device)
        for dtype in ("fp32", "bf16"):
            name = f"flex == sdpa, {dtype}, ragged batch {index} (packed lengths {targets})"
            attempt(ctx, name, lambda: compare_backends(ctx, name, (sdpa, flex), (batch, times, noise), dtype=dtype))


def compare_backends(ctx: Context, name: str, models: Tuple[Transfusion, Transfusion], inputs, *, dtype: str) -> None:
    sdpa, flex = models
    backward = not ctx.dry_run
    expected = loss_and_grads(sdpa, *inputs, dtype=dtype, backward=backward)
    got = loss_and_grads(flex, *inputs, dtype=dtype, backward=backward)
    compare_runs(ctx, name, got, expected, TOLERANCES[dtype], backward=backward)
    if not backward:
        ctx.recorder.check(f"{name} backward", None, note="flex attention has no backward on the CPU")


# (a) checks: cached == uncached

def small_llamagen(sizes: Sizes, device: torch.device) -> LlamaGen:
    torch.manual_seed(0)
    dims = sizes.llamagen_dims or dict(dim=sizes.check_model.dim, depth=sizes.check_model.depth,
                                       heads=sizes.check_model.heads, vocab_size=1024, grid_size=8, num_classes=10)
    return perturb(LlamaGen(**dims)).to(device).eval()


def compare_codes(ctx: Context, name: str, got: Tuple[torch.Tensor, torch.Tensor],
                  expected: Tuple[torch.Tensor, torch.Tensor], tolerance: float) -> None:
    """Codes must be equal; logits within ``tolerance`` up to the first position where codes differ."""
    (codes, logits), (codes_ref, logits_ref) = got, expected
    flat, flat_ref = codes.flatten(1), codes_ref.flatten(1)
    differing = (flat != flat_ref).any(dim=0).nonzero()
    upto = int(differing[0]) + 1 if len(differing) else flat.shape[1]
    error = relative_error(logits[:, :upto], logits_ref[:, :upto])
    note = "" if not len(differing) else f"codes differ from position {upto - 1} on"
    ctx.recorder.check(name, not len(differing) and error <= tolerance, error=error, tolerance=tolerance, note=note)


def llamagen_codes(model: LlamaGen, sizes: Sizes, **options) -> Tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(2, device=model.token_embed.weight.device) % 10
    return model.generate(labels, max_new_tokens=sizes.check_gen_tokens, cfg_scale=4.0, top_k=sizes.gen_top_k,
                          generator=7, return_logits=True, progress=False, **options)


def small_transfusion_sampler(sizes: Sizes, device: torch.device) -> Transfusion:
    torch.manual_seed(0)
    model = transfusion(sizes.check_model, vocab=sizes.text_vocab, image_side=sizes.image_side,
                        channels=sizes.latent_channels, backend="auto")
    return perturb(model).to(device).eval()


def transfusion_samples(model: Transfusion, sizes: Sizes, **options) -> List[list]:
    generator = torch.Generator().manual_seed(3)
    prompts = [[torch.randint(0, sizes.text_vocab, (n,), generator=generator).to(model.device)] for n in (5, 9)]
    return model.sample(prompts, max_length=2 * sizes.image_side ** 2 + 24, cfg_scale=2.5, modality_steps=4,
                        force_modality_at_start=0, max_modalities=1, text_min_p=0.0, generator=11,
                        progress=False, **options)


def compare_samples(ctx: Context, name: str, got: List[list], expected: List[list], tolerance: float) -> None:
    """The same text ids and item kinds; modalities within ``tolerance``."""
    same_structure = len(got) == len(expected) and all(
        [type(i) for i in a] == [type(i) for i in b] for a, b in zip(got, expected))
    pairs, same_text = [], same_structure
    for a, b in zip(got, expected) if same_structure else []:
        for x, y in zip(a, b):
            if isinstance(x, tuple):
                same_structure &= x[0] == y[0] and x[1].shape == y[1].shape
                pairs.append((x[1], y[1]))
            else:
                same_text &= torch.equal(x, y)
    error = worst_error(pairs) if same_structure else float("inf")
    note = "" if same_structure and same_text else "different items or text ids"
    ctx.recorder.check(name, same_structure and same_text and error <= tolerance, error=error, tolerance=tolerance,
                       note=note)


def section_cache(ctx: Context) -> None:
    sizes, device = ctx.sizes, ctx.device
    llamagen, transfusion_model = small_llamagen(sizes, device), small_transfusion_sampler(sizes, device)
    name = "LlamaGen.generate cached == uncached (CFG 4, top-k, fixed generator)"
    attempt(ctx, name, lambda: compare_codes(ctx, name, llamagen_codes(llamagen, sizes, use_cache=True),
                                             llamagen_codes(llamagen, sizes, use_cache=False), GENERATION_TOL))
    name = "Transfusion.sample cached == uncached (CFG 2.5, forced image, fixed generator)"
    attempt(ctx, name, lambda: compare_samples(ctx, name, transfusion_samples(transfusion_model, sizes, use_cache=True),
                                               transfusion_samples(transfusion_model, sizes, use_cache=False),
                                               GENERATION_TOL))


# (a) checks: compiled == eager

def section_compile(ctx: Context) -> None:
    sizes, device = ctx.sizes, ctx.device
    sdpa, flex = check_model_pair(sizes, device)
    batch = ragged_batch(sdpa, [sizes.check_tokens[1], sizes.check_tokens[0]], seed=5, image_side=sizes.image_side,
                         channels=sizes.latent_channels, vocab=sizes.text_vocab)
    times, noise = fixed_times_and_noise(batch, seed=6)
    inputs = (to_device(batch, device), times, to_device(noise, device))
    # flex last: its compiled backward is the slowest to build
    compare_compiled_training(ctx, "sdpa", sdpa, inputs)
    check_compiled_sampling(ctx)
    if ctx.dry_run:
        ctx.recorder.check(training_name(ctx, "flex"), None, note="flex attention has no backward on the CPU")
    else:
        compare_compiled_training(ctx, "flex", flex, inputs)


def training_name(ctx: Context, backend: str) -> str:
    return f"torch.compile ({ctx.sizes.compile_backend}) training == eager, {backend}"


def compare_compiled_training(ctx: Context, backend: str, model: Transfusion, inputs) -> None:
    """The loss and gradients of the training forward, compiled against eager (the gradients cover
    every output, so the logits are not compiled separately)."""
    def compare() -> None:
        eager = loss_and_grads(model, *inputs, with_logits=False)
        compiled = torch.compile(model, backend=ctx.sizes.compile_backend, dynamic=False)
        got = loss_and_grads(model, *inputs, with_logits=False, forward=compiled)
        compare_runs(ctx, training_name(ctx, backend), got, eager, COMPILE_TOL, backward=True)
    attempt(ctx, training_name(ctx, backend), compare)


def check_compiled_sampling(ctx: Context) -> None:
    sizes, device = ctx.sizes, ctx.device
    cases = (("LlamaGen.generate", lambda: small_llamagen(sizes, device), llamagen_codes, compare_codes),
             ("Transfusion.sample", lambda: small_transfusion_sampler(sizes, device), transfusion_samples,
              compare_samples))
    for method, build, run, compare in cases:
        name = f"{method}(compile=True) == eager"
        cls, function = method.split(".")
        if not has_compile_switch(getattr({"LlamaGen": LlamaGen, "Transfusion": Transfusion}[cls], function)):
            ctx.recorder.check(name, None, note=f"n/a: {function} has no compile switch")
            continue
        model = build()
        attempt(ctx, name, lambda: compare(ctx, name, run(model, sizes, compile=True), run(model, sizes),
                                           GENERATION_TOL))


# (b) measurements: the Transfusion-B training step

PER_TIME_MODULES = ("modulation", "time_emb")  # Transfusion's adaLN runs once per distinct flow time, not per token


def per_token_parameters(model: torch.nn.Module) -> int:
    """The ``N`` of ``6 * N * T``: parameters applied to every token, i.e. outside embedding tables (a
    lookup) and outside the time conditioning (``PER_TIME_MODULES``, applied to a table of times)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for name, p in model.named_parameters()
               if id(p) not in embedded and not set(name.split(".")) & set(PER_TIME_MODULES))


def step_flops(model: Transfusion, lengths: Sequence[int], size: ModelSize) -> float:
    """``6 * N * T + 6 * depth * dim * sum(n_i ** 2)`` (see the module docstring)."""
    return 6.0 * per_token_parameters(model) * sum(lengths) + 6.0 * size.depth * size.dim * sum(n * n for n in lengths)


def train_step(model: Transfusion, optimizer, batch, *, backward: bool) -> None:
    with torch.autocast(model.device.type, dtype=torch.bfloat16), torch.set_grad_enabled(backward):
        loss = model(batch)
    if backward:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def section_train(ctx: Context) -> None:
    for backend in ("sdpa", "flex"):
        attempt(ctx, f"Transfusion-B train step, {backend}", lambda: measure_train_step(ctx, backend))


def measure_train_step(ctx: Context, backend: str) -> None:
    sizes, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    model = transfusion(sizes.train_model, vocab=sizes.train_vocab, image_side=sizes.train_image_side,
                        channels=sizes.latent_channels, backend=backend).to(device).train()
    lengths = [sizes.train_tokens] * sizes.train_batch
    batch = to_device(ragged_batch(model, lengths, seed=9, image_side=sizes.train_image_side,
                                   channels=sizes.latent_channels, vocab=sizes.train_vocab), device)
    backward = not (ctx.dry_run and backend == "flex")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = lambda: train_step(model, optimizer, batch, backward=backward)  # noqa: E731
    warmup = timed(ctx, step, sizes.warmup)
    print(f"  {backend}: {len(warmup)} warm-up steps (compilation included) in {sum(warmup):.1f} s", flush=True)
    peak: dict = {}
    with peak_memory(device, peak):
        steps = timed(ctx, step, sizes.steps)
    seconds = median(steps)
    flops = step_flops(model, lengths, sizes.train_model)
    mfu = "n/a (cpu)" if ctx.dry_run else f"{100 * flops / seconds / (ctx.peak_tflops * 1e12):.1f} %"
    what = f"Transfusion-B train step, {sizes.train_batch} x {sizes.train_tokens} tokens, bf16 autocast"
    ctx.recorder.row(what if not ctx.dry_run else what.replace("-B", " (dry-run size)"), backend, seconds=seconds,
                     throughput=f"{sum(lengths) / seconds:,.0f} tokens/s", mfu=mfu,
                     memory=memory_text(peak, ctx.dry_run),
                     note=(f"median of {len(steps)} steps after {len(warmup)} warm-up steps ({sum(warmup):.1f} s); "
                           f"{flops / 1e12:.2f} TFLOP/step, {per_token_parameters(model) / 1e6:.1f} M per-token params"
                           + ("" if backward else "; forward only: flex attention has no backward on the CPU")))


# (b) measurements: LlamaGen GPT-B generation

def section_llamagen(ctx: Context) -> None:
    sizes, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    model = (LlamaGen.from_preset(sizes.llamagen_preset) if sizes.llamagen_preset
             else LlamaGen(**sizes.llamagen_dims)).to(device).eval()
    torch.nn.init.normal_(model.code_heads.to_logits.weight, std=0.02)  # a zero head would sample uniformly
    tokens = model.num_image_tokens  # the whole grid
    labels = torch.arange(sizes.gen_batch, device=device) % 10
    options = dict(max_new_tokens=tokens, cfg_scale=4.0, top_k=sizes.gen_top_k, progress=False)
    name = f"LlamaGen {sizes.llamagen_preset or 'tiny'} generate, batch {sizes.gen_batch}, CFG 4, {tokens} tokens"
    variants = [("eager", {})] + ([("compiled", {"compile": True})] if has_compile_switch(LlamaGen.generate) else [])
    for variant, extra in variants:
        def measure(extra=extra, variant=variant) -> None:
            call = lambda: model.generate(labels, generator=0, **options, **extra)  # noqa: E731
            first = timed(ctx, call, 1)[0]
            seconds = median(timed(ctx, call, 3 if not ctx.dry_run else 1))
            ctx.recorder.row(name, variant, seconds=seconds,
                             throughput=f"{sizes.gen_batch * tokens / seconds:,.0f} tokens/s",
                             note=f"first call (warm-up{', compile' if extra else ''}) {first:.2f} s")
        attempt(ctx, f"{name}, {variant}", measure)
    if len(variants) == 1:
        ctx.recorder.row(name, "compiled", note="n/a: generate has no compile switch")


# (b) measurements: MAR-B sampling

def section_mar(ctx: Context) -> None:
    sizes, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    model = perturb(MAR(**sizes.mar_config)).to(device).eval()
    labels = torch.arange(sizes.mar_batch, device=device) % model.num_classes
    options = dict(cfg_scale=2.9, cfg_schedule="linear", num_sampling_steps=sizes.mar_steps, progress=False)
    timed(ctx, lambda: model.sample(labels, num_iter=2, generator=0, **options), 1)
    seconds = median(timed(ctx, lambda: model.sample(labels, num_iter=sizes.mar_iters, generator=0, **options),
                           2 if not ctx.dry_run else 1))
    name = "MAR-B sample" if not ctx.dry_run else "MAR (dry-run size) sample"
    ctx.recorder.row(f"{name}, batch {sizes.mar_batch}, {sizes.mar_iters} iterations, {sizes.mar_steps} diffusion "
                     f"steps, CFG 2.9 linear", "eager", seconds=seconds,
                     throughput=f"{sizes.mar_batch / seconds:.2f} images/s")


# (b) measurements: recompiles over ragged batches

def section_recompiles(ctx: Context) -> None:
    """The tally is recorded after every batch, so a section killed in a long compile keeps it."""
    from torch._dynamo.utils import counters

    sizes, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    model = transfusion(sizes.recompile_model, vocab=sizes.text_vocab, image_side=sizes.image_side,
                        channels=sizes.latent_channels, backend="flex").to(device).train()
    backward = not ctx.dry_run
    generator = torch.Generator().manual_seed(4)
    graphs_before, lengths, start = counters["stats"]["unique_graphs"], set(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(sizes.recompile_batches):
            lengths.add(ragged_step(ctx, model, generator, seed=300 + index, backward=backward))
            synchronize(device)
            fell_back = any(FALLBACK_WARNING in str(w.message) for w in caught)  # torch warns once per process
            ctx.recorder.row(
                f"recompiles, {index + 1} of {sizes.recompile_batches} random ragged batches, flex",
                "forward + backward" if backward else "forward only", seconds=time.perf_counter() - start,
                throughput=f"{counters['stats']['unique_graphs'] - graphs_before} compiled graphs",
                note=f"{len(lengths)} distinct packed lengths; unfused fallback warned: {'yes' if fell_back else 'no'}"
                     + ("" if backward else "; flex runs unfused on the CPU"), key="recompiles")
            if not ctx.time_left():
                break


def ragged_step(ctx: Context, model: Transfusion, generator: torch.Generator, *, seed: int, backward: bool) -> int:
    """Forward (+ backward) of one batch of 2 random ragged samples; returns its packed length."""
    sizes = ctx.sizes
    targets = random_targets(sizes.recompile_tokens, 2, generator)
    batch = to_device(ragged_batch(model, targets, seed=seed, image_side=sizes.image_side,
                                   channels=sizes.latent_channels, vocab=sizes.text_vocab), ctx.device)
    with torch.set_grad_enabled(backward):
        loss = model(batch)
    if backward:
        loss.backward()
        model.zero_grad(set_to_none=True)
    return max(targets)


# sections and the driver

@dataclass(frozen=True)
class Section:
    run: Callable[[Context], None]
    weight: float   # share of the remaining budget
    title: str


SECTIONS: Dict[str, Section] = {
    "flex_vs_sdpa": Section(section_flex_vs_sdpa, 22, "check: flex == sdpa"),
    "cache": Section(section_cache, 6, "check: cached == uncached sampling"),
    "compile": Section(section_compile, 22, "check: compiled == eager"),
    "train": Section(section_train, 22, "measure: Transfusion-B training step"),
    "llamagen": Section(section_llamagen, 12, "measure: LlamaGen GPT-B generation"),
    "mar": Section(section_mar, 6, "measure: MAR-B sampling"),
    "recompiles": Section(section_recompiles, 12, "measure: recompiles over ragged batches"),
}
KILL_MARGIN = 0.3  # a section stops starting new work this share of its limit before it is killed


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI); results to --out or a "
                                                               "temporary file")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the results file (default: {DEFAULT_OUT.relative_to(ROOT)}; with --dry-run a temporary "
                             f"file)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all sections together (default {GPU_BUDGET_S:.0f} on the GPU, "
                             f"{DRY_BUDGET_S:.0f} with --dry-run, where it only guards against a hang)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the card's dense bf16 peak for MFU (default 989: H100 SXM)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)       # a child process
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--soft-deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        parser.error(f"argument --budget: must be > 0 seconds, got {args.budget}")
    if not args.peak_tflops > 0:
        parser.error(f"argument --peak-tflops: must be > 0, got {args.peak_tflops}")
    if args.section is None and not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: this check needs a GPU (use --dry-run for the CPU smoke run)")
    return args


def run_child(args: argparse.Namespace) -> int:
    """One section in this process; its results go to ``--result-file``."""
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks in true fp32; the timed steps are bf16
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    section = SECTIONS[args.section]
    ctx = Context(sizes=DRY if args.dry_run else GPU, recorder=Recorder(args.result_file),
                  soft_deadline=args.soft_deadline, peak_tflops=args.peak_tflops)
    try:
        section.run(ctx)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        return 1
    return 0


def child_command(args: argparse.Namespace, name: str, result_file: Path, soft_deadline: float) -> List[str]:
    return ([sys.executable, str(Path(__file__).resolve()), "--section", name, "--result-file", str(result_file),
             "--soft-deadline", repr(soft_deadline), "--peak-tflops", repr(args.peak_tflops)]
            + (["--dry-run"] if args.dry_run else []))


def run_section(args: argparse.Namespace, name: str, limit: float, scratch: Path) -> dict:
    """Run one section in a child process killed after ``limit`` seconds; its checks and rows, plus a
    failed check when it raised or was killed."""
    section, result_file = SECTIONS[name], scratch / f"{name}.json"
    print(f"\n== {section.title} (limit {limit:.0f} s)", flush=True)
    started = time.time()
    command = child_command(args, name, result_file, started + (1 - KILL_MARGIN) * limit)
    try:
        code, outcome = subprocess.run(command, timeout=limit).returncode, None
    except subprocess.TimeoutExpired:
        code, outcome = None, f"killed at its time limit ({limit:.0f} s)"
    if code not in (0, None):
        outcome = f"raised (exit {code}; traceback above)"
    results = json.loads(result_file.read_text()) if result_file.exists() else {"checks": [], "rows": []}
    if outcome:
        print(f"  FAIL  section {name}: {outcome}", flush=True)
        results["checks"].append(dict(name=f"section {name}", result="FAIL", error=None, tolerance=None,
                                      note=outcome))
    print(f"   ({time.time() - started:.1f} s)", flush=True)
    return results


def run_all(args: argparse.Namespace) -> dict:
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    deadline, collected = time.time() + budget, {"checks": [], "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        for index, name in enumerate(args.sections):
            weights = [SECTIONS[n].weight for n in args.sections[index:]]
            limit = max(deadline - time.time(), 1.0) * weights[0] / sum(weights)
            results = run_section(args, name, limit, Path(scratch))
            for kind in collected:
                collected[kind] += results[kind]
    return collected


# the report

def format_number(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(args: argparse.Namespace, collected: dict, command: str, wall: float) -> str:
    device = (torch.cuda.get_device_name() if not args.dry_run
              else f"CPU ({platform.processor() or platform.machine()}), dry run")
    lines = ["# GPU check (`benchmarks/gpu_check.py`)", "",
             f"- date: {date.today().isoformat()}",
             f"- device: {device}",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}",
             f"- command: `{command}`",
             f"- MFU: model FLOPs (6 * N * T + 6 * depth * dim * sum n_i^2) per second over "
             f"{args.peak_tflops:g} TFLOP/s"
             + (" (H100 SXM, bf16 dense)" if args.peak_tflops == H100_BF16_DENSE_TFLOPS else ""),
             f"- total wall time {wall:.0f} s", "",
             "## Measurements", "", TABLE_HEADER, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['measurement']} | {r['variant']} | {format_number(r['seconds'], '.3f')} | {r['throughput']} | "
              f"{r['mfu']} | {r['memory']} | {r['note']} |" for r in collected["rows"]]
    lines += ["", "## Checks", "", CHECK_HEADER, "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['result']} | {format_number(c['error'], '.2e')} | "
              f"{format_number(c['tolerance'], '.0e')} | {c['note']} |" for c in collected["checks"]]
    failed = [c["name"] for c in collected["checks"] if c["result"] == "FAIL"]
    lines += ["", f"**{len(failed)} failed**: " + "; ".join(failed) if failed else "**all checks passed** "
              "(n/a: not applicable on this run, see the note)", ""]
    return "\n".join(lines)


def output_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.dry_run:
        return Path(tempfile.mkstemp(prefix="results_gpu_dry_", suffix=".md")[1])
    return DEFAULT_OUT


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.section is not None:
        return run_child(args)
    out = output_path(args)
    command = "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    collected = run_all(args)
    text = report(args, collected, command.strip(), time.time() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + text + f"\nwritten to {out}", flush=True)
    return 1 if any(c["result"] == "FAIL" for c in collected["checks"]) else 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
