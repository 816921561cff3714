"""Batches of parameterized notebooks (papermill) that resume after a kill.

    python -m vldlib sweep notebooks/train.ipynb --grid grids/fig3.yaml --out runs/fig3 --jobs 2 --gpus 0,1

A grid YAML maps each notebook parameter to a value or a list of values; lists are axes and the
jobs are their product. A parameter whose *value* is a list is written as a one-element list of
that list (`layers: [[2, 3, 4]]`). A YAML list of such mappings concatenates their expansions:

    - {dataset: VLCS, test_env: [0, 1, 2, 3], dropout: [0.0, 0.9], lr: [1.0e-3, 5e-4]}
    - {dataset: PACS, test_env: 0, dropout: 0.9, lr: 1e-3}

Each parameter set gets the folder DIR/<varying params>-<hash> (the hash covers every parameter and
the notebook's file name, so it is the folder's identity; the readable part is cosmetic). The
notebook receives one extra parameter, `output_dir`, that folder, and writes its results there.
A folder holds `job.json` (what runs), `log.txt` (cell outputs), `executed.ipynb` and, written last,
`done` (params + wall time). Jobs with a `done` marker are skipped, so killing the sweep and starting
it again loses no finished work; delete `done` to force a job to run again. A failed run leaves
`failed.ipynb` (the executed notebook showing the traceback) and `error.json`; the next sweep re-runs
it. DIR/sweep.csv summarises every job; DIR/.sweep.lock keeps two sweeps out of the same DIR.

Launchers are plain objects (`LAUNCHERS`) with one method, `launch(jobs, on_result)`, so tests and
notebooks can hand `run_sweep` their own. DomainBed's sweep.py is the model for this design.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import yaml

from vldlib.utils import atomic_path, config_hash, write_json_atomic

Grid = Mapping[str, Any] | Sequence[Mapping[str, Any]]
OnResult = Callable[[dict[str, Any]], None]

RESERVED = "output_dir"  # set by the sweep for every job
NAME_MAX = 100  # readable part of a folder name; the hash keeps names unique anyway
KERNEL = "python3"
SUMMARY_COLUMNS = ["name", "status", "wall_s", "error", "notebook", "log", "out_dir"]


# --------------------------------------------------------------------------------------------
# Grids: YAML -> list of parameter dicts (pure)

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float: YAML 1.1 insists on `1.0e-3` and would hand the
    notebook the *string* '1e-3', a silent bug for every learning-rate grid."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
               |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
               re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A command-line value as YAML (`10` -> int, `1e-3` -> float, `[0, 1]` -> list, `x` -> 'x')."""
    return yaml.load(text, Loader=_Loader)


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
    return _as_grids(data, where=str(path))


def _as_grids(grid: Any, where: str = "grid") -> list[dict[str, Any]]:
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
    for g in _as_grids(grid):
        axes = [v if isinstance(v, list) else [v] for v in g.values()]
        out += [dict(zip(g.keys(), combo)) for combo in itertools.product(*axes)]
    return out


