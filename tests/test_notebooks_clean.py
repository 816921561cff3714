"""Every committed notebook: outputs stripped, one `parameters` cell papermill can read, and a
paper parameter set (where one exists) that names only real parameters."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_the_readmes():
    """The README's notebook table and the folder agree: every notebook it names exists, and every
    notebook is named (a row "`01_x` ... `06_y`" names the range)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("\n## Notebooks\n", 1)[1].split("\n## ", 1)[0]  # the notebook table's section
    named, ranges = set(), []
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        names = re.findall(r"`([^`]+)`", cell)
        if "..." in cell:
            ranges.append((names[0], names[-1]))
        named.update(names)
    stems = {p.stem for p in NOTEBOOKS}
    assert named and named <= stems, f"README names missing notebooks: {sorted(named - stems)}"
    unnamed = [s for s in stems - named if not any(a < s < b for a, b in ranges)]
    assert not unnamed, f"notebooks missing from the README's table: {unnamed}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_parameterized(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown", f"{path.name}: start with a markdown cell saying what it shows"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"{path.name}: strip outputs"
    params = pm.inspect_notebook(str(path))
    assert "output_dir" in params or path.stem == "report", f"{path.name}: needs an output_dir parameter"
    for yaml_path in path.parent.glob(f"{path.stem}.*.yaml"):
        grids = yaml.safe_load(yaml_path.read_text())
        for grid in grids if isinstance(grids, list) else [grids]:
            unknown = set(grid) - set(params)
            assert not unknown, f"{yaml_path.name}: unknown parameters {unknown}"
