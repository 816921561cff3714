"""The grid runner: several runs at once give the runs trained alone, and the worker processes
start their own DataLoader workers the platform's way (a spawned worker would otherwise spawn
every evaluation's loader workers as fresh interpreters: minutes per run on the GPU box)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from vldlib.config import TrainConfig
from vldlib.experiments.grid import grid, parallel_runs_for, run_grid
from vldlib.loop.device import usable_cores

VOLATILE = {"time", "step_time", "eval_time", "peak_mem_mb", "wall_s", "eval_s", "data_s"}


def tiny(root: Path, **kw) -> TrainConfig:
    base = dict(benchmark=str(root / "fake"), backbone="test_resnet", pretrained=False, resolution=32, steps=8,
                eval_every=4, average_from=4, batch_size=4, eval_batch_size=64, num_workers=0,
                out=str(root / "runs"), progress=False, dropout=0.5, lr=0.05, num_threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.slow
def test_runs_in_parallel_equal_the_same_runs_trained_one_by_one(fake_benchmark, tmp_path, capsys):
    configs = grid(tiny(tmp_path), test_envs=[[0], [1]], dropout=[0.0, 0.9])
    alone = run_grid([dataclasses.replace(c, out=str(tmp_path / "alone")) for c in configs], progress=False)
    together = run_grid([dataclasses.replace(c, out=str(tmp_path / "together")) for c in configs],
                        parallel_runs=2, progress=True)
    assert [p.name for p in together] == [p.name for p in alone]  # returned in the configs' order
    for a, b in zip(alone, together):
        assert (b / "done").exists()
        assert records(b) == records(a)
    assert "2 at a time" in capsys.readouterr().out
    # a second call trains nothing: every run is answered from its folder, none re-run
    before = {p: (p / "records.jsonl").stat().st_mtime_ns for p in together}
    again = run_grid([dataclasses.replace(c, out=str(tmp_path / "together")) for c in configs], parallel_runs=2)
    assert again == together and {p: (p / "records.jsonl").stat().st_mtime_ns for p in again} == before
    assert "4 of 4 runs finished before: reused" in capsys.readouterr().out


PROBE = """
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
import torch
from vldlib.experiments.grid import _default_start_method

def probe():
    it = iter(torch.utils.data.DataLoader(list(range(4)), num_workers=1))
    name = type(it._worker_result_queue._reader).__module__, multiprocessing.get_start_method()
    del it
    return name[1]

if __name__ == "__main__":
    init = _default_start_method if sys.argv[1] == "init" else None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=init) as pool:
        print(pool.submit(probe).result())
"""


def test_worker_processes_start_their_children_the_platform_way(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    default = subprocess.run([sys.executable, "-c", "import multiprocessing; print(multiprocessing.get_start_method())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    seen = {how: subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, env=env,
                                check=True).stdout.strip() for how in ("plain", "init")}
    assert seen["plain"] == "spawn"  # the trap: a spawned worker's DataLoaders would spawn too
    assert seen["init"] == default


def test_how_many_runs_at_once(tmp_path):
    cpu = [tiny(tmp_path, num_threads=1)] * 5
    assert parallel_runs_for(cpu, 3) == 3
    assert parallel_runs_for(cpu[:2], 3) == 2  # never more than there are runs
    assert parallel_runs_for(cpu, None) == min(usable_cores(), 5)  # on a machine with memory to spare
    assert parallel_runs_for([tiny(tmp_path, num_threads=2)] * 64, None) == max(1, usable_cores() // 2)
    with pytest.raises(ValueError, match="parallel_runs=0"):
        parallel_runs_for(cpu, 0)


def _compute_if_missing(path: str, log: str) -> None:
    import time

    from vldlib.utils import atomic_path, computed_once

    with computed_once(path):
        if not Path(path).exists():
            with open(log, "a") as f:
                f.write("computed\n")
            time.sleep(0.5)  # long enough for the other process to ask meanwhile
            with atomic_path(path) as tmp:
                tmp.write_text("cache")


def test_a_cache_file_asked_for_by_two_processes_at_once_is_computed_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    target, log = tmp_path / "cache" / "trunk.pt", tmp_path / "log.txt"
    procs = [ctx.Process(target=_compute_if_missing, args=(str(target), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert target.read_text() == "cache"
    assert log.read_text() == "computed\n"  # one of the two computed it; the other found it written
