"""``benchmarks/gpu_check.py`` stays runnable where CI runs (no GPU): ``--dry-run``, the same code path on
the CPU at tiny sizes, passes and writes its tables to ``--out``, never to the committed
``benchmarks/results_gpu.md``; a section killed at its time limit makes the run fail; without CUDA and
without ``--dry-run`` the script refuses at once."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


def run_gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCHMARKS.parent)


@pytest.mark.slow  # 90 s alone on 2 cores (170 s beside another test process): torch.compile, seven Python start-ups
def test_dry_run_passes_and_writes_its_tables(tmp_path):
    committed = gpu_check.DEFAULT_OUT.read_bytes()
    out = tmp_path / "results.md"
    done = run_gpu_check("--dry-run", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    text = out.read_text()
    assert gpu_check.TABLE_HEADER in text and gpu_check.CHECK_HEADER in text
    assert text in done.stdout  # the report is printed as written
    assert "| PASS |" in text and "| FAIL |" not in text
    assert "Transfusion (dry-run size) train step" in text and "MAR (dry-run size) sample" in text
    assert gpu_check.DEFAULT_OUT.read_bytes() == committed


def test_a_killed_section_fails_the_run(tmp_path):
    done = run_gpu_check("--dry-run", "--budget", "0.3", "--sections", "mar", "--out", str(tmp_path / "r.md"),
                         timeout=120)
    assert done.returncode == 1
    assert "| section mar | FAIL |" in (tmp_path / "r.md").read_text()
    assert "killed at its time limit" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_asks_for_dry_run(tmp_path):
    done = run_gpu_check("--out", str(tmp_path / "r.md"), timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("argv, flag", [(["--budget", "0"], "--budget"), (["--peak-tflops", "-1"], "--peak-tflops")])
def test_bad_flags_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--dry-run", *argv])
    assert exit_info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_the_mar_head_benchmark_runs_and_writes_its_table(tmp_path):
    """``bench_mar_head.py`` at a tiny size: its table, with one row per row count, printed and written."""
    out = tmp_path / "head.md"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_mar_head.py"), "--rows", "4", "8", "--width", "32",
                           "--depth", "1", "--repeats", "1", "--markdown", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and out.read_text() in done.stdout
