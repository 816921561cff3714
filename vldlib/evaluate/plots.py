"""Figures: o.o.d. against i.i.d. accuracy, accuracy against the dropout rate, training curves,
conditions side by side, and what the domains look like.

Each returns its figure (shown inline by a notebook) and, given `path`, also saves it as PNG. The
matplotlib backend is never switched here: a notebook shows figures inline, a script or the
`report` command (no display) gets matplotlib's default non-interactive backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from PIL import Image

from vldlib.data.folder import MultiDomainFolder
from vldlib.evaluate.axes import MIN_SPAN, min_span  # noqa: F401  (MIN_SPAN: part of this module's look)
from vldlib.evaluate.reference import METHOD_LABELS, paper_reference, reference_benchmark
from vldlib.evaluate.selection import check_columns, summarize
from vldlib.utils import atomic_path


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _label(method: Any) -> str:
    return METHOD_LABELS.get(str(method), str(method))


# --------------------------------------------------------------------------- one look for every figure

# THE colour of each dropout rate, in every figure: neighbouring rates (0.9, 0.95) far apart in hue
RATE_COLORS = {0.0: "#1f77b4", 0.1: "#17becf", 0.2: "#2ca02c", 0.3: "#bcbd22", 0.5: "#9467bd", 0.7: "#8c564b",
               0.8: "#e377c2", 0.9: "#ff7f0e", 0.95: "#d62728", 0.99: "#000000"}
_SPARE_COLORS = ["#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
NOTEBOOK_WIDTH_PX = 830
"""The widest figure JupyterLab 4 shows at full size: its output area is 833 px wide in a 1280-px
window with the file browser open (953 at 1400; measured in headless Chromium). A notebook draws a
figure at 100 dpi (plt.show()), so a figure wider than 8.3 inches is shrunk, its text with it."""
NOTEBOOK_FONTS = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9,
                  "ytick.labelsize": 9, "legend.fontsize": 9, "legend.title_fontsize": 9}
"""Font sizes (points) of the notebook figures, whatever seaborn context was set before: at 100
dpi, 9 points are 12.5 px, the least that reads comfortably next to JupyterLab's 13-px text."""


def rate_color(rate: Any) -> str:
    """The fixed colour of a dropout rate (`RATE_COLORS`); other rates get a spare dark colour."""
    try:
        r = round(float(rate), 4)
    except (TypeError, ValueError):
        return _SPARE_COLORS[0]
    return RATE_COLORS.get(r, _SPARE_COLORS[int(r * 1000) % len(_SPARE_COLORS)])


def rate_palette(rates: Any) -> dict[str, str]:
    """{"0.9": colour, ...} for seaborn's `palette=` with rates written as "%g" strings."""
    return {f"{float(r):g}": rate_color(r) for r in pd.Series(list(rates)).dropna().unique()}


def describe(key: Mapping[str, Any]) -> str:
    """A legend entry a student can read: {"dropout": 0.9, "method": "wa"} -> "dropout rate 0.9,
    trajectory weight average"; other columns as "name value"."""
    parts = []
    for col, v in key.items():
        if col == "dropout":
            parts.append(f"dropout rate {float(v):g}")
        elif col == "method":
            parts.append(_label(v))
        elif col == "pretrained":
            parts.append("pretrained" if str(v).lower() in ("true", "1") else "from scratch")
        elif col == "train_stages":
            k = pd.to_numeric(v, errors="coerce")
            parts.append("all stages trained" if pd.isna(k) else "head only" if k == 0 else f"last {k:g} stage(s) + head")
        else:
            parts.append(f"{col.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{col.replace('_', ' ')} {v}")
    return ", ".join(parts)


def _with_n(label: str, n: Any) -> str:
    return f"{label} (n={int(n)})" if pd.notna(n) else label


def legend_outside(fig: Any, axes: Sequence[Any], title: str | None = None) -> None:
    """One legend for all panels, to the right of them (never over the data), each entry once."""
    uniq: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            uniq.setdefault(lab, h)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if uniq:
        fig.legend(uniq.values(), uniq.keys(), loc="upper left", bbox_to_anchor=(1.0, 0.95),
                   fontsize=NOTEBOOK_FONTS["legend.fontsize"], frameon=False, title=title)


def floor_lines(ax: Any, majority: float | None = None, chance: float | None = None,
                vertical: bool = False) -> list:
    """The majority-class rate (dotted black) and chance 1/K (dotted grey), as fractions, drawn
    in % where an accuracy axis is: a model below them learned nothing usable. Returns the lines.

    They never stretch the axis (that would squeeze the differences a figure is about): call this
    once the range is final; a floor outside it is still a legend entry, which says where it lies.
    """
    line = ax.axvline if vertical else ax.axhline
    get, set_ = (ax.get_xlim, ax.set_xlim) if vertical else (ax.get_ylim, ax.set_ylim)
    lims = get()
    lines = []
    for value, name, style in ((majority, "majority class", {"color": "k", "lw": 1.2}),
                               (chance, "chance", {"color": "grey", "lw": 1.0})):
        if value is None or pd.isna(value):
            continue
        v = 100 * value
        where = " (below the axis)" if v < min(lims) else " (above the axis)" if v > max(lims) else ""
        lines.append(line(v, ls=":", label=f"{name} ({v:.1f}%){where}", **style))
    set_(lims)
    return lines


def _per_benchmark(value: Any, benchmark: Any) -> float | None:
    return value.get(benchmark) if isinstance(value, Mapping) else value


def _panels(n: int, width: float = 4.2, height: float = 3.6):
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


def _columns(hue: str | Sequence[str] | None) -> list[str]:
    return [] if hue is None else [hue] if isinstance(hue, str) else list(hue)


def plot_iid_vs_ood(selected: pd.DataFrame, hue: str = "dropout", style: str = "method",
                    over: str | None = "seed", reference: bool = True, path: str | Path | None = None,
                    majority: float | Mapping[str, float] | None = None, chance: float | Mapping | None = None):
    """i.i.d. vs o.o.d. accuracy (%), one panel per benchmark, like the paper's Fig 2.

    One point per (hue, style) value, averaged over held-out domains and everything else not
    named; error bars are ± se over `over`, n in the legend. Rates keep their fixed colours. Both
    axes span at least `MIN_SPAN` points. `majority`/`chance` (fractions, or per benchmark) draw
    the o.o.d. floors. With `reference`, the paper's points are grey crosses. Returns the Figure.

    The style values are nested markers (`style_markers`): the first a small filled one, the next
    ones hollow and larger, so points that coincide (at rate 0 the weight average and the ensemble
    land on the fine-tuned model) stay visible as rings around each other instead of hiding.
    """
    check_columns(selected, [hue, style, "benchmark"], "plot_iid_vs_ood")
    benches = sorted(selected.benchmark.dropna().unique())
    fig, axes = _panels(len(benches))
    s = summarize(selected, by=["benchmark", hue, style], over=over)
    hues = sorted(s[hue].dropna().unique(), key=str)
    colors = ({h: rate_color(h) for h in hues} if hue == "dropout"
              else dict(zip(hues, sns.color_palette("colorblind", max(len(hues), 1)))))
    markers = style_markers(s[style].dropna().unique())
    rank = {v: i for i, v in enumerate(markers)}  # the legend lists the nested markers inside out
    s = s.assign(_rank=s[style].map(rank)).sort_values([hue, "_rank"], key=lambda c: c.astype(str) if c.name == hue else c)
    for ax, b in zip(axes, benches):
        for _, r in s[s.benchmark == b].iterrows():
            colour = colors.get(r[hue])
            marker, size, filled = markers.get(r[style], ("o", 7, True))
            drawn = ax.errorbar(100 * r.iid_acc_mean, 100 * r.ood_acc_mean, xerr=100 * r.iid_acc_se,
                                yerr=100 * r.ood_acc_se, fmt=marker, color=colour, ms=size, capsize=2,
                                mfc=colour if filled else "none", mew=1.6, elinewidth=0.9,
                                label=_with_n(describe({hue: r[hue], style: r[style]}), r.n))
            for bars in (*drawn[1], *drawn[2]):
                bars.set_alpha(0.45)  # error bars under the markers' outlines, not over them
        ref_b = reference_benchmark(b)
        if reference and ref_b:
            ref = paper_reference().query("benchmark == @ref_b and method == 'model'")
            ax.scatter(100 * ref.iid_acc, 100 * ref.ood_acc, marker="x", color="grey", label="paper (fine-tuning)")
            for _, r in ref.iterrows():
                ax.annotate(f"{r.dropout:g}", (100 * r.iid_acc, 100 * r.ood_acc), fontsize=7, color="grey")
        ax.set(title=str(b), xlabel="i.i.d. accuracy (%)", ylabel="o.o.d. accuracy (%)")
        min_span(ax, "x")
        min_span(ax, "y")
        floor_lines(ax, _per_benchmark(majority, b), _per_benchmark(chance, b))
    legend_outside(fig, axes, title=f"mean ± se over {over or 'runs'}")
    fig.tight_layout()
    _save(fig, path)
    return fig


