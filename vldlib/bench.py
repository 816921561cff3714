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

Every step is the training loop's own step (vldlib.train): the run's network with dropout and
frozen BatchNorm, SGD with momentum and weight decay, the running weight average, and the loop's
per-step host syncs (finite-loss check, loss and accuracy read back). A ratio fast/compute near 1
therefore means that data loading costs nothing in the real loop. Each rate is the median of
`repeats` timed blocks of `steps` steps after `warmup` steps; compute and fast blocks alternate,
and fast/compute is the median of the per-block ratios, so a slow spell of a shared machine hits
both alike and cancels out.

    python -m vldlib bench                         # CPU: the quickstart's runs (vldlib.bench_runs)
    python -m vldlib bench --resolution 64 --domains 3 --train-stages 2   # CPU: Lite0 on images
    python -m vldlib bench --device cuda --bf16    # GPU: resnet50 (random init), 224 px
    python -m vldlib bench --steps-scaling         # time per run grows linearly with steps
    python -m vldlib bench --bf16-accuracy         # bf16 vs fp32 accuracy (vldlib.precision)
    python -m vldlib bench --gpu-check             # the self-contained GPU report (vldlib.gpu_check)

Results are written as JSON under outputs/bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vldlib.train import TrainConfig
from vldlib.utils import atomic_path, seed_hash, write_json_atomic, write_text_atomic

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
    """One step of vldlib.train's loop on a list of per-domain (x, y) batches (data excluded).

    Built from a TrainConfig by `vldlib.train.build_run_net`, so it is the run's own network
    (dropout, frozen BatchNorm, trunk/tail split), optimiser and running weight average.
    """

    def __init__(self, tcfg: TrainConfig, num_classes: int, *, tail: bool = False, host_syncs: bool = True):
        from torch.optim.swa_utils import get_swa_multi_avg_fn

        from vldlib.models import param_groups
        from vldlib.train import AveragedTrainable, build_run_net, resolve_device

        self.device = resolve_device(tcfg.device)
        self.net, self.norm, _ = build_run_net(tcfg, num_classes, self.device)
        self.forward = self.net.tail if tail else self.net  # cache_trunk: the loop runs the tail only
        if tcfg.compile:  # as the loop does; the first (warmup) step compiles
            self.forward = torch.compile(self.forward, dynamic=False)
        self.opt = torch.optim.SGD(param_groups(self.net, tcfg.lr, tcfg.head_lr_mult), lr=tcfg.lr,
                                   momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
        self.averaged = AveragedTrainable(self.net, multi_avg_fn=get_swa_multi_avg_fn(), use_buffers=False)
        self.channels_last, self.bf16, self.seed, self.host_syncs = tcfg.channels_last, tcfg.bf16, tcfg.seed, host_syncs
        self.net.train()

    @classmethod
    def for_bench(cls, cfg: BenchConfig, num_classes: int, *, channels_last: bool, bf16: bool,
                  host_syncs: bool = True) -> "LoopStep":
        return cls(cfg.train_config(channels_last=channels_last, bf16=bf16), num_classes, host_syncs=host_syncs)

    def __call__(self, step: int, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        torch.manual_seed(seed_hash(self.seed, "step", step))
        x = torch.cat([b[0] for b in batch])
        y = torch.cat([b[1] for b in batch])
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(x)
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
    from vldlib.data.transforms import train_transform

    with backend_flags(tf32=False, benchmark=False, deterministic=True):
        step = LoopStep.for_bench(replace(cfg, compile=False), len(bench.classes), channels_last=False, bf16=False)
        tf = train_transform(cfg.resolution, step.norm["mean"], step.norm["std"])
        return time_plain(step, [bench.samples[e] for e in range(cfg.domains)], tf, cfg)


def time_plain(step: LoopStep, samples: list[list], transform, cfg: BenchConfig) -> dict:
    """Path 2 (DomainBed): ImageDataset + transform, a shuffled DataLoader per domain with workers,
    plain `.to(device)`, fp32, NCHW, cuDNN deterministic and not autotuned (the caller sets the
    flags and builds `step` that way). Timed on its own: its workers prefetch while other paths
    run, which would flatter it if interleaved."""
    from vldlib.data.datasets import ImageDataset

    per = max(1, cfg.workers // len(samples)) if cfg.workers > 0 else 0
    loaders = [torch.utils.data.DataLoader(
        ImageDataset(s, transform), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        num_workers=per, persistent_workers=per > 0,
        generator=torch.Generator().manual_seed(seed_hash(cfg.seed, "plain", e)))
        for e, s in enumerate(samples)]
    iters = [_infinite(ld) for ld in loaders]

    def batches():
        while True:
            yield [(x.to(step.device), y.to(step.device)) for x, y in (next(it) for it in iters)]

    out = time_rates({"plain": Contender(batches(), step, {"workers_per_domain": per})},
                     len(samples) * cfg.batch_size, cfg)["plain"]
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

    step = LoopStep.for_bench(cfg, len(bench.classes), channels_last=True, bf16=cfg.bf16 if bf16 is None else bf16)
    loader = DeviceBatches(sources, list(range(cfg.domains)), batch_size=cfg.batch_size, seed=cfg.seed, start=0,
                           stop=total_steps(cfg), device=step.device, size=cfg.resolution, mean=step.norm["mean"],
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


# ----------------------------------------------------------------------------- command line
IMAGE_OPTIONS = ("backbone", "resolution", "domains", "train_stages", "data", "batch_size")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training throughput: compute limit vs DomainBed's path vs vldlib's",
                       description=__doc__.split("\n\n")[0] + "\n\n" + CONFIGS_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  python -m vldlib bench                       # CPU: the quickstart's runs\n"
                              "  python -m vldlib bench --steps-scaling 200,600   # a run's time vs its steps\n"
                              "  python -m vldlib bench --resolution 64 --domains 3 --train-stages 2\n"
                              "  python -m vldlib bench --device cuda --backbone resnet50 --bf16\n"
                              "  python -m vldlib bench --gpu-check")
    d = BenchConfig()
    p.add_argument("--config", choices=("quickstart", "images"),
                   help="what to time (default: quickstart on a CPU unless an image option is given, "
                        "images on a GPU)")
    g = p.add_argument_group("image options (--config images)")
    g.add_argument("--backbone", help="timm name or offline backbone (default: resnet50 on GPU, "
                                      "efficientnet_lite0.offline on CPU)")
    g.add_argument("--resolution", type=int, help="pixels (default 224 on GPU, 64 on CPU)")
    g.add_argument("--batch-size", type=int, help=f"per domain (default {d.batch_size})")
    g.add_argument("--domains", type=int, help=f"training domains per step (default {d.domains})")
    g.add_argument("--train-stages", type=int,
                   help="train the last k stages (-1, the default: 2 on CPU, all on GPU; -2: all)")
    g.add_argument("--data", help="'synthetic' (the default), a benchmark folder or a registered name")
    g.add_argument("--data-dir", default=d.data_dir)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast in the compute and fast paths")
    g.add_argument("--compile", action="store_true", help="torch.compile the compute and fast paths' forward")
    p.add_argument("--device", default=d.device)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--workers", type=int, default=d.workers, help="plain path's DataLoader workers in all")
    p.add_argument("--paths", default=",".join(d.paths), help="comma list of compute,plain,fast")
    p.add_argument("--json", help="output file (default outputs/bench/bench-<device>-<what>.json)")
    p.add_argument("--steps-scaling", nargs="?", const="200,600", metavar="N,M",
                   help="time real training runs of N and M steps instead (default 200,600)")
    p.add_argument("--bf16-accuracy", nargs="?", const="0,1,2", metavar="SEEDS",
                   help="train the quickstart's runs in fp32 and bf16 for these seeds (default 0,1,2) and "
                        "compare their accuracy (vldlib.precision); finished runs are reused")
    p.add_argument("--gpu-check", action="store_true", help="the self-contained GPU report (~6 min on an H100)")
    p.add_argument("--gpu-check-smoke", action="store_true",
                   help="every --gpu-check stage on the CPU with tiny models (a minute): checks the script itself")
    p.add_argument("--budget", type=float, default=450.0,
                   help="--gpu-check's internal time budget in seconds (under 8 min in all)")
    p.set_defaults(func=_cli_bench)


CONFIGS_HELP = """\
--config quickstart: the runs of `python -m vldlib quickstart` (its notebook's parameters: cached
    frozen trunk, the trained tail on the CPU); the CPU target, fast >= 0.9 x compute, is about it.
--config images: a backbone on images (augmentation, decoded-image cache, device batches), the
    configuration of the GPU targets (resnet50, 224 px, 3 x 32)."""


def _image_options_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in IMAGE_OPTIONS)


def _pick_config(args: argparse.Namespace, device: str) -> str:
    if args.config:
        return args.config
    from vldlib.train import resolve_device

    image_options = _image_options_given(args) or args.bf16 or args.compile
    return "images" if image_options or resolve_device(device).type != "cpu" else "quickstart"


def _cli_bench(args: argparse.Namespace) -> int:
    from vldlib.bench_runs import quickstart_config, run_config_bench

    if args.gpu_check or args.gpu_check_smoke:
        from vldlib.gpu_check import GPU_PLAN, SMOKE_PLAN, gpu_check

        if args.gpu_check_smoke:
            return gpu_check(args.budget, out=OUT / "smoke", plan=SMOKE_PLAN)
        return gpu_check(args.budget, plan=GPU_PLAN)
    d = BenchConfig()
    cfg = BenchConfig(backbone=args.backbone, resolution=args.resolution, batch_size=args.batch_size or d.batch_size,
                      domains=args.domains or d.domains,
                      train_stages={None: d.train_stages, -2: None}.get(args.train_stages, args.train_stages),
                      device=args.device, data=args.data or d.data, data_dir=args.data_dir, steps=args.steps,
                      warmup=args.warmup, repeats=args.repeats, bf16=args.bf16, compile=args.compile,
                      workers=args.workers,
                      paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()))
    try:
        which = _pick_config(args, cfg.device)
        if which == "quickstart" and _image_options_given(args):
            raise ValueError("--config quickstart times the quickstart notebook's own configuration; "
                             "--backbone/--resolution/--domains/--train-stages/--data/--batch-size apply to "
                             "--config images (or change the notebook's parameters)")
        if args.steps_scaling:
            return _cli_steps_scaling(args, cfg, which)
        if args.bf16_accuracy:
            return _cli_bf16_accuracy(args, cfg, which)
        if which == "quickstart":
            tcfg = quickstart_config(cfg.device)
            print(f"[vldlib] bench: the quickstart's runs ({tcfg.backbone}, {tcfg.resolution} px, train_stages "
                  f"{tcfg.train_stages}, cache_trunk {tcfg.cache_trunk}, augment {tcfg.augment}, {tcfg.num_threads} "
                  f"thread(s)) on {device_name(cfg.resolved().device)}", flush=True)
            res = run_config_bench(tcfg, cfg, name="quickstart", json_path=args.json)
        else:
            print(f"[vldlib] bench on {device_name(cfg.resolved().device)}", flush=True)
            res = run_bench(cfg, json_path=args.json)
        print(f"[vldlib] written {res['json']}")
        return 0
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _cli_steps_scaling(args: argparse.Namespace, cfg: BenchConfig, which: str) -> int:
    from vldlib.bench_runs import image_run_config, quickstart_config, steps_scaling, sweep_note

    try:
        n, m = (int(s) for s in args.steps_scaling.split(","))
    except ValueError:
        raise ValueError(f"--steps-scaling expects N,M (two step counts), got {args.steps_scaling!r}") from None
    c = cfg.resolved()
    if which == "quickstart":
        tcfg = quickstart_config(c.device)
    else:
        root = c.data
        if c.data == "synthetic":
            root = write_synthetic_domains(OUT / "data" / "synthetic", domains=max(4, c.domains))
        tcfg = image_run_config(root, backbone=c.backbone, resolution=c.resolution, device=c.device,
                                batch_size=c.batch_size, train_stages=c.train_stages, bf16=c.bf16)
    with tempfile.TemporaryDirectory() as tmp:
        res = steps_scaling(tcfg, (n, m), tmp)
    res["config"] = asdict(tcfg)
    cpu = torch.device(c.device).type == "cpu"
    run_s = res["fixed_s"] + res["slope_s_per_step"] * tcfg.steps
    res["note"] = (f"A run of this configuration ({tcfg.steps} steps, evaluated once): {run_s:.0f} s.\n"
                   + sweep_note(run_s, unit="CPU core" if cpu and tcfg.num_threads == 1 else "GPU" if not cpu
                                else "machine"))
    path = Path(args.json) if args.json else OUT / f"steps-scaling-{torch.device(c.device).type}-{which}.json"
    write_json_atomic(path, res)
    for r in res["runs"]:
        print(f"  {r['steps']:6d} steps: {r['wall_s']:7.1f} s wall, loop {1e3 * r['step_time_s']:.1f} ms/step, "
              f"{r['other_s']:.1f} s setup and evaluation")
    print(f"  slope {1e3 * res['slope_s_per_step']:.1f} ms/step = {res['slope_over_step_time']:.2f} x the loop's "
          f"step time; fixed {res['fixed_s']:.1f} s a run")
    print(res["note"])
    print(f"[vldlib] written {path}")
    return 0


def _cli_bf16_accuracy(args: argparse.Namespace, cfg: BenchConfig, which: str) -> int:
    from vldlib import precision
    from vldlib.bench_runs import quickstart_config

    if which != "quickstart":
        raise ValueError("--bf16-accuracy trains the quickstart's runs (pretrained, on the emoji benchmark); "
                         "image options do not apply (the GPU check runs it on full fine-tuning)")
    try:
        seeds = [int(s) for s in args.bf16_accuracy.split(",")]
    except ValueError:
        raise ValueError(f"--bf16-accuracy expects seeds like 0,1,2, got {args.bf16_accuracy!r}") from None
    out = OUT / "bf16_accuracy"
    res = precision.bf16_accuracy(quickstart_config(cfg.device), out, seeds=seeds)
    text = precision.markdown(res, device_name(cfg.resolved().device))
    with atomic_path(out / "bf16_accuracy.csv") as tmp:
        res["table"].to_csv(tmp, index=False)
    write_text_atomic(out / "bf16_accuracy.md", text)
    print(text)
    print(f"[vldlib] written {out / 'bf16_accuracy.md'}")
    return 0
