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
`expected_dropout_loss` (Monte Carlo, with a first-order control variate) measures directly.

`fit_head` trains a head on fixed features with dropout or a penalty in its place; `fit_deep` does
the same one stage deeper (the features the dropout acts on trained too). The study over rates,
held-out domains, seeds and depths is `vldlib.analysis.dropout_l2_study`.

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


def logits_loss(z: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Mean loss of logits z [N, C]: "ce" (y integer labels) or "squared" (y targets [N, C] or labels,
    summed over outputs)."""
    if loss == "ce":
        return F.cross_entropy(z, y)
    if loss == "squared":
        return ((_targets(y, z.shape[1]).to(z.dtype) - z) ** 2).sum(1).mean()
    raise ValueError(f"loss must be 'ce' or 'squared', got {loss!r}")


def logits_loss_grad(z: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """d logits_loss / d z [N, C]: (softmax(z) - onehot(y)) / N for "ce", -2 (y - z) / N for "squared".

    >>> logits_loss_grad(torch.zeros(2, 2), torch.tensor([0, 1]))     # (0.5 - onehot) / 2
    tensor([[-0.2500,  0.2500],
            [ 0.2500, -0.2500]])
    """
    n = z.shape[0]
    if loss == "ce":
        return (torch.softmax(z, 1) - _targets(y, z.shape[1]).to(z.dtype)) / n
    if loss == "squared":
        return -2 * (_targets(y, z.shape[1]).to(z.dtype) - z) / n
    raise ValueError(f"loss must be 'ce' or 'squared', got {loss!r}")


def clean_loss(W: torch.Tensor, b: torch.Tensor | None, X: torch.Tensor, y: torch.Tensor, loss: str = "ce"
               ) -> torch.Tensor:
    """Mean loss without dropout: "ce" (y integer labels) or "squared" (y targets [N, C] or labels,
    summed over outputs)."""
    return logits_loss(X @ W.T + (0 if b is None else b), y, loss)


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
        # sum_j X_ij^2 W[:, j]^T (diag pi - pi pi^T) W[:, j]
        #   = sum_c pi_ic sum_j X_ij^2 W_cj^2 - sum_j X_ij^2 (sum_c pi_ic W_cj)^2
        X2 = X ** 2
        first = (pi * (X2 @ (W ** 2).T)).sum(1)  # [N]: one [N, C] product instead of an [N, D] one
        second = (X2 * (pi @ W) ** 2).sum(1)
        return 0.5 * r * (first - second).mean()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def dropout_inputs(X: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout of X: keep each entry with probability 1-p and divide by 1-p."""
    if p == 0:
        return X
    keep = torch.rand(X.shape, generator=generator, dtype=X.dtype, device=X.device) >= p
    return X * keep / (1 - p)


@torch.no_grad()
def expected_dropout_loss(W: torch.Tensor, b: torch.Tensor | None, X: torch.Tensor, y: torch.Tensor, p: float,
                          loss: str = "ce", n_samples: int = 200, seed: int = 0, control_variate: bool = True
                          ) -> float:
    """Monte-Carlo estimate of E_mask loss(W dropout(X) + b): what dropout training minimises.

    With `control_variate` (default) each mask's loss has its first-order term g . eps subtracted
    (eps = W (dropout(X) - X), the logit noise; g = `logits_loss_grad` at the clean logits). Inverted
    dropout makes E[eps] = 0 exactly, so the expectation is unchanged, while the noise that is
    linear in the masks, the bulk of the Monte-Carlo error at small p, is gone: for squared loss
    each term is then exactly ||eps||^2 / N."""
    _check_p(p)
    g = torch.Generator(device=X.device).manual_seed(seed)
    z = X @ W.T + (0 if b is None else b)
    grad = logits_loss_grad(z, y, loss) if control_variate else None
    vals = []
    for _ in range(n_samples):
        eps = (dropout_inputs(X, p, g) - X) @ W.T
        v = logits_loss(z + eps, y, loss)
        vals.append(float(v if grad is None else v - (grad * eps).sum()))
    return float(np.mean(vals))


def _init_head(num_classes: int, d: int, seed: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded starting head (drawn on the CPU, so every device starts from the same weights)."""
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(num_classes, d, generator=gen) * 0.01).to(device).requires_grad_()
    return W, torch.zeros(num_classes, device=device, requires_grad=True)


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
    W, b = _init_head(num_classes, X.shape[1], seed, X.device)
    opt = torch.optim.Adam([W, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mask_gen = torch.Generator(device=X.device).manual_seed(seed + 1)
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




def excess_vs_penalties(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor, p: float,
                        n_mc: int = 100, seed: int = 0) -> dict[str, float]:
    """At fixed weights and one rate: the Monte-Carlo excess loss of dropout (`mc_ce`, `mc_squared`)
    and every analytic penalty (`pen_<kind>`), with `ratio_<kind>` = penalty / excess of its loss
    (squared: the exact identity, so 1 up to Monte-Carlo error; quadratic and ridge: against the
    cross-entropy excess)."""
    row = {}
    for loss in ("ce", "squared"):
        row[f"mc_{loss}"] = (expected_dropout_loss(W, b, X, y, p, loss, n_samples=n_mc, seed=seed)
                             - float(clean_loss(W, b, X, y, loss)))
    for kind in KINDS:
        row[f"pen_{kind}"] = float(penalty(W, b, X, p, kind))
        row[f"ratio_{kind}"] = row[f"pen_{kind}"] / row["mc_squared" if kind == "squared" else "mc_ce"]
    return row


@dataclass
class DeepFit:
    """A network whose last trainable stage(s) and linear head were fitted together (`fit_deep`)."""

    net: torch.nn.Module  # the fitted copy (a FineTuneNet), eval mode; its own classifier unused
    W: torch.Tensor
    b: torch.Tensor
    mode: str
    p: float
    body_moved: float  # ||theta - theta_0|| / ||theta_0|| over the trained stages (not the head)

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """Pooled penultimate features of trunk outputs `x` through the fitted stages."""
        return torch.cat([self.net.tail_features(x[i:i + batch]) for i in range(0, len(x), batch)])


def fit_deep(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, p: float,
             mode: str = "dropout", steps: int = 30, lr: float = 0.001, seed: int = 0,
             init: HeadFit | None = None) -> DeepFit:
    """`fit_head` one stage deeper: the trainable stages of `net` (a `FineTuneNet`, e.g. train_stages=1:
    EfficientNet's conv_head) and a linear head on their pooled output, fitted together, full batch,
    on trunk outputs `x` (cached, frozen). Dropout p acts on the pooled features as in the model, or
    `penalty(kind=mode)` is computed on those same features, which the stages can now change too.

    `init`: the head to start from (e.g. the head-only fit of the same mode: linear probe, then
    fine-tune); default the seeded `fit_head` start. The copy of `net` trains; `net` is untouched.
    """
    import copy

    _check_p(p)
    if mode != "dropout" and mode not in KINDS:
        raise ValueError(f"mode must be 'dropout' or one of {KINDS}, got {mode!r}")
    net = copy.deepcopy(net).to(x.device).train()  # FineTuneNet.train keeps the trunk and BatchNorm in eval mode
    in_head = {id(q) for q in net.head().parameters()}
    body = [q for q in net.parameters() if q.requires_grad and id(q) not in in_head]
    if not body:
        raise ValueError("net has no trainable stage below its head (train_stages=0?): use fit_head")
    theta0 = torch.cat([q.detach().flatten() for q in body]).clone()
    if init is None:
        d = net.tail_features(x[:1]).shape[1]
        W, b = _init_head(num_classes, d, seed, x.device)
    else:
        W = init.W.detach().clone().to(x.device).requires_grad_()
        b = init.b.detach().clone().to(x.device).requires_grad_()
    opt = torch.optim.Adam([W, b, *body], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mask_gen = torch.Generator(device=x.device).manual_seed(seed + 2)  # not fit_head's mask stream
    for _ in range(steps):
        phi = net.tail_features(x)
        if mode == "dropout":
            obj = clean_loss(W, b, dropout_inputs(phi, p, mask_gen), y, "ce")
        else:
            obj = clean_loss(W, b, phi, y, "ce") + penalty(W, b, phi, p, mode)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        sched.step()
    theta = torch.cat([q.detach().flatten() for q in body])
    moved = float((theta - theta0).norm() / theta0.norm().clamp_min(1e-12))
    for q in net.parameters():
        q.requires_grad_(False)
    return DeepFit(net.eval(), W.detach(), b.detach(), mode, float(p), moved)
