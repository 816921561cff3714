"""DomainBed's training augmentation and evaluation resize, with torchvision.transforms.v2.

Both accept PIL images and uint8 CHW tensors (the decoded-image cache), so the plain and the cached
paths apply the same operations. Resolution is a parameter: the paper uses 224, CPU studies less.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(resolution: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """RandomResizedCrop(scale 0.7-1), flip, ColorJitter(0.3 x4), RandomGrayscale, normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(resolution, scale=(0.7, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.3, 0.3, 0.3, 0.3),
        v2.RandomGrayscale(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(resolution: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Resize to resolution x resolution (DomainBed does not crop at evaluation), normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((resolution, resolution), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def to_uint8_tensor(resolution: int) -> v2.Compose:
    """What the decoded-image cache stores: RGB, resized, uint8 CHW."""
    return v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize((resolution, resolution), antialias=True),
                       v2.ToDtype(torch.uint8, scale=True)])
