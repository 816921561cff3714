"""`python -m vldlib notebooks DIR`: copy the notebooks and their parameter files into DIR.

They ship inside the package, so an installed vldlib (a wheel, `pip install git+...`) runs them
without a checkout: `python -m vldlib quickstart` and `sweep notebooks/NAME.ipynb` find them from
any folder. A copy is for opening and editing them in Jupyter; relative `data/` and `outputs/` then
mean the folder the notebook runs in (DIR), when DIR is not inside a checkout of vldlib.
"""

from __future__ import annotations

import argparse

from vldlib.cliargs import add_flag, print_error
from vldlib.paths import copy_notebooks


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("notebooks", help="copy the notebooks and their parameter files into a folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  python -m vldlib notebooks my_notebooks && jupyter lab my_notebooks")
    p.add_argument("dir", metavar="DIR", help="folder to copy them into (created if missing)")
    add_flag(p, "--force", help="overwrite files already in DIR (they may hold your edits)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        copied = copy_notebooks(args.dir, force=args.force)
    except (OSError, ValueError) as e:
        return print_error(e)
    notebooks = sum(p.suffix == ".ipynb" for p in copied)
    print(f"copied {notebooks} notebooks and {len(copied) - notebooks} parameter files into {args.dir}; "
          f"open them in Jupyter, e.g. `jupyter lab {args.dir}`")
    return 0
