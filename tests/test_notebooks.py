"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Each notebook is executed with nbclient in a fresh kernel of *this* interpreter (``sys.executable``), from a
kernelspec written to a temporary folder, so no Jupyter setup of the machine is needed or used. The notebook is
read into memory and executed there: nothing is written back to the committed file (the executed copy goes to
``tmp_path`` for inspection). The notebooks write their own files under ``$NOTEBOOK_OUT`` (``tmp_path`` here).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Working directory of each run. Jupyter starts a kernel in the notebook's folder; one notebook runs from the
# repository root instead, to check that the notebooks find the checkout from either place.
CWD = {
    "train_on_your_logs.ipynb": NOTEBOOKS,
    "evaluate_buckets.ipynb": ROOT,
    "what_if_scheduling.ipynb": NOTEBOOKS,
}
CELL_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in IPython tracebacks


def _load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CWD)


@pytest.mark.parametrize("name", sorted(CWD))
def test_committed_without_outputs(name):
    nb = _load(name)
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{name}: code cells {dirty} hold outputs or execution counts; clear all outputs "
                       "before committing (Jupyter: Edit > Clear Outputs of All Cells, then save)")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and "".join(first["source"]).startswith("# ")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A folder holding a ``python3`` kernelspec that runs this interpreter."""
    pytest.importorskip("nbclient")  # [dev]; pytest's own reason, which tests/conftest.py reads
    from ipykernel.kernelspec import write_kernel_spec

    d = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(d / "python3")
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CWD))
def test_notebook_runs(name, kernel_dir, tmp_path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # inline plots, as in Jupyter

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name="python3",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False))
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(CWD[name])}})
    problem = None
    try:
        client.execute()
    except CellTimeoutError as e:
        problem = f"a cell ran longer than {CELL_TIMEOUT_S} s\n{e}"
    except CellExecutionError as e:
        failed = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                       and any(o.output_type == "error" for o in c.get("outputs", []))), "?")
        problem = f"cell {failed} failed\n{e}"
    finally:
        nbformat.write(nb, tmp_path / name)
    if problem:
        pytest.fail(f"{name}: {ANSI.sub('', problem)}\n(executed copy: {tmp_path / name})", pytrace=False)