def apply_overrides(grid: Grid, overrides: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Set `overrides` in every grid mapping before expansion, so `--set steps=10` shrinks a whole
    sweep for a smoke run (and, being part of the params, sends it to different folders)."""
    return [{**g, **(overrides or {})} for g in _as_grids(grid)]


def parse_sets(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """`["steps=10", "lr=[1e-3]"]` -> `{"steps": 10, "lr": [0.001]}`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


# --------------------------------------------------------------------------------------------
# Jobs (pure)

@dataclasses.dataclass(frozen=True)
class Job:
    """One notebook run: its parameters (without `output_dir`) and where everything goes."""
    params: dict[str, Any]
    out_dir: Path
    name: str
    notebook: Path
    executed: Path  # the executed notebook of the finished run
    log: Path

    @property
    def done_path(self) -> Path:
        return self.out_dir / "done"

    @property
    def failed_path(self) -> Path:
        return self.out_dir / "failed.ipynb"

    @property
    def error_path(self) -> Path:
        return self.out_dir / "error.json"

    @property
    def hash(self) -> str:
        return self.name.rsplit("-", 1)[-1]


def _fmt(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def job_name(params: Mapping[str, Any], keys: Sequence[str], notebook: str | os.PathLike) -> str:
    """`test_env=0,dropout=0.9-3f2a9c1b0e`: the `keys` shown, then a hash of all params + notebook name.

    Characters outside [A-Za-z0-9._,=+-] become '_' so the name is safe on any file system and shell.
    """
    digest = config_hash({"notebook": Path(notebook).name, "params": dict(params)})
    readable = ",".join(f"{k}={_fmt(params[k])}" for k in keys if k in params)
    readable = re.sub(r"[^A-Za-z0-9._,=+-]", "_", readable)[:NAME_MAX].strip(",=.-") or Path(notebook).stem
    return f"{readable}-{digest}"


def plan_jobs(notebook: str | os.PathLike, grid_params: Sequence[Mapping[str, Any]],
              out_dir: str | os.PathLike) -> list[Job]:
    """The jobs for these parameter sets (from `expand_grid`), duplicates dropped, order kept.

    Folder names show the parameters that vary across the batch (all of them for a single job).
    """
    notebook, out_dir = Path(notebook), Path(out_dir)
    keys = list(dict.fromkeys(k for p in grid_params for k in p))
    varying = [k for k in keys if len({_fmt(p.get(k)) for p in grid_params}) > 1] or keys
    jobs: dict[str, Job] = {}
    for p in grid_params:
        name = job_name(p, varying, notebook)
        d = out_dir / name
        jobs.setdefault(name, Job(dict(p), d, name, notebook, d / "executed.ipynb", d / "log.txt"))
    return list(jobs.values())


def _adopt_existing(jobs: list[Job]) -> list[Job]:
    """Reuse a folder with the same hash but another readable part (the grid's axes changed)."""
    out = []
    for job in jobs:
        if not job.out_dir.exists():
            for d in sorted(job.out_dir.parent.glob(f"*-{job.hash}")):
                if d.is_dir():
                    job = dataclasses.replace(job, out_dir=d, name=d.name, executed=d / job.executed.name,
                                              log=d / job.log.name)
                    break
        out.append(job)
    return out


def check_params(notebook: Path, grid_params: Sequence[Mapping[str, Any]]) -> None:
    """Fail before launching anything if a grid key is not a parameter of the notebook (a typo
    would otherwise run the whole batch with the default value)."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    if not declared:
        raise ValueError(f"{notebook} has no cell tagged 'parameters' (or it assigns nothing); tag the "
                         f"cell holding the defaults (Jupyter: View > Cell Toolbar > Tags)")
    unknown = sorted({k for p in grid_params for k in p} - set(declared))
    if unknown:
        raise ValueError(f"{unknown} are not parameters of {notebook}; its parameters cell declares "
                         f"{sorted(declared)}. Fix the grid/--set keys or add them to that cell.")


# --------------------------------------------------------------------------------------------
# Running one job (in a worker process or a submitit task)

def _error_line(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # papermill.PapermillExecutionError: the notebook's own exception
        cell = getattr(exc, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (cell [{cell}])" if cell else "")
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def record(job: Job, status: str, wall_s: float | None = None, error: str = "",
           notebook: Path | None = None) -> dict[str, Any]:
    """One row of sweep.csv."""
    return {"name": job.name, "status": status, "wall_s": None if wall_s is None else round(wall_s, 2),
            "error": error, "notebook": str(notebook) if notebook else "", "log": str(job.log),
            "out_dir": str(job.out_dir), "params": job.params}


def execute_job(job: Job, kernel_name: str = KERNEL) -> dict[str, Any]:
    """Run the notebook of `job` to completion; write `done` last on success, evidence on failure.

    The notebook runs with cwd = its own folder (relative paths behave as in Jupyter) and is
    executed into a temporary file that is renamed into place, so `executed.ipynb` is never half a
    notebook. Returns the `record` of the run; never raises for a failing notebook.
    """
    import papermill

    out = job.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp.ipynb"):  # left by a killed run
        stale.unlink(missing_ok=True)
    job.error_path.unlink(missing_ok=True)
    tmp = out / f".executed.{os.getpid()}.tmp.ipynb"
    t0 = time.time()
    try:
        papermill.execute_notebook(str(job.notebook), str(tmp), parameters={**job.params, RESERVED: str(out)},
                                   cwd=str(job.notebook.parent), kernel_name=kernel_name,
                                   progress_bar=False, log_output=True)
    except Exception as e:  # noqa: BLE001 - any failure of the notebook is a failed job, reported
        wall = time.time() - t0
        shown = None
        if tmp.exists():
            os.replace(tmp, job.failed_path)
            shown = job.failed_path
        error = _error_line(e)
        write_json_atomic(job.error_path, {"error": error, "notebook": str(shown or ""), "wall_s": wall,
                                           "params": job.params, "host": socket.gethostname()})
        logging.getLogger("papermill").error("job %s failed: %s", job.name, error)
        return record(job, "failed", wall, error, shown)
    wall = time.time() - t0
    os.replace(tmp, job.executed)
    job.failed_path.unlink(missing_ok=True)  # the folder describes the latest run only
    write_json_atomic(job.done_path, {"params": job.params, "wall_s": wall, "notebook": str(job.notebook),
                                      "executed": str(job.executed), "host": socket.gethostname(),
                                      "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return record(job, "done", wall, notebook=job.executed)


def _job_to_json(job: Job, kernel_name: str) -> dict[str, Any]:
    return {"params": job.params, "out_dir": str(job.out_dir), "name": job.name, "notebook": str(job.notebook),
            "executed": str(job.executed), "log": str(job.log), "kernel_name": kernel_name}


def _job_from_json(d: Mapping[str, Any]) -> Job:
    return Job(dict(d["params"]), Path(d["out_dir"]), d["name"], Path(d["notebook"]), Path(d["executed"]),
               Path(d["log"]))


def _children(pid: int) -> list[int]:
    """Child PIDs of `pid`, from /proc (Linux); empty elsewhere."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            kids.append(int(stat.parent.name))
    return kids


def _die(*_: Any) -> None:
    """Stop this worker *and its kernel* at once. The kernel runs in its own session and would
    only notice its parent's death a second later, time enough to finish a cell whose side
    effects a restart would then repeat."""
    for kid in _children(os.getpid()):
        for kill in (os.killpg, os.kill):  # the kernel leads its own process group
            try:
                kill(kid, signal.SIGKILL)
            except OSError:
                pass
    os._exit(143)


def _watch_parent() -> None:
    """Die with the sweep, even a `kill -9`ed one: a restart must not run a job beside its orphan."""
    parent = os.getppid()

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        _die()

    threading.Thread(target=loop, daemon=True).start()


def _worker_main(job_json: str) -> int:
    """Entry point of a local worker process: `python -m vldlib.sweep JOBDIR/job.json`."""
    signal.signal(signal.SIGTERM, _die)  # how the sweep stops its workers on Ctrl-C / kill
    _watch_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    spec = json.loads(Path(job_json).read_text())
    job = _job_from_json(spec)
    print(f"vldlib sweep job {job.name}: pid {os.getpid()} on {socket.gethostname()}, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", file=sys.stderr, flush=True)
    return 0 if execute_job(job, spec.get("kernel_name", KERNEL))["status"] == "done" else 1


def _submitit_entry(job: Job, kernel_name: str) -> dict[str, Any]:
    """What a SLURM task runs: the same `execute_job`, with cell outputs logged to the job's log.txt."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(job.log, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("papermill")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return execute_job(job, kernel_name)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _env_with_vldlib(env: Mapping[str, str]) -> dict[str, str]:
    """Workers and kernels import vldlib even when it is not pip-installed."""
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join([root] + [p for p in parts if p != root])}


# --------------------------------------------------------------------------------------------
# Launchers

class Launcher(Protocol):
    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        """Run `jobs`, calling `on_result(record)` as each one ends; on KeyboardInterrupt, stop them."""


class DummyLauncher:
    """Runs nothing; remembers what it was asked to launch (tests, and a look at the plan)."""

    def __init__(self, **_: Any) -> None:
        self.launched: list[Job] = []

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        for job in jobs:
            self.launched.append(job)
            on_result(record(job, "not run"))


class LocalLauncher:
    """`jobs` worker processes on this machine; with `gpus`, each job sees one GPU.

    GPUs are handed out round-robin to the job slots (`--gpus 0,1 --jobs 4` puts two jobs on each
    GPU). Each worker runs in its own session, so Ctrl-C reaches only the sweep, which then stops
    the workers itself; workers inherit the sweep lock, so a restart waits until they are gone.
    """

    def __init__(self, jobs: int = 1, gpus: Sequence[str] | None = None, kernel_name: str = KERNEL,
                 lock_fd: int | None = None, poll_s: float = 0.2, **_: Any) -> None:
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        gpus = [str(g) for g in gpus or []]
        self.slots: list[str | None] = [gpus[i % len(gpus)] for i in range(jobs)] if gpus else [None] * jobs
        self.kernel_name, self.lock_fd, self.poll_s = kernel_name, lock_fd, poll_s

    def _start(self, job: Job, gpu: str | None) -> subprocess.Popen:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        spec = job.out_dir / "job.json"
        write_json_atomic(spec, _job_to_json(job, self.kernel_name))
        job.error_path.unlink(missing_ok=True)
        env = _env_with_vldlib(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(job.log, "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "vldlib.sweep", str(spec)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    pass_fds=(self.lock_fd,) if self.lock_fd is not None else ())

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        pending = list(reversed(jobs))
        free = list(reversed(self.slots))
        running: dict[subprocess.Popen, tuple[Job, str | None, float]] = {}
        try:
            while pending or running:
                while pending and free:
                    job, gpu = pending.pop(), free.pop()
                    running[self._start(job, gpu)] = (job, gpu, time.time())
                time.sleep(self.poll_s)
                for proc in [p for p in running if p.poll() is not None]:
                    job, gpu, t0 = running.pop(proc)
                    free.append(gpu)
                    on_result(_read_outcome(job, proc.returncode, time.time() - t0))
        finally:
            _stop(running)
            for proc, (job, _, t0) in running.items():  # empty unless interrupted
                done = job.done_path.exists()
                on_result(_read_outcome(job, proc.returncode, 0) if done else record(job, "interrupted"))


def _stop(running: Mapping[subprocess.Popen, Any], grace_s: float = 5.0) -> None:
    for proc in running:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace_s
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _read_outcome(job: Job, returncode: int, wall_s: float) -> dict[str, Any]:
    """The record of a finished worker, from the files it left (the only channel that survives)."""
    if job.done_path.exists():
        done = json.loads(job.done_path.read_text())
        return record(job, "done", done.get("wall_s", wall_s), notebook=job.executed)
    if job.error_path.exists():
        err = json.loads(job.error_path.read_text())
        return record(job, "failed", err.get("wall_s", wall_s), err["error"],
                      Path(err["notebook"]) if err.get("notebook") else None)
    return record(job, "failed", wall_s, f"worker exited with code {returncode} before the notebook "
                  f"finished; see {job.log}")


class SlurmLauncher:
    """One SLURM array of jobs through submitit; each task runs `execute_job` on its node.

    Options map to submitit's: `partition`, `time` (minutes, default 24 h: submitit's own default
    is 5 min), `gpus_per_node`, `cpus`, `mem` (GB), and `slurm_opt` (raw sbatch options such as
    {"account": "abc", "constraint": "volta32gb"}). `cluster="local"` runs the same path through
    submitit's local executor, which is how it is tested. Interrupting the sweep cancels the
    tasks it submitted.
    """

    def __init__(self, jobs: int = 1, gpus: Sequence[str] | None = None, kernel_name: str = KERNEL,
                 partition: str | None = None, time: int = 24 * 60, gpus_per_node: int | None = None,
                 cpus: int | None = None, mem: float | None = None, slurm_opt: Mapping[str, Any] | None = None,
                 cluster: str = "slurm", folder: str | os.PathLike | None = None, poll_s: float | None = None,
                 **_: Any) -> None:
        if gpus:
            raise ValueError("--gpus hands local GPUs to local jobs; with --launcher slurm ask for "
                             "--gpus-per-node N and SLURM sets CUDA_VISIBLE_DEVICES itself")
        self.kernel_name, self.cluster, self.folder = kernel_name, cluster, folder
        self.poll_s = poll_s if poll_s is not None else (15.0 if cluster == "slurm" else 0.5)
        self.params = {"timeout_min": int(time), "gpus_per_node": gpus_per_node, "cpus_per_task": cpus,
                       "mem_gb": mem, "slurm_partition": partition,
                       "slurm_additional_parameters": dict(slurm_opt) if slurm_opt else None,
                       "slurm_array_parallelism": jobs if jobs > 1 else None}

    def launch(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        import submitit

        if not jobs:
            return
        if self.cluster == "slurm" and submitit.AutoExecutor.which() != "slurm":
            raise RuntimeError("--launcher slurm: no SLURM cluster found (sbatch is not on PATH); run on the "
                               "login node, or use --launcher local (or --slurm-cluster local to try the path)")
        folder = Path(self.folder) if self.folder else jobs[0].out_dir.parent / ".submitit"
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=self.cluster)
        executor.update_parameters(name="vldlib-sweep", **{k: v for k, v in self.params.items() if v is not None})
        old_env = dict(os.environ)
        os.environ.update(_env_with_vldlib(os.environ))  # sbatch and the local executor copy our env
        try:
            with executor.batch():
                futures = [executor.submit(_submitit_entry, job, self.kernel_name) for job in jobs]
        finally:
            os.environ.clear()
            os.environ.update(old_env)
        running = dict(zip(futures, jobs))
        try:
            while running:
                time.sleep(self.poll_s)
                for fut in [f for f in running if f.done()]:
                    job = running.pop(fut)
                    try:
                        on_result(fut.result())
                    except Exception as e:  # noqa: BLE001 - the task died (timeout, node failure, ...)
                        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                        error = f"{type(e).__name__}: {lines[-1] if lines else ''}"  # the trace's last line
                        on_result(record(job, "failed", None, error, Path(fut.paths.stderr)))
        finally:
            for fut, job in running.items():
                fut.cancel(check=False)
                on_result(record(job, "interrupted"))


LAUNCHERS: dict[str, Callable[..., Launcher]] = {"local": LocalLauncher, "slurm": SlurmLauncher,
                                                 "dummy": DummyLauncher}


# --------------------------------------------------------------------------------------------
# The lock

class SweepLockedError(RuntimeError):
    pass


class SweepLock:
    """Exclusive `fcntl.flock` on DIR/.sweep.lock, released by the kernel when its holders exit.

    Workers inherit the lock, so if the sweep itself was killed (-9), a restart waits up to
    `wait_s` for its dying workers rather than running their jobs a second time beside them.
    """

    def __init__(self, out_dir: str | os.PathLike, wait_s: float = 30.0) -> None:
        self.path = Path(out_dir) / ".sweep.lock"
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        unsigned_until = time.time() + 2.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                info = dict(kv.split("=", 1) for kv in holder.split("\n") if "=" in kv)
                if not info and time.time() < unsigned_until:  # a sweep started at the same moment:
                    time.sleep(0.05)  # it holds the lock but has not written its PID yet
                    continue
                if _alive(info) or (deadline is not None and time.time() > deadline):
                    os.close(fd)
                    pid = info.get("pid", "?")
                    raise SweepLockedError(
                        f"another sweep holds {self.path} (PID {pid} on {info.get('host', '?')}, started "
                        f"{info.get('started', '?')}: {info.get('command', '?')}). Wait for it to finish or "
                        f"stop it (kill {pid}); the lock frees itself when that process and its jobs exit.")
                deadline = deadline or time.time() + self.wait_s  # holder died: its workers are exiting
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                       f"started={time.strftime('%Y-%m-%dT%H:%M:%S')}\ncommand={' '.join(sys.argv)}\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _alive(info: Mapping[str, str]) -> bool:
    """Whether the sweep that wrote the lock still runs (assumed so on another host or if unknown)."""
    if info.get("host") != socket.gethostname() or not info.get("pid", "").isdigit():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# The runner

def _summary(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd

    flat = []
    for r in rows:
        row = {k: r[k] for k in SUMMARY_COLUMNS}
        for k, v in r["params"].items():
            row[f"param.{k}" if k in SUMMARY_COLUMNS else k] = _fmt(v) if isinstance(v, (list, dict)) else v
        flat.append(row)
    return pd.DataFrame(flat, columns=None if flat else SUMMARY_COLUMNS)


def _write_summary(df, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _previous(job: Job) -> dict[str, Any]:
    if job.done_path.exists():
        try:
            wall = json.loads(job.done_path.read_text()).get("wall_s")
        except (json.JSONDecodeError, OSError):
            wall = None
        return record(job, "skipped", wall, notebook=job.executed)
    return record(job, "not run")


def prepare(notebook: str | os.PathLike, grid: Grid | str | os.PathLike | None, out_dir: str | os.PathLike,
            overrides: Mapping[str, Any] | None = None) -> list[Job]:
    """Grid (mapping, list or YAML path) + overrides -> validated jobs, reusing existing folders."""
    notebook = Path(notebook).resolve()
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist")
    grids = load_grid(grid) if isinstance(grid, (str, os.PathLike)) else _as_grids(grid)
    if overrides and RESERVED in overrides:
        raise ValueError(f"'{RESERVED}' is set by the sweep for each job; use --out to place the runs")
    params = expand_grid(apply_overrides(grids, overrides))
    check_params(notebook, params)
    return _adopt_existing(plan_jobs(notebook, params, Path(out_dir).resolve()))


def run_sweep(notebook: str | os.PathLike, grid: Grid | str | os.PathLike | None, out_dir: str | os.PathLike, *,
              launcher: str | Launcher = "local", jobs: int = 1, gpus: Sequence[str] | None = None,
              overrides: Mapping[str, Any] | None = None, progress: bool = True, kernel_name: str = KERNEL,
              launcher_options: Mapping[str, Any] | None = None):
    """Run every unfinished job of the grid; return the summary DataFrame (also DIR/sweep.csv).

    `grid` is a mapping, a list of mappings or a YAML path. Statuses: done (ran now), skipped
    (finished earlier), failed, interrupted, not run. Example, from a notebook:

        df = run_sweep("notebooks/train.ipynb", {"dropout": [0.0, 0.9], "steps": 20}, "runs/smoke", jobs=2)
        df[df.status == "failed"][["name", "error", "notebook"]]
    """
    from tqdm.auto import tqdm

    planned = prepare(notebook, grid, out_dir, overrides)
    out_dir = Path(out_dir).resolve()
    summary_path = out_dir / "sweep.csv"
    with SweepLock(out_dir) as lock:
        planned = _adopt_existing(planned)  # again, now that no one else can create folders
        rows = {j.name: _previous(j) for j in planned}
        todo = [j for j in planned if rows[j.name]["status"] != "skipped"]
        if isinstance(launcher, str):
            if launcher not in LAUNCHERS:
                raise ValueError(f"unknown launcher {launcher!r}; choose one of {sorted(LAUNCHERS)}")
            launcher = LAUNCHERS[launcher](jobs=jobs, gpus=gpus, kernel_name=kernel_name, lock_fd=lock.fd,
                                           **dict(launcher_options or {}))
        bar = tqdm(total=len(planned), initial=len(planned) - len(todo), desc=f"sweep {out_dir.name}",
                   unit="job", disable=not progress)
        failed = 0

        def on_result(rec: dict[str, Any]) -> None:
            nonlocal failed
            rows[rec["name"]] = rec
            failed += rec["status"] == "failed"
            bar.update(int(rec["status"] in ("done", "failed")))
            bar.set_postfix(failed=failed, refresh=True)
            _write_summary(_summary(list(rows.values())), summary_path)

        try:
            _write_summary(_summary(list(rows.values())), summary_path)
            launcher.launch(todo, on_result)
        finally:
            bar.close()
            _write_summary(_summary(list(rows.values())), summary_path)
    return _summary(list(rows.values()))


def failure_table(df) -> str:
    """The failures of a summary as text: name, error line, notebook that shows the error."""
    bad = df[df.status.isin(["failed", "interrupted"])][["name", "status", "error", "notebook"]]
    if bad.empty:
        return ""
    import pandas as pd

    with pd.option_context("display.max_colwidth", 200, "display.width", 250):
        return bad.to_string(index=False)


# --------------------------------------------------------------------------------------------
# CLI

def _cmd(args: argparse.Namespace) -> int:
    overrides = parse_sets(args.set or [])
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    jobs = args.jobs if args.jobs is not None else (len(gpus) if gpus else 1)
    if args.dry_run:
        planned = prepare(args.notebook, args.grid, args.out, overrides)
        for job in planned:
            print(f"{'done' if job.done_path.exists() else 'todo'}  {job.out_dir}")
        print(f"{len(planned)} jobs, {sum(not j.done_path.exists() for j in planned)} to run "
              f"({args.launcher} launcher, {jobs} at a time)")
        return 0
    options = {"partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_node,
               "cpus": args.cpus, "mem": args.mem, "slurm_opt": parse_sets(args.slurm_opt or [], "--slurm-opt"),
               "cluster": args.slurm_cluster} if args.launcher == "slurm" else {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops workers cleanly, like Ctrl-C
    try:
        df = run_sweep(args.notebook, args.grid, args.out, launcher=args.launcher, jobs=jobs, gpus=gpus,
                       overrides=overrides, kernel_name=args.kernel,
                       launcher_options={k: v for k, v in options.items() if v is not None})
    except (SweepLockedError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    counts = df.status.value_counts().to_dict()
    print(f"{len(df)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f". Summary: {Path(args.out).resolve() / 'sweep.csv'}")
    table = failure_table(df)
    if table:
        print("failures (open the notebook to see the traceback; run the same command again to retry):")
        print(table)
        return 1
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a notebook over a grid of parameters (resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook", help="notebook with a cell tagged 'parameters'")
    p.add_argument("--grid", help="YAML grid (parameter -> value or list); none = run the notebook once")
    p.add_argument("--out", required=True, help="output folder: one sub-folder per job, sweep.csv, lock")
    p.add_argument("--launcher", default="local", choices=sorted(LAUNCHERS))
    p.add_argument("--jobs", type=int, default=None, help="jobs at a time (default: number of --gpus, else 1)")
    p.add_argument("--gpus", help="comma-separated GPU ids handed one per job via CUDA_VISIBLE_DEVICES")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and whether each is done; run nothing")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter in every job "
                   "(YAML value; a list becomes an axis); repeatable")
    p.add_argument("--kernel", default=KERNEL, help="Jupyter kernel name (default: %(default)s)")
    s = p.add_argument_group("slurm launcher (submitit)")
    s.add_argument("--partition")
    s.add_argument("--time", type=int, default=None, help="minutes per job (default 1440)")
    s.add_argument("--gpus-per-node", type=int, default=None)
    s.add_argument("--cpus", type=int, default=None, help="CPUs per task")
    s.add_argument("--mem", type=float, default=None, help="GB per task")
    s.add_argument("--slurm-opt", action="append", metavar="KEY=VALUE", help="raw sbatch option; repeatable")
    s.add_argument("--slurm-cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit executor; 'local' tries the path without SLURM")
    p.set_defaults(func=_cmd)


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1]))
