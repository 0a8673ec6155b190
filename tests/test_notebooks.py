"""Executes the notebooks in `notebooks/` top to bottom (nbclient, fresh kernel, per-cell timeout).

Each notebook runs in its own temporary working directory; the pretrained backbone is shared through
one cache directory (JAX_PEFT_NOTEBOOK_CACHE), so only the first notebook pays for pretraining. A cell
that raises (including the notebooks' own `assert`s on exactness) fails the test with the cell's
traceback. Skipped only when nbclient/nbformat/ipykernel are not installed (`pip install -e .[test]`).
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (pip install -e .[test])")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbclient (pip install -e .[test])")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (pip install -e .[test])")
pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib (pip install -e .[test])")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("01_quickstart.ipynb", "02_pytree_surgery.ipynb", "03_spectral_lens.ipynb")
FIGURES = {"01_quickstart.ipynb": 1, "02_pytree_surgery.ipynb": 0, "03_spectral_lens.ipynb": 3}  # inline PNGs
CELL_TIMEOUT_S = 240  # generous per cell on a loaded machine; each notebook takes < 40 s on an idle 2-core CPU


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notebook_cache"))


@pytest.fixture
def kernel_env(monkeypatch, shared_cache):
    """The kernel inherits this process's environment: headless plots, the shared backbone cache,
    and the repository on the path (so an uninstalled checkout works)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PEFT_NOTEBOOK_CACHE", shared_cache)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_notebooks_are_stored_without_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{name}: cells {dirty} have outputs; regenerate with python notebooks/make_notebooks.py"


def test_notebooks_match_their_generator():
    """The committed .ipynb files are what notebooks/make_notebooks.py writes (edit the script, not the JSON)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(NOTEBOOK_DIR, "make_notebooks.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert sorted(gen.NOTEBOOKS) == sorted(NOTEBOOKS)
    for name, build in gen.NOTEBOOKS.items():
        stored = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
        fresh = build()
        assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in fresh.cells], (
            f"{name} is out of date: run python notebooks/make_notebooks.py")


# Notebook 03 (three adapters trained, 75-90 s of CI on 2 cores) runs with `pytest -m extended`:
# the suite must stay under CI's 12 minutes, and tests/test_analysis.py covers the tools it calls.
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.extended) if n == "03_spectral_lens.ipynb"
                                  else n for n in NOTEBOOKS])
def test_notebook_executes(name, tmp_path, kernel_env):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a code cell did not run"
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures == FIGURES[name], f"{name}: {figures} inline figures rendered, expected {FIGURES[name]}"
