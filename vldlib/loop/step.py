"""One training step of the loop, in two halves: the forward pass and loss, then the update.

The loop (`vldlib.loop.train`) checks the loss for NaN between the two halves; the benchmark
(`vldlib.tools.bench`) times exactly this object, so "the loop's own step" is one piece of code:
SGD with momentum, the same weight decay on every parameter, the lr schedule (x`lr_decay` at each
fraction or step number in `lr_decay_at`), and the running weight average from `average_from` on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_swa_multi_avg_fn

from vldlib.config import TrainConfig
from vldlib.loop.averaging import AveragedTrainable
from vldlib.model import param_groups
from vldlib.utils import seed_hash

Batch = list[tuple[torch.Tensor, torch.Tensor]]  # one (x, y) per training domain


class TrainStep:
    """The optimiser, schedule and weight average of a run, and one step on a list of batches.

    `forward` is what runs on a batch: the network, or its tail when the trunk's outputs are
    cached, possibly compiled. Its state (`optimizer`, `scheduler`, `averaged`) is what a
    checkpoint saves.
    """

    def __init__(self, net: torch.nn.Module, cfg: TrainConfig, forward: Callable | None = None):
        self.net, self.cfg, self.forward = net, cfg, (net if forward is None else forward)
        self.device = next(net.parameters()).device
        self.optimizer = torch.optim.SGD(param_groups(net, cfg.lr, cfg.head_lr_mult), lr=cfg.lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=cfg.lr_milestones(),
                                                              gamma=cfg.lr_decay)
        # Parameters are averaged; buffers (BatchNorm statistics) are not: they are frozen by default,
        # and otherwise the loop recomputes them for the averaged weights before evaluating them
        # (`vldlib.loop.averaging.refresh_bn_statistics`).
        self.averaged = AveragedTrainable(net, multi_avg_fn=get_swa_multi_avg_fn(), use_buffers=False)

    def loss(self, step: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, logits, labels) of `step` on the concatenated per-domain batches. Every random
        draw (dropout masks) is seeded by the step, so a resumed run draws the same."""
        cfg = self.cfg
        torch.manual_seed(seed_hash(cfg.seed, "step", step))
        x = torch.cat([b[0] for b in batch])
        y = torch.cat([b[1] for b in batch])
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = self.forward(x)
        return F.cross_entropy(logits.float(), y), logits, y

    def update(self, loss: torch.Tensor, done_steps: int) -> None:
        """Backward, SGD step, lr schedule, and the weight average once `average_from` is reached."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if done_steps >= self.cfg.average_from:
            self.averaged.update_parameters(self.net)
