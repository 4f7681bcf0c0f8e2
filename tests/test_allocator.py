"""keep_freed_memory: glibc keeps freed activation-sized blocks, so allocating them again costs no page faults."""

import platform
import subprocess
import sys
import textwrap

import pytest

from mmgen_pytorch.training.allocator import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a child process: the test process may already have called it (the entry point does, on CPU).
CHILD = textwrap.dedent("""
    import resource, sys
    import torch
    from mmgen_pytorch.training.allocator import keep_freed_memory

    def step():  # a step's activations: allocated together, freed together
        return len([torch.ones(2 << 20) for _ in range(8)])  # 8 x 8 MiB

    def faults_per_cycle():
        for _ in range(3):
            step()
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10

    before = faults_per_cycle()
    applied = keep_freed_memory()
    print(before, faults_per_cycle(), applied)
""")


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_blocks_are_reused_without_page_faults():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    before, after, applied = result.stdout.split()
    assert applied == "True"
    # By default glibc usually gives the freed 64 MiB back and maps it again (16384 pages of 4 KiB each cycle;
    # ~0 when another block happens to sit above them on the heap): kept, it costs (almost) none.
    assert float(after) <= 16384 / 100, f"{after} page faults per cycle ({before} before)"


def test_the_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("MMGEN_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_applied_on_glibc(monkeypatch):
    monkeypatch.delenv("MMGEN_KEEP_FREED_MEMORY", raising=False)
    assert keep_freed_memory() is True


@pytest.mark.parametrize("name, value", [("mmap_threshold", 0), ("trim_threshold", -5), ("mmap_threshold", 2 ** 31),
                                         ("trim_threshold", 1.5), ("mmap_threshold", True)])
def test_bad_thresholds_are_refused(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive int of bytes"):
        keep_freed_memory(**{name: value})
