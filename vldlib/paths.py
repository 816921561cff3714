"""Where things go: relative paths mean "relative to the project", wherever a notebook runs.

A notebook opened in JupyterLab runs in `notebooks/`, papermill and the CLI run in the project
root; both must write to the same `outputs/` and read the same `data/`.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding vldlib's pyproject.toml,
    else `start` itself (an installed vldlib used from any folder)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "vldlib").is_dir():
            return folder
    return here


def resolve(path: str | os.PathLike) -> Path:
    """Absolute path; a relative one is taken relative to the project root."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else project_root() / p
