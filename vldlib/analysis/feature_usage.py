"""How many penultimate features does a classifier rely on?

The paper's explanation of very large dropout: a head trained with 90% dropout cannot lean on the
few features that minimise training error, since each is missing 90% of the time, so it spreads
its weight over many redundant ones ("rich representations"). This module measures that spread
for a linear head `logits = W phi + b` on features `phi`:

- importance of feature j = ||W[:, j]|| * std(phi_j): how much the logits move when feature j
  moves by its typical amount (the norm alone would favour features of small scale);
- participation ratio of the importances, (sum s_j^2)^2 / sum s_j^4: 1 when one feature carries
  everything, D when all D features matter equally, "the effective number of features";
- the importance spread: the share of the squared importance on the 10% most important features
  (`top_share`: 0.1 when every feature matters equally, 1 when a tenth carries everything);
- ablation curves: accuracy when only the top-k (or k random) features are kept, or the top k
  removed, every other feature set to its training mean (so the bias stays calibrated: a removed
  feature contributes its average, not zero).

The features are the run's own penultimate features (`RunData.features`: the cached frozen-trunk
outputs through the run's trained tail), so for a run that fine-tunes conv_head they are the
trained conv_head's output, not the pretrained one's.

>>> s = feature_importance(head.weight, phi_train.std(0))        # doctest: +SKIP
>>> participation_ratio(s)                                          # doctest: +SKIP
212.4
>>> ablation_curve(head.weight, head.bias, phi_ood, y_ood, s, mean=phi_train.mean(0), ks=[8, 64])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from vldlib.analysis.runs import load_run_data
from vldlib.evaluate.selection import DESIGN_AXES
from vldlib.evaluate.plots import rate_palette  # THE rate -> colour map, shared by every figure
from vldlib.experiments.effect_map import depth_key, depth_label, line_name
from vldlib.paths import shown

TENTH = 0.1  # the share of the features that the scalar ablation statistics keep, remove or count


def feature_importance(weight: torch.Tensor, feature_std: torch.Tensor) -> torch.Tensor:
    """Per-feature importance ||W[:, j]||_2 * std_j of a linear head with weight [C, D].

    >>> feature_importance(torch.tensor([[3., 0.], [4., 1.]]), torch.tensor([1., 2.]))
    tensor([5., 2.])
    """
    weight = torch.as_tensor(weight).detach().float()
    feature_std = torch.as_tensor(feature_std).detach().float()
    if weight.dim() != 2 or weight.shape[1] != feature_std.numel():
        raise ValueError(f"weight must be [classes, features] with features = len(feature_std); got "
                         f"{tuple(weight.shape)} and {feature_std.numel()} stds")
    return weight.norm(dim=0) * feature_std


def participation_ratio(s: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Effective number of features: (sum s^2)^2 / sum s^4, between 1 (one feature) and len(s) (all equal).

    >>> participation_ratio([0., 3., 0.]), participation_ratio([2., 2., 2., 2.])
    (1.0, 4.0)
    """
    e = np.asarray(torch.as_tensor(s, dtype=torch.float64).detach().cpu(), dtype=np.float64) ** 2
    if e.sum() == 0:
        raise ValueError("every importance is zero: the head has no weights, so no feature is used")
    return float(e.sum() ** 2 / (e ** 2).sum())


def mass_fraction_count(s: torch.Tensor | np.ndarray, fraction: float = 0.9) -> int:
    """Fewest features whose squared importances make up `fraction` of the total.

    >>> mass_fraction_count([1., 1., 1., 1.], 0.5)
    2
    """
    e = np.sort(np.asarray(torch.as_tensor(s, dtype=torch.float64).cpu()) ** 2)[::-1]
    c = np.cumsum(e) / e.sum()
    return int(np.searchsorted(c, fraction - 1e-12) + 1)


def tenth_of(d: int) -> int:
    """How many features are "a tenth" of d: round(d / 10), at least 1.

    >>> tenth_of(1280), tenth_of(16), tenth_of(4)
    (128, 2, 1)
    """
    return max(1, int(round(TENTH * d)))


def top_share(s: torch.Tensor | np.ndarray | Sequence[float], k: int | None = None) -> float:
    """Share of the squared importance held by the k most important features (k: a tenth of them).
    The importance spread: k/D when every feature matters equally, 1 when k features carry all.

    >>> top_share([3., 1., 1., 1.], k=1)
    0.75
    """
    e = np.sort(np.asarray(torch.as_tensor(s, dtype=torch.float64).detach().cpu()) ** 2)[::-1]
    k = tenth_of(len(e)) if k is None else int(k)
    return float(e[:k].sum() / e.sum())


@torch.no_grad()
def masked_accuracy(weight: torch.Tensor, bias: torch.Tensor | None, phi: torch.Tensor, y: torch.Tensor,
                    keep: torch.Tensor | np.ndarray | Sequence[int], mean: torch.Tensor) -> float:
    """Accuracy of `W phi + b` when only features `keep` are kept, the others set to `mean`.

    With every feature kept this is exactly the head's accuracy.
    """
    keep = torch.as_tensor(np.asarray(keep), dtype=torch.long)
    x = mean.to(phi.dtype).expand_as(phi).clone()
    x[:, keep] = phi[:, keep]
    logits = x @ weight.T.to(phi.dtype) + (0 if bias is None else bias.to(phi.dtype))
    return float((logits.argmax(1) == y).float().mean())


