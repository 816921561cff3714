"""Every arm tuned the same way: the lr x weight-decay grid on the tuning seeds, then each cell's
i.i.d.-chosen configuration on the other seeds.

The paper tunes learning rate and weight decay for every dropout rate; DomainBed chooses them per
algorithm and held-out domain by training-domain validation. A cell here is (backbone, depth, resolution,
training-set size, rate, held-out domain) (`selection.TUNING_CELL`). Running the whole grid on every seed multiplies a study
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
from vldlib.evaluate.selection import DESIGN_AXES, HPARAMS

# what a choices table must have; resolution and train_fraction are cells too where a study varies
# them (a table without them was made at one of each, which its design columns give)
CHOICE_COLUMNS = ("backbone", "train_stages", "dropout", "test_env", *HPARAMS)
# what else a choice depends on: a configuration tuned for 300 steps at 96 px is no choice for 3000 at 224
DESIGN = ("benchmark", "resolution", "steps", "augment", "pretrained", "batch_size", "train_fraction")


def with_design(choices: pd.DataFrame, made_with: TrainConfig | Sequence[TrainConfig]) -> pd.DataFrame:
    """`choices` with the design each was made for (`DESIGN`), so that `apply_choices` refuses them
    for another design. `made_with`: the study's base config, or its tuning configs when the study
    varies part of the design (resolution, and with it the stored benchmark; train_fraction): each
    choice then gets the design of the configs of its own (resolution, train_fraction)."""
    configs = [made_with] if isinstance(made_with, TrainConfig) else list(made_with)
    designs = {(int(c.resolution), float(c.train_fraction)): {k: getattr(c, k) for k in DESIGN} for c in configs}
    if len(designs) == 1 or not set(DESIGN_AXES) <= set(choices.columns):
        return choices.assign(**next(iter(designs.values())))
    rows = [designs[(int(r), float(f))] for r, f in zip(choices.resolution, choices.train_fraction)]
    return choices.assign(**{k: [d[k] for d in rows] for k in DESIGN})


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
    """A run's tuning cell, less its design: (backbone, train_stages, dropout, held-out domain). The
    design (resolution, train_fraction, ...) is matched against each choice's design columns."""
    if not cfg.test_envs or len(cfg.test_envs) != 1:
        raise ValueError(f"tuning is per held-out domain; a run holds out {cfg.test_envs}")
    return cfg.backbone, _depth(cfg.train_stages), round(float(cfg.dropout), 6), int(cfg.test_envs[0])


def _lookup(choices: pd.DataFrame) -> dict[tuple, list[dict]]:
    """cell -> the choices made for it, one per design (resolution, train_fraction, ...) the table holds."""
    table: dict[tuple, list[dict]] = {}
    for r in choices.to_dict("records"):
        key = (r["backbone"], _depth(r["train_stages"]), round(float(r["dropout"]), 6), int(r["test_env"]))
        table.setdefault(key, []).append(r)
    return table


def _same(recorded: Any, value: Any) -> bool:
    """A design value read back from a choices CSV against the config's: numbers by value (96 and
    96.0, 0.5 and "0.5" are the same), everything else (names, booleans, lists) by its text."""
    try:
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            return float(recorded) == float(value)
    except (TypeError, ValueError):
        return False
    return str(recorded) == str(value)


def _design_differences(row: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (the choice's value, the run's)} where a choice made for `row`'s design does not fit
    `cfg`; a field the table leaves empty (NaN, an older table) fits any run."""
    return {k: (row[k], getattr(cfg, k)) for k in DESIGN
            if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))
            and not _same(row[k], getattr(cfg, k))}


def apply_choices(configs: Sequence[TrainConfig], choices: pd.DataFrame, source: str = "the choices"
                  ) -> list[TrainConfig]:
    """`configs` with each run's lr and weight decay set to its cell's chosen ones (the choice made
    for its design, where the table holds several), duplicates (the same run reached from several
    grid points) dropped, order kept. A cell without a choice, or whose choices were all made for
    another design, is an error naming it and `source`: a study never falls back to an untuned
    recipe silently."""
    table = _lookup(choices)
    out, seen = [], set()
    for cfg in configs:
        cell = cell_of(cfg)
        if cell not in table:
            known = sorted({(b, d) for b, d, _, _ in table}, key=str)
            raise KeyError(f"{source} has no tuned configuration for backbone={cell[0]}, train_stages={cell[1]}, "
                           f"dropout={cell[2]:g}, held-out domain {cell[3]}; it covers (backbone, train_stages) "
                           f"{known}. Run notebook 07 (the effect map) with that cell, or pass tuned_by=None to "
                           "train with the lr and weight_decay parameters as given.")
        fits = [r for r in table[cell] if not _design_differences(r, cfg)]
        if not fits:
            differ = _design_differences(table[cell][0], cfg)
            what = ", ".join(f"{k}={mine!r} (the choices were made for {theirs!r})" for k, (theirs, mine) in differ.items())
            raise ValueError(f"{source}: tuned for another design: {what}. Run notebook 07 (the effect map) with "
                             "this design and point tuned_by at its choices.csv, or pass tuned_by=None to train "
                             "with the lr and weight_decay parameters as given.")
        new = dataclasses.replace(cfg, lr=float(fits[0]["lr"]), weight_decay=float(fits[0]["weight_decay"]))
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


def constant_lr(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """`configs` with one learning rate throughout (`lr_decay_at=[]`): the budget check's runs. The
    default x0.1 at half-time flattens every curve after it, converged or not, so a plateau is judged
    on these (`convergence.plateau_check`'s `lr_constant`)."""
    return [dataclasses.replace(c, lr_decay_at=[]) for c in configs]


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


def varying(table: pd.DataFrame, columns: Sequence[str] = DESIGN_AXES) -> list[str]:
    """The design axes among `columns` that take more than one value in `table` (a study of one
    resolution and one training-set size shows neither)."""
    return [c for c in columns if c in table.columns and table[c].nunique(dropna=False) > 1]


def choices_table(choices: pd.DataFrame, domains: Sequence[str], label=None) -> pd.DataFrame:
    """One row per (backbone, depth, [resolution, train_fraction where they vary], rate), one column
    per held-out domain: "lr / weight decay" chosen there. `label(depth, backbone)` names depths
    (`effect_map.depth_label`)."""
    extra = varying(choices)
    rows = []
    for key, g in choices.groupby(["backbone", "train_stages", *extra, "dropout"], sort=True, dropna=False):
        bb, ts, rate = key[0], key[1], key[-1]
        depth = _depth(ts)
        row = {"backbone": bb.replace(".offline", ""), "depth": label(depth, bb) if label else depth,
               **dict(zip(extra, key[2:-1])), "dropout": rate}
        for r in g.itertuples():
            row[domains[int(r.test_env)]] = f"{r.lr:g} / {r.weight_decay:g}"
        rows.append(row)
    return pd.DataFrame(rows)
