"""Linear fine-tuning on several blocks (paper Figs 9-10): y = V (sum_i v_i * phi_i) + b.

The paper's explanation of very large dropout is that fine-tuning is near-linear: it re-weights
features the pretrained network already has. Its Figs 9-10 test this with a model that is linear
by construction: the backbone is frozen, phi_i is the globally average-pooled output of each of
the last k residual blocks (k = 3: the three blocks of ResNet50's layer4, all 2048-d), v_i a
per-feature weight vector (initialised N(0, 1), as the official code does), and dropout is
applied on the merged representation z = sum_i v_i * phi_i before the linear classifier V, b.
Only v_1..v_k, V and b are trained.

`MultiBlockNet` offers the interface the loop (`vldlib.loop.train`) uses from `FineTuneNet`
(`model`, `trunk`, `tail`, `features`, `head`, `train`, `has_trunk`), so the same loop runs it.
The whole backbone is the trunk: its outputs (the k pooled vectors) are cached with
`cache_trunk`, which makes a run cost about as much as a linear probe.

Blocks of different widths (EfficientNet-Lite0's last three units are 192-, 320- and 1280-d)
are zero-padded on the right to the widest, so z keeps the paper's "sum of re-weighted blocks"
form: feature j of z mixes feature j of every block that has one.

A run selects it with `TrainConfig(head="multiblock3", train_stages=0)`; the head is part of the
run's identity and folder name:

>>> run_dir = train(TrainConfig(benchmark="emoji", head="multiblock3", train_stages=0, cache_trunk=True,
...                             augment=False, dropout=0.9))  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vldlib.model.backbones import ModelConfigError, model_stages
from vldlib.model.head import check_dropout, dropout_rate


def residual_units(model: nn.Module) -> list[nn.Module]:
    """The feature extractor as a flat list of units whose composition is `forward_features`:
    the stem, then every residual block one by one (ResNet: the Bottlenecks of layer1..layer4;
    EfficientNet: every block of every stage, then conv_head+bn2 as the last unit)."""
    stages = model_stages(model)
    if hasattr(model, "layer4") and hasattr(model, "conv1"):  # ResNet: stem + 4 layers of blocks
        return [stages[0], *[b for layer in stages[1:] for b in layer]]
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet: stem + blocks + head
        return [stages[0], *[b for stage in stages[1:-1] for b in stage], stages[-1]]
    raise ModelConfigError(f"multi-block linear fine-tuning needs a ResNet or EfficientNet backbone, got "
                           f"{type(model).__name__}; use one of those (e.g. resnet50.tv2_in1k).")


class MultiBlockFeatures(nn.Module):
    """Frozen backbone -> pooled outputs of its last `blocks` units, zero-padded: [B, blocks, D].

    `blocks` is kept as a buffer so that the trunk-output cache (keyed by the trunk's weights)
    tells k=1 from k=3.
    """

    def __init__(self, model: nn.Module, blocks: int):
        super().__init__()
        units = residual_units(model)
        if not 1 <= blocks < len(units):
            raise ModelConfigError(f"blocks={blocks} but {type(model).__name__} has {len(units) - 1} residual "
                                   f"units after its stem; use 1..{len(units) - 1} (the paper: 3).")
        self.units = nn.ModuleList(units)
        self.register_buffer("blocks", torch.tensor(blocks))
        self.k = blocks
        with torch.no_grad():  # widths of the last k units, from one small probe image
            was = model.training
            model.eval()
            x = torch.zeros(1, 3, 64, 64)
            dims = []
            for i, u in enumerate(self.units):
                x = u(x)
                if i >= len(self.units) - blocks:
                    dims.append(x.shape[1])
            model.train(was)
        self.dims = dims
        self.width = max(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        first = len(self.units) - self.k
        for i, u in enumerate(self.units):
            x = u(x)
            if i >= first:
                p = x.mean(dim=(2, 3))
                pooled.append(nn.functional.pad(p, (0, self.width - p.shape[1])))
        return torch.stack(pooled, dim=1)


class MultiBlockHead(nn.Module):
    """z = sum_i v_i * phi_i, then Dropout(p), then Linear: the only trained part."""

    def __init__(self, blocks: int, width: int, num_classes: int, dropout: float):
        super().__init__()
        check_dropout(dropout)
        self.v = nn.Parameter(torch.randn(blocks, width))  # the official code: N(0, 1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def merge(self, phi: torch.Tensor) -> torch.Tensor:
        return (self.v * phi).sum(dim=1)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.merge(phi)))


class MultiBlockModel(nn.Module):
    """The state dict the loop saves: the (frozen) timm backbone and the multi-block head."""

    def __init__(self, backbone: nn.Module, head: MultiBlockHead):
        super().__init__()
        self.backbone = backbone
        self.head = head


class MultiBlockNet(nn.Module):
    """A frozen backbone with the multi-block linear head, shaped like `FineTuneNet` for the loop.

    `train_stages` and `freeze_bn` are accepted for the loop's call signature; the backbone is
    always frozen (in eval mode, no gradients).
    """

    def __init__(self, model: nn.Module, train_stages: int | None = 0, freeze_bn: bool = True, *,
                 blocks: int = 3):
        super().__init__()
        extractor = MultiBlockFeatures(model, blocks)
        num_classes = model.get_classifier().out_features
        dropout = dropout_rate(model)
        self.model = MultiBlockModel(model, MultiBlockHead(blocks, extractor.width, num_classes, dropout))
        for p in model.parameters():
            p.requires_grad_(False)
        self._trunk = [extractor]  # a plain list: parameters stay registered under self.model only
        self.train_stages, self.freeze_bn, self.blocks = 0, True, blocks
        self.train()

    @property
    def has_trunk(self) -> bool:
        return True

    @property
    def trunk_modules(self) -> list[nn.Module]:
        """The frozen extractor (what the trunk-output cache is keyed by)."""
        return list(self._trunk)

    def train(self, mode: bool = True) -> "MultiBlockNet":
        super().train(mode)
        self.model.backbone.eval()
        self._trunk[0].eval()
        for m in self.model.backbone.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        return self

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._trunk[0](x)

    def tail(self, phi: torch.Tensor) -> torch.Tensor:
        return self.model.head(phi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The merged representation z (no dropout), the analogue of the penultimate features."""
        return self.tail_features(self.trunk(x))

    def tail_features(self, phi: torch.Tensor) -> torch.Tensor:
        """z from the trunk's outputs (the k pooled block outputs)."""
        return self.model.head.merge(phi)

    def head(self) -> nn.Linear:
        return self.model.head.fc
