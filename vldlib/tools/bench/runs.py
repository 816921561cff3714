"""Timing whole training configurations and runs: what `python -m vldlib bench` measures by
default on a CPU (the quickstart's own runs), a run's time against its number of steps, and a
sweep's wall time by number of GPUs.

`vldlib.tools.bench.bench` times data paths against the compute limit on raw images; this module times a
`TrainConfig` exactly as `vldlib.loop.train` runs it (same network, optimiser, batches).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from vldlib.config import TrainConfig
from vldlib.data import load_benchmark, prepare_benchmark
from vldlib.data.transforms import eval_transform, train_transform
from vldlib.loop.batches import make_data, train_batches, trunk_features
from vldlib.loop.device import usable_cores
from vldlib.loop.train import train
from vldlib.tools.bench.bench import (
    OUT,
    BenchConfig,
    Contender,
    LoopStep,
    backend_flags,
    check_paths,
    report_rates,
    time_plain,
    time_rates,
    total_steps,
)
from vldlib.utils import read_jsonl


def run_config_bench(tcfg: TrainConfig, timing: BenchConfig, *, name: str = "config",
                     json_path: str | os.PathLike | None = None, log: Callable = print) -> dict:
    """Time one training configuration the way `vldlib.loop.train` runs it.

    compute: the loop's step on one batch already in memory; with `cache_trunk`, a batch of the
        frozen trunk's outputs through the trained tail, which is all the loop computes per step.
    fast: the loop's own batches (`vldlib.loop.batches.train_batches`: cached trunk outputs gathered per
        step, or whichever image path the config names), timed interleaved with compute.
    plain: DomainBed's path for the same network and transform: PIL decoding in DataLoader
        workers, the whole network every step (no cache), fp32, NCHW, torch's default threads.
    The run's `num_threads` applies to compute and fast, as in the loop. Only `steps`, `warmup`,
    `repeats`, `workers`, `paths` and `seed` are read from `timing`.
    """

    check_paths(timing.paths)
    timing = replace(timing, batch_size=tcfg.batch_size,
                     workers=timing.workers if timing.workers >= 0 else usable_cores())
    tcfg = replace(tcfg, steps=total_steps(timing) + 1, progress=False)
    tcfg.validate()
    bench = prepare_benchmark(tcfg.benchmark, tcfg.data_dir)
    n_classes, details = len(bench.classes), {}
    default_threads = torch.get_num_threads()
    gens = []
    try:
        if tcfg.num_threads > 0:
            torch.set_num_threads(tcfg.num_threads)
        with backend_flags(tf32=tcfg.tf32, benchmark=True):
            fast = LoopStep(tcfg, n_classes, tail=tcfg.cache_trunk)
            data = make_data(tcfg, bench, fast.norm["mean"], fast.norm["std"])
            t0 = time.perf_counter()
            features = trunk_features(fast.net, data, tcfg, fast.device) if tcfg.cache_trunk else None
            prep = {"threads": torch.get_num_threads(), "trunk_cache_s": time.perf_counter() - t0}
            n_img = len(data.train_envs) * tcfg.batch_size
            contenders = {}
            if "compute" in timing.paths:
                gens.append(train_batches(data, tcfg, 0, fast.device, features))
                one = [(x.clone(), y.clone()) for x, y in next(gens[-1])]
                gens.pop().close()
                contenders["compute"] = Contender(itertools.repeat(one),
                                                  LoopStep(tcfg, n_classes, tail=tcfg.cache_trunk), prep)
            if "fast" in timing.paths:
                gens.append(train_batches(data, tcfg, 0, fast.device, features))
                contenders["fast"] = Contender(gens[-1], fast, prep)
            details.update(time_rates(contenders, n_img, timing))
    finally:
        for g in gens:
            g.close()
        torch.set_num_threads(default_threads)
    if "plain" in timing.paths:
        with backend_flags(tf32=False, benchmark=False, deterministic=True):
            step = LoopStep(replace(tcfg, channels_last=False, bf16=False, cache_trunk=False, compile=False), n_classes)
            tf = (train_transform if tcfg.augment else eval_transform)(tcfg.resolution, step.norm["mean"],
                                                                       step.norm["std"])
            details["plain"] = {**time_plain(step, [bench.samples[e] for e in data.train_envs], tf, timing),
                                "threads": torch.get_num_threads()}
    path = Path(json_path) if json_path else OUT / f"bench-{fast.device.type}-{name}.json"
    return report_rates(details, {"name": name, "config": asdict(tcfg),
                                  "timing": {k: getattr(timing, k) for k in ("steps", "warmup", "repeats", "workers")}},
                        n_img, str(fast.device), path, log)


# ----------------------------------------------------------------------------- runs and sweeps
def image_run_config(root: str | os.PathLike, *, backbone: str, resolution: int, device: str, test_env: int = -1,
                     batch_size: int = 32, **overrides) -> TrainConfig:
    """A run on image folders the fast way (augment_on="device", cache_images, channels_last),
    random init: what the GPU check times."""

    n_dom = len(load_benchmark(root, check_images=False, progress=False).domains)
    return TrainConfig(**{**dict(benchmark=str(root), test_envs=[test_env % n_dom], backbone=backbone,
                                 pretrained=False, resolution=resolution, batch_size=batch_size, lr=1e-4,
                                 augment_on="device", cache_images=True, channels_last=True, device=device),
                          **overrides})


def time_run(tcfg: TrainConfig, steps: int, out: str | os.PathLike) -> dict:
    """Wall time of one `vldlib.loop.train` run of `tcfg` for `steps` steps, evaluated once at the
    end, in a fresh folder under `out`; the record's step_time is the loop's own mean time per step."""

    # compiled: evaluate halfway too, so the last record's step time excludes the compilation
    tcfg = replace(tcfg, steps=steps, eval_every=max(1, steps // 2) if tcfg.compile else steps,
                   average_from=min(tcfg.average_from, steps), out=str(out), progress=False, keep_last=False,
                   run_name=f"t{steps}-{time.time_ns()}")
    t0 = time.perf_counter()
    run_dir = train(tcfg)
    wall = time.perf_counter() - t0
    rec = [r for r in read_jsonl(run_dir / "records.jsonl") if r.get("type") == "eval"][-1]
    return {"steps": steps, "wall_s": wall, "step_time_s": rec["step_time"], "steps_per_s": 1 / rec["step_time"],
            "other_s": wall - steps * rec["step_time"], "peak_mem_mb": rec["peak_mem_mb"]}


def steps_scaling(tcfg: TrainConfig, steps: tuple[int, int], out: str | os.PathLike) -> dict:
    """Two runs of n and m steps: wall = fixed + per_step x steps. Linear when the per-step slope
    between the runs matches the loop's measured step time (no hidden per-run growth)."""
    return linear_fit(*(time_run(tcfg, s, out) for s in steps))


