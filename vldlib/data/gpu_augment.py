"""DomainBed's training augmentation, batched on the device, with torchvision's per-image draws.

Why: on a GPU, PIL decoding and per-image transforms in worker processes cannot keep up with a
ResNet50 at 224 px (a few hundred images/s per core). With the decoded-image cache
(`vldlib.data.cache`) the images are already uint8 arrays; this module moves a whole step's batch
to the device once and applies RandomResizedCrop(scale 0.7-1), horizontal flip,
ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale(p=0.1) and normalisation as a few batched
kernels.

Same random choices as the worker path: `sample_params` replays the exact sequence of draws that
`vldlib.data.transforms.train_transform` (torchvision v2) makes under `torch.manual_seed(seed)`,
one private generator per image, seeded by the (run seed, domain, step, position) seed the loop
already derives. So a resumed run draws the same crops, and a test can check the parameters
against torchvision's. The cache squashes images to squares, so each crop box is drawn on the
original image's size (the cache keeps it: `vldlib.data.cache.image_sizes`) and mapped into the
cached square: the crops cover the same part of the original as on the reference path. The pixels differ only by rounding: the crop-and-resize is a bilinear
`grid_sample` that reproduces `F.interpolate(..., align_corners=False)` on the crop (the cache is
at the target resolution, so crops are only ever upscaled and antialiasing has nothing to do),
and the colour operations run in float instead of rounding to uint8 after each one.

`DeviceBatches` is the loader the training loop uses with `augment_on="device"`: a background
thread gathers the next steps' images from the cache (into pinned memory on a GPU), draws their
parameters and, on a GPU, copies and augments them on a side CUDA stream, so data preparation
overlaps with the previous step's compute.

>>> params = sample_params([11, 12], 64, 64)                       # doctest: +SKIP
>>> x = augment_batch(uint8_images, params, 64, mean, std)          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vldlib.data.order import batch_indices
from vldlib.utils import seed_hash

# DomainBed's augmentation (vldlib.data.transforms.train_transform); fixed, like the paper's.
SCALE = (0.7, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
JITTER = 0.3  # brightness, contrast, saturation and hue
GRAY_P = 0.1
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


# ----------------------------------------------------------------------------- parameters
@dataclass
class AugmentParams:
    """Per-image random choices of one batch (CPU tensors; `to(device)` before augmenting).

    crop: [B, 4] float32 (top, left, height, width) in input pixels (whole pixels unless the box was
    drawn on the original image and mapped into a resized cached one); flip: [B] bool;
    order: [B, 4] int64, the ColorJitter order (0 brightness, 1 contrast, 2 saturation, 3 hue);
    factors: [B, 4] float32 (brightness, contrast, saturation, hue shift); gray: [B] bool.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor

    def __len__(self) -> int:
        return len(self.flip)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "AugmentParams":
        return AugmentParams(*(getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence["AugmentParams"]) -> "AugmentParams":
        return AugmentParams(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(AugmentParams)))


