"""Sentences for the notebooks' conclusions, generated from paired effects (never written ahead).

`vldlib.summary.paired_effect` computes the mean and standard error of a paired difference (e.g.
the participation ratio at p=0.9 minus at p=0, same held-out domain and seed); `effect_text`
states it for any metric, not only accuracies in percent.

>>> effect_text({"by": "dropout", "a": 0.0, "b": 0.9, "n": 3, "a_mean": 10.0, "b_mean": 30.0,
...              "mean": 20.0, "se": 2.0}, "participation ratio")
'participation ratio at dropout 0.9 vs 0: 30 vs 10, paired difference +20 ± 2 (n=3): larger than 2 standard errors.'
"""

from __future__ import annotations

import math


def _fmt(v: float, percent: bool) -> str:
    if percent:
        return f"{100 * v:.1f}%"
    return f"{v:.3g}"


def effect_text(eff: dict, what: str, percent: bool = False) -> str:
    """One sentence: both means, the paired difference ± its standard error, and whether it exceeds
    two standard errors (with one pair, no error bar: say so)."""
    if eff["n"] == 0:
        return f"{what}: no paired runs with {eff['by']}={eff['a']} and {eff['b']}, nothing to compare."
    scale = 100 if percent else 1
    unit = " points" if percent else ""
    diff = f"{scale * eff['mean']:+.3g}"
    head = (f"{what} at {eff['by']} {eff['b']:g} vs {eff['a']:g}: {_fmt(eff['b_mean'], percent)} vs "
            f"{_fmt(eff['a_mean'], percent)}, paired difference {diff}")
    if math.isnan(eff["se"]):
        return head + f"{unit} (n={eff['n']}): a single pair, no error bar, so not conclusive."
    head += f" ± {scale * eff['se']:.2g}{unit} (n={eff['n']})"
    if abs(eff["mean"]) < 2 * eff["se"]:
        return head + ": within 2 standard errors of zero, no detectable difference."
    return head + ": larger than 2 standard errors."
