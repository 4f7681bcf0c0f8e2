"""The distribution builds a wheel that installs into a fresh virtual environment and imports from there."""

import os
import re
import subprocess
import sys
import venv
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = ["beartype", "einops", "jaxtyping", "rotary-embedding-torch", "safetensors", "torch", "torchdiffeq",
                "tqdm", "x-transformers"]


def run(*command, cwd):
    # without PYTHONPATH: a checkout on it would shadow the wheel under test
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def installed_closure(names) -> set:
    """``names`` and, recursively, what they require that is installed here (torch's sympy, jinja2, ...), which
    may live in another site folder than the package that needs it."""
    seen, todo = set(), list(names)
    while todo:
        name = re.match(r"[A-Za-z0-9_.-]+", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            requirements = distribution(name).requires or []
        except PackageNotFoundError:  # an optional or platform-specific requirement that is not installed
            continue
        seen.add(name)
        todo += [r for r in requirements if "extra ==" not in r]
    return seen


def expose_dependencies(env: Path) -> None:
    """Make the dependencies importable in ``env`` without copying gigabytes of torch: a ``.pth`` file lists the
    folders that hold them in THIS interpreter (a venv's or the system's, wherever pytest runs). A ``.pth`` path
    adds only that folder to ``sys.path`` (its own ``.pth`` files, an editable install's finder among them, are not
    processed), and ``env``'s own site-packages comes first, so ``mmgen_pytorch`` can only come from the wheel."""
    folders = {str(distribution(name).locate_file("")) for name in installed_closure(DEPENDENCIES)}
    python = env / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    (site_packages,) = run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                           cwd=env).split()
    Path(site_packages, "_outer_dependencies.pth").write_text("\n".join(sorted(folders)) + "\n", encoding="utf-8")


def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w",
        str(tmp_path / "dist"), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mmgen_pytorch-0.1.0-*.whl")
    env = tmp_path / "env"
    venv.create(env, with_pip=False, system_site_packages=False)
    expose_dependencies(env)
    python = str(env / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    where = run(python, "-c", "import mmgen_pytorch, mmgen_pytorch.data, importlib.resources as r;"
                              " print(mmgen_pytorch.__file__, mmgen_pytorch.__version__, 'Transfusion' in dir(mmgen_pytorch),"
                              " r.files('mmgen_pytorch').joinpath('configs', 'mar-b.yaml').is_file())", cwd=tmp_path)
    path, version, exported, configs = where.split()
    assert Path(path).is_relative_to(env) and version == "0.1.0" and exported == "True"
    assert configs == "True"  # the named training configs ship in the wheel
    script = ("import re; from importlib.metadata import requires; "
              "print(*(re.match(r'[A-Za-z0-9_.-]+', r)[0] for r in requires('mmgen-pytorch') if 'extra ==' not in r))")
    install_requires = run(python, "-c", script, cwd=tmp_path).split()
    assert sorted(install_requires) == sorted(DEPENDENCIES)


def test_install_hints_name_extras_that_exist(tmp_path, monkeypatch):
    """Every error message's install hint comes from ``install_hint`` and names an extra of setup.py; from a
    checkout it is an editable install of the checkout (the package need not be published), else the
    quoted requirement (shells such as zsh expand unquoted brackets)."""
    from mmgen_pytorch import _utils

    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    extras = set(re.findall(r'^\s+"([a-z]+)": ', setup[setup.index("extras_require"):], flags=re.M))
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "mmgen_pytorch").rglob("*.py"))
    named = set(re.findall(r"install_hint\('([a-z]+)'\)", sources))
    assert {"data", "eval", "hub", "inception", "train"} <= named <= extras, (named, extras)
    assert "pip install mmgen-pytorch[" not in sources.replace("``pip install mmgen-pytorch[", "")  # docstrings aside
    assert _utils.install_hint("eval") == f'pip install -e ".[eval]" (in {ROOT})'
    monkeypatch.setattr(_utils, "__file__", str(tmp_path / "site-packages" / "mmgen_pytorch" / "_utils.py"))
    assert _utils.install_hint("eval") == 'pip install "mmgen-pytorch[eval]"'
