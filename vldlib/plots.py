"""Figures shared by notebooks: what the domains look like."""

from __future__ import annotations

import matplotlib.pyplot as plt
from PIL import Image

from vldlib.data.folder import MultiDomainFolder


def show_domains(bench: MultiDomainFolder, per_class: int = 1, max_classes: int = 8, size: float = 1.3) -> plt.Figure:
    """A grid: one row per domain, the first images of the first classes, same order in every row.

    With domains that share objects (emoji), the same object appears in each column.
    """
    classes = bench.classes[:max_classes]
    cols = [(y, k) for y in range(len(classes)) for k in range(per_class)]
    fig, axes = plt.subplots(len(bench.domains), len(cols), figsize=(size * len(cols), size * len(bench.domains)),
                             squeeze=False)
    for d, (domain, samples) in enumerate(zip(bench.domains, bench.samples)):
        by_class: dict[int, list[str]] = {}
        for path, y in samples:
            by_class.setdefault(y, []).append(path)
        for j, (y, k) in enumerate(cols):
            ax = axes[d][j]
            ax.axis("off")
            paths = by_class.get(y, [])
            if k < len(paths):
                with Image.open(paths[k]) as im:
                    ax.imshow(im.convert("RGB"))
            if d == 0:
                ax.set_title(classes[y], fontsize=7)
        axes[d][0].text(-0.1, 0.5, domain, transform=axes[d][0].transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig
