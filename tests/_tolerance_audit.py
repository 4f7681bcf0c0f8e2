"""How close each float comparison of the suite comes to its tolerance (see TOLERANCES.md).

``MMGEN_TOLERANCE_AUDIT=audit.jsonl pytest`` wraps ``torch.testing.assert_close`` and appends one JSON line
per comparison: the test, the calling line, and ``ratio`` = max |actual − expected| / (atol + rtol·|expected|),
where 1.0 is the edge of failing. Run it in one test process (``pytest -n 0``) under several kernels and
thread counts (``ATEN_CPU_CAPABILITY=default``, ``avx2``, ``avx512``; ``OMP_NUM_THREADS=1`` or ``2``) and
summarise with ``python tests/_tolerance_audit.py audit*.jsonl``: a comparison whose ratio changes with the
CPU and sits near 1 passes on one CPU type only.
"""

import json
import os
import sys
import traceback
from collections import defaultdict

import torch

# torch.testing.assert_close's defaults for float32 (and the stricter float64 ones), used when a call sets none
DEFAULT_TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                      torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}


def ratio(actual, expected, rtol, atol) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if not (expected.is_floating_point() or expected.is_complex()) or expected.numel() == 0:
        return 0.0
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(expected.dtype, (1.3e-6, 1e-5))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not finite.any():
        return 0.0
    error = (actual - expected).abs()[finite]
    allowed = (atol + rtol * expected.abs())[finite]
    if bool((allowed == 0).any()):
        return float("inf") if bool((error[allowed == 0] > 0).any()) else float((error / allowed.clamp_min(1e-300)).max())
    return float((error / allowed).max())


def install(path: str) -> None:
    original = torch.testing.assert_close

    def audited(actual, expected, *args, rtol=None, atol=None, **kwargs):
        try:
            value = ratio(actual, expected, rtol, atol)
        except Exception:  # noqa: BLE001 - nested structures and odd inputs are simply not audited
            value = None
        caller = next(frame for frame in reversed(traceback.extract_stack()[:-1])
                      if os.path.basename(frame.filename) not in ("_helpers.py", "_tolerance_audit.py"))
        if value is not None:
            with open(path, "a", encoding="utf-8") as log:
                log.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
                                      "line": f"{os.path.basename(caller.filename)}:{caller.lineno}",
                                      "ratio": value}) + "\n")
        return original(actual, expected, *args, rtol=rtol, atol=atol, **kwargs)

    torch.testing.assert_close = audited


def summarise(paths: list[str], *, above: float = 0.1) -> None:
    """Per calling line: the worst ratio in each audit file, for the lines that reach ``above`` anywhere."""
    worst: dict[str, dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path, encoding="utf-8") as log:
            for row in map(json.loads, log):
                runs = worst[row["line"]]
                runs[path] = max(runs.get(path, 0.0), row["ratio"])
    print("line".ljust(36) + "".join(os.path.basename(p)[:16].rjust(18) for p in paths))
    for line, runs in sorted(worst.items(), key=lambda item: -max(item[1].values())):
        if max(runs.values()) >= above:
            print(line.ljust(36) + "".join(f"{runs.get(p, float('nan')):18.3f}" for p in paths))


if __name__ == "__main__":
    summarise(sys.argv[1:])