def ablation_curve(weight: torch.Tensor, bias: torch.Tensor | None, phi: torch.Tensor, y: torch.Tensor,
                   importance: torch.Tensor, mean: torch.Tensor, ks: Iterable[int], n_random: int = 5,
                   seed: int = 0) -> pd.DataFrame:
    """Accuracy keeping the top-k features (by importance), keeping k random features, and
    removing the top k (keeping all others), for each k.

    Returns a tidy table: k, order ("top", "random" or "without_top"), draw (0 but for random),
    acc. Random subsets are drawn `n_random` times per k with a fixed seed, so curves of different
    heads use the same draws.
    """
    d = phi.shape[1]
    order = torch.argsort(torch.as_tensor(importance), descending=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in ks:
        k = int(min(max(k, 1), d))
        rows.append({"k": k, "order": "top", "draw": 0,
                     "acc": masked_accuracy(weight, bias, phi, y, order[:k], mean)})
        rows.append({"k": k, "order": "without_top", "draw": 0,
                     "acc": masked_accuracy(weight, bias, phi, y, order[k:], mean)})
        for r in range(n_random):
            idx = rng.choice(d, size=k, replace=False)
            rows.append({"k": k, "order": "random", "draw": r, "acc": masked_accuracy(weight, bias, phi, y, idx, mean)})
    return pd.DataFrame(rows)


def default_ks(d: int, n: int = 12) -> list[int]:
    """Log-spaced subset sizes from 1 to d (d and a tenth of d included)."""
    return sorted({int(round(v)) for v in np.geomspace(1, d, n)} | {d, tenth_of(d)})


def _share(acc: float, full: float) -> float:
    return acc / full if full > 0 else float("nan")


def head_usage(run_data, ks: Iterable[int] | None = None, n_random: int = 5, splits: Sequence[str] = ("iid", "ood"),
               seed: int = 0) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Feature usage of one run's classifier (a `vldlib.analysis.runs.RunData`).

    Returns (summary dict, ablation table with a `split` column, sorted importances). The summary:
    n_features, participation_ratio, n90, top10_share (`top_share`), weight_norm, and per split
    `{split}_acc` and, as shares of it, `{split}_retained_top10` (only the top tenth kept),
    `{split}_retained_random10` (a random tenth kept, mean over the draws) and
    `{split}_retained_without_top10` (the top tenth removed).
    Feature statistics (std, mean) come from the training split, the data the head was fitted on.
    """
    phi_tr, _ = run_data.features("train")
    head = run_data.net.head()
    w, b = head.weight.detach(), head.bias.detach() if head.bias is not None else None
    s = feature_importance(w, phi_tr.std(0))
    mean = phi_tr.mean(0)
    d = int(phi_tr.shape[1])
    k10 = tenth_of(d)
    ks = sorted(set(ks) | {k10}) if ks is not None else default_ks(d)
    tables = []
    summary = {"n_features": d, "participation_ratio": participation_ratio(s), "n90": mass_fraction_count(s, 0.9),
               "top10_share": top_share(s, k10), "weight_norm": float(w.norm())}
    for split in splits:
        phi, y = run_data.features(split)
        t = ablation_curve(w, b, phi, y, s, mean, ks, n_random=n_random, seed=seed)
        t["split"] = split
        tables.append(t)
        full = masked_accuracy(w, b, phi, y, torch.arange(d), mean)
        at = t[t.k == k10].groupby("order").acc.mean()
        summary.update({f"{split}_acc": full, f"{split}_retained_top10": _share(at["top"], full),
                        f"{split}_retained_random10": _share(at["random"], full) if "random" in at else float("nan"),
                        f"{split}_retained_without_top10": _share(at["without_top"], full)})
    return summary, pd.concat(tables, ignore_index=True), np.sort(s.numpy())[::-1]


# --------------------------------------------------------------------------- the notebook's tables, figures
def run_keys(cfg, domains: Sequence[str]) -> dict:
    """What tells a run apart in the study's tables: its cell (backbone, depth as
    `effect_map.depth_key`, resolution, train_fraction), rate, held-out domain and seed."""
    return {"backbone": cfg.backbone, "depth": depth_key(cfg.train_stages), "resolution": int(cfg.resolution),
            "train_fraction": float(cfg.train_fraction), "dropout": float(cfg.dropout), "test_env": cfg.test_envs[0],
            "test_domain": domains[cfg.test_envs[0]], "seed": int(cfg.seed)}


def usage_tables(configs: Sequence, run_dirs: Sequence, domains: Sequence[str], n_random: int = 5,
                 device: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """For every run (its best.pt, the checkpoint i.i.d. validation chose): its `head_usage` summary
    (one row), its ablation table, and its sorted normalised importances (rank, importance), each
    tagged with `run_keys` and the run folder."""

    usage, ablations, spectra = [], [], []
    for cfg, run in zip(configs, run_dirs):
        rd = load_run_data(run, device=device)
        s_summary, table, s_sorted = head_usage(rd, n_random=n_random)
        keys = {**run_keys(cfg, domains), "run": shown(run)}
        usage.append({**keys, **s_summary})
        ablations.append(table.assign(**keys))
        spectra.append(pd.DataFrame({"rank": np.arange(1, len(s_sorted) + 1),
                                     "importance": s_sorted / s_sorted.sum(), **keys}))
    return pd.DataFrame(usage), pd.concat(ablations, ignore_index=True), pd.concat(spectra, ignore_index=True)


CELL = ("backbone", "depth", *DESIGN_AXES)  # a cell of the map, as `run_keys` writes it


def cell_name(row, cells: Sequence[str] = CELL) -> str:
    """ "efficientnet_lite0, conv_head" (with the resolution and data size where `cells` has them)."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    depth = int(get("depth"))
    extra = [c for c in DESIGN_AXES if c in cells]
    return f"{line_name(row, extra)}, {depth_label(depth, get('backbone'))}"


