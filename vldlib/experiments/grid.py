"""Run a grid of training runs from a notebook: each run resumable, finished ones skipped.

Notebooks describe an experiment as a base `TrainConfig` plus axes (dropout rates, held-out
domains, seeds, ...); this module expands and runs them, one after the other or several at once
in worker processes, with one progress bar, and keeps going when a run fails (a diverged run is
a result, recorded in its folder).

>>> base = TrainConfig(benchmark="emoji", backbone="efficientnet_lite0.offline")   # doctest: +SKIP
>>> cfgs = grid(base, dropout=[0.0, 0.9], test_envs=[[0], [1], [2]], seed=[0, 1, 2])  # doctest: +SKIP
>>> run_dirs = run_grid(cfgs)                   # on a CPU: one run per core at once  # doctest: +SKIP
>>> run_dirs = run_grid(cfgs, parallel_runs=6)  # six processes sharing one GPU        # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import multiprocessing
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from vldlib.config import TrainConfig
from vldlib.data.registry import is_benchmark_path
from vldlib.loop import TrainingDiverged, resolve_device, run_dir_for
from vldlib.loop.device import RUN_MEMORY_MB, usable_cores, usable_memory_mb
from vldlib.loop.train import train
from vldlib.paths import resolve


def grid(base: TrainConfig, **axes: Iterable[Any]) -> list[TrainConfig]:
    """Every combination of the axes applied to `base` (the last axis varies fastest)."""
    names = list(axes)
    configs = []
    for values in itertools.product(*(list(axes[n]) for n in names)):
        cfg = dataclasses.replace(base, **dict(zip(names, values)))
        cfg.validate()
        configs.append(cfg)
    return configs


def steps_for(steps: int | dict, rate: float) -> int:
    """The steps of a run at dropout `rate`: one number for every rate, or a mapping per rate (90%
    dropout fits more slowly, so it may need more steps to plateau; the paper's section 3)."""
    if not isinstance(steps, dict):
        return int(steps)
    found = steps.get(rate, steps.get(str(rate)))
    if found is None:
        raise ValueError(f"steps gives no value for dropout rate {rate}: {steps}")
    return int(found)


def with_paths(cfg: TrainConfig) -> TrainConfig:
    """Resolve data_dir/out (and a benchmark given as a relative path) against the project root."""
    bench = cfg.benchmark
    if is_benchmark_path(bench):
        bench = str(resolve(bench))
    return dataclasses.replace(cfg, data_dir=str(resolve(cfg.data_dir)), out=str(resolve(cfg.out)), benchmark=bench)


def parallel_runs_for(configs: list[TrainConfig], parallel_runs: int | None) -> int:
    """How many runs to train at once. None: on the CPU, as many as the usable cores hold (divided
    by each run's torch threads) and the usable memory holds (RUN_MEMORY_MB a run), both what this
    process may use (`usable_cores`, `usable_memory_mb`: a SLURM task of 1 CPU trains one run, not
    one per core of the node); one on an accelerator (several processes can share a GPU: say so
    with a number). Never more than there are runs."""
    if parallel_runs is not None:
        if int(parallel_runs) < 1:
            raise ValueError(f"parallel_runs={parallel_runs}: give 1 or more (None: one per CPU core)")
        return max(1, min(int(parallel_runs), len(configs)))
    if not configs or resolve_device(configs[0].device).type != "cpu":
        return 1
    threads = max(1, configs[0].num_threads or 1)
    by_memory = int(usable_memory_mb() // RUN_MEMORY_MB)
    return max(1, min(usable_cores() // threads, by_memory, len(configs)))


def _train_one(cfg: TrainConfig) -> tuple[Path, str, float]:
    """One run of the grid: (run folder, "done" or the failure, seconds). Module level, so that a
    worker process can import it."""
    t_run = time.perf_counter()
    try:
        return train(cfg), "done", time.perf_counter() - t_run
    except TrainingDiverged as e:
        return run_dir_for(cfg), f"FAILED: {e}", time.perf_counter() - t_run


def _default_start_method() -> None:
    """In a worker: the platform's own way to start processes again. A spawned process inherits
    "spawn" from its parent, and then each evaluation's DataLoader would start its workers as fresh
    interpreters that import torch (seconds each; minutes per run with several runs on one machine)."""
    multiprocessing.set_start_method(None, force=True)


def _worker_start(parent_pid: int, started: Any) -> None:
    """Initializer of a worker process: start children the platform's way, die with the parent,
    and say which run each task is (`_train_reported`)."""
    global _STARTED
    _default_start_method()
    _die_with_parent(parent_pid)
    _STARTED = started


_STARTED: Any = None  # in a worker: the queue on which it says (its pid, the run's index) at each start
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the process that started it ends, however it ends (kill -9, `timeout`,
    a dead notebook kernel): otherwise it is reparented to init and holds about a GB for ever.
    Linux delivers SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG); a thread watching the
    parent pid does it elsewhere, and covers a parent that died before the prctl."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no libc prctl: the watchdog alone
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="vldlib-parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGKILL)


def _train_reported(train_one: Callable, i: int, cfg: TrainConfig) -> tuple[Path, str, float]:
    """Run `train_one(cfg)` in a worker, first telling the parent that this process trains run i: if
    the process dies, the parent can say which run it was."""
    if _STARTED is not None:
        _STARTED.put((os.getpid(), i))
    return train_one(cfg)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (if not running yet) without its "leaked semaphore"
    warning: it prints that after this process was killed, when it removes the semaphores of the
    dead pool, which is its job and nothing to act on."""
    saved = list(sys.warnoptions)
    sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = saved


def _signal_name(exitcode: int | None) -> str:
    """"SIGKILL (exit code -9)" for a process ended by a signal, "exit code 3" otherwise."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            pass
    return f"exit code {exitcode}" if exitcode is not None else "an unknown exit status"


class _Pool:
    """A process pool that knows which run each of its processes trains, so that a dead process is
    reported by its run and its signal, not as a bare BrokenProcessPool."""

    def __init__(self, n: int, train_one: Callable) -> None:
        ctx = multiprocessing.get_context("spawn")
        _quiet_resource_tracker()
        self.started = ctx.SimpleQueue()
        self.train_one = train_one
        self.executor = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_start,
                                            initargs=(os.getpid(), self.started))
        self.processes = self.executor._processes  # pid -> Process; kept to read exit codes after a break
        self.runs: dict[int, int] = {}  # pid -> index of the run it trains (the last one it started)

    def submit(self, i: int, cfg: TrainConfig) -> Future:
        return self.executor.submit(_train_reported, self.train_one, i, cfg)

    def note_started(self) -> None:
        """Read which process started which run (read as runs finish, so the pipe never fills)."""
        while not self.started.empty():
            pid, i = self.started.get()
            self.runs[pid] = i

    def dead_runs(self, unfinished: set[int]) -> dict[int, int | None]:
        """After a break: {run index: exit code} of the unfinished runs whose process died by itself.
        The pool ends the others with SIGTERM; when nothing tells them apart, all of them."""
        self.executor.shutdown(wait=True, cancel_futures=True)  # joins every process: exit codes known
        self.note_started()
        codes = {i: self.processes[pid].exitcode if pid in self.processes else None
                 for pid, i in self.runs.items() if i in unfinished}
        died = {i: c for i, c in codes.items() if c != -signal.SIGTERM}
        return died or codes

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.started.close()


def _died(cfg: TrainConfig, exitcode: int | None) -> tuple[Path, str, float]:
    run = run_dir_for(cfg)
    return run, (f"FAILED: {run.name}: its process died by {_signal_name(exitcode)} (killed, or out of memory); "
                 f"the other runs went on. Run the same command again to resume it from its last checkpoint"), 0.0


def _in_processes(configs: list[TrainConfig], n: int, train_one: Callable = _train_one
                  ) -> Iterator[tuple[int, tuple[Path, str, float]]]:
    """(index, result) of each run as it finishes, `n` at a time in fresh processes ("spawn":
    safe with CUDA and with a Jupyter kernel) that die with this one. Ctrl-C cancels the runs not
    started; the runs in flight stop with their processes and resume from their last checkpoint
    next time. A process that dies (kill -9, out of memory) fails its run with a line naming it
    and the signal; the pool ends the others' processes, so they start again in a new pool and
    resume from their last checkpoint (the same records)."""
    left = dict(enumerate(configs))
    while left:
        pool = _Pool(min(n, len(left)), train_one)
        try:
            futures = {pool.submit(i, cfg): i for i, cfg in left.items()}
            for fut in as_completed(futures):
                pool.note_started()
                if isinstance(fut.exception(), BrokenProcessPool):
                    break
                del left[futures[fut]]
                yield futures[fut], fut.result()
            else:
                continue
            done = [f for f in futures if f.done() and not f.cancelled() and f.exception() is None]
            for fut in done:  # finished before the break: their results stand
                if futures[fut] in left:
                    del left[futures[fut]]
                    yield futures[fut], fut.result()
            dead = pool.dead_runs(set(left)) or dict.fromkeys(left)  # none known: stop them all, never loop
            for i, code in dead.items():
                del left[i]
                yield i, _died(configs[i], code)
            if left:
                print(f"[vldlib] restarting the worker processes for the {len(left)} run(s) left", file=sys.stderr)
        finally:
            pool.close()


def share_cores(cfg: TrainConfig, n: int) -> TrainConfig:
    """A CPU run among `n` at once: its share of the cores for torch (when it asked for the automatic
    number) and its images loaded in its own process (when it asked for automatic loader workers),
    so that n runs do not start n x cores threads. Neither field changes a run's results."""
    if n == 1 or resolve_device(cfg.device).type != "cpu":
        return cfg
    cores = usable_cores()
    return dataclasses.replace(cfg, num_threads=cfg.num_threads or max(1, cores // n),
                               num_workers=0 if cfg.num_workers < 0 else cfg.num_workers)


def run_grid(configs: list[TrainConfig], *, progress: bool = True, quiet_runs: bool = True,
             parallel_runs: int | None = None) -> list[Path]:
    """Train every config (skipping finished runs); return their run directories, in order.

    One bar for the whole grid; each run's own bar is hidden when `quiet_runs`. A run that
    diverges is reported and left with its failure record; the others go on. `parallel_runs`
    trains that many runs at once, each in its own process (None, the default: one per CPU core on
    a CPU, one at a time on a GPU; `parallel_runs_for`); every run is the same as when trained
    alone (its own seed and data order; `share_cores` splits the threads).
    """
    configs = [with_paths(c) for c in configs]
    if quiet_runs:
        configs = [dataclasses.replace(c, progress=False) for c in configs]
    results: dict[int, tuple[Path, str, float]] = {}
    for i, run_dir in enumerate(map(run_dir_for, configs)):  # finished runs: answered here, no process each
        if (run_dir / "done").exists():
            results[i] = (run_dir, "done", 0.0)
    todo = [i for i in range(len(configs)) if i not in results]
    n = parallel_runs_for([configs[i] for i in todo], parallel_runs)
    configs = [share_cores(c, n) for c in configs]
    t0 = time.perf_counter()
    bar = tqdm(total=len(configs), initial=len(results), desc=f"runs ({n} at once)" if n > 1 else "runs",
               disable=not progress, unit="run")
    if results and progress:
        tqdm.write(f"{len(results)} of {len(configs)} runs finished before: reused")
    if n == 1:
        def one_by_one() -> Iterator[tuple[int, tuple[Path, str, float]]]:
            for i in todo:
                cfg = configs[i]
                bar.set_postfix_str(f"te={cfg.test_envs} p={cfg.dropout:g} seed={cfg.seed}")
                yield i, _train_one(cfg)
        finished = one_by_one()
    else:
        finished = ((todo[j], res) for j, res in _in_processes([configs[i] for i in todo], n))
    for i, (run_dir, status, seconds) in finished:
        results[i] = (run_dir, status, seconds)
        bar.update(1)
        if progress:  # one line per run: readable in a terminal log (papermill) and in JupyterLab
            tqdm.write(f"[{len(results)}/{len(configs)}] {run_dir.name}: {status.split(':')[0]} ({seconds:.0f} s)")
    bar.close()
    failures = [status[len("FAILED: "):] for _, status, _ in results.values() if status != "done"]
    if failures:
        print(f"{len(failures)} run(s) failed:", *failures, sep="\n  ", file=sys.stderr)
    if progress:
        print(f"{len(todo)} runs trained in {time.perf_counter() - t0:.0f} s" + (f", {n} at a time" if n > 1 else "")
              + (f"; {len(configs) - len(todo)} reused" if len(todo) < len(configs) else ""))
    return [results[i][0] for i in range(len(configs))]