def style_markers(values: Any) -> dict[Any, tuple[str, float, bool]]:
    """{value: (marker, size in points, filled)} for the style values of a scatter: methods in the
    order of `METHOD_LABELS` (fine-tuning first), other values sorted. The first is a small filled
    marker, each next one hollow and 4 points larger, so that markers drawn at the same place nest
    (a dot in a square in a diamond) rather than cover each other."""
    order = list(METHOD_LABELS)
    ranked = sorted(values, key=lambda v: (order.index(str(v)) if str(v) in order else len(order), str(v)))
    return {v: (m, 6.0 + 4.0 * i, i == 0) for i, (v, m) in enumerate(zip(ranked, "osD^vP*X"))}


def plot_rate_curve(selected: pd.DataFrame, x: str = "dropout", hue: str | Sequence[str] | None = "method",
                    metric: str = "ood_acc", over: str | None = "seed", reference: bool = True,
                    path: str | Path | None = None, majority: float | Mapping[str, float] | None = None,
                    chance: float | Mapping | None = None):
    """`metric` (%) vs the dropout rate (or any numeric `x`), one panel per benchmark, like Fig 3.

    One line per value of `hue` (a column or several: pass every column that tells runs apart,
    e.g. ["method", "pretrained", "train_stages"], so that from-scratch, head-only and partial
    runs are never pooled into one line). Error bars are ± se over `over`, n in the legend; the
    paper's fine-tuning curve is dashed grey where the benchmark matches. Returns the Figure.
    """
    hues = _columns(hue)
    check_columns(selected, [x, metric, "benchmark", *hues], "plot_rate_curve")
    benches = sorted(selected.benchmark.dropna().unique())
    fig, axes = _panels(len(benches))
    s = summarize(selected, by=["benchmark", *hues, x], over=over, metrics=[metric])
    name = {"ood_acc": "o.o.d. accuracy (%)", "iid_acc": "i.i.d. accuracy (%)"}.get(metric, f"{metric} (%)")
    for ax, b in zip(axes, benches):
        sb = s[s.benchmark == b]
        groups = sb.groupby(hues, sort=True, dropna=False) if hues else [((), sb)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            g = g.sort_values(x)
            n = g.n.min() if g.n.min() == g.n.max() else f"{g.n.min()}-{g.n.max()}"
            label = describe(dict(zip(hues, key))) or name
            ax.errorbar(g[x], 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_se"], marker="o",
                        capsize=2, label=f"{label} (n={n})")
        ref_b = reference_benchmark(b)
        if reference and ref_b and x == "dropout" and metric in ("ood_acc", "iid_acc"):
            ref = paper_reference().query("benchmark == @ref_b and method == 'model'").sort_values("dropout")
            ax.plot(ref.dropout, 100 * ref[metric], "--x", color="grey", label="paper (fine-tuning)")
        ax.set(title=str(b), xlabel="dropout rate" if x == "dropout" else x, ylabel=name)
        min_span(ax, "y")
        if metric == "ood_acc":
            floor_lines(ax, _per_benchmark(majority, b), _per_benchmark(chance, b))
    legend_outside(fig, axes, title=f"mean ± se over {over or 'runs'}")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_training_curves(df: pd.DataFrame, run: str | None = None, method: str = "model",
                         path: str | Path | None = None):
    """Accuracy of every split vs step for one run (and the training loss), to check a plateau.

    Solid lines are "in" splits, dashed "out"; the held-out domain is drawn thick. `run` may be
    omitted when the table holds a single run.
    """
    runs = sorted(df.run.unique())
    if run is None:
        if len(runs) != 1:
            raise ValueError(f"the table holds {len(runs)} runs; pass run=... one of: {', '.join(runs[:10])}"
                             + (" ..." if len(runs) > 10 else ""))
        run = runs[0]
    d = df[(df.run == str(run)) & (df.method == method)]
    if d.empty:
        raise ValueError(f"no rows for run={run!r}, method={method!r}; methods present: "
                         f"{sorted(df[df.run == str(run)].method.unique())}")
    fig, (ax, ax2) = _panels(2)
    for (env, split), g in d.groupby(["env", "split"], sort=True):
        g = g.sort_values("step")
        test = bool(g.is_test.iloc[0])
        ax.plot(g.step, 100 * g.acc, "-" if split == "in" else "--", marker="o", ms=3, color=f"C{env % 10}",
                lw=2.5 if test else 1.2, label=f"{g.domain.iloc[0]} {split}{' (test)' if test else ''}")
    steps = d.drop_duplicates("step").sort_values("step")
    ax.set(title=f"{Path(str(run)).name}: {_label(method)}", xlabel="step", ylabel="accuracy (%)")
    ax2.plot(steps.step, steps.loss, marker="o", ms=3, label="training loss")
    if steps.train_acc.notna().any():
        ax2b = ax2.twinx()
        ax2b.grid(False)
        ax2b.plot(steps.step, 100 * steps.train_acc, marker="o", ms=3, color="C1", label="training accuracy")
        ax2b.set_ylabel("training accuracy (%)", color="C1")
    ax2.set(xlabel="step", ylabel="loss", title="training")
    legend_outside(fig, [ax])
    fig.tight_layout()
    _save(fig, path)
    return fig


def show_domains(bench: MultiDomainFolder, per_class: int = 1, max_classes: int | None = None,
                 size: float = 1.3) -> plt.Figure:
    """A grid: one row per domain, the first images of every class (or the first `max_classes`),
    same order in every row. With domains that share objects (emoji), the same object appears in
    each column.
    """
    classes = bench.classes[:max_classes] if max_classes else list(bench.classes)
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


def plot_conditions(selected: pd.DataFrame, x: str, hue: str | None = None, metric: str = "ood_acc",
                    over: str | None = "seed", path: str | os.PathLike | None = None, title: str = "",
                    majority: float | Mapping[str, float] | None = None, chance: float | Mapping | None = None):
    """Mean ± se (%) of `metric` per `x` (and `hue`), one panel per benchmark: the paper's bar-style
    comparisons (Figs 6-8) as points with error bars, n in the legend, the floors as lines."""
    by = ["benchmark", x] + ([hue] if hue else [])
    data = selected.copy()
    if over is not None and over not in data.columns:
        over = None
    s = summarize(data, by=by, over=over, metrics=[metric])
    benches = sorted(s.benchmark.dropna().unique())
    fig, axes = _panels(len(benches), width=4.8)
    hues = sorted(s[hue].dropna().unique(), key=str) if hue else [None]
    colors = ({h: rate_color(h) for h in hues} if hue == "dropout"
              else dict(zip(hues, sns.color_palette("colorblind", len(hues)))))
    xs = list(dict.fromkeys(s[x].tolist()))
    name = {"ood_acc": "o.o.d. accuracy (%)", "iid_acc": "i.i.d. accuracy (%)"}.get(metric, f"{metric} (%)")
    for ax, b in zip(axes, benches):
        sb = s[s.benchmark == b]
        for j, h in enumerate(hues):
            g = sb if h is None else sb[sb[hue] == h]
            pos = [xs.index(v) + (j - (len(hues) - 1) / 2) * 0.15 for v in g[x]]
            n = g.n.min() if g.n.min() == g.n.max() else f"{g.n.min()}-{g.n.max()}"
            label = describe({hue: h}) if h is not None else "mean ± se"
            ax.errorbar(pos, 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_se"], fmt="o", capsize=3,
                        color=colors[h], label=f"{label} (n={n})")
        ax.set_xticks(range(len(xs)), [describe({x: v}) if x == "dropout" else _label(v) for v in xs],
                      rotation=20, ha="right")
        ax.set(title=title or str(b), xlabel="" if x == "dropout" else x.replace("_", " "), ylabel=name,
               xlim=(-0.5, len(xs) - 0.5))
        min_span(ax, "y")
        if metric == "ood_acc":
            floor_lines(ax, _per_benchmark(majority, b), _per_benchmark(chance, b))
    legend_outside(fig, axes, title=f"mean ± se over {over or 'runs'}")
    fig.tight_layout()
    _save(fig, path)
    return fig
