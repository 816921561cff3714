"""Did each run train long enough? Validation curves and a plateau check per configuration.

A rate comparison is only fair if every rate reached its plateau: with 90% dropout the head sees
a tenth of the features per step and fits more slowly (the quickstart's first trial compared
unconverged dropout runs and drew the wrong conclusion).
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from vldlib.evaluate.plots import NOTEBOOK_FONTS, min_span, rate_palette
from vldlib.evaluate.scores import per_step_scores


def validation_curves(df: pd.DataFrame, method: str = "model") -> pd.DataFrame:
    """One row per (run, step): the scores of `scores.per_step_scores` (i.i.d. validation accuracy,
    fit_acc: eval-mode accuracy on the training domains' "in" split, o.o.d. accuracy, train_acc:
    training-mode accuracy with dropout on), plus the run's config columns."""
    scores = per_step_scores(df[df["method"] == method])
    config_cols = [c for c in df.columns if c not in scores.columns and c not in
                   ("env", "domain", "split", "is_test", "acc", "step_lr", "step_time", "peak_mem_mb")]
    per_run = df.groupby("run")[config_cols].first().reset_index()
    return scores.merge(per_run, on="run", how="left")


def plateau_check(curves: pd.DataFrame, by: Sequence[str] = ("dropout",), tail: float = 0.25,
                  tolerance: float = 0.01) -> pd.DataFrame:
    """Per configuration: mean validation accuracy gained over the last `tail` of training.

    `plateaued` is True when the gain is below `tolerance` (1 point by default): training
    longer would not change the selected checkpoint much. `fit_gain` and `fit_plateaued` say the
    same of the eval-mode fit on the training domains' "in" split (`fit_acc`): a rate whose fit is
    still rising at the end has not converged, whatever its validation curve does.

    `lr_constant` says whether that reading means it: True when every run of the configuration
    kept one learning rate throughout (`lr_decay_at=[]`, `--lr-decay-at ''`), False when the rate
    changed (the default x0.1 at half the run: the tail then lies after the decay, where every
    curve flattens whether or not the model has converged, so `plateaued` there may be the
    decay's doing), NaN when the records do not say (`step_lr` absent). Judge a budget on a
    constant-lr run, or on a longer one (issue 23 section 4).
    """
    rows = []
    for key, g in curves.groupby(list(by)):
        last_step = g["step"].max()
        start = g[g["step"] <= last_step * (1 - tail)]["step"].max()
        if pd.isna(start):
            start = g["step"].min()
        at_start = g[g["step"] == start]["iid_acc"].mean()
        at_end = g[g["step"] == last_step]["iid_acc"].mean()
        best = g.groupby("run")["iid_acc"].max().mean()
        has_fit = "fit_acc" in g and g["fit_acc"].notna().any()
        fit_gain = (g[g["step"] == last_step]["fit_acc"].mean() - g[g["step"] == start]["fit_acc"].mean()
                    if has_fit else float("nan"))
        # a flat validation curve after the lr decay can hide a model that never fitted its data
        end = g[g["step"] == last_step]
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "from_step": int(start),
                     "to_step": int(last_step), "iid_at_from": at_start, "iid_at_end": at_end,
                     "gain": at_end - at_start, "best_iid": best,
                     "fit_acc_at_end": end["fit_acc"].mean() if "fit_acc" in g else float("nan"),
                     "training_mode_acc_at_end": end["train_acc"].mean() if "train_acc" in g else float("nan"),
                     "plateaued": bool(at_end - at_start < tolerance), "fit_gain": fit_gain,
                     "fit_plateaued": bool(fit_gain < tolerance) if has_fit else float("nan"),
                     "lr_constant": _lr_constant(g)})
    return pd.DataFrame(rows)


def _lr_constant(g: pd.DataFrame) -> bool | float:
    """Whether every run in `g` used one learning rate at every recorded step (NaN: not recorded).
    Equal up to rounding: a record's rate is the optimizer's divided by `head_lr_mult`."""
    if "step_lr" not in g or g["step_lr"].isna().all():
        return float("nan")
    lr = g.groupby("run")["step_lr"].agg(["min", "max"])
    return bool(((lr["max"] - lr["min"]) <= 1e-9 * lr["max"].abs()).all())


