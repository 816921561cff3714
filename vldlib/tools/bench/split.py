"""Where a quickstart run's time goes: `python -m vldlib bench --run-split [N]`.

Issue 25 asks for the cold quickstart in 8 minutes on 2 cores. Its 72 runs take most of that, so
this prints, per run, the seconds spent in each part of `vldlib.loop.train` (setup, data and cache
load, steps, evaluation, checkpoint writes, records) and the one-off costs a cold quickstart pays
once (a process start, the image check, the frozen-trunk cache). A run's parts are timed by
wrapping the functions the loop calls, in this process, one run after the other: what one worker
process of `run_grid` does (the grid keeps its workers alive across runs, so a process start is
paid once per worker, not per run).

Everything is written under a fresh temporary folder (the runs, and the cold caches of the one-off
measurements); the benchmark in data/ and the shared caches are only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from vldlib.config import TrainConfig
from vldlib.data import load_benchmark
from vldlib.loop import train as loop_train
from vldlib.loop.step import TrainStep

# the part of a run each function of the loop belongs to (names as `vldlib.loop.train` imports them)
PARTS = {
    "load_benchmark": "setup", "data_fingerprint": "setup", "check_same_data": "setup", "out_files": "setup",
    "build_run_net": "model build", "make_data": "data/cache load", "trunk_features": "data/cache load",
    "predict_all": "evaluation", "accuracies": "evaluation", "validation_score": "evaluation",
    "save_checkpoint": "checkpoints", "load_checkpoint": "checkpoints",
    "write_json_atomic": "records", "append_jsonl": "records", "write_text_atomic": "records",
}
ORDER = ("setup", "model build", "data/cache load", "steps", "evaluation", "checkpoints", "records", "other")


class _Clock:
    """Seconds per part, and per checkpoint file, of the run being timed."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)
        self.files: dict[str, list[float]] = defaultdict(list)
        self.depth = 0  # a timed function called inside another is counted once, in the outer one

    def timed(self, part: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.depth -= 1
                self.parts[part] += dt
                if fn.__name__ == "save_checkpoint":
                    self.files[Path(args[0]).name].append(dt)
        return wrapper

    def timed_batches(self, fn: Callable) -> Callable:
        """train_batches: the time to gather each step's batch belongs to the steps."""
        def wrapper(*args: Any, **kwargs: Any) -> Iterator:
            gen = fn(*args, **kwargs)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(gen)
                except StopIteration:
                    return
                finally:
                    self.parts["steps"] += time.perf_counter() - t0
                yield batch
        return wrapper


@contextlib.contextmanager
def _timing(clock: _Clock) -> Iterator[None]:
    """Wrap the loop's functions (and the two halves of its step, and the distance it records at
    each evaluation) for the duration of one run; everything is put back afterwards."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    for name, part in PARTS.items():
        if hasattr(loop_train, name):
            patch(loop_train, name, clock.timed(part, getattr(loop_train, name)))
    patch(loop_train, "train_batches", clock.timed_batches(loop_train.train_batches))
    patch(TrainStep, "loss", clock.timed("steps", TrainStep.loss))
    patch(TrainStep, "update", clock.timed("steps", TrainStep.update))
    patch(loop_train.DistanceFromStart, "__call__", clock.timed("evaluation", loop_train.DistanceFromStart.__call__))
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):
            setattr(owner, name, old)


def time_one_run(cfg: TrainConfig) -> dict[str, Any]:
    """Train `cfg` (a fresh run folder) and return its wall time, its parts, and its files' sizes."""
    clock = _Clock()
    t0 = time.perf_counter()
    with _timing(clock):
        run_dir = loop_train.train(cfg)
    wall = time.perf_counter() - t0
    parts = {k: clock.parts.get(k, 0.0) for k in ORDER if k != "other"}
    parts["other"] = wall - sum(parts.values())
    sizes = {p.name: p.stat().st_size for p in run_dir.iterdir() if p.is_file()}
    return {"run": run_dir.name, "wall_s": wall, "parts": parts, "checkpoint_writes": dict(clock.files),
            "files_mb": {k: v / 2**20 for k, v in sizes.items() if k.endswith(".pt")},
            "left_mb": sum(sizes.values()) / 2**20}


def process_start_s(repeats: int = 2) -> float:
    """Seconds for a fresh interpreter to import what a grid worker imports before its first run
    (`vldlib.experiments.grid`, which pulls in torch and the loop): the cost of starting a worker.
    The fastest of `repeats` starts (the others waited for the machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import vldlib.experiments.grid"], check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        times.append(time.perf_counter() - t0)
    return min(times)


def one_off_costs(cfg: TrainConfig, tmp: Path) -> dict[str, float]:
    """A cold quickstart's one-off costs after the benchmark is built: the image check (every image
    decoded once, then remembered) and the frozen-trunk outputs (computed once for every run), each
    measured with empty caches under `tmp` (VLDLIB_CACHE pointed there for the duration)."""
    old = os.environ.get("VLDLIB_CACHE")
    os.environ["VLDLIB_CACHE"] = str(tmp / "cold-cache")
    try:
        t0 = time.perf_counter()
        bench = load_benchmark(cfg.benchmark, cfg.data_dir, progress=False)
        check_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_benchmark(cfg.benchmark, cfg.data_dir, progress=False)
        checked_s = time.perf_counter() - t0
        device = torch.device("cpu")
        net, norm, _ = loop_train.build_run_net(cfg, len(bench.classes), device)
        data = loop_train.make_data(cfg, bench, norm["mean"], norm["std"])
        t0 = time.perf_counter()
        loop_train.trunk_features(net, data, cfg, device)
        trunk_s = time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("VLDLIB_CACHE", None)
        else:
            os.environ["VLDLIB_CACHE"] = old
    return {"image check, cold": check_s, "image check, remembered": checked_s, "trunk cache build": trunk_s}


def split_configs(base: TrainConfig, runs: int, n_domains: int) -> list[TrainConfig]:
    """`runs` runs of the quickstart's design: both rates (the quickstart's 0 and 0.9), seeds 0.., the
    held-out domains in turn, as the study varies them."""
    return [dataclasses.replace(base, dropout=(0.0, 0.9)[i % 2], seed=i // 2, test_envs=[(i // 2) % n_domains])
            for i in range(runs)]


def run_split(base: TrainConfig, runs: int = 4, *, one_offs: bool = True, log: Callable = print,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time `runs` runs of `base` (see `split_configs`), then the one-off costs; print the split.
    `overrides`: TrainConfig fields set on every run (e.g. save_weights=False)."""
    torch.set_num_threads(max(1, base.num_threads or 1))
    with tempfile.TemporaryDirectory(prefix="vldlib-split-") as tmp:
        tmp = Path(tmp)
        base = dataclasses.replace(base, out=str(tmp / "runs"), progress=False, **(overrides or {}))
        results = []
        n_domains = len(load_benchmark(base.benchmark, base.data_dir, progress=False).domains)
        for cfg in split_configs(base, runs, n_domains):
            res = time_one_run(cfg)
            results.append(res)
            log(_run_line(res))
        warm = results[1:] or results  # the first run of a process also loads what later runs reuse
        mean = {k: statistics.mean(r["parts"][k] for r in warm) for k in ORDER}
        wall = statistics.mean(r["wall_s"] for r in warm)
        log(f"mean of runs 2-{runs}: {wall:.2f} s a run: "
            + ", ".join(f"{k} {v:.2f} s ({100 * v / wall:.0f}%)" for k, v in mean.items()))
        writes = defaultdict(list)
        for r in warm:
            for name, ts in r["checkpoint_writes"].items():
                writes[name] += ts
        log("checkpoint writes: " + ", ".join(f"{name} {len(ts) / len(warm):.1f} a run x {statistics.mean(ts):.3f} s"
                                              for name, ts in sorted(writes.items())))
        log(f"left in a run folder: {statistics.mean(r['left_mb'] for r in results):.1f} MB "
            f"({', '.join(sorted(results[-1]['files_mb'])) or 'no .pt file'})")
        out: dict[str, Any] = {"runs": results, "mean_parts_s": mean, "mean_wall_s": wall}
        if one_offs:
            start = process_start_s()
            costs = {"process start (import vldlib.experiments.grid)": start, **one_off_costs(base, tmp)}
            log("one-off: " + ", ".join(f"{k} {v:.1f} s" for k, v in costs.items()))
            out["one_off_s"] = costs
    return out


def _run_line(res: dict[str, Any]) -> str:
    return (f"{res['run'][:40]:40s} {res['wall_s']:6.2f} s: "
            + ", ".join(f"{k} {v:.2f}" for k, v in res["parts"].items()))


def compare_records(a: Sequence[dict], b: Sequence[dict], ignore: Sequence[str] = ("step_time", "peak_mem_mb")
                    ) -> list[str]:
    """The differences between two runs' records (records.jsonl rows), leaving out the timings:
    what must be empty when a speed change keeps results identical."""
    diffs = []
    if len(a) != len(b):
        diffs.append(f"{len(a)} records against {len(b)}")
    for ra, rb in zip(a, b):
        keys = (set(ra) | set(rb)) - set(ignore)
        for k in sorted(keys):
            if ra.get(k) != rb.get(k):
                diffs.append(f"step {ra.get('step')}: {k} {ra.get(k)!r} != {rb.get(k)!r}")
    return diffs
