"""Feature usage across the effect map: does a higher rate spread the weight, and does the spread
predict the o.o.d. gain?

Notebook 10 trains every cell of the effect map (backbone x depth [x resolution]) at each rate,
with the lr and weight decay the map's i.i.d. validation chose for that cell (`study_configs`),
measures each run's feature usage (`feature_usage.usage_tables`), and answers two questions:

1. Per cell and rate b against rate a (0): the paired difference of each usage statistic, and of
   o.o.d. accuracy, paired by seed, each seed first averaged over the held-out domains, with its
   95% Student's t interval and n (`cell_effects`, through `power.domain_averaged_effect`).
2. Across cells: one point per (cell, rate b), x = the change in a usage statistic (the effective
   number of features), y = the o.o.d. gain; the Spearman rank correlation across the points, with
   a 95% interval from a bootstrap over seeds (`rank_correlation`).

Why a bootstrap over seeds, not Fisher's z: the points are not a random sample of cells from a
population (the cells are the map's, chosen in advance), so the sampling model behind Fisher's z
does not describe what is uncertain here. What is uncertain is where each point lies, and that is
seed noise in both coordinates, correlated within a point since x and y come from the same runs.
Resampling the seeds of each cell (with replacement, each seed carrying all its rates and domains,
so the pairing with the rate-0 runs and between x and y is kept), recomputing every point and the
correlation, gives that uncertainty; the 2.5% and 97.5% quantiles are the interval. It does not
say whether other cells would follow the same order: with few points the correlation can only
take a few values (3 points: -1, -0.5, 0.5, 1), and the text says so.

>>> round(spearman([1., 2., 3., 4.], [1., 3., 2., 4.]), 6)   # 1 - 6 (0 + 1 + 1 + 0) / (4 (16 - 1))
0.8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from vldlib.config import TrainConfig
from vldlib.evaluate.effects import effect_sentence, is_detectable
from vldlib.evaluate.power import complete_seeds, domain_averaged_effect
from vldlib.evaluate.tables import to_markdown
from vldlib.experiments import effect_map, tuning
from vldlib.analysis.feature_usage import CELL, cell_name
from vldlib.paths import locate, resolve

# metric -> (what it is, in words; whether it is an accuracy (percent), the rest as they are)
METRICS: dict[str, tuple[str, bool]] = {
    "participation_ratio": ("effective number of features", False),
    "n90": ("features holding 90% of the squared importance", False),
    "top10_share": ("share of the squared importance on the top 10% of features", False),
    "iid_retained_without_top10": ("share of i.i.d. accuracy kept without the top 10% of features", False),
    "ood_retained_without_top10": ("share of o.o.d. accuracy kept without the top 10% of features", False),
    "iid_retained_top10": ("share of i.i.d. accuracy kept with only the top 10% of features", False),
    "ood_retained_top10": ("share of o.o.d. accuracy kept with only the top 10% of features", False),
    "iid_retained_random10": ("share of i.i.d. accuracy kept with a random 10% of features", False),
    "ood_retained_random10": ("share of o.o.d. accuracy kept with a random 10% of features", False),
    "iid_acc": ("i.i.d. accuracy", True),
    "ood_acc": ("o.o.d. accuracy", True),
}
MIN_POINTS = 3  # a rank correlation of 2 points is +-1 whatever they are


def study_configs(base: TrainConfig, backbones: Sequence[str], depths: Sequence[int | None], rates: Sequence[float],
                  test_envs: Sequence[int], seeds: Sequence[int], steps: int,
                  resolutions: Sequence[int | str] | None = None, tuned_by: Any = None) -> list[TrainConfig]:
    """Every run of the study: the effect map's grid (`effect_map.configs`: cell x held-out domain x
    rate x seed, one step budget), each run with the lr and weight decay that the map chose for its
    cell (`tuning.apply_choices` on `tuned_by`, a choices.csv path or table: a cell it lacks is an
    error naming it), or, with `tuned_by=None`, the base config's lr and weight decay."""
    configs = effect_map.configs(base, backbones, depths, rates, [[int(t)] for t in test_envs], steps,
                                 resolutions=resolutions, seed=[int(s) for s in seeds])
    if tuned_by is None:
        return configs
    if isinstance(tuned_by, pd.DataFrame):
        return tuning.apply_choices(configs, tuned_by, source="the choices")
    return tuning.apply_choices(configs, tuning.read_choices(choices_path(tuned_by)), source=str(tuned_by))


