"""The weight average along the training trajectory (the paper's "WA"), with torch's swa_utils."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn, update_bn


class AveragedTrainable(AveragedModel):
    """`AveragedModel` that averages only the parameters being trained.

    Frozen parameters never change, so their average is themselves; skipping them makes the
    per-step average cost scale with what is trained (the head alone in a linear probe).
    """

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged, current = self._trained_pairs(model)
        if not averaged:
            return
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            average = self.multi_avg_fn or get_swa_multi_avg_fn()  # uniform (SWA) average by default
            average(averaged, current, self.n_averaged.to(averaged[0].device))
        self.n_averaged += 1

    def _trained_pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(averaged, current) tensors of the trained parameters. Listed once per model, as the set
        of trained parameters is fixed for a run: walking every module for its parameters at each
        step cost more than the average itself (6% of a CPU quickstart run)."""
        cached = getattr(self, "_pairs", None)
        if cached is None or cached[0] != id(model):
            pairs = [(a, p.detach()) for a, p in zip(self.module.parameters(), model.parameters()) if p.requires_grad]
            cached = self._pairs = (id(model), [a for a, _ in pairs], [p for _, p in pairs])
        _, averaged, current = cached
        return averaged, [p.to(a.device) for a, p in zip(averaged, current)]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_pairs", None)  # a copy must not hold on to (copies of) the original model's tensors
        return state


class _BatchNormView(torch.nn.Module):
    """What `update_bn` sees: only the BatchNorm layers that train (a frozen trunk's keep their
    statistics), and the forward that feeds them; every other layer stays in eval mode (no dropout)."""

    def __init__(self, forward, norms: list[torch.nn.Module]):
        super().__init__()
        self.norms = torch.nn.ModuleList(norms)
        self._forward = [forward]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward[0](x)


def refresh_bn_statistics(module: torch.nn.Module, forward, inputs, device: torch.device) -> None:
    """Recompute the BatchNorm running statistics of the averaged weights (`swa_utils.update_bn`).

    Only needed when BatchNorm is not frozen (training from scratch, notebook 04): the average of
    the weights has other activations than any model it averages, so the current model's
    statistics do not fit it (Izmailov et al. 2018). `forward`: `module` or its tail (on cached
    trunk outputs); `inputs`: batches of training images (or trunk outputs), without augmentation,
    so the result is a function of the weights alone. Only the BatchNorm layers that `module.train()`
    puts in training mode are recomputed.
    """
    was_training = module.training
    module.train()
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training]
    module.train(was_training)
    if norms:
        update_bn(inputs, _BatchNormView(forward, norms).eval(), device)  # eval: update_bn restores that mode
    module.train(was_training)
