"""What the training loop reads and how it scores: per-domain datasets with their splits,
step-indexed batches (a pure function of seed and step, so resumes are exact), cached outputs of
the frozen trunk, and predictions on every (domain, split).

Split out of `vldlib.loop.train` so the loop itself reads top to bottom. The batch order itself
(`batch_indices`) is `vldlib.data.order`: the device augmentation draws the same batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from vldlib.config import TrainConfig, UsageError
from vldlib.data import MultiDomainFolder, split_domain
from vldlib.data.splits import train_subset
from vldlib.data.cache import cache_root, cached_benchmark, cached_domain, image_sizes
from vldlib.data.datasets import ArrayDataset, ImageDataset
from vldlib.data.gpu_augment import ArraySource, DeviceBatches, augment_batch, normalisation_of, sample_params
from vldlib.data.order import batch_indices
from vldlib.data.transforms import eval_transform, train_transform
from vldlib.loop.device import cpu_plan, usable_cores
from vldlib.model import FineTuneNet, weights_fingerprint
from vldlib.utils import StopRequested, atomic_path, check_stop, computed_once, config_hash, seed_hash


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """What the loop reads: per training domain a dataset, and every (domain, split) to evaluate."""

    train: list[torch.utils.data.Dataset]  # one per training domain (its "in" split, or `train_fraction` of it)
    evals: dict[str, torch.utils.data.Dataset]  # "env0_in", "env0_out", ...
    domains: list[str]
    classes: list[str]
    train_envs: list[int]
    key: str  # identifies the exact samples of every split (for the trunk-output cache)


def make_data(cfg: TrainConfig, bench: MultiDomainFolder, mean, std) -> Data:
    n_env = len(bench.domains)
    for t in cfg.test_envs:
        if not 0 <= t < n_env:
            raise UsageError(f"test env {t} out of range: {bench.name} has {n_env} domains "
                             f"{list(enumerate(bench.domains))}; pass --test-envs 0..{n_env - 1}")
    train_envs = [i for i in range(n_env) if i not in cfg.test_envs]
    if not train_envs:
        raise UsageError(f"every domain of {bench.name} is held out (test_envs={cfg.test_envs}); leave one to train on")
    tf_train = train_transform(cfg.resolution, mean, std) if cfg.augment else eval_transform(cfg.resolution, mean, std)
    tf_eval = eval_transform(cfg.resolution, mean, std)
    if cfg.cache_images:
        arrays = cached_benchmark(bench, cfg.resolution, progress=cfg.progress)

        def subset(env: int, idx: np.ndarray, tf) -> ArrayDataset | CachedTrainItems:
            images, labels = arrays[env]
            images = images[idx] if len(idx) < len(labels) else images
            if tf is tf_train and cfg.augment:  # crops drawn in the original image's coordinates
                sizes = image_sizes([bench.samples[env][i] for i in idx], progress=cfg.progress)
                return CachedTrainItems(images, labels[idx], sizes, cfg.resolution, mean, std)
            return ArrayDataset(images, labels[idx], tf)
    else:
        def subset(env: int, idx: np.ndarray, tf) -> ImageDataset:
            return ImageDataset([bench.samples[env][i] for i in idx], tf)

    train, evals, split_files = [], {}, []
    for env in range(n_env):
        groups = bench.groups(env)
        ins, outs = split_domain(len(bench.samples[env]), cfg.trial_seed, env, cfg.holdout, groups)
        if env in train_envs:
            # a training domain's "in" is what it trains on, and its eval-mode accuracy there is
            # `fit_acc`: both the subset; the held-out domain and every "out" split stay whole
            ins = train_subset(ins, cfg.train_fraction, cfg.trial_seed, env, groups)
        split_files.append([[bench.samples[env][i] for i in ins], [bench.samples[env][i] for i in outs]])
        if env in train_envs:
            if cfg.batch_size > len(ins):
                part = "" if cfg.train_fraction == 1 else f" at train_fraction {cfg.train_fraction:g}"
                raise UsageError(f"batch_size {cfg.batch_size} is larger than the 'in' split of domain "
                                 f"{bench.domains[env]!r}{part} ({len(ins)} images); use --batch-size <= {len(ins)}"
                                 + ("" if not part else " or a larger --train-fraction"))
            train.append(subset(env, ins, tf_train))
        evals[f"env{env}_in"] = subset(env, ins, tf_eval)
        if cfg.val_augment and env in train_envs:  # the official code's default (no --outsplit_noaug)
            evals[f"env{env}_out"] = SeededItems(subset(env, outs, tf_train), seed_hash(cfg.seed, "val_augment", env))
        else:
            evals[f"env{env}_out"] = subset(env, outs, tf_eval)
    return Data(train, evals, bench.domains, bench.classes, train_envs, config_hash({"s": split_files}, n=16))


class CachedTrainItems(torch.utils.data.Dataset):
    """Training items from the decoded-image cache (squashed squares), augmented like the device
    path: the RandomResizedCrop box is drawn on the original image's size (`sizes`) and mapped into
    the square (`vldlib.data.gpu_augment.sample_params`), so a non-square image gets torchvision's
    crop geometry, not the square's. `augment_on="workers"` and `"device"` then crop alike."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, sizes: np.ndarray, resolution: int, mean, std):
        self.images, self.labels, self.sizes = images, labels, np.asarray(sizes, dtype=np.int64)
        self.resolution, self.mean, self.std = resolution, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, int(torch.randint(0, 2**31 - 1, ())))
        img = torch.from_numpy(np.array(self.images[idx]))[None]  # copy out of the read-only memory map
        params = sample_params([seed], img.shape[2], img.shape[3], self.sizes[idx:idx + 1])
        return augment_batch(img, params, self.resolution, self.mean, self.std)[0], int(self.labels[idx])


