"""Helpers for the teaching notebook: exercise checkers, a tiny CNN, a small training loop, a figure.

The checkers hold the answers, so a student's notebook cell can be a plain `assert`-style call
without printing the solution next to the question:

>>> def my_dropout(x, p, training=True):                      # doctest: +SKIP
...     ...
>>> check_inverted_dropout(my_dropout)                         # doctest: +SKIP
correct: same mask and scaling as nn.Dropout for p in (0.1, 0.5, 0.9), identity in eval mode.

`train_curve` is the smallest possible training loop (full control, no run directory), used to
ask whether 90% dropout stalls training from scratch more than the training of a head on
pretrained features; `scratch_vs_pretrained_study` runs it for every held-out domain and seed and
`dropout_cost` answers from the paired differences (95% Student's t intervals), whichever way
they point.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from vldlib.data import load_benchmark
from vldlib.experiments.grid import with_paths
from vldlib.loop.batches import make_data
from vldlib.analysis.runs import majority_rate, untrained_run_data
from vldlib.config import TrainConfig
from vldlib.evaluate.scores import ood_split


# --------------------------------------------------------------------------- exercise checkers
def check_inverted_dropout(fn: Callable[..., torch.Tensor]) -> None:
    """Check `fn(x, p, training=True)` against `nn.Dropout(p)`: the same mask under the same seed,
    the same 1/(1-p) scaling, identity when `training=False` and when p = 0.

    Hint when it fails: draw the mask with `torch.empty_like(x).bernoulli_(1 - p)` (that is what
    `nn.Dropout` does on a CPU, so the same seed gives the same mask), multiply, divide by 1 - p.
    """
    x = torch.randn(4, 1000)
    out = fn(x, 0.5, training=False)
    assert torch.equal(torch.as_tensor(out), x), "in eval mode (training=False) dropout must return x unchanged"
    torch.manual_seed(0)
    out = fn(x, 0.0, training=True)
    assert torch.allclose(torch.as_tensor(out), x), "with p = 0 nothing is dropped: the output must equal x"
    for p in (0.1, 0.5, 0.9):
        torch.manual_seed(123)
        mine = torch.as_tensor(fn(x, p, training=True))
        assert mine.shape == x.shape, f"output shape {tuple(mine.shape)} differs from the input's {tuple(x.shape)}"
        zeros = float((mine == 0).float().mean())
        assert abs(zeros - p) < 0.03, (f"p={p}: {zeros:.2f} of the entries are zero; about p of them should be "
                                       f"(is p the rate of *dropping*, not keeping?)")
        kept = mine[mine != 0] / x[mine != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4), (
            f"p={p}: kept entries are multiplied by {float(kept.mean()):.3f}; inverted dropout scales them by "
            f"1/(1-p) = {1 / (1 - p):.3f} so that the expected value is unchanged")
        torch.manual_seed(123)
        ref = nn.Dropout(p).train()(x)
        assert torch.allclose(mine, ref), (f"p={p}: a valid dropout, but not the same mask as nn.Dropout under the "
                                           f"same seed; draw it with torch.empty_like(x).bernoulli_(1 - p)")
    print("correct: same mask and scaling as nn.Dropout for p in (0.1, 0.5, 0.9), identity in eval mode.")


# Checkers print their verdict and return None: a returned True/False would be echoed under the
# exercise cell as a stray output.
def _not_answered(what: str) -> None:
    print(f"not answered yet ({what}): replace None by your answer and run the cell again.")


def _check_number(answer: float | None, expected: float, what: str, hint: str, rtol: float = 1e-3) -> None:
    if answer is None:
        return _not_answered(what)
    assert abs(float(answer) - expected) <= rtol * max(1.0, abs(expected)), f"{what}: {answer} is not right. Hint: {hint}"
    print(f"correct: {what} = {answer:g} (exactly {expected:g})")


def check_kept_features(answer: float, n_features: int = 1280, p: float = 0.9) -> None:
    """Expected number of the `n_features` penultimate features that survive dropout p."""
    return _check_number(answer, n_features * (1 - p), f"features kept on average ({n_features} features, p={p})",
                         "each feature is kept independently with probability 1 - p")


def check_dropout_variance(answer: float, x: float = 1.0, p: float = 0.9) -> None:
    """Variance of inverted dropout applied to a constant feature x (the noise dropout injects).

    Accepts 1% either way, so the Monte Carlo estimate the notebook prints from a million draws
    (standard error about 0.3% at p = 0.9) counts as right."""
    return _check_number(answer, p / (1 - p) * x ** 2, f"variance of dropout(x={x:g}, p={p})",
                         "the output is x/(1-p) with probability 1-p and 0 otherwise; Var = E[out^2] - x^2", rtol=0.01)


def lodo_splits(domains: Sequence[str]) -> list[tuple[list[str], str]]:
    """The leave-one-domain-out experiments: (training domains, held-out domain), one per domain."""
    return [([d for d in domains if d != t], t) for t in domains]


def check_lodo_splits(fn: Callable[[Sequence[str]], list]) -> None:
    """Check `fn(domains) -> [(training_domains, test_domain), ...]` on a 4-domain benchmark."""
    domains = ["art", "cartoon", "photo", "sketch"]
    got = fn(domains)
    want = lodo_splits(domains)
    if got is None:
        return _not_answered("leave-one-domain-out splits; return the list of (training domains, test domain) pairs")
    assert len(got) == len(want), f"{len(got)} experiments; leave-one-domain-out on 4 domains makes {len(want)}"
    norm = sorted((sorted(tr), te) for tr, te in got)
    assert norm == sorted((sorted(tr), te) for tr, te in want), (
        "each experiment trains on every domain but one and tests on that one")
    print(f"correct: {len(want)} experiments, each domain held out once.")


TIE_RULE = "on a tie, the earliest of the tied steps is selected"


def selection_exercise(seed: int = 0) -> pd.DataFrame:
    """A made-up training trajectory: step, i.i.d. validation accuracy, o.o.d. test accuracy. The
    best i.i.d. accuracy may be tied (values are rounded); `TIE_RULE` settles it, as in
    `vldlib.evaluate.selection.select`."""
    rng = np.random.default_rng(seed)
    steps = np.arange(300, 3301, 300)
    iid = np.round(0.80 + 0.1 * (1 - np.exp(-steps / 900)) + rng.normal(0, 0.01, len(steps)), 3)
    ood = np.round(0.60 + 0.05 * np.sin(steps / 700) + rng.normal(0, 0.02, len(steps)), 3)
    return pd.DataFrame({"step": steps, "iid_val_acc": iid, "ood_test_acc": ood})


def check_selected_step(answer: int, seed: int = 0) -> None:
    """The checkpoint that training-domain validation picks in `selection_exercise(seed)`."""
    t = selection_exercise(seed)
    want = int(t.step[t.iid_val_acc.idxmax()])
    if answer is None:
        return _not_answered("selected step")
    if int(answer) == int(t.step[t.ood_test_acc.idxmax()]) and int(answer) != want:
        raise AssertionError("that is the step with the best *test* accuracy: choosing it peeks at the held-out "
                             "domain (oracle selection). Training-domain validation may only look at iid_val_acc.")
    assert int(answer) == want, f"pick the step with the highest i.i.d. validation accuracy ({TIE_RULE})"
    print(f"correct: step {want}; its o.o.d. accuracy {float(t.ood_test_acc[t.step == want].iloc[0]):.3f} is what "
          f"we report, even if another step happened to test better.")


# --------------------------------------------------------------------------- data as tensors
def split_tensors(cfg, splits: Sequence[str] = ("train", "iid", "ood")) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Normalised images of each split of a `TrainConfig`'s data (eval transform) as tensors, for
    loops that train on a small benchmark held in memory. Splits as in `vldlib.analysis.runs`."""

    cfg = with_paths(cfg)
    bench = load_benchmark(cfg.benchmark, cfg.data_dir, progress=False)
    data = make_data(dataclasses.replace(cfg, batch_size=1), bench, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    test = list(cfg.test_envs)
    keys = {"train": [f"env{e}_in" for e in data.train_envs], "iid": [f"env{e}_out" for e in data.train_envs],
            "ood": [f"env{e}_{ood_split(bench)}" for e in test]}
    out = {}
    for split in splits:
        items = [data.evals[k][i] for k in keys[split] for i in range(len(data.evals[k]))]
        out[split] = (torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))
    return out


