"""Sensitivity curves: the whole dropout-rate axis of the effect map, and the rate i.i.d. validation picks.

The paper reports one rate (0.9) for most benchmarks and a best rate near 0.5 on DomainNet; it says
larger data sets seemed to prefer slightly lower rates, without measuring it. Here every rate of
the map is tuned alike (`vldlib.experiments.tuning`), and for each cell of the map (backbone,
depth, and resolution and training-set size where they vary):

- `rate_table`: per rate, o.o.d. and i.i.d. accuracy, the paired o.o.d. gain over rate `a` (0) with
  its 95% t interval, and the i.i.d. cost with its interval (training-domain validation);
- `pick_rates`: per held-out domain, the rate that i.i.d. validation picks among the tuned arms (the
  arm whose chosen configuration has the best mean i.i.d. accuracy on the tuning seeds; DomainBed
  chooses every hyperparameter per held-out domain this way, and reads no o.o.d. number);
- `selected_rate_table`: the o.o.d. gain of that picked arm over rate `a`, paired by seed, each seed
  averaged over the held-out domains (a domain whose pick is `a` itself contributes 0);
- `plot_rate_curves`: gain against rate, one line per backbone, the i.i.d. cost in a panel beside it.

Paired by seed: seed s of rate b against seed s of rate a, both on the same held-out domains.

>>> picks = pick_rates(choices)                                  # doctest: +SKIP
>>> selected_rate_table(tuned_selected, picks)                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from vldlib.evaluate.effects import format_p, is_detectable
from vldlib.evaluate.plots import legend_outside
from vldlib.evaluate.power import domain_averaged_effect
from vldlib.evaluate.selection import DESIGN_AXES
from vldlib.experiments.effect_map import ALL, cell_columns, depth_label, line_name, with_depth

SELECTED = "i.i.d.-selected"  # the arm label of the picked rate in `selected_rate_table`


def _points(eff: dict, prefix: str) -> dict:
    return {f"{prefix}_points": 100 * eff["mean"], f"{prefix}_ci_low_points": 100 * eff["ci_low"],
            f"{prefix}_ci_high_points": 100 * eff["ci_high"], f"{prefix}_p": eff["p"]}


def _label(cell: dict) -> str:
    d = cell["depth"]
    return depth_label(None if d == ALL else d, cell["backbone"])


def rate_table(selected: pd.DataFrame, a: float = 0.0, method: str = "model") -> pd.DataFrame:
    """One row per (cell, rate b != a): o.o.d. and i.i.d. accuracy at b and at a (points, means over
    seeds of the held-out-domain average), the o.o.d. gain b - a and the i.i.d. difference b - a, each
    with its 95% t interval and p (paired by seed), n, the verdict on the o.o.d. gain, and the
    eval-mode fit on the training domains at b."""
    sel = with_depth(selected[selected["method"] == method])
    keys = cell_columns(sel)
    rows = []
    for key, g in sel.groupby(keys, sort=True):
        cell = dict(zip(keys, key))
        for b in sorted(r for r in g["dropout"].unique() if r != a):
            ood = domain_averaged_effect(g, a=a, b=b, method=method)
            iid = domain_averaged_effect(g, a=a, b=b, metric="iid_acc", method=method)
            verdict = "none" if not is_detectable(ood) else "improvement" if ood["mean"] > 0 else "loss"
            fit = g[g["dropout"] == b]["fit_acc"].mean() if "fit_acc" in g else float("nan")
            rows.append({**cell, "depth_label": _label(cell), "dropout": b, "against": a,
                         "ood_points": 100 * ood["b_mean"], "ood_a_points": 100 * ood["a_mean"],
                         "iid_points": 100 * iid["b_mean"], "iid_a_points": 100 * iid["a_mean"],
                         **_points(ood, "gain"), **_points(iid, "iid_diff"), "n": ood["n"],
                         "verdict": verdict, "fit_points": 100 * fit})
    return pd.DataFrame(rows)


def pick_rates(choices: pd.DataFrame, rates: Sequence[float] | None = None) -> pd.DataFrame:
    """Per (cell, held-out domain): the rate whose tuned configuration has the highest mean i.i.d.
    validation accuracy on the tuning seeds (`choices.iid_mean`, from `selection.tuned`), among
    `rates` (None: every rate of the table). Ties go to the smaller rate. Reads no o.o.d. number:
    `choices` holds none. Columns: the cell, test_env, picked_rate, iid_mean."""
    c = with_depth(choices)
    if rates is not None:
        c = c[c["dropout"].round(6).isin([round(float(r), 6) for r in rates])]
    keys = [*cell_columns(c), "test_env"]
    best = (c.sort_values([*keys, "iid_mean", "dropout"], ascending=[True] * len(keys) + [False, True], kind="mergesort")
            .groupby(keys, sort=True).head(1))
    return best[[*keys, "dropout", "iid_mean"]].rename(columns={"dropout": "picked_rate"}).reset_index(drop=True)


def _picked_counts(picks: pd.DataFrame) -> str:
    """"0.5 x3, 0.3 x1": the picked rates over the held-out domains, most picked first."""
    counts = picks["picked_rate"].value_counts()
    return ", ".join(f"{r:g} x{n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def selected_rate_table(selected: pd.DataFrame, picks: pd.DataFrame, a: float = 0.0, method: str = "model"
                        ) -> pd.DataFrame:
    """Per cell: the rates i.i.d. validation picked (`pick_rates`, per held-out domain), and the
    o.o.d. gain of the picked arm over rate `a` with its 95% t interval, p and n (paired by seed,
    each seed averaged over the held-out domains), with the i.i.d. difference beside it."""
    sel = with_depth(selected[selected["method"] == method])
    keys = cell_columns(sel)
    on = [*keys, "test_env"]
    picks = picks[[*on, "picked_rate"]]
    base = sel[sel["dropout"] == a].assign(arm="a")
    chosen = sel.merge(picks, on=on, how="inner")
    chosen = chosen[chosen["dropout"].round(6) == chosen["picked_rate"].round(6)].drop(columns="picked_rate")
    both = pd.concat([base, chosen.assign(arm=SELECTED)], ignore_index=True)
    rows = []
    for key, g in both.groupby(keys, sort=True):
        cell = dict(zip(keys, key))
        p = picks.merge(pd.DataFrame([cell]), on=keys)
        ood = domain_averaged_effect(g, a="a", b=SELECTED, method=method, by="arm")
        iid = domain_averaged_effect(g, a="a", b=SELECTED, metric="iid_acc", method=method, by="arm")
        verdict = "none" if not is_detectable(ood) else "improvement" if ood["mean"] > 0 else "loss"
        rows.append({**cell, "depth_label": _label(cell), "picked_rates": _picked_counts(p),
                     "picked_mean": float(p["picked_rate"].mean()),
                     "ood_a_points": 100 * ood["a_mean"], "ood_selected_points": 100 * ood["b_mean"],
                     **_points(ood, "gain"), **_points(iid, "iid_diff"), "n": ood["n"], "verdict": verdict})
    return pd.DataFrame(rows)


def selected_sentences(table: pd.DataFrame, a: float = 0.0) -> list[str]:
    """One computed sentence per cell of `selected_rate_table`."""
    extra = [c for c in DESIGN_AXES if c in table.columns]
    out = []
    for r in table.to_dict("records"):
        what = {"improvement": "a detectable o.o.d. gain", "loss": "a detectable o.o.d. loss",
                "none": "no detectable o.o.d. effect"}[r["verdict"]]
        out.append(f"{line_name(r, extra)} {r['depth_label']}: i.i.d. validation picks {r['picked_rates']} (rate x "
                   f"held-out domains); the picked arm against {a:g}: {r['gain_points']:+.1f} points "
                   f"[{r['gain_ci_low_points']:+.1f}, {r['gain_ci_high_points']:+.1f}], {format_p(r['gain_p'])}, "
                   f"n = {r['n']}: {what}.")
    return out


def size_sentences(table: pd.DataFrame) -> list[str]:
    """With a training-set size axis: per (backbone, depth[, resolution]), the mean picked rate (over
    held-out domains) at each size, smallest size first, and whether it falls, rises or neither as the
    data grow (strictly monotone over the sizes, or "neither"), with the picked arm's gain beside it.
    The paper's open question, answered from `selected_rate_table`'s numbers."""
    if "train_fraction" not in table.columns:
        return []
    keys = [c for c in ("backbone", "depth", "resolution") if c in table.columns]
    out = []
    for _, g in table.sort_values("train_fraction").groupby(keys, sort=True):
        means = list(g["picked_mean"])
        steps = [b - a for a, b in zip(means, means[1:])]
        trend = ("falls" if all(d < 0 for d in steps) else "rises" if all(d > 0 for d in steps) else
                 "neither falls nor rises steadily")
        sizes = "; ".join(f"{100 * r['train_fraction']:g}%: {r['picked_mean']:.2f} ({r['picked_rates']}; gain "
                          f"{r['gain_points']:+.1f} [{r['gain_ci_low_points']:+.1f}, {r['gain_ci_high_points']:+.1f}])"
                          for r in g.to_dict("records"))
        first = g.iloc[0].to_dict()
        out.append(f"{line_name(first, [c for c in ('resolution',) if c in keys])} {first['depth_label']}: the mean "
                   f"rate i.i.d. validation picks, by training-set size: {sizes}. As the data grow it {trend}.")
    return out


def plateau_sentence(plateau: pd.DataFrame) -> str:
    """Which (cell, rate) had not plateaued on its constant-lr run (`convergence.plateau_check` of
    those runs): i.i.d. validation or eval-mode fit still rising by a point or more over the last
    quarter. Computed from the table, whatever it says."""
    extra = [c for c in DESIGN_AXES if c in plateau.columns and plateau[c].nunique() > 1]
    labelled = plateau.assign(depth_label=[depth_label(None if d == ALL else d, b)
                                           for d, b in zip(plateau["depth"], plateau["backbone"])])
    bad = labelled[~(labelled["plateaued"].astype(bool) & labelled["fit_plateaued"].fillna(True).astype(bool))]
    n = len(plateau)
    if bad.empty:
        return (f"Budget check (constant lr, tuning seeds): all {n} (cell, rate) configurations plateaued: i.i.d. "
                f"validation and eval-mode fit rose by less than 1 point over the last quarter of the run.")
    items = "; ".join(f"{line_name(r, extra)} {r['depth_label']} rate {r['dropout']:g} (i.i.d. {100 * r['gain']:+.1f}, "
                      f"fit {100 * r['fit_gain']:+.1f} points)" for r in bad.to_dict("records"))
    return (f"Budget check (constant lr, tuning seeds): {len(bad)} of {n} (cell, rate) configurations had not "
            f"plateaued (still rising by 1 point or more over the last quarter): {items}. Their comparison is "
            "before convergence at this budget.")


def plot_rate_curves(rates: pd.DataFrame, path=None) -> plt.Figure:
    """For one depth: the o.o.d. gain over rate 0 against rate (95% t intervals), one line per
    backbone (and resolution, data size where they vary), and the i.i.d. difference in a panel beside
    it. Zero drawn in both: a bar that crosses it is no detectable difference."""
    extra = [c for c in DESIGN_AXES if c in rates.columns]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    lines = list(rates.groupby(["backbone", *extra], sort=True))
    for k, (_, g) in enumerate(lines):
        g = g.sort_values("dropout")
        off = (k - (len(lines) - 1) / 2) * 0.006
        name = line_name(g.iloc[0].to_dict(), extra)
        for ax, col in zip(axes, ("gain", "iid_diff")):
            y = g[f"{col}_points"]
            yerr = [(y - g[f"{col}_ci_low_points"]).fillna(0), (g[f"{col}_ci_high_points"] - y).fillna(0)]
            ax.errorbar(g["dropout"] + off, y, yerr=yerr, marker="o", capsize=3, label=name)
    against = rates["against"].iloc[0] if len(rates) else 0.0
    for ax, what in zip(axes, ("o.o.d. gain", "i.i.d. difference (cost < 0)")):
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set(xlabel="dropout rate", ylabel=f"{what} over rate {against:g} (points)")
        ax.grid(alpha=0.3)
    depth = rates["depth_label"].iloc[0] if len(rates) else ""
    axes[0].set_title(f"{depth}: o.o.d. gain (95% t interval)")
    axes[1].set_title(f"{depth}: i.i.d. validation difference")
    fig.tight_layout()
    legend_outside(fig, axes, title="95% t interval, paired by seed")
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