def linear_fit(a: dict, b: dict) -> dict:
    """wall = fixed + slope x steps through two `time_run` results of the same configuration."""
    slope = (b["wall_s"] - a["wall_s"]) / (b["steps"] - a["steps"])
    return {"runs": [a, b], "slope_s_per_step": slope, "fixed_s": a["wall_s"] - slope * a["steps"],
            "loop_step_time_s": [a["step_time_s"], b["step_time_s"]],
            "slope_over_step_time": slope / b["step_time_s"]}


def sweep_wall_time(jobs: int, run_s: float, workers: int) -> float:
    """Local launcher, one job per worker (GPU) at a time: ceil(jobs / workers) rounds of one run each."""
    return math.ceil(jobs / workers) * run_s


def sweep_note(run_s: float, jobs: int = 288, workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
               unit: str = "GPU") -> str:
    """Markdown lines: a sweep's wall time by number of GPUs (or of 1-thread CPU workers, `--jobs`).
    288 jobs = one dropout rate on the paper's grid: 4 benchmarks x 4 held-out domains x 2 lr x
    3 weight decays x 3 seeds."""
    lines = [f"Sweep of {jobs} runs of {run_s / 60:.1f} min (local launcher, one run per {unit}): "]
    lines += [f"- {g} {unit}{'s' if g > 1 else ''}: {sweep_wall_time(jobs, run_s, g) / 3600:.1f} h" for g in workers]
    return "\n".join(lines)
