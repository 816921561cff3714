"""The main job's notebook, end to end through `run_quickstart`, on tiny fake data."""

from __future__ import annotations

import pandas as pd
import pytest

from vldlib.experiments.quickstart import run_quickstart


def test_quickstart_notebook_writes_tables_figures_and_a_computed_summary(fake_benchmark, tmp_path, capfd):
    # tuned_by: a choices table (as notebook 07 writes it), a different lr and weight decay per cell
    chosen = {(0.0, 0): (0.05, 1e-4), (0.0, 1): (0.01, 1e-2), (0.9, 0): (0.02, 1e-1), (0.9, 1): (0.05, 1e-2)}
    pd.DataFrame([{"backbone": "test_resnet", "train_stages": 1, "dropout": r, "test_env": t, "lr": lr,
                   "weight_decay": wd, "iid_mean": 0.5, "n_configs": 4} for (r, t), (lr, wd) in chosen.items()]
                 ).to_csv(tmp_path / "choices.csv", index=False)
    out = run_quickstart({"benchmark": str(fake_benchmark), "backbone": "test_resnet", "pretrained": False,
                          "resolution": 32, "train_stages": 1, "steps": 4, "eval_every": 2,
                          "batch_size": 4, "seeds": [0, 1, 2], "test_envs": [0, 1], "lr": 0.05,
                          "tuned_by": str(tmp_path / "choices.csv")},
                         output_dir=str(tmp_path / "qs"), log_output=True)
    # the console (the kernel's own stderr included) is quiet: what the cells print, one line per run,
    # never a figure's or a table's repr, nor ipykernel's warning about TCP on every start
    console = "".join(capfd.readouterr())
    for noise in ("<Figure size", "<IPython.core.display", "Kernel is running over TCP", "leaked semaphore"):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    runs = [p.name for p in (out / "runs").iterdir()]
    assert len(runs) == 12 and all(sum(r in line for line in console.splitlines()) == 1 for r in runs)
    for name in ("00_quickstart.ipynb", "results.csv", "selected.csv", "table.csv", "ood_vs_iid.png",
                 "curves.png", "domains.png", "summary.md", "floors.csv", "design.csv", "power.csv"):
        assert (out / name).exists(), name
    selected = pd.read_csv(out / "selected.csv")
    assert list(selected.groupby("dropout").last_step.max()) == [4, 4]  # the same budget for every rate
    assert {(r.dropout, r.test_env): (r.lr, r.weight_decay) for r in selected.itertuples()} == chosen
    summary = (out / "summary.md").read_text()
    assert "paired difference" in summary and "n=3 pairs on seed, each the mean over 2 held-out domains" in summary
    # the design line, recomputed by hand: each seed's o.o.d. accuracy averaged over the held-out
    # domains, then 0.9 minus 0 seed by seed
    model = selected[selected.method == "model"]
    per = model.groupby(["seed", "dropout"]).ood_acc.mean().unstack()
    d = per[0.9] - per[0.0]
    design = pd.read_csv(out / "design.csv").iloc[0]
    assert design.n_seeds == 3 and design.held_out_domains == 2
    assert design.difference_points == pytest.approx(100 * d.mean())
    assert design.se_points == pytest.approx(100 * d.std(ddof=1) / 3 ** 0.5)
    assert f"Paired SE {design.se_points:.2f} points" in summary
    # the floors are in the table
    table = pd.read_csv(out / "table.csv")
    assert {"chance", "majority class"} <= set(table.method)


def test_quickstart_refuses_unequal_budgets(fake_benchmark, tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="same budget"):
        run_quickstart({"benchmark": str(fake_benchmark), "backbone": "test_resnet", "pretrained": False,
                        "steps": {0.0: 4, 0.9: 6}, "tuned_by": None}, output_dir=str(tmp_path / "qs"), log_output=False)


def test_notebook_parameters_mirror_the_quickstart_defaults():
    """The quickstart's defaults live in vldlib (what the bench times); the notebook's parameters
    cell repeats them as literals for papermill. Both must say the same."""
    import ast

    import papermill as pm

    from vldlib.experiments.quickstart import DEFAULTS, notebook_path

    declared = {k: ast.literal_eval(v["default"]) for k, v in pm.inspect_notebook(str(notebook_path())).items()}
    assert declared == DEFAULTS


def test_gpu_parameter_file_runs_the_same_study_fully_fine_tuned(tmp_path):
    from vldlib.experiments.quickstart import DEFAULTS, read_params_file

    gpu = read_params_file("notebooks/00_quickstart.gpu.yaml")
    assert gpu["benchmark"] == DEFAULTS["benchmark"] and gpu["train_stages"] is None and gpu["augment"] is True
    assert not isinstance(gpu["steps"], dict)  # one budget for every rate
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown parameters \['stepz'\]"):
        read_params_file(bad)


