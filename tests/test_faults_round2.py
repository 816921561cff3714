"""Hardening, round two (issue 15, items 4-6 and 8-10; issue 16's CPU plan; issue 17's CLI style).

Each test reproduces a case an adversary tried and checks the outcome the README's "When things
go wrong" table promises: a refusal that names the file, a skipped-and-named run folder, a
message instead of a traceback, the exit code of bad usage (2) or of a failure (1).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_fake_benchmark, stop_after_steps
from test_faults import cfg_for, no_files_written, run_cli, train_argv
from test_results import accs, make_record, make_run

import vldlib.loop.rundir as rundir
import vldlib.loop.train as T
from vldlib.cli import main as cli_main
from vldlib.loop import device as D
from vldlib.loop.train import train
from vldlib.utils import read_jsonl


@pytest.fixture
def own_bench(tmp_path) -> Path:
    """A benchmark this test may change (the module-wide one is shared)."""
    return make_fake_benchmark(tmp_path / "bench" / "fake")


def half_run(tmp_path: Path, bench: Path, **kw):
    cfg = cfg_for(tmp_path, bench, **kw)
    run = train(cfg, **stop_after_steps(8))  # evaluated at 0 (the start), 4 and 8; last.pt at 8
    assert not (run / "done").exists() and [r["step"] for r in read_jsonl(run / "records.jsonl")] == [0, 4, 8]
    return cfg, run


# ----------------------------------------------------------------------------- 4. lost records

@pytest.mark.parametrize("damage", ["deleted", "first line lost"])
def test_resume_refuses_when_records_do_not_reach_the_checkpoint(own_bench, tmp_path, damage):
    """Before: resume continued from last.pt and marked the run done with a partial trajectory."""
    cfg, run = half_run(tmp_path, own_bench)
    records = run / "records.jsonl"
    if damage == "deleted":
        records.unlink()
    else:
        records.write_text("".join(records.read_text().splitlines(keepends=True)[1:]))  # step 0's record lost
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    with pytest.raises(RuntimeError, match=r"records\.jsonl (is missing|lacks the evaluations at step\(s\) 0), "
                                           r"but last\.pt is at step 8.*delete"):
        train(cfg)
    assert not (run / "done").exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir() if p.name != ".lock") == \
        [b for b in before if b[0] != ".lock"]  # nothing rewritten


def _gap_runs(root: Path) -> None:
    full = [make_record(s, accs(.8, .6)) for s in (0, 300, 600, 900)]
    make_run(root, "whole", full, eval_every=300, steps=900)
    make_run(root, "gappy", [full[0], full[1], full[3]], eval_every=300, steps=900, dropout=0.9)
    lost = make_run(root, "lost", full, eval_every=300, steps=900, seed=1)
    (lost / "records.jsonl").unlink()  # a finished run whose records are gone


def test_report_flags_runs_with_gaps_and_finished_runs_without_records(tmp_path, capsys):
    """Before: the gappy run was reported as complete and the lost one silently left out."""
    _gap_runs(tmp_path / "runs")
    with pytest.warns(UserWarning, match="lost"):
        rc, out, err = run_cli(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"))
    assert rc == 0, err
    assert "1 run(s) have gaps in records.jsonl" in out and "gappy: steps 600" in out, out
    assert "1 finished run(s) have no records.jsonl" in out and "lost" in out, out
    assert "whole" not in out.split("gaps")[1].split("\n")[0]  # the whole run is not flagged
    assert "warning: 1 run(s) have gaps" in err


# ----------------------------------------------------------------------------- 5. corrupt run folders

def _corrupt(run: Path, how: str) -> None:
    if how == "garbage config.json":
        (run / "config.json").write_text("{this is not json")
    elif how == "malformed line":
        lines = (run / "records.jsonl").read_text().splitlines(keepends=True)
        (run / "records.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    elif how == "binary meta.json":
        (run / "meta.json").write_bytes(bytes(range(256)) * 4)
    elif how == "config.json is a list":
        (run / "config.json").write_text("[1, 2, 3]")
    elif how == "record of the wrong shape":
        (run / "records.jsonl").write_text(json.dumps({"type": "eval", "step": 300, "acc": [0.5]}) + "\n")


CORRUPTIONS = ["garbage config.json", "malformed line", "binary meta.json", "config.json is a list",
               "record of the wrong shape"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_one_corrupt_run_folder_is_skipped_with_a_warning_or_fails_with_strict(tmp_path, capsys, how):
    """Before: the whole report aborted (an error, or a traceback for the wrong shapes)."""
    root = tmp_path / "runs"
    recs = [make_record(s, accs(.8, .6)) for s in (300, 600)]
    make_run(root, "good", recs)
    _corrupt(make_run(root, "bad", recs, seed=1), how)
    with pytest.warns(UserWarning, match=r"bad: damaged run folder, skipped"):
        rc, out, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "rep"))
    assert rc == 0 and "Traceback" not in err, err
    assert "1 damaged run folder(s) were skipped" in out and "bad" in out
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "rep" / "selected.csv").run.map(lambda r: Path(r).name)) == {"good"}
    rc, out, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "rep2"), "--strict")
    assert rc == 1 and err.startswith(f"error: {root / 'bad'}: damaged run folder"), err


# ----------------------------------------------------------------------------- 6. the data changed

def test_resume_after_the_data_changed_is_refused_before_anything_is_written(own_bench, tmp_path):
    """Before: the run resumed, rewrote meta.json with the new split sizes, then failed for ever."""
    cfg, run = half_run(tmp_path, own_bench)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["data_fingerprint"]["counts"] == {"d0": 18, "d1": 18, "d2": 18}
    meta_bytes = (run / "meta.json").read_bytes()
    for i in range(10):  # ten images added to one domain
        shutil.copy(own_bench / "d1" / "a" / "a_000.png", own_bench / "d1" / "a" / f"new_{i}.png")
    with pytest.raises(RuntimeError, match=r"the data changed since this run started \(d1: 18 -> 28 images\)"):
        train(cfg)
    assert (run / "meta.json").read_bytes() == meta_bytes
    for i in range(10):  # restored: the same command resumes and finishes
        (own_bench / "d1" / "a" / f"new_{i}.png").unlink()
    assert (train(cfg) / "done").exists()


def test_a_replaced_image_of_another_size_counts_as_changed_data(own_bench, tmp_path):
    cfg, run = half_run(tmp_path, own_bench)
    img = own_bench / "d0" / "b" / "b_001.png"
    img.write_bytes(img.read_bytes() + b"\0" * 7)  # same name and count, other content
    with pytest.raises(RuntimeError, match="same counts per domain, but files were renamed or replaced"):
        train(cfg)


# ----------------------------------------------------------------------------- 8. paths and values

def test_run_name_cannot_leave_the_out_folder(own_bench, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "runs"
    for name in ("../../x", "/tmp/x", "..", "a/b"):
        rc, _, err = run_cli(capsys, *train_argv(own_bench, out, run_name=name))
        assert rc == 2 and err.startswith(f"error: run_name {name!r} must be one plain folder name"), err
    assert not out.exists() and not (tmp_path / "a" / "x").exists() and sorted(os.listdir(tmp_path)) == ["bench"]


@pytest.mark.parametrize("flags, message", [
    (dict(test_envs="0,0"), r"test_envs \[0, 0\] names a domain twice"),
    (dict(resolution="100000"), r"resolution 100000 is out of range: use 16\.\.2048 px"),
    (dict(resolution="8"), r"resolution 8 is out of range"),
])
def test_bad_values_are_refused_before_any_folder_is_made(own_bench, tmp_path, capsys, flags, message):
    rc, _, err = run_cli(capsys, *train_argv(own_bench, tmp_path / "runs", **flags))
    assert rc == 2 and "Traceback" not in err and __import__("re").search(message, err), err
    assert no_files_written(tmp_path / "runs")


# ----------------------------------------------------------------------------- 9. messages, not tracebacks

def test_disk_already_full_when_the_run_takes_its_lock(own_bench, tmp_path, capsys, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "pwrite", full)
    rc, _, err = run_cli(capsys, *train_argv(own_bench, tmp_path / "runs"))
    assert rc == 1 and err.startswith("error: cannot write ") and ".lock: No space left on device" in err, err
    assert "MB free on that disk" in err and "Traceback" not in err


def test_unwritable_report_out(tmp_path, capsys):
    make_run(tmp_path / "runs", "r", [make_record(300, accs(.8, .6))])
    (tmp_path / "afile").write_text("")
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "afile"))
    assert rc == 1 and err.startswith(f"error: cannot write the report into {tmp_path / 'afile'}"), err
    assert "writable --out" in err and (tmp_path / "afile").read_text() == ""


def test_malformed_yaml_in_sweep_set_and_quickstart_param(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sweep", str(tmp_path / "nb.ipynb"), "--out", str(tmp_path / "o"), "--set", "lr=[1")
    assert rc == 2 and err.startswith("error: --set 'lr=[1': the value is not valid YAML"), err
    rc, _, err = run_cli(capsys, "quickstart", "--param", "seeds=[0, 1")
    assert rc == 2 and err.startswith("error: --param 'seeds=[0, 1': the value is not valid YAML"), err


def test_quickstart_refuses_an_unknown_param_before_starting(capsys, monkeypatch):
    """Before: `--param stpes=10` started the whole study with the default steps."""
    import vldlib.experiments.quickstart as Q

    monkeypatch.setattr(Q, "run_quickstart", lambda *a, **k: pytest.fail("the study was started"))
    rc, _, err = run_cli(capsys, "quickstart", "--param", "stpes=10")
    assert rc == 2 and err.startswith("error: --param: stpes (did you mean 'steps'?) not a parameter"), err
    # known keys pass, and 1e-3 is read as a number, as the sweep reads it (YAML 1.1 alone: a string)
    assert Q._parse_params(["lr=1e-3", "steps=5"]) == {"lr": 1e-3, "steps": 5}


def test_quickstart_failure_names_the_real_output_path(tmp_path, capsys, monkeypatch):
    import papermill

    def boom(*a, **k):
        raise RuntimeError("cell 3 raised")

    monkeypatch.setattr(papermill, "execute_notebook", boom)  # imported by run_quickstart when it runs
    rc, _, err = run_cli(capsys, "quickstart", "--out", str(tmp_path / "qs"))
    assert rc == 1 and err.startswith("error: the quickstart notebook failed: cell 3 raised"), err
    assert str(tmp_path / "qs" / "00_quickstart.ipynb") in err and "outputs/quickstart/" not in err, err


# ----------------------------------------------------------------------------- 10. keep_last off

class Killed(Exception):
    """Stands for a kill -9 (a KeyboardInterrupt would stop pytest itself)."""


def test_a_kill_between_done_and_deleting_last_pt_does_not_restart_the_run(own_bench, tmp_path, monkeypatch):
    """With keep_last off the loop writes `done`, then deletes last.pt. Killed between the two (here:
    at the moment the second of them would happen), the run is finished, not restarted from scratch.
    Before: last.pt went first, so a kill before `done` left a run that started again at step 0."""
    cfg = cfg_for(tmp_path, own_bench, keep_last=False)
    real_write = T.write_text_atomic

    def killed_at_done(path, text):
        if Path(path).name == "done":
            if not (Path(path).parent / "last.pt").exists():
                raise Killed("killed after last.pt was deleted and before done was written")
        return real_write(path, text)

    monkeypatch.setattr(T, "write_text_atomic", killed_at_done)
    run = train(cfg)
    assert (run / "done").exists() and not (run / "last.pt").exists()
    assert [r["step"] for r in read_jsonl(run / "records.jsonl")] == [0, 4, 8, 12]


# ----------------------------------------------------------------------------- issue 16: threads + workers

@pytest.mark.parametrize("cores, workers, threads, expected", [
    (8, -1, 0, (2, 1)),   # auto: 4 workers over 3 loaders = 1 each; 8 cores // (3 + 1) = 2 threads
    (2, -1, 0, (2, 0)),   # auto on 2 cores: 2 workers over 3 loaders = 0: the main process loads, 2 threads
    (16, 6, 0, (2, 2)),   # 6 workers: 2 per loader; 16 // 7 = 2
    (4, 9, 0, (1, 3)),    # more workers than cores: at least one thread
    (8, -1, 3, (3, 1)),   # the user's --num-threads wins
    (8, 0, 0, (8, 0)),    # no workers: every core computes
])
def test_threads_and_workers_together_fit_the_cores(monkeypatch, cores, workers, threads, expected):
    monkeypatch.setattr(D, "usable_cores", lambda: cores)
    assert D.cpu_plan(workers, threads, loaders=3) == expected


def test_a_run_uses_the_planned_thread_count(own_bench, tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(D, "usable_cores", lambda: 6)
        train(cfg_for(tmp_path, own_bench, num_threads=0, num_workers=2, steps=2, eval_every=2))
        assert torch.get_num_threads() == 6 // (2 + 1)  # 2 training loaders of 1 worker + the main process
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- issue 17: one CLI style

@pytest.mark.parametrize("argv", [
    ["data", "verify", "PACS", "--bogus"], ["data", "download", "PACS", "--source", "ftp"],
    ["train", "--bogus"], ["train", "--augment", "maybe"], ["report", "x", "--selection", "best"],
    ["quickstart", "--paper", "perhaps"], ["sweep", "--jobs", "0"], ["bench", "--steps", "many"],
])
def test_every_command_reports_bad_usage_as_error_and_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("argv, dest, value", [
    (["data", "verify", "X", "--no-image-check"], "image_check", False),
    (["data", "verify", "X", "--image-check", "false"], "image_check", False),
    (["data", "verify", "X"], "image_check", True),
    (["data", "download", "X", "--keep-downloads"], "keep_downloads", True),
    (["data", "download", "X", "--keep-downloads", "no"], "keep_downloads", False),
    (["train", "--no-augment"], "augment", False),
    (["train", "--augment", "false"], "augment", False),
    (["report", "x", "--strict"], "strict", True),
    (["report", "x", "--no-strict"], "strict", False),
    (["sweep", "--dry-run", "true"], "dry_run", True),
    (["bench", "--no-bf16"], "bf16", False),
])
def test_booleans_take_flag_no_flag_and_true_false(argv, dest, value):
    from vldlib.cli import build_parser

    assert getattr(build_parser(argv[0]).parse_args(argv), dest) == value


@pytest.mark.parametrize("argv, dest, value, positional", [
    (["data", "verify", "--quiet", "PACS"], "quiet", True, ("name", "PACS")),
    (["data", "verify", "--quiet", "no", "PACS"], "quiet", False, ("name", "PACS")),
    (["report", "--strict", "runs/"], "strict", True, ("runs", ["runs/"])),
    (["sweep", "--dry-run", "nb.ipynb", "--out", "o"], "dry_run", True, ("notebook", "nb.ipynb")),
])
def test_a_bare_flag_never_swallows_the_positional_after_it(argv, dest, value, positional):
    from vldlib.cli import _boolean_options, build_parser, explicit_booleans

    parser = build_parser(argv[0])
    args = parser.parse_args(explicit_booleans(argv, _boolean_options(parser)))
    assert getattr(args, dest) == value and getattr(args, positional[0]) == positional[1]


def test_failures_exit_1_and_usage_errors_exit_2(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert rc == 1 and err.startswith("error: ") and "no such file" in err, err  # a missing path: a failure
    rc, _, err = run_cli(capsys, "sweep", "--status", str(tmp_path / "missing"))
    assert rc == 1 and err.startswith("error: "), err
    rc, _, err = run_cli(capsys, "data", "verify", "PASC", "--data-dir", str(tmp_path))
    assert rc == 2 and err.startswith("error: ") and "PACS" in err, err  # an unknown name: bad usage
