"""Dropout on a linear head's inputs as an L2-type penalty, and where the equivalence breaks.

For a linear model `z = W x~ + b` with inverted dropout `x~_j = m_j x_j / (1 - p)`,
`m_j ~ Bernoulli(1 - p)`, the noise has mean 0 and variance `p / (1 - p) * x_j^2`. So:

- squared loss: E ||y - z||^2 = ||y - W x - b||^2 + p/(1-p) * sum_j ||W[:, j]||^2 x_j^2, exactly:
  dropout is ridge regression whose coefficient on feature j is scaled by its second moment;
- cross-entropy: a second-order expansion of the log-partition around the clean logits (Wager,
  Wang & Liang 2013, "Dropout training as adaptive regularization") gives
  E CE(W x~) ~ CE(W x) + 1/2 * p/(1-p) * sum_j x_j^2 * W[:, j]^T (diag(pi) - pi pi^T) W[:, j],
  pi = softmax(W x + b). The penalty is "adaptive": weaker on confidently classified examples.
  With pi uniform over C classes and columns of W summing to 0 it becomes the plain ridge
  1/2 * p/(1-p) / C * sum_j ||W[:, j]||^2 x_j^2 (`penalty(..., kind="ridge")`).

The approximation holds when the dropout noise moves the logits little (small p, small weights);
at p = 0.9 the noise variance is 9 x_j^2 and the higher-order terms matter, which
`expected_dropout_loss` (Monte Carlo) measures directly.

>>> pen = penalty(W, b, X, p=0.5, kind="quadratic")                  # doctest: +SKIP
>>> mc = expected_dropout_loss(W, b, X, y, p=0.5) - clean_loss(W, b, X, y)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

KINDS = ("squared", "quadratic", "ridge")


def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p must be in [0, 1), got {p}; p/(1-p) is infinite at 1")
    return p


def _targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return y if y.dim() == 2 else F.one_hot(y, num_classes).to(torch.get_default_dtype())


def clean_loss(W: torch.Tensor, b: torch.Tensor | None, X: torch.Tensor, y: torch.Tensor, loss: str = "ce"
               ) -> torch.Tensor:
    """Mean loss without dropout: "ce" (y integer labels) or "squared" (y targets [N, C] or labels,
    summed over outputs)."""
    z = X @ W.T + (0 if b is None else b)
    if loss == "ce":
        return F.cross_entropy(z, y)
    if loss == "squared":
        return ((_targets(y, W.shape[0]).to(z.dtype) - z) ** 2).sum(1).mean()
    raise ValueError(f"loss must be 'ce' or 'squared', got {loss!r}")


def penalty(W: torch.Tensor, b: torch.Tensor | None, X: torch.Tensor, p: float, kind: str = "quadratic"
            ) -> torch.Tensor:
    """The analytic stand-in for dropout p on the inputs X [N, D] of the head (W [C, D], b [C]).

    - "squared": p/(1-p) * mean_i sum_j ||W[:, j]||^2 X_ij^2 (exact for squared loss);
    - "quadratic": Wager et al.'s second-order cross-entropy penalty (adaptive; differentiable in
      W and b through pi);
    - "ridge": the quadratic penalty at uniform predictions, 1/(2C) * the squared-loss one.

    >>> W = torch.tensor([[1., 2.]]); X = torch.tensor([[1., 1.], [1., 0.]])
    >>> float(penalty(W, None, X, 0.5, "squared"))   # (1*1+4*1 + 1*1+0)/2 * 1
    3.0
    """
    r = _check_p(p) / (1 - p)
    if kind == "squared":
        return r * ((X ** 2) @ (W ** 2).sum(0)).mean()
    if kind == "ridge":
        return 0.5 * r / W.shape[0] * ((X ** 2) @ (W ** 2).sum(0)).mean()
    if kind == "quadratic":
        pi = torch.softmax(X @ W.T + (0 if b is None else b), dim=1)  # [N, C]
        # W[:, j]^T (diag pi - pi pi^T) W[:, j] = sum_c pi_c W_cj^2 - (sum_c pi_c W_cj)^2, per (i, j)
        quad = pi @ (W ** 2) - (pi @ W) ** 2  # [N, D]
        return 0.5 * r * (quad * X ** 2).sum(1).mean()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def dropout_inputs(X: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout of X: keep each entry with probability 1-p and divide by 1-p."""
    if p == 0:
        return X
    keep = torch.rand(X.shape, generator=generator, dtype=X.dtype, device=X.device) >= p
    return X * keep / (1 - p)


