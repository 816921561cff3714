"""A local worker process: `python -m vldlib.tools.sweep.worker JOBDIR/job.json` runs one job.

It dies with the sweep (even a `kill -9`ed one), taking its kernel along, so that a restarted
sweep never runs a job beside its orphan.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from vldlib.tools.sweep.execute import execute_job
from vldlib.tools.sweep.jobs import KERNEL, job_from_json


def _children(pid: int) -> list[int]:
    """Child PIDs of `pid`, from /proc (Linux); empty elsewhere."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            kids.append(int(stat.parent.name))
    return kids


def _die(*_: Any) -> None:
    """Stop this worker *and its kernel* at once. The kernel runs in its own session and would
    only notice its parent's death a second later, time enough to finish a cell whose side
    effects a restart would then repeat."""
    for kid in _children(os.getpid()):
        for kill in (os.killpg, os.kill):  # the kernel leads its own process group
            try:
                kill(kid, signal.SIGKILL)
            except OSError:
                pass
    os._exit(143)


def _watch_parent() -> None:
    """Die with the sweep, even a `kill -9`ed one: a restart must not run a job beside its orphan."""
    parent = os.getppid()

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        _die()

    threading.Thread(target=loop, daemon=True).start()


def worker_main(job_json: str) -> int:
    """Entry point of a local worker process: `python -m vldlib.tools.sweep.worker JOBDIR/job.json`."""
    signal.signal(signal.SIGTERM, _die)  # how the sweep stops its workers on Ctrl-C / kill
    _watch_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    spec = json.loads(Path(job_json).read_text())
    job = job_from_json(spec)
    print(f"vldlib sweep job {job.name}: pid {os.getpid()} on {socket.gethostname()}, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", file=sys.stderr, flush=True)
    return 0 if execute_job(job, spec.get("kernel_name", KERNEL))["status"] == "done" else 1


def env_with_vldlib(env: Mapping[str, str]) -> dict[str, str]:
    """Workers and kernels import vldlib even when it is not pip-installed."""
    root = str(Path(__file__).resolve().parents[3])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join([root] + [p for p in parts if p != root])}


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1]))
