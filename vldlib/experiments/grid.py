"""Run a grid of training runs from a notebook: each run resumable, finished ones skipped.

Notebooks describe an experiment as a base `TrainConfig` plus axes (dropout rates, held-out
domains, seeds, ...); this module expands and runs them one after the other with one progress bar,
and keeps going when a run fails (a diverged run is a result, recorded in its folder).

>>> base = TrainConfig(benchmark="emoji", backbone="efficientnet_lite0.offline")   # doctest: +SKIP
>>> cfgs = grid(base, dropout=[0.0, 0.9], test_envs=[[0], [1], [2]], seed=[0, 1, 2])  # doctest: +SKIP
>>> run_dirs = run_grid(cfgs)                                                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from vldlib.config import TrainConfig
from vldlib.data.registry import is_benchmark_path
from vldlib.loop import TrainingDiverged, run_dir_for
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


def run_grid(configs: list[TrainConfig], *, progress: bool = True, quiet_runs: bool = True) -> list[Path]:
    """Train every config (skipping finished runs); return their run directories.

    One bar for the whole grid; each run's own bar is hidden when `quiet_runs`. A run that
    diverges is reported and left with its failure record; the others go on.
    """
    configs = [with_paths(c) for c in configs]
    run_dirs, failures = [], []
    t0 = time.perf_counter()
    bar = tqdm(configs, desc="runs", disable=not progress, unit="run")
    for cfg in bar:
        if quiet_runs:
            cfg = dataclasses.replace(cfg, progress=False)
        bar.set_postfix_str(f"te={cfg.test_envs} p={cfg.dropout:g} seed={cfg.seed}")
        t_run = time.perf_counter()
        try:
            run_dirs.append(train(cfg))
            status = "done"
        except TrainingDiverged as e:
            failures.append(str(e))
            run_dirs.append(run_dir_for(cfg))
            status = "FAILED"
        if progress:  # one line per run: readable in a terminal log (papermill) and in JupyterLab
            tqdm.write(f"[{len(run_dirs)}/{len(configs)}] {run_dirs[-1].name}: {status} "
                       f"({time.perf_counter() - t_run:.0f} s)")
    bar.close()
    if failures:
        print(f"{len(failures)} run(s) failed:", *failures, sep="\n  ", file=sys.stderr)
    if progress:
        print(f"{len(configs)} runs in {time.perf_counter() - t0:.0f} s")
    return run_dirs
