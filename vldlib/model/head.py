"""The dropout: one `nn.Dropout(p)` on the pooled penultimate features, just before the classifier.

This is the paper's whole intervention ("very large dropout", p = 0.9): during fine-tuning every
pooled feature is zeroed with probability p and the survivors scaled by 1/(1-p); at evaluation it
is the identity. timm models have a `drop_rate` that does the same; vldlib creates every model
with `drop_rate=0` and applies the rate here instead, so it is visible and applied exactly once
(tests/test_train.py checks both).

`attach_dropout(model, p)` registers the dropout on the timm model (no parameters, so state
dicts and checkpoints are unchanged); `head_logits(model, pooled)` is what every network's tail
calls:

>>> import timm, torch
>>> model = attach_dropout(timm.create_model("test_resnet", num_classes=3, drop_rate=0.0), 0.9)
>>> pooled = model.forward_head(model.forward_features(torch.zeros(2, 3, 32, 32)), pre_logits=True)
>>> head_logits(model, pooled).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import torch
from torch import nn

from vldlib.cliargs import UsageError

HEAD_DROPOUT = "head_dropout"  # attribute name of the dropout module on a timm model


class ModelConfigError(UsageError):
    """A backbone name, weight file or model option is wrong. The message says the fix."""


def check_dropout(p: float) -> None:
    if not (0.0 <= float(p) < 1.0):
        raise ModelConfigError(f"dropout rate must be in [0, 1), got {p}: 1.0 would drop every feature. "
                               f"The paper's very large rate is 0.9.")


def attach_dropout(model: nn.Module, p: float) -> nn.Module:
    """Register `nn.Dropout(p)` on `model` as the dropout in front of its classifier; returns it."""
    check_dropout(p)
    if float(getattr(model, "drop_rate", 0.0) or 0.0) != 0.0:
        raise ModelConfigError(f"{type(model).__name__} was created with timm drop_rate={model.drop_rate}; "
                               f"create it with drop_rate=0 so that the dropout is applied once, here.")
    model.add_module(HEAD_DROPOUT, nn.Dropout(float(p)))
    return model


def dropout_rate(model: nn.Module) -> float:
    """The rate attached to `model` (0 when none was)."""
    drop = getattr(model, HEAD_DROPOUT, None)
    return float(drop.p) if drop is not None else 0.0


def head_logits(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Pooled penultimate features -> Dropout(p) -> the model's Linear classifier."""
    drop = getattr(model, HEAD_DROPOUT, None)
    return model.get_classifier()(drop(pooled) if drop is not None else pooled)