@torch.no_grad()
def expected_dropout_loss(W: torch.Tensor, b: torch.Tensor | None, X: torch.Tensor, y: torch.Tensor, p: float,
                          loss: str = "ce", n_samples: int = 200, seed: int = 0) -> float:
    """Monte-Carlo estimate of E_mask loss(W dropout(X) + b): what dropout training minimises."""
    _check_p(p)
    g = torch.Generator().manual_seed(seed)
    vals = [float(clean_loss(W, b, dropout_inputs(X, p, g), y, loss)) for _ in range(n_samples)]
    return float(np.mean(vals))


@dataclass
class HeadFit:
    """A fitted linear head and how it was trained."""

    W: torch.Tensor
    b: torch.Tensor
    mode: str  # "dropout" or a penalty kind
    p: float
    final_loss: float


def fit_head(X: torch.Tensor, y: torch.Tensor, num_classes: int, p: float, mode: str = "dropout",
             steps: int = 1000, lr: float = 0.01, weight_decay: float = 0.0, seed: int = 0) -> HeadFit:
    """Full-batch Adam (cosine-decayed lr) on the cross-entropy of a linear head over fixed features,
    either with dropout p on its inputs (fresh masks each step) or with `penalty(kind=mode)`.

    Both modes start from the same seeded initialisation and see the same data, so any difference
    between the heads is the difference between dropout and its analytic approximation.
    """
    _check_p(p)
    if mode != "dropout" and mode not in KINDS:
        raise ValueError(f"mode must be 'dropout' or one of {KINDS}, got {mode!r}")
    gen = torch.Generator().manual_seed(seed)
    d = X.shape[1]
    W = (torch.randn(num_classes, d, generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        if mode == "dropout":
            obj = clean_loss(W, b, dropout_inputs(X, p, mask_gen), y, "ce")
        else:
            obj = clean_loss(W, b, X, y, "ce") + penalty(W, b, X, p, mode)
        if weight_decay:
            obj = obj + 0.5 * weight_decay * (W ** 2).sum()
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        sched.step()
    return HeadFit(W.detach(), b.detach(), mode, p, float(obj.detach()))


def _acc(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    return float(((X @ W.T + b).argmax(1) == y).float().mean())


def compare_dropout_penalty(train: tuple[torch.Tensor, torch.Tensor], evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
                            rates: Iterable[float], kinds: Iterable[str] = ("quadratic", "ridge"),
                            steps: int = 1000, lr: float = 0.01, n_mc: int = 100, seed: int = 0) -> pd.DataFrame:
    """For each rate: fit a head with dropout and one per analytic penalty; compare them.

    One row per (p, mode): accuracy on each eval split (`acc_<name>`), and, against the dropout
    head, the relative weight difference ||W - W_drop|| / ||W_drop|| and the prediction agreement
    on each split. Also, at the dropout head's weights, the Monte-Carlo excess loss of dropout
    (`mc_excess` = E CE(dropped) - CE(clean)) and the analytic penalty (`penalty`) of each kind.
    """
    X, y = train
    C = int(y.max()) + 1
    for _, (_, ye) in evals.items():
        C = max(C, int(ye.max()) + 1)
    rows = []
    for p in rates:
        fits = {"dropout": fit_head(X, y, C, p, "dropout", steps, lr, seed=seed)}
        for k in kinds:
            fits[k] = fit_head(X, y, C, p, k, steps, lr, seed=seed)
        Wd, bd = fits["dropout"].W, fits["dropout"].b
        mc = expected_dropout_loss(Wd, bd, X, y, p, "ce", n_samples=n_mc, seed=seed) - float(clean_loss(Wd, bd, X, y))
        for mode, fit in fits.items():
            row = {"p": float(p), "mode": mode, "weight_norm": float(fit.W.norm()),
                   "rel_weight_diff": float((fit.W - Wd).norm() / Wd.norm()),
                   "mc_excess": mc if mode == "dropout" else np.nan,
                   "penalty": float(penalty(Wd, bd, X, p, mode)) if mode != "dropout" else np.nan}
            for name, (Xe, ye) in {"train": train, **evals}.items():
                row[f"acc_{name}"] = _acc(fit.W, fit.b, Xe, ye)
                row[f"agree_{name}"] = float(((Xe @ fit.W.T + fit.b).argmax(1) == (Xe @ Wd.T + bd).argmax(1)).float().mean())
            rows.append(row)
    return pd.DataFrame(rows)


def penalty_vs_mc(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor, rates: Iterable[float],
                  n_mc: int = 200, seed: int = 0) -> pd.DataFrame:
    """At fixed weights: the Monte-Carlo excess loss of dropout against each analytic penalty, per p.

    Rows: p, loss ("ce" or "squared"), mc_excess, penalty (quadratic for ce, exact for squared).
    For squared loss the two columns agree up to Monte-Carlo error at every p; for cross-entropy
    they agree at small p and drift apart as p grows.
    """
    rows = []
    for p in rates:
        for loss, kind in (("ce", "quadratic"), ("squared", "squared")):
            mc = expected_dropout_loss(W, b, X, y, p, loss, n_samples=n_mc, seed=seed) - float(clean_loss(W, b, X, y, loss))
            rows.append({"p": float(p), "loss": loss, "mc_excess": mc, "penalty": float(penalty(W, b, X, p, kind))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the notebook's figures and conclusion
def plot_penalty_vs_mc(fixed: pd.DataFrame):
    """Monte Carlo excess loss of dropout at fixed weights vs the analytic penalty, per loss, log scale."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (loss, g) in enumerate(fixed.groupby("loss")):
        ax.plot(g.p, g.mc_excess, "o-", color=f"C{i}", label=f"{loss}: Monte Carlo excess loss")
        ax.plot(g.p, g.penalty, "s--", color=f"C{i}", label=f"{loss}: analytic penalty")
    ax.set(yscale="log", xlabel="dropout rate p", ylabel="excess loss", title="dropout's excess loss at fixed weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_dropout_vs_penalty(table: pd.DataFrame):
    """Per rate: agreement of each penalty head with the dropout head (o.o.d.), their relative
    weight difference, and every head's accuracy (%)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    pen = table[table["mode"] != "dropout"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    sns.lineplot(pen, x="p", y="agree_ood", hue="mode", marker="o", ax=axes[0])
    axes[0].set(title="agreement with the dropout head (o.o.d.)", ylabel="same prediction (fraction)",
                xlabel="dropout rate p")
    sns.lineplot(pen, x="p", y="rel_weight_diff", hue="mode", marker="o", ax=axes[1])
    axes[1].set(title="||W - W_dropout|| / ||W_dropout||", ylabel="relative difference", xlabel="dropout rate p")
    acc = table.melt(id_vars=["p", "mode"], value_vars=["acc_iid", "acc_ood"], var_name="split", value_name="accuracy")
    acc = acc.assign(accuracy=100 * acc.accuracy, split=acc.split.map({"acc_iid": "i.i.d.", "acc_ood": "o.o.d."}))
    sns.lineplot(acc, x="p", y="accuracy", hue="mode", style="split", marker="o", ax=axes[2])
    axes[2].set(title="accuracy", ylabel="accuracy (%)", xlabel="dropout rate p")
    sns.move_legend(axes[2], "upper left", bbox_to_anchor=(1, 1), fontsize=7)
    fig.tight_layout()
    return fig


def conclusion_lines(fixed: pd.DataFrame, table: pd.DataFrame, kinds, n_mc: int) -> list[str]:
    """The summary, computed from the fixed-weight comparison and the trained heads."""
    lo, hi = fixed.p.min(), fixed.p.max()
    ce = fixed[fixed.loss == "ce"].set_index("p")
    sq = fixed[fixed.loss == "squared"].set_index("p")
    lines = [(f"- Squared loss, fixed weights: analytic / Monte-Carlo excess loss between {sq.ratio.min():.2f} and "
              f"{sq.ratio.max():.2f} over p in [{lo:g}, {hi:g}] (1 = exact; the gap is Monte-Carlo error with {n_mc} "
              f"masks)."),
             (f"- Cross-entropy, fixed weights: the quadratic penalty is {ce.ratio[lo]:.2f} x the true excess loss at "
              f"p={lo:g} and {ce.ratio[hi]:.2f} x at p={hi:g}.")]
    drop = table[table["mode"] == "dropout"].set_index("p")
    for k in kinds:
        t = table[table["mode"] == k].set_index("p")
        lines.append(f"- Trained with the {k} penalty instead of dropout: o.o.d. agreement {100 * t.agree_ood[lo]:.1f}% "
                     f"at p={lo:g} and {100 * t.agree_ood[hi]:.1f}% at p={hi:g}; relative weight difference "
                     f"{t.rel_weight_diff[lo]:.2f} -> {t.rel_weight_diff[hi]:.2f}; o.o.d. accuracy "
                     f"{100 * t.acc_ood[hi]:.1f}% vs dropout's {100 * drop.acc_ood[hi]:.1f}% at p={hi:g}.")
    return lines
