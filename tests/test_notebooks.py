"""Every notebook executes top to bottom (NOTEBOOK_QUICK=1: short training runs); a failing cell fails."""
import glob
import os

import pytest

from conftest import ROOT

nbclient = pytest.importorskip("nbclient", reason="executing the notebooks needs nbclient (requirements.txt)")
nbformat = pytest.importorskip("nbformat", reason="executing the notebooks needs nbformat (requirements.txt)")

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")             # the kernel runs on the CPU, like every CPU test
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, startup_timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()                 # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
