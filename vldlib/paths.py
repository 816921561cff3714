"""Where things go: relative paths mean "relative to the project", wherever a notebook runs.

A notebook opened in JupyterLab runs in `notebooks/`, papermill and the CLI run in the project
root; both must write to the same `outputs/` and read the same `data/`. Without a checkout (vldlib
installed from a wheel, `pip install git+...`, Colab), the project is the current folder.

The notebooks and their parameter files ship inside the package too (`vldlib/notebooks/` in a
wheel), so an installed vldlib runs them from any folder: a checkout's copy wins, so that editing
`notebooks/` in a clone takes effect, then the installed one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

NOTEBOOKS = "notebooks"  # the checkout's folder of notebooks and parameter files
SHIPPED_SUFFIXES = (".ipynb", ".yaml", ".csv")  # what of it ships in the wheel and the sdist (setup.py)


def is_checkout(folder: str | os.PathLike) -> bool:
    """A clone of vldlib: its pyproject.toml beside the vldlib package."""
    folder = Path(folder)
    return (folder / "pyproject.toml").is_file() and (folder / "vldlib").is_dir()


def checkout_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest checkout at or above `start` (default: cwd), or None."""
    here = Path(start or os.getcwd()).resolve()
    return next((folder for folder in (here, *here.parents) if is_checkout(folder)), None)


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding vldlib's pyproject.toml,
    else `start` itself (an installed vldlib used from any folder)."""
    return checkout_root(start) or Path(start or os.getcwd()).resolve()


def resolve(path: str | os.PathLike) -> Path:
    """Absolute path; a relative one is taken relative to the project root."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else project_root() / p


def shown(path: str | os.PathLike) -> str:
    """`path` as a table or a sentence shows it: relative to the project root when it lies inside
    (`outputs/runs/RUN`), so that committed tables do not carry this machine's folders; else as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return str(path)


def packaged_notebooks() -> Path:
    """The notebooks of the installed package: `vldlib/notebooks/` of a wheel or sdist install; for
    an editable install (no copy inside the package), the `notebooks/` of the checkout it points at."""
    package = Path(__file__).resolve().parent
    inside = package / NOTEBOOKS
    if not inside.is_dir() and is_checkout(package.parent):
        return package.parent / NOTEBOOKS
    return inside


def _places() -> list[tuple[str, Path]]:
    root = checkout_root()
    places = [("the checkout", root / NOTEBOOKS)] if root else []
    return places + [("the installed package", packaged_notebooks())]


def find_notebook(name: str | os.PathLike) -> Path:
    """A notebook or parameter file that ships with vldlib, by its name (`00_quickstart.ipynb`, or
    `notebooks/00_quickstart.ipynb` as the README writes it): in the checkout at or above the current
    folder first, then in the installed package. The error names every place looked."""
    base = Path(name).name
    places = _places()
    for _, folder in places:
        if (folder / base).is_file():
            return folder / base
    looked = "; ".join(f"{what}: {folder / base}" for what, folder in places)
    hint = ("" if checkout_root() else " (no checkout of vldlib at or above the current folder)")
    shipped = ", ".join(p.name for p in shipped_files())
    raise FileNotFoundError(f"{base} not found{hint}; looked in {looked}. " + (
        f"The files that ship with vldlib: {shipped}." if shipped else
        "This vldlib was installed without its notebooks: reinstall it from its wheel, sdist or git URL."))


def locate(path: str | os.PathLike) -> Path:
    """A file the user named (a notebook, `--config`, `--grid`): the path as given, relative to the
    current folder, when it exists; else, when it names a shipped file (`notebooks/NAME` or `NAME`),
    that file (`find_notebook`), so the README's commands work from any folder. Otherwise the path as
    given, for the caller's own "does not exist" error."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists() or p.is_absolute() or p.parent not in (Path("."), Path(NOTEBOOKS)):
        return p
    try:
        return find_notebook(p)
    except FileNotFoundError:
        return p


def is_packaged(path: str | os.PathLike) -> bool:
    """Whether `path` is one of the installed package's own notebooks (inside site-packages, say):
    such a notebook runs in the current folder, never in its own (nothing is written into an install)."""
    return Path(path).resolve().parent == packaged_notebooks().resolve() and checkout_root(Path(path).parent) is None


def shipped_files() -> list[Path]:
    """Every notebook and parameter file that ships with vldlib, from the checkout at or above the
    current folder, else from the installed package."""
    for _, folder in _places():
        files = sorted(p for p in folder.glob("*") if p.suffix in SHIPPED_SUFFIXES and p.is_file())
        if files:
            return files
    return []


def copy_notebooks(dest: str | os.PathLike, force: bool = False) -> list[Path]:
    """Copy the shipped notebooks and parameter files into `dest` (created); return the copies.
    Refuses, before copying anything, to overwrite a file unless `force`: a copy may hold the user's
    edits. Writes nothing outside `dest`."""
    files = shipped_files()
    if not files:
        raise FileNotFoundError("no notebooks to copy: no checkout of vldlib at or above the current folder, and "
                                f"the installed package has none ({packaged_notebooks()}); reinstall vldlib from its "
                                "wheel, sdist or git URL")
    dest = Path(os.path.expanduser(str(dest)))
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} is a file, not a folder; name a folder to copy the notebooks into")
    if dest.is_dir() and dest.resolve() == files[0].parent.resolve():
        raise FileExistsError(f"{dest} is where the notebooks are already; name another folder to copy them into")
    clash = [dest / f.name for f in files if (dest / f.name).exists()]
    if clash and not force:
        raise FileExistsError(f"{len(clash)} file(s) already in {dest}, e.g. {clash[0]}: they may hold your edits. "
                              "Choose another folder, or pass --force to overwrite them.")
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(f, dest / f.name)) for f in files]
