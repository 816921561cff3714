"""The network the loop trains: a timm backbone cut into a frozen trunk and a trained tail.

`FineTuneNet` wraps a timm model for fine-tuning: BatchNorm statistics frozen (affine parameters
still trained), optionally only the last `train_stages` stages trained. The frozen stages form a
"trunk" whose outputs do not change during training, so they can be computed once and cached
(the CPU studies' speed knob): the same network, the same loop. The tail ends in the head of
`vldlib.model.head`: pooled features -> Dropout(p) -> Linear.

>>> net = FineTuneNet(create_model("resnet50.tv2_in1k", num_classes=7, dropout=0.9), train_stages=1)  # doctest: +SKIP
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vldlib.model.backbones import ModelConfigError, model_stages
from vldlib.model.head import head_logits
from vldlib.model.multiblock import MultiBlockNet


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
        model = self.model[0]
        return head_logits(model, model.forward_head(x, pre_logits=True))


class FineTuneNet(nn.Module):
    """A timm model prepared for fine-tuning.

    - `train_stages=None` trains everything; `k` trains the last k units of `named_stages` and the
      head (EfficientNet: 1 is conv_head, one 1x1 convolution; 2 adds blocks.6); `0` trains the head
      only (a linear probe with dropout on frozen features).
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

    @property
    def trunk_modules(self) -> list[nn.Module]:
        """The frozen stages, in order (what the trunk-output cache is keyed by)."""
        return list(self._trunk)

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
            x = self.model.forward_features(x)
        else:
            for s in self._tail_stages:
                x = s(x)
        return head_logits(self.model, self.model.forward_head(x, pre_logits=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features of images (before the dropout)."""
        return self.tail_features(self.trunk(x))

    def tail_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features from trunk outputs `x` (images when there is no trunk)."""
        if self._tail_stages is None:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        for s in self._tail_stages:
            x = s(x)
        return self.model.forward_head(x, pre_logits=True)

    def head(self) -> nn.Linear:
        """The final Linear classifier."""
        return self.model.get_classifier()


HEADS = "linear (Dropout + Linear, vldlib.model.head) or multiblock<k> (the last k blocks re-weighted, paper Figs 9-10)"


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
    (`vldlib.model.multiblock.MultiBlockNet`), which offers the same interface."""
    blocks = check_head(head, train_stages)
    if blocks is None:
        return FineTuneNet(model, train_stages, freeze_bn)
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


