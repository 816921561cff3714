"""How many penultimate features does a classifier rely on?

The paper's explanation of very large dropout: a head trained with 90% dropout cannot lean on the
few features that minimise training error, since each is missing 90% of the time, so it spreads
its weight over many redundant ones ("rich representations"). This module measures that spread
for a linear head `logits = W phi + b` on features `phi`:

- importance of feature j = ||W[:, j]|| * std(phi_j): how much the logits move when feature j
  moves by its typical amount (the norm alone would favour features of small scale);
- participation ratio of the importances, (sum s_j^2)^2 / sum s_j^4: 1 when one feature carries
  everything, D when all D features matter equally, "the effective number of features";
- ablation curves: accuracy when only the top-k (or k random) features are kept and every other
  feature is set to its training mean (so the bias stays calibrated: a removed feature contributes
  its average, not zero).

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
from vldlib.evaluate.effects import effect_sentence, paired_effect
from vldlib.evaluate.plots import rate_palette  # THE rate -> colour map, shared by every figure


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
    """Accuracy keeping the top-k features (by importance) and k random features, for each k.

    Returns a tidy table: k, order ("top" or "random"), draw (0 for top), acc. Random subsets are
    drawn `n_random` times per k with a fixed seed, so curves of different heads use the same draws.
    """
    d = phi.shape[1]
    order = torch.argsort(torch.as_tensor(importance), descending=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in ks:
        k = int(min(max(k, 1), d))
        rows.append({"k": k, "order": "top", "draw": 0,
                     "acc": masked_accuracy(weight, bias, phi, y, order[:k], mean)})
        for r in range(n_random):
            idx = rng.choice(d, size=k, replace=False)
            rows.append({"k": k, "order": "random", "draw": r, "acc": masked_accuracy(weight, bias, phi, y, idx, mean)})
    return pd.DataFrame(rows)


def default_ks(d: int, n: int = 12) -> list[int]:
    """Log-spaced subset sizes from 1 to d (d included)."""
    return sorted({int(round(v)) for v in np.geomspace(1, d, n)} | {d})


def head_usage(run_data, ks: Iterable[int] | None = None, n_random: int = 5, splits: Sequence[str] = ("iid", "ood"),
               seed: int = 0) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Feature usage of one run's classifier (a `vldlib.analysis.runs.RunData`).

    Returns (summary dict, ablation table with a `split` column, sorted importances).
    Feature statistics (std, mean) come from the training split, the data the head was fitted on.
    """
    phi_tr, _ = run_data.features("train")
    head = run_data.net.head()
    w, b = head.weight.detach(), head.bias.detach() if head.bias is not None else None
    s = feature_importance(w, phi_tr.std(0))
    mean = phi_tr.mean(0)
    ks = list(ks) if ks is not None else default_ks(phi_tr.shape[1])
    tables = []
    summary = {"n_features": int(phi_tr.shape[1]), "participation_ratio": participation_ratio(s),
               "n90": mass_fraction_count(s, 0.9), "weight_norm": float(w.norm())}
    for split in splits:
        phi, y = run_data.features(split)
        t = ablation_curve(w, b, phi, y, s, mean, ks, n_random=n_random, seed=seed)
        t["split"] = split
        tables.append(t)
        summary[f"{split}_acc"] = masked_accuracy(w, b, phi, y, torch.arange(phi.shape[1]), mean)
    return summary, pd.concat(tables, ignore_index=True), np.sort(s.numpy())[::-1]


