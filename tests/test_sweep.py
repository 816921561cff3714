"""vldlib.tools.sweep: grid expansion and naming (pure), then real papermill runs of a tiny notebook.

Each kernel start costs ~2-3 s, so the notebook runs are few and share what they can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from vldlib.tools import sweep
from vldlib.tools.sweep import SweepLock, expand_grid, job_name, plan_jobs, run_sweep
from vldlib.tools.sweep import slurm as sweep_slurm
from vldlib.tools.sweep.jobs import write_spec
from vldlib.utils import current_umask, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent

BODY = """\
import json, os, pathlib, time
time.sleep(sleep)
while hold and os.path.exists(hold):  # lets a test kill the sweep while this job runs
    time.sleep(0.05)
if fail_if_exists and os.path.exists(fail_if_exists):
    raise RuntimeError("asked to fail: " + fail_if_exists)
gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
pathlib.Path(output_dir, "result.json").write_text(json.dumps({"a": a, "b": b, "gpu": gpu}))
with open(os.path.join(os.path.dirname(output_dir), "runs.txt"), "a") as f:
    f.write(os.path.basename(output_dir) + "\\n")
"""


def make_notebook(path: Path) -> Path:
    """Parameters a, b, sleep, hold, fail_if_exists; writes result.json and appends its name to DIR/runs.txt."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('a = 1\nb = "x"\nsleep = 0.0\nhold = ""\nfail_if_exists = ""\noutput_dir = "."')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"), params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def runs(out: Path) -> list[str]:
    f = out / "runs.txt"
    return f.read_text().split() if f.exists() else []


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vldlib", "sweep", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# ----------------------------------------------------------------------------------- pure

def test_expand_grid_axes_scalars_lists_and_concatenation():
    assert expand_grid({"a": [1, 2], "b": "x", "c": [[3, 4]]}) == [
        {"a": 1, "b": "x", "c": [3, 4]}, {"a": 2, "b": "x", "c": [3, 4]}]
    assert expand_grid([{"a": [1, 2]}, {"a": 3, "b": [4, 5]}]) == [
        {"a": 1}, {"a": 2}, {"a": 3, "b": 4}, {"a": 3, "b": 5}]
    assert expand_grid({"a": [1, 2], "b": [3, 4]})[1] == {"a": 1, "b": 4}  # last key varies fastest
    assert expand_grid(None) == [{}]
    with pytest.raises(ValueError, match="'lr' is an empty list"):
        expand_grid({"lr": []})
    with pytest.raises(ValueError, match="output_dir"):
        expand_grid({"output_dir": "x"})
    with pytest.raises(ValueError, match="mapping"):
        expand_grid("lr=1")


