"""The main job's notebook, end to end through `run_quickstart`, on tiny fake data."""

from __future__ import annotations

import pandas as pd

from vldlib.experiments.quickstart import run_quickstart


def test_quickstart_notebook_writes_tables_figures_and_a_computed_summary(fake_benchmark, tmp_path):
    out = run_quickstart({"benchmark": str(fake_benchmark), "backbone": "test_resnet", "pretrained": False,
                          "resolution": 32, "train_stages": 1, "steps": {0.0: 4, 0.9: 6}, "eval_every": 2,
                          "batch_size": 4, "seeds": [0, 1], "test_envs": [0], "lr": 0.05},
                         output_dir=str(tmp_path / "qs"), log_output=False)
    for name in ("00_quickstart.ipynb", "results.csv", "selected.csv", "table.csv", "ood_vs_iid.png",
                 "curves.png", "domains.png", "summary.md"):
        assert (out / name).exists(), name
    selected = pd.read_csv(out / "selected.csv")
    assert list(selected.groupby("dropout").last_step.max()) == [4, 6]  # each rate its own steps
    summary = (out / "summary.md").read_text()
    assert "paired difference" in summary and "n=2 pairs" in summary


def test_notebook_parameters_mirror_the_quickstart_defaults():
    """The quickstart's defaults live in vldlib (what the bench times); the notebook's parameters
    cell repeats them as literals for papermill. Both must say the same."""
    import ast

    import papermill as pm

    from vldlib.experiments.quickstart import DEFAULTS, notebook_path

    declared = {k: ast.literal_eval(v["default"]) for k, v in pm.inspect_notebook(str(notebook_path())).items()}
    assert declared == DEFAULTS
