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
        pairs = [(a, p.detach().to(a.device)) for a, p in zip(self.module.parameters(), model.parameters())
                 if p.requires_grad]
        if not pairs:
            return
        averaged, current = [a for a, _ in pairs], [p for _, p in pairs]
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            average = self.multi_avg_fn or get_swa_multi_avg_fn()  # uniform (SWA) average by default
            average(averaged, current, self.n_averaged.to(averaged[0].device))
        self.n_averaged += 1


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
