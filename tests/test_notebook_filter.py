"""The notebooks' git clean filter (issue 26 item 8): a notebook JupyterLab saved (its outputs, its
rewritten kernelspec and language_info) is stored by git as committed, so `git status` stays clean;
a changed cell still shows."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vldlib.tools.notebook_filter import clean

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# What JupyterLab 4.6 (ipykernel 7, Python 3.11) wrote into 20_explorer on save, measured in the
# browser (tests/test_explorer_browser.py saves it too)
SAVED_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                      "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                      "pygments_lexer": "ipython3", "version": "3.11.7"},
    "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2, "version_minor": 0}},
}


def saved_by_jupyterlab(text: str) -> str:
    """The notebook as JupyterLab leaves it after Run All and a save: outputs, counts, timing."""
    nb = json.loads(text)
    nb["metadata"] = SAVED_METADATA
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            cell["execution_count"] = i
            cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["ran\n"]}]
            cell["metadata"] = {**cell["metadata"], "execution": {"iopub.status.idle": "2026-01-01T00:00:00Z"},
                                "scrolled": True}
    return json.dumps(nb, indent=1, ensure_ascii=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_committed_notebook_passes_through_byte_for_byte(path):
    text = path.read_text(encoding="utf-8")
    assert clean(text) == text


def test_what_jupyterlab_saved_cleans_back_to_the_committed_notebook():
    text = (ROOT / "notebooks" / "20_explorer.ipynb").read_text(encoding="utf-8")
    saved = saved_by_jupyterlab(text)
    assert saved != text and clean(saved) == text


def test_text_that_is_not_a_notebook_passes_unchanged():
    conflict = "<<<<<<< HEAD\n{\"cells\": []}\n=======\n"
    assert clean(conflict) == conflict


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_stores_nothing_of_a_jupyterlab_save_and_still_sees_a_changed_cell(tmp_path):
    """git compares sizes before contents: `git status` lists a saved notebook until `git add`
    refreshes its index entry, but `git diff` is empty and the add stores nothing."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    nb = repo / "notebooks" / "20_explorer.ipynb"
    shutil.copy(ROOT / "notebooks" / "20_explorer.ipynb", nb)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    git("config", "filter.vldlib-notebook.clean", f"{shlex.quote(sys.executable)} -m vldlib.tools.notebook_filter")
    git("config", "filter.vldlib-notebook.smudge", "cat")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "notebook")
    nb.write_text(saved_by_jupyterlab(nb.read_text(encoding="utf-8")), encoding="utf-8")
    assert git("diff") == ""
    git("add", "-A")
    assert git("status", "--porcelain") == "" and git("diff", "--cached") == ""
    assert "execution_count\": 1" in nb.read_text()  # the file on disk keeps what JupyterLab wrote
    edited = json.loads(nb.read_text())
    edited["cells"][1]["source"] = "steps = 301\n"
    nb.write_text(json.dumps(edited, indent=1))
    added = [line for line in git("diff").splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert added and all("steps = 301" in line for line in added)
