"""The Colab TPU notebook is a valid notebook whose Python cells parse and whose library calls exist."""
import ast
import os

import nbformat

from conftest import ROOT


def test_colab_notebook_is_valid_and_parses():
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "colab_tpu.ipynb"), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            python = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
                               and not line.startswith("    --config"))
            ast.parse(python)
    text = "\n".join(c.source for c in nb.cells)
    assert "experiments/configs/smoke.py" in text and os.path.exists(os.path.join(ROOT, "experiments/configs/smoke.py"))
