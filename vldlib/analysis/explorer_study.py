"""The explorer's yardstick: the tuned recipe a run trains with, and the study it is set against.

A student's explorer run is one seed; alone it says little. The panel trains it with the effect
map's i.i.d.-tuned lr and weight decay for its cell (`tuned`), and sets its selected o.o.d. accuracy
against the committed study's seeds at the same rate and held-out domain (`study_for`,
`against_study`): inside or outside the 95% Student's t prediction interval of one new seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vldlib.config import TrainConfig
from vldlib.evaluate.student import critical_t
from vldlib.experiments.tuning import apply_choices, read_choices
from vldlib.paths import resolve

# The study one explorer run is set against: the quickstart (notebook 00: ObjectStyles, Lite0, 96 px,
# conv_head + head, 300 steps, the effect map's tuned lr and weight decay, 9 seeds, every domain held
# out). Its run folders are not committed; its table is: per rate and held-out domain, the o.o.d.
# accuracy at the checkpoint training-domain validation selects, mean +- SE over its seeds.
STUDY_TABLE = "outputs/quickstart/table.csv"
STUDY_DESIGN: dict[str, Any] = dict(benchmark="ObjectStyles", backbone="efficientnet_lite0.offline", pretrained=True,
                                    resolution=96, train_stages=1, steps=300, batch_size=32)


def tuned(cfg: TrainConfig, tuned_by: str | Path | None) -> tuple[TrainConfig, str]:
    """`cfg` with its cell's lr and weight decay from a choices table (`tuning.apply_choices`), and a
    line saying which recipe the run trains with; a run the table has no choice for (another
    backbone, rate, step budget ...) keeps its lr and weight decay, and the line says so and why."""
    given = f"lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}"
    if not tuned_by:
        return cfg, f"{given}, as given (tuned_by=None)"
    try:
        new = apply_choices([cfg], read_choices(resolve(tuned_by)), str(tuned_by))[0]
    except (KeyError, ValueError, FileNotFoundError) as e:
        return cfg, f"untuned ({given}): {e}"
    return new, f"lr {new.lr:g}, weight decay {new.weight_decay:g}, as the effect map tuned them ({tuned_by})"


def study_reference(table: str | Path, domain: str) -> pd.DataFrame:
    """The study's o.o.d. accuracy of held-out `domain` per dropout rate (method "model"): columns
    dropout, mean, se (fractions), n (seeds), read from a quickstart `table.csv` ("48.8 ± 0.5")."""
    cols = ["dropout", "mean", "se", "n"]
    path = resolve(table)
    t = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if domain not in t.columns:
        return pd.DataFrame(columns=cols)
    t = t[t.method == "model"]
    parts = t[domain].astype(str).str.split("±", expand=True).astype(float)
    return pd.DataFrame({"dropout": t.dropout.astype(float), "mean": parts[0] / 100, "se": parts[1] / 100,
                         "n": t.n.astype(int)}).reset_index(drop=True)


def study_for(cfg: TrainConfig, table: str | Path | None, domain: str) -> pd.DataFrame:
    """`study_reference` when `cfg` has the study's design (`STUDY_DESIGN`; rate, seed, lr and weight
    decay may differ), else an empty table: the study's numbers are no yardstick for another design."""
    mine = {k: getattr(cfg, k) for k in STUDY_DESIGN}
    mine["benchmark"] = Path(str(cfg.benchmark)).name
    if not table or any(str(mine[k]) != str(v) for k, v in STUDY_DESIGN.items()):
        return pd.DataFrame(columns=["dropout", "mean", "se", "n"])
    return study_reference(table, domain)


def selected_point(curve: pd.DataFrame) -> pd.Series:
    """The evaluation training-domain validation selects: highest i.i.d. accuracy, earliest on a tie."""
    return curve.loc[curve.iid_acc.astype(float).idxmax()]


def prediction_half_width(se: float, n: int) -> float:
    """Half-width of the 95% Student's t prediction interval for one new seed around the mean of n
    seeds with standard error `se`: t_{0.975, n-1} x sd x sqrt(1 + 1/n), sd = se x sqrt(n)."""
    return critical_t(n - 1) * se * n ** 0.5 * (1 + 1 / n) ** 0.5


def against_study(curve: pd.DataFrame, study: pd.DataFrame, dropout: float, domain: str) -> str:
    """This run's selected o.o.d. accuracy against the study's seeds at its rate and held-out domain:
    inside or outside the 95% prediction interval of one new seed, computed."""
    if not len(curve) or not len(study):
        return ""
    row = study[(study.dropout - dropout).abs() < 1e-9]
    if not len(row):
        rates = ", ".join(f"{r:g}" for r in study.dropout)
        return f"The study ran rates {rates} on held-out {domain}, not {dropout:g}: no yardstick for this rate."
    r = row.iloc[0]
    pick = selected_point(curve)
    half = prediction_half_width(float(r.se), int(r.n))
    inside = abs(float(pick.ood_acc) - r["mean"]) <= half
    return (f"Training-domain validation selects step {int(pick.step)} of this run: o.o.d. "
            f"{100 * pick.ood_acc:.1f}%. The study's {int(r.n)} seeds at rate {dropout:g}, held out {domain}: "
            f"{100 * r['mean']:.1f}% (SE {100 * r.se:.1f}); one new seed falls within {100 * half:.1f} points of "
            f"that mean 95% of the time (Student's t prediction interval, {int(r.n) - 1} dof): this run is "
            f"{'inside' if inside else 'outside'} it.")