def test_another_benchmark_never_overwrites_the_committed_example(tmp_path):
    """outputs/quickstart holds the committed summary of the default benchmark; any other
    benchmark (a name or a folder) writes beside it, under its own name."""
    from vldlib.experiments.quickstart import DEFAULTS, _output_dir, default_output_dir

    assert default_output_dir({}) == "outputs/quickstart"
    assert default_output_dir({"benchmark": DEFAULTS["benchmark"]}) == "outputs/quickstart"
    assert default_output_dir({"benchmark": "emoji"}) == "outputs/quickstart-emoji"
    assert default_output_dir({"benchmark": str(tmp_path / "Five")}) == "outputs/quickstart-Five"
    assert _output_dir({"benchmark": "emoji"}, False, None).name == "quickstart-emoji"
    assert _output_dir({"benchmark": "emoji"}, False, str(tmp_path / "mine")) == tmp_path / "mine"


def test_help_lists_every_parameter(capsys):
    from vldlib.cli import main
    from vldlib.experiments.quickstart import DEFAULTS

    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    text = capsys.readouterr().out
    for key, value in DEFAULTS.items():
        assert f"  {key} = {value!r}" in text


def test_ctrl_c_prints_one_line_and_exits_130_without_the_kernel_task_traceback(monkeypatch, capsys, caplog):
    """A real Ctrl-C interrupts papermill mid-cell; nbclient's cell task then holds the cell's
    KeyboardInterrupt, and asyncio logs it with its whole traceback when the task is collected."""
    import asyncio
    import gc
    import logging

    from vldlib.cli import main
    from vldlib.experiments import quickstart

    pending = []  # the failed task lives on until exit, as papermill's does

    def interrupted(*args, **kwargs):
        async def cell():
            raise RuntimeError("the interrupted cell's error")

        loop = asyncio.new_event_loop()
        task = loop.create_task(cell())
        loop.run_until_complete(asyncio.sleep(0.01))  # the task fails; nobody retrieves it
        loop.close()
        pending.append(task)
        raise KeyboardInterrupt

    monkeypatch.setattr(quickstart, "run_quickstart", interrupted)
    level = logging.getLogger("asyncio").level
    try:
        with caplog.at_level(logging.ERROR):
            rc = main(["quickstart"])
            pending.clear()  # collected after the message, as at exit
            gc.collect()
        assert rc == 130
        err = capsys.readouterr().err
        assert err.strip().startswith("interrupted: finished runs are kept") and err.count("\n") == 2
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        logging.getLogger("asyncio").setLevel(level)


def test_ctrl_c_in_runs_only_says_the_same_line_and_a_failure_keeps_its_traceback(monkeypatch, capsys):
    from vldlib.cli import main
    from vldlib.experiments import quickstart

    def interrupted(params):
        raise KeyboardInterrupt

    monkeypatch.setattr(quickstart, "run_study_runs", interrupted)
    assert main(["quickstart", "--runs-only"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted: finished runs are kept; run the same command again to resume"

    def broken(params):
        raise OSError("disk full")

    monkeypatch.setattr(quickstart, "run_study_runs", broken)
    with pytest.raises(OSError, match="disk full"):  # not reported as a notebook failure: no notebook ran
        main(["quickstart", "--runs-only"])


@pytest.mark.slow
def test_runs_only_trains_without_the_notebook_which_then_renders_them_untouched(fake_benchmark, tmp_path, capsys):
    from vldlib.cli import main

    params = {"benchmark": str(fake_benchmark), "backbone": "test_resnet", "pretrained": False, "resolution": 32,
              "train_stages": 1, "steps": 4, "eval_every": 2, "batch_size": 4, "seeds": [0], "test_envs": [0, 1],
              "lr": 0.05, "parallel_runs": 1, "tuned_by": None}
    out = tmp_path / "qs"
    args = ["quickstart", "--runs-only", "--out", str(out)]
    for k, v in params.items():
        args += ["--param", f"{k}={v}"]
    assert main(args) == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 4 and all((r / "done").exists() for r in runs)  # 2 held-out domains x 2 rates
    assert not (out / "00_quickstart.ipynb").exists()
    assert "4 of 4 runs finished" in capsys.readouterr().out
    written = {r: (r / "records.jsonl").stat().st_mtime_ns for r in runs}
    run_quickstart(params, output_dir=str(out), log_output=False)
    assert (out / "summary.md").exists() and "n=1" in (out / "summary.md").read_text()
    assert {r: (r / "records.jsonl").stat().st_mtime_ns for r in runs} == written  # nothing trained again
