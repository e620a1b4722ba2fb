"""The notebooks run top to bottom on a real Jupyter kernel against a real cluster."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def run_notebook(path: Path, cwd: Path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def output_text(cell) -> str:
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            texts.append(output["text"])
        else:
            data = output.get("data", {})
            texts.append(data.get("text/markdown") or data.get("text/plain") or "")
    return "".join(texts)


def assert_replies_and_plot(notebook, name: str) -> None:
    chat_cells = [c for c in notebook.cells if c.cell_type == "code" and c.source.startswith("%%llaisys")]
    for cell in chat_cells:
        assert output_text(cell).strip(), f"{name}: no reply in: {cell.source.splitlines()[1]}"
    if name == "tensor_parallel.ipynb":
        plot = notebook.cells[-1]
        assert any("image/png" in o.get("data", {}) for o in plot.outputs), f"{name}: no plot"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "tensor_parallel.ipynb"])
def test_notebook_is_committed_executed_and_runs_again(running_cluster, tmp_path, name):
    # Committed with the outputs of a real run (scripts/execute_notebooks.py), for readers on a code host.
    assert_replies_and_plot(nbformat.read(NOTEBOOKS / name, as_version=4), name)
    notebook = run_notebook(NOTEBOOKS / name, tmp_path)  # raises CellExecutionError on any failing cell
    assert_replies_and_plot(notebook, name)