def test_yaml_reads_scientific_notation_as_float(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("- {lr: [1e-3, 5.0e-4], steps: 10}\n- {lr: 2E-2}\n")
    assert expand_grid(sweep.load_grid(g)) == [{"lr": 1e-3, "steps": 10}, {"lr": 5e-4, "steps": 10}, {"lr": 0.02}]
    assert sweep.parse_sets(["lr=1e-3", "env=[0, 1]", "name=abc", "tuned_by=None", "x=null"]) == {
        "lr": 1e-3, "env": [0, 1], "name": "abc", "tuned_by": None, "x": None}
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_sets(["lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        sweep.load_grid(tmp_path / "nope.yaml")


def test_names_are_readable_safe_unique_and_stable(tmp_path):
    params = expand_grid({"test_env": [0, 1], "dropout": 0.9, "tag": "a/b c", "lr": [1e-3]})
    jobs = plan_jobs("nb/train.ipynb", params, tmp_path)
    assert [j.name.rsplit("-", 1)[0] for j in jobs] == ["test_env=0", "test_env=1"]  # only varying keys
    assert jobs[0].out_dir == tmp_path / jobs[0].name and jobs[0].executed.parent == jobs[0].out_dir
    again = plan_jobs("elsewhere/train.ipynb", list(reversed(params)), tmp_path)
    assert {j.name for j in again} == {j.name for j in jobs}  # order- and location-independent
    name = job_name({"tag": "a/b c", "v": [1, 2]}, ["tag", "v"], "x.ipynb")
    assert name.startswith("tag=a_b_c,v=_1,2_-") and len(name.rsplit("-", 1)[1]) == 10
    long = job_name({"k": "z" * 500}, ["k"], "x.ipynb")
    assert len(long) <= sweep.NAME_MAX + 11
    assert len(plan_jobs("x.ipynb", [{"a": 1}, {"a": 1}], tmp_path)) == 1  # duplicates dropped
    assert plan_jobs("x.ipynb", [{}], tmp_path)[0].name.startswith("x-")  # no params: notebook stem


def test_dummy_launcher_and_unknown_parameter(tmp_path):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    dummy = sweep.DummyLauncher()
    df = run_sweep(nb, {"a": [1, 2, 3]}, tmp_path / "out", launcher=dummy, progress=False)
    assert len(dummy.launched) == 3 and set(df.status) == {"not run"} and list(df.a) == [1, 2, 3]
    assert (tmp_path / "out" / "sweep.csv").exists()
    with pytest.raises(ValueError, match="'aa'.*tiny.ipynb"):
        run_sweep(nb, {"aa": [1]}, tmp_path / "out", launcher=dummy, progress=False)


def test_lock_is_exclusive_and_names_holder(tmp_path):
    with SweepLock(tmp_path):
        with pytest.raises(sweep.SweepLockedError, match=rf"\.sweep\.lock.*PID {os.getpid()}"):
            with SweepLock(tmp_path):
                pass
    with SweepLock(tmp_path):  # released
        pass


# ----------------------------------------------------------------------------------- notebook runs

def test_local_sweep_runs_reports_failure_and_resumes(tmp_path):
    """A 4-job sweep, 2 at a time, where one job raises; then a re-run executes only that one."""
    nb = make_notebook(tmp_path / "tiny.ipynb")
    out, flag = tmp_path / "out", tmp_path / "fail-now"
    flag.touch()
    grid = [{"a": [1, 2, 3], "b": ["x"]}, {"a": 4, "fail_if_exists": str(flag)}]
    t0 = time.time()
    df = run_sweep(nb, grid, out, jobs=2, gpus=["5", "6"], progress=False)  # fake ids: nothing uses CUDA
    print(f"4-job sweep, 2 at a time: {time.time() - t0:.1f} s")
    assert list(df.status) == ["done"] * 3 + ["failed"], df.to_string()
    gpus = set()
    for row in df.iloc[:3].itertuples():
        job_dir = Path(row.out_dir)
        result = json.loads((job_dir / "result.json").read_text())
        assert (result["a"], result["b"]) == (row.a, row.b)
        done = json.loads((job_dir / "done").read_text())
        assert done["params"] == {"a": row.a, "b": row.b} and done["wall_s"] > 0
        assert done["gpu"] == result["gpu"]  # the kernel inherits the worker's CUDA_VISIBLE_DEVICES
        gpus.add(result["gpu"])
        assert Path(row.notebook) == job_dir / "executed.ipynb"
        executed = nbformat.read(row.notebook, as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
        assert "Executing Cell" in (job_dir / "log.txt").read_text()
        for written in (job_dir / "done", job_dir / "job.json", out / "sweep.csv"):  # atomic writes: umask, not 0600
            assert written.stat().st_mode & 0o777 == 0o666 & ~current_umask(), written
    assert gpus == {"5", "6"}
    bad = df.iloc[3]
    assert "RuntimeError: asked to fail" in bad.error
    assert Path(bad.notebook) == Path(bad.out_dir) / "failed.ipynb"
    assert "asked to fail" in Path(bad.notebook).read_text()  # the traceback is in the executed notebook
    assert not (Path(bad.out_dir) / "done").exists()
    table = sweep.failure_table(df)
    assert bad["name"] in table and "failed.ipynb" in table and df.name[0] not in table
    assert sorted(runs(out)) == sorted(df.name[:3])
    assert not list(out.rglob("*.tmp*"))
    csv = (out / "sweep.csv").read_text()
    assert csv.startswith("name,status,state,reason,job_id,elapsed_s,wall_s,error,notebook,log,out_dir,a,b,"
                          "fail_if_exists")
    stamps = {p: p.stat().st_mtime for p in out.glob("*/done")}

    flag.unlink()  # "fix" the notebook: the re-run executes only the failed job
    df2 = run_sweep(nb, grid, out, jobs=2, progress=False)
    assert list(df2.status) == ["skipped"] * 3 + ["done"]
    assert {p: p.stat().st_mtime for p in out.glob("*/done") if p in stamps} == stamps
    assert sorted(runs(out)) == sorted(df.name)  # every job completed exactly once
    assert not (Path(bad.out_dir) / "failed.ipynb").exists() and not (Path(bad.out_dir) / "error.json").exists()
    assert (out / "sweep.csv").read_text().count("skipped") == 3

    # another grid over the same DIR: old folders are reused although their readable names differ
    df3 = run_sweep(nb, {"a": [1, 2, 5], "b": "x"}, out, launcher="dummy", progress=False)
    assert list(df3.status) == ["skipped", "skipped", "not run"]
    assert df.name[0].startswith("a=1,b=x-") and df3.name[0] == df.name[0] and df3.name[2].startswith("a=5-")


def _parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    sweep.register_cli(parser.add_subparsers())
    return parser.parse_args(["sweep", *argv])


def test_cli_kill_restart_runs_every_job_once_and_lock_refuses_second(tmp_path, capsys):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()  # job a=2 waits while this file exists
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"- {{a: 1}}\n- {{a: 2, hold: '{hold}'}}\n")
    args = [str(nb), "--grid", str(grid), "--out", str(out)]
    first = cli(*args)
    try:
        deadline = time.time() + 90
        while len(list(out.glob("*/job.json"))) < 2:  # job 1 done, job 2 started
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the sweep never reached its second job"
            time.sleep(0.1)
        second = _parse(*args)  # a concurrent sweep on the same DIR (in-process: no 2nd torch import)
        assert second.func(second) == 1  # another sweep holds the folder: a failure, not bad usage
        err = capsys.readouterr().err
        assert ".sweep.lock" in err and f"PID {first.pid}" in err, err
        first.send_signal(signal.SIGKILL)  # the harshest kill: the sweep itself cleans up nothing
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    hold.unlink()  # a job that survived the kill would now finish and show up twice in runs.txt

    args_ns = _parse(*args, "--dry-run")
    assert args_ns.func(args_ns) == 0
    assert "2 jobs, 1 to run" in capsys.readouterr().out
    restart = subprocess.run([sys.executable, "-m", "vldlib", "sweep", *args], cwd=ROOT, text=True,
                             capture_output=True, timeout=120)
    assert restart.returncode == 0, restart.stderr
    # Normally the killed sweep's worker stops its kernel at once and the restart runs the job.
    # On a starved machine the kernel may finish that cell first; the restart then waits for the
    # worker (it still holds the lock) and skips the job. Either way it ran exactly once (below).
    assert ("2 jobs: 1 skipped, 1 done" in restart.stdout or "2 jobs: 2 skipped" in restart.stdout), restart.stdout
    done_names = sorted(p.parent.name for p in out.glob("*/done"))
    assert len(done_names) == 2 and sorted(runs(out)) == done_names  # each job completed exactly once


def test_cli_bad_input_names_the_problem(tmp_path, capsys):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    ns = _parse(str(nb), "--out", str(tmp_path / "o"), "--set", "nope=1")
    assert ns.func(ns) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "tiny.ipynb" in err and "parameters" in err
    ns = _parse(str(nb), "--out", str(tmp_path / "o"), "--grid", str(tmp_path / "missing.yaml"))
    assert ns.func(ns) == 1 and "missing.yaml" in capsys.readouterr().err  # a missing file: 1


def test_submitit_local_executor(tmp_path):
    nb = make_notebook(tmp_path / "tiny.ipynb")
    out = tmp_path / "out"
    t0 = time.time()
    df = run_sweep(nb, {"a": [1, 2]}, out, launcher="slurm", jobs=2, progress=False,
                   launcher_options={"cluster": "local", "time": 5})
    print(f"2 jobs through submitit's local executor: {time.time() - t0:.1f} s")
    assert list(df.status) == ["done", "done"], df.to_string()
    assert sorted(runs(out)) == sorted(df.name)
    assert all("Executing Cell" in (Path(d) / "log.txt").read_text() for d in df.out_dir)
    for row in df.itertuples():  # traceability: job id, state, job.json naming the logs, links to them
        spec = json.loads((Path(row.out_dir) / "job.json").read_text())
        assert spec["slurm"]["job_id"] == str(row.job_id) and row.state == "FINISHED"
        assert (Path(row.out_dir) / "slurm.err").resolve() == Path(spec["slurm"]["stderr"]).resolve()
    assert set(json.loads((out / "slurm_jobs.json").read_text())) == set(df.name)
    assert (out / "slurm-logs").is_dir()


# ----------------------------------------------------------------------------------- SLURM logic (no SLURM)

def test_slurm_task_gone_without_result_is_failed_with_its_state(tmp_path, monkeypatch):
    """squeue first shows both tasks, then neither: the one with `done` is done, the other failed
    with the state SLURM remembers, an error.json naming it and the log (never a wait forever)."""
    jobs = plan_jobs(tmp_path / "x.ipynb", [{"a": 1}, {"a": 2}], tmp_path / "out")
    for j in jobs:
        j.out_dir.mkdir(parents=True)
    write_json_atomic(jobs[0].done_path, {"wall_s": 3.0})
    answers = iter([{"7_0": sweep_slurm.TaskState("RUNNING"), "7_1": sweep_slurm.TaskState("PENDING", "Priority")},
                    {}])
    monkeypatch.setattr(sweep_slurm, "queue_states", lambda: next(answers))
    ended = {"7_0": sweep_slurm.TaskState("COMPLETED", "", 4.0), "7_1": sweep_slurm.TaskState("OUT_OF_MEMORY", "", 9.0)}
    monkeypatch.setattr(sweep_slurm, "ended_state", ended.__getitem__)
    launcher = sweep_slurm.SlurmLauncher(poll_s=0)
    launcher.settle_s = 0
    seen = []
    entries = {j.name: (j, {"job_id": f"7_{i}", "stderr": f"/logs/7_{i}.err", "stdout": "/logs/o"})
               for i, j in enumerate(jobs)}
    launcher._watch(entries, seen.append)
    assert [(r["status"], r["state"]) for r in seen] == [("running", "RUNNING"), ("pending", "PENDING"),
                                                         ("done", "COMPLETED"), ("failed", "OUT_OF_MEMORY")]
    assert (seen[1]["reason"], seen[1]["error"]) == ("Priority", "")  # why it pends is no error
    assert seen[2]["wall_s"] == 3.0 and seen[3]["elapsed_s"] == 9.0
    err = json.loads(jobs[1].error_path.read_text())
    assert err["state"] == "OUT_OF_MEMORY" and err["log"] == "/logs/7_1.err" and "/logs/7_1.err" in seen[3]["error"]


def _fake_slurm(bin_dir: Path, squeue_lines: list[str] | None) -> None:
    """squeue on PATH that prints these lines, or, with None, fails as when slurmctld is down (so do
    scontrol and sacct, always: nothing may be concluded from them here)."""
    bin_dir.mkdir(exist_ok=True)
    for tool in ("squeue", "scontrol", "sacct"):
        if tool == "squeue" and squeue_lines is not None:
            body = "printf '%s\\n' " + " ".join(f"'{line}'" for line in squeue_lines)
        else:
            body = "echo 'Unable to contact slurm controller (connect failure)' >&2; exit 1"
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)


def test_status_without_a_controller_shows_last_known_states_and_fails(tmp_path, monkeypatch, capsys):
    """slurmctld down: `--status` says so, shows each unfinished task's last known state and its age,
    and exits 1; neither a running task (`not run`) nor a requeued one whose killed kernel left an
    error.json (`failed`) is guessed. The done job is still done."""
    jobs = plan_jobs(tmp_path / "x.ipynb", [{"a": 1}, {"a": 2}, {"a": 3}], tmp_path / "out")
    registry = {}
    for i, j in enumerate(jobs):
        entry = {"job_id": f"7_{i}", "stderr": f"/logs/7_{i}.err", "stdout": "/logs/o", "cluster": "slurm"}
        write_spec(j, "python3", launcher="slurm", slurm=entry)
        registry[j.name] = entry
    write_json_atomic(tmp_path / "out" / "slurm_jobs.json", registry)
    write_json_atomic(jobs[1].error_path, {"error": "DeadKernelError: Kernel died", "wall_s": 5.0})  # requeued
    write_json_atomic(jobs[2].done_path, {"wall_s": 2.0})
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    _fake_slurm(tmp_path / "bin", ["7_0|RUNNING|None|1:00", "7_1|PENDING|BeginTime|0:00", "7_2|COMPLETING|None|0:40"])
    ns = _parse("--status", str(tmp_path / "out"))
    assert ns.func(ns) == 0
    shown = capsys.readouterr().out
    assert all(f"1 {status}" in shown for status in ("running", "pending", "done")), shown

    _fake_slurm(tmp_path / "bin", None)  # the controller goes down
    assert ns.func(ns) == 1
    shown = capsys.readouterr().out
    assert "squeue did not answer" in shown and "3 jobs: 2 unknown, 1 done" in shown, shown
    lines = {j.name: next(ln for ln in shown.splitlines() if ln.strip().startswith(j.name)) for j in jobs}
    assert " RUNNING " in lines[jobs[0].name] and " PENDING " in lines[jobs[1].name], shown
    assert all(" s ago" in lines[j.name] for j in jobs[:2]) and "not run" not in shown and "failed" not in shown


def test_slurm_task_that_finds_done_exits_without_touching_files(tmp_path):
    job = plan_jobs(tmp_path / "x.ipynb", [{"a": 1}], tmp_path / "out")[0]
    job.out_dir.mkdir(parents=True)
    write_json_atomic(job.done_path, {"wall_s": 2.0})
    for f in (job.log, job.executed):
        f.write_text("old")
    stamps = {f: f.stat().st_mtime_ns for f in (job.log, job.executed)}
    assert sweep_slurm.NotebookTask()(job)["status"] == "done"  # the notebook x.ipynb does not even exist
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps and job.log.read_text() == "old"
    again = sweep_slurm.NotebookTask().checkpoint(job)  # submitit's requeue: the same call again
    assert again.function.__class__ is sweep_slurm.NotebookTask and again.args == (job, sweep.KERNEL)


def test_slurm_options_and_elapsed_parsing(capsys):
    assert [sweep_slurm.parse_elapsed(t) for t in ("0:07", "1:02:03", "2-00:00:01", "INVALID")] == [
        7, 3723, 172801, None]
    with pytest.raises(SystemExit):
        _parse("nb.ipynb", "--out", "o", "--jobs", "0")
    assert "at least 1" in capsys.readouterr().err
    launcher = sweep_slurm.SlurmLauncher(jobs=3, setup=["module load cuda"], time=30)
    assert launcher.params["slurm_setup"] == ["module load cuda"] and launcher.jobs == 3
    with pytest.raises(ValueError, match="--detach"):
        sweep_slurm.SlurmLauncher(cluster="local", detach=True)
