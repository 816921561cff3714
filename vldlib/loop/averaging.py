"""The weight average along the training trajectory (the paper's "WA"), with torch's swa_utils."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn


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
