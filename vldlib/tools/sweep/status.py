"""`sweep --status DIR`: each job's state, read from its folder and (for SLURM tasks) the queue.

Read-only: it takes no lock and writes nothing, so it is safe beside a running sweep or
detached SLURM tasks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vldlib.tools.sweep.jobs import (
    Job,
    finished_outcome,
    job_from_json,
    record,
)
from vldlib.tools.sweep.slurm import RUNNING, _load_registry, ended_state, queue_states
from vldlib.utils import read_bounded_text

STATUS_COLUMNS = ["name", "status", "state", "job_id", "elapsed_s", "wall_s", "error", "log"]


MAX_JOB_JSON_BYTES = 2**20  # a job.json is a few hundred bytes


def _jobs(out_dir: Path) -> list[Job | dict[str, Any]]:
    """Each job folder's Job, or, where its job.json cannot be read, the row that says so: a damaged
    job must show, not vanish from the table."""
    jobs: list[Job | dict[str, Any]] = []
    for spec in sorted(out_dir.glob("*/job.json")):
        try:
            jobs.append(_read_job(spec))
        except ValueError as e:
            jobs.append(_damaged_row(spec, str(e)))
    return jobs


def _read_job(spec: Path) -> Job:
    """The Job of a job.json; garbage, JSON of the wrong shape, not a regular file: a ValueError."""
    try:
        return job_from_json(json.loads(read_bounded_text(spec, MAX_JOB_JSON_BYTES) or ""))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as e:
        raise ValueError(f"{spec}: damaged job.json ({type(e).__name__}: {str(e)[:120]}); run the sweep again to "
                         f"rewrite it, or delete {spec.parent}") from None


def _damaged_row(spec: Path, error: str) -> dict[str, Any]:
    return {"name": spec.parent.name, "status": "damaged", "state": "", "job_id": "", "elapsed_s": None,
            "wall_s": None, "error": error, "log": ""}


def sweep_status(out_dir: str | os.PathLike):
    """One row per job folder of DIR: done / failed / pending / running / not run, with SLURM's
    state, job id and elapsed time where a task was submitted."""
    import pandas as pd

    out_dir = Path(out_dir).resolve()
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a sweep folder (it does not exist); pass the --out of a sweep")
    jobs = _jobs(out_dir)
    registry = _load_registry(out_dir)
    live = queue_states() if registry and shutil.which("squeue") else {}
    rows: list[dict[str, Any]] = []
    for job in jobs:
        if isinstance(job, dict):  # a damaged job.json
            rows.append(job)
            continue
        entry = registry.get(job.name, {})
        jid = entry.get("job_id", "")
        q = (live or {}).get(jid) if jid else None
        if job.done_path.exists():
            row = finished_outcome(job, job_id=jid)
        elif q is not None:
            row = record(job, "running" if q.state in RUNNING else "pending", None, q.reason,
                         job_id=jid, state=q.state, elapsed_s=q.elapsed_s)
        elif job.error_path.exists():
            row = finished_outcome(job, job_id=jid, state=_error_state(job))
        elif jid and live is not None and entry.get("cluster") == "slurm":
            final = ended_state(jid)
            row = record(job, "failed", None, f"ended {final.state} without a result (the sweep that watched it "
                         f"was gone); run the sweep again to record and retry it", job_id=jid, state=final.state,
                         elapsed_s=final.elapsed_s)
        else:
            row = record(job, "not run", job_id=jid)
        row = row or record(job, "not run")
        row["log"] = entry.get("stderr") or row["log"]
        rows.append(row)
    return pd.DataFrame([{k: r[k] for k in STATUS_COLUMNS} for r in rows], columns=STATUS_COLUMNS)


def _error_state(job: Job) -> str:
    try:
        return json.loads(job.error_path.read_text()).get("state", "")
    except (OSError, ValueError):
        return ""


def status_text(df) -> str:
    import pandas as pd

    counts = df.status.value_counts().to_dict()
    head = f"{len(df)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        return head + ("\n" + df.fillna("").to_string(index=False) if len(df) else "")