def importance_ratios(spectra: pd.DataFrame, base: float = 0.0) -> pd.DataFrame:
    """Each rate's sorted importance share divided by rate `base`'s at the same rank, paired on
    (cell, test_env, seed): above 1 where the rate spreads more weight onto that rank. Sorted shares
    of all rates look alike on a log-log plot; their ratio shows where they differ."""
    pair = [c for c in (*CELL, "test_env", "seed", "rank") if c in spectra.columns]
    ref = spectra[spectra.dropout == base].set_index(pair).importance.rename("base")
    out = spectra[spectra.dropout != base].join(ref, on=pair)
    return out.assign(ratio=out.importance / out.base).dropna(subset=["ratio"])


def _cells(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    cols = [c for c in CELL if c in table.columns]
    return [(cell_name(g.iloc[0].to_dict(), [c for c in cols if table[c].nunique() > 1]), g)
            for _, g in table.groupby(cols, sort=True)]


def plot_importances(spectra: pd.DataFrame, usage: pd.DataFrame):
    """One panel per cell: sorted importance shares relative to the lowest rate (ratio per rank,
    log scale, one line per rate, mean over runs). Last panel: effective number of features per
    rate, one line per cell, mean ± standard error over runs."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    base = float(spectra.dropout.min())
    ratios = importance_ratios(spectra, base).assign(rate=lambda t: t.dropout.map("{:g}".format))
    palette = rate_palette(ratios.dropout)
    cells = _cells(ratios)
    fig, axes = plt.subplots(1, len(cells) + 1, figsize=(4.6 * (len(cells) + 1), 3.8), squeeze=False)
    for ax, (name, g) in zip(axes[0], cells):
        sns.lineplot(g, x="rank", y="ratio", hue="rate", palette=palette, errorbar=None, ax=ax)
        ax.axhline(1, color="grey", lw=1, ls=":", label=f"rate {base:g} (reference)")
        ax.set(xscale="log", yscale="log", title=name, xlabel="feature rank (by importance)",
               ylabel=f"share / share at rate {base:g}")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(title="dropout rate", fontsize=8)
    ax = axes[0][-1]
    for name, g in _cells(usage):
        m = g.groupby("dropout").participation_ratio.agg(["mean", "sem", "count"]).reset_index()
        ax.errorbar(m.dropout, m["mean"], yerr=m["sem"].fillna(0), marker="o", capsize=3, label=name)
    n = usage.groupby([c for c in (*CELL, "dropout") if c in usage.columns]).size()
    runs = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}-{n.max()}"
    ax.set(title=f"effective number of features\n(mean ± s.e., {runs} runs per point)", xlabel="dropout rate",
           ylabel="participation ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_ablations(ablations: pd.DataFrame):
    """Accuracy (%) with only the k most important (solid), k random (dashed) features kept, or the
    k most important removed (dotted), one colour per rate; one row per cell, i.i.d. and o.o.d.
    side by side."""
    import seaborn as sns

    cols = [c for c in CELL if c in ablations.columns]
    vary = [c for c in cols if ablations[c].nunique() > 1]
    curves = ablations.groupby([*cols, "split", "order", "dropout", "k"], as_index=False).acc.mean()
    curves = curves.assign(rate=curves.dropout.map("{:g}".format), acc_pct=100 * curves.acc,
                           cell=[cell_name(r, vary) for r in curves.to_dict("records")])
    g = sns.relplot(curves, x="k", y="acc_pct", hue="rate", style="order", col="split", row="cell", kind="line",
                    palette=rate_palette(ablations.dropout), height=3.4, aspect=1.25, markers=True,
                    dashes={"top": "", "random": (3, 2), "without_top": (1, 1)})
    g.set(xscale="log")
    g.set_titles("{row_name}: {col_name}")
    g.set_axis_labels("features kept or removed (k)", "accuracy (%)")
    g.legend.set_title("rate / features")
    return g