def plot_validation_curves(curves: pd.DataFrame, hue: str = "dropout", style: str | None = None) -> plt.Figure:
    """i.i.d. validation, training-domain and o.o.d. accuracy (%) vs step, mean ± se over runs:
    one line per `hue` value (rates in their fixed colours), and per `style` value when given
    (e.g. "head": one line per (head, rate), never pooled).

    Sized for a notebook (`plots.NOTEBOOK_WIDTH_PX` at 100 dpi, what plt.show() renders): three
    2.5-inch panels, titles on two lines, the legend below them, so JupyterLab shows the figure at
    full size; drawn 14 inches wide it was shown at two thirds, its ticks at 6 px."""
    ids = ["run", "step", hue] + ([style] if style else [])
    long = curves.melt(id_vars=ids, value_vars=["iid_acc", "fit_acc", "ood_acc"],
                       var_name="accuracy", value_name="value")
    long["value"] = 100 * long["value"]
    long["accuracy"] = long["accuracy"].map({"iid_acc": "i.i.d. validation\n(train domains, out split)",
                                             "fit_acc": "training data, eval mode\n(train domains, in split)",
                                             "ood_acc": "o.o.d.\n(held-out domain)"})
    if hue == "dropout":
        long["dropout rate"] = long["dropout"].map(lambda r: f"{float(r):g}")
        hue, palette = "dropout rate", rate_palette(long["dropout"])
    else:
        palette = "colorblind"
    with plt.rc_context(NOTEBOOK_FONTS):
        g = sns.relplot(data=long, x="step", y="value", hue=hue, style=style, col="accuracy", kind="line",
                        errorbar="se", palette=palette, height=2.5, aspect=1.0, facet_kws={"sharey": False})
        g.set_titles("{col_name}")
        g.set_axis_labels("step", "accuracy (%)")
        for ax in g.axes.flat:
            min_span(ax, "y")
            ax.tick_params(labelsize=NOTEBOOK_FONTS["xtick.labelsize"])  # ticks are made at draw time: fix their size now
            ax.grid(alpha=0.3)
        if g.legend is not None:  # below the panels, saying what it averages
            entries = len(g.legend.get_texts())
            sns.move_legend(g, "upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(entries, 6), frameon=False)
            title = g.legend.get_title().get_text()
            g.legend.set_title(f"{title} (mean ± se over runs)" if title else "mean ± se over runs")
        g.figure.tight_layout()
    return g.figure


FIT_THRESHOLD = 0.95
"""A model fits its training data when its eval-mode accuracy on the training domains' "in" split
(`fit_acc`) is at least 95%: fine-tuning a pretrained network on a few thousand images drives it to
about 100% (rate 0 does here), so 1 training image in 20 left wrong means under-trained or held
back by its own regularisation. The premise gauge (`vldlib.evaluate.premise`) uses the same rule."""


def fit_note(curves: pd.DataFrame, by: Sequence[str] = ("dropout",), threshold: float = FIT_THRESHOLD) -> str:
    """A sentence on whether each setting fitted its training data by the last step: the eval-mode
    accuracy on the training domains' "in" split (`fit_acc`), with the training-mode accuracy
    (dropout on, `train_acc`) named apart, since dropout alone lowers the latter.

    The plateau check looks at i.i.d. validation only, and after the lr decay every curve looks
    flat; with 90% dropout the head may still be far from fitting the training domains, and then
    the rates are compared before convergence, not at it.
    """
    if curves.empty or "fit_acc" not in curves or curves["fit_acc"].isna().all():
        return "No training-domain accuracy recorded: cannot say whether the runs fitted their training data."
    last = curves[curves.step == curves.groupby("run").step.transform("max")]
    acc = last.groupby(list(by)).fit_acc.mean()
    mode = last.groupby(list(by)).train_acc.mean() if "train_acc" in last else pd.Series(dtype=float)
    low = acc[acc < threshold]
    what = "fit: eval-mode accuracy on the training domains' 'in' split"
    if low.empty:
        return (f"Every setting fitted its training data ({what} >= {100 * threshold:.0f}% at the last step).")

    def name(k):
        k = k if isinstance(k, tuple) else (k,)
        return ", ".join(f"{c}={v}" for c, v in zip(by, k))

    def mode_of(k) -> str:
        v = mode.get(k, float("nan"))
        return "" if pd.isna(v) else f" (training-mode accuracy, dropout on: {100 * v:.0f}%)"
    return (f"Not fitted by the last step ({what} below {100 * threshold:.0f}%): "
            + "; ".join(f"{name(k)}: {100 * v:.0f}%{mode_of(k)}" for k, v in low.items())
            + ". Those rows compare runs that are either under-trained or kept from fitting by their own "
            "regularisation: a longer budget (`steps`) tells which, before concluding about them.")
