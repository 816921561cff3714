"""Torch datasets over a scanned benchmark: decode-on-read, or from the decoded-image cache.

Items are addressed by `(index, augmentation_seed)` as well as by `index`: the training loop
passes a seed derived from (run seed, step, domain, position), so augmentations are identical
after a resume, whatever process or worker decodes the image.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vldlib.data.folder import IMAGE_ERRORS, DataError, to_rgb


def _seeded(transform: Callable, x, seed: int | None):
    if seed is None:
        return transform(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(x)


class ImageDataset(Dataset):
    """(path, label) samples decoded with PIL on each read: the plain path (DomainBed's)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[idx]
        try:
            with Image.open(path) as im:
                img = to_rgb(im)
        except IMAGE_ERRORS as e:
            raise DataError(f"{path}: cannot decode image ({e}); delete or replace it, or load the "
                            f"benchmark with skip_bad=True to skip bad files.") from e
        return _seeded(self.transform, img, seed), label


class ArrayDataset(Dataset):
    """uint8 CHW images from the decoded-image cache (a memory-mapped array): no JPEG decoding."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, None)
        img = torch.from_numpy(np.array(self.images[idx]))  # copy out of the read-only memory map
        return _seeded(self.transform, img, seed), int(self.labels[idx])
