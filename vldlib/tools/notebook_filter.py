"""A git "clean" filter for the committed notebooks: what git stores is the notebook as committed
(no outputs, no execution counts, the fixed kernelspec), whatever JupyterLab wrote into the file.

Why: saving a notebook in JupyterLab (or its autosave, once a cell ran) rewrites the kernelspec
("Python 3" becomes the installed kernel's "Python 3 (ipykernel)"), writes the kernel's
`language_info` (with the Python version of the machine, so no committed value is stable), the
outputs, execution counts, timing and widget state. Without a filter git shows every opened
notebook as modified; with it, only a changed source or cell counts. The file on disk keeps what
JupyterLab wrote (the outputs stay visible); only what git stores is cleaned.

Set up once per clone (the README says the same; `.gitattributes` names the files):

    git config filter.vldlib-notebook.clean ".venv/bin/python -m vldlib.tools.notebook_filter"
    git config filter.vldlib-notebook.smudge cat

Only the standard library: git runs it for each notebook it looks at.
"""

from __future__ import annotations

import json
import sys

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
KEPT_CELL_METADATA = ("tags",)  # the `parameters` tag papermill reads; everything else is the editor's


def clean(text: str) -> str:
    """The notebook `text` as committed: outputs and execution counts removed, cell metadata
    reduced to its tags, notebook metadata to the fixed kernelspec and language. Text that is not
    a notebook (a merge conflict, a half-written file) comes back unchanged: a filter must never
    lose what it cannot read."""
    try:
        nb = json.loads(text)
        cells = nb["cells"]
    except (ValueError, KeyError, TypeError):
        return text
    for cell in cells:
        meta = cell.get("metadata", {})
        cell["metadata"] = {k: meta[k] for k in KEPT_CELL_METADATA if k in meta}
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"] = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    # nbformat's own layout (one-space indent, sorted keys, non-ASCII kept, final newline): a
    # committed notebook comes back byte for byte
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    data = sys.stdin.buffer.read().decode("utf-8")
    sys.stdout.buffer.write(clean(data).encode("utf-8"))


if __name__ == "__main__":
    main()