def choices_path(path: str | Path) -> Path:
    """Where a `tuned_by` path points: as given (or a shipped `notebooks/NAME`, `paths.locate`) when
    that exists, else relative to the project root (`outputs/effect_map/choices.csv` from any folder);
    a missing file is `tuning.read_choices`'s error, naming the fix."""
    found = locate(path)
    return found if found.exists() else resolve(path)


def cells_of(usage: pd.DataFrame) -> list[str]:
    """The columns that tell the study's cells apart: backbone, depth, and resolution and
    train_fraction where they vary (`effect_map.cell_columns`)."""
    return effect_map.cell_columns(usage)


def cell_effects(usage: pd.DataFrame, a: float = 0.0, metrics: Sequence[str] = tuple(METRICS)) -> pd.DataFrame:
    """One row per (cell, rate b != a, metric): the paired difference metric(b) - metric(a) by seed,
    each seed first averaged over the held-out domains (`power.domain_averaged_effect`): both means,
    the difference, its SE, 95% t interval, p, dof, n (seeds), the verdict ("increase", "decrease",
    "none": `effects.is_detectable`) and its sentence."""
    cells = cells_of(usage)
    rows = []
    for key, g in usage.groupby(cells, sort=True):
        cell = dict(zip(cells, key))
        for b in sorted(r for r in g.dropout.unique() if r != a):
            for metric in metrics:
                if metric not in g.columns:
                    continue
                what, percent = METRICS.get(metric, (metric, False))
                eff = domain_averaged_effect(g.assign(method="model"), a=a, b=b, metric=metric)
                verdict = "none" if not is_detectable(eff) else "increase" if eff["mean"] > 0 else "decrease"
                rows.append({**cell, "cell": cell_name(cell, cells), "dropout": b, "against": a, "metric": metric,
                             "a_mean": eff["a_mean"], "b_mean": eff["b_mean"], "difference": eff["mean"],
                             "se": eff["se"], "ci_low": eff["ci_low"], "ci_high": eff["ci_high"], "p": eff["p"],
                             "dof": eff["dof"], "n": eff["n"], "domains": eff["domains"], "verdict": verdict,
                             "sentence": effect_sentence(eff, what, percent=percent)})
    return pd.DataFrame(rows)


def seed_differences(usage: pd.DataFrame, metric: str, a: float = 0.0) -> pd.DataFrame:
    """Per (cell, rate b != a, seed): metric(b) - metric(a), each side the mean over the held-out
    domains, for the seeds complete at both rates (`power.complete_seeds`): the pairs whose mean
    and SE `cell_effects` reports. Columns: the cell's, dropout, seed, diff."""
    cells = cells_of(usage)
    rows = []
    for key, g in usage.groupby(cells, sort=True):
        for b in sorted(r for r in g.dropout.unique() if r != a):
            seeds = complete_seeds(g, a, b)
            means = g[g.seed.isin(seeds)].groupby(["dropout", "seed"])[metric].mean()
            diff = (means[b] - means[a]).dropna()
            rows += [{**dict(zip(cells, key)), "dropout": b, "seed": s, "diff": float(v)} for s, v in diff.items()]
    return pd.DataFrame(rows, columns=[*cells, "dropout", "seed", "diff"])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties at their mean rank); NaN for fewer than `MIN_POINTS` points
    or a constant side.

    >>> spearman([1, 2, 3], [3, 2, 1]), spearman([1, 2], [1, 2])
    (-1.0, nan)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < MIN_POINTS or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def points(usage: pd.DataFrame, x: str = "participation_ratio", y: str = "ood_acc", a: float = 0.0) -> pd.DataFrame:
    """One row per (cell, rate b != a): the mean paired change in `x` and in `y` (seed differences,
    `seed_differences`), their standard errors over seeds, and n (the seeds both have)."""
    cells = cells_of(usage)
    dx = seed_differences(usage, x, a).rename(columns={"diff": "dx"})
    dy = seed_differences(usage, y, a).rename(columns={"diff": "dy"})
    both = dx.merge(dy, on=[*cells, "dropout", "seed"])
    g = both.groupby([*cells, "dropout"], sort=True)
    out = pd.DataFrame({"x": g.dx.mean(), "x_se": g.dx.sem(), "y": g.dy.mean(), "y_se": g.dy.sem(),
                        "n": g.size()}).reset_index()
    out.insert(len(cells), "cell", [cell_name(r, cells) for r in out.to_dict("records")])
    return out.assign(x_metric=x, y_metric=y, against=a)