class SeededItems(torch.utils.data.Dataset):
    """A dataset whose random transform draws, for item i, from its own seed (`seed_hash(seed, i)`):
    the validation split evaluated with the training augmentation (`val_augment`) is then the same
    augmented images at every evaluation and after a resume, whatever worker reads them. (The
    official code draws new ones at each evaluation; a fixed draw keeps checkpoints comparable.)"""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[(i, seed_hash(self.seed, i))]


class StepBatches(torch.utils.data.Sampler):
    """For a DataLoader: the batches of one domain from `start` to `stop`, each item with the seed
    of its augmentation."""

    def __init__(self, n: int, batch_size: int, seed: int, env: int, start: int, stop: int):
        self.args = (n, batch_size, seed, env)
        self.start, self.stop = start, stop

    def __iter__(self):
        n, b, seed, env = self.args
        for step in range(self.start, self.stop):
            yield [(int(i), seed_hash(seed, "aug", env, step, k)) for k, i in enumerate(batch_indices(n, b, seed, env, step))]

    def __len__(self) -> int:
        return self.stop - self.start


def _device_batches(data: Data, cfg: TrainConfig, start: int, device: torch.device):
    """augment_on="device": uint8 images from the decoded-image cache, augmented in batches where
    the model runs (vldlib.data.gpu_augment), with the same per-image seeds as StepBatches."""

    sources = []
    for env, ds in zip(data.train_envs, data.train):
        if isinstance(ds, CachedTrainItems):
            sources.append(ArraySource(ds.images, ds.labels, sizes=ds.sizes))
        elif isinstance(ds, ArrayDataset):  # augmentation off: no crop, sizes not needed
            sources.append(ArraySource(ds.images, ds.labels))
        elif isinstance(ds, ImageDataset):  # not cached yet: decode this split once (same cache)
            images, labels = cached_domain(ds.samples, cfg.resolution, name=f"train-env{env}", progress=cfg.progress)
            sizes = image_sizes(ds.samples, progress=cfg.progress) if cfg.augment else None
            sources.append(ArraySource(images, labels, sizes=sizes))
        else:
            raise ValueError(f"augment_on='device' needs image datasets, got {type(ds).__name__}; "
                             f"use augment_on='workers'")
    mean, std = normalisation_of(data.evals[f"env{data.train_envs[0]}_in"].transform)  # the eval splits' own
    yield from DeviceBatches(sources, data.train_envs, batch_size=cfg.batch_size, seed=cfg.seed, start=start,
                             stop=cfg.steps, device=device, size=cfg.resolution, mean=mean, std=std,
                             augment=cfg.augment, index_fn=batch_indices, overlap=True)


def train_batches(data: Data, cfg: TrainConfig, start: int, device: torch.device, features=None):
    """Yield, for each step from `start`, one (x, y) batch per training domain, on the device."""
    if features is not None:  # cached trunk outputs: index tensors directly
        for step in range(start, cfg.steps):
            batch = []
            for k, (x, y) in enumerate(features["train"]):
                idx = torch.from_numpy(batch_indices(len(y), cfg.batch_size, cfg.seed, data.train_envs[k], step))
                batch.append((x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)))
            yield batch
        return
    if cfg.augment_on == "device":
        yield from _device_batches(data, cfg, start, device)
        return
    _, workers = cpu_plan(cfg.num_workers, cfg.num_threads, len(data.train))
    loaders = [torch.utils.data.DataLoader(
        ds, batch_sampler=StepBatches(len(ds), cfg.batch_size, cfg.seed, env, start, cfg.steps),
        num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False) for env, ds in zip(data.train_envs, data.train)]
    for batch in zip(*loaders):
        yield [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batch]


