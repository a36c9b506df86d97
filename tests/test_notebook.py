"""The Colab TPU notebook: committed without outputs, and executed end to end on the CPU with nbclient (its
TPU-only cell skips itself on another backend; the short run uses the smoke config for 2 steps)."""
import os

import nbformat
import pytest

from conftest import ROOT, SHARED_DATA

NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")


def test_colab_notebook_is_valid_and_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert any("if ON_TPU:" in cell.source for cell in code)
    assert "experiments/configs/smoke.py" in "\n".join(c.source for c in code)


@pytest.mark.slow
def test_colab_notebook_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("EXPRL_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("EXPRL_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("EXPRL_NOTEBOOK_TFDS", str(tmp_path / "tfds"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                     if out.get("output_type") == "stream")
    assert "TPU-only cell skipped" in text
    assert '"pass@1"' in text  # the run's final evaluation, printed by the last cell
    if os.path.isdir(SHARED_DATA):
        assert "1319 records;" in text  # GSM8K test through TFDS
    assert os.path.isfile(tmp_path / "run" / "results.json")