def rank_correlation(usage: pd.DataFrame, x: str = "participation_ratio", y: str = "ood_acc", a: float = 0.0,
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman's correlation across the (cell, rate) points of `points`, with a percentile bootstrap
    interval: each replicate resamples every cell's seeds with replacement (a seed keeps all its
    rates and domains), recomputes every point's mean changes and the correlation. Replicates whose
    correlation is undefined (a constant side) are left out and counted. Returns rho, ci_low,
    ci_high, level, n_points, n_cells, n_boot, n_valid (replicates with a correlation), x, y."""
    pts = points(usage, x, y, a)
    cells = cells_of(usage)
    out = {"x": x, "y": y, "against": a, "rho": spearman(pts.x, pts.y), "level": level, "n_points": int(len(pts)),
           "n_cells": int(pts.groupby(cells).ngroups) if len(pts) else 0, "n_boot": int(n_boot),
           "n_valid": 0, "ci_low": float("nan"), "ci_high": float("nan")}
    if np.isnan(out["rho"]) or n_boot < 1:
        return out
    dx = seed_differences(usage, x, a).rename(columns={"diff": "dx"})
    d = dx.merge(seed_differences(usage, y, a).rename(columns={"diff": "dy"}), on=[*cells, "dropout", "seed"])
    rng = np.random.default_rng(seed)
    # per cell: its seeds and, per rate, the [seed] arrays of both differences, in seed order
    groups = []
    for _, g in d.groupby(cells, sort=True):
        seeds = np.array(sorted(g.seed.unique()))
        rates = [(w.set_index("seed").reindex(seeds)) for _, w in g.groupby("dropout", sort=True)]
        groups.append((len(seeds), [(r.dx.to_numpy(), r.dy.to_numpy()) for r in rates]))
    rhos = []
    for _ in range(int(n_boot)):
        bx, by = [], []
        for n, rates in groups:
            pick = rng.integers(0, n, size=n)
            for vx, vy in rates:
                bx.append(np.nanmean(vx[pick]))
                by.append(np.nanmean(vy[pick]))
        rhos.append(spearman(bx, by))
    rhos = np.array(rhos)
    rhos = rhos[~np.isnan(rhos)]
    out["n_valid"] = int(len(rhos))
    if len(rhos):
        tail = (1 - level) / 2
        out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(rhos, [tail, 1 - tail]))
    return out


def correlation_sentence(corr: dict, what_x: str | None = None, what_y: str | None = None) -> str:
    """The cross-cell answer, computed: Spearman's rho with its bootstrap interval and what the
    interval says ("no detectable rank correlation" when it contains 0), or why none was computed."""
    wx = what_x or METRICS.get(corr["x"], (corr["x"],))[0]
    wy = what_y or METRICS.get(corr["y"], (corr["y"],))[0]
    a = f"{corr['against']:g}"
    k = corr["n_points"]
    subject = f"the change in {wx} and the change in {wy} (each rate against {a})"
    if k < MIN_POINTS or np.isnan(corr["rho"]):
        why = (f"{k} point{'s' * (k != 1)}: a rank correlation needs at least {MIN_POINTS} (of 2 points it is "
               "+-1 whatever they are)" if k < MIN_POINTS else "one side is constant across the points")
        return (f"Rank correlation between {subject} across cells: not computed, {why}. The power parameter "
                "file maps more cells and rates.")
    head = (f"Spearman rank correlation between {subject} across {k} points ({corr['n_cells']} cells x rates): "
            f"rho = {corr['rho']:+.2f}")
    if np.isnan(corr["ci_low"]):
        return head + "; no bootstrap replicate had a defined correlation, so no interval."
    head += (f" [{100 * corr['level']:.0f}% bootstrap interval over seeds {corr['ci_low']:+.2f}, "
             f"{corr['ci_high']:+.2f}; {corr['n_valid']} of {corr['n_boot']} replicates]")
    if corr["ci_low"] <= 0 <= corr["ci_high"]:
        verdict = "the interval contains 0, so no detectable rank correlation"
    else:
        verdict = ("the interval excludes 0: cells whose " + wx + (" grows more gain more" if corr["rho"] > 0 else
                                                                    " grows more gain less"))
    few = (f" With {k} points rho takes only a few values and the interval is wide; the interval reflects seed "
           "noise in where the points lie, not whether other cells would follow the same order."
           if k < 10 else "")
    return f"{head}: {verdict}.{few}"


def spread_sentence(effects: pd.DataFrame, metric: str = "participation_ratio") -> str:
    """How many (cell, rate) contrasts show a detectable increase, decrease or none in `metric`."""
    e = effects[effects.metric == metric]
    what = METRICS.get(metric, (metric,))[0]
    if e.empty:
        return f"No contrast of {what} (fewer than two rates or no complete seeds)."
    counts = e.verdict.value_counts()
    parts = [f"{int(counts.get(v, 0))} show a detectable {v}" for v in ("increase", "decrease")]
    parts.append(f"{int(counts.get('none', 0))} no detectable change (the 95% t interval contains 0)")
    return (f"Of {len(e)} (cell, rate) contrasts against rate {e.against.iloc[0]:g}, the {what}: "
            + ", ".join(parts) + ".")


def effects_table(effects: pd.DataFrame, metrics: Sequence[str] = tuple(METRICS)) -> pd.DataFrame:
    """The wide view for the summary: one row per (cell, rate, metric), difference [95% CI] and n,
    accuracies in points, the rest as they are."""
    rows = []
    for r in effects[effects.metric.isin(metrics)].to_dict("records"):
        scale = 100 if METRICS.get(r["metric"], ("", False))[1] else 1
        fmt = (lambda v: f"{scale * v:+.1f}") if scale == 100 else (lambda v: f"{v:+.3g}")
        rows.append({"cell": r["cell"], "rate": f"{r['dropout']:g} vs {r['against']:g}", "metric": r["metric"],
                     "at a": f"{scale * r['a_mean']:.3g}", "at b": f"{scale * r['b_mean']:.3g}",
                     "difference [95% CI]": f"{fmt(r['difference'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                     "n": r["n"], "verdict": r["verdict"]})
    return pd.DataFrame(rows)


def plot_effects(effects: pd.DataFrame, metrics: Sequence[str] = ("participation_ratio", "top10_share",
                                                                   "ood_retained_random10",
                                                                   "ood_retained_without_top10", "ood_acc")):
    """One panel per metric: the paired difference from rate a with its 95% t interval against the
    rate, one line per cell, zero drawn (a bar that crosses it is no detectable change)."""
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if m in set(effects.metric)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.9 * len(metrics), 3.6), squeeze=False)
    names = list(dict.fromkeys(effects.cell))  # the cells in the map's order (backbone, then depth)
    rates = sorted(effects.dropout.unique())
    at = {r: i for i, r in enumerate(rates)}  # rates side by side, evenly spaced
    for ax, metric in zip(axes[0], metrics):
        scale = 100 if METRICS.get(metric, ("", False))[1] else 1
        for k, name in enumerate(names):
            e = effects[(effects.metric == metric) & (effects.cell == name)].sort_values("dropout")
            off = (k - (len(names) - 1) / 2) * 0.12
            yerr = [scale * (e.difference - e.ci_low).fillna(0), scale * (e.ci_high - e.difference).fillna(0)]
            ax.errorbar([at[r] + off for r in e.dropout], scale * e.difference, yerr=yerr, marker="o", capsize=3,
                        label=name)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlim(-0.6, len(rates) - 0.4)
        what = METRICS.get(metric, (metric,))[0]
        ax.set(xlabel="dropout rate", ylabel="difference" + (" (points)" if scale == 100 else ""),
               title="\n".join(_wrap(f"change in {what}", 34)))
        ax.title.set_fontsize(9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(names)), fontsize=8,
               title=f"cell (difference from rate {effects.against.iloc[0]:g}, 95% t interval)", title_fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.1 + 0.04 * ((len(names) - 1) // 4), 1, 1))
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def plot_usage_vs_gain(pts: pd.DataFrame, corr: dict):
    """One point per (cell, rate): x = the change in feature usage, y = the o.o.d. gain (points),
    both ± SE over seeds, one colour per cell, each point labelled with its rate; zero drawn on both
    axes, the rank correlation and its interval in the title."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    y_scale = 100 if METRICS.get(corr["y"], ("", False))[1] else 1
    for name, g in pts.groupby("cell", sort=False):  # the map's order
        ax.errorbar(g.x, y_scale * g.y, xerr=g.x_se.fillna(0), yerr=y_scale * g.y_se.fillna(0), fmt="o", capsize=3,
                    label=name)
        for r in g.itertuples():
            ax.annotate(f"{r.dropout:g}", (r.x, y_scale * r.y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.axvline(0, color="0.3", lw=0.8)
    wx, wy = (METRICS.get(corr[k], (corr[k],))[0] for k in ("x", "y"))
    ax.set(xlabel=f"change in {wx} (vs rate {corr['against']:g})",
           ylabel=f"{wy} gain" + (" (points)" if y_scale == 100 else ""))
    rho = ("Spearman rho not computed (fewer than 3 points)" if np.isnan(corr["rho"]) else
           f"Spearman rho {corr['rho']:+.2f}" + ("" if np.isnan(corr["ci_low"]) else
                                                  f" [{corr['ci_low']:+.2f}, {corr['ci_high']:+.2f}]"))
    ax.set_title(f"one point per (cell, rate), mean ± s.e. over seeds\n{rho}", fontsize=10)
    ax.legend(fontsize=8, title="cell (label: rate)", title_fontsize=8)
    fig.tight_layout()
    return fig


def summary_text(title: str, design: str, effects: pd.DataFrame, pts: pd.DataFrame, corr: dict,
                 sentence_metrics: Sequence[str] = ("participation_ratio", "ood_acc")) -> str:
    """summary.md: the design, the computed answers (the spread verdict counts, one sentence per
    (cell, rate) for `sentence_metrics`, the cross-cell correlation), then the tables."""
    lines = [spread_sentence(effects, "participation_ratio"), spread_sentence(effects, "ood_acc"),
             correlation_sentence(corr)]
    for r in effects[effects.metric.isin(sentence_metrics)].to_dict("records"):
        lines.append(f"{r['cell']}: {r['sentence']}")
    pts_tab = pts.drop(columns=[c for c in (*CELL, "x_metric", "y_metric") if c in pts.columns]).round(4)
    return (f"# {title}\n\n{design}\n\n" + "\n".join("- " + s for s in lines)
            + "\n\nPaired differences per cell and rate (by seed, each seed the mean over the held-out domains; "
            "accuracies in points):\n\n" + to_markdown(effects_table(effects))
            + f"\n\nPoints of the cross-cell figure (x: change in {corr['x']}, y: change in {corr['y']}, "
            "mean and SE over seeds):\n\n" + to_markdown(pts_tab) + "\n")
