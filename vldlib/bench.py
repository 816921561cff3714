"""`python -m vldlib bench`: training throughput measured against the hardware limit.

Three rates, in images per second, for one backbone, resolution and batch (per domain x domains):

1. compute: training steps on tensors already on the device. The limit: no data work at all.
2. plain: what DomainBed does. PIL decoding and torchvision transforms in DataLoader workers,
   fp32, NCHW, cuDNN deterministic. This is the peer baseline.
3. fast: vldlib's path. The decoded-image cache, with augmentation batched where the model runs
   (vldlib.data.gpu_augment), prepared ahead in a background thread (pinned memory and a side
   CUDA stream on a GPU), channels_last, TF32, and bf16 autocast with --bf16.

Every step is the training loop's own step (vldlib.train): the same FineTuneNet with dropout and
frozen BatchNorm, SGD with momentum and weight decay, the running weight average, and the loop's
per-step host syncs (finite-loss check, loss and accuracy read back). A ratio fast/compute near 1
therefore means that data loading costs nothing in the real loop. Each rate is the median of
`repeats` timed blocks of `steps` steps after `warmup` steps.

    python -m vldlib bench                         # CPU: efficientnet_lite0.offline, 64 px, last 2 stages
    python -m vldlib bench --device cuda --bf16    # GPU: resnet50 (random init), 224 px
    python -m vldlib bench --steps-scaling         # time per run grows linearly with steps
    python -m vldlib bench --gpu-check             # the self-contained GPU report (about 5 minutes on an H100)

Results are written as JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vldlib.utils import seed_hash, write_json_atomic, write_text_atomic

OUT = Path("outputs/bench")


# ----------------------------------------------------------------------------- configuration
@dataclass
class BenchConfig:
    """One throughput measurement. A None default is filled per device by `resolved()`."""

    backbone: str | None = None  # default: resnet50 (random init) on a GPU, efficientnet_lite0.offline on the CPU
    resolution: int | None = None  # default: 224 on a GPU, 64 on the CPU
    batch_size: int = 32  # per domain
    domains: int = 3  # training domains per step
    train_stages: int | None = -1  # -1: 2 on the CPU (the quickstart's partial fine-tuning), None (all) on a GPU
    device: str = "auto"
    data: str = "synthetic"  # "synthetic" (JPEGs written under outputs/bench/data), a folder, or a registered name
    data_dir: str = "data"  # where registered benchmarks live
    steps: int = 20  # timed steps per repeat
    warmup: int = 5  # untimed steps first (cuDNN autotuning, caches)
    repeats: int = 3  # timed blocks; the median is reported
    bf16: bool = False  # bf16 autocast in the compute and fast paths
    workers: int = -1  # plain path's DataLoader workers in all (-1: every CPU core)
    paths: tuple[str, ...] = ("compute", "plain", "fast")
    pretrained: bool = False  # timm weights from the hub (offline backbones always load their weights)
    seed: int = 0

    def resolved(self) -> "BenchConfig":
        from vldlib.train import resolve_device

        dev = resolve_device(self.device)
        gpu = dev.type == "cuda"
        return replace(self, device=str(dev),
                       backbone=self.backbone or ("resnet50" if gpu else "efficientnet_lite0.offline"),
                       resolution=self.resolution or (224 if gpu else 64),
                       train_stages=(None if gpu else 2) if self.train_stages == -1 else self.train_stages,
                       workers=self.workers if self.workers >= 0 else (os.cpu_count() or 1))


# ----------------------------------------------------------------------------- synthetic data
def _write_image(job: tuple[str, int, int, int, int]) -> None:
    """One JPEG: smooth random colour field, tinted by class, styled by domain, plus grain."""
    from PIL import Image

    path, seed, label, domain, size = job
    rng = np.random.default_rng(seed)
    low = rng.random((6, 6, 3)).astype(np.float32)
    low[..., label % 3] += 0.6 + 0.1 * (label // 3)
    img = Image.fromarray(np.clip(low / low.max() * 255, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) * (1.0 - 0.15 * domain) + 20 * domain
    arr = arr + rng.integers(-12, 13, size=arr.shape)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_synthetic_domains(root: str | os.PathLike, domains: int = 4, classes: int = 7, per_class: int = 225,
                            size: int = 256, seed: int = 0, processes: int | None = None) -> Path:
    """Write ROOT/d<i>/c<j>/<k>.jpg once (a marker file makes a second call free); return ROOT.

    JPEGs of a realistic size, so the plain path pays a realistic decoding cost. Written by a
    process pool: 6,300 images of 256 px take a few seconds on 16 cores.
    """
    root = Path(root)
    spec = {"domains": domains, "classes": classes, "per_class": per_class, "size": size, "seed": seed}
    marker = root / "synthetic.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    jobs = []
    for d in range(domains):
        for c in range(classes):
            folder = root / f"d{d}" / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(str(folder / f"{k:04d}.jpg"), seed_hash(seed, "synthetic", d, c, k), c, d, size)
                     for k in range(per_class)]
    processes = processes or os.cpu_count() or 1
    if processes > 1 and len(jobs) > 64:
        with mp.get_context("fork").Pool(processes) as pool:
            pool.map(_write_image, jobs, chunksize=max(1, len(jobs) // (processes * 8)))
    else:
        for job in jobs:
            _write_image(job)
    write_json_atomic(marker, spec)  # last: its presence means every image is there
    return root


def load_data(cfg: BenchConfig):
    """The benchmark to read (its first `domains` domains are trained on)."""
    from vldlib.data import load_benchmark

    if cfg.data == "synthetic":
        root = write_synthetic_domains(OUT / "data" / "synthetic", domains=max(4, cfg.domains))
        bench = load_benchmark(root, check_images=False, progress=False)
    else:
        bench = load_benchmark(cfg.data, cfg.data_dir, progress=False)
    if len(bench.domains) < cfg.domains:
        raise ValueError(f"{bench.name} has {len(bench.domains)} domains but --domains {cfg.domains}; "
                         f"pass --domains <= {len(bench.domains)}")
    small = [d for d, s in zip(bench.domains, bench.samples) if len(s) < cfg.batch_size]
    if small:
        raise ValueError(f"domains {small} of {bench.name} have fewer images than --batch-size {cfg.batch_size}")
    return bench


# ----------------------------------------------------------------------------- the training step
@contextlib.contextmanager
def backend_flags(*, tf32: bool, benchmark: bool, deterministic: bool = False) -> Iterator[None]:
    """Set cuDNN/matmul flags for one measurement and restore them after."""
    b = torch.backends
    old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic)
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = tf32, tf32 or old[1]
    b.cudnn.benchmark, b.cudnn.deterministic = benchmark, deterministic
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = old


class LoopStep:
    """One step of vldlib.train's loop on a list of per-domain (x, y) batches (data excluded)."""

    def __init__(self, cfg: BenchConfig, num_classes: int, *, channels_last: bool, bf16: bool,
                 host_syncs: bool = True):
        from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

        from vldlib.models import FineTuneNet, create_model, data_config, param_groups

        self.device = torch.device(cfg.device)
        torch.manual_seed(seed_hash(cfg.seed, "init"))
        model = create_model(cfg.backbone, num_classes, pretrained=cfg.pretrained, dropout=0.9)
        self.norm = data_config(model)
        self.net = FineTuneNet(model, cfg.train_stages, freeze_bn=True).to(self.device)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(param_groups(self.net, 1e-4), lr=1e-4, momentum=0.9, weight_decay=1e-4)
        self.averaged = AveragedModel(self.net, multi_avg_fn=get_swa_multi_avg_fn(), use_buffers=False)
        self.channels_last, self.bf16, self.seed, self.host_syncs = channels_last, bf16, cfg.seed, host_syncs
        self.net.train()

    def __call__(self, step: int, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        torch.manual_seed(seed_hash(self.seed, "step", step))
        x = torch.cat([b[0] for b in batch])
        y = torch.cat([b[1] for b in batch])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y)
        if not self.host_syncs:  # what the hardware could do without the loop's read-backs
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.averaged.update_parameters(self.net)
            return 0.0
        finite = bool(torch.isfinite(loss))  # the loop's divergence check (a host sync, as there)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.averaged.update_parameters(self.net)
        value = loss.item()
        (logits.argmax(1) == y).sum().item()
        return value if finite else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contender:
    """A data path ready to time: its batches and the loop step that consumes them."""

    batches: Iterator
    step: LoopStep
    info: dict = field(default_factory=dict)
    close: Callable[[], None] | None = None


