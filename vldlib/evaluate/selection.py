"""Model selection and summaries: one checkpoint per run, then mean ± standard error over seeds.

Pure functions of the tidy table of `vldlib.evaluate.scores.load_runs`.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from vldlib.evaluate.scores import ROW_COLS, per_step_scores

SELECTIONS = ("training_domain", "oracle", "last")
METHODS = ("model", "wa", "ens")  # current weights, trajectory weight average, trajectory ensemble


def select(df: pd.DataFrame, method: str = "training_domain") -> pd.DataFrame:
    """Choose one checkpoint per (run, averaging method); one row each.

    - "training_domain" (the paper's): the step with the highest i.i.d. validation accuracy
      (mean `env{i}_out` over training envs); ties go to the earliest step.
    - "oracle": the step with the highest test-domain `env{t}_out` accuracy (DomainBed's
      test-domain validation, an optimistic upper bound; DomainBed itself applies it to the last
      checkpoint of each run when choosing hyperparameters, we apply it per checkpoint); o.o.d.
      accuracy is still reported on `env{t}_in`.
    - "last": the final evaluated step.

    Columns: run, method, selection, step, last_step, n_evals, iid_acc, ood_acc, oracle_acc,
    fit_acc (eval-mode accuracy on the training domains' "in" split), train_acc (training-mode,
    dropout on), loss, rel_distance (how far the weights moved from the start, relative), then the
    run's constant columns (benchmark, test_env, done, config keys...).

    >>> sel = select(load_runs(["outputs/runs"]), "training_domain")   # doctest: +SKIP
    """
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTIONS)}")
    if df.empty:
        return pd.DataFrame(columns=["run", "method", "selection", "step", "iid_acc", "ood_acc"])
    scores = per_step_scores(df)
    key = {"training_domain": "iid_acc", "oracle": "oracle_acc", "last": "step"}[method]
    usable = scores[scores[key].notna()]
    dropped = set(scores.run) - set(usable.run)
    if dropped:
        what = "training" if key == "iid_acc" else "test"
        warnings.warn(f"{len(dropped)} run(s) have no {what}-domain 'out' accuracy to select with, "
                      f"skipped: {', '.join(sorted(dropped))}", stacklevel=2)
    ascending = key == "step"  # last: largest step last; scores: highest first, then earliest step
    order = usable.sort_values(["run", "method", key, "step"], ascending=[True, True, ascending, True],
                               kind="mergesort")
    chosen = (order.groupby(["run", "method"], sort=False).tail(1) if ascending
              else order.groupby(["run", "method"], sort=False).head(1))
    stats = scores.groupby(["run", "method"]).step.agg(last_step="max", n_evals="size").reset_index()
    chosen = chosen.merge(stats, on=["run", "method"]).assign(selection=method)
    run_cols = [c for c in df.columns if c not in ROW_COLS]
    runs = df[run_cols].drop_duplicates("run")
    out = chosen.merge(runs, on="run", how="left")
    front = ["run", "method", "selection", "step", "last_step", "n_evals", "iid_acc", "ood_acc",
             "oracle_acc", "fit_acc", "train_acc", "loss", "rel_distance"]
    out = out[front + [c for c in out.columns if c not in front]]
    order_m = {m: i for i, m in enumerate(METHODS)}
    return (out.assign(_m=out.method.map(order_m).fillna(len(order_m)))
            .sort_values(["run", "_m"]).drop(columns="_m").reset_index(drop=True))


def check_columns(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: no column(s) {missing} in the table; available: {', '.join(map(str, df.columns))}")


def summarize(selected: pd.DataFrame, by: Sequence[str] = ("benchmark", "method", "dropout"),
              over: str | None = "seed", metrics: Sequence[str] = ("iid_acc", "ood_acc")) -> pd.DataFrame:
    """Mean, standard error and n of each metric per group, the replicates being values of `over`.

    Two levels, as in DomainBed's reporting: first average everything within each (group, `over`
    value) (held-out domains, learning rates, ... whatever is not in `by`), then take mean and
    standard error std/sqrt(n) across the `over` values (se = 0 when n = 1; look at n).
    `over=None` treats every row as a replicate.

    >>> summarize(sel, by=["benchmark", "dropout"])   # doctest: +SKIP
      benchmark  dropout  iid_acc_mean  iid_acc_se  ood_acc_mean  ood_acc_se  n
    """
    by = list(by)
    check_columns(selected, [*by, *metrics] + ([over] if over else []), "summarize")
    data = selected
    if over is not None:
        data = selected.groupby(by + [over], dropna=False, sort=True)[list(metrics)].mean().reset_index()
    g = data.groupby(by, dropna=False, sort=True)
    out = g.size().rename("n").to_frame()
    for m in metrics:
        mean, std, cnt = g[m].mean(), g[m].std(ddof=1), g[m].count()
        out[f"{m}_mean"] = mean
        out[f"{m}_se"] = (std / np.sqrt(cnt)).where(cnt > 1, 0.0)
    cols = [c for m in metrics for c in (f"{m}_mean", f"{m}_se")] + ["n"]
    return out[cols].reset_index()


# --------------------------------------------------------------------------- tuning by i.i.d. validation
HPARAMS = ("lr", "weight_decay")
# the design axes a study may vary besides backbone, depth and rate: input size and training-set size
DESIGN_AXES = ("resolution", "train_fraction")
# per backbone, depth, input size, training-set size, rate and held-out domain (a table without the
# resolution or train_fraction column, a study of one of each, tunes on the others)
TUNING_CELL = ("backbone", "train_stages", *DESIGN_AXES, "dropout", "test_env")
_OOD_MARKERS = ("ood", "oracle")


def choose_config(iid: pd.DataFrame, cell: Sequence[str] = TUNING_CELL, hparams: Sequence[str] = HPARAMS,
                  over: str = "seed") -> pd.DataFrame:
    """Per `cell`, the hyperparameter configuration whose selected checkpoints have the highest mean
    i.i.d. validation accuracy over `over` (seeds): every rate, depth and held-out domain tuned the
    same way, by training-domain validation only, as the paper tunes lr x weight decay per rate.
    Ties go to the smaller values (sorted order). One row per cell: the cell, the chosen hparams,
    `iid_mean` and `n_configs`.

    `iid` must hold no o.o.d. column: this function is never handed what it must not look at
    (`tuned` strips them), and refuses a table that has one."""
    leaked = [c for c in iid.columns if any(m in str(c) for m in _OOD_MARKERS)]
    if leaked:
        raise ValueError(f"choose_config got o.o.d. column(s) {leaked}: selection sees i.i.d. validation only")
    cell, hparams = [c for c in cell if c in iid.columns], list(hparams)
    check_columns(iid, [*hparams, over, "iid_acc"], "choose_config")
    per_cfg = (iid.groupby(cell + hparams, dropna=False, sort=True)["iid_acc"].mean()
               .rename("iid_mean").reset_index())
    n = per_cfg.groupby(cell, dropna=False).size().rename("n_configs").reset_index()
    best = (per_cfg.sort_values([*cell, "iid_mean", *hparams], ascending=[True] * len(cell) + [False]
                                + [True] * len(hparams), kind="mergesort")
            .groupby(cell, dropna=False, sort=True).head(1))
    return best.merge(n, on=cell, how="left").reset_index(drop=True)


def keep_chosen(selected: pd.DataFrame, choices: pd.DataFrame, cell: Sequence[str] = TUNING_CELL,
                hparams: Sequence[str] = HPARAMS) -> pd.DataFrame:
    """The rows of `selected` whose (cell, hparams) is a cell's chosen configuration, every seed and
    method of it; cells without a choice drop out."""
    on = [c for c in [*cell, *hparams] if c in choices.columns and c in selected.columns]
    return selected.merge(choices[on].drop_duplicates(), on=on, how="inner")


def tuned(selected: pd.DataFrame, cell: Sequence[str] = TUNING_CELL, hparams: Sequence[str] = HPARAMS,
          method: str = "model", seeds: Sequence[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`selected` restricted to each cell's chosen configuration, the choices). The configuration is
    chosen on `method`'s i.i.d. accuracy (the fine-tuned network's, which the official code selects
    on); its runs then give every method's rows (weight average, ensemble).

    `seeds`: the tuning seeds. The choice is made on their runs alone (where the whole grid ran),
    then the chosen configuration's runs of every seed are kept: a study that runs the grid on a few
    seeds and replicates only the choice on the others (`vldlib.experiments.tuning`) is tuned
    exactly as if those seeds had not been run. None: every seed tunes."""
    side = selected[selected["method"] == method] if "method" in selected.columns else selected
    if seeds is not None:
        side = side[side["seed"].isin(list(seeds))]
        if side.empty:
            raise ValueError(f"tuned: no run of the tuning seeds {list(seeds)} in the table; its seeds: "
                             f"{sorted(selected['seed'].unique())}")
    keep = [c for c in [*cell, *hparams, "seed", "iid_acc"] if c in side.columns]
    choices = choose_config(side[keep], cell, hparams)
    return keep_chosen(selected, choices, cell, hparams), choices
