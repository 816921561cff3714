"""Effect sizes that notebooks turn into their conclusions, computed, never written in advance.

A comparison is a paired difference: runs that share everything else (held-out domain, seed)
are paired, and the mean difference is reported with its standard error, n, and Student's t 95%
interval and p-value on n - 1 degrees of freedom (`vldlib.evaluate.student`). Three ways to
name the two sides, one sentence for all of them:

- `paired_effect(selected, a=0.0, b=0.9)`: two values of one column (dropout rates, precisions);
- `contrast(selected, {"dropout": 0.0}, {"dropout": 0.9, "method": "wa"})`: any two conditions;
- `paired_difference(left, right)`: two Series indexed by the pairing key (any metric).

`is_detectable(eff)` is THE rule every verdict uses: the 95% t interval excludes 0 (with few pairs
the t quantile is far above 2, so "more than 2 SE" would call noise an effect).
`effect_sentence(eff)` states it: both means, the difference with its interval, t, p and n.
Identical runs (difference 0, se 0) are "no detectable effect"; one pair has no interval and
says so.

>>> effect_sentence({"by": "dropout", "a": 0.0, "b": 0.9, "n": 3, "a_mean": 10.0, "b_mean": 30.0,
...                  "mean": 20.0, "se": 2.0}, "participation ratio", percent=False)
'dropout 0.9 vs 0: participation ratio 30 vs 10, paired difference +20 [95% CI +11.4, +28.6] (n=3 pairs; SE 2, t(2)=10.0, p=0.0099): the 95% t interval excludes 0, a detectable increase.'
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from vldlib.evaluate.reference import METHOD_LABELS
from vldlib.evaluate.student import t_interval


def paired_difference(left: pd.Series, right: pd.Series) -> dict:
    """n, both means, the mean and standard error of right - left over the keys both sides have,
    and its Student's t test (`student.t_interval`): dof, t, p, ci_low, ci_high (NaN when n < 2)."""
    both = pd.concat({"a": left, "b": right}, axis=1).dropna()
    diff = both["b"] - both["a"]
    n = int(len(diff))
    nan = float("nan")
    mean = float(diff.mean()) if n else nan
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else nan
    return {"n": n, "a_mean": float(both["a"].mean()) if n else nan, "b_mean": float(both["b"].mean()) if n else nan,
            "mean": mean, "se": se, **t_interval(mean, se, n)}


def is_detectable(eff: Mapping[str, Any]) -> bool:
    """THE verdict rule: the 95% Student's t interval of the paired difference excludes 0 (computed
    from the effect's mean, se and n, so hand-made effects follow the same rule). False with fewer
    than 2 pairs, and for identical runs (difference 0, se 0)."""
    ci = t_interval(float(eff["mean"]), float(eff["se"]), int(eff["n"]))
    return bool(ci["ci_low"] > 0 or ci["ci_high"] < 0)  # NaN compares False


def paired_effect(selected: pd.DataFrame, a: Any = 0.0, b: Any = 0.9, metric: str = "ood_acc",
                  method: str = "model", pair_on: Sequence[str] = ("test_env", "seed"), by: str = "dropout") -> dict:
    """Mean and standard error of `metric(b) - metric(a)` over runs paired on `pair_on`, where a and
    b are two values of column `by`.

    >>> eff = paired_effect(selected, a=0.0, b=0.9)          # doctest: +SKIP
    >>> eff["mean"], eff["se"], eff["n"]                      # doctest: +SKIP
    """
    sel = selected[selected["method"] == method] if "method" in selected else selected
    keys = list(pair_on)
    left = sel[sel[by] == a].groupby(keys)[metric].mean()
    right = sel[sel[by] == b].groupby(keys)[metric].mean()
    return {"by": by, "a": a, "b": b, "metric": metric, "method": method, **paired_difference(left, right)}


def _mask(df: pd.DataFrame, cond: Mapping[str, Any]) -> pd.Series:
    m = pd.Series(True, index=df.index)
    for k, v in cond.items():
        if k not in df.columns:
            raise KeyError(f"condition {dict(cond)}: no column {k!r}; columns: {', '.join(map(str, df.columns))}")
        col = df[k]
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
            m &= np.isclose(pd.to_numeric(col, errors="coerce").astype(float), float(v))
        else:
            m &= col.astype(str) == str(v)
    return m


