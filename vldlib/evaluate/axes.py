"""Axis helpers without seaborn or pyplot, so that a module drawing on a bare
`matplotlib.figure.Figure` (the explorer, in its watcher thread) does not import them."""

from __future__ import annotations

from typing import Any

MIN_SPAN = 10.0  # points: the least an accuracy axis spans, so that noise never looks large


def min_span(ax: Any, axis: str = "y", span: float = MIN_SPAN) -> None:
    """Widen an accuracy axis (in %) to at least `span` points around its data, inside 0-100."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        lo, hi = mid - span / 2, mid + span / 2
        if lo < 0:
            lo, hi = 0.0, span
        if hi > 100:
            lo, hi = 100.0 - span, 100.0
        (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)
