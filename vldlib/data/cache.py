"""Decoded-image cache: every image decoded once, resized, stored as uint8 in a memory-mapped file.

Later epochs (and later runs: the cache is keyed by the files and the resolution) read arrays
instead of decoding JPEGs, which is what keeps a GPU fed. The arrays hold exactly the samples, in
the same order and with the same labels, as the plain path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vldlib.data.folder import MultiDomainFolder, to_rgb
from vldlib.data.transforms import to_uint8_tensor
from vldlib.utils import atomic_path, computed_once, write_json_atomic


def cache_root() -> Path:
    return Path(os.environ.get("VLDLIB_CACHE", Path.home() / ".cache" / "vldlib"))


def _key(samples: list[tuple[str, int]], resolution: int) -> str:
    h = hashlib.md5(f"v1 {resolution}".encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class CacheSpaceError(RuntimeError):
    """The disk holding the cache lacks the space a cache file needs. The message says the fix."""


def reserve(path: Path, size: int, what: str) -> None:
    """Give the empty file `path` its `size` bytes on disk before it is memory-mapped: writing
    through a map into a full disk kills the process by SIGBUS, with no message. Checked against
    the free space first, then allocated (so a disk filled meanwhile fails here, not in the map)."""
    free = shutil.disk_usage(path.parent).free
    if size > free:
        raise CacheSpaceError(_no_space(path, size, free, what))
    if not hasattr(os, "posix_fallocate"):  # macOS: the free-space check alone
        return
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CacheSpaceError(_no_space(path, size, shutil.disk_usage(path.parent).free, what)) from None
        # a file system that cannot allocate ahead: the free-space check stands


def _no_space(path: Path, size: int, free: int, what: str) -> str:
    return (f"{path.parent}: no space for {what}: {size / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free on "
            f"that disk. Free space there, or set VLDLIB_CACHE to a folder on a bigger disk, and run the same "
            f"command again (nothing was left behind).")


def decode_images(samples: list[tuple[str, int]], resolution: int, *, desc: str = "decoding",
                  progress: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    from tqdm.auto import tqdm

    to_tensor = to_uint8_tensor(resolution)
    if out is None:
        out = np.empty((len(samples), 3, resolution, resolution), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(samples, desc=desc, disable=not progress, unit="img", mininterval=1.0)):
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (resolution, resolution))  # decode at a reduced scale when possible
            out[i] = to_tensor(to_rgb(im)).numpy()
    return out


def cached_domain(samples: list[tuple[str, int]], resolution: int, *, name: str = "domain",
                  progress: bool = True, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,3,R,R] memory-mapped, labels int64 [N]) for one domain; built once."""
    root = root or cache_root()
    key = _key(samples, resolution)
    folder = root / "images" / f"{name}-{resolution}px-{key}"
    data_file = folder / "images.u8"
    meta_file = folder / "meta.json"
    labels = np.array([y for _, y in samples], dtype=np.int64)
    shape = (len(samples), 3, resolution, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    with computed_once(data_file):  # runs started together decode it once
        if not meta_file.exists():  # meta is written last: its presence means the data is complete
            with atomic_path(data_file) as tmp:
                reserve(tmp, int(np.prod(shape)), f"the decoded-image cache of {name} at {resolution}px")
                arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
                decode_images(samples, resolution, desc=f"caching {name} at {resolution}px", progress=progress,
                              out=arr)
                arr.flush()
                del arr
            write_json_atomic(meta_file, {"shape": shape, "n": len(samples), "resolution": resolution})
    images = np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape)
    return images, labels


def image_sizes(samples: list[tuple[str, int]], *, progress: bool = True, root: Path | None = None) -> np.ndarray:
    """(height, width) of every original image, int64 [N, 2], read from the file headers (no decoding).

    The decoded-image cache squashes images to a square; augmentation needs the original shape to
    draw RandomResizedCrop as torchvision draws it on the original (`vldlib.data.gpu_augment`).
    Kept next to the cache (keyed by the files), so later runs read one small array.
    """
    from tqdm.auto import tqdm

    path = (root or cache_root()) / "sizes" / f"{_key(samples, 0)}.npy"
    if path.exists():
        try:
            sizes = np.load(path)
            if sizes.shape == (len(samples), 2):
                return sizes
        except (OSError, ValueError):
            pass  # damaged: read the headers again
    sizes = np.empty((len(samples), 2), dtype=np.int64)
    for i, (file, _) in enumerate(tqdm(samples, desc="reading image sizes", disable=not progress, unit="img",
                                       mininterval=1.0)):
        with Image.open(file) as im:
            sizes[i] = im.height, im.width  # the size convert("RGB") decodes to (no EXIF rotation on either path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, sizes)
    return sizes


def cached_benchmark(bench: MultiDomainFolder, resolution: int, progress: bool = True
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The decoded-image cache of every domain of a benchmark."""
    return [cached_domain(s, resolution, name=f"{bench.name}-{d}".replace(" ", "_"), progress=progress)
            for d, s in zip(bench.domains, bench.samples)]


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images))