# --------------------------------------------------------------------------- the notebook's tables, figures, text
def usage_tables(configs: Sequence, run_dirs: Sequence, domains: Sequence[str], n_random: int = 5,
                 device: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """For every run: its `head_usage` summary (one row), its ablation table, and its sorted
    normalised importances (rank, importance), each tagged with dropout, test_env, test_domain, seed."""

    usage, ablations, spectra = [], [], []
    for cfg, run in zip(configs, run_dirs):
        rd = load_run_data(run, device=device)
        s_summary, table, s_sorted = head_usage(rd, n_random=n_random)
        keys = {"dropout": cfg.dropout, "test_env": cfg.test_envs[0], "test_domain": domains[cfg.test_envs[0]],
                "seed": cfg.seed}
        usage.append({**keys, **s_summary})
        ablations.append(table.assign(**keys))
        spectra.append(pd.DataFrame({"rank": np.arange(1, len(s_sorted) + 1),
                                     "importance": s_sorted / s_sorted.sum(), **keys}))
    return pd.DataFrame(usage), pd.concat(ablations, ignore_index=True), pd.concat(spectra, ignore_index=True)


def importance_ratios(spectra: pd.DataFrame, base: float = 0.0) -> pd.DataFrame:
    """Each rate's sorted importance share divided by rate `base`'s at the same rank, paired on
    (test_env, seed): above 1 where the rate spreads more weight onto that rank. Sorted shares of
    all rates look alike on a log-log plot; their ratio shows where they differ."""
    ref = spectra[spectra.dropout == base].set_index(["test_env", "seed", "rank"]).importance.rename("base")
    out = spectra[spectra.dropout != base].join(ref, on=["test_env", "seed", "rank"])
    return out.assign(ratio=out.importance / out.base).dropna(subset=["ratio"])


def plot_importances(spectra: pd.DataFrame, usage: pd.DataFrame):
    """Left: sorted importance shares relative to rate 0 (ratio per rank, log scale, one line per
    rate, mean over runs). Right: effective number of features per rate, mean ± standard error."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = rate_palette(spectra.dropout)
    base = float(spectra.dropout.min())
    ratios = importance_ratios(spectra, base).assign(rate=lambda t: t.dropout.map("{:g}".format))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(ratios, x="rank", y="ratio", hue="rate", palette={k: v for k, v in palette.items()
                                                                    if k in set(ratios.rate)},
                 errorbar=None, ax=axes[0])
    axes[0].axhline(1, color="grey", lw=1, ls=":", label=f"rate {base:g} (reference)")
    axes[0].set(xscale="log", yscale="log", title=f"importance share relative to dropout rate {base:g}",
                xlabel="feature rank (by importance)", ylabel=f"share / share at rate {base:g}")
    axes[0].legend(title="dropout rate", fontsize=8)
    sns.pointplot(usage, x="dropout", y="participation_ratio", errorbar="se", ax=axes[1], color="C0", capsize=0.1)
    n = usage.groupby("dropout").size()
    runs = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}-{n.max()}"
    axes[1].set(title=f"effective number of features (mean ± s.e., {runs} runs per rate)",
                xlabel="dropout rate", ylabel="participation ratio")
    fig.tight_layout()
    return fig


def plot_ablations(ablations: pd.DataFrame):
    """Accuracy (%) with only the k most important (solid) or k random (dashed) features kept, one
    colour per rate, i.i.d. and o.o.d. side by side."""
    import seaborn as sns

    curves = ablations.groupby(["split", "order", "dropout", "k"], as_index=False).acc.mean()
    curves = curves.assign(rate=curves.dropout.map("{:g}".format), acc_pct=100 * curves.acc)
    g = sns.relplot(curves, x="k", y="acc_pct", hue="rate", style="order", col="split", kind="line",
                    palette=rate_palette(ablations.dropout), height=3.6, aspect=1.2, markers=True,
                    dashes={"top": "", "random": (3, 2)})
    g.set(xscale="log")
    g.set_axis_labels("features kept (k)", "accuracy (%)")
    g.legend.set_title("dropout rate / kept")
    return g


def conclusion(usage: pd.DataFrame, ablations: pd.DataFrame, rates: Sequence[float]) -> tuple[pd.DataFrame, list[str]]:
    """Adds each run's o.o.d. accuracy with a random tenth of the features kept (as a share of its
    full o.o.d. accuracy), then one sentence per (metric, rate) for every rate against the lowest:
    paired difference with its 95% t interval, p and n (from `evaluate.effects.paired_effect`)."""

    d = int(usage.n_features.iloc[0])
    k10 = min(ablations.k.unique(), key=lambda k: abs(k - d / 10))
    rand = (ablations[(ablations.order == "random") & (ablations.split == "ood") & (ablations.k == k10)]
            .groupby(["dropout", "test_env", "seed"]).acc.mean().rename("acc_random10").reset_index())
    usage = usage.drop(columns=["acc_random10", "retained_random10"], errors="ignore").merge(
        rand, on=["dropout", "test_env", "seed"])
    usage["retained_random10"] = usage.acc_random10 / usage.ood_acc
    a = min(rates)
    lines = []
    for metric, what, pct in [("participation_ratio", "effective number of features", False),
                              ("n90", "features holding 90% of the importance", False),
                              ("retained_random10", f"share of o.o.d. accuracy kept with {k10} random features", False),
                              ("ood_acc", "o.o.d. accuracy", True), ("iid_acc", "i.i.d. accuracy", True)]:
        for b in sorted(r for r in rates if r != a):
            eff = paired_effect(usage.assign(method="model"), a=a, b=b, metric=metric)
            lines.append("- " + effect_sentence(eff, what, percent=pct))
    return usage, lines
