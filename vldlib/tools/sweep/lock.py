"""DIR/.sweep.lock keeps two sweeps out of the same folder."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping


class SweepLockedError(RuntimeError):
    pass


class SweepLock:
    """Exclusive `fcntl.flock` on DIR/.sweep.lock, released by the kernel when its holders exit.

    Workers inherit the lock, so if the sweep itself was killed (-9), a restart waits up to
    `wait_s` for its dying workers rather than running their jobs a second time beside them.
    """

    def __init__(self, out_dir: str | os.PathLike, wait_s: float = 30.0) -> None:
        self.path = Path(out_dir) / ".sweep.lock"
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        unsigned_until = time.time() + 2.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                info = dict(kv.split("=", 1) for kv in holder.split("\n") if "=" in kv)
                if not info and time.time() < unsigned_until:  # a sweep started at the same moment:
                    time.sleep(0.05)  # it holds the lock but has not written its PID yet
                    continue
                if _alive(info) or (deadline is not None and time.time() > deadline):
                    os.close(fd)
                    pid = info.get("pid", "?")
                    raise SweepLockedError(
                        f"another sweep holds {self.path} (PID {pid} on {info.get('host', '?')}, started "
                        f"{info.get('started', '?')}: {info.get('command', '?')}). Wait for it to finish or "
                        f"stop it (kill {pid}); the lock frees itself when that process and its jobs exit.")
                deadline = deadline or time.time() + self.wait_s  # holder died: its workers are exiting
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                       f"started={time.strftime('%Y-%m-%dT%H:%M:%S')}\ncommand={' '.join(sys.argv)}\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


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