def time_rates(contenders: dict[str, Contender], images_per_step: int, cfg: BenchConfig) -> dict[str, dict]:
    """Median images/s of each contender over `repeats` blocks of `steps` steps, after `warmup` steps.

    Blocks are interleaved (A B A B ...), so a slow spell of a shared machine hits every path
    alike and the ratios stay meaningful even when the absolute rates are noisy.
    """
    done = {k: 0 for k in contenders}
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    try:
        for name, c in contenders.items():
            for _ in range(cfg.warmup):
                c.step(done[name], next(c.batches))
                done[name] += 1
        for _ in range(cfg.repeats):
            for name, c in contenders.items():
                _sync(c.step.device)
                t0 = time.perf_counter()
                for _ in range(cfg.steps):
                    c.step(done[name], next(c.batches))
                    done[name] += 1
                _sync(c.step.device)
                rates[name].append(images_per_step * cfg.steps / (time.perf_counter() - t0))
    finally:
        for c in contenders.values():
            if c.close is not None:
                c.close()
    return {k: {"rate": statistics.median(v), "rates": v, **contenders[k].info} for k, v in rates.items()}


def _total_steps(cfg: BenchConfig) -> int:
    return cfg.warmup + cfg.steps * cfg.repeats


# ----------------------------------------------------------------------------- the three paths
def compute_contender(cfg: BenchConfig, num_classes: int, *, channels_last: bool = True,
                      bf16: bool | None = None, host_syncs: bool = True) -> Contender:
    """Path 1: the same batch tensors, already on the device, every step."""
    step = LoopStep(cfg, num_classes, channels_last=channels_last, bf16=cfg.bf16 if bf16 is None else bf16,
                    host_syncs=host_syncs)
    g = torch.Generator().manual_seed(cfg.seed)
    r = cfg.resolution
    batch = [(torch.randn(cfg.batch_size, 3, r, r, generator=g).to(step.device),
              torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(step.device))
             for _ in range(cfg.domains)]

    def forever():
        while True:
            yield batch

    return Contender(forever(), step)