def _crop_params(g: torch.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision.transforms.v2.RandomResizedCrop.make_params, drawing from `g`."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return i, j, h, w
    in_ratio = width / height  # fallback: central crop, as torchvision
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def original_crop(g: torch.Generator, height: int, width: int, original: tuple[int, int] | None
                  ) -> tuple[float, float, float, float]:
    """The crop box (top, left, height, width) in the pixels of the input image, drawn as
    torchvision draws it on the *original* image of size `original` = (height, width).

    The decoded-image cache squashes every image to a square; drawing on the square would give
    a non-square original (VLCS, OfficeHome, TerraIncognita) other crop shapes than the
    reference path. So the box is drawn in original coordinates (the same draws, hence the same
    box, as torchvision's on the original under the same seed) and scaled into the input image.
    `original=None`: the input is the original.
    """
    if original is None:
        return tuple(float(v) for v in _crop_params(g, height, width))  # type: ignore[return-value]
    oh, ow = int(original[0]), int(original[1])
    top, left, h, w = _crop_params(g, oh, ow)
    sy, sx = height / oh, width / ow
    return top * sy, left * sx, h * sy, w * sx


def sample_params(seeds: Sequence[int], height: int, width: int,
                  original_sizes: Sequence[Sequence[int]] | np.ndarray | None = None) -> AugmentParams:
    """The random choices `train_transform` makes for each image under `torch.manual_seed(seed)`.

    `height, width`: the input images' size; `original_sizes` ([B, 2] (height, width), optional):
    the sizes of the images they were resized from (the cache keeps them), so that crops are
    drawn in original coordinates (`original_crop`).
    The draws follow torchvision v2's order exactly (crop; flip `rand(1) < 0.5`; jitter
    `randperm(4)` then brightness, contrast, saturation, hue factors; grayscale `rand(1) < 0.1`),
    each image from its own generator, so the result does not depend on the batch it is in, on the
    process that draws it, or on the global RNG (which the loop re-seeds every step for dropout).
    """
    b = len(seeds)
    if original_sizes is not None and len(original_sizes) != b:
        raise ValueError(f"{len(original_sizes)} original sizes for {b} seeds")
    crop = torch.empty(b, 4, dtype=torch.float32)
    flip = torch.empty(b, dtype=torch.bool)
    order = torch.empty(b, 4, dtype=torch.int64)
    factors = torch.empty(b, 4, dtype=torch.float32)
    gray = torch.empty(b, dtype=torch.bool)
    lo, hi = 1.0 - JITTER, 1.0 + JITTER
    g = torch.Generator()
    for k, seed in enumerate(seeds):
        g.manual_seed(int(seed))
        crop[k] = torch.tensor(original_crop(g, height, width, None if original_sizes is None else original_sizes[k]))
        flip[k] = bool(torch.rand(1, generator=g) < FLIP_P)
        order[k] = torch.randperm(4, generator=g)
        factors[k, 0] = torch.empty(1).uniform_(lo, hi, generator=g).item()
        factors[k, 1] = torch.empty(1).uniform_(lo, hi, generator=g).item()
        factors[k, 2] = torch.empty(1).uniform_(lo, hi, generator=g).item()
        factors[k, 3] = torch.empty(1).uniform_(-JITTER, JITTER, generator=g).item()
        gray[k] = bool(torch.rand(1, generator=g) < GRAY_P)
    return AugmentParams(crop, flip, order, factors, gray)


# ----------------------------------------------------------------------------- batched operations
@functools.lru_cache(maxsize=64)
def _const(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small constant [1,C,1,1] on the device, made once: creating it from a list each batch
    would be a host-to-device copy that waits for the stream (a stall inside the prefetch)."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,1,H,W], torchvision's weights and operation order."""
    r, g, b = x.unbind(1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, shift H, -> RGB), written without HSV tensors.

    In HSV, V = max, V*S = max - min (the chroma); shifting H keeps both, and each output channel
    is max - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + 6H) mod 6, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(1)
    minc, maxc = x.amin(dim=1), x.amax(dim=1)  # (aminmax over channels is much slower on CPUs)
    chroma = maxc - minc
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    # hue in sextants [0, 6): red max -> (g-b)/c, green max -> 2 + (b-r)/c, blue max -> 4 + (r-g)/c
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    h6 = num.div_(torch.where(chroma > 0, chroma, 1.0))
    h6 += torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    h6 += (6.0 * shift).view(-1, 1, 1)  # the shift; the wrap to [0, 6) happens in k below
    k = (h6.unsqueeze(1) + _const((5.0, 3.0, 1.0), x.device)).remainder_(6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return w.mul_(chroma.unsqueeze(1).neg()).add_(maxc.unsqueeze(1)).clamp_(0.0, 1.0)


_JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    _brightness, _contrast, _saturation, _hue)


def _resized_crop_flip(x: torch.Tensor, params: AugmentParams, size: int) -> torch.Tensor:
    """Crop each image to its box, resize to size x size (bilinear), flip where asked: one kernel.

    Source coordinates are F.interpolate's (align_corners=False), clamped to the crop box, so
    the result is `resize(crop(x))` up to float rounding; the flip reverses output columns.
    """
    b, _, height, width = x.shape
    crop = params.crop.to(x.device, torch.float32)
    top, left, h, w = crop.unbind(1)
    u = torch.arange(size, device=x.device, dtype=torch.float32) + 0.5
    u_x = torch.where(params.flip.view(-1, 1), size - u.view(1, -1), u.view(1, -1))  # [B, size]
    xs = left.view(-1, 1) + u_x * (w / size).view(-1, 1) - 0.5
    ys = top.view(-1, 1) + u.view(1, -1) * (h / size).view(-1, 1) - 0.5
    xs = torch.maximum(torch.minimum(xs, (left + w - 1).view(-1, 1)), left.view(-1, 1))
    ys = torch.maximum(torch.minimum(ys, (top + h - 1).view(-1, 1)), top.view(-1, 1))
    gx = (2.0 * xs + 1.0) / width - 1.0  # grid_sample's normalised coordinates
    gy = (2.0 * ys + 1.0) / height - 1.0
    grid = torch.stack((gx.view(b, 1, size).expand(b, size, size), gy.view(b, size, 1).expand(b, size, size)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _subset_apply(x: torch.Tensor, idx: torch.Tensor, fn: Callable, arg: torch.Tensor) -> torch.Tensor:
    """x with x[idx] = fn(x[idx], arg[idx]) (in place; all images: no gather)."""
    if idx.numel() == 0:
        return x
    if idx.numel() == len(x):
        return fn(x, arg)
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), arg.index_select(0, idx)))