TRUNK_CPU_BATCH = 32
"""Images per forward pass when computing trunk outputs on a CPU: measured on the 2-core machine
with EfficientNet-Lite0 at 96 px, 32 images at a time take 13.5 ms an image and 256 take 22.6
(what a batch touches stays in the cores' caches), with the same outputs bit for bit; and a stop
is asked between batches, so a batch must take well under a second."""


@torch.no_grad()
def compute_trunk(net: FineTuneNet, ds: torch.utils.data.Dataset, cfg: TrainConfig, device: torch.device,
                  should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the frozen stages for every item of a dataset (eval transform, no dropout).
    `should_stop` is asked before each batch (`StopRequested`)."""
    batch = min(cfg.eval_batch_size, TRUNK_CPU_BATCH) if device.type == "cpu" else cfg.eval_batch_size
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    xs, ys = [], []
    for x, y in loader:
        check_stop(should_stop)
        xs.append(net.trunk(x.to(device)).cpu())
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


TRUNK_CACHE_VERSION = 2  # 2: rows and a checksum stored with the outputs; device and precision in the key


def _trunk_key(net: FineTuneNet, data: Data, cfg: TrainConfig, device: torch.device) -> str:
    """What the cached trunk outputs depend on: the trunk's weights and stages, the images (the exact
    sample list of every split, the resolution, the image cache) and how they were computed (the
    device type and the precision: bf16 outputs on a GPU are not fp32 outputs on a CPU)."""
    return config_hash({"v": TRUNK_CACHE_VERSION,
                        "trunk": weights_fingerprint(torch.nn.ModuleList(net.trunk_modules)), "backbone": cfg.backbone,
                        "stages": [type(m).__name__ for m in net.trunk_modules], "resolution": cfg.resolution,
                        "data": data.key, "cache_images": cfg.cache_images, "device": device.type,
                        "precision": "bf16" if cfg.bf16 else "fp32"}, n=16)


def _outputs_checksum(evals: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """A checksum of every stored tensor, split by split: a file altered or cut after it was written
    does not match it."""
    h = hashlib.sha256()
    for name in sorted(evals):
        for t in evals[name]:
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _trunk_cache_entry(evals: dict, key: str) -> dict:
    """What the cache file holds: the outputs, their row counts, the key of their inputs and a checksum."""
    return {"evals": evals, "rows": {name: int(len(y)) for name, (_, y) in evals.items()}, "key": key,
            "checksum": _outputs_checksum(evals)}


def _trusted_evals(entry: Any, key: str, rows: dict[str, int]) -> dict | None:
    """The outputs of a loaded cache file when it is whole: the key of its inputs, the row count of
    every split (a file holding half its rows is not trusted) and the checksum all agree. None otherwise."""
    if not isinstance(entry, dict) or entry.get("key") != key or entry.get("rows") != rows:
        return None
    evals = entry.get("evals")
    if not isinstance(evals, dict) or set(evals) != set(rows):
        return None
    if any(len(x) != n or len(y) != n for name, n in rows.items() for x, y in [evals[name]]):
        return None
    return evals if entry.get("checksum") == _outputs_checksum(evals) else None


def _load_trunk_cache(path, key: str, rows: dict[str, int]) -> dict | None:
    """The cached trunk outputs, or None when missing; a damaged or incomplete file (unreadable, rows
    missing, checksum or inputs not matching) is removed: recomputed, never trusted."""
    if not path.exists():
        return None
    try:
        evals = _trusted_evals(torch.load(path, weights_only=True), key, rows)
    except Exception:  # noqa: BLE001  (a damaged file raises anything torch.load can)
        evals = None
    if evals is None:
        path.unlink(missing_ok=True)
    return evals


def _load_finished_splits(path, key: str, rows: dict[str, int]) -> dict:
    """The splits a stopped computation of the trunk outputs finished (its `.partial.pt` file),
    when whole and computed from the same inputs; {} otherwise (a damaged file is removed)."""
    if not path.exists():
        return {}
    try:
        entry = torch.load(path, weights_only=True)
        done = entry.get("rows") if isinstance(entry, dict) else None
        same_rows = isinstance(done, dict) and all(rows.get(name) == n for name, n in done.items())
        evals = _trusted_evals(entry, key, done) if same_rows else None
    except Exception:  # noqa: BLE001  (a damaged file raises anything torch.load can)
        evals = None
    if evals is None:
        path.unlink(missing_ok=True)
    return evals or {}


def trunk_features(net: FineTuneNet, data: Data, cfg: TrainConfig, device: torch.device,
                   should_stop: Callable[[], bool] | None = None):
    """Cached trunk outputs for the training sets and every eval set, kept on disk between runs
    (keyed by the trunk's weights, the exact sample list, the resolution, the device type and the
    precision; checked for every row and a checksum when read).

    `should_stop` is asked between batches: on a stop the splits already finished are kept in a
    `.partial.pt` file beside the cache (a minute of CPU work on ObjectStyles), and the next run
    computes only the rest, then `StopRequested` propagates."""
    key = _trunk_key(net, data, cfg, device)
    rows = {name: len(ds) for name, ds in data.evals.items()}
    path = cache_root() / "trunk" / f"{key}.pt"
    evals = _load_trunk_cache(path, key, rows)
    if evals is None:
        with computed_once(path, should_stop):  # runs started together (parallel_runs) compute it once
            evals = _load_trunk_cache(path, key, rows)  # written meanwhile by the run that held the lock
            if evals is None:
                evals = _compute_trunk_splits(net, data, cfg, device, key, path, should_stop)
    # The cache holds every (domain, split) and is shared by runs holding out different domains;
    # which of them are trained on is decided here, per run, never stored with the cache. (At a
    # train_fraction below 1 the training domains' "in" splits are subsets, which depend on the
    # held-out domain: such runs share a cache per held-out domain and fraction, as `data.key` says.)
    return {"evals": evals, "train": [evals[f"env{e}_in"] for e in data.train_envs]}


def _compute_trunk_splits(net: FineTuneNet, data: Data, cfg: TrainConfig, device: torch.device, key: str,
                          path, should_stop: Callable[[], bool] | None) -> dict:
    """Compute (under the cache's lock) the trunk outputs of every split and write the cache file;
    resume from, and on a stop save, the finished splits (`path` with suffix .partial.pt)."""
    partial = path.with_suffix(".partial.pt")
    evals = _load_finished_splits(partial, key, {name: len(ds) for name, ds in data.evals.items()})
    net.eval()
    try:
        for name, ds in tqdm(list(data.evals.items()), desc="computing frozen-trunk outputs",
                             disable=not cfg.progress):
            if name not in evals:
                evals[name] = compute_trunk(net, ds, cfg, device, should_stop)
    except StopRequested:
        if evals:
            with atomic_path(partial) as tmp:
                torch.save(_trunk_cache_entry(evals, key), tmp)
        raise
    evals = {name: evals[name] for name in data.evals}  # the splits' own order
    with atomic_path(path) as tmp:
        torch.save(_trunk_cache_entry(evals, key), tmp)
    partial.unlink(missing_ok=True)
    return evals


def bn_inputs(data: Data, cfg: TrainConfig, features=None):
    """The training domains' "in" images without augmentation (or their cached trunk outputs), in
    batches of `eval_batch_size` across domains: what BatchNorm statistics of averaged weights are
    recomputed on (`vldlib.loop.averaging.refresh_bn_statistics`)."""
    if features is not None:
        x = torch.cat([x for x, _ in features["train"]])
        return [x[i:i + cfg.eval_batch_size] for i in range(0, len(x), cfg.eval_batch_size)]
    ds = torch.utils.data.ConcatDataset([data.evals[f"env{e}_in"] for e in data.train_envs])
    return torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=0)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_all(forward: Callable, evals: dict, cfg: TrainConfig, device: torch.device, features=None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits and labels of every eval split."""
    out = {}
    for name, ds in evals.items():
        if features is not None:
            x_all, y_all = features["evals"][name]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):  # as in training
                chunks = [forward(x_all[i:i + cfg.eval_batch_size].to(device)).float().cpu()
                          for i in range(0, len(y_all), cfg.eval_batch_size)]
            out[name] = (torch.cat(chunks), y_all)
            continue
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False,
                                             num_workers=0 if cfg.num_workers == 0 else min(2, usable_cores()))
        logits, labels = [], []
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits.append(forward(x).float().cpu())
            labels.append(y)
        out[name] = (torch.cat(logits), torch.cat(labels))
    return out
