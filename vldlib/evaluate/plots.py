"""Figures: o.o.d. against i.i.d. accuracy, accuracy against the dropout rate, training curves,
conditions side by side, and what the domains look like.

Each returns its figure (shown inline by a notebook) and, given `path`, also saves it as PNG. The
matplotlib backend is never switched here: a notebook shows figures inline, a script or the
`report` command (no display) gets matplotlib's default non-interactive backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from PIL import Image

from vldlib.data.folder import MultiDomainFolder
from vldlib.evaluate.reference import METHOD_LABELS, paper_reference, reference_benchmark
from vldlib.evaluate.selection import check_columns, summarize
from vldlib.utils import atomic_path


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _label(method: Any) -> str:
    return METHOD_LABELS.get(str(method), str(method))


def _panels(n: int, width: float = 4.2, height: float = 3.6):
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


def plot_iid_vs_ood(selected: pd.DataFrame, hue: str = "dropout", style: str = "method",
                    over: str | None = "seed", reference: bool = True, path: str | Path | None = None):
    """i.i.d. vs o.o.d. accuracy, one panel per benchmark, like the paper's Fig 2.

    One point per (hue, style) value, averaged over held-out domains and everything else not
    named; error bars are ± se over `over`. With `reference`, the paper's points (fine-tuning
    at each dropout rate) are drawn as grey crosses on the benchmarks it ran. Returns the Figure.
    """
    check_columns(selected, [hue, style, "benchmark"], "plot_iid_vs_ood")
    benches = sorted(selected.benchmark.dropna().unique())
    fig, axes = _panels(len(benches))
    s = summarize(selected, by=["benchmark", hue, style], over=over)
    hues = sorted(s[hue].dropna().unique(), key=str)
    colors = dict(zip(hues, sns.color_palette("viridis", max(len(hues), 1))))
    markers = dict(zip(sorted(s[style].dropna().unique(), key=str), "osD^vP*X"))
    for ax, b in zip(axes, benches):
        for _, r in s[s.benchmark == b].iterrows():
            ax.errorbar(100 * r.iid_acc_mean, 100 * r.ood_acc_mean, xerr=100 * r.iid_acc_se,
                        yerr=100 * r.ood_acc_se, fmt=markers.get(r[style], "o"), color=colors.get(r[hue]),
                        ms=7, capsize=2, label=f"{hue}={r[hue]}, {_label(r[style])}")
        ref_b = reference_benchmark(b)
        if reference and ref_b:
            ref = paper_reference().query("benchmark == @ref_b and method == 'model'")
            ax.scatter(100 * ref.iid_acc, 100 * ref.ood_acc, marker="x", color="grey", label="paper (fine-tuning)")
            for _, r in ref.iterrows():
                ax.annotate(f"{r.dropout:g}", (100 * r.iid_acc, 100 * r.ood_acc), fontsize=7, color="grey")
        ax.set(title=str(b), xlabel="i.i.d. accuracy (%)", ylabel="o.o.d. accuracy (%)")
    if benches:
        handles, labels = axes[0].get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        fig.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(uniq), 4), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_rate_curve(selected: pd.DataFrame, x: str = "dropout", hue: str = "method", metric: str = "ood_acc",
                    over: str | None = "seed", reference: bool = True, path: str | Path | None = None):
    """`metric` vs the dropout rate (or any numeric `x`), one panel per benchmark, like Fig 3.

    Error bars are ± se over `over`; the paper's fine-tuning curve is drawn dashed in grey where
    the benchmark matches. Returns the Figure.
    """
    check_columns(selected, [x, hue, metric, "benchmark"], "plot_rate_curve")
    benches = sorted(selected.benchmark.dropna().unique())
    fig, axes = _panels(len(benches))
    s = summarize(selected, by=["benchmark", hue, x], over=over, metrics=[metric])
    for ax, b in zip(axes, benches):
        sb = s[s.benchmark == b]
        for h, g in sb.groupby(hue, sort=True):
            g = g.sort_values(x)
            ax.errorbar(g[x], 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_se"], marker="o",
                        capsize=2, label=_label(h))
        ref_b = reference_benchmark(b)
        if reference and ref_b and x == "dropout" and metric in ("ood_acc", "iid_acc"):
            ref = paper_reference().query("benchmark == @ref_b and method == 'model'").sort_values("dropout")
            ax.plot(ref.dropout, 100 * ref[metric], "--x", color="grey", label="paper (fine-tuning)")
        ax.set(title=str(b), xlabel=x, ylabel=("o.o.d." if metric == "ood_acc" else metric) + " accuracy (%)")
        ax.legend(fontsize=7)
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
    ax.legend(fontsize=7)
    ax2.plot(steps.step, steps.loss, marker="o", ms=3, label="training loss")
    if steps.train_acc.notna().any():
        ax2b = ax2.twinx()
        ax2b.grid(False)
        ax2b.plot(steps.step, 100 * steps.train_acc, marker="o", ms=3, color="C1", label="training accuracy")
        ax2b.set_ylabel("training accuracy (%)", color="C1")
    ax2.set(xlabel="step", ylabel="loss", title="training")
    fig.tight_layout()
    _save(fig, path)
    return fig


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


def plot_conditions(selected: pd.DataFrame, x: str, hue: str | None = None, metric: str = "ood_acc",
                    over: str | None = "seed", path: str | os.PathLike | None = None, title: str = ""):
    """Mean ± se of `metric` per `x` (and `hue`), one panel per benchmark: the paper's bar-style
    comparisons (Figs 6-8) as points with error bars."""
    sns.set_theme(style="whitegrid", context="paper")
    by = ["benchmark", x] + ([hue] if hue else [])
    data = selected.copy()
    if over is not None and over not in data.columns:
        over = None
    s = summarize(data, by=by, over=over, metrics=[metric])
    benches = sorted(s.benchmark.dropna().unique())
    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(4.8 * max(1, len(benches)), 3.6), squeeze=False)
    hues = sorted(s[hue].dropna().unique(), key=str) if hue else [None]
    xs = list(dict.fromkeys(s[x].tolist()))
    for ax, b in zip(axes[0], benches):
        sb = s[s.benchmark == b]
        for j, h in enumerate(hues):
            g = sb if h is None else sb[sb[hue] == h]
            pos = [xs.index(v) + (j - (len(hues) - 1) / 2) * 0.15 for v in g[x]]
            ax.errorbar(pos, 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_se"], fmt="o", capsize=3,
                        label=None if h is None else f"{hue}={h}")
        ax.set_xticks(range(len(xs)), [METHOD_LABELS.get(str(v), str(v)) for v in xs], rotation=20, ha="right")
        ax.set(title=title or str(b), xlabel=x, ylabel=("o.o.d." if metric == "ood_acc" else metric) + " accuracy (%)")
        if hue:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return fig