def augment_batch(images: torch.Tensor, params: AugmentParams | None, size: int, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """uint8 (or float in [0, 1]) [B,3,H,W] images -> normalised float32 [B,3,size,size].

    With `params=None` (augmentation off) images are only resized to size x size and normalised,
    like `eval_transform`. Runs wherever `images` is (CPU or GPU); `params` may be on the CPU.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B,3,H,W], got shape {tuple(images.shape)}")
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    dev = x.device
    if params is None:
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        if len(params) != len(x):
            raise ValueError(f"{len(params)} parameter sets for {len(x)} images")
        x = _resized_crop_flip(x, params.to(dev, non_blocking=True), size).contiguous()
        order, factors = params.order, params.factors.to(dev, non_blocking=True)
        for pos in range(4):  # each image applies the four jitter operations in its own order
            for op in range(4):
                idx = torch.nonzero(order[:, pos] == op).flatten()  # params.order is on the CPU: no sync
                x = _subset_apply(x, idx.to(dev, non_blocking=True), _JITTER_OPS[op], factors[:, op])
        gray_idx = torch.nonzero(params.gray.cpu()).flatten().to(dev, non_blocking=True)
        if gray_idx.numel():
            x.index_copy_(0, gray_idx, _gray(x.index_select(0, gray_idx)).expand(-1, 3, -1, -1))
    return x.sub_(_const(tuple(map(float, mean)), dev)).div_(_const(tuple(map(float, std)), dev))


def normalisation_of(transform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step inside a torchvision (v2) Compose, e.g. a dataset's transform.

    The device path needs the backbone's normalisation and the datasets already carry it.
    """
    from torchvision.transforms import v2

    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, v2.Normalize):
            return tuple(map(float, t.mean)), tuple(map(float, t.std))
    raise ValueError(f"no Normalize step in {transform!r}; the device path needs the backbone's mean/std "
                     f"(build datasets with vldlib.data.transforms.train_transform or eval_transform).")


# ----------------------------------------------------------------------------- the loader
def step_seeds(seed: int, env: int, step: int, batch_size: int) -> list[int]:
    """Augmentation seeds of one domain's batch: the same as `vldlib.loop.batches.StepBatches` gives."""
    return [seed_hash(seed, "aug", env, step, k) for k in range(batch_size)]


class ArraySource:
    """Batches of one domain from uint8 arrays (the decoded-image cache), indexed in the thread.

    `sizes` ([N, 2] (height, width), `vldlib.data.cache.image_sizes`): each image's original size,
    so crops are drawn in original coordinates as on the reference path; None: the arrays are the
    originals.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, sizes: np.ndarray | None = None):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images [N,3,H,W], got {images.dtype} {images.shape}; build "
                             f"them with vldlib.data.cache (cache_images=True)")
        if sizes is not None and np.shape(sizes) != (len(images), 2):
            raise ValueError(f"sizes must be [N, 2] (height, width) for {len(images)} images, got {np.shape(sizes)}")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.sizes = None if sizes is None else np.asarray(sizes, dtype=np.int64)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return len(self.labels)

    def fetch_into(self, idx: np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Write images[idx] into `out` (uint8, maybe pinned); return the labels."""
        np.take(self.images, idx, axis=0, out=out.numpy())
        return torch.from_numpy(self.labels[idx])


