"""Starting points of a run (paper Figs 5 and 8): pretrained, random, or "less well pretrained"
(ImageNet weights plus noise, written once, offline), and what training from scratch trains."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vldlib.model import create_model, model_stages
from vldlib.utils import atomic_path


def noisy_weights(backbone: str, scale: float, path: str | os.PathLike, seed: int = 0,
                  pretrained: bool = True) -> Path:
    """Write the backbone's ImageNet weights with Gaussian noise added to every floating tensor
    of a conv/linear weight (std = scale x that tensor's std): a "less well pretrained" start
    that exists offline. BatchNorm statistics are left alone. Written once; reused after.
    `pretrained=False` adds the noise to a random initialisation (only for tests)."""
    path = Path(path)
    if path.exists():
        return path
    model = create_model(backbone, num_classes=1000, pretrained=pretrained)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.dim() >= 2:  # conv and linear weights
            v = v + scale * v.std() * torch.randn(v.shape, generator=gen)
        sd[k] = v.clone()
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return path


def starting_point(spec: str, weights_dir: str | os.PathLike, pretrained: bool = True) -> dict[str, Any]:
    """TrainConfig fields for a starting point written "BACKBONE", "BACKBONE@random" or
    "BACKBONE@noise<scale>" (e.g. "efficientnet_lite0.offline@noise0.5").

    >>> starting_point("resnet50.tv_in1k", "w")
    {'backbone': 'resnet50.tv_in1k', 'pretrained': True, 'weights_file': None, 'start': 'resnet50.tv_in1k'}
    """
    backbone, _, mod = spec.partition("@")
    out = {"backbone": backbone, "pretrained": bool(pretrained), "weights_file": None, "start": spec}
    if not mod:
        return out
    if mod == "random":
        return {**out, "pretrained": False}
    if mod.startswith("noise"):
        try:
            scale = float(mod[len("noise"):])
        except ValueError:
            raise ValueError(f"starting point {spec!r}: write the noise scale as a number, e.g. "
                             f"{backbone}@noise0.5") from None
        path = Path(weights_dir) / f"{backbone}-noise{scale:g}.pt"
        path = path.with_name(path.stem + ("" if pretrained else "-randominit") + ".pt")
        return {**out, "pretrained": True, "weights_file": str(noisy_weights(backbone, scale, path, pretrained=bool(pretrained)))}
    raise ValueError(f"starting point {spec!r}: unknown modifier {mod!r}; use BACKBONE, BACKBONE@random "
                     f"or BACKBONE@noise<scale>")


def full_training_stages(backbone: str, train_stages: int | None, cache_trunk: bool) -> int | None:
    """Training from scratch trains every stage. `train_stages=None` with `cache_trunk` becomes
    "all k stages" (an empty trunk), so the cached "trunk outputs" are the preprocessed images
    and the loop skips decoding and resizing: the same training, much faster on a CPU."""
    if train_stages is not None or not cache_trunk:
        return train_stages
    return len(model_stages(create_model(backbone, 2, pretrained=False)))