def measure_compute(cfg: BenchConfig, num_classes: int, *, channels_last: bool = True, tf32: bool = True,
                    bf16: bool | None = None, deterministic: bool = False, host_syncs: bool = True) -> dict:
    """Path 1 alone, under the given backend flags (DomainBed's: no TF32 matmuls, deterministic)."""
    with backend_flags(tf32=tf32, benchmark=not deterministic, deterministic=deterministic):
        c = compute_contender(cfg, num_classes, channels_last=channels_last, bf16=bf16, host_syncs=host_syncs)
        return time_rates({"compute": c}, cfg.domains * cfg.batch_size, cfg)["compute"]


def _infinite(loader) -> Iterator:
    while True:
        yield from loader


def measure_plain(cfg: BenchConfig, bench) -> dict:
    """Path 2 (DomainBed): ImageDataset + train_transform, a shuffled DataLoader per domain with
    workers, plain `.to(device)`, fp32, NCHW, cuDNN deterministic and not autotuned. Timed on its
    own: its workers prefetch while other paths run, which would flatter it if interleaved."""
    from vldlib.data.datasets import ImageDataset
    from vldlib.data.transforms import train_transform

    with backend_flags(tf32=False, benchmark=False, deterministic=True):
        step = LoopStep(cfg, len(bench.classes), channels_last=False, bf16=False)
        tf = train_transform(cfg.resolution, step.norm["mean"], step.norm["std"])
        per = max(1, cfg.workers // cfg.domains) if cfg.workers > 0 else 0
        loaders = [torch.utils.data.DataLoader(
            ImageDataset(bench.samples[e], tf), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
            num_workers=per, persistent_workers=per > 0,
            generator=torch.Generator().manual_seed(seed_hash(cfg.seed, "plain", e)))
            for e in range(cfg.domains)]
        iters = [_infinite(ld) for ld in loaders]

        def batches():
            while True:
                yield [(x.to(step.device), y.to(step.device)) for x, y in (next(it) for it in iters)]

        out = time_rates({"plain": Contender(batches(), step, {"workers_per_domain": per})},
                         cfg.domains * cfg.batch_size, cfg)["plain"]
        del iters, loaders  # stops the worker processes
        return out


def cached_sources(cfg: BenchConfig, bench) -> tuple[list, float]:
    """Decoded-image cache of the first `domains` domains (built once, timed) as ArraySources."""
    from vldlib.data.cache import cached_domain
    from vldlib.data.gpu_augment import ArraySource

    t0 = time.perf_counter()
    sources = [ArraySource(*cached_domain(bench.samples[e], cfg.resolution,
                                          name=f"{bench.name}-{bench.domains[e]}".replace(" ", "_"), progress=False))
               for e in range(cfg.domains)]
    return sources, time.perf_counter() - t0


def fast_contender(cfg: BenchConfig, bench, sources: list, *, overlap: bool = True,
                   bf16: bool | None = None) -> Contender:
    """Path 3: cached uint8 images, batched augmentation on the device, prepared ahead, channels_last,
    TF32, optional bf16: the loop's augment_on="device" path (vldlib.data.gpu_augment.DeviceBatches)."""
    from vldlib.data.gpu_augment import DeviceBatches

    step = LoopStep(cfg, len(bench.classes), channels_last=True, bf16=cfg.bf16 if bf16 is None else bf16)
    loader = DeviceBatches(sources, list(range(cfg.domains)), batch_size=cfg.batch_size, seed=cfg.seed, start=0,
                           stop=_total_steps(cfg), device=step.device, size=cfg.resolution, mean=step.norm["mean"],
                           std=step.norm["std"], overlap=overlap)
    it = iter(loader)
    return Contender(it, step, {"overlap": overlap}, close=it.close)


def measure_cached_workers(cfg: BenchConfig, bench, sources: list) -> dict:
    """A fast-path variant: cached uint8 arrays, torchvision transforms per image in the loop's
    DataLoader (augment_on="workers", cache_images=True). Timed on its own (workers prefetch)."""
    from vldlib.data.datasets import ArrayDataset
    from vldlib.data.transforms import train_transform
    from vldlib.train import StepBatches

    with backend_flags(tf32=True, benchmark=True):
        step = LoopStep(cfg, len(bench.classes), channels_last=True, bf16=cfg.bf16)
        tf = train_transform(cfg.resolution, step.norm["mean"], step.norm["std"])
        per = max(0, cfg.workers // cfg.domains)
        loaders = [torch.utils.data.DataLoader(
            ArrayDataset(s.images, s.labels, tf), num_workers=per, pin_memory=step.device.type == "cuda",
            batch_sampler=StepBatches(len(s), cfg.batch_size, cfg.seed, e, 0, _total_steps(cfg)))
            for e, s in enumerate(sources)]

        def batches():
            for batch in zip(*loaders):
                yield [(x.to(step.device, non_blocking=True), y.to(step.device, non_blocking=True)) for x, y in batch]

        return time_rates({"v2": Contender(batches(), step, {"workers_per_domain": per})},
                          cfg.domains * cfg.batch_size, cfg)["v2"]


# ----------------------------------------------------------------------------- one bench
def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(cfg: BenchConfig, *, json_path: str | os.PathLike | None = None, log: Callable = print) -> dict:
    """Measure the requested paths; print and write (atomically) the rates and ratios as JSON.

    compute and the in-process fast variants are timed interleaved; plain (and, on a CPU, the
    cached-arrays-with-workers variant) on their own. The fast rate is the best measured variant.
    """
    cfg = cfg.resolved()
    for p in cfg.paths:
        if p not in ("compute", "plain", "fast"):
            raise ValueError(f"unknown path {p!r}; choose from compute, plain, fast")
    bench = load_data(cfg)
    gpu = torch.device(cfg.device).type == "cuda"
    n_img = cfg.domains * cfg.batch_size
    details: dict[str, dict] = {}
    variants: dict[str, dict] = {}
    sources, cache_s = cached_sources(cfg, bench) if "fast" in cfg.paths else ([], 0.0)
    with backend_flags(tf32=True, benchmark=True):
        contenders = {}
        if "compute" in cfg.paths:
            contenders["compute"] = compute_contender(cfg, len(bench.classes))
        if "fast" in cfg.paths:
            # on a CPU the background thread competes with compute for the cores: measure both ways
            for overlap in ((True,) if gpu else (True, False)):
                name = "device_batched_" + ("overlap" if overlap else "inline")
                contenders[name] = fast_contender(cfg, bench, sources, overlap=overlap)
        for name, res in time_rates(contenders, n_img, cfg).items():
            (details if name == "compute" else variants)[name] = res
    if "fast" in cfg.paths and not gpu:
        variants["cache_workers_v2"] = measure_cached_workers(cfg, bench, sources)
    for name, res in variants.items():
        log(f"  fast variant {name}: {res['rate']:.1f} img/s", flush=True)
    if variants:
        best = max(variants, key=lambda k: variants[k]["rate"])
        details["fast"] = {**variants[best], "variant": best, "cache_build_s": cache_s,
                           "variants": {k: v["rate"] for k, v in variants.items()}}
    if "plain" in cfg.paths:
        details["plain"] = measure_plain(cfg, bench)
    rates = {p: details[p]["rate"] for p in ("compute", "plain", "fast") if p in details}
    for k, v in rates.items():
        log(f"  {k:8s} {v:9.1f} img/s", flush=True)
    ratios = {}
    if "fast" in rates and "compute" in rates:
        ratios["fast/compute"] = rates["fast"] / rates["compute"]
    if "fast" in rates and "plain" in rates:
        ratios["fast/plain"] = rates["fast"] / rates["plain"]
    for k, v in ratios.items():
        log(f"  {k:13s} {v:6.2f}x", flush=True)
    result = {"config": asdict(cfg), "device": device_name(cfg.device), "torch": torch.__version__,
              "images_per_step": n_img, "rates_img_per_s": rates, "ratios": ratios, "details": details,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(json_path) if json_path else OUT / (
        f"bench-{torch.device(cfg.device).type}-{cfg.backbone.replace('/', '_')}-{cfg.resolution}px"
        f"{'-bf16' if cfg.bf16 else ''}.json")
    write_json_atomic(path, result)
    result["json"] = str(path)
    return result


# ----------------------------------------------------------------------------- runs and sweeps
def time_training_run(root: str | os.PathLike, steps: int, *, backbone: str, resolution: int, device: str,
                      out: str | os.PathLike, test_env: int = -1, batch_size: int = 32, **overrides) -> dict:
    """Wall time of one `vldlib.train.train` run (augment_on="device", cache_images) of `steps` steps,
    evaluated once at the end; the record's step_time is the loop's own mean time per step."""
    from vldlib.data import load_benchmark
    from vldlib.train import TrainConfig, train
    from vldlib.utils import read_jsonl

    n_dom = len(load_benchmark(root, check_images=False, progress=False).domains)
    cfg = TrainConfig(benchmark=str(root), test_envs=[test_env % n_dom], backbone=backbone, pretrained=False,
                      resolution=resolution, steps=steps, eval_every=steps, average_from=min(300, steps),
                      batch_size=batch_size, lr=1e-4, augment_on="device", cache_images=True, channels_last=True,
                      device=device, out=str(out), progress=False, keep_last=False,
                      run_name=f"t{steps}-{backbone}-{resolution}-{time.time_ns()}", **overrides)
    t0 = time.perf_counter()
    run_dir = train(cfg)
    wall = time.perf_counter() - t0
    rec = [r for r in read_jsonl(run_dir / "records.jsonl") if r.get("type") == "eval"][-1]
    return {"steps": steps, "wall_s": wall, "step_time_s": rec["step_time"], "steps_per_s": 1 / rec["step_time"],
            "other_s": wall - steps * rec["step_time"], "peak_mem_mb": rec["peak_mem_mb"]}


def steps_scaling(root: str | os.PathLike, steps: tuple[int, int], **kw) -> dict:
    """Two runs of n and m steps: wall = fixed + per_step x steps. Linear when the per-step slope
    between the runs matches the loop's measured step time (no hidden per-run growth)."""
    a, b = (time_training_run(root, s, **kw) for s in steps)
    slope = (b["wall_s"] - a["wall_s"]) / (b["steps"] - a["steps"])
    return {"runs": [a, b], "slope_s_per_step": slope, "fixed_s": a["wall_s"] - slope * a["steps"],
            "loop_step_time_s": [a["step_time_s"], b["step_time_s"]],
            "slope_over_step_time": slope / b["step_time_s"]}


def sweep_wall_time(jobs: int, run_s: float, gpus: int) -> float:
    """Local launcher, one job per GPU at a time: ceil(jobs / gpus) rounds of one run each."""
    return math.ceil(jobs / gpus) * run_s


def sweep_note(run_s: float, jobs: int = 288, gpus: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> str:
    """Markdown lines: a sweep's wall time by number of GPUs. 288 jobs = one dropout rate on the
    paper's grid: 4 benchmarks x 4 held-out domains x 2 lr x 3 weight decays x 3 seeds."""
    lines = [f"Sweep of {jobs} runs of {run_s / 60:.1f} min (local launcher, one run per GPU): "]
    lines += [f"- {g} GPU{'s' if g > 1 else ''}: {sweep_wall_time(jobs, run_s, g) / 3600:.1f} h" for g in gpus]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the GPU check
@dataclass(frozen=True)
class CheckPlan:
    """What `gpu_check` measures. GPU_PLAN is the real one; SMOKE_PLAN runs every stage on a CPU in
    seconds (tiny models and images), so the one GPU run is not where its bugs are found."""

    device: str = "cuda"
    big: str = "resnet50"  # random init: no network
    small: str = "tf_efficientnet_lite0"
    resolution: int = 224
    per_class: int = 225  # synthetic: 4 domains x 7 classes
    image_size: int = 256
    steps: int = 15
    warmup: int = 5
    repeats: int = 3
    train_steps: int = 500
    scaling: tuple[int, int] = (100, 300)


GPU_PLAN = CheckPlan()
SMOKE_PLAN = CheckPlan(device="cpu", big="test_resnet", small="test_efficientnet", resolution=32, per_class=8,
                       image_size=40, steps=2, warmup=1, repeats=1, train_steps=4, scaling=(2, 4))


def gpu_check(budget_s: float = 360.0, out: Path = OUT, log: Callable = print, plan: CheckPlan = GPU_PLAN) -> int:
    """Self-contained GPU report (no network, random init): bench resnet50 and tf_efficientnet_lite0 at
    224 px on synthetic JPEGs, a 500-step run of the real loop (fp32/TF32 and bf16), steps scaling,
    the sweep note. Every stage is guarded: a failure or the time budget skips it and the table
    still prints. Exit code 0: every stage ran; 1: some failed or were skipped; 2: no CUDA."""
    t_start = time.perf_counter()
    if plan.device == "cuda" and not torch.cuda.is_available():
        log("gpu-check: CUDA is not available on this machine; run it on a GPU machine.", flush=True)
        return 2
    rows: list[dict] = []
    report: dict = {"torch": torch.__version__, "cpus": os.cpu_count(), "plan": asdict(plan), "rows": rows}

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    def stage(name: str, need_s: float, fn: Callable[[], dict]) -> dict | None:
        if left() < need_s:
            rows.append({"stage": name, "status": f"skipped ({left():.0f} s left, needs ~{need_s:.0f} s)"})
            log(f"[gpu-check] {name}: skipped, time budget", flush=True)
            return None
        log(f"[gpu-check] {name} ... ({left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn()
            rows.append({"stage": name, "status": "ok", "seconds": time.perf_counter() - t0, **res})
            log(f"[gpu-check] {name}: {json.dumps(res, default=_short)}", flush=True)
            return res
        except Exception as e:  # one failure must not hide the rest of the table
            rows.append({"stage": name, "status": f"error: {type(e).__name__}: {e}"})
            log(f"[gpu-check] {name}: FAILED\n{traceback.format_exc()}", flush=True)
            return None

    root = out / "data" / "synthetic"
    px = f"{plan.resolution}px"
    # written before CUDA starts in this process: the pool forks
    stage(f"write synthetic JPEGs (4 domains x 7 classes x {plan.per_class}, {plan.image_size} px)", 30,
          lambda: {"root": str(write_synthetic_domains(root, domains=4, per_class=plan.per_class,
                                                       size=plan.image_size))})
    report["device"] = device_name(plan.device)
    base = BenchConfig(device=plan.device, resolution=plan.resolution, batch_size=32, domains=3, steps=plan.steps,
                       warmup=plan.warmup, repeats=plan.repeats, train_stages=None, data=str(root))

    def cache() -> dict:
        from vldlib.data import load_benchmark
        from vldlib.data.cache import cached_benchmark
        bench = load_benchmark(root, progress=False)  # checks the images once (cached)
        t0 = time.perf_counter()
        cached_benchmark(bench, plan.resolution, progress=False)
        return {"cache_build_s": time.perf_counter() - t0, "images": sum(map(len, bench.samples))}

    stage(f"decoded-image cache at {px}", 45, cache)
    runs: dict[str, dict] = {}

    def bench_row(key: str, cfg: BenchConfig, paths: tuple[str, ...]) -> Callable[[], dict]:
        def fn() -> dict:
            res = run_bench(replace(cfg, paths=paths), json_path=out / f"gpu_check-{key}.json", log=log)
            runs[key] = res
            return {**{f"{k}_img_s": v for k, v in res["rates_img_per_s"].items()}, **res["ratios"]}
        return fn

    big = replace(base, backbone=plan.big)
    stage(f"{plan.big} {px} fp32/TF32: compute, fast, plain", 60,
          bench_row(f"{plan.big}", big, ("compute", "fast", "plain")))
    stage(f"{plan.big} {px} compute with DomainBed's settings (fp32, NCHW, deterministic)", 25,
          lambda: {"compute_img_s": measure_compute(big.resolved(), 7, channels_last=False, tf32=False,
                                                    deterministic=True)["rate"]})
    stage(f"{plan.big} {px} bf16: compute, fast", 40,
          bench_row(f"{plan.big}-bf16", replace(big, bf16=True), ("compute", "fast")))
    stage(f"{plan.big} {px} bf16 compute without the loop's per-step host syncs", 25,
          lambda: {"compute_img_s": measure_compute(replace(big, bf16=True).resolved(), 7, host_syncs=False)["rate"]})
    stage(f"{plan.small} {px}: compute, fast, plain", 50,
          bench_row(plan.small, replace(base, backbone=plan.small), ("compute", "fast", "plain")))

    loops: dict[str, dict] = {}

    def train_run(bf16: bool) -> Callable[[], dict]:
        def fn() -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                res = time_training_run(root, plan.train_steps, backbone=plan.big, resolution=plan.resolution,
                                        device=plan.device, out=tmp, bf16=bf16)
            loops["bf16" if bf16 else "fp32/TF32"] = res
            return {**res, "10k_steps_train_only_min": 10_000 * res["step_time_s"] / 60}
        return fn

    stage(f"real loop: {plan.big} {px}, {plan.train_steps} steps, augment_on=device, cache_images", 70,
          train_run(False))
    stage("real loop: the same with bf16", 60, train_run(True))

    def scaling() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            res = steps_scaling(root, plan.scaling, backbone=plan.big, resolution=plan.resolution,
                                device=plan.device, out=tmp)
        return {"fixed_s": res["fixed_s"], "slope_s_per_step": res["slope_s_per_step"],
                "loop_step_time_s": res["loop_step_time_s"][1], "slope_over_step_time": res["slope_over_step_time"],
                "walls_s": [r["wall_s"] for r in res["runs"]]}

    stage(f"steps scaling: real loop at {plan.scaling[0]} and {plan.scaling[1]} steps", 50, scaling)

    # --- the table, last
    lines = [f"# vldlib GPU check: {report.get('device')}, torch {torch.__version__}, {os.cpu_count()} CPUs", "",
             "| measurement | compute img/s | plain img/s | fast img/s | fast/compute | fast/plain |",
             "|---|---|---|---|---|---|"]
    for key, res in runs.items():
        r, q = res["rates_img_per_s"], res["ratios"]
        lines.append(f"| {key} {px} | {_fmt(r.get('compute'))} | {_fmt(r.get('plain'))} | {_fmt(r.get('fast'))} | "
                     f"{_fmt(q.get('fast/compute'), 2)} | {_fmt(q.get('fast/plain'), 2)} |")
    for precision, loop in loops.items():
        run_10k = 10_000 * loop["step_time_s"]
        lines += ["", f"Real loop ({plan.big}, {px}, 3 x 32, {precision}, channels_last, device augmentation, "
                      f"{plan.train_steps} steps): {loop['steps_per_s']:.2f} steps/s, {loop['step_time_s'] * 1e3:.1f} ms/step; "
                      f"10k steps = {run_10k / 60:.1f} min of training "
                      f"(target <= 5 min: {'holds' if run_10k <= 300 else 'does not hold'}), "
                      f"plus evaluations (this run's setup + 1 evaluation took {loop['other_s']:.0f} s).", "",
                  sweep_note(run_10k)]
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {_fmt(r.get('seconds'))} |" for r in rows]
    lines += ["", f"total {time.perf_counter() - t_start:.0f} s"]
    table = "\n".join(lines)
    report["markdown"] = table
    write_json_atomic(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", table + "\n")
    log("\n" + table, flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _fmt(v, nd: int = 0) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _short(v):
    return round(v, 3) if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- command line
def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training throughput: compute limit vs DomainBed's path vs vldlib's",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  python -m vldlib bench --resolution 64 --domains 3\n"
                              "  python -m vldlib bench --device cuda --backbone resnet50 --bf16\n"
                              "  python -m vldlib bench --gpu-check")
    d = BenchConfig()
    p.add_argument("--backbone", help="timm name or offline backbone (default: resnet50 on GPU, "
                                      "efficientnet_lite0.offline on CPU)")
    p.add_argument("--resolution", type=int, help="pixels (default 224 on GPU, 64 on CPU)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per domain")
    p.add_argument("--domains", type=int, default=d.domains, help="training domains per step")
    p.add_argument("--train-stages", type=int, default=d.train_stages,
                   help="train the last k stages (-1: 2 on CPU, all on GPU; -2: all)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--data", default=d.data, help="'synthetic', a benchmark folder or a registered name")
    p.add_argument("--data-dir", default=d.data_dir)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the compute and fast paths")
    p.add_argument("--workers", type=int, default=d.workers, help="plain path's DataLoader workers in all")
    p.add_argument("--paths", default=",".join(d.paths), help="comma list of compute,plain,fast")
    p.add_argument("--json", help="output file (default outputs/bench/bench-<device>-<backbone>-<res>.json)")
    p.add_argument("--steps-scaling", nargs="?", const="50,100", metavar="N,M",
                   help="time real training runs of N and M steps instead (default 50,100)")
    p.add_argument("--gpu-check", action="store_true", help="the self-contained GPU report (~5 min on an H100)")
    p.add_argument("--gpu-check-smoke", action="store_true",
                   help="every --gpu-check stage on the CPU with tiny models (a minute): checks the script itself")
    p.add_argument("--budget", type=float, default=360.0, help="--gpu-check's internal time budget in seconds")
    p.set_defaults(func=_cli_bench)


def _cli_bench(args: argparse.Namespace) -> int:
    if args.gpu_check or args.gpu_check_smoke:
        if args.gpu_check_smoke:
            return gpu_check(args.budget, out=OUT / "smoke", plan=SMOKE_PLAN)
        return gpu_check(args.budget)
    cfg = BenchConfig(backbone=args.backbone, resolution=args.resolution, batch_size=args.batch_size,
                      domains=args.domains, train_stages=None if args.train_stages == -2 else args.train_stages,
                      device=args.device, data=args.data, data_dir=args.data_dir, steps=args.steps,
                      warmup=args.warmup, repeats=args.repeats, bf16=args.bf16, workers=args.workers,
                      paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()))
    try:
        if args.steps_scaling:
            n, m = (int(s) for s in args.steps_scaling.split(","))
            c = cfg.resolved()
            root = OUT / "data" / "synthetic" if c.data == "synthetic" else c.data
            if c.data == "synthetic":
                write_synthetic_domains(root, domains=max(4, c.domains))
            with tempfile.TemporaryDirectory() as tmp:
                res = steps_scaling(root, (n, m), backbone=c.backbone, resolution=c.resolution, device=c.device,
                                    out=tmp, batch_size=c.batch_size, train_stages=c.train_stages)
            res["note"] = sweep_note(10_000 * res["runs"][-1]["step_time_s"])
            path = Path(args.json) if args.json else OUT / f"steps-scaling-{torch.device(c.device).type}.json"
            write_json_atomic(path, res)
            print(json.dumps({k: v for k, v in res.items() if k != "note"}, indent=1, default=_short))
            print(res["note"])
            return 0
        print(f"[vldlib] bench on {device_name(cfg.resolved().device)}", flush=True)
        res = run_bench(cfg, json_path=args.json)
        print(f"[vldlib] written {res['json']}")
        return 0
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
