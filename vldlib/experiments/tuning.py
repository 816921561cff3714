"""Every arm tuned the same way: the lr x weight-decay grid on the tuning seeds, then each cell's
i.i.d.-chosen configuration on the other seeds.

The paper tunes learning rate and weight decay for every dropout rate; DomainBed chooses them per
algorithm and held-out domain by training-domain validation. A cell here is (backbone, depth, rate,
held-out domain) (`selection.TUNING_CELL`). Running the whole grid on every seed multiplies a study
by the grid's size; running it on a few *tuning seeds* and only the chosen configuration on the
others costs (grid size x tuning seeds + other seeds) runs per cell, and the choice is exactly the
one the tuning seeds make (`selection.tuned(..., seeds=tuning_seeds)` reads their runs alone).
Nothing here reads an o.o.d. number: choices come from `selection.choose_config`.

The same choices serve a second study: the quickstart trains the map's chosen configuration for its
cells (`apply_choices` on `read_choices(<map>/choices.csv)`), so it is tuned without paying for the
grid.

>>> tune, rest = split_seeds([0, 1, 2, 3], tuning_seeds=[0, 1]); tune, rest
([0, 1], [2, 3])
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from vldlib.config import TrainConfig
from vldlib.evaluate.selection import HPARAMS, TUNING_CELL

CHOICE_COLUMNS = (*TUNING_CELL, *HPARAMS)
# what else a choice depends on: a configuration tuned for 300 steps at 96 px is no choice for 3000 at 224
DESIGN = ("benchmark", "resolution", "steps", "augment", "pretrained", "batch_size")


def with_design(choices: pd.DataFrame, base: TrainConfig) -> pd.DataFrame:
    """`choices` with the design they were made for (`DESIGN`, from the study's base config), so
    that `apply_choices` refuses them for another design."""
    return choices.assign(**{k: getattr(base, k) for k in DESIGN})


def split_seeds(seeds: Sequence[int], tuning_seeds: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """(the seeds that run the whole grid, the seeds that run only the choices). None: every seed tunes."""
    seeds = [int(s) for s in seeds]
    if tuning_seeds is None:
        return seeds, []
    tune = [s for s in seeds if s in {int(t) for t in tuning_seeds}]
    if not tune:
        raise ValueError(f"tuning_seeds {list(tuning_seeds)} has none of the study's seeds {seeds}: the "
                         f"configurations would be chosen on no run; use a subset of seeds, e.g. {seeds[:2]}")
    return tune, [s for s in seeds if s not in tune]


def _depth(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return int(value)


def cell_of(cfg: TrainConfig) -> tuple:
    """A run's tuning cell: (backbone, train_stages, dropout, held-out domain)."""
    if not cfg.test_envs or len(cfg.test_envs) != 1:
        raise ValueError(f"tuning is per held-out domain; a run holds out {cfg.test_envs}")
    return cfg.backbone, _depth(cfg.train_stages), round(float(cfg.dropout), 6), int(cfg.test_envs[0])


def _lookup(choices: pd.DataFrame) -> dict[tuple, tuple[float, float]]:
    return {(r.backbone, _depth(r.train_stages), round(float(r.dropout), 6), int(r.test_env)):
            (float(r.lr), float(r.weight_decay)) for r in choices.itertuples()}


def apply_choices(configs: Sequence[TrainConfig], choices: pd.DataFrame, source: str = "the choices"
                  ) -> list[TrainConfig]:
    """`configs` with each run's lr and weight decay set to its cell's chosen ones, duplicates (the
    same run reached from several grid points) dropped, order kept. A cell without a choice is an
    error naming it and `source`: a study never falls back to an untuned recipe silently."""
    table = _lookup(choices)
    design = {k: choices[k].tolist()[0] for k in DESIGN if k in choices.columns and len(choices)}
    out, seen = [], set()
    for cfg in configs:
        differ = {k: (v, getattr(cfg, k)) for k, v in design.items() if str(v) != str(getattr(cfg, k))}
        if differ:
            what = ", ".join(f"{k}={mine!r} (the choices were made for {theirs!r})" for k, (theirs, mine) in differ.items())
            raise ValueError(f"{source}: tuned for another design: {what}. Run notebook 07 (the effect map) with "
                             "this design and point tuned_by at its choices.csv, or pass tuned_by=None to train "
                             "with the lr and weight_decay parameters as given.")
        cell = cell_of(cfg)
        if cell not in table:
            known = sorted({(b, d) for b, d, _, _ in table}, key=str)
            raise KeyError(f"{source} has no tuned configuration for backbone={cell[0]}, train_stages={cell[1]}, "
                           f"dropout={cell[2]:g}, held-out domain {cell[3]}; it covers (backbone, train_stages) "
                           f"{known}. Run notebook 07 (the effect map) with that cell, or pass tuned_by=None to "
                           "train with the lr and weight_decay parameters as given.")
        lr, wd = table[cell]
        new = dataclasses.replace(cfg, lr=lr, weight_decay=wd)
        key = repr(new)
        if key not in seen:
            seen.add(key)
            out.append(new)
    return out


def replicate_choices(grid_configs: Sequence[TrainConfig], choices: pd.DataFrame, seeds: Sequence[int]
                      ) -> list[TrainConfig]:
    """The chosen configuration of every cell of `grid_configs`, for each of `seeds` (the seeds that
    did not tune)."""
    reseeded = [dataclasses.replace(c, seed=int(s)) for s in seeds for c in grid_configs]
    return apply_choices(reseeded, choices, "the tuning seeds' choices")


def read_choices(path: str | Path) -> pd.DataFrame:
    """A choices table written by the effect map (`choices.csv`); errors name the file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tuned_by={str(path)!r}: no such file. It is written by notebook 07 (the effect "
                                "map) as <output_dir>/choices.csv; run that, or pass tuned_by=None to train with "
                                "the lr and weight_decay parameters as given.")
    try:
        table = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a choices table ({e}); re-create it with notebook 07") from None
    missing = [c for c in CHOICE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{p}: no column(s) {missing}; a choices table has {list(CHOICE_COLUMNS)} "
                         "(written by notebook 07 as choices.csv)")
    return table


def at_edge(choices: pd.DataFrame, grid: dict[str, Sequence[float]]) -> pd.Series:
    """Per choice, the hyperparameters it takes at an end of their grid ("lr 0.05 (largest)"), or
    "": a choice at an edge says the grid may not reach that cell's best."""
    def edges(row) -> str:
        out = []
        for name, values in grid.items():
            values = sorted(float(v) for v in values)
            if len(values) > 1 and float(row[name]) in (values[0], values[-1]):
                out.append(f"{name} {row[name]:g} ({'smallest' if float(row[name]) == values[0] else 'largest'})")
        return ", ".join(out)
    return choices.apply(edges, axis=1) if len(choices) else pd.Series(dtype=str)


def choices_table(choices: pd.DataFrame, domains: Sequence[str], label=None) -> pd.DataFrame:
    """One row per (backbone, depth, rate), one column per held-out domain: "lr / weight decay"
    chosen there. `label(depth, backbone)` names depths (`effect_map.depth_label`)."""
    rows = []
    for (bb, ts, rate), g in choices.groupby(["backbone", "train_stages", "dropout"], sort=True, dropna=False):
        depth = _depth(ts)
        row = {"backbone": bb.replace(".offline", ""), "depth": label(depth, bb) if label else depth, "dropout": rate}
        for r in g.itertuples():
            row[domains[int(r.test_env)]] = f"{r.lr:g} / {r.weight_decay:g}"
        rows.append(row)
    return pd.DataFrame(rows)
