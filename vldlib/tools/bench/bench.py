"""`python -m vldlib bench`: training throughput measured against the hardware limit.

Three rates, in images per second, for one training configuration:

1. compute: training steps on tensors already on the device. The limit: no data work at all.
2. plain: what DomainBed does. PIL decoding and torchvision transforms in DataLoader workers,
   fp32, NCHW, cuDNN deterministic, the whole network every step. This is the peer baseline.
3. fast: vldlib's path. On a CPU in the quickstart's configuration, the cached outputs of the
   frozen trunk (`TrainConfig.cache_trunk`), gathered per step. On images, the decoded-image
   cache, with augmentation batched where the model runs (vldlib.data.gpu_augment), prepared
   ahead in a background thread (pinned memory and a side CUDA stream on a GPU), channels_last,
   TF32, and bf16 autocast with --bf16.

Every step is the training loop's own step (`vldlib.loop.step.TrainStep`): the run's network with dropout and
frozen BatchNorm, SGD with momentum and weight decay, the running weight average, and the loop's
per-step host syncs (finite-loss check, loss and accuracy read back). A ratio fast/compute near 1
therefore means that data loading costs nothing in the real loop. Each rate is the median of
`repeats` timed blocks of `steps` steps after `warmup` steps; compute and fast blocks alternate,
and fast/compute is the median of the per-block ratios, so a slow spell of a shared machine hits
both alike and cancels out.

    python -m vldlib bench                         # CPU: the quickstart's runs (vldlib.tools.bench.runs)
    python -m vldlib bench --resolution 64 --domains 3 --train-stages 2   # CPU: Lite0 on images
    python -m vldlib bench --device cuda --bf16    # GPU: resnet50 (random init), 224 px
    python -m vldlib bench --steps-scaling         # time per run grows linearly with steps
    python -m vldlib bench --bf16-accuracy         # bf16 vs fp32 accuracy (vldlib.tools.bench.precision)
    python -m vldlib bench --gpu-check             # the self-contained GPU report (vldlib.tools.bench.gpu_check)

Results are written as JSON under outputs/bench/.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vldlib.config import TrainConfig
from vldlib.data import load_benchmark
from vldlib.data.cache import cached_domain
from vldlib.data.datasets import ArrayDataset, ImageDataset
from vldlib.data.gpu_augment import ArraySource, DeviceBatches
from vldlib.data.transforms import train_transform
from vldlib.loop import build_run_net, resolve_device
from vldlib.loop.batches import StepBatches
from vldlib.loop.device import usable_cores
from vldlib.loop.step import TrainStep
from vldlib.utils import seed_hash, write_json_atomic

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
    repeats: int = 5  # timed blocks; the median is reported
    bf16: bool = False  # bf16 autocast in the compute and fast paths
    compile: bool = False  # torch.compile the step's forward in the compute and fast paths (compiles in warmup)
    workers: int = -1  # plain path's DataLoader workers in all (-1: every CPU core)
    paths: tuple[str, ...] = ("compute", "plain", "fast")
    pretrained: bool = False  # timm weights from the hub (offline backbones always load their weights)
    seed: int = 0

    def train_config(self, *, channels_last: bool, bf16: bool) -> TrainConfig:
        """The run configuration whose loop step is timed (90% dropout, frozen BN, SGD as the paper)."""
        return TrainConfig(backbone=self.backbone, pretrained=self.pretrained, dropout=0.9,
                           train_stages=self.train_stages, lr=1e-4, weight_decay=1e-4, device=self.device,
                           seed=self.seed, channels_last=channels_last, bf16=bf16, compile=self.compile)

    def resolved(self) -> "BenchConfig":

        dev = resolve_device(self.device)
        gpu = dev.type == "cuda"
        return replace(self, device=str(dev),
                       backbone=self.backbone or ("resnet50" if gpu else "efficientnet_lite0.offline"),
                       resolution=self.resolution or (224 if gpu else 64),
                       train_stages=(None if gpu else 2) if self.train_stages == -1 else self.train_stages,
                       workers=self.workers if self.workers >= 0 else usable_cores())


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
    processes = processes or usable_cores()
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
    """The training loop's own step (`vldlib.loop.step.TrainStep`, the object `vldlib.loop.train`
    steps with) on a run's own network (`vldlib.loop.build_run_net`: dropout, frozen BatchNorm,
    trunk/tail split), plus the loop's per-step host syncs (finite-loss check, loss and accuracy
    read back); data excluded. `host_syncs=False` leaves the read-backs out: what the hardware
    could do without them.
    """

    def __init__(self, tcfg: TrainConfig, num_classes: int, *, tail: bool = False, host_syncs: bool = True):
        self.device = resolve_device(tcfg.device)
        self.net, self.norm, _ = build_run_net(tcfg, num_classes, self.device)
        forward = self.net.tail if tail else self.net  # cache_trunk: the loop runs the tail only
        if tcfg.compile:  # as the loop does; the first (warmup) step compiles
            forward = torch.compile(forward, dynamic=False)
        self.sgd = TrainStep(self.net, tcfg, forward)
        self.host_syncs = host_syncs
        self.net.train()

    @classmethod
    def for_bench(cls, cfg: BenchConfig, num_classes: int, *, channels_last: bool, bf16: bool,
                  host_syncs: bool = True) -> "LoopStep":
        return cls(cfg.train_config(channels_last=channels_last, bf16=bf16), num_classes, host_syncs=host_syncs)

    def __call__(self, step: int, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        loss, logits, y = self.sgd.loss(step, batch)
        if not self.host_syncs:
            self.sgd.update(loss, step + 1)
            return 0.0
        finite = bool(torch.isfinite(loss))  # the loop's divergence check (a host sync, as there)
        self.sgd.update(loss, step + 1)
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
    together = "+".join(contenders)  # blocks of these contenders alternated: their ratios pair up
    return {k: {"rate": statistics.median(v), "rates": v, "timed_with": together, **contenders[k].info}
            for k, v in rates.items()}


def rate_ratio(a: dict, b: dict) -> float:
    """a's rate over b's: the median of per-block ratios when their blocks alternated (robust to a
    slow spell of a shared machine), else the ratio of the medians."""
    if a.get("timed_with") and a.get("timed_with") == b.get("timed_with") and len(a["rates"]) == len(b["rates"]):
        return statistics.median(x / y for x, y in zip(a["rates"], b["rates"]))
    return a["rate"] / b["rate"]


def check_paths(paths: tuple[str, ...]) -> None:
    for p in paths:
        if p not in ("compute", "plain", "fast"):
            raise ValueError(f"unknown path {p!r}; choose from compute, plain, fast")


def total_steps(cfg: BenchConfig) -> int:
    return cfg.warmup + cfg.steps * cfg.repeats


# ----------------------------------------------------------------------------- the three paths
def compute_contender(cfg: BenchConfig, num_classes: int, *, channels_last: bool = True,
                      bf16: bool | None = None, host_syncs: bool = True) -> Contender:
    """Path 1: the same batch tensors, already on the device, every step."""
    step = LoopStep.for_bench(cfg, num_classes, channels_last=channels_last, bf16=cfg.bf16 if bf16 is None else bf16,
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
    """Path 2 (DomainBed) for an image-level bench: the first `domains` domains, augmented."""

    with backend_flags(tf32=False, benchmark=False, deterministic=True):
        step = LoopStep.for_bench(replace(cfg, compile=False), len(bench.classes), channels_last=False, bf16=False)
        tf = train_transform(cfg.resolution, step.norm["mean"], step.norm["std"])
        return time_plain(step, [bench.samples[e] for e in range(cfg.domains)], tf, cfg)


def time_plain(step: LoopStep, samples: list[list], transform, cfg: BenchConfig) -> dict:
    """Path 2 (DomainBed): ImageDataset + transform, a shuffled DataLoader per domain with workers,
    plain `.to(device)`, fp32, NCHW, cuDNN deterministic and not autotuned (the caller sets the
    flags and builds `step` that way). Timed on its own: its workers prefetch while other paths
    run, which would flatter it if interleaved."""

    per = max(1, cfg.workers // len(samples)) if cfg.workers > 0 else 0
    loaders = [torch.utils.data.DataLoader(
        ImageDataset(s, transform), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=per, persistent_workers=per > 0,
        generator=torch.Generator().manual_seed(seed_hash(cfg.seed, "plain", e)))
        for e, s in enumerate(samples)]
    iters = [_infinite(ld) for ld in loaders]

    def batches():
        while True:
            yield [(x.to(step.device), y.to(step.device)) for x, y in (next(it) for it in iters)]  # noqa: F821

    out = time_rates({"plain": Contender(batches(), step, {"workers_per_domain": per})},
                     len(samples) * cfg.batch_size, cfg)["plain"]
    del iters, loaders  # stops the worker processes
    return out


def cached_sources(cfg: BenchConfig, bench) -> tuple[list, float]:
    """Decoded-image cache of the first `domains` domains (built once, timed) as ArraySources."""

    t0 = time.perf_counter()
    sources = [ArraySource(*cached_domain(bench.samples[e], cfg.resolution,
                                          name=f"{bench.name}-{bench.domains[e]}".replace(" ", "_"), progress=False))
               for e in range(cfg.domains)]
    return sources, time.perf_counter() - t0


def fast_contender(cfg: BenchConfig, bench, sources: list, *, overlap: bool = True,
                   bf16: bool | None = None) -> Contender:
    """Path 3: cached uint8 images, batched augmentation on the device, prepared ahead, channels_last,
    TF32, optional bf16: the loop's augment_on="device" path (vldlib.data.gpu_augment.DeviceBatches)."""

    step = LoopStep.for_bench(cfg, len(bench.classes), channels_last=True, bf16=cfg.bf16 if bf16 is None else bf16)
    loader = DeviceBatches(sources, list(range(cfg.domains)), batch_size=cfg.batch_size, seed=cfg.seed, start=0,
                           stop=total_steps(cfg), device=step.device, size=cfg.resolution, mean=step.norm["mean"],
                           std=step.norm["std"], overlap=overlap)
    it = iter(loader)
    return Contender(it, step, {"overlap": overlap}, close=it.close)


