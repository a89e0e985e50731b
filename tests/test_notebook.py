"""The quickstart notebook runs top to bottom."""

from __future__ import annotations

import pathlib

import nbformat
from nbclient import NotebookClient


def test_quickstart_notebook_executes(tmp_path):
    path = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "[30, 40]" in outputs and "problems=()" in outputs