@contextlib.contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run CPU tensor ops with n intra-op threads (None: unchanged). Augmentation is many small
    ops: with several threads they pay a barrier each, which on a busy machine costs more than
    the work; compute, with large ops, keeps every core."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class DeviceBatches:
    """Iterate the training batches of steps [start, stop): per step, one (x, y) per domain,
    x already augmented and normalised on `device` (float32 [B,3,size,size]).

    Batch indices come from `index_fn(n, batch_size, seed, env, step)` (the loop's
    `batch_indices`) and augmentation seeds from `step_seeds`: every batch is a pure function
    of (seed, env, step), so resuming at `start` gives the same batches.
    `overlap=True` prepares up to `prefetch` steps ahead in a background thread (on a GPU, also the
    copy and the augmentation, on a side stream); `False` prepares each step when asked.
    """

    def __init__(self, sources: Sequence[ArraySource], envs: Sequence[int], *, batch_size: int, seed: int,
                 start: int, stop: int, device: torch.device | str, size: int, mean: Sequence[float],
                 std: Sequence[float], augment: bool = True, index_fn: Callable | None = None,
                 overlap: bool = True, prefetch: int = 2):
        if len(sources) != len(envs):
            raise ValueError(f"{len(sources)} sources but {len(envs)} domain indices")
        if index_fn is None:
            index_fn = batch_indices
        self.sources, self.envs = list(sources), list(envs)
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.device = torch.device(device)
        self.size, self.mean, self.std, self.augment = size, tuple(mean), tuple(std), augment
        self.index_fn, self.overlap, self.prefetch = index_fn, overlap, max(1, prefetch)
        hws = {s.hw for s in self.sources}
        if len(hws) != 1:
            raise ValueError(f"domains have different cached image sizes {sorted(hws)}; cache them at one resolution")
        self.hw = hws.pop()
        self._cuda = self.device.type == "cuda"
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    # --- one step, in stages: host (gather + parameters), then device (copy + augment)
    def _host(self, step: int) -> tuple[torch.Tensor, torch.Tensor, AugmentParams | None]:
        b, (h, w) = self.batch_size, self.hw
        x = torch.empty((len(self.sources) * b, 3, h, w), dtype=torch.uint8, pin_memory=self._cuda)
        ys, params = [], []
        for k, (src, env) in enumerate(zip(self.sources, self.envs)):
            idx = self.index_fn(len(src), b, self.seed, env, step)
            ys.append(src.fetch_into(idx, x[k * b:(k + 1) * b]))
            if self.augment:
                sizes = None if src.sizes is None else src.sizes[idx]
                params.append(sample_params(step_seeds(self.seed, env, step, b), h, w, sizes))
        return x, torch.cat(ys), AugmentParams.cat(params) if params else None

    def _device(self, host) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, params = host
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return augment_batch(x, params, self.size, self.mean, self.std), y

    def _split(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        return [(x[k * b:(k + 1) * b], y[k * b:(k + 1) * b]) for k in range(len(self.sources))]

    # --- background producer
    def _produce(self, q: queue.Queue) -> None:
        try:
            if not self._cuda:  # per-thread setting: this thread's small ops, the main thread keeps its cores
                torch.set_num_threads(1)
            stream = torch.cuda.Stream(self.device) if self._cuda else None
            for step in range(self.start, self.stop):
                if self._stop_event.is_set():
                    return
                host = self._host(step)
                if stream is not None:
                    with torch.cuda.stream(stream):
                        x, y = self._device(host)
                        event = torch.cuda.Event()
                        event.record(stream)
                    item = (x, y, event)
                else:
                    item = (*self._device(host), None)
                while not self._stop_event.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        if not self.overlap:
            for step in range(self.start, self.stop):
                with _cpu_threads(1 if not self._cuda else None):
                    x, y = self._device(self._host(step))
                yield self._split(x, y)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._produce, args=(q,), daemon=True, name="vldlib-device-batches")
        self._thread.start()
        try:
            for _ in range(len(self)):
                item = q.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"preparing a training batch failed: {type(item).__name__}: {item}") from item
                x, y, event = item
                if event is not None:  # the copy and augmentation ran on the side stream
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                yield self._split(x, y)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (called when iteration ends or the consumer stops early)."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
