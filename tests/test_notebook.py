"""`examples/quickstart.ipynb` runs end to end on CPU (few training steps), from its own folder (where Jupyter
starts its kernel) and from the checkout's root."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the test extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="install the test extra (nbformat, nbclient, ipykernel)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.parametrize("working_dir", [NOTEBOOK.parent, NOTEBOOK.parents[1]], ids=["examples", "checkout"])
def test_quickstart_notebook_runs(monkeypatch, working_dir):
    monkeypatch.setenv("QUICKSTART_STEPS", "3")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    # the kernel imports this checkout's mmgen_pytorch whether or not it is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(working_dir)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the two sample grids
    assert not any("/tmp" in "".join(cell.source) for cell in notebook.cells)
