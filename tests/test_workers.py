"""The grid's worker processes (issue 27 items 1-2, issue 26 items 1-2): they die with their parent
however it ends, a dead worker names its run and lets the others finish, and the number of runs at
once follows what the process may use (affinity, SLURM, cgroup quota, memory), not the machine."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vldlib.experiments.grid as G
from vldlib.config import TrainConfig
from vldlib.loop import device as D

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(benchmark=str(tmp_path / "fake"), backbone="test_resnet", pretrained=False, resolution=32, steps=8,
                eval_every=4, batch_size=4, num_workers=0, out=str(tmp_path / "runs"), progress=False,
                num_threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- helpers: processes

def _state(pid: int) -> str | None:
    """The /proc state letter of a process, None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _wait_for(cond, timeout: float, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return cond()


PARENT = """
import os, sys, time
from pathlib import Path
from vldlib.config import TrainConfig
from vldlib.experiments.grid import _in_processes

def sleepy(cfg):
    (Path(cfg.out) / f"worker-{os.getpid()}").write_text("")
    time.sleep(120)

if __name__ == "__main__":
    out = sys.argv[1]
    cfgs = [TrainConfig(benchmark="x", out=out, seed=s, device="cpu") for s in range(2)]
    for _ in _in_processes(cfgs, 2, sleepy):
        pass
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_and_the_resource_tracker_die_with_a_killed_parent(tmp_path, sig):
    """Before: after kill -9 (or `timeout`'s SIGTERM) of the process running the grid, its workers and
    the resource tracker were reparented to init and lived on (an hour later, ~1 GB each)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    family: set[int] = set()
    with open(tmp_path / "stderr.txt", "wb") as err:
        parent = subprocess.Popen([sys.executable, str(script), str(out)], stderr=err, env=env)
        try:
            assert _wait_for(lambda: len(list(out.glob("worker-*"))) == 2, 120), "the workers never started"
            workers = [int(p.name.split("-")[1]) for p in out.glob("worker-*")]
            family |= set(_children(parent.pid))  # the workers and the resource tracker
            assert set(workers) <= family and len(family) >= 3, family
            os.kill(parent.pid, sig)
            parent.wait(30)
            assert _wait_for(lambda: not any(map(_alive, family)), 10), \
                f"still alive after the parent's {sig.name}: {[p for p in family if _alive(p)]}"
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
            for pid in family:  # a failing test leaves no orphan behind
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert "leaked semaphore" not in (tmp_path / "stderr.txt").read_text()


# ----------------------------------------------------------------------------- one dead worker

def die_or_sleep(cfg: TrainConfig):
    """Seed 0's process dies by SIGKILL once seed 1 is training; seed 1 trains for a minute the first
    time (ended with the broken pool) and at once when started again; the others at once."""
    out = Path(cfg.out)
    marker = out / "seed1-started"
    if cfg.seed == 0:
        _wait_for(marker.exists, 120)
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.seed == 1 and not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(60)
    (out / f"trained-{cfg.seed}").write_text("")
    return Path(cfg.out) / f"run{cfg.seed}", "done", 0.0


def test_a_killed_worker_names_its_run_and_the_other_runs_finish(tmp_path, capsys):
    """Before: the whole grid aborted with a raw BrokenProcessPool traceback (exit 1)."""
    (tmp_path / "runs").mkdir()
    cfgs = [tiny(tmp_path, seed=s) for s in range(3)]
    results = dict(G._in_processes(cfgs, 2, die_or_sleep))
    assert sorted(results) == [0, 1, 2]
    run0 = G.run_dir_for(cfgs[0]).name
    assert results[0][1] == (f"FAILED: {run0}: its process died by SIGKILL (exit code -9) (killed, or out of memory); "
                             f"the other runs went on. Run the same command again to resume it from its last "
                             f"checkpoint")
    assert results[1][1] == results[2][1] == "done"  # seed 1, ended with the broken pool, was started again
    assert sorted(p.name for p in (tmp_path / "runs").glob("trained-*")) == ["trained-1", "trained-2"]
    assert "[vldlib] restarting the worker processes for the 2 run(s) left" in capsys.readouterr().err


def test_the_signal_of_a_dead_process_is_named():
    assert G._signal_name(-9) == "SIGKILL (exit code -9)"
    assert G._signal_name(-15) == "SIGTERM (exit code -15)"
    assert G._signal_name(1) == "exit code 1"
    assert G._signal_name(None) == "an unknown exit status"


# ----------------------------------------------------------------------------- usable CPUs and memory

def _proc_cgroup(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proc_self_cgroup"
    p.write_text(text)
    return p


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def no_limits(tmp_path, monkeypatch):
    """A process on 8 cores with 64 GB and no SLURM or cgroup limit; cgroup files under tmp_path."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(D, "_physical_memory_mb", lambda: 64_000.0)
    root = tmp_path / "cgroup"
    root.mkdir()
    return dict(cgroup_root=root, proc_cgroup=_proc_cgroup(tmp_path, "0::/\n"))


def test_cores_follow_the_affinity_mask(no_limits, monkeypatch):
    assert D.usable_cores({}, **no_limits) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert D.usable_cores({}, **no_limits) == 1


def test_cores_follow_slurm_cpus_per_task(no_limits):
    assert D.usable_cores({"SLURM_CPUS_PER_TASK": "1"}, **no_limits) == 1
    assert D.usable_cores({"SLURM_CPUS_PER_TASK": "2(x3)"}, **no_limits) == 2
    assert D.usable_cores({"SLURM_CPUS_PER_TASK": "garbage"}, **no_limits) == 8


def test_cores_follow_the_cgroup_v2_quota_of_the_own_cgroup_or_a_parent(no_limits, tmp_path):
    root = no_limits["cgroup_root"]
    _write(root / "cpu.max", "max 100000\n")
    assert D.usable_cores({}, **no_limits) == 8
    _write(root / "cpu.max", "150000 100000\n")  # 1.5 CPUs: rounded up
    assert D.usable_cores({}, **no_limits) == 2
    # a SLURM job: the quota on the job's folder, the task's own folder unlimited
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "job_7" / "cpu.max", "100000 100000\n")
    _write(root / "job_7" / "step_0" / "cpu.max", "max 100000\n")
    deep = dict(no_limits, proc_cgroup=_proc_cgroup(tmp_path, "0::/job_7/step_0\n"))
    assert D.usable_cores({}, **deep) == 1


def test_cores_follow_the_cgroup_v1_quota(no_limits, tmp_path):
    root = no_limits["cgroup_root"]
    _write(root / "cpu" / "docker" / "c1" / "cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu" / "docker" / "c1" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    v1 = dict(no_limits, proc_cgroup=_proc_cgroup(tmp_path, "4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n"))
    assert D.usable_cores({}, **v1) == 3
    unlimited = dict(no_limits, proc_cgroup=_proc_cgroup(tmp_path, "1:cpu:/\n"))
    assert D.usable_cores({}, **unlimited) == 8


def test_memory_follows_slurm_and_the_cgroup_limit(no_limits, tmp_path):
    assert D.usable_memory_mb({}, **no_limits) == 64_000
    assert D.usable_memory_mb({"SLURM_MEM_PER_NODE": "2000"}, **no_limits) == 2000
    assert D.usable_memory_mb({"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_PER_TASK": "3"}, **no_limits) == 3000
    root = no_limits["cgroup_root"]
    _write(root / "memory.max", f"{1500 * 2**20}\n")
    assert D.usable_memory_mb({}, **no_limits) == 1500
    _write(root / "memory.max", "max\n")
    v1 = dict(no_limits, proc_cgroup=_proc_cgroup(tmp_path, "4:memory:/process_api/x\n"))
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert D.usable_memory_mb({}, **v1) == 64_000
    _write(root / "memory" / "process_api" / "x" / "memory.limit_in_bytes", f"{4000 * 2**20}\n")
    assert D.usable_memory_mb({}, **v1) == 4000


def _limits(monkeypatch, cores: int, memory_mb: float) -> None:
    monkeypatch.setattr(G, "usable_cores", lambda: cores)
    monkeypatch.setattr(G, "usable_memory_mb", lambda: memory_mb)


def test_runs_at_once_follow_the_usable_cores_and_memory(tmp_path, monkeypatch):
    """Before: sized from os.cpu_count(), so a 1-CPU SLURM task on a 64-core node started 64 runs."""
    cpu = [tiny(tmp_path)] * 100
    _limits(monkeypatch, cores=1, memory_mb=500_000)
    assert G.parallel_runs_for(cpu, None) == 1
    _limits(monkeypatch, cores=64, memory_mb=4 * D.RUN_MEMORY_MB + 1)
    assert G.parallel_runs_for(cpu, None) == 4  # memory for four runs
    _limits(monkeypatch, cores=64, memory_mb=100)
    assert G.parallel_runs_for(cpu, None) == 1  # at least one
    _limits(monkeypatch, cores=8, memory_mb=500_000)
    assert G.parallel_runs_for([tiny(tmp_path, num_threads=2)] * 100, None) == 4
    assert G.parallel_runs_for(cpu, 3) == 3  # a number given is taken as is


def test_the_threads_of_runs_sharing_the_cores_follow_the_usable_cores(tmp_path, monkeypatch):
    _limits(monkeypatch, cores=4, memory_mb=500_000)
    auto = tiny(tmp_path, num_threads=0)
    assert G.share_cores(auto, 2).num_threads == 2
    assert G.share_cores(auto, 4).num_threads == 1
    assert G.share_cores(dataclasses.replace(auto, num_threads=3), 2).num_threads == 3


def test_no_sizing_reads_the_machine_core_count():
    """One rule: every sizing of threads and processes goes through usable_cores."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "vldlib").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "os.cpu_count()" in line and p.name != "device.py" and "report" not in line
                 and '"cpus"' not in line and "CPUs" not in line]
    assert offenders == []
