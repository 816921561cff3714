"""Effect sizes that notebooks turn into their conclusions, computed, never written in advance.

The quickstart's verdict on "does 90% dropout help o.o.d.?" is the paired difference between
rates over runs that share everything else (held-out domain, seed), with its standard error.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd


def paired_difference(left: pd.Series, right: pd.Series) -> dict:
    """n, both means, and mean ± standard error of right - left over the keys both sides have."""
    both = pd.concat({"a": left, "b": right}, axis=1).dropna()
    diff = both["b"] - both["a"]
    n = int(len(diff))
    nan = float("nan")
    return {"n": n, "a_mean": float(both["a"].mean()) if n else nan, "b_mean": float(both["b"].mean()) if n else nan,
            "mean": float(diff.mean()) if n else nan, "se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else nan}


def paired_effect(selected: pd.DataFrame, a: float = 0.0, b: float = 0.9, metric: str = "ood_acc",
                  method: str = "model", pair_on: Sequence[str] = ("test_env", "seed"), by: str = "dropout") -> dict:
    """Mean and standard error of `metric(b) - metric(a)` over runs paired on `pair_on`.

    >>> eff = paired_effect(selected, a=0.0, b=0.9)          # doctest: +SKIP
    >>> eff["mean"], eff["se"], eff["n"]                      # doctest: +SKIP
    """
    sel = selected[selected["method"] == method] if "method" in selected else selected
    keys = list(pair_on)
    left = sel[sel[by] == a].groupby(keys)[metric].mean()
    right = sel[sel[by] == b].groupby(keys)[metric].mean()
    return {"by": by, "a": a, "b": b, "metric": metric, "method": method, **paired_difference(left, right)}


def effect_sentence(eff: dict, what: str = "o.o.d. accuracy") -> str:
    """One sentence stating the effect with its error bar and whether it exceeds 2 standard errors."""
    if eff["n"] == 0:
        return f"No paired runs with {eff['by']}={eff['a']} and {eff['b']}: nothing to compare."
    pts = 100 * eff["mean"]
    se = 100 * eff["se"] if not math.isnan(eff["se"]) else float("nan")
    a, b = eff.get("a_label", f"{eff['a']:g}"), eff.get("b_label", f"{eff['b']:g}")
    head = (f"{eff['by']} {b} vs {a}: {what} {100 * eff['b_mean']:.1f}% vs "
            f"{100 * eff['a_mean']:.1f}%, paired difference {pts:+.1f} ± {se:.1f} points (n={eff['n']} pairs)")
    if math.isnan(se):
        return head + "; one pair only, so no error bar: run more seeds before concluding."
    if abs(pts) <= 2 * se:  # se 0 and no difference (identical runs) is no effect, not a detectable one
        return head + ": within 2 standard errors of zero, so no detectable effect at this scale."
    return head + (": larger than 2 standard errors, a detectable improvement." if pts > 0
                   else ": larger than 2 standard errors, a detectable loss.")
