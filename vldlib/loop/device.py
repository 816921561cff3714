"""Which device a run uses, and what it costs in memory."""

from __future__ import annotations

import itertools
import math
import os
import resource
from pathlib import Path
from typing import Mapping

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


RUN_MEMORY_MB = 900  # one CPU training run of the quickstart's kind, measured: about 0.9 GB resident
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def usable_cores(env: Mapping[str, str] | None = None, cgroup_root: Path = CGROUP_ROOT,
                 proc_cgroup: Path = PROC_CGROUP) -> int:
    """THE number of CPU cores this process may use, not the machine's: the smallest of its affinity
    mask (taskset, SLURM's cpuset), SLURM_CPUS_PER_TASK and the cgroup CPU quota (a container's or
    a SLURM job's `cpu.max`, rounded up). os.cpu_count() counts the machine: a 1-CPU task on a
    64-core node would start 64 runs and 64 threads each. Every sizing of threads and processes
    uses this."""
    env = os.environ if env is None else env
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limits = [cores, _positive_int(env.get("SLURM_CPUS_PER_TASK")), _cgroup_cpus(cgroup_root, proc_cgroup)]
    return max(1, min(n for n in limits if n))


def usable_memory_mb(env: Mapping[str, str] | None = None, cgroup_root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = PROC_CGROUP, cores: int | None = None) -> float:
    """THE memory (MB) this process may use: the smallest of the machine's RAM, SLURM's allocation
    (SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x the usable cores; both in MB) and the cgroup limit
    (`memory.max`, v1 `memory.limit_in_bytes`). Exceeding it gets every run killed at once (OOM)."""
    env = os.environ if env is None else env
    per_cpu = _positive_int(env.get("SLURM_MEM_PER_CPU"))
    if cores is None:
        cores = usable_cores(env, cgroup_root, proc_cgroup)
    limits = [_physical_memory_mb(), _positive_int(env.get("SLURM_MEM_PER_NODE")),
              per_cpu * cores if per_cpu else None, _cgroup_memory_mb(cgroup_root, proc_cgroup)]
    return float(min(n for n in limits if n))


def _positive_int(value: str | None) -> int | None:
    """An environment variable's positive integer, None when unset or not one (SLURM writes e.g.
    "4" or, for a heterogeneous job, "4(x2)": the first number counts)."""
    digits = "".join(itertools.takewhile(str.isdigit, (value or "").strip()))
    return int(digits) if digits and int(digits) > 0 else None


def _physical_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """The cgroup folders that limit this process for `controller` ("" for cgroup v2), from its own
    up to the root: a SLURM job sets its quota on the job's folder, above the task's own."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    base = root if not controller else root / controller
    dirs: list[Path] = []
    for line in lines:
        _, names, path = (line.split(":", 2) + ["", ""])[:3]
        if (controller == "" and names == "") or controller in names.split(","):
            own = base / path.strip("/")
            dirs += [own, *[p for p in own.parents if p.is_relative_to(base)]] if own != base else [base]
    return [d for d in dict.fromkeys(dirs or [base]) if d.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_cpus(root: Path, proc_cgroup: Path) -> int | None:
    """Cores allowed by the CPU quota (quota / period, rounded up), None without a quota."""
    quotas: list[float] = []
    for d in _cgroup_dirs(root, proc_cgroup, ""):
        parts = (_read(d / "cpu.max") or "").split()
        if len(parts) == 2 and parts[0] != "max":
            quotas.append(_ratio(parts[0], parts[1]))
    for d in _cgroup_dirs(root, proc_cgroup, "cpu"):  # v1 (cpu,cpuacct: `cpu` is its usual link)
        quotas.append(_ratio(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")))
    quotas = [q for q in quotas if q > 0]
    return max(1, math.ceil(min(quotas))) if quotas else None


def _ratio(quota: str | None, period: str | None) -> float:
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return 0.0
    return q / p if q > 0 and p > 0 else 0.0


def _cgroup_memory_mb(root: Path, proc_cgroup: Path) -> float | None:
    """The cgroup memory limit in MB (v2 `memory.max`, v1 `memory.limit_in_bytes`), None without one."""
    limits = [_read(d / "memory.max") for d in _cgroup_dirs(root, proc_cgroup, "")]
    limits += [_read(d / "memory.limit_in_bytes") for d in _cgroup_dirs(root, proc_cgroup, "memory")]
    found = [int(v) for v in limits if v and v.isdigit() and 0 < int(v) < _NO_LIMIT]
    return min(found) / 2**20 if found else None


def cpu_plan(num_workers: int, num_threads: int, loaders: int) -> tuple[int, int]:
    """(torch threads, DataLoader workers per training loader) that together fit the cores.

    Each of the `loaders` training loaders gets `workers // loaders` processes (auto: up to 4 in all);
    each worker decodes and augments one image at a time. The main process then runs the step with
    torch's intra-op threads, whose default is one per core: on top of the workers that asks for more
    threads than cores, and spinning threads fight over them (the README's `train` example ran 3-5x
    slower on 2 busy cores, a third of its CPU time in the kernel). So unless the user set
    --num-threads: threads = max(1, cores // (workers in all + 1)), the +1 being the main process.
    """
    cores = usable_cores()
    workers = num_workers if num_workers >= 0 else min(4, cores)
    per_loader = max(0, workers // loaders) if workers else 0
    threads = num_threads if num_threads > 0 else max(1, cores // (per_loader * loaders + 1))
    return threads, per_loader
