"""Running one job: papermill executes the notebook into its folder; `done` is written last.

Used by both launchers' workers (a local process, a SLURM task), so a job behaves the same wherever
it runs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Mapping

from vldlib.paths import is_packaged
from vldlib.tools.sweep.grid import RESERVED
from vldlib.tools.sweep.jobs import KERNEL, Job, record
from vldlib.utils import write_json_atomic


def slurm_task_id(env: Mapping[str, str] | None = None) -> str:
    """The id squeue shows for this process's SLURM task (`123_4` in an array, `123` alone), "" outside
    SLURM. `done` keeps it, so that a later sweep can tell which submission finished the job."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _error_line(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # papermill.PapermillExecutionError: the notebook's own exception
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell [{cell}])" if cell else "")
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def execute_job(job: Job, kernel_name: str = KERNEL) -> dict[str, Any]:
    """Run the notebook of `job` to completion; write `done` last on success, evidence on failure.

    The notebook runs with cwd = its own folder (relative paths behave as in Jupyter; one of the
    installed package's notebooks runs in the current folder instead) and is
    executed into a temporary file that is renamed into place, so `executed.ipynb` is never half a
    notebook. Returns the `record` of the run; never raises for a failing notebook.
    """
    import papermill

    out = job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp.ipynb"):  # left by a killed run
        stale.unlink(missing_ok=True)
    job.error_path.unlink(missing_ok=True)
    tmp = out / f".executed.{os.getpid()}.tmp.ipynb"
    t0 = time.time()
    try:
        # a notebook of the installed package runs in the current folder, never in site-packages
        cwd = os.getcwd() if is_packaged(job.notebook) else str(job.notebook.parent)
        papermill.execute_notebook(str(job.notebook), str(tmp), parameters={**job.params, RESERVED: str(out)},
                                   cwd=cwd, kernel_name=kernel_name,
                                   progress_bar=False, log_output=True)
    except Exception as e:  # noqa: BLE001 - any failure of the notebook is a failed job, reported
        wall = time.time() - t0
        shown = None
        if tmp.exists():
            os.replace(tmp, job.failed_path)
            shown = job.failed_path
        error = _error_line(e)
        write_json_atomic(job.error_path, {"error": error, "notebook": str(shown or ""), "wall_s": wall,
                                           "params": job.params, "host": socket.gethostname()})
        logging.getLogger("papermill").error("job %s failed: %s", job.name, error)
        return record(job, "failed", wall, error, shown)
    wall = time.time() - t0
    os.replace(tmp, job.executed)
    job.failed_path.unlink(missing_ok=True)  # the folder describes the latest run only
    write_json_atomic(job.done_path, {"params": job.params, "wall_s": wall, "notebook": str(job.notebook),
                                      "executed": str(job.executed), "host": socket.gethostname(),
                                      "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "slurm_job_id": slurm_task_id(),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return record(job, "done", wall, notebook=job.executed)