def measure_cached_workers(cfg: BenchConfig, bench, sources: list) -> dict:
    """A fast-path variant: cached uint8 arrays, torchvision transforms per image in the loop's
    DataLoader (augment_on="workers", cache_images=True). Timed on its own (workers prefetch)."""

    with backend_flags(tf32=True, benchmark=True):
        step = LoopStep.for_bench(cfg, len(bench.classes), channels_last=True, bf16=cfg.bf16)
        tf = train_transform(cfg.resolution, step.norm["mean"], step.norm["std"])
        per = max(0, cfg.workers // cfg.domains)
        loaders = [torch.utils.data.DataLoader(
            ArrayDataset(s.images, s.labels, tf), num_workers=per, pin_memory=step.device.type == "cuda",
            batch_sampler=StepBatches(len(s), cfg.batch_size, cfg.seed, e, 0, total_steps(cfg)))
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
    check_paths(cfg.paths)
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
    path = Path(json_path) if json_path else OUT / (
        f"bench-{torch.device(cfg.device).type}-{cfg.backbone.replace('/', '_')}-{cfg.resolution}px"
        f"{'-bf16' if cfg.bf16 else ''}{'-compile' if cfg.compile else ''}.json")
    return report_rates(details, {"config": asdict(cfg)}, n_img, cfg.device, path, log)


def report_rates(details: dict[str, dict], config: dict, images_per_step: int, device: str, path: Path,
                 log: Callable = print) -> dict:
    """Print the rates and the ratios fast/compute and fast/plain; write them, with `details`, as JSON."""
    rates = {p: details[p]["rate"] for p in ("compute", "plain", "fast") if p in details}
    for k, v in rates.items():
        log(f"  {k:8s} {v:9.1f} img/s  ({1e3 * images_per_step / v:.1f} ms/step)", flush=True)
    ratios = {f"fast/{p}": rate_ratio(details["fast"], details[p]) for p in ("compute", "plain")
              if "fast" in rates and p in rates}
    for k, v in ratios.items():
        log(f"  {k:13s} {v:6.2f}x", flush=True)
    result = {**config, "device": device_name(device), "torch": torch.__version__,
              "images_per_step": images_per_step, "rates_img_per_s": rates, "ratios": ratios, "details": details,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(path, result)
    result["json"] = str(path)
    return result
