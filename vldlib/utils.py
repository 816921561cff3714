"""Small helpers every module needs: stable seeds, atomic writes, JSON lines."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def seed_hash(*args: Any) -> int:
    """A 31-bit seed derived from any printable arguments: DomainBed's `misc.seed_hash`, digit for digit.

    DomainBed's trick: seeds that depend on *which* random thing is drawn (split of domain 2,
    batch order of domain 0, ...) keep every random choice independent of every other knob, so
    changing the learning rate never changes the data split. The formula is DomainBed's own (the
    whole md5 modulo 2**31; `str` of the argument tuple), so `seed_hash(trial_seed, env)` seeds the
    same in/out split as DomainBed and the paper's code; every other seed uses the same one rule.
    """
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def config_hash(d: dict[str, Any], n: int = 10) -> str:
    """Short stable hash of a JSON-able dict (key order does not matter)."""
    return hashlib.md5(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:n]


class StopRequested(Exception):
    """The caller asked a long computation to stop (the explorer's stop button).

    Raised from wherever the work is (checking images, computing cached trunk outputs, waiting for
    a lock) by `check_stop`, and caught by `vldlib.loop.train.train`, which then returns the run
    unfinished and resumable. An exception, so that a stop leaves any depth at once without every
    layer passing a flag back up; whatever was finished before it is kept by the layer it passes."""


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    """Raise `StopRequested` when `should_stop` (e.g. a threading.Event's is_set) says so; None never stops."""
    if should_stop is not None and should_stop():
        raise StopRequested("stopped by the caller")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never half of it, even if
    the process is killed mid-write (rename is atomic on POSIX within one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; others sharing the folder must read it
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class FileLock:
    """An exclusive `fcntl.flock` on one file, with a line saying who holds it.

    The one locking primitive of vldlib (a run being trained, a sweep's folder, a cache file being
    computed). flock, because the kernel releases it when its holder exits, even by kill -9: a
    stale lock never blocks anyone. Processes started by the holder inherit it with its descriptor.
    Use it as a context manager: the lock is released and the file closed on exit.
    """

    def __init__(self, path: str | os.PathLike, mode: int = 0o644) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, mode)

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False (at once) when another process holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self, should_stop: Callable[[], bool] | None = None, poll: float = 0.1) -> None:
        """Take the lock, waiting for its holder to release it or to exit. With `should_stop`, the
        wait polls (every `poll` s) and gives up with `StopRequested` when asked: a stop pressed
        while another process holds the lock is not deaf until that process finishes."""
        if should_stop is None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return
        while not self.try_acquire():
            check_stop(should_stop)
            time.sleep(poll)

    def holder(self) -> str:
        """What the holder wrote with `set_holder` ("" when nothing yet)."""
        return os.pread(self.fd, 4096, 0).decode(errors="replace").strip()

    def set_holder(self, text: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def close(self) -> None:
        """Release the lock (if held) and close the file."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def computed_once(path: str | os.PathLike, should_stop: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold the lock PATH.lock while computing the file `path`, so that processes asking for the
    same cache file at once (runs trained in parallel) compute it once: the others wait, then find
    it written. Taking it clears the temporaries of writers killed mid-write. `should_stop`: see
    `FileLock.acquire`."""
    with FileLock(f"{path}.lock", mode=0o666) as lock:  # a shared cache: others may lock it too
        lock.acquire(should_stop)
        remove_orphaned_temporaries(path)
        yield


def remove_orphaned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the `atomic_path` temporaries of `path` (`.NAME.*.tmp` beside it) that a killed
    writer left; return them. Call it only while holding the lock under which `path` is written:
    then no live process is writing one, and each is dead space (a half-written image cache can be
    gigabytes)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob's special characters ([, *, ?) matched literally."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def current_umask() -> int:
    """The process umask, read from /proc without setting it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON record as one line, flushed and fsynced.

    A kill can at worst leave a partial *last* line, which `read_jsonl` drops.
    """
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A run's JSON file ({} when absent); a damaged one is an error that says how to recover."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete the run directory to recompute it") from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read JSON lines, ignoring a truncated final line left by a killed writer."""
    path = Path(path)
    if not path.exists():
        return []
    return parse_jsonl(path.read_text(), path)


def parse_jsonl(text: str, path: str | os.PathLike) -> list[Any]:
    """The JSON lines of `text` (read from `path`, named in errors); a truncated final line, left
    by a killed writer, is dropped."""
    records = []
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # half-written last line of a killed run
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; the file is corrupt. "
                             f"Delete the run directory to recompute it.") from None
    return records


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_bounded_text(path: str | os.PathLike, max_bytes: int) -> str | None:
    """The text of `path` (None when absent), read only if it is a regular file of at most
    `max_bytes`: a FIFO would hang the reader, /dev/zero or a huge file would exhaust its memory.
    Anything else is a ValueError naming the file, what it is and the fix."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    kind = next((name for test, name in _KINDS if test(st.st_mode)), None)
    if kind is not None or not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file ({kind or 'a special file'}); replace it with the file "
                         f"vldlib wrote, or delete it")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes / 2**20:g} MB, more than vldlib writes there; "
                         f"not a file of a run: delete it (or the run folder)")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
