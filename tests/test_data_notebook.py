"""notebooks/explore_data.ipynb runs top to bottom against a dataset made from the sample corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from openllama.data.pack import tokenize_dataset

REPO = Path(__file__).resolve().parents[1]


def test_the_explore_notebook_executes_on_the_sample_dataset(sp_model, tmp_path, monkeypatch):
    corpus = tmp_path / "redpajama"
    shutil.copytree(REPO / "data/sample/redpajama", corpus)
    with open(corpus / "c4_sample.jsonl", "ab") as f:
        f.write(b"{not json\n")
    tokenize_dataset([str(corpus)], str(sp_model), str(tmp_path / "dataset"), seq_len=128, track=False)
    monkeypatch.setenv("OPENLLAMA_DATASET", str(tmp_path / "dataset"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(REPO / "notebooks/explore_data.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "not_json" in outputs and "--- wikipedia ---" in outputs
