"""A run's folder: its name, its lock, its checkpoints, and the errors that say how to recover.

Run directory: config.json, meta.json, records.jsonl (append-only), best.pt, last.pt (or final.pt),
done. last.pt, the state a killed run resumes from, leaves out the frozen parameters until the
run's last evaluation (`resume_state`).
Every write is atomic (`vldlib.utils.atomic_path`) or an fsynced append, so a killed run leaves
either the old file or the new one; `writing` turns a failed write into an error naming the file,
the free space and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vldlib.config import TrainConfig, UsageError
from vldlib.data.registry import benchmark_label
from vldlib.evaluate.scores import expected_eval_steps
from vldlib.utils import FileLock, atomic_path, config_hash


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; a failure record was written."""


class RunOutputError(RuntimeError):
    """Writing into the run directory failed: disk full, read-only, a file where a folder should be."""


class ResumeRefused(RuntimeError):
    """The run folder cannot be resumed as it is (records lost, data changed); nothing was written."""


def _free_space(path: Path) -> str:
    """' (N MB free on that disk)': torch reports a full disk as a cryptic C++ error; this says it plainly."""
    try:
        existing = next(p for p in [path, *path.parents] if p.is_dir())
        return f" ({shutil.disk_usage(existing).free / 2**20:.0f} MB free on that disk)"
    except (OSError, StopIteration):
        return ""


@contextlib.contextmanager
def writing(path: Path, *also: type[Exception]) -> Iterator[None]:
    """Turn an OSError (or `also`) while writing `path` into a RunOutputError that names it and
    the fix. Every write is atomic or an fsynced append, so what the run saved before is intact
    and the same command resumes once the cause is gone."""
    try:
        yield
    except RunOutputError:
        raise
    except (OSError, *also) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise RunOutputError(f"cannot write {path}: {reason}{_free_space(path)}. Free disk space, or choose a "
                             f"writable --out (a folder, not a file); the records and checkpoints saved before are intact: "
                             f"run the same command again to resume.") from e


