"""Every tutorial is stored with the outputs of a full run (figures included) and executes in smoke mode.

Smoke mode (PYRO_SPARSE_SMOKE=1) runs each notebook on tiny budgets in a real Jupyter kernel (nbclient);
it must produce image outputs, which catches a library that switches matplotlib's backend off inline
plotting. The stored notebook is what a reader browsing the repository sees: every code cell executed
in order, in full mode (its setup cell prints "smoke mode: False"), no errors, figures present.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


def _images(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    )


def _figures_shown_as_text(nb) -> int:
    """Outputs that are a figure's repr and no picture (a figure IPython could not render)."""
    return sum(
        1
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("data", {}).get("text/plain", "").startswith("<Figure") and "image/png" not in out.get("data", {})
    )


def _text(nb) -> str:
    chunks = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                chunks.append(out.get("text", ""))
            elif "text/plain" in out.get("data", {}):
                chunks.append(out["data"]["text/plain"])
    return "".join(chunks)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_stored_with_the_outputs_of_a_full_run(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert all(count is not None for count in counts), f"{path.name}: store it executed (cells not run: "\
        f"{[i for i, count in enumerate(counts) if count is None]})"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: cells run out of order"
    errors = [out for cell in code for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: stored with an error output"
    text = _text(nb)
    assert "smoke mode: False" in text, f"{path.name}: the stored outputs must come from a full run"
    assert _images(nb) > 0, f"{path.name}: stored without figures"
    assert not _figures_shown_as_text(nb), f"{path.name}: a figure is stored as '<Figure ...>' text"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "run time" in first.source.lower(), \
        f"{path.name}: the first cell states the full run's run time and machine"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PYRO_SPARSE_SMOKE", "1")
    # The smoke-sized networks are tiny: one thread is fastest, and intra-op threads that wait on
    # each other slow training down by an order of magnitude when other jobs share the CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(TUTORIALS)}}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError (with the failing cell and traceback) on any error
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    assert "smoke mode: True" in _text(nb)
    assert _images(nb) > 0, f"{path.name}: executing it in a Jupyter kernel showed no figure"
    assert not _figures_shown_as_text(nb), f"{path.name}: a figure was shown as '<Figure ...>' text, not drawn"