def label(cond: Mapping[str, Any]) -> str:
    """ "fine-tuning, dropout=0.9" from {"method": "model", "dropout": 0.9}."""
    parts = [METHOD_LABELS.get(str(v), str(v)) if k == "method" else f"{k}={v:g}" if isinstance(v, float)
             else f"{k}={v}" for k, v in cond.items()]
    return ", ".join(parts)


def contrast(selected: pd.DataFrame, a: Mapping[str, Any], b: Mapping[str, Any],
             pair_on: Sequence[str] = ("test_env", "seed"), metric: str = "ood_acc") -> dict[str, Any]:
    """Mean ± se of metric(b) - metric(a), paired on `pair_on` (each side first averaged within
    each pair key: over learning rates, say). Pair on ("test_env",) when one side has no seed
    (across-run soups)."""
    keys = [k for k in pair_on if k in selected.columns]
    left = selected[_mask(selected, a)].groupby(keys)[metric].mean()
    right = selected[_mask(selected, b)].groupby(keys)[metric].mean()
    return {"a_label": label(a), "b_label": label(b), "metric": metric, **paired_difference(left, right),
            "pair_on": ",".join(keys)}


def _value(v: float, percent: bool) -> str:
    return f"{100 * v:.1f}%" if percent else f"{v:.3g}"


def _signed(v: float, percent: bool) -> str:
    return f"{100 * v:+.1f}" if percent else f"{v:+.3g}"


def format_p(p: float) -> str:
    """ "p=0.081", "p=0.0042", "p<0.0001": a two-sided p-value as sentences and tables print it."""
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"  # 2 digits: 0.049 never rounds to 0.05


def effect_sentence(eff: Mapping[str, Any], what: str = "o.o.d. accuracy", percent: bool = True) -> str:
    """One sentence: the two sides, both means, the paired difference with its 95% t interval,
    n, SE, t and p, and the verdict of `is_detectable`. Accuracies in percent (`percent=True`,
    the difference in points); any other metric as is."""
    if "a_label" in eff:
        a, b, sides = eff["a_label"], eff["b_label"], f"{eff['b_label']} vs {eff['a_label']}"
    else:
        a, b = (f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                for v in (eff["a"], eff["b"]))
        sides = f"{eff['by']} {b} vs {a}"
    if eff["n"] == 0:
        return f"{sides}: no paired runs, nothing to compare."
    scale, unit, se_fmt = (100, " points", ".1f") if percent else (1, "", ".2g")
    pairs = f"n={eff['n']} pairs" + (f" on {eff['pair_on']}" if eff.get("pair_on") else "")
    head = (f"{sides}: {what} {_value(eff['b_mean'], percent)} vs {_value(eff['a_mean'], percent)}, "
            f"paired difference {_signed(eff['mean'], percent)}")
    test = t_interval(float(eff["mean"]), float(eff["se"]), int(eff["n"]))
    if math.isnan(test["ci_low"]):
        return head + f"{unit} ({pairs}); one pair only, so no interval: run more seeds before concluding."
    head += (f" [95% CI {_signed(test['ci_low'], percent)}, {_signed(test['ci_high'], percent)}]{unit} "
             f"({pairs}; SE {scale * eff['se']:{se_fmt}}, t({test['dof']})={test['t']:.1f}, {format_p(test['p'])})")
    if not is_detectable(eff):
        return head + ": the 95% t interval contains 0, so no detectable effect at this scale." + _few(eff["n"])
    if percent:
        verdict = "a detectable improvement" if eff["mean"] > 0 else "a detectable loss"
    else:
        verdict = "a detectable increase" if eff["mean"] > 0 else "a detectable decrease"
    return head + f": the 95% t interval excludes 0, {verdict}." + _few(eff["n"])


FEW_PAIRS = 2  # up to this many pairs, the interval rests on a single degree of freedom


def _few(n: int) -> str:
    """The note on a verdict from 2 pairs: its interval is valid but 12.7 SE wide, so only a huge
    effect is detectable, and the SE itself is a one-degree-of-freedom guess."""
    if n > FEW_PAIRS:
        return ""
    return (f" With {n} pairs the interval rests on 1 degree of freedom (12.7 SE wide each side): "
            f"run more seeds to detect anything smaller.")
