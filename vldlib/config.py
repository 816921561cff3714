"""`TrainConfig`, every knob of a run, and dataclass configs <-> flags, dicts and YAML files.

Every field becomes `--field-name` (booleans also `--no-field-name`); unknown keys are errors with
a suggestion, so a typo never silently runs the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vldlib.cliargs import UsageError, add_flag, bool_from_text, error_exit_code, parse_bool, print_error
from vldlib.data import BenchmarkSpec, get_spec
from vldlib.data.registry import is_benchmark_path
from vldlib.model import check_backbone, check_dropout, check_head

T = TypeVar("T")
__all__ = ["MAX_RESOLUTION", "TrainConfig", "UsageError", "add_arguments", "add_flag", "coerce", "error_exit_code",
           "added_later_defaults", "field_docs", "from_args", "from_dict", "load_file", "parse_bool", "print_error"]

MAX_RESOLUTION = 2048  # px: 84x the pixels of the paper's 224; beyond it a batch no longer fits on one GPU


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_list, is_optional) of a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        optional = len(non_none) < len(args)
        tp = non_none[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return args[0] if args else str, True, optional
    return tp, False, optional


def _parse_scalar(tp: Any, text: str) -> Any:
    return bool_from_text(text) if tp is bool else tp(text)


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert `value` (from a flag, YAML or JSON) to the type of field `name`, or raise."""
    hints = typing.get_type_hints(cls)
    tp, is_list, optional = _base_type(hints[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise UsageError(f"{name} cannot be None")
        return None
    try:
        if is_list:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
            return [_parse_scalar(tp, v) if isinstance(v, str) else tp(v) for v in items]
        if isinstance(value, str):
            return _parse_scalar(tp, value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, tp):
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    except (TypeError, ValueError) as e:
        raise UsageError(f"config field {name!r}: cannot use {value!r} ({e})") from None


def from_dict(cls: type[T], d: dict[str, Any], *, source: str = "config") -> T:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"{source}: unknown config key(s) {', '.join(hints)}. Known keys: {', '.join(names)}")
    return cls(**{k: coerce(cls, k, v) for k, v in d.items()})


def load_file(cls: type[T], path: str | Path, **overrides: Any) -> T:
    """A config from a YAML or JSON file (e.g. a saved run's config.json), plus overrides."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    return from_dict(cls, {**(data or {}), **overrides}, source=str(path))


def add_arguments(parser: argparse.ArgumentParser, cls: type, docs: dict[str, str] | None = None) -> None:
    """One `--flag` per field, defaulting to None so only flags actually given override; booleans
    as `--flag/--no-flag` (`--flag true|false` works too)."""
    docs = docs or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{docs.get(f.name, '')} (default: {default})"
        tp, is_list, _ = _base_type(hints[f.name])
        if tp is bool and not is_list:
            add_flag(parser, flag, dest=f.name, default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=text)


def from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return from_dict(cls, {**(base or {}), **given}, source="command line")


def field_docs(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class source: the flag's help text."""
    docs = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs
    for m in re.finditer(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+)$", src, re.M):
        docs[m.group(1)] = m.group(2).strip()
    return docs


# ----------------------------------------------------------------------------- the run's config
@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's protocol (ResNet #2, 10k steps, 90% dropout)."""

    # --- data
    benchmark: str = "PACS"  # registered name (under data_dir) or path to ROOT/<domain>/<class>/<img>
    data_dir: str = "data"  # where registered benchmarks live
    test_envs: list[int] = field(default_factory=lambda: [0])  # held-out domain index(es)
    trial_seed: int = 0  # seeds the 80/20 in/out split of every domain, nothing else
    holdout: float = 0.2  # fraction of every domain held out ("out" split)
    train_fraction: float = 1.0  # train on this fraction of each training domain's "in" split (nested subsets fixed by trial_seed; validation and test untouched)
    resolution: int = 224  # input size in pixels
    augment: bool = True  # DomainBed's training augmentation (off: eval resize only)
    val_augment: bool = False  # evaluate the training domains' "out" split with the training augmentation (the official code without --outsplit_noaug)
    augment_on: str = "workers"  # where augmentation runs: "workers" (PIL/tensors per image) or "device" (batched)
    cache_images: bool = False  # decode every image once into a memory-mapped uint8 cache
    skip_bad: bool = False  # skip unreadable images (counted and printed) instead of failing
    # --- model
    backbone: str = "resnet50.tv2_in1k"  # any timm name, or an offline backbone (efficientnet_lite0.offline)
    pretrained: bool = True  # ImageNet weights (False: random init, training from scratch)
    weights_file: str | None = None  # local weights instead of the hub (loaded with weights_only=True)
    dropout: float = 0.9  # rate on the pooled penultimate features (0 = plain fine-tuning)
    freeze_bn: bool = True  # BatchNorm running statistics fixed (affine parameters still trained)
    train_stages: int | None = None  # None: fine-tune all; k: the last k units of `model.named_stages` + head (EfficientNet: 1 conv_head, 2 adds blocks.6); 0: head only
    head: str = "linear"  # "linear" (Dropout + Linear), or "multiblock<k>" (paper Figs 9-10, needs train_stages 0)
    cache_trunk: bool = False  # compute the frozen stages once and train on their outputs (needs augment off)
    # --- optimisation
    steps: int | None = None  # SGD steps (None: the benchmark's, BenchmarkSpec.n_steps; 10,000 for a folder)
    batch_size: int = 32  # per training domain (3 domains: 96 images a step)
    lr: float = 1e-3  # learning rate
    head_lr_mult: float = 1.0  # classifier lr = lr x this (paper Fig 6: 10)
    weight_decay: float = 1e-4  # on every parameter
    momentum: float = 0.9  # SGD momentum
    lr_decay_at: list[float] = field(default_factory=lambda: [0.5])  # where lr *= lr_decay: fractions of steps (< 1) or step numbers (>= 1); [] (--lr-decay-at '') keeps lr constant
    lr_decay: float = 0.1  # lr multiplier at each of lr_decay_at
    # --- evaluation and averaging
    eval_every: int | None = None  # evaluate and checkpoint every this many steps, at 0 and at the last (None: BenchmarkSpec.checkpoint_freq; 300)
    average_from: int = 300  # weight average and logit ensemble start at this step
    eval_batch_size: int = 256  # batch size for evaluation
    keep_last: bool = True  # keep last.pt after the run finished (needed only to extend it)
    save_weights: bool = True  # keep the run's weights (best.pt, and final.pt without keep_last) for soups and analyses; False: records only (with keep_last=False: last.pt, the resume state, goes at the end)
    # --- system
    seed: int = 0  # training seed: head init, batch order, augmentation, dropout masks
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    num_workers: int = -1  # data-loading processes (-1: auto, 0: main process)
    num_threads: int = 0  # CPU threads for torch (0: cores // (loader workers + 1); 1 is fastest for tiny heads)
    channels_last: bool = False  # NHWC memory format (faster convolutions on GPUs)
    bf16: bool = False  # bfloat16 autocast (off until a short run shows accuracy within noise)
    compile: bool = False  # torch.compile the training forward (GPU speed; the first step compiles for a minute)
    tf32: bool = True  # TensorFloat-32 matmuls/convolutions on Ampere+ GPUs
    cudnn_benchmark: bool = False  # let cuDNN time its kernels for each new input shape (faster for one long run of a dense net; minutes of start-up for depthwise nets, many eval shapes or several runs on one GPU)
    out: str = "outputs/runs"  # parent folder of run directories
    run_name: str | None = None  # run folder name (default: readable summary + config hash)
    progress: bool = True  # show a progress bar

    # Fields that do not change results: left out of the run's identity hash.
    NON_IDENTITY = ("data_dir", "device", "num_workers", "out", "run_name", "progress", "keep_last",
                    "save_weights", "eval_batch_size", "cache_trunk", "num_threads", "compile", "cudnn_benchmark")
    # save_weights too: a study that reads only records.jsonl (the quickstart, the effect map) need not
    # write 30 MB of weights a run, and its runs are the same runs as those of a study that keeps them.
    # A run trained without them is then refused, naming it and the fix, by whatever needs its weights
    # (`vldlib.loop.load_run_model`, the across-run soups of `vldlib.evaluate.combine`).
    # cache_images is part of the identity: the cached square is resampled twice (resize, then crop
    # and resize), so its pixels differ slightly from the reference path's even with the same crops

    # Fields added after runs were already on disk, each with the value those runs used (its
    # default): left out of the identity at that value, so every existing run keeps its folder
    # name and is found finished; a run that sets another value is another run. Readers of old
    # config.json files fill them in (`vldlib.evaluate.scores.load_runs`, `combine`).
    ADDED_LATER = ("train_fraction",)

    def resolved(self) -> "TrainConfig":
        """This config with the fields left unset (None) filled in: `steps` and `eval_every` from the
        registered benchmark's `BenchmarkSpec` (n_steps, checkpoint_freq; DomainNet: 30,000 and
        1,000), the paper's 10,000 and 300 for a folder. What a run saves and hashes is the resolved
        config, so leaving them unset and setting the benchmark's values give the same run.

        >>> TrainConfig(benchmark="DomainNet").resolved().steps, TrainConfig(steps=600).resolved().steps
        (30000, 600)
        """
        if self.steps is not None and self.eval_every is not None:
            return self
        spec = benchmark_spec(self.benchmark)
        return dataclasses.replace(
            self, steps=self.steps if self.steps is not None else (spec.n_steps if spec else DEFAULT_STEPS),
            eval_every=self.eval_every if self.eval_every is not None else (spec.checkpoint_freq if spec else DEFAULT_EVAL_EVERY))

    def lr_milestones(self) -> list[int]:
        """The steps after which lr *= lr_decay: each `lr_decay_at` value below 1 is a fraction of
        the run (0.5 of 10,000: 5,000), one of 1 or more a step number (the official DomainNet
        schedule: [5000, 10000]). Steps 1..m use the rate before milestone m, m+1.. the next."""
        steps = self.resolved().steps
        return sorted({max(1, int(round(f * steps))) if f < 1 else int(f) for f in self.lr_decay_at})

    def validate(self) -> None:
        """Errors before any work starts, each naming the value and the fix (on the resolved config)."""
        if self.steps is None or self.eval_every is None:
            return self.resolved().validate()
        check_dropout(self.dropout)
        check_backbone(self.backbone)
        check_head(self.head, self.train_stages)
        if not (self.lr > 0 and math.isfinite(self.lr)):  # `not >`: NaN fails too
            raise UsageError(f"lr must be > 0 and finite, got {self.lr}; e.g. --lr 1e-3 (the paper's grid: 1e-3, 5e-4)")
        if self.steps <= 0:
            raise UsageError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise UsageError(f"batch sizes must be > 0, got batch_size={self.batch_size}")
        if not (0 <= self.weight_decay < math.inf) or not 0 <= self.momentum < 1:
            raise UsageError(f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay}, {self.momentum}")
        if not (0 < self.head_lr_mult < math.inf):
            raise UsageError(f"head_lr_mult must be > 0, got {self.head_lr_mult}")
        if not 0 < self.holdout < 1:
            raise UsageError(f"holdout fraction must be in (0, 1), got {self.holdout}; e.g. --holdout 0.2 (the paper's)")
        if not 0 < self.train_fraction <= 1:
            raise UsageError(f"train_fraction must be in (0, 1], got {self.train_fraction}; e.g. --train-fraction 0.25 "
                             f"trains on a quarter of each training domain's 'in' split (1: all of it)")
        if not self.test_envs:
            raise UsageError("test_envs is empty: name at least one held-out domain index")
        bad = [f for f in self.lr_decay_at if not (0 < f < 1 or (f >= 1 and float(f).is_integer() and f < self.steps))]
        if bad:
            raise UsageError(f"lr_decay_at {bad}: each must be a fraction of the run in (0, 1) (e.g. 0.5) or a step "
                             f"number from 1 to steps - 1 = {self.steps - 1} (e.g. 5000); got {self.lr_decay_at}")
        if self.eval_every <= 0 or self.average_from < 0:
            raise UsageError("eval_every must be > 0 and average_from >= 0")
        if self.augment_on not in ("workers", "device"):
            raise UsageError(f"augment_on must be 'workers' or 'device', got {self.augment_on!r}")
        if not 16 <= self.resolution <= MAX_RESOLUTION:
            raise UsageError(f"resolution {self.resolution} is out of range: use 16..{MAX_RESOLUTION} px (the "
                             f"paper's is 224; --resolution 64 for the CPU demo)")
        if len(set(self.test_envs)) != len(self.test_envs):
            raise UsageError(f"test_envs {self.test_envs} names a domain twice; e.g. --test-envs 0 or --test-envs 0,1")
        if self.run_name is not None and (self.run_name in ("", ".", "..") or Path(self.run_name).name != self.run_name
                                          or "\\" in self.run_name):
            raise UsageError(f"run_name {self.run_name!r} must be one plain folder name (no '/', '..' or absolute "
                             f"path): the run folder is created inside --out {self.out}")
        if self.cache_trunk and self.augment:
            raise UsageError("cache_trunk computes the frozen stages once per image, so it cannot "
                             "augment: set augment=False (--augment false) or cache_trunk=False.")
        if self.val_augment and not self.augment:
            raise UsageError("val_augment evaluates the validation split with the training augmentation, but "
                             "augment is off: set augment=True (--augment) or val_augment=False.")
        if not self.save_weights and self.keep_last:
            raise UsageError("save_weights=False keeps no weights, but keep_last=True keeps last.pt (the weights "
                             "and optimiser state, to extend the run): set keep_last=False too (--no-keep-last), "
                             "or save_weights=True.")
        if self.cache_trunk and self.train_stages is None:
            raise UsageError("cache_trunk needs a frozen trunk: set train_stages (e.g. 1, or 0 for the head only).")

    def identity(self) -> dict:
        """The fields that change results, of the resolved config (unset steps = the benchmark's);
        an `ADDED_LATER` field only when it differs from its default, so that adding a field never
        renames the runs already on disk."""
        defaults = added_later_defaults()
        return {k: v for k, v in asdict(self.resolved()).items()
                if k not in self.NON_IDENTITY and not (k in defaults and v == defaults[k])}


def added_later_defaults() -> dict[str, Any]:
    """{field: default} of `TrainConfig.ADDED_LATER`: the value a run written before the field existed used."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TrainConfig.ADDED_LATER}


DEFAULT_STEPS, DEFAULT_EVAL_EVERY = 10_000, 300  # the paper's, for a benchmark that is a folder


def benchmark_spec(benchmark: str) -> BenchmarkSpec | None:
    """The registered benchmark's spec, or None for a folder path or an unknown name."""
    if is_benchmark_path(benchmark):
        return None
    try:
        return get_spec(benchmark)
    except KeyError:
        return None
