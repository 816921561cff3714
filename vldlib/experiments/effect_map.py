"""The effect map: where in (fine-tuning depth x backbone) does 90% dropout help o.o.d.?

The paper's effect is claimed for rich pretrained networks fine-tuned throughout; CPU studies
train less (a head, a last stage). This module runs the grid depth x rate x backbone with the
same held-out domains, seeds and step budget for every cell, and states, from the numbers,
where the o.o.d. gain of rate `b` over `a` is detectable (more than 2 standard errors, paired by
seed, each seed averaged over the held-out domains: `vldlib.evaluate.power`).

Depth is `train_stages`: 0 = the head only (a linear probe with dropout), 1 = the last stage and
the head, k = the last k stages, None = everything (the paper's full fine-tuning).

>>> depth_label(0), depth_label(1), depth_label(3), depth_label(None)
('head only', 'last stage', 'last 3 stages', 'all stages')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from vldlib.config import TrainConfig
from vldlib.evaluate.effects import effect_sentence
from vldlib.evaluate.plots import floor_lines, legend_outside
from vldlib.evaluate.power import average_floor, domain_averaged_effect
from vldlib.experiments.grid import grid

ALL = 99  # sort key of "all stages" (train_stages None) after every finite depth


def depth_label(depth: int | None) -> str:
    if depth is None:
        return "all stages"
    return {0: "head only", 1: "last stage"}.get(int(depth), f"last {int(depth)} stages")


def depth_key(depth: Any) -> int:
    return ALL if depth is None or (isinstance(depth, float) and pd.isna(depth)) else int(depth)


def configs(base: TrainConfig, backbones: Sequence[str], depths: Sequence[int | None], rates: Sequence[float],
            test_envs: Sequence[list[int]], steps: int, **replicates: Sequence[Any]) -> list[TrainConfig]:
    """Every run of the map, the cheapest first (head only, then deeper), each backbone in turn,
    so that an interrupted map has its shallow end complete. One step budget for every cell;
    `replicates` are the other axes (the notebook's `nb.hparams()`: lr, weight_decay, seed)."""
    out = []
    for depth in sorted(depths, key=depth_key):
        for backbone in backbones:
            # the frozen trunk's outputs are cached only when something is frozen
            cell = dataclasses.replace(base, backbone=backbone, train_stages=depth, steps=int(steps),
                                       cache_trunk=base.cache_trunk and depth is not None)
            out += grid(cell, test_envs=list(test_envs), dropout=list(rates), **replicates)
    return out


def _depth_col(selected: pd.DataFrame) -> pd.Series:
    return selected["train_stages"].map(lambda d: ALL if d is None or pd.isna(d) else int(d))


def with_depth(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `depth` column: train_stages, "all stages" (None) as `ALL`, so that grouping
    never drops the full fine-tuning cell (pandas drops missing keys)."""
    return df.assign(depth=_depth_col(df))


def gain_table(selected: pd.DataFrame, a: float = 0.0, b: float = 0.9, method: str = "model") -> pd.DataFrame:
    """One row per (backbone, depth): o.o.d. accuracy at a and b, the paired gain b - a ± SE (points,
    by seed over the held-out domains), n, the smallest detectable effect (2 SE), the verdict
    ("improvement", "none", "loss") and its sentence."""
    sel = with_depth(selected)
    rows = []
    for (backbone, depth), g in sel.groupby(["backbone", "depth"], sort=True):
        eff = domain_averaged_effect(g, a=a, b=b, method=method)
        se = eff["se"]
        verdict = ("none" if not (se == se) or abs(eff["mean"]) <= 2 * se
                   else "improvement" if eff["mean"] > 0 else "loss")
        rows.append({"backbone": backbone, "depth": depth, "depth_label": depth_label(None if depth == ALL else depth),
                     f"ood_{a:g}": 100 * eff["a_mean"], f"ood_{b:g}": 100 * eff["b_mean"],
                     "gain_points": 100 * eff["mean"], "se_points": 100 * se, "n": eff["n"],
                     "detectable_points": 200 * se, "verdict": verdict, "sentence": effect_sentence(eff)})
    return pd.DataFrame(rows)


def accuracy_table(selected: pd.DataFrame, method: str = "model", metric: str = "ood_acc") -> pd.DataFrame:
    """Per (backbone, depth, rate): mean ± se over seeds of the accuracy averaged over held-out
    domains (points)."""
    sel = with_depth(selected[selected["method"] == method])
    per_seed = sel.groupby(["backbone", "depth", "dropout", "seed"])[metric].mean().reset_index()
    g = per_seed.groupby(["backbone", "depth", "dropout"])[metric]
    out = pd.DataFrame({"mean": 100 * g.mean(), "se": 100 * g.sem(), "n": g.count()}).reset_index()
    out["depth_label"] = out.depth.map(lambda d: depth_label(None if d == ALL else d))
    return out


def plot_gain(gains: pd.DataFrame, a: float = 0.0, b: float = 0.9, path=None) -> plt.Figure:
    """o.o.d. gain of b over a (± SE) against depth, one line per backbone; zero drawn."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    depths = sorted(gains.depth.unique())
    x = {d: i for i, d in enumerate(depths)}
    bbs = sorted(gains.backbone.unique())
    for k, (bb, g) in enumerate(gains.groupby("backbone")):
        g = g.sort_values("depth")
        off = (k - (len(bbs) - 1) / 2) * 0.06
        ax.errorbar([x[d] + off for d in g.depth], g.gain_points, yerr=g.se_points.fillna(0), marker="o", capsize=3,
                    label=bb.replace(".offline", ""))
    ax.axhline(0, color="0.3", lw=0.8)
    labels = gains.drop_duplicates("depth").set_index("depth").depth_label
    ax.set_xticks(range(len(depths)), [labels[d] for d in depths])
    ax.set(xlabel="fine-tuned depth", ylabel=f"o.o.d. gain of {b:g} over {a:g} (points)",
           title="o.o.d. gain of dropout {:g} over {:g} (± SE)".format(b, a))
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_accuracy(acc: pd.DataFrame, floor: pd.DataFrame, path=None) -> plt.Figure:
    """o.o.d. accuracy (± SE) against depth per rate, one panel per backbone, chance and majority
    class drawn."""
    bbs = sorted(acc.backbone.unique())
    fig, axes = plt.subplots(1, len(bbs), figsize=(4.2 * len(bbs), 3.6), sharey=True, squeeze=False)
    depths = sorted(acc.depth.unique())
    x = {d: i for i, d in enumerate(depths)}
    labels = acc.drop_duplicates("depth").set_index("depth").depth_label
    for ax, bb in zip(axes[0], bbs):
        for rate, g in acc[acc.backbone == bb].groupby("dropout"):
            g = g.sort_values("depth")
            ax.errorbar([x[d] for d in g.depth], g["mean"], yerr=g["se"].fillna(0), marker="o", capsize=2,
                        label=f"dropout {rate:g}")
        ax.set_xticks(range(len(depths)), [labels[d] for d in depths], fontsize=8)
        ax.set(title=bb.replace(".offline", ""), xlabel="fine-tuned depth", ylabel="o.o.d. accuracy (%)")
    for ax in axes[0]:  # once every panel is drawn: the shared range is final
        floor_lines(ax, *average_floor(floor))
    legend_outside(fig, axes[0], title="mean ± se over seeds")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def spectrum_text(gains: pd.DataFrame, a: float = 0.0, b: float = 0.9) -> str:
    """Where in the spectrum the gain is and is not detectable, computed from `gain_table`."""
    def cells(v: str) -> str:
        g = gains[gains.verdict == v].sort_values(["backbone", "depth"])
        return "; ".join(f"{r.backbone.replace('.offline', '')} {r.depth_label} ({r.gain_points:+.1f} ± "
                         f"{r.se_points:.1f})" for r in g.itertuples())
    parts = []
    for verdict, what in (("improvement", f"a detectable o.o.d. gain of dropout {b:g} over {a:g} (more than 2 SE)"),
                          ("loss", f"a detectable o.o.d. loss of dropout {b:g} against {a:g}"),
                          ("none", "no detectable effect (within 2 SE of zero)")):
        found = cells(verdict)
        if found:
            parts.append(f"{what[0].upper()}{what[1:]} at: {found}.")
    n_imp = int((gains.verdict == "improvement").sum())
    head = (f"The effect appears in {n_imp} of {len(gains)} cells of the map." if n_imp else
            f"The effect appears in none of the {len(gains)} cells of the map.")
    return " ".join([head, *parts])
