import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from golden.weights import build_state_dict
from mmgen_pytorch.backbone import eager_flex_attention

# the reference data made by tests/golden/regenerate.py from the upstream code; MMGEN_GOLDEN_DIR points elsewhere
GOLDEN_DIR = Path(os.environ.get("MMGEN_GOLDEN_DIR", Path(__file__).resolve().parent / "golden"))

# `HYPOTHESIS_PROFILE=thorough pytest` runs many more examples than CI does.
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def threads_per_process() -> int:
    """Torch's intra-op threads in each test process: at most 2 (the tiny models gain nothing from more), and
    under pytest-xdist the cores shared among the workers: when two workers on 2 cores each started a notebook
    kernel with two OpenMP threads, the threads spun waiting for each other and the notebook test took 12x longer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, cores // workers, torch.get_num_threads()))


torch.set_num_threads(threads_per_process())
# the processes tests start (the notebook's kernel, the benchmarks, torchrun ranks) share the cores alike
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def pytest_addoption(parser):
    parser.addoption("--recipes", action="store_true",
                     help="also run the shortened digits recipes (tests marked `recipes`: about 11 minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--recipes"):
        return
    skip = pytest.mark.skip(reason="a shortened digits recipe: run with --recipes (CI does)")
    for item in items:
        if "recipes" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def eager_flex():
    """Flex attention through torch's uncompiled path (forward only) for a module of mask checks on CPU,
    where compiling a kernel per shape would cost minutes; the compiled kernel has its own tests
    (test_flex_compile.py). Elsewhere the unfused fallback is an error (pyproject.toml)."""
    with eager_flex_attention():
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one intra-op thread for a module of tiny models: a second thread gains nothing on tensors
    this small, and its synchronisation made the training tests 5-7x slower when other jobs shared the
    2 cores (tests/test_train_models.py: 50 s of CPU with 2 threads, 7 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def golden():
    """Loads a golden file as {config, state_dict, inputs, outputs, notes}, its state_dict rebuilt from the
    stored weight recipe."""
    def load(name: str):
        data = torch.load(GOLDEN_DIR / name, weights_only=True)
        recipe = data.pop("weights")
        return {**data, "state_dict": build_state_dict(recipe)}
    return load


if os.environ.get("MMGEN_TOLERANCE_AUDIT"):  # see TOLERANCES.md
    import _tolerance_audit

    _tolerance_audit.install(os.environ["MMGEN_TOLERANCE_AUDIT"])
