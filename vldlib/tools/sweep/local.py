"""Launchers are plain objects with one method, `launch(jobs, on_result)`, so tests and notebooks
can hand `run_sweep` their own. This module holds the local ones; `slurm` holds SLURM's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

from vldlib.tools.sweep.jobs import KERNEL, Job, finished_outcome, record, write_spec
from vldlib.tools.sweep.worker import env_with_vldlib

OnResult = Callable[[dict[str, Any]], None]


class Launcher(Protocol):
    """A launcher may also have `report_finished(jobs, on_result)`: the runner hands it the jobs that
    are done before it launches anything, to report what it knows of them (SlurmLauncher: their job
    id and state, and `done` for those that finished while no sweep watched)."""

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        """Run `jobs`, calling `on_result(record)` as each one ends; on KeyboardInterrupt, stop them."""


class DummyLauncher:
    """Runs nothing; remembers what it was asked to launch (tests, and a look at the plan)."""

    def __init__(self, **_: Any) -> None:
        self.launched: list[Job] = []

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        for job in jobs:
            self.launched.append(job)
            on_result(record(job, "not run"))


class LocalLauncher:
    """`jobs` worker processes on this machine; with `gpus`, each job sees one GPU.

    GPUs are handed out round-robin to the job slots (`--gpus 0,1 --jobs 4` puts two jobs on each
    GPU). Each worker runs in its own session, so Ctrl-C reaches only the sweep, which then stops
    the workers itself; workers inherit the sweep lock, so a restart waits until they are gone.
    """

    def __init__(self, jobs: int | None = None, gpus: Sequence[str] | None = None, kernel_name: str = KERNEL,
                 lock_fd: int | None = None, poll_s: float = 0.2, **_: Any) -> None:
        if jobs is None:
            jobs = len(gpus) if gpus else 1
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        gpus = [str(g) for g in gpus or []]
        self.slots: list[str | None] = [gpus[i % len(gpus)] for i in range(jobs)] if gpus else [None] * jobs
        self.kernel_name, self.lock_fd, self.poll_s = kernel_name, lock_fd, poll_s

    def _start(self, job: Job, gpu: str | None) -> subprocess.Popen:
        write_spec(job, self.kernel_name, launcher="local", gpu=gpu)
        job.error_path.unlink(missing_ok=True)
        env = env_with_vldlib(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(job.log, "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "vldlib.tools.sweep.worker", str(job.spec_path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    pass_fds=(self.lock_fd,) if self.lock_fd is not None else ())

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        pending = list(reversed(jobs))
        free = list(reversed(self.slots))
        running: dict[subprocess.Popen, tuple[Job, str | None, float]] = {}
        try:
            while pending or running:
                while pending and free:
                    job, gpu = pending.pop(), free.pop()
                    running[self._start(job, gpu)] = (job, gpu, time.time())
                time.sleep(self.poll_s)
                for proc in [p for p in running if p.poll() is not None]:
                    job, gpu, t0 = running.pop(proc)
                    free.append(gpu)
                    on_result(_read_outcome(job, proc.returncode, time.time() - t0))
        finally:
            _stop(running)
            for proc, (job, _, t0) in running.items():  # empty unless interrupted
                done = job.done_path.exists()
                on_result(_read_outcome(job, proc.returncode, 0) if done else record(job, "interrupted"))


def _stop(running: Mapping[subprocess.Popen, Any], grace_s: float = 5.0) -> None:
    for proc in running:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace_s
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _read_outcome(job: Job, returncode: int, wall_s: float) -> dict[str, Any]:
    """The record of a finished worker, from the files it left (the only channel that survives)."""
    return finished_outcome(job) or record(job, "failed", wall_s, f"worker exited with code {returncode} "
                                           f"before the notebook finished; see {job.log}")
