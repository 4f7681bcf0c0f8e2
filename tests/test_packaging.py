"""The distribution builds a wheel that installs into a fresh virtual environment and imports from there."""

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*command, cwd):
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w",
        str(tmp_path / "dist"), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mmgen_pytorch-0.1.0-*.whl")
    # the dependencies (torch, einops, ...) come from this interpreter's site-packages; the package itself
    # only from the wheel
    venv.create(tmp_path / "env", with_pip=False, system_site_packages=True)
    python = str(tmp_path / "env" / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    where = run(python, "-c", "import mmgen_pytorch, sys; print(mmgen_pytorch.__file__, mmgen_pytorch.__version__,"
                              " 'Transfusion' in dir(mmgen_pytorch))", cwd=tmp_path)
    path, version, exported = where.split()
    assert Path(path).is_relative_to(tmp_path / "env") and version == "0.1.0" and exported == "True"
    metadata = run(python, "-m", "pip", "show", "mmgen-pytorch", cwd=tmp_path)
    assert "Requires: beartype, einops, jaxtyping, rotary-embedding-torch, safetensors, torch, torchdiffeq, tqdm, " \
           "x-transformers" in metadata
