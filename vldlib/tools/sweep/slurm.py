"""SLURM through submitit: one job array per sweep, watched with `squeue`, never waited on forever.

- Every task is a `NotebookTask`, a `submitit.helpers.Checkpointable`: when SLURM signals a time
  limit or a preemption (USR2, 90 s ahead), submitit requeues the task with the same arguments.
  The requeued task executes the notebook again; runs that finished are read back from their
  folders and training resumes from its `last.pt`, so the requeue loses at most the last steps.
- A task that finds `done` returns at once, without touching `log.txt` or `executed.ipynb`.
- Job ids go to DIR/slurm_jobs.json and each job's `job.json`; a re-run reattaches to tasks still
  queued or running instead of submitting them again, and `detach=True` submits and returns.
- The watch loop asks `squeue` (which works without accounting). A task gone from the queue
  without `done` or `error.json` failed: its SLURM state (FAILED, OUT_OF_MEMORY, TIMEOUT,
  PREEMPTED, NODE_FAIL, CANCELLED) comes from `scontrol show job` (or `sacct` when accounting
  keeps it), and an `error.json` naming it and the log is written for it. A task whose notebook
  raised exits with an error, so SLURM says FAILED there too, never COMPLETED.
- What SLURM said of each task, and when, goes to DIR/slurm_states.json: when the controller does
  not answer, `--status` shows these last known states with their age instead of guessing, and a
  re-run tells a job that finished while no sweep watched (reported `done`, with its job id and
  state) from one reported before (`skipped`).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import submitit

from vldlib.tools.sweep.execute import execute_job, slurm_task_id
from vldlib.tools.sweep.jobs import KERNEL, Job, finished_outcome, record, write_spec
from vldlib.tools.sweep.local import OnResult
from vldlib.tools.sweep.worker import env_with_vldlib
from vldlib.utils import write_json_atomic

REGISTRY = "slurm_jobs.json"
STATES = "slurm_states.json"  # job id -> the last state SLURM gave for it, and when (`remember_states`)
LOG_FOLDER = "slurm-logs"
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}  # a task in one of these states has left the queue for good
# reasons a task pends for good until someone changes the request or the partition
STUCK_REASONS = {"PartitionTimeLimit", "PartitionNodeLimit", "PartitionConfig", "QOSMaxWallDurationPerJobLimit",
                 "AssocMaxWallDurationPerJobLimit", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob",
                 "AssocMaxCpuPerJobLimit", "InvalidQOS", "InvalidAccount", "ReqNodeNotAvail"}
QUERY_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class TaskState:
    state: str  # SLURM's word: PENDING, RUNNING, FAILED, TIMEOUT, ...
    reason: str = ""
    elapsed_s: float | None = None


def parse_elapsed(text: str) -> float | None:
    """SLURM's `[D-]HH:MM:SS`, `MM:SS` or `M:SS.mmm` -> seconds (None if not a time)."""
    days, _, rest = text.strip().rpartition("-")
    try:
        parts = [float(p) for p in rest.split(":")]
        total = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
        return total + 86400 * int(days or 0)
    except ValueError:
        return None


