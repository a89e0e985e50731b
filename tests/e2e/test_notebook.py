"""The quickstart notebook runs top to bottom and shows what its text says it shows."""

from __future__ import annotations

import json
import pathlib
import re

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def _outputs(notebook, name: str) -> str:
    return "".join(
        o.get("text", "")
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == name
    )


def _images(notebook) -> int:
    return sum(
        "image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp() checkpoints land here
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    out = _outputs(notebook, "stdout")
    # A library warning (retention, rules) would land on stderr: the notebook must not show one.
    assert _outputs(notebook, "stderr") == ""

    assert re.search(r"/preempted: resuming from step \d+\n", out)
    assert "replayed steps identical to the preempted run's: True" in out
    assert "losses identical after resume: True" in out
    assert "final parameters identical: True" in out
    assert "best checkpoint by eval_loss: step " in out

    assert "saved from:  params/Dense_1/kernel: P('data', 'model') on mesh {'data': 4, 'model': 2}" in out
    assert "restored:    params/Dense_1/kernel: P('model', 'data') on mesh {'data': 2, 'model': 4}" in out
    assert "restored:    params/Dense_0/kernel: P(None, 'data') on mesh {'data': 2, 'model': 4}" in out

    assert re.search(r"^ *600 .*permanent .*\S+/reference/run-600$", out, re.MULTILINE)
    assert re.search(r"\$ ckpt-callbacks inspect \S+/run-\d+\n\S+/run-\d+: step \d+, saved ", out)
    kernel = "  params/Dense_1/kernel: array [64, 64] float32 spec=['data', 'model'], 16.0 KiB, chunk shape [16, 32]"
    assert kernel + " (8 chunks, packed)\n" in out
    assert re.search(
        r"\$ ckpt-callbacks verify \S+/run-\d+\n\S+: 20 leaves, \d+ chunks, [\d.]+ (B|KiB|MiB|GiB) checked\nOK\n", out
    )

    assert _images(notebook) >= 2


def test_stored_notebook_is_commit_ready():
    """The notebook in the repository carries its outputs (plots included) and no path of the
    machine it ran on beyond its temporary checkpoint directory."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(c.get("outputs") or c.get("execution_count") for c in notebook.cells if c.cell_type == "code")
    assert _images(notebook) >= 2
    assert "losses identical after resume: True" in _outputs(notebook, "stdout")
    assert not any(o.get("output_type") == "error" for c in notebook.cells for o in c.get("outputs", []))
    text = json.dumps(nbformat.writes(notebook))
    assert str(NOTEBOOK.parent.parent) not in text
    home = str(pathlib.Path.home())
    assert home == "/" or home not in text
