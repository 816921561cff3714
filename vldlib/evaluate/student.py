"""Student's t for a paired difference: its 95% interval and two-sided p-value, from the mean
difference, its standard error and the number of pairs n (n - 1 degrees of freedom).

Why t and not "2 standard errors": the standard error of a few pairs is itself uncertain, so the
95% threshold in units of SE grows as the pairs get fewer: 12.7 for 2 pairs, 2.78 for 5, 2.31
for 9, and 2 only in the many-pairs limit. A 9-seed difference of 2.01 SE has p = 0.08, not 0.05.

>>> round(t_quantile(0.975, 8), 3), round(t_quantile(0.975, 1), 3)
(2.306, 12.706)
>>> r = t_interval(mean=0.02, se=0.01, n=9)
>>> round(r["ci_low"], 4), round(r["ci_high"], 4), r["dof"], round(r["p"], 3)
(-0.0031, 0.0431, 8, 0.081)
"""

from __future__ import annotations

import math

from scipy import stats

LEVEL = 0.95  # the confidence of every interval the project reports


def t_quantile(q: float, dof: float) -> float:
    """The q-quantile of Student's t with `dof` degrees of freedom (NaN for dof < 1)."""
    return float(stats.t.ppf(q, dof)) if dof >= 1 else float("nan")


def critical_t(dof: float, level: float = LEVEL) -> float:
    """The half-width of a two-sided `level` interval in standard errors: t_{(1+level)/2, dof}."""
    return t_quantile((1 + level) / 2, dof)


def t_interval(mean: float, se: float, n: int, level: float = LEVEL) -> dict[str, float]:
    """dof, t, p (two-sided), ci_low and ci_high of a mean difference over n pairs with standard
    error `se`; every value NaN when n < 2 (one pair has no error bar). A zero SE (every pair
    differs by the same amount) gives a zero-width interval: t = 0 and p = 1 for identical runs,
    t infinite and p = 0 otherwise."""
    nan = float("nan")
    if n < 2 or not math.isfinite(se) or not math.isfinite(mean):
        return {"dof": nan if n < 2 else n - 1, "t": nan, "p": nan, "ci_low": nan, "ci_high": nan}
    dof = n - 1
    if se == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    p = 1.0 if t == 0 else 0.0 if math.isinf(t) else float(2 * stats.t.sf(abs(t), dof))
    half = critical_t(dof, level) * se
    return {"dof": dof, "t": t, "p": p, "ci_low": mean - half, "ci_high": mean + half}
