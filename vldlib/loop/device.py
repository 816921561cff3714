"""Which device a run uses, and what it costs in memory."""

from __future__ import annotations

import os
import resource

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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a SLURM or taskset limit), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
