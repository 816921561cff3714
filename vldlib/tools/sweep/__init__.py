"""Batches of parameterized notebooks (papermill) that resume after a kill, locally or on SLURM.

grid (YAML -> parameter sets) -> jobs (named folders, job.json, outcomes) -> execute (one papermill
run) -> local / slurm launchers -> runner (lock, skip done, sweep.csv) -> status, cli. See `cli`'s
docstring for the command line. DomainBed's sweep.py is the model for this design.
"""

from vldlib.tools.sweep.cli import register_cli
from vldlib.tools.sweep.grid import (
           apply_overrides,
           expand_grid,
           load_grid,
           parse_sets,
           parse_value,
)
from vldlib.tools.sweep.jobs import (
           KERNEL,
           NAME_MAX,
           SUMMARY_COLUMNS,
           Job,
           job_name,
           plan_jobs,
)
from vldlib.tools.sweep.local import DummyLauncher, Launcher, LocalLauncher
from vldlib.tools.sweep.lock import SweepLock, SweepLockedError
from vldlib.tools.sweep.runner import LAUNCHERS, failure_table, prepare, run_sweep
from vldlib.tools.sweep.slurm import NotebookTask, SlurmLauncher
from vldlib.tools.sweep.status import sweep_status

__all__ = ["DummyLauncher", "Job", "KERNEL", "LAUNCHERS", "Launcher", "LocalLauncher", "NAME_MAX", "NotebookTask",
           "SUMMARY_COLUMNS", "SlurmLauncher", "SweepLock", "SweepLockedError", "apply_overrides", "expand_grid",
           "failure_table", "job_name", "load_grid", "parse_sets", "parse_value", "plan_jobs", "prepare",
           "register_cli", "run_sweep", "sweep_status"]
