"""DIR/.sweep.lock keeps two sweeps out of the same folder."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from vldlib.utils import FileLock


class SweepLockedError(RuntimeError):
    pass


class SweepLock:
    """The lock DIR/.sweep.lock (`utils.FileLock`), released by the kernel when its holders exit.

    Workers inherit the lock, so if the sweep itself was killed (-9), a restart waits up to
    `wait_s` for its dying workers rather than running their jobs a second time beside them.
    """

    def __init__(self, out_dir: str | os.PathLike, wait_s: float = 30.0) -> None:
        self.path = Path(out_dir) / ".sweep.lock"
        self.wait_s = wait_s
        self.lock: FileLock | None = None

    @property
    def fd(self) -> int | None:
        """The lock's descriptor, for the workers to inherit."""
        return self.lock.fd if self.lock else None

    def __enter__(self) -> "SweepLock":
        lock = FileLock(self.path)
        deadline = None
        unsigned_until = time.time() + 2.0
        while not lock.try_acquire():
            info = dict(kv.split("=", 1) for kv in lock.holder().split("\n") if "=" in kv)
            if not info and time.time() < unsigned_until:  # a sweep started at the same moment:
                time.sleep(0.05)  # it holds the lock but has not written its PID yet
                continue
            if _alive(info) or (deadline is not None and time.time() > deadline):
                lock.close()
                pid = info.get("pid", "?")
                raise SweepLockedError(
                    f"another sweep holds {self.path} (PID {pid} on {info.get('host', '?')}, started "
                    f"{info.get('started', '?')}: {info.get('command', '?')}). Wait for it to finish or "
                    f"stop it (kill {pid}); the lock frees itself when that process and its jobs exit.")
            deadline = deadline or time.time() + self.wait_s  # holder died: its workers are exiting
            time.sleep(0.2)
        lock.set_holder(f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                        f"started={time.strftime('%Y-%m-%dT%H:%M:%S')}\ncommand={' '.join(sys.argv)}\n")
        self.lock = lock
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _alive(info: Mapping[str, str]) -> bool:
    """Whether the sweep that wrote the lock still runs (assumed so on another host or if unknown)."""
    if info.get("host") != socket.gethostname() or not info.get("pid", "").isdigit():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