@contextlib.contextmanager
def run_lock(run_dir: Path, should_stop: Callable[[], bool] | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on RUN_DIR/.lock while training; yield whether another process held it
    first (then that process has finished or died, and the run's files must be read again).
    `should_stop`: the wait gives up with `StopRequested` when asked (`FileLock.acquire`).

    `utils.FileLock`: the kernel releases it when its holder exits, even by kill -9, so a stale lock
    never blocks a resume.
    """
    path = run_dir / ".lock"
    with writing(path):
        lock = FileLock(path)
    with lock:
        waited = not lock.try_acquire()
        if waited:
            print(f"[vldlib] {run_dir} is being trained by {lock.holder() or 'a process'}; waiting for it to "
                  f"finish", flush=True)
            lock.acquire(should_stop)
        with writing(path):  # a disk already full fails here, the first write of a run
            lock.set_holder(f"PID {os.getpid()} on {platform.node()}")
        yield waited


def run_dir_for(cfg: TrainConfig) -> Path:
    """outputs/runs/<benchmark>-te<t>-p<dropout>-lr<lr>-s<seed>-<hash of every result-changing knob>."""
    if cfg.run_name:
        run_dir = Path(cfg.out) / cfg.run_name
        if os.path.realpath(run_dir.parent) != os.path.realpath(cfg.out) or cfg.run_name in (".", ".."):
            raise UsageError(f"run_name {cfg.run_name!r} must be one plain folder name: the run folder is "
                             f"created inside --out {cfg.out}")
        return run_dir
    bench = benchmark_label(cfg.benchmark)
    te = "+".join(map(str, cfg.test_envs))
    head = "" if cfg.head == "linear" else f"-{cfg.head}"
    name = f"{bench}-te{te}-p{cfg.dropout:g}-lr{cfg.lr:g}-s{cfg.seed}{head}-{config_hash(cfg.identity())}"
    return Path(cfg.out) / name


def save_checkpoint(path: Path, state: dict) -> None:
    # torch.save reports a failed write (disk full) as a RuntimeError from its C++ writer
    with writing(path, RuntimeError), atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What of `module`'s state dict training can change: every trained parameter and every
    buffer. last.pt, written at each evaluation to resume from, holds this: the frozen parameters
    (13 of Lite0's 15 MB with conv_head trained, twice with the weight average) are the start's,
    which a resume builds again (`build_run_net`, seeded) and checks against `frozen_fingerprint`.
    With the whole weights, last.pt was 28 MB, written and fsynced 7 times a quickstart run: 3% of
    its time (`python -m vldlib bench --run-split`); now 5 MB."""
    return {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()
            if not (isinstance(v, torch.nn.Parameter) and not v.requires_grad)}


def frozen_fingerprint(module: torch.nn.Module) -> str:
    """md5 of the names and values of `module`'s frozen parameters (those `resume_state` leaves out)."""
    h = hashlib.md5()
    for k, v in sorted(module.state_dict(keep_vars=True).items()):
        if isinstance(v, torch.nn.Parameter) and not v.requires_grad:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def restore_state(module: torch.nn.Module, state: dict[str, torch.Tensor], fingerprint: str | None,
                  path: Path) -> None:
    """Load a checkpoint's state into `module`: the whole state dict (best.pt, final.pt, a last.pt
    written before checkpoints left out the frozen parameters), or a `resume_state` over the
    module's start, whose frozen parameters must then match `fingerprint` (`frozen_fingerprint` of
    the run's start; None: checked elsewhere, e.g. the weight average, a copy of the checked network)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    frozen = {k for k, v in module.state_dict(keep_vars=True).items()
              if isinstance(v, torch.nn.Parameter) and not v.requires_grad}
    if unexpected or not set(missing) <= frozen:
        odd = sorted(unexpected)[:3] + sorted(set(missing) - frozen)[:3]
        raise RuntimeError(f"{path}: its weights do not fit this run's network ({', '.join(odd)} ...): it was "
                           f"written for another network; delete it to restart the run from scratch.")
    if missing and fingerprint is not None and fingerprint != frozen_fingerprint(module):
        raise ResumeRefused(f"{path} holds the trained part of the network only, and the frozen part built again "
                            f"now differs from the one the run started from (another weights file, or another "
                            f"timm or vldlib version): resuming would train on another network. Restore what "
                            f"built the start, or delete {path.parent} to train the run again.")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain tensors and values: `weights_only=True` refuses pickles that run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"{path}: refused: it is a pickle that needs code to load ({first}). vldlib "
                           f"checkpoints hold only tensors and plain values, so this file was not written by "
                           f"vldlib or was altered; delete it to restart the run from scratch.") from None
    except Exception as e:
        raise RuntimeError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e}). It is not a vldlib "
                           f"checkpoint or it is damaged; delete it to restart the run from scratch.") from e


def ends_with_newline(path: Path) -> bool:
    """False when the last line of `path` was cut by a kill (read_jsonl ignores such a line)."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------- resuming safely
def check_records_reach(records_path: Path, records: list[dict], cfg: TrainConfig, step: int) -> None:
    """Refuse to resume from a checkpoint at `step` when records.jsonl lacks evaluations before it
    (deleted, truncated, edited): the run would finish with a partial trajectory that a report
    reads as complete, and the lost evaluations cannot be recomputed from last.pt."""
    have = {r.get("step") for r in records if r.get("type", "eval") == "eval"}
    missing = [s for s in expected_eval_steps(cfg.eval_every, cfg.steps, step) if s not in have]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        what = "is missing" if not records_path.exists() else f"lacks the evaluations at step(s) {shown}"
        raise ResumeRefused(f"{records_path} {what}, but last.pt is at step {step}: the records were lost "
                            f"or damaged, and resuming would finish the run with a partial trajectory. Restore "
                            f"records.jsonl from a copy, or delete {records_path.parent} to train the run again.")


def data_fingerprint(bench: Any) -> dict:
    """What a run was trained on: a hash of the sorted (domain/class/file, size) list of the images it
    loaded, and the count per domain. Taken from the files themselves, not a benchmark's manifest,
    so images added, removed or replaced (a new size) after a build are seen too."""
    h = hashlib.sha256()
    counts = {}
    for domain, samples in zip(bench.domains, bench.samples):
        counts[domain] = len(samples)
        for path, _label in sorted(samples):
            p = Path(path)
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            rel = os.path.relpath(p, bench.root)
            h.update(f"{rel}\0{size}\n".encode())
    return {"hash": h.hexdigest()[:16], "counts": counts}


def check_same_data(run_dir: Path, meta: dict, now: dict) -> None:
    """Refuse to resume a run whose data changed since it started (meta.json's fingerprint): its
    splits, batches and checkpoint's classifier would no longer match, and meta.json would be
    rewritten with sizes the earlier records were not computed on."""
    before = meta.get("data_fingerprint") if isinstance(meta, dict) else None
    if not isinstance(before, dict) or before.get("hash") == now["hash"]:
        return
    old, new = before.get("counts") or {}, now["counts"]
    changes = [f"{d}: {old.get(d, 0)} -> {new.get(d, 0)} images" for d in sorted(set(old) | set(new))
               if old.get(d) != new.get(d)] or ["same counts per domain, but files were renamed or replaced"]
    raise ResumeRefused(f"{run_dir}: the data changed since this run started ({'; '.join(changes)}). Resuming "
                        f"would mix two datasets in one run. Restore the data as it was, or train the new data "
                        f"into a fresh run (delete {run_dir}, or use another --out).")
