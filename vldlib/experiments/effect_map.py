"""The effect map: where in (fine-tuning depth x backbone) does 90% dropout help o.o.d.?

The paper's effect is claimed for rich pretrained networks fine-tuned throughout; CPU studies
train less (a head, conv_head). This module runs the grid depth x rate x backbone with the
same held-out domains, seeds and step budget for every cell, and states, from the numbers,
where the o.o.d. gain of rate `b` over `a` is detectable (its 95% Student's t interval excludes 0,
paired by seed, each seed averaged over the held-out domains: `vldlib.evaluate.power`).

Depth is `train_stages`: 0 = the head only (a linear probe with dropout), k = the last k units of
`vldlib.model.model_stages` and the head, None = everything (the paper's full fine-tuning). Depths
are named for what they train, in the network's own blocks (`vldlib.model.depth_name`): for
EfficientNet-Lite, 1 is conv_head (one 1x1 conv, not a stage), 2 adds blocks.6 (the last MBConv
stage, one block), 3 adds blocks.5.

>>> depth_label(0), depth_label(1, "efficientnet_lite0.offline"), depth_label(2), depth_label(None)
('head', 'conv_head', 'last 2 units', 'all')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from vldlib.config import TrainConfig
from vldlib.evaluate.effects import effect_sentence, format_p, is_detectable
from vldlib.evaluate.plots import floor_lines, legend_outside
from vldlib.evaluate.power import average_floor, detectable, domain_averaged_effect
from vldlib.evaluate.premise import premise_table
from vldlib.evaluate.selection import DESIGN_AXES
from vldlib.data.benchmarks import stored_for
from vldlib.experiments.grid import grid
from vldlib.experiments.tuning import varying
from vldlib.model import backbone_depth_name, native_resolution

ALL = 99  # sort key of "all stages" (train_stages None) after every finite depth


def depth_label(depth: int | None, backbone: str | None = None) -> str:
    """What a depth trains: named from the backbone's own modules when it is given
    (`backbone_depth_name`), else generically."""
    if depth is None or depth == ALL:
        return "all"
    if int(depth) == 0:
        return "head"
    if backbone is not None:
        try:
            return backbone_depth_name(backbone, int(depth))
        except (RuntimeError, ValueError, KeyError):  # not a timm architecture (a test's fake name)
            pass
    return f"last {int(depth)} units"


def depth_key(depth: Any) -> int:
    return ALL if depth is None or (isinstance(depth, float) and pd.isna(depth)) else int(depth)


def resolution_of(resolution: int | str, backbone: str) -> int:
    """Pixels of a resolution axis value: a number, or "native", the backbone's pretraining size
    (`vldlib.model.native_resolution`: 224 / 240 / 260 for EfficientNet-Lite0 / 1 / 2)."""
    if isinstance(resolution, str):
        if resolution.strip().lower() != "native":
            raise ValueError(f"resolution {resolution!r}: give pixels (e.g. 96) or 'native' (the backbone's "
                             "pretraining size)")
        return native_resolution(backbone)
    return int(resolution)


def configs(base: TrainConfig, backbones: Sequence[str], depths: Sequence[int | None], rates: Sequence[float],
            test_envs: Sequence[list[int]], steps: int, resolutions: Sequence[int | str] | None = None,
            train_fractions: Sequence[float] = (1.0,), **replicates: Sequence[Any]) -> list[TrainConfig]:
    """Every run of the map, the cheapest first (head only, then deeper; the smaller resolution and
    training set first), each backbone in turn, so that an interrupted map has its shallow end
    complete. One step budget for every cell; `replicates` are the other axes (the notebook's
    `nb.hparams()`: lr, weight_decay, seed). `resolutions` (None: the base config's) are pixels or
    "native" (`resolution_of`); each trains on the benchmark stored large enough for it
    (`data.benchmarks.stored_for`: ObjectStyles@256 for 224 px). `train_fractions`: the share of
    each training domain's "in" split (nested subsets, `TrainConfig.train_fraction`)."""
    out = []
    for depth in sorted(depths, key=depth_key):
        for res in (list(resolutions) if resolutions is not None else [base.resolution]):
            for fraction in train_fractions:
                for backbone in backbones:
                    px = resolution_of(res, backbone)
                    # the frozen trunk's outputs are cached only when something is frozen
                    cell = dataclasses.replace(base, backbone=backbone, train_stages=depth, steps=int(steps),
                                               cache_trunk=base.cache_trunk and depth is not None, resolution=px,
                                               benchmark=stored_for(base.benchmark, px),
                                               train_fraction=float(fraction))
                    out += grid(cell, test_envs=list(test_envs), dropout=list(rates), **replicates)
    return out


def benchmarks_of(configs: Sequence[TrainConfig]) -> list[str]:
    """The benchmarks a map trains on (one per stored size it needs), in first-use order: the
    notebook builds each before training (`prepare_benchmark`)."""
    return list(dict.fromkeys(c.benchmark for c in configs))


def cell_columns(table: pd.DataFrame) -> list[str]:
    """What tells the map's cells apart in `table`: backbone, depth, and resolution and train_fraction
    where they vary (a map at one resolution and one data size has neither column in its tables)."""
    return ["backbone", "depth", *varying(table)]


def _depth_col(selected: pd.DataFrame) -> pd.Series:
    return selected["train_stages"].map(lambda d: ALL if d is None or pd.isna(d) else int(d))


def with_depth(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a `depth` column: train_stages, "all stages" (None) as `ALL`, so that grouping
    never drops the full fine-tuning cell (pandas drops missing keys)."""
    return df.assign(depth=_depth_col(df))


def gain_table(selected: pd.DataFrame, a: float = 0.0, b: float = 0.9, method: str = "model") -> pd.DataFrame:
    """One row per cell (backbone, depth, and resolution and train_fraction where they vary): o.o.d.
    accuracy at a and b, the paired gain b - a, its SE and 95% t interval (points, by seed over the
    held-out domains), p, dof, n, the smallest detectable effect (the t half-width), the verdict of
    `effects.is_detectable` ("improvement", "none", "loss") and its sentence."""
    sel = with_depth(selected)
    keys = cell_columns(sel)
    rows = []
    for key, g in sel.groupby(keys, sort=True):
        cell = dict(zip(keys, key))
        eff = domain_averaged_effect(g, a=a, b=b, method=method)
        se = eff["se"]
        verdict = "none" if not is_detectable(eff) else "improvement" if eff["mean"] > 0 else "loss"
        depth = cell["depth"]
        rows.append({**cell, "depth_label": depth_label(None if depth == ALL else depth, cell["backbone"]),
                     f"ood_{a:g}": 100 * eff["a_mean"], f"ood_{b:g}": 100 * eff["b_mean"],
                     "gain_points": 100 * eff["mean"], "se_points": 100 * se,
                     "ci_low_points": 100 * eff["ci_low"], "ci_high_points": 100 * eff["ci_high"],
                     "p": eff["p"], "dof": eff["dof"], "n": eff["n"],
                     "detectable_points": 100 * detectable(se, eff["n"]), "verdict": verdict,
                     "sentence": effect_sentence(eff)})
    front = [*keys, "depth_label"]
    out = pd.DataFrame(rows)
    return out[front + [c for c in out.columns if c not in front]] if len(out) else out


def _chosen(choices: pd.DataFrame, cell: dict, rate: float, name: str) -> str:
    """The values of `name` chosen for one cell at one rate over its held-out domains, with how many
    domains chose each: "0.1 x3, 0.01 x1". `choices` has its `depth` column (`with_depth`)."""
    c = choices[choices.dropout == rate]
    for k, v in cell.items():
        c = c[c[k] == v]
    return ", ".join(f"{v:g} x{k}" for v, k in c[name].value_counts().sort_index(ascending=False).items())


def l2_table(tuned_selected: pd.DataFrame, choices: pd.DataFrame, a: float = 0.0, b: float = 0.9) -> pd.DataFrame:
    """Dropout against tuned L2, per cell: rate `a` with its i.i.d.-tuned weight decay *is* the L2
    control (the paper's question is whether dropout beats the best weight decay, not the default
    one). Columns: the weight decays and learning rates each arm chose (over held-out domains), the
    o.o.d. gain of b over a with its 95% t interval, p and n (`gain_table`), and the i.i.d.
    difference with its interval (`premise.premise_table`: training-domain numbers only)."""
    gains = gain_table(tuned_selected, a=a, b=b)
    keys = cell_columns(with_depth(tuned_selected))
    extra = keys[2:]
    gauge = premise_table(tuned_selected, by=("backbone", "train_stages", *extra), a=a)
    gauge = with_depth(gauge[gauge.dropout == b])[[*keys, "iid_cost_points", "iid_ci_low_points", "iid_ci_high_points"]]
    out = gains.drop(columns=["sentence", "se_points", "detectable_points"]).merge(gauge, on=keys, how="left")
    choices = with_depth(choices)
    for rate, arm in ((a, "L2"), (b, "dropout")):
        for name, col in (("weight_decay", f"{arm}_weight_decay"), ("lr", f"{arm}_lr")):
            out[col] = [_chosen(choices, {k: r[k] for k in keys}, rate, name) for r in out.to_dict("records")]
    front = [*keys, "depth_label", "L2_weight_decay", "L2_lr", "dropout_weight_decay", "dropout_lr"]
    return out[front + [c for c in out.columns if c not in front]]


def accuracy_table(selected: pd.DataFrame, method: str = "model", metric: str = "ood_acc") -> pd.DataFrame:
    """Per (cell, rate): mean ± se over seeds of the accuracy averaged over held-out domains (points)."""
    sel = with_depth(selected[selected["method"] == method])
    keys = cell_columns(sel)
    per_seed = sel.groupby([*keys, "dropout", "seed"])[metric].mean().reset_index()
    g = per_seed.groupby([*keys, "dropout"])[metric]
    out = pd.DataFrame({"mean": 100 * g.mean(), "se": 100 * g.sem(), "n": g.count()}).reset_index()
    out["depth_label"] = [depth_label(None if d == ALL else d, b) for d, b in zip(out.depth, out.backbone)]
    return out


def line_name(row: Any, extra: Sequence[str]) -> str:
    """The legend entry of a cell's line on a figure whose x axis is depth or rate: its backbone,
    and resolution and data size where they vary."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    parts = [get("backbone").replace(".offline", "")]
    if "resolution" in extra:
        parts.append(f"{int(get('resolution'))} px")
    if "train_fraction" in extra:
        parts.append(f"{100 * float(get('train_fraction')):g}% data")
    return ", ".join(parts)


def plot_gain(gains: pd.DataFrame, a: float = 0.0, b: float = 0.9, path=None) -> plt.Figure:
    """o.o.d. gain of b over a with its 95% t interval against depth, one line per backbone (and
    resolution, data size where they vary); zero drawn: a bar that crosses it is no detectable effect."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    depths = sorted(gains.depth.unique())
    x = {d: i for i, d in enumerate(depths)}
    extra = [c for c in DESIGN_AXES if c in gains.columns]
    lines = list(gains.groupby(["backbone", *extra], sort=True))
    for k, (_, g) in enumerate(lines):
        g = g.sort_values("depth")
        off = (k - (len(lines) - 1) / 2) * 0.06
        yerr = [(g.gain_points - g.ci_low_points).fillna(0), (g.ci_high_points - g.gain_points).fillna(0)]
        ax.errorbar([x[d] + off for d in g.depth], g.gain_points, yerr=yerr, marker="o", capsize=3,
                    label=line_name(g.iloc[0].to_dict(), extra))
    ax.axhline(0, color="0.3", lw=0.8)
    labels = gains.drop_duplicates("depth").set_index("depth").depth_label
    ax.set_xticks(range(len(depths)), [labels[d] for d in depths])
    ax.set(xlabel="fine-tuned depth", ylabel=f"o.o.d. gain of {b:g} over {a:g} (points)",
           title="o.o.d. gain of dropout {:g} over {:g} (95% t interval)".format(b, a))
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_accuracy(acc: pd.DataFrame, floor: pd.DataFrame, path=None) -> plt.Figure:
    """o.o.d. accuracy (± SE) against depth per rate, one panel per backbone (and resolution, data
    size where they vary), chance and majority class drawn."""
    extra = [c for c in DESIGN_AXES if c in acc.columns]
    panels = list(acc.groupby(["backbone", *extra], sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    depths = sorted(acc.depth.unique())
    x = {d: i for i, d in enumerate(depths)}
    labels = acc.drop_duplicates("depth").set_index("depth").depth_label
    for ax, (_, panel) in zip(axes[0], panels):
        for rate, g in panel.groupby("dropout"):
            g = g.sort_values("depth")
            ax.errorbar([x[d] for d in g.depth], g["mean"], yerr=g["se"].fillna(0), marker="o", capsize=2,
                        label=f"dropout {rate:g}")
        ax.set_xticks(range(len(depths)), [labels[d] for d in depths], fontsize=8)
        ax.set(title=line_name(panel.iloc[0].to_dict(), extra), xlabel="fine-tuned depth", ylabel="o.o.d. accuracy (%)")
    for ax in axes[0]:  # once every panel is drawn: the shared range is final
        floor_lines(ax, *average_floor(floor))
    legend_outside(fig, axes[0], title="mean ± se over seeds")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def spectrum_text(gains: pd.DataFrame, a: float = 0.0, b: float = 0.9) -> str:
    """Where in the spectrum the gain is and is not detectable (`effects.is_detectable`, through
    `gain_table`'s verdicts), each cell with its gain [95% t interval] and p, in points."""
    def cells(v: str) -> str:
        extra = [c for c in DESIGN_AXES if c in gains.columns]
        g = gains[gains.verdict == v].sort_values(["backbone", "depth", *extra])
        return "; ".join(f"{line_name(r, extra)} {r['depth_label']} ({r['gain_points']:+.1f} "
                         f"[{r['ci_low_points']:+.1f}, {r['ci_high_points']:+.1f}], {format_p(r['p'])})"
                         for r in g.to_dict("records"))
    parts = []
    for verdict, what in (("improvement", f"a detectable o.o.d. gain of dropout {b:g} over {a:g} "
                                          "(the 95% t interval excludes 0)"),
                          ("loss", f"a detectable o.o.d. loss of dropout {b:g} against {a:g} "
                                   "(the 95% t interval excludes 0)"),
                          ("none", "no detectable effect (the 95% t interval contains 0)")):
        found = cells(verdict)
        if found:
            parts.append(f"{what[0].upper()}{what[1:]} at: {found}.")
    n_imp = int((gains.verdict == "improvement").sum())
    head = (f"The effect appears in {n_imp} of {len(gains)} cells of the map." if n_imp else
            f"The effect appears in none of the {len(gains)} cells of the map.")
    return " ".join([head, *parts])
