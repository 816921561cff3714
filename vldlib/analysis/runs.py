"""A finished run as analysable tensors: its network, its start, and its data as trunk outputs.

The mechanism analyses (feature usage, linearity) look inside a trained network, not only at its
accuracy records. They all need the same things: the network at a checkpoint, the network it
started from (the Taylor expansion point), and every split of the data pushed once through the
frozen trunk. `RunData` bundles them and computes penultimate features from the trunk outputs,
so the expensive frozen stages run once per image (and are reused from the training cache).

Split names: "train" = the "in" part of the training domains (what the head was fitted on),
"iid" = their held-out "out" part (the i.i.d. validation set), "ood" = the held-out domain's
part that `vldlib.evaluate.scores.ood_split` names: its "in" part (DomainBed), or its "out" part for benchmarks
whose domains show the same objects (emoji), as the run's meta.json says (`ood_split`).

>>> rd = load_run_data("outputs/runs/emoji-te0-p0.9-...")     # doctest: +SKIP
>>> phi, y = rd.features("ood")                                # [N, 1280] penultimate features
>>> net0 = initial_net(rd.cfg, len(rd.meta["classes"]))       # the weights the run started from
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vldlib import config as config_io
from vldlib.config import TrainConfig
from vldlib.data import load_benchmark
from vldlib.evaluate.scores import ood_split
from vldlib.experiments.grid import with_paths
from vldlib.loop import build_run_net, load_run_model, resolve_device, weights_file
from vldlib.loop.batches import make_data, trunk_features
from vldlib.model import FineTuneNet, data_config

SPLITS = ("train", "iid", "ood")


def majority_rate(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most frequent class of `labels`: the floor an accuracy
    on those images is read against."""
    return float(torch.bincount(labels).max()) / len(labels)


def initial_net(cfg: TrainConfig | dict, num_classes: int) -> FineTuneNet:
    """The network a run started from (the Taylor expansion point), in eval mode: the loop's own
    `build_run_net`, seeded, so it rebuilds the exact starting weights (a test checks it against
    a 1-step run)."""
    if isinstance(cfg, dict):
        cfg = config_io.from_dict(TrainConfig, cfg)
    return build_run_net(cfg, num_classes, torch.device("cpu"))[0].eval()


@dataclass
class RunData:
    """A run's network, config and the trunk outputs of every split (see the module docstring)."""

    run_dir: Path
    net: FineTuneNet
    cfg: TrainConfig
    meta: dict
    trunk: dict  # vldlib.loop.batches.trunk_features: {"evals": {"env0_in": (x, y), ...}, "train": [...]}

    @property
    def train_envs(self) -> list[int]:
        return list(self.meta["train_envs"])

    @property
    def test_envs(self) -> list[int]:
        return list(self.meta["test_envs"])

    def split_keys(self, split: str) -> list[str]:
        if split == "train":
            return [f"env{e}_in" for e in self.train_envs]
        if split == "iid":
            return [f"env{e}_out" for e in self.train_envs]
        if split == "ood":
            ood = self.meta.get("ood_split", "in")  # "out" where domains share objects (emoji)
            return [f"env{e}_{ood}" for e in self.test_envs]
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")

    def inputs(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk outputs and labels of a split (concatenated over its domains)."""
        parts = [self.trunk["evals"][k] for k in self.split_keys(split)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def features(self, split: str, net: FineTuneNet | None = None, batch: int = 512
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features [N, D] and labels of a split, through `net` (default: the run's)."""
        net = (net or self.net).eval()
        x, y = self.inputs(split)
        return torch.cat([net.tail_features(x[i:i + batch]) for i in range(0, len(y), batch)]), y


def load_run_data(run_dir: str | Path, which: str = "best", device: str = "cpu") -> RunData:
    """Load a finished run's checkpoint (`best` or `last`) and its data as trunk outputs.

    The trunk outputs come from the same on-disk cache the training used (computed if missing).
    """
    run_dir = Path(run_dir)
    weights_file(run_dir, which)  # before any work: WeightsNotKept names the run and the fix when it has none
    net, cfg_dict = load_run_model(run_dir, which)
    cfg = config_io.from_dict(TrainConfig, cfg_dict)
    meta = json.loads((run_dir / "meta.json").read_text())
    dev = resolve_device(device)
    bench = load_benchmark(cfg.benchmark, cfg.data_dir, skip_bad=cfg.skip_bad, progress=False)
    norm = data_config(net.model)
    data = make_data(cfg, bench, norm["mean"], norm["std"])
    net = net.to(dev).eval()
    trunk = trunk_features(net, data, cfg, dev)
    return RunData(run_dir, net.cpu(), cfg, meta, trunk)


def untrained_run_data(cfg: TrainConfig, device: str = "cpu") -> RunData:
    """`RunData` for a config without training it: the initial network and the trunk outputs.

    With `train_stages=0` these are the frozen pretrained features, the input of the head-only
    studies (dropout vs L2 on fixed features). No run directory is written.

    >>> rd = untrained_run_data(TrainConfig(benchmark="emoji", backbone="efficientnet_lite0.offline",
    ...                                     train_stages=0, resolution=96, augment=False))   # doctest: +SKIP
    """
    cfg = with_paths(cfg)
    cfg.validate()
    bench = load_benchmark(cfg.benchmark, cfg.data_dir, skip_bad=cfg.skip_bad, progress=False)
    net = initial_net(cfg, len(bench.classes))
    norm = data_config(net.model)
    # no training batches are drawn here, so the batch size must not reject a small domain
    data = make_data(dataclasses.replace(cfg, batch_size=1), bench, norm["mean"], norm["std"])
    dev = resolve_device(device)
    trunk = trunk_features(net.to(dev), data, cfg, dev)
    meta = {"classes": data.classes, "domains": data.domains, "train_envs": data.train_envs,
            "test_envs": list(cfg.test_envs), "benchmark": bench.name,
            "ood_split": ood_split(bench)}
    return RunData(Path(""), net.cpu(), cfg, meta, trunk)
