"""Grids: YAML -> list of notebook parameter dicts (pure).

A grid maps each notebook parameter to a value or a list of values; lists are axes and the jobs
are their product. A parameter whose *value* is a list is written as a one-element list of that
list (`layers: [[2, 3, 4]]`). A YAML list of such mappings concatenates their expansions.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from vldlib.cliargs import YamlLoader as _Loader
from vldlib.cliargs import parse_sets, parse_value  # noqa: F401  (re-exported: vldlib.tools.sweep)

Grid = Mapping[str, Any] | Sequence[Mapping[str, Any]]
RESERVED = "output_dir"  # set by the sweep for every job


def load_grid(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a grid YAML file into a list of grid mappings (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist; pass --grid PATH to a YAML mapping "
                                f"of notebook parameter -> value or list of values")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(f"grid file {path} is not valid YAML: {e}") from None
    return as_grids(data, where=str(path))


def as_grids(grid: Any, where: str = "grid") -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    grids = [grid] if isinstance(grid, Mapping) else grid
    if not isinstance(grids, Sequence) or isinstance(grids, str) or not all(isinstance(g, Mapping) for g in grids):
        raise ValueError(f"{where}: a grid is a mapping of parameter -> value or list of values, or a "
                         f"list of such mappings; got {type(grid).__name__}: {grid!r:.80}")
    for g in grids:
        for key, values in g.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"{where}: parameter name {key!r} is not a Python identifier; "
                                 f"grid keys must be the notebook's parameter names")
            if key == RESERVED:
                raise ValueError(f"{where}: '{RESERVED}' is set by the sweep for each job; remove it from the grid")
            if isinstance(values, list) and not values:
                raise ValueError(f"{where}: '{key}' is an empty list, so the grid has no jobs; give at least "
                                 f"one value (a list-valued parameter is written [[...]])")
    return [dict(g) for g in grids]


def expand_grid(grid: Grid) -> list[dict[str, Any]]:
    """All parameter sets of a grid, in order (the last key varies fastest).

    >>> expand_grid({"lr": [1e-3, 5e-4], "dropout": 0.9, "layers": [[2, 3]]})
    [{'lr': 0.001, 'dropout': 0.9, 'layers': [2, 3]}, {'lr': 0.0005, 'dropout': 0.9, 'layers': [2, 3]}]
    >>> len(expand_grid([{"a": [1, 2]}, {"a": 3, "b": [4, 5]}]))
    4
    """
    out = []
    for g in as_grids(grid):
        axes = [v if isinstance(v, list) else [v] for v in g.values()]
        out += [dict(zip(g.keys(), combo)) for combo in itertools.product(*axes)]
    return out


def apply_overrides(grid: Grid, overrides: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Set `overrides` in every grid mapping before expansion, so `--set steps=10` shrinks a whole
    sweep for a smoke run (and, being part of the params, sends it to different folders)."""
    return [{**g, **(overrides or {})} for g in as_grids(grid)]


