"""Notebooks execute headless (nbclient, a real kernel) on runs made here."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import TINY

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_run_overview_notebook_executes_on_a_real_run(cli, tmp_path):
    result = cli("train", "--recipe", "demo", "--run-dir", "run", *TINY, "train.max_steps=4",
                 "train.log_every_steps=1", "train.eval_every_epochs=0.05", "wandb.mode=disabled")
    assert result.returncode == 0, result.stderr[-2000:]
    notebook = nbformat.read(NOTEBOOKS / "run_overview.ipynb", as_version=4)
    os.environ.update(RUN_DIRS=str(tmp_path / "run"), FIGURE_DIR=str(tmp_path / "figures"))
    try:
        NotebookClient(notebook, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["RUN_DIRS"], os.environ["FIGURE_DIR"]
    summary_table = next(c for c in notebook.cells if c.cell_type == "code" and "summaries.round" in c.source)
    assert "completed" in summary_table.outputs[0]["data"]["text/plain"]
    assert (tmp_path / "figures" / "loss_lr.png").stat().st_size > 0
    assert (tmp_path / "figures" / "val_top1.png").stat().st_size > 0
