"""Our MAR sampling against the official `sample_tokens`, with the same weights, in one process (issue 19,
part 4). Run by hand, never by CI: it needs MAR's repository beside the checkout and timm (0.9.12, MAR's pin).

    git clone https://github.com/LTH14/mar ../upstream/mar   # commit fe470ac, as tests/golden
    pip install timm==0.9.12 scipy
    python benchmarks/compare_official_mar.py --upstream ../upstream --markdown benchmarks/results_official_mar.md

MAR-B (the official `mar_base`: 256 px, KL-16 latents, a 6 x 1024 DiffLoss head) with the official module's own
seeded initialisation; our `MAR` loads the same tensors through `from_official`. Both draw 2 images of 2
classes with `--num-iter` AR steps, CFG 2.9 on the linear schedule, temperature 1 and 100 diffusion steps,
alternating official / ours `--repeats` times. The random draws differ (the official code uses the global RNG
and NumPy for its orders), so only the times are compared. timm imports torchvision when it is imported, and
torchvision's wheel for torch 2.13 is built against CUDA torch; where it does not import, its modules are
replaced by empty placeholders (MAR's transformer blocks do not use them). `Tensor.cuda` is made a no-op (the
official sampler calls it). Nothing of upstream's code is copied here: it is imported from the checkout.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7, label_drop_prob=0.1,
              class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64, diffloss_d=6, diffloss_w=1024,
              num_sampling_steps="100", diffusion_batch_mul=4)


class _Placeholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision (and its submodules) as modules whose every attribute is a distinct empty nn.Module class."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


class _PlaceholderType(type(nn.Module)):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


_MADE = {}


def _placeholder(name: str) -> type:
    return _MADE.setdefault(name, _PlaceholderType(name, (nn.Module,), {}))


def official_mar(upstream: Path):
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError):
        sys.modules.pop("torchvision", None)
        sys.meta_path.insert(0, _Placeholders())
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(upstream / "mar"))
    from models import mar

    torch.manual_seed(0)
    return mar.mar_base(**CONFIG).eval()


def timed(call) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", type=Path, default=ROOT.parent / "upstream", help="the folder holding the mar checkout")
    parser.add_argument("--num-iter", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    if not (args.upstream / "mar" / "models" / "mar.py").is_file():
        raise SystemExit(f"compare_official_mar: no mar checkout at {args.upstream / 'mar'} (see the docstring)")
    torch.set_num_threads(args.threads)

    from _common import load_line, machine_lines, report
    from mmgen_pytorch import MAR

    started, load_before = time.time(), os.getloadavg()[0]
    official = official_mar(args.upstream)
    ours = MAR.from_official(official.state_dict(), config=dict(CONFIG, model="mar_base")).eval()  # args name it
    labels = torch.tensor([207, 360])
    runs = {
        "official": lambda: official.sample_tokens(bsz=2, num_iter=args.num_iter, cfg=2.9, cfg_schedule="linear",
                                                   labels=labels, temperature=1.0),
        "ours": lambda: ours.sample(labels, num_iter=args.num_iter, cfg_scale=2.9, cfg_schedule="linear",
                                    temperature=1.0, num_sampling_steps="100", generator=0, progress=False),
    }
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, call in runs.items():
            seconds[name].append(timed(call))
    official_s, ours_s = (statistics.median(seconds[name]) for name in runs)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    lines = ["# Against the official code: MAR-B sampling (CPU)", "",
             "`python benchmarks/compare_official_mar.py --upstream ../upstream --markdown "
             "benchmarks/results_official_mar.md`", "", *machine_lines(torch.__version__, args.threads),
             f"- MAR at commit fe470ac (`models/mar.py` `sample_tokens`), `mar_base` ({params:.1f}M parameters, "
             f"DiffLoss 6 x 1024) with its seeded initialisation, fp32, 2 images, {args.num_iter} AR steps, CFG 2.9 "
             f"linear, temperature 1, 100 diffusion steps; median of {args.repeats} alternating run(s)", "",
             "| code | s | official / this |", "|---|---|---|",
             f"| official `sample_tokens` | {official_s:.1f} | 1.00 |",
             f"| `MAR.sample` | {ours_s:.1f} | {official_s / ours_s:.2f} |", "",
             load_line(time.time() - started, load_before)]
    report(lines, args.markdown)


if __name__ == "__main__":
    main()
