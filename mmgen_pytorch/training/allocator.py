"""Keep freed CPU memory for reuse, so that training on a CPU does not page-fault in every step.

glibc's ``malloc`` serves large requests (above a threshold that adapts at run time, at most 32 MiB) with fresh
``mmap`` pages and gives them back to the kernel on ``free``. A training step allocates and frees the same
activation-sized tensors every step, so each step pays the kernel again to map and zero those pages. PyTorch's
CPU performance guide suggests swapping the allocator (jemalloc, tcmalloc) with ``LD_PRELOAD``;
:func:`keep_freed_memory` gets most of that without a preload: it fixes glibc's thresholds so that such blocks
come from the heap and stay there once freed.

``python -m mmgen_pytorch.train`` (and so ``examples/train_digits.py``) calls it when no GPU is present;
``MMGEN_KEEP_FREED_MEMORY=0`` in the environment turns that off. Call it yourself at the start of your own CPU
training loop. The cost: memory freed by the process is reused by it rather than returned to the system.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

ENVIRONMENT_SWITCH = "MMGEN_KEEP_FREED_MEMORY"


def keep_freed_memory(*, mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Serve requests below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` bytes of
    freed heap for reuse. Returns True when both settings took effect; False where the C library is not glibc
    (macOS, Windows, musl) or ``MMGEN_KEEP_FREED_MEMORY=0`` (then nothing is changed), or where glibc refused
    a setting.

    The defaults: 32 MiB is the largest threshold glibc's own adaptive rule would reach; on a 2-core CPU they
    cut the page faults of MAR's digits training step from 2724 to 112 a step; the time it saves there is within
    the machine's noise (``benchmarks/results_allocator.md``)."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2 ** 31:
            raise ValueError(f"`{name}` must be a positive int of bytes below 2**31, got {value!r}")
    if os.environ.get(ENVIRONMENT_SWITCH, "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
