"""Helpers shared by the benchmarks: peak-memory measurement of one process on Linux, machine facts, and
the command line and run of the generation benchmarks (LlamaGen, DnD).

Peak memory: each measured call runs in a fresh process; before it, glibc is told to return freed
allocations to the OS (so a repeated call's working set shows in the RSS), cached free memory is
trimmed and the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``); the peak is then
``VmHWM`` after the call minus ``VmRSS`` before it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable, List, Optional, Tuple


def rss_kib() -> Tuple[int, int]:
    """(current RSS, RSS high-water mark) of this process in KiB."""
    status = Path("/proc/self/status").read_text()
    return (int(re.search(r"VmRSS:\s+(\d+)", status).group(1)), int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def strict_allocator() -> bool:
    """Make glibc return allocations over 64 KiB to the OS when freed (a fixed mmap threshold)."""
    libc = _libc()
    try:
        m_trim_threshold, m_mmap_threshold = -1, -3
        return (libc is not None and libc.mallopt(m_mmap_threshold, 64 * 1024) == 1
                and libc.mallopt(m_trim_threshold, 0) == 1)
    except AttributeError:
        return False


def trim() -> None:
    """Hand the free memory of every malloc arena back to the OS (``malloc_trim(0)``)."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def run_json_subprocess(script: str, flag: str, config: dict, timeout: float) -> dict:
    """Run ``python script flag '<config json>'`` and return the JSON after its last ``RESULT `` line
    (or ``{"error": ...}`` on a timeout, a failure or no result)."""
    command = [sys.executable, script, flag, json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(torch_version: str, threads: Optional[int]) -> List[str]:
    """The date / machine / versions header every results file starts with."""
    return [f"- date: {date.today().isoformat()}",
            f"- machine: {os.cpu_count()}-core CPU ({cpu_name()}), {platform.system()} {platform.release()}",
            f"- python {platform.python_version()}, torch {torch_version}, intra-op threads: {threads}"]


def load_line(wall: float, load_before: float) -> str:
    """The closing line of a results table: wall time and the load average before and after."""
    return (f"- total wall time {wall:.0f} s; 1-minute load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after (above the thread count means other processes competed for the CPU)")


def report(lines: List[str], markdown: Optional[str]) -> None:
    """Print a results table's lines and write them to the ``markdown`` file when one is given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        Path(markdown).write_text(text)


# the generation benchmarks

def generation_parser(description: str, *, quick: str) -> argparse.ArgumentParser:
    """The options every generation benchmark takes; ``quick``: what ``--quick`` runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on a shared 2-core CPU two threads gave erratic timings)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--markdown", type=Path, default=None)
    return parser


def run_generation_benchmark(args, run: Callable[..., list], markdown: Callable[..., str]) -> None:
    """``rows = run(args)`` under inference mode with ``args.threads`` threads, then the table
    ``markdown(rows, args, wall seconds, load before)`` printed and written to ``args.markdown``."""
    import torch  # the memory helpers above are used before torch is imported

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    with torch.inference_mode():
        rows = run(args)
    table = markdown(rows, args, time.perf_counter() - start, load_before)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