def _query(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def queue_states() -> dict[str, TaskState] | None:
    """Every task of this user still in SLURM's queue, by id (`123_4` for array tasks);
    None when squeue cannot answer (controller down): then nothing is concluded from absence."""
    out = _query(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r|%M"])
    if out is None:
        return None
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            states[parts[0]] = TaskState(parts[1], parts[2] if parts[2] != "None" else "", parse_elapsed(parts[3]))
    return states


def ended_state(job_id: str) -> TaskState:
    """The final state of a task that left the queue: `scontrol` remembers it for MinJobAge
    (300 s by default) without accounting; `sacct` for as long as accounting keeps it."""
    out = _query(["scontrol", "show", "job", "-o", job_id])
    if out:
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        if "JobState" in fields:
            reason = fields.get("Reason", "")
            return TaskState(fields["JobState"], "" if reason == "None" else reason,
                             parse_elapsed(fields.get("RunTime", "")))
    out = _query(["sacct", "-n", "-P", "-X", "-o", "State,Elapsed", "-j", job_id])
    if out and out.strip():
        state, _, elapsed = out.splitlines()[0].partition("|")
        return TaskState(state.split()[0], "", parse_elapsed(elapsed))
    return TaskState("UNKNOWN", "gone from the queue; no accounting remembers it")


def remember_states(out_dir: Path, states: Mapping[str, TaskState]) -> None:
    """Keep what SLURM said of these tasks, and when, in DIR/slurm_states.json. squeue forgets a task
    when it ends and says nothing while the controller is down; this file still knows. Best effort:
    a sweep folder this user may not write is only read (a watching sweep and `--status` may both
    write it; the later write wins, and either one holds fresh answers)."""
    if not states:
        return
    known = {jid: {"state": s.state, "reason": s.reason, "elapsed_s": s.elapsed_s, "seen": seen}
             for jid, (s, seen) in remembered_states(out_dir).items()}
    now = time.time()
    known.update({jid: {"state": s.state, "reason": s.reason, "elapsed_s": s.elapsed_s, "seen": now}
                  for jid, s in states.items()})
    try:
        write_json_atomic(out_dir / STATES, known)
    except OSError:
        pass


def remembered_states(out_dir: Path) -> dict[str, tuple[TaskState, float]]:
    """job id -> (its last known TaskState, when it was seen: seconds since the epoch); entries that
    are not of that shape are left out (the file is only a memory, never trusted blindly)."""
    try:
        data = json.loads((out_dir / STATES).read_text())
    except (OSError, ValueError):
        return {}
    known = {}
    for jid, v in (data.items() if isinstance(data, dict) else ()):
        if isinstance(v, dict) and isinstance(v.get("state"), str) and isinstance(v.get("seen"), (int, float)):
            elapsed = v.get("elapsed_s")
            known[str(jid)] = (TaskState(v["state"], str(v.get("reason") or ""),
                                         elapsed if isinstance(elapsed, (int, float)) else None), float(v["seen"]))
    return known


class NotebookFailed(RuntimeError):
    """Raised by a SLURM task whose notebook failed (its error.json is written): the task then exits
    with an error and SLURM records FAILED. Returning would make SLURM say COMPLETED beside a
    failed job."""


# ----------------------------------------------------------------------------------- the task

class NotebookTask(submitit.helpers.Checkpointable):
    """What a SLURM task runs: `execute_job`, cell outputs appended to the job's log.txt.

    Checkpointable: on a time limit or preemption submitit calls `checkpoint`, which returns the
    same call, and requeues the task (at most 3 time-outs, submitit's `max_num_timeout`)."""

    def __call__(self, job: Job, kernel_name: str = KERNEL) -> dict[str, Any]:
        if job.done_path.exists():  # finished by an earlier task: leave its log and notebook alone
            return finished_outcome(job) or record(job, "done")
        job_id, task = os.environ.get("SLURM_JOB_ID", ""), slurm_task_id()
        if task and shutil.which("scontrol"):  # array tasks share the array's name until they start
            _query(["scontrol", "update", f"JobId={task}", f"JobName={job.out_dir.parent.name}:{job.name}"])
        handler = logging.FileHandler(job.log, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger = logging.getLogger("papermill")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.info("=== SLURM task %s (job %s) on %s starts %s", task, job_id, socket.gethostname(), job.name)
        try:
            outcome = execute_job(job, kernel_name)
        finally:
            logger.removeHandler(handler)
            handler.close()
        if outcome["status"] == "failed":
            raise NotebookFailed(f"job {job.name} failed: {outcome['error']}; see {outcome['notebook'] or job.log}")
        return outcome

    def checkpoint(self, job: Job, kernel_name: str = KERNEL) -> submitit.helpers.DelayedSubmission:
        with open(job.log, "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} === time limit or preemption: requeued; on restart "
                      f"finished runs are read back and training resumes from last.pt\n")
        return submitit.helpers.DelayedSubmission(self, job, kernel_name)


# ----------------------------------------------------------------------------------- launcher

class SlurmLauncher:
    """One SLURM array through submitit; each task runs `execute_job` on its node.

    Options map to submitit's: `partition`, `time` (minutes, default 24 h: submitit's own default
    is 5 min), `gpus_per_node`, `cpus`, `mem` (GB), `setup` (shell lines run before the task, such
    as "module load cuda"), `slurm_opt` (raw sbatch options such as {"account": "abc"}), `jobs`
    (the array's `%N`: at most N tasks at once; default all). `cluster="local"` runs the same path
    through submitit's local executor. Interrupting the sweep leaves SLURM tasks running (a re-run
    reattaches); tasks of the local executor are cancelled.
    """

    settle_s = 1.0  # grace for a shared file system to show a finished task's last files

    def __init__(self, jobs: int | None = None, gpus: Sequence[str] | None = None, kernel_name: str = KERNEL,
                 partition: str | None = None, time: int = 24 * 60, gpus_per_node: int | None = None,
                 cpus: int | None = None, mem: float | None = None, slurm_opt: dict[str, Any] | None = None,
                 setup: Sequence[str] | None = None, cluster: str = "slurm", poll_s: float | None = None,
                 detach: bool = False, **_: Any) -> None:
        if gpus:
            raise ValueError("--gpus hands local GPUs to local jobs; with --launcher slurm ask for "
                             "--gpus-per-node N and SLURM sets CUDA_VISIBLE_DEVICES itself")
        if jobs is not None and jobs < 1:
            raise ValueError(f"--jobs must be >= 1 (tasks of the array running at once), got {jobs}")
        if detach and cluster != "slurm":
            raise ValueError("--detach needs a SLURM cluster: tasks of submitit's local executor die with the sweep")
        self.jobs, self.kernel_name, self.cluster, self.detach = jobs, kernel_name, cluster, detach
        self.time = int(time)
        self.poll_s = poll_s if poll_s is not None else (15.0 if cluster == "slurm" else 0.5)
        self.params = {"timeout_min": self.time, "gpus_per_node": gpus_per_node, "cpus_per_task": cpus,
                       "mem_gb": mem, "slurm_partition": partition,
                       "slurm_additional_parameters": dict(slurm_opt) if slurm_opt else None,
                       "slurm_setup": list(setup) if setup else None}

    # -- submission and reattachment

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        if not jobs:
            return
        if self.cluster == "slurm" and submitit.AutoExecutor.which() != "slurm":
            raise RuntimeError("--launcher slurm: no SLURM cluster found (sbatch is not on PATH); run on the "
                               "login node, or use --launcher local (or --slurm-cluster local to try the path)")
        out_dir = jobs[0].out_dir.parent
        registry = _load_registry(out_dir)
        attached: dict[str, dict[str, Any]] = {}
        if self.cluster == "slurm" and any(j.name in registry for j in jobs):
            live = queue_states()
            if live is None:
                raise RuntimeError("squeue does not answer, so it is unknown whether this sweep's tasks still "
                                   "run; retry when the SLURM controller is back (nothing was submitted)")
            attached = {j.name: registry[j.name] for j in jobs if registry.get(j.name, {}).get("job_id") in live}
        new = [j for j in jobs if j.name not in attached]
        futures = self._submit(new, out_dir, registry) if new else []
        if attached:
            ids = ", ".join(e["job_id"] for e in attached.values())
            print(f"sweep: reattached to {len(attached)} queued or running SLURM task(s) ({ids}); submitted "
                  f"{len(new)}", file=sys.stderr)
        if self.cluster != "slurm":
            return self._watch_futures(dict(zip(futures, new)), on_result)
        return self._watch({j.name: (j, registry[j.name]) for j in jobs}, on_result)

    def _submit(self, jobs: Sequence[Job], out_dir: Path, registry: dict[str, Any]) -> list[submitit.Job]:
        executor = submitit.AutoExecutor(folder=out_dir / LOG_FOLDER / "%j", cluster=self.cluster)
        executor.update_parameters(name=f"sweep:{out_dir.name}", slurm_array_parallelism=self.jobs or len(jobs),
                                   **{k: v for k, v in self.params.items() if v is not None})
        for job in jobs:
            job.error_path.unlink(missing_ok=True)  # an old failure must not pass for this run's
            write_spec(job, self.kernel_name, launcher="slurm")
        old_env = dict(os.environ)
        os.environ.update(env_with_vldlib(os.environ))  # sbatch and the local executor copy our env
        try:
            with executor.batch():
                futures = [executor.submit(NotebookTask(), job, self.kernel_name) for job in jobs]
        finally:
            os.environ.clear()
            os.environ.update(old_env)
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        for job, fut in zip(jobs, futures):
            entry = {"job_id": str(fut.job_id), "stdout": str(fut.paths.stdout), "stderr": str(fut.paths.stderr),
                     "submitted": now, "cluster": self.cluster}
            registry[job.name] = entry
            write_spec(job, self.kernel_name, launcher="slurm", slurm=entry)
            _link_logs(job, entry)
        write_json_atomic(out_dir / REGISTRY, registry)
        return futures

    # -- watching

    def _watch(self, tracked: dict[str, tuple[Job, dict[str, Any]]], on_result: OnResult) -> None:
        """Report each task's state changes until every task has left the queue (or once, detached)."""
        waiting, shown, warned = dict(tracked), {}, set()
        out_dir = next(iter(tracked.values()))[0].out_dir.parent if tracked else None
        try:
            while waiting:
                live = queue_states()
                if live is None:  # absence proves nothing now
                    print(f"sweep: squeue did not answer; asking again in {self.poll_s:.0f} s", file=sys.stderr)
                    if self.detach:
                        return
                    time.sleep(self.poll_s)
                    continue
                remember_states(out_dir, {e["job_id"]: live[e["job_id"]] for _, e in waiting.values()
                                          if e["job_id"] in live})
                for name, (job, entry) in list(waiting.items()):
                    jid, q = entry["job_id"], live.get(entry["job_id"])
                    if q is None:
                        waiting.pop(name)
                        on_result(self._ended(job, entry))
                        continue
                    status = "running" if q.state in RUNNING else "pending"
                    if shown.get(name) != (status, q.state, q.reason):
                        shown[name] = (status, q.state, q.reason)
                        on_result(record(job, status, None, "", entry["stderr"], job_id=jid, state=q.state,
                                         reason=q.reason, elapsed_s=q.elapsed_s))
                    if q.state == "PENDING" and (q.reason in STUCK_REASONS or "WallDuration" in q.reason) \
                            and (jid, q.reason) not in warned:
                        warned.add((jid, q.reason))
                        print(f"sweep: warning: SLURM task {jid} ({job.name}) pends with reason {q.reason}: it may "
                              f"never start. If the partition's time limit is below --time {self.time} (see "
                              f"`sinfo -o '%P %l'`), cancel it (scancel {jid.split('_')[0]}) and run again with a "
                              f"lower --time.", file=sys.stderr)
                if self.detach:
                    return
                if waiting:
                    time.sleep(self.poll_s)
        finally:
            if waiting and not self.detach:
                ids = " ".join(sorted({e["job_id"].split("_")[0] for _, e in waiting.values()}))
                print(f"sweep: {len(waiting)} SLURM task(s) keep running: run the same command to reattach, "
                      f"`sweep --status DIR` to look, or `scancel {ids}` to stop them", file=sys.stderr)

    def _ended(self, job: Job, entry: dict[str, Any]) -> dict[str, Any]:
        """The record of a task that left the queue; one without a result is failed, with error.json."""
        final = ended_state(entry["job_id"])
        if final.state != "UNKNOWN":
            remember_states(job.out_dir.parent, {entry["job_id"]: final})  # reported: a re-run says skipped
        scheduler = dict(job_id=entry["job_id"], state=final.state, reason=final.reason, elapsed_s=final.elapsed_s)
        for attempt in range(3):  # a shared file system may show the task's last file a moment late
            outcome = finished_outcome(job, **scheduler)
            if outcome is not None:
                if outcome["status"] == "failed" and final.state not in ("COMPLETED", "UNKNOWN"):
                    outcome["error"] += f" [SLURM {final.state}; see {entry['stderr']}]"  # the kernel died of it
                return outcome
            time.sleep(self.settle_s * (attempt + 1))
        why = f" ({final.reason})" if final.reason else ""
        error = (f"SLURM task {entry['job_id']} ended {final.state}{why} without a result: it was stopped before "
                 f"the notebook finished (out of memory, time limit, node failure, scancel or kill); see "
                 f"{entry['stderr']}")
        write_json_atomic(job.error_path, {"error": error, "state": final.state, "reason": final.reason,
                                           "job_id": entry["job_id"], "log": entry["stderr"],
                                           "stdout": entry["stdout"], "wall_s": None, "params": job.params})
        return record(job, "failed", None, error, Path(entry["stderr"]), **scheduler)

    def report_finished(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        """Give the finished `jobs` (those with `done`) their SLURM job id and state. One whose end no
        sweep has reported yet (it finished while the sweep was detached or killed) is reported
        `done` now, with the state SLURM gives; the others stay `skipped`, with the state remembered.
        Jobs that another launcher finished are left as they are. While the controller does not
        answer, the unreported ones are `done` without a state (asking scontrol would take long)."""
        if self.cluster != "slurm" or not jobs:
            return
        out_dir = jobs[0].out_dir.parent
        registry, remembered = _load_registry(out_dir), remembered_states(out_dir)
        ids = {job.name: registry.get(job.name, {}).get("job_id", "") for job in jobs}
        ours = [job for job in jobs if ids[job.name] and finished_by(job) == ids[job.name]]
        reported = {job.name for job in ours if remembered.get(ids[job.name], (TaskState(""),))[0].state in ENDED}
        answers = queue_states() is not None if len(reported) < len(ours) else False
        ended = {}
        for job in ours:
            jid = ids[job.name]
            if job.name in reported:
                final, status = remembered[jid][0], "skipped"
            else:
                final, status = ended_state(jid) if answers else TaskState(""), "done"
                if final.state in ENDED:
                    ended[jid] = final
            outcome = finished_outcome(job, job_id=jid, state=final.state, elapsed_s=final.elapsed_s)
            if outcome is not None:
                on_result({**outcome, "status": status})
        remember_states(out_dir, ended)

    def _watch_futures(self, running: dict[submitit.Job, Job], on_result: OnResult) -> None:
        """submitit's local executor: its jobs are child processes, watched through their futures."""
        try:
            while running:
                time.sleep(self.poll_s)
                for fut in [f for f in running if f.done()]:
                    job = running.pop(fut)
                    scheduler = dict(job_id=str(fut.job_id), state=str(fut.state))
                    on_result(finished_outcome(job, **scheduler) or record(
                        job, "failed", None, f"task {fut.job_id} ended {fut.state} without a result; see "
                        f"{fut.paths.stderr}", Path(fut.paths.stderr), **scheduler))
        finally:
            for fut, job in running.items():
                fut.cancel(check=False)
                on_result(record(job, "interrupted"))


def _load_registry(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / REGISTRY).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def finished_by(job: Job) -> str:
    """The SLURM task id that wrote the job's `done` ("" when none did, or an older sweep wrote it):
    the registry keeps the last submission only, and another launcher may have finished the job."""
    try:
        done = json.loads(job.done_path.read_text())
    except (OSError, ValueError):
        return ""
    return str(done.get("slurm_job_id") or "") if isinstance(done, dict) else ""


def _link_logs(job: Job, entry: dict[str, Any]) -> None:
    """JOB/slurm.out and JOB/slurm.err point at the task's logs under DIR/slurm-logs/."""
    for name, target in (("slurm.out", entry["stdout"]), ("slurm.err", entry["stderr"])):
        link = job.out_dir / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(target, job.out_dir))
