"""The runner: plan the jobs, take the lock, skip what is done, launch the rest, keep sweep.csv."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vldlib.paths import locate
from vldlib.tools.sweep.grid import (
    RESERVED,
    Grid,
    apply_overrides,
    as_grids,
    expand_grid,
    load_grid,
)
from vldlib.tools.sweep.jobs import (
    KERNEL,
    SUMMARY_COLUMNS,
    Job,
    adopt_existing,
    check_params,
    fmt,
    plan_jobs,
    previous,
)
from vldlib.tools.sweep.local import DummyLauncher, Launcher, LocalLauncher
from vldlib.tools.sweep.lock import SweepLock
from vldlib.tools.sweep.slurm import SlurmLauncher
from vldlib.utils import atomic_path

LAUNCHERS: dict[str, Callable[..., Launcher]] = {"local": LocalLauncher, "slurm": SlurmLauncher,
                                                 "dummy": DummyLauncher}


def summary_frame(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd

    flat = []
    for r in rows:
        row = {k: r[k] for k in SUMMARY_COLUMNS}
        for k, v in r["params"].items():
            row[f"param.{k}" if k in SUMMARY_COLUMNS else k] = fmt(v) if isinstance(v, (list, dict)) else v
        flat.append(row)
    return pd.DataFrame(flat, columns=None if flat else SUMMARY_COLUMNS)


def write_summary(df, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def prepare(notebook: str | os.PathLike, grid: Grid | str | os.PathLike | None, out_dir: str | os.PathLike,
            overrides: Mapping[str, Any] | None = None) -> list[Job]:
    """Grid (mapping, list or YAML path) + overrides -> validated jobs, reusing existing folders."""
    notebook = locate(notebook).resolve()  # as given, else a shipped one by name (checkout, then package)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist")
    grids = load_grid(locate(grid)) if isinstance(grid, (str, os.PathLike)) else as_grids(grid)
    if overrides and RESERVED in overrides:
        raise ValueError(f"'{RESERVED}' is set by the sweep for each job; use --out to place the runs")
    params = expand_grid(apply_overrides(grids, overrides))
    check_params(notebook, params)
    return adopt_existing(plan_jobs(notebook, params, Path(out_dir).resolve()))


def run_sweep(notebook: str | os.PathLike, grid: Grid | str | os.PathLike | None, out_dir: str | os.PathLike, *,
              launcher: str | Launcher = "local", jobs: int | None = None, gpus: Sequence[str] | None = None,
              overrides: Mapping[str, Any] | None = None, progress: bool = True, kernel_name: str = KERNEL,
              launcher_options: Mapping[str, Any] | None = None):
    """Run every unfinished job of the grid; return the summary DataFrame (also DIR/sweep.csv).

    `grid` is a mapping, a list of mappings or a YAML path. Statuses: done (ran now, or on SLURM
    finished while no sweep watched), skipped (finished and reported earlier), failed, interrupted,
    not run, and for SLURM tasks left running (detached, or the sweep interrupted) pending or
    running. `jobs`: at a time (default: one per GPU, else 1 locally; all at once on SLURM).
    Example, from a notebook:

        df = run_sweep("notebooks/train.ipynb", {"dropout": [0.0, 0.9], "steps": 20}, "runs/smoke", jobs=2)
        df[df.status == "failed"][["name", "error", "notebook"]]
    """
    from tqdm.auto import tqdm

    planned = prepare(notebook, grid, out_dir, overrides)
    out_dir = Path(out_dir).resolve()
    summary_path = out_dir / "sweep.csv"
    with SweepLock(out_dir) as lock:
        planned = adopt_existing(planned)  # again, now that no one else can create folders
        rows = {j.name: previous(j) for j in planned}
        todo = [j for j in planned if rows[j.name]["status"] != "skipped"]
        if isinstance(launcher, str):
            if launcher not in LAUNCHERS:
                raise ValueError(f"unknown launcher {launcher!r}; choose one of {sorted(LAUNCHERS)}")
            launcher = LAUNCHERS[launcher](jobs=jobs, gpus=gpus, kernel_name=kernel_name, lock_fd=lock.fd,
                                           **dict(launcher_options or {}))
        bar = tqdm(total=len(planned), initial=len(planned) - len(todo), desc=f"sweep {out_dir.name}",
                   unit="job", disable=not progress)
        failed = 0
        counted = {j.name for j in planned if rows[j.name]["status"] == "skipped"}  # in the bar's `initial`

        def on_result(rec: dict[str, Any]) -> None:
            nonlocal failed
            rows[rec["name"]] = rec
            failed += rec["status"] == "failed"
            if rec["status"] in ("done", "failed") and rec["name"] not in counted:
                counted.add(rec["name"])
                bar.update(1)
            bar.set_postfix(failed=failed, refresh=True)
            write_summary(summary_frame(list(rows.values())), summary_path)

        try:
            write_summary(summary_frame(list(rows.values())), summary_path)
            report_finished = getattr(launcher, "report_finished", None)  # SLURM: job ids and states
            if report_finished is not None:
                report_finished([j for j in planned if rows[j.name]["status"] == "skipped"], on_result)
            launcher.launch(todo, on_result)
        finally:
            bar.close()
            write_summary(summary_frame(list(rows.values())), summary_path)
    return summary_frame(list(rows.values()))


def failure_table(df) -> str:
    """The failures of a summary as text: name, error line, notebook that shows the error."""
    columns = ["name", "status"] + (["state"] if df.state.fillna("").astype(str).str.len().any() else [])
    bad = df[df.status.isin(["failed", "interrupted"])][columns + ["error", "notebook"]]
    if bad.empty:
        return ""
    import pandas as pd

    with pd.option_context("display.max_colwidth", 200, "display.width", 250):
        return bad.to_string(index=False)
