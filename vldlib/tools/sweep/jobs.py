"""Jobs: parameter sets -> named folders, their `job.json`, and the sweep.csv row of an outcome.

Each parameter set gets the folder DIR/<varying params>-<hash> (the hash covers every parameter
and the notebook's file name, so it is the folder's identity; the readable part is cosmetic).
A folder holds `job.json` (what runs, and on SLURM its job id and log paths), `log.txt`,
`executed.ipynb` and, written last, `done`. A failure leaves `error.json` (and `failed.ipynb` when
the notebook itself failed). These files are the only channel from a job back to the sweep: they
survive a killed sweep, a requeued task and a task on another node.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from vldlib.utils import config_hash, write_json_atomic

NAME_MAX = 100  # readable part of a folder name; the hash keeps names unique anyway
KERNEL = "python3"
SUMMARY_COLUMNS = ["name", "status", "state", "reason", "job_id", "elapsed_s", "wall_s", "error", "notebook",
                   "log", "out_dir"]


@dataclasses.dataclass(frozen=True)
class Job:
    """One notebook run: its parameters (without `output_dir`) and where everything goes."""
    params: dict[str, Any]
    out_dir: Path
    name: str
    notebook: Path
    executed: Path  # the executed notebook of the finished run
    log: Path

    @property
    def done_path(self) -> Path:
        return self.out_dir / "done"

    @property
    def failed_path(self) -> Path:
        return self.out_dir / "failed.ipynb"

    @property
    def error_path(self) -> Path:
        return self.out_dir / "error.json"

    @property
    def spec_path(self) -> Path:
        return self.out_dir / "job.json"

    @property
    def hash(self) -> str:
        return self.name.rsplit("-", 1)[-1]


def fmt(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def job_name(params: Mapping[str, Any], keys: Sequence[str], notebook: str | os.PathLike) -> str:
    """`test_env=0,dropout=0.9-3f2a9c1b0e`: the `keys` shown, then a hash of all params + notebook name.

    Characters outside [A-Za-z0-9._,=+-] become '_' so the name is safe on any file system and shell.
    """
    digest = config_hash({"notebook": Path(notebook).name, "params": dict(params)})
    readable = ",".join(f"{k}={fmt(params[k])}" for k in keys if k in params)
    readable = re.sub(r"[^A-Za-z0-9._,=+-]", "_", readable)[:NAME_MAX].strip(",=.-") or Path(notebook).stem
    return f"{readable}-{digest}"


def plan_jobs(notebook: str | os.PathLike, grid_params: Sequence[Mapping[str, Any]],
              out_dir: str | os.PathLike) -> list[Job]:
    """The jobs for these parameter sets (from `expand_grid`), duplicates dropped, order kept.

    Folder names show the parameters that vary across the batch (all of them for a single job).
    """
    notebook, out_dir = Path(notebook), Path(out_dir)
    keys = list(dict.fromkeys(k for p in grid_params for k in p))
    varying = [k for k in keys if len({fmt(p.get(k)) for p in grid_params}) > 1] or keys
    jobs: dict[str, Job] = {}
    for p in grid_params:
        name = job_name(p, varying, notebook)
        d = out_dir / name
        jobs.setdefault(name, Job(dict(p), d, name, notebook, d / "executed.ipynb", d / "log.txt"))
    return list(jobs.values())


def adopt_existing(jobs: list[Job]) -> list[Job]:
    """Reuse a folder with the same hash but another readable part (the grid's axes changed)."""
    out = []
    for job in jobs:
        if not job.out_dir.exists():
            for d in sorted(job.out_dir.parent.glob(f"*-{job.hash}")):
                if d.is_dir():
                    job = dataclasses.replace(job, out_dir=d, name=d.name, executed=d / job.executed.name,
                                              log=d / job.log.name)
                    break
        out.append(job)
    return out


def check_params(notebook: Path, grid_params: Sequence[Mapping[str, Any]]) -> None:
    """Fail before launching anything if a grid key is not a parameter of the notebook (a typo
    would otherwise run the whole batch with the default value)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    if not declared:
        raise ValueError(f"{notebook} has no cell tagged 'parameters' (or it assigns nothing); tag the "
                         f"cell holding the defaults (Jupyter: View > Cell Toolbar > Tags)")
    unknown = sorted({k for p in grid_params for k in p} - set(declared))
    if unknown:
        raise ValueError(f"{unknown} are not parameters of {notebook}; its parameters cell declares "
                         f"{sorted(declared)}. Fix the grid/--set keys or add them to that cell.")


# ----------------------------------------------------------------------------------- job.json

def job_to_json(job: Job, kernel_name: str) -> dict[str, Any]:
    return {"params": job.params, "out_dir": str(job.out_dir), "name": job.name, "notebook": str(job.notebook),
            "executed": str(job.executed), "log": str(job.log), "kernel_name": kernel_name}


def job_from_json(d: Mapping[str, Any]) -> Job:
    return Job(dict(d["params"]), Path(d["out_dir"]), d["name"], Path(d["notebook"]), Path(d["executed"]),
               Path(d["log"]))


def write_spec(job: Job, kernel_name: str, **extra: Any) -> None:
    """Write JOB/job.json (what runs; `extra` such as `slurm={...}` says where and how)."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job.spec_path, {**job_to_json(job, kernel_name), **extra})


def read_spec(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------- outcomes

def record(job: Job, status: str, wall_s: float | None = None, error: str = "", notebook: Path | None = None,
           *, job_id: str = "", state: str = "", reason: str = "",
           elapsed_s: float | None = None) -> dict[str, Any]:
    """One row of sweep.csv. `status` is the sweep's word (done, skipped, failed, pending, running,
    interrupted, not run; `--status` adds unknown); `state` the scheduler's (SLURM's PENDING, RUNNING,
    FAILED, TIMEOUT, ...) and `reason` its why (a pending task's JobArrayTaskLimit, Priority, ...):
    not an error, so never in `error`, which holds what went wrong."""
    return {"name": job.name, "status": status, "state": state, "reason": reason, "job_id": job_id,
            "elapsed_s": None if elapsed_s is None else round(elapsed_s, 1),
            "wall_s": None if wall_s is None else round(wall_s, 2), "error": error,
            "notebook": str(notebook) if notebook else "", "log": str(job.log), "out_dir": str(job.out_dir),
            "params": job.params}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_outcome(job: Job, **scheduler: Any) -> dict[str, Any] | None:
    """The record of a job that left `done` or `error.json`, else None (it left no result)."""
    done = _read_json(job.done_path) if job.done_path.exists() else None
    if done is not None:
        return record(job, "done", done.get("wall_s"), notebook=job.executed, **scheduler)
    err = _read_json(job.error_path) if job.error_path.exists() else None
    if err is not None:
        return record(job, "failed", err.get("wall_s"), err.get("error", ""),
                      Path(err["notebook"]) if err.get("notebook") else None, **scheduler)
    return None


def previous(job: Job) -> dict[str, Any]:
    """The row of a job before this sweep launches anything: skipped if done, else not run."""
    if job.done_path.exists():
        done = _read_json(job.done_path) or {}
        return record(job, "skipped", done.get("wall_s"), notebook=job.executed)
    return record(job, "not run")
