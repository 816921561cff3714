"""vldlib installed anywhere (issue 25): the notebooks ship in the wheel and the sdist, commands find
them in a checkout first and then in the installed package, relative paths mean the current folder
when there is no checkout, and the wheel, installed into a venv with no checkout on its path, runs
the quickstart from an empty folder with its notebook rendered."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

from vldlib import paths
from vldlib.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "notebooks").iterdir() if p.suffix in paths.SHIPPED_SUFFIXES)


# --------------------------------------------------------------------------- finding the notebooks

def _fake_checkout(root: Path, notebooks: dict[str, str]) -> Path:
    (root / "vldlib").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'vldlib'\n")
    (root / "notebooks").mkdir()
    for name, text in notebooks.items():
        (root / "notebooks" / name).write_text(text)
    return root


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An installed package's notebooks folder (as a wheel lays it out), standing in for the real one."""
    folder = tmp_path / "site-packages" / "vldlib" / "notebooks"
    folder.mkdir(parents=True)
    for name in ("00_quickstart.ipynb", "00_quickstart.gpu.yaml"):
        (folder / name).write_text(f"packaged {name}")
    monkeypatch.setattr(paths, "packaged_notebooks", lambda: folder)
    return folder


def test_a_shipped_file_is_found_in_the_checkout_first_then_in_the_package(tmp_path, package, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert paths.find_notebook("notebooks/00_quickstart.ipynb") == package / "00_quickstart.ipynb"
    assert paths.find_notebook("00_quickstart.gpu.yaml") == package / "00_quickstart.gpu.yaml"
    with pytest.raises(FileNotFoundError) as e:
        paths.find_notebook("notebooks/99_missing.ipynb")
    message = str(e.value)  # every place looked, and what does ship
    assert "no checkout of vldlib at or above the current folder" in message
    assert str(package / "99_missing.ipynb") in message and "00_quickstart.gpu.yaml" in message

    co = _fake_checkout(tmp_path / "clone", {"00_quickstart.ipynb": "the checkout's"})
    (co / "notebooks" / "sub").mkdir()
    monkeypatch.chdir(co / "notebooks" / "sub")  # anywhere inside the checkout
    assert paths.find_notebook("notebooks/00_quickstart.ipynb") == co / "notebooks" / "00_quickstart.ipynb"
    assert paths.find_notebook("00_quickstart.gpu.yaml") == package / "00_quickstart.gpu.yaml"  # not in it


def test_a_path_inside_the_project_is_shown_relative_to_it_and_one_outside_as_given(tmp_path, monkeypatch):
    co = _fake_checkout(tmp_path / "clone", {})
    run = co / "outputs" / "runs" / "RUN"
    run.mkdir(parents=True)
    monkeypatch.chdir(co / "notebooks")  # where JupyterLab runs a notebook
    assert paths.shown(run) == "outputs/runs/RUN"
    assert paths.shown(tmp_path / "elsewhere" / "RUN") == str(tmp_path / "elsewhere" / "RUN")


def test_the_quickstart_without_its_notebook_says_where_it_looked_before_running(tmp_path, monkeypatch, capsys):
    """An install without the notebooks (as a wheel was before issue 25): one error, nothing run."""
    bare = tmp_path / "site-packages" / "vldlib" / "notebooks"
    monkeypatch.setattr(paths, "packaged_notebooks", lambda: bare)
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 00_quickstart.ipynb not found (no checkout") and str(bare) in err
    assert "installed without its notebooks" in err and not (tmp_path / "outputs").exists()


def test_a_path_the_user_gives_wins_and_a_shipped_name_works_from_any_folder(tmp_path, package, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.locate("notebooks/00_quickstart.gpu.yaml") == package / "00_quickstart.gpu.yaml"
    mine = tmp_path / "notebooks" / "00_quickstart.gpu.yaml"
    mine.parent.mkdir()
    mine.write_text("my copy")
    assert paths.locate("notebooks/00_quickstart.gpu.yaml").resolve() == mine  # as given, when it exists
    assert paths.locate("elsewhere/00_quickstart.gpu.yaml") == Path("elsewhere/00_quickstart.gpu.yaml")  # not a shipped name
    assert paths.locate("notebooks/nope.yaml") == Path("notebooks/nope.yaml")  # the caller says it is missing


def test_relative_paths_mean_the_current_folder_without_a_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.checkout_root() is None
    assert paths.resolve("outputs/quickstart") == tmp_path.resolve() / "outputs" / "quickstart"
    co = _fake_checkout(tmp_path / "clone", {})
    monkeypatch.chdir(co / "notebooks")  # Jupyter runs a notebook in its own folder
    assert paths.resolve("data") == co.resolve() / "data"


def test_only_the_installed_packages_own_notebooks_run_in_the_current_folder(tmp_path, package):
    """`sweep` runs a notebook in its own folder (as Jupyter does), except one inside the installed
    package: relative paths would land in site-packages."""
    assert paths.is_packaged(package / "00_quickstart.ipynb")
    mine = tmp_path / "mine.ipynb"
    mine.write_text("{}")
    assert not paths.is_packaged(mine)
    assert not paths.is_packaged(ROOT / "notebooks" / "00_quickstart.ipynb")


@pytest.mark.slow
def test_a_sweep_runs_a_packaged_notebook_in_the_current_folder(tmp_path, package, monkeypatch):
    """Named as the README writes it, from a folder with no checkout; it runs where the sweep was
    started, so a relative path in it lands there, not in the package's folder."""
    from vldlib.tools.sweep.execute import execute_job
    from vldlib.tools.sweep.runner import prepare

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("output_dir = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os, pathlib\npathlib.Path('made_here.txt').write_text(os.getcwd())")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, package / "tiny.ipynb")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    (job,) = prepare("notebooks/tiny.ipynb", None, here / "sweep")
    assert job.notebook == package / "tiny.ipynb"
    assert execute_job(job)["status"] == "done"
    assert (here / "made_here.txt").read_text() == str(here) and not (package / "made_here.txt").exists()


def test_this_checkout_and_its_editable_install_find_the_real_notebooks(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    assert paths.find_notebook("notebooks/00_quickstart.ipynb") == ROOT / "notebooks" / "00_quickstart.ipynb"
    assert [p.name for p in paths.shipped_files()] == SHIPPED
    monkeypatch.chdir(tmp_path)  # outside any checkout: the package's copy (for an editable install,
    found = paths.find_notebook("00_quickstart.ipynb")  # the notebooks of the checkout it points at)
    assert found.parent == paths.packaged_notebooks() and found.is_file()


def test_notebooks_command_copies_them_and_never_overwrites_without_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "mine" / "nbs"
    assert main(["notebooks", str(dest)]) == 0
    assert sorted(os.listdir(dest)) == SHIPPED and sorted(os.listdir(tmp_path)) == ["mine"]  # nothing else
    assert (dest / "00_quickstart.ipynb").read_bytes() == (ROOT / "notebooks" / "00_quickstart.ipynb").read_bytes()
    assert "notebooks and" in capsys.readouterr().out
    (dest / "00_quickstart.ipynb").write_text("my edits")
    assert main(["notebooks", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "already in" in err and "--force" in err and (dest / "00_quickstart.ipynb").read_text() == "my edits"
    assert main(["notebooks", str(dest), "--force"]) == 0
    assert (dest / "00_quickstart.ipynb").read_text() != "my edits"
    monkeypatch.chdir(ROOT)
    assert main(["notebooks", "notebooks", "--force"]) == 1  # onto themselves
    assert "where the notebooks are already" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert main(["notebooks", str(tmp_path / "afile")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err


def test_quickstart_config_names_a_shipped_parameter_file_from_any_folder(tmp_path, monkeypatch):
    from vldlib.experiments.quickstart import read_params_file

    monkeypatch.chdir(tmp_path)
    assert read_params_file("notebooks/00_quickstart.gpu.yaml")["augment"] is True


# --------------------------------------------------------------------------- declared dependencies

def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0]).lower() for r in reqs}


def test_every_module_vldlib_imports_is_a_declared_dependency():
    """`pip install vldlib` outside this environment gets only what pyproject.toml declares: a
    module imported but not declared works here and fails on Colab."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    provided = importlib.metadata.packages_distributions()
    missing = {}
    for f in sorted((ROOT / "vldlib").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"vldlib", "__future__"}:
                dists = _requirement_names(provided.get(top, [top]))
                if not dists & declared:
                    missing.setdefault(top, f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


# --------------------------------------------------------------------------- the wheel and the sdist

def _build(what: str, source: Path, out: Path) -> Path:
    """setuptools' own PEP 517 hook, without build isolation (no network): what `pip wheel .` and
    `python -m build` call."""
    code = f"from setuptools import build_meta as b; print(b.build_{what}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, f"build_{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist built from a copy of the checkout, and the wheel built from that sdist (so both are
    checked): nothing is written into the checkout."""
    try:
        version = importlib.metadata.version("setuptools")  # not imported: it would patch distutils here
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed in this environment: nothing to build the wheel with")
    if tuple(int(x) for x in version.split(".")[:2]) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {version} needs the `wheel` package to build wheels")
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    shutil.copytree(ROOT / "vldlib", src / "vldlib", ignore=ignore)
    shutil.copytree(ROOT / "notebooks", src / "notebooks", ignore=ignore)
    sdist = _build("sdist", src, tmp / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    return sdist, _build("wheel", unpacked, tmp / "dist")


@pytest.mark.slow
def test_the_sdist_and_the_wheel_ship_every_notebook_and_parameter_file(built):
    sdist, wheel = built
    with tarfile.open(sdist) as tar:
        in_sdist = {Path(n).name for n in tar.getnames() if Path(n).parent.name == "notebooks"}
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n[len("vldlib/notebooks/"):] for n in z.namelist() if n.startswith("vldlib/notebooks/")}
        assert not [n for n in z.namelist() if not n.startswith(("vldlib/", "vldlib-"))], "only vldlib at the top"
    assert in_sdist == set(SHIPPED) and in_wheel == set(SHIPPED)


def _venv_without_checkout(where: Path) -> Path:
    """A venv whose python sees this environment's dependencies (a .pth line naming its
    site-packages: the folder only, so this environment's editable vldlib, installed by a .pth hook
    there, stays off) and no checkout: what `pip install vldlib` gives, minus minutes of downloads."""
    done = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot create a venv here (python -m venv: {done.stderr.strip()[-300:]})")
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    shared = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "_vldlib_test_dependencies.pth").write_text("".join(f"{p}\n" for p in shared))
    return python


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "PYTHONNOUSERSITE": "1",
            "VIRTUAL_ENV": str(venv), "MPLBACKEND": "Agg"}


@pytest.mark.slow
def test_the_wheel_runs_the_quickstart_from_an_empty_folder_without_a_checkout(built, tmp_path):
    """The issue's case: `pip install` of the wheel, then `python -m vldlib quickstart` in a fresh
    folder renders the notebook (it stopped with "the quickstart runs from a checkout"), writes under
    ./outputs, and its console is quiet: one line per run and the summary (no figure reprs, no
    kernel warnings). About 40 s on 2 busy cores, most of it the kernel's start."""
    from conftest import make_fake_benchmark

    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment: nothing to install the wheel with")
    venv = tmp_path / "venv"
    python = _venv_without_checkout(venv)
    env = _clean_env(venv)
    _, wheel = built
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                          "--disable-pip-version-check", str(wheel)], env=env, capture_output=True, text=True)
    assert pip.returncode == 0, f"pip install {wheel.name} failed:\n{pip.stdout}\n{pip.stderr}"
    where = subprocess.run([str(python), "-c", "import vldlib, jupyter_client.kernelspec as k; print(vldlib.__file__); "
                            "m = k.KernelSpecManager(); print(m.get_kernel_spec('python3').argv[0])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(where[0]).is_relative_to(venv), f"vldlib imported from {where[0]}, not the wheel"
    assert where[1] in ("python", "python3", str(python)), f"the notebook's kernel would run {where[1]}"

    bench = make_fake_benchmark(tmp_path / "bench" / "fake", per_class=4)
    empty = tmp_path / "empty"
    empty.mkdir()
    params = {"benchmark": str(bench), "backbone": "test_resnet", "pretrained": "false", "resolution": 32,
              "steps": 2, "eval_every": 1, "batch_size": 4, "seeds": "[0]", "test_envs": "[0]", "parallel_runs": 1,
              "tuned_by": "None"}  # the shipped choices are for ObjectStyles (found, and refused for this design)
    cmd = [str(python), "-m", "vldlib", "quickstart", *(a for k, v in params.items() for a in ("--param", f"{k}={v}"))]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=480)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-5000:]
    out = empty / "outputs" / "quickstart-fake"  # relative outputs/: the current folder
    assert sorted(os.listdir(empty)) == ["outputs"] and (out / "summary.md").is_file()
    executed = nbformat.read(out / "00_quickstart.ipynb", as_version=4)
    assert Path(executed.metadata.papermill.input_path).is_relative_to(venv)  # the package's copy
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")  # rendered
    for noise in ("<Figure size", "<IPython.core.display", "Kernel is running over TCP", "leaked semaphore",
                  "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 and all(sum(r in line for line in console.splitlines()) == 1 for r in runs)
    assert console.count("# Quickstart summary") == 1
    print(f"wheel quickstart: {time.perf_counter() - t0:.0f} s")

    copies = tmp_path / "copies"
    subprocess.run([str(python), "-m", "vldlib", "notebooks", str(copies)], cwd=empty, env=env, check=True,
                   capture_output=True)
    assert sorted(os.listdir(copies)) == SHIPPED


# --------------------------------------------------------------------------- Colab and other hosted Jupyter

INSTALL_CELL_NOTEBOOKS = ["00_quickstart", "20_explorer", "30_teaching_dropout"]


def _repository() -> str:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _install_cell(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", INSTALL_CELL_NOTEBOOKS)
def test_the_install_cell_comes_first_and_installs_this_repository(name):
    """First code cell (papermill injects parameters after the `parameters` cell, so it must not be
    that one), the same in every notebook, installing the repository pyproject.toml names."""
    cell = _install_cell(name)
    assert "parameters" not in cell.metadata.get("tags", []) and "_vldlib_install_decision" in cell.source
    assert cell.source == _install_cell(INSTALL_CELL_NOTEBOOKS[0]).source
    assert f'_VLDLIB_SOURCE = "git+{_repository()}"' in cell.source


class _Pip:
    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)


@pytest.mark.parametrize("name", INSTALL_CELL_NOTEBOOKS)
@pytest.mark.parametrize("case", ["checkout", "installed elsewhere", "missing in a checkout", "missing"])
def test_the_install_cell_installs_only_where_vldlib_is_missing(name, case, tmp_path, monkeypatch, capsys):
    """The cell as committed, run in each case with pip and the import lookup stood in for: a
    checkout (this one, where the kernel imports vldlib), an installed vldlib in a folder with no
    checkout, a checkout whose kernel lacks vldlib (a hint, no second copy), and Colab (nothing: pip)."""
    import importlib.util as util

    pip = _Pip()
    monkeypatch.setattr(subprocess, "run", pip)
    real_find_spec = util.find_spec
    if case.startswith("missing"):
        monkeypatch.setattr(util, "find_spec", lambda n, *a: None if n == "vldlib" else real_find_spec(n, *a))
    folder = {"checkout": ROOT / "notebooks", "installed elsewhere": tmp_path,
              "missing in a checkout": _fake_checkout(tmp_path / "clone", {}) / "notebooks",
              "missing": tmp_path}[case]
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(_install_cell(name).source, f"{name} install cell", "exec"), namespace)
    if case == "missing":
        assert namespace["_decision"] == "install"
        assert pip.calls == [[sys.executable, "-m", "pip", "install", "-q", f"vldlib @ git+{_repository()}"]]
    else:
        assert pip.calls == [] and namespace["_decision"] == {"checkout": "installed", "installed elsewhere": "installed",
                                                             "missing in a checkout": "checkout"}[case]
    assert ("bash .ci/setup" in capsys.readouterr().out) == (case == "missing in a checkout")


def test_the_readmes_colab_links_open_notebooks_that_exist_with_install_cells():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"https://colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/([^/\s]+)/([^)\s]+)", readme)
    assert links, "the README has no Open in Colab link"
    for repo, branch, path in links:
        assert f"https://github.com/{repo}" == _repository(), f"a Colab link opens {repo}, not pyproject's Repository"
        assert branch == "main" and (ROOT / path).is_file(), f"a Colab link opens {path}, which does not exist"
    assert sorted(Path(p).stem for _, _, p in links) == INSTALL_CELL_NOTEBOOKS  # those with the install cell