# --------------------------------------------------------------------------- small models and loop
class TinyCNN(nn.Module):
    """Three conv blocks, global pooling, Dropout(p) on the pooled features, Linear: the paper's head
    on a network small enough to train from scratch on a CPU in seconds."""

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.0):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.body(x)))


class LinearHead(nn.Module):
    """Dropout(p) then Linear, on fixed (pretrained) features."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


@torch.no_grad()
def _eval(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(X[i:i + batch]) for i in range(0, len(y), batch)])
    model.train()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_curve(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                steps: int = 300, lr: float = 0.05, batch_size: int = 64, eval_every: int = 25, seed: int = 0,
                momentum: float = 0.9) -> pd.DataFrame:
    """SGD with momentum on minibatches; every `eval_every` steps the clean (eval-mode) training
    loss and accuracy and the validation accuracy. Returns a tidy table (step, train_loss,
    train_acc, val_acc)."""
    X, y = train
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rows = []
    model.train()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            tl, ta = _eval(model, X, y)
            rows.append({"step": step, "train_loss": tl, "train_acc": ta, "val_acc": _eval(model, *val)[1]})
        if step == steps:
            break
        idx = torch.randint(len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- protocol figure
def plot_lodo_protocol(domains: Sequence[str], holdout: float = 0.2, ood_split: str = "in"):
    """One row per leave-one-domain-out experiment, one bar per domain, split into its "in" and
    "out" parts and coloured by their role: training, i.i.d. validation (model selection), o.o.d.
    test (reported: the held-out domain's `ood_split` part, as the training loop scores it, i.e.
    "out" on benchmarks grouped by stem, whose "in" part shares its subjects with training), and
    the held-out domain's other part (unused; the oracle's selection set)."""
    if ood_split not in ("in", "out"):
        raise ValueError(f"ood_split must be 'in' or 'out', not {ood_split!r}")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868", "unused": "#CCCCCC"}
    n = len(domains)
    fig, ax = plt.subplots(figsize=(1.9 * n + 1.5, 0.7 * n + 1.2))
    for row, t in enumerate(domains):
        for j, d in enumerate(domains):
            x0 = j * 1.1
            roles = (("test", "unused") if ood_split == "in" else ("unused", "test")) if d == t else ("train", "val")
            ax.barh(row, 1 - holdout, left=x0, color=colors[roles[0]], edgecolor="white")
            ax.barh(row, holdout, left=x0 + 1 - holdout, color=colors[roles[1]], edgecolor="white")
    ax.set_yticks(range(n), [f"hold out {t}" for t in domains])
    ax.set_xticks([j * 1.1 + 0.5 for j in range(n)], list(domains))
    ax.invert_yaxis()
    ax.set_title(f"Leave-one-domain-out: each domain is split {100 * (1 - holdout):.0f}% 'in' / "
                 f"{100 * holdout:.0f}% 'out'", fontsize=10)
    ax.legend(handles=[Patch(color=colors["train"], label="train ('in' of training domains)"),
                       Patch(color=colors["val"], label="i.i.d. validation: selects the checkpoint"),
                       Patch(color=colors["test"], label=f"o.o.d. test ('{ood_split}' of the held-out domain): reported"),
                       Patch(color=colors["unused"], label="held-out domain's other part: not scored (oracle only)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- scratch vs pretrained
SCRATCH, PRETRAINED = "from scratch (tiny CNN)", "pretrained features (linear head)"


def scratch_vs_pretrained(images: dict, feats: dict, n_classes: int, rates: Sequence[float], steps: int, lr: float,
                          batch_size: int, eval_every: int, seed: int = 0, scratch_width: int = 16) -> pd.DataFrame:
    """Learning curves (step, train_loss, train_acc, val_acc, learner, p) of a tiny CNN trained from
    scratch on `images` and of a linear head on pretrained `feats`, each with Dropout(p) before its
    last layer, at every rate: same steps, learning rate, batches and seed."""
    curves = []
    for p in rates:
        for learner, data in ((SCRATCH, images), (PRETRAINED, feats)):
            torch.manual_seed(seed)
            model = (TinyCNN(n_classes, width=scratch_width, dropout=p) if learner == SCRATCH
                     else LinearHead(data["train"][0].shape[1], n_classes, dropout=p))
            c = train_curve(model, data["train"], data["iid"], steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                            eval_every=eval_every)
            curves.append(c.assign(learner=learner, p=p))
    return pd.concat(curves, ignore_index=True)


def plot_scratch_vs_pretrained(curves: pd.DataFrame):
    """Clean training loss (log scale) and i.i.d. validation accuracy (%) against step, one colour
    per learner, one line style per dropout rate; with several held-out domains and seeds, their
    mean and its 95% confidence band (seaborn's bootstrap over the curves)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    c = curves.assign(val_pct=100 * curves.val_acc, rate=curves.p.map(lambda p: f"dropout rate {p:g}"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(c, x="step", y="train_loss", hue="learner", style="rate", ax=axes[0])
    axes[0].set(yscale="log", title="clean training loss", ylabel="cross-entropy (dropout off)")
    sns.lineplot(c, x="step", y="val_pct", hue="learner", style="rate", ax=axes[1], legend=False)
    axes[1].set(title="i.i.d. validation accuracy", ylabel="accuracy (%)")
    floor = validation_floor(curves)
    if floor is not None:
        axes[1].axhline(100 * floor, color="black", ls=":", lw=1)
        axes[1].annotate(f"majority class {100 * floor:.1f}%", (0.99, 100 * floor), xycoords=("axes fraction", "data"),
                         ha="right", va="bottom", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def _last(curves: pd.DataFrame) -> pd.DataFrame:
    """Each curve's last evaluation; a table without `test_env`/`seed` columns is one run each."""
    c = curves.assign(**{k: curves[k] if k in curves else 0 for k in ("test_env", "seed")})
    return c[c.step == c.step.max()]


def dropout_cost(curves: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """What the highest rate costs each learner at the last step, relative to the lowest rate, and
    whether it costs training from scratch more than the pretrained head, computed, whichever way
    it points.

    Paired by seed, each seed first averaged over the held-out domains
    (`power.domain_averaged_effect`): per learner the validation points lost (mean, 95% Student's
    t interval, n seeds) and the clean training loss at both rates; then the contrast, per seed
    (points lost from scratch) - (points lost by the head), with its t interval. The verdict is
    `effects.is_detectable` of that contrast: an interval that contains 0 answers "not told apart"."""
    from vldlib.evaluate.effects import is_detectable
    from vldlib.evaluate.power import domain_averaged_effect

    last = _last(curves)
    lo, hi = curves.p.min(), curves.p.max()
    rows, lost = [], []
    for learner, g in last.groupby("learner", sort=False):
        eff = domain_averaged_effect(g.assign(method="model"), a=hi, b=lo, metric="val_acc", by="p")
        loss = g.groupby("p").train_loss.mean()
        rows.append({"learner": learner, f"val. acc. at p={lo:g} (%)": 100 * eff["b_mean"],
                     f"val. acc. at p={hi:g} (%)": 100 * eff["a_mean"], "val. points lost": 100 * eff["mean"],
                     "ci_low": 100 * eff["ci_low"], "ci_high": 100 * eff["ci_high"], "n": eff["n"],
                     f"clean loss at p={lo:g}": loss[lo], f"clean loss at p={hi:g}": loss[hi],
                     "clean loss added": loss[hi] - loss[lo]})
        side = g.pivot_table(index=["test_env", "seed"], columns="p", values="val_acc")
        lost.append((side[lo] - side[hi]).rename("lost").reset_index().assign(learner=learner))
    table = pd.DataFrame(rows).set_index("learner")
    floor = validation_floor(curves)
    if floor is not None:
        table["majority class (%)"] = 100 * floor
    if not {SCRATCH, PRETRAINED} <= set(table.index):
        return table, "both learners are needed to answer the question."
    both = pd.concat(lost, ignore_index=True).assign(method="model")
    eff = domain_averaged_effect(both, a=PRETRAINED, b=SCRATCH, metric="lost", by="learner")
    ci = lambda lo_, hi_: f"[95% CI {100 * lo_:+.1f}, {100 * hi_:+.1f}]"
    s, f = table.loc[SCRATCH], table.loc[PRETRAINED]
    design = f"n={eff['n']} seed{'s' * (eff['n'] != 1)}, each the mean over {eff['domains']} held-out domain" \
             f"{'s' * (eff['domains'] != 1)}"
    facts = (f"After {int(curves.step.max())} steps, dropout rate {hi:g} cost the from-scratch CNN "
             f"{s['val. points lost']:+.1f} validation points [95% CI {s.ci_low:+.1f}, {s.ci_high:+.1f}] and the "
             f"pretrained head {f['val. points lost']:+.1f} points [95% CI {f.ci_low:+.1f}, {f.ci_high:+.1f}] "
             f"(positive: worse than at rate {lo:g}); from scratch minus pretrained: {100 * eff['mean']:+.1f} points "
             f"{ci(eff['ci_low'], eff['ci_high'])} ({design}).")
    if floor is not None:
        facts += (f" Always answering the majority class scores {100 * floor:.1f}% on these validation images; at rate "
                  f"{lo:g} the CNN from scratch reaches {s[f'val. acc. at p={lo:g} (%)']:.1f}% and the head "
                  f"{f[f'val. acc. at p={lo:g} (%)']:.1f}%.")
    if eff["n"] < 2:
        verdict = "With one seed there is no interval: run more seeds before answering."
    elif not is_detectable(eff):
        verdict = ("The 95% t interval of the difference contains 0: this run does not show dropout stalling one "
                   "learner more than the other.")
    elif eff["mean"] > 0:
        verdict = ("The interval excludes 0: here very large dropout hurt training from scratch more than the "
                   "pretrained head, as the paper's argument predicts.")
    else:
        verdict = ("The interval excludes 0: here very large dropout hurt the pretrained head more than training "
                   "from scratch: the opposite of the paper's argument, at this budget and scale (a linear head on "
                   "frozen features, a tiny CNN, a few hundred steps).")
    return table, f"{facts} {verdict}"


def scratch_vs_pretrained_study(benchmark: str, data_dir: str, test_envs: Sequence[int], seeds: Sequence[int],
                                rates: Sequence[float], n_classes: int, scratch_resolution: int, resolution: int,
                                backbone: str, pretrained: bool, device: str = "auto", **train) -> pd.DataFrame:
    """`scratch_vs_pretrained` for every held-out domain in `test_envs` and every seed (the same
    seed for both learners and every rate, so the runs pair): one table of learning curves with
    `test_env` and `seed` columns. `train`: steps, lr, batch_size, eval_every, scratch_width."""
    curves = []
    for te in test_envs:
        images, feats = learner_data(benchmark, data_dir, te, scratch_resolution, resolution, backbone, pretrained,
                                     device=device)
        majority = majority_rate(images["iid"][1])
        for seed in seeds:
            c = scratch_vs_pretrained(images, feats, n_classes, rates, seed=seed, **train)
            curves.append(c.assign(test_env=te, seed=seed, val_majority=majority))
    return pd.concat(curves, ignore_index=True)


def validation_floor(curves: pd.DataFrame) -> float | None:
    """The majority-class rate of the validation images, averaged over the held-out domains like
    the accuracies it is the floor of; None for curves recorded without it."""
    if "val_majority" not in curves:
        return None
    c = curves.assign(test_env=curves["test_env"] if "test_env" in curves else 0)
    return float(c.groupby("test_env").val_majority.first().mean())


def learner_data(benchmark: str, data_dir: str, test_env: int, scratch_resolution: int, resolution: int,
                 backbone: str, pretrained: bool, device: str = "auto") -> tuple[dict, dict]:
    """The two learners' data, training and i.i.d. validation splits: images at
    `scratch_resolution` for the CNN trained from scratch, and the frozen penultimate features of
    the (pre)trained `backbone` at `resolution` for the linear head."""

    cfg = TrainConfig(benchmark=benchmark, data_dir=data_dir, test_envs=[test_env], resolution=scratch_resolution,
                      augment=False, backbone=backbone)
    images = split_tensors(cfg, splits=("train", "iid"))
    feat_cfg = TrainConfig(benchmark=benchmark, data_dir=data_dir, test_envs=[test_env], resolution=resolution,
                           backbone=backbone, pretrained=pretrained, train_stages=0, cache_trunk=True, augment=False,
                           device=device)
    rd = untrained_run_data(feat_cfg, device=device)
    return images, {s: rd.features(s) for s in ("train", "iid")}
