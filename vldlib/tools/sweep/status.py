"""`sweep --status DIR`: each job's state, read from its folder and (for SLURM tasks) the queue.

It takes no lock and writes nothing but SLURM's answers into DIR/slurm_states.json (atomically,
best effort), so it is safe beside a running sweep or detached SLURM tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vldlib.tools.sweep.jobs import (
    Job,
    finished_outcome,
    job_from_json,
    record,
)
from vldlib.tools.sweep import slurm
from vldlib.tools.sweep.slurm import _load_registry
from vldlib.utils import read_bounded_text

STATUS_COLUMNS = ["name", "status", "state", "reason", "job_id", "elapsed_s", "wall_s", "error", "log"]


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
    return {"name": spec.parent.name, "status": "damaged", "state": "", "reason": "", "job_id": "", "elapsed_s": None,
            "wall_s": None, "error": error, "log": ""}


def sweep_status(out_dir: str | os.PathLike):
    """One row per job folder of DIR: done / failed / pending / running / not run, with SLURM's
    state, pending reason, job id and elapsed time where a task was submitted.

    When squeue cannot answer (the controller is down, or squeue is not on this machine's PATH), no
    task is concluded ended from its absence: a submitted, unfinished job is `unknown`, shown with
    its last known state and how long ago SLURM gave it (column `seen`), and `df.attrs["unanswered"]`
    says why (`--status` then exits 1). What the job folders prove (done, a failure recorded by a
    watching sweep) stays certain either way. Every answer SLURM gives is remembered for that case
    (`remember_states`)."""
    import pandas as pd

    out_dir = Path(out_dir).resolve()
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} is not a sweep folder (it does not exist); pass the --out of a sweep")
    jobs = _jobs(out_dir)
    registry = _load_registry(out_dir)
    live, unanswered = _ask_queue(registry)
    remembered = slurm.remembered_states(out_dir)
    slurm.remember_states(out_dir, {e["job_id"]: live[e["job_id"]] for e in registry.values()
                                    if isinstance(e, dict) and e.get("job_id") in live})
    now, ended = time.time(), {}
    rows: list[dict[str, Any]] = []
    for job in jobs:
        if isinstance(job, dict):  # a damaged job.json
            rows.append(job)
            continue
        entry = registry.get(job.name, {})
        jid = entry.get("job_id", "")
        on_slurm = bool(jid) and entry.get("cluster") == "slurm"
        q = live.get(jid) if jid else None
        if job.done_path.exists():
            last = remembered.get(jid) if jid and slurm.finished_by(job) == jid else None
            row = finished_outcome(job, job_id=jid, state=last[0].state if last and last[0].state in slurm.ENDED
                                   else "")
        elif _error_state(job):  # the task's end, recorded by the sweep that watched it: certain
            row = finished_outcome(job, job_id=jid, state=_error_state(job))
        elif unanswered and on_slurm:
            row = _last_known(job, jid, remembered.get(jid), now)
        elif q is not None:
            row = record(job, "running" if q.state in slurm.RUNNING else "pending", None, "", job_id=jid,
                         state=q.state, reason=q.reason, elapsed_s=q.elapsed_s)
        elif job.error_path.exists():  # written by the task itself: its notebook failed, or its kernel died
            final = slurm.ended_state(jid) if on_slurm else slurm.TaskState("")
            ended[jid] = final
            row = finished_outcome(job, job_id=jid, state=final.state, reason=final.reason,
                                   elapsed_s=final.elapsed_s)
        elif on_slurm:
            final = ended[jid] = slurm.ended_state(jid)
            row = record(job, "failed", None, f"ended {final.state} without a result (the sweep that watched it "
                         f"was gone); run the sweep again to record and retry it", job_id=jid, state=final.state,
                         reason=final.reason, elapsed_s=final.elapsed_s)
        else:
            row = record(job, "not run", job_id=jid)
        row = row or record(job, "not run")
        row["log"] = entry.get("stderr") or row["log"]
        rows.append(row)
    slurm.remember_states(out_dir, {jid: s for jid, s in ended.items() if s.state in slurm.ENDED})
    columns = STATUS_COLUMNS + (["seen"] if unanswered else [])
    df = pd.DataFrame([{k: r.get(k, "") for k in columns} for r in rows], columns=columns)
    df.attrs["unanswered"] = unanswered
    return df


def _ask_queue(registry: dict[str, Any]) -> tuple[dict[str, slurm.TaskState], str]:
    """(the queue's tasks by id, "") or, when it cannot be asked, ({}, why). A sweep never submitted to
    SLURM does not ask."""
    if not any(isinstance(e, dict) and e.get("cluster") == "slurm" for e in registry.values()):
        return {}, ""
    if shutil.which("squeue") is None:
        return {}, "squeue is not on PATH here, so SLURM was not asked; run --status where squeue works"
    live = slurm.queue_states()
    if live is None:
        return {}, ("squeue did not answer: the SLURM controller is down or unreachable (`scontrol ping` "
                    "tells); run --status again when it answers")
    return live, ""


def _last_known(job: Job, jid: str, last: tuple[slurm.TaskState, float] | None, now: float) -> dict[str, Any]:
    """The row of a submitted, unfinished job while SLURM cannot be asked: `unknown`, with the state
    SLURM last gave and its age (since then it may have ended, been requeued, or run on)."""
    if last is None:
        return {**record(job, "unknown", None, "", job_id=jid), "seen": "never"}
    state, seen = last
    return {**record(job, "unknown", None, "", job_id=jid, state=state.state, reason=state.reason,
                     elapsed_s=state.elapsed_s), "seen": f"{_age(now - seen)} ago"}


def _age(seconds: float) -> str:
    """45 s, 12 min, 3.5 h, 2.0 days."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _error_state(job: Job) -> str:
    """SLURM's final state in JOB/error.json: there only when a watching sweep wrote the file, "" when
    the task wrote it (its notebook failed, its kernel died) or there is none."""
    try:
        data = json.loads(job.error_path.read_text())
    except (OSError, ValueError):
        return ""
    return str(data.get("state") or "") if isinstance(data, dict) else ""


def status_text(df) -> str:
    """The table `--status` prints: counts, then one line per job; first, when SLURM could not be
    asked, why, and how to read the `unknown` rows."""
    import pandas as pd

    counts = df.status.value_counts().to_dict()
    head = f"{len(df)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    if df.attrs.get("unanswered"):
        head = (f"warning: {df.attrs['unanswered']}. Each `unknown` job shows its last known SLURM state and "
                f"how long ago SLURM gave it (`seen`); it may have ended since. `done` and recorded failures "
                f"are read from the job folders.\n" + head)
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        return head + ("\n" + df.astype(object).fillna("").to_string(index=False) if len(df) else "")
