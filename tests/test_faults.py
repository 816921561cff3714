"""Hardening: kills, full disks, bad data, hostile archives and pickles, each tried on purpose.

One test (or parametrized group) per failure the project issue lists; each checks what the user
sees (an error that names the path and the fix, no traceback from the CLI) and that finished work
survives. Parts already covered elsewhere are referenced instead of repeated:

- tests/test_train.py: a plain kill-and-resume, bad configs through `train()`, the diverging run;
- tests/test_sweep.py: kill + restart of a sweep, the lock, a failing notebook in a batch;
- tests/test_folder.py / tests/test_download.py: bad images and archives through the loaders.

Training runs use tests/test_train.py's tiny config (test_resnet, 32 px, batch 4, CPU).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_fake_benchmark
from PIL import Image
from test_download import _png, make_tar, make_zip, small, tree
from test_offline_weights import _CreatesFile
from test_sweep import ROOT, make_notebook, runs
from vldlib.tools.sweep import SweepLock
from test_train import stable, tiny_config

import vldlib.loop.train as T
import vldlib.utils as U
from vldlib.cli import main as cli_main
from vldlib.config import TrainConfig
from vldlib.data import DataError, load_benchmark
from vldlib.data.archives import ArchiveError, safe_extract
from vldlib.data.download import download_benchmark
from vldlib.evaluate.scores import validation_score
from vldlib.loop import TrainingDiverged, load_run_model, run_dir_for
from vldlib.loop.train import train
from vldlib.utils import read_jsonl

# -------------------------------------------------------------------------------------- helpers

KILL_KW = dict(steps=12, eval_every=4, average_from=4, augment=True, dropout=0.5, lr=0.01)  # best.pt improves at 4 and 8


def cfg_for(root: Path, bench: Path, **kw) -> TrainConfig:
    return tiny_config(root, **{**KILL_KW, "benchmark": str(bench), **kw})


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`python -m vldlib ...` in-process: an uncaught exception (a traceback) fails the test itself."""
    capsys.readouterr()
    rc = cli_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def train_argv(bench: Path, out: Path, **flags) -> list[str]:
    base = {"benchmark": str(bench), "backbone": "test_resnet", "pretrained": "false", "resolution": "32",
            "steps": "4", "eval-every": "2", "batch-size": "4", "num-workers": "0", "num-threads": "1",
            "out": str(out), "progress": "false", "test-envs": "0"}
    base.update({k.replace("_", "-"): str(v) for k, v in flags.items()})
    return ["train"] + [f"--{k}={v}" for k, v in base.items()]  # `=`: argparse takes -1e-3 for a flag


def no_files_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_fake_benchmark(tmp_path_factory.mktemp("bench") / "fake")


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory) -> Path:
    """The uninterrupted run every killed or starved run must reproduce."""
    return train(cfg_for(tmp_path_factory.mktemp("ref"), bench))


# ----------------------------------------------------------------- 1. kill -9 of a training run

# One driver process imports torch once, then forks one child per scenario before any torch work
# (so the forks are safe); each child arms its kill and trains until it SIGKILLs itself.
KILL_DRIVER = r"""
import io, json, os, signal, sys
from pathlib import Path
import torch
import vldlib.loop.train as T

base, scenarios, nth_best = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(where):
    calls = {"n": 0}
    def nth(n):
        calls["n"] += 1
        return calls["n"] == n
    if where == "step":  # inside SGD step 7: after backward, before the weights move
        orig_step = torch.optim.SGD.step
        def step(self, *a, **k):
            if nth(7):
                die()
            return orig_step(self, *a, **k)
        torch.optim.SGD.step = step
    elif where == "eval":  # step 8's evaluation, half-way: the model scored, the average being scored
        orig_predict = T.predict_all
        def predict_all(forward, *a, **k):
            if nth(4):
                def dying(x):
                    die()
                return orig_predict(dying, *a, **k)
            return orig_predict(forward, *a, **k)
        T.predict_all = predict_all
    elif where in ("last.pt", "best.pt"):  # half of the temporary file written, then killed
        orig_save = torch.save
        def save(obj, f, *a, **k):
            if Path(f).name.startswith("." + where) and nth(2 if where == "last.pt" else nth_best):
                buf = io.BytesIO()
                orig_save(obj, buf)
                data = buf.getvalue()
                with open(f, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
            return orig_save(obj, f, *a, **k)
        torch.save = save
    elif where == "record":  # half of the second records.jsonl line written, then killed
        orig_append = T.append_jsonl
        def append(path, record):
            if nth(2):
                line = json.dumps(record, sort_keys=True)
                with open(path, "a") as fh:
                    fh.write(line[: len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
            return orig_append(path, record)
        T.append_jsonl = append

status = {}
for where in scenarios:
    pid = os.fork()
    if pid == 0:
        arm(where)
        T.train(T.TrainConfig(**{**base, "out": os.path.join(base["out"], where)}))
        os._exit(0)  # not killed: the injection point was never reached
    _, st = os.waitpid(pid, 0)
    status[where] = os.WTERMSIG(st) if os.WIFSIGNALED(st) else -os.WEXITSTATUS(st)
print(json.dumps(status))
"""

KILL_POINTS = ["step", "eval", "record", "best.pt", "last.pt"]


def _improvements(records: list[dict], train_envs: list[int]) -> list[int]:
    """Steps at which best.pt is (re)written: the validation score beat every earlier one."""
    best, steps = -1.0, []
    for r in records:
        s = validation_score(r["acc"]["model"], train_envs)
        if s > best:
            best, steps = s, steps + [r["step"]]
    return steps


def test_kill_at_any_moment_resumes_to_identical_records(bench, reference, tmp_path, monkeypatch):
    """kill -9 inside a step, during evaluation, mid-way through a records line and mid-way through
    writing best.pt / last.pt: the restarted run ends with the reference's records and checkpoints
    and never loads a half-written file."""
    ref_records = read_jsonl(reference / "records.jsonl")
    improved = _improvements(ref_records, [1, 2])
    nth_best = 2 if len(improved) > 1 else 1  # kill while replacing an existing best.pt if there is one
    base = asdict(cfg_for(tmp_path, bench))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps(base), json.dumps(KILL_POINTS),
                           str(nth_best)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == {k: signal.SIGKILL for k in KILL_POINTS}, (status, proc.stderr[-3000:])
    print(f"5 killed runs: {time.time() - t0:.1f} s")

    loaded: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loaded.append(str(f)), real_load(f, *a, **k))[1])
    ref_best = real_load(reference / "best.pt", weights_only=True)
    for where in KILL_POINTS:
        cfg = replace(cfg_for(tmp_path, bench), out=str(tmp_path / "runs" / where))
        run = run_dir_for(cfg)
        assert (run / "config.json").exists() and not (run / "done").exists(), where  # killed mid-run
        tmp_files = sorted(p.name for p in run.glob(".*.tmp"))
        if where.endswith(".pt"):
            assert tmp_files and tmp_files[0].startswith(f".{where}."), (where, tmp_files)  # the half file
            if where == "best.pt" and nth_best == 2:  # the previous best.pt is intact and loads
                assert real_load(run / "best.pt", weights_only=True)["step"] == improved[0]
        if where == "record":
            assert not (run / "records.jsonl").read_text().endswith("\n")  # a half line is there
        loaded.clear()
        assert train(cfg) == run
        assert all(".tmp" not in p for p in loaded), (where, loaded)  # only complete files were read
        assert stable(read_jsonl(run / "records.jsonl")) == stable(ref_records), where
        for line in (run / "records.jsonl").read_text().splitlines():
            json.loads(line)  # every line whole: no glued half-line
        best = real_load(run / "best.pt", weights_only=True)
        assert best["step"] == ref_best["step"] and state_equal(best["model"], ref_best["model"]), where


# ------------------------------------------------ 2 + 3. kill of a sweep, a concurrent sweep, a failing notebook

def test_sweep_kill_concurrent_start_and_failing_notebook(tmp_path):
    """Two sweeps started at once on one folder: one runs, the other stops with the lock's message.
    The runner is killed (-9) while a job holds; the same command again runs each unfinished job,
    a notebook that raises is reported with the executed notebook showing its error, and every
    result file is whole. (tests/test_sweep.py covers the lock while running, and the re-run of a
    fixed notebook.)"""
    nb = make_notebook(tmp_path / "tiny.ipynb")
    out, hold, flag = tmp_path / "out", tmp_path / "hold", tmp_path / "fail-now"
    hold.touch()
    flag.touch()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"- {{a: 1}}\n- {{a: 2, hold: '{hold}'}}\n- {{a: 3, fail_if_exists: '{flag}'}}\n")
    argv = [sys.executable, "-m", "vldlib", "sweep", str(nb), "--grid", str(grid), "--out", str(out), "--jobs", "3"]
    popen = dict(cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = [subprocess.Popen(argv, **popen), subprocess.Popen(argv, **popen)]
    try:
        deadline = time.time() + 150
        loser = winner = None
        while time.time() < deadline and loser is None:
            loser = next((p for p in procs if p.poll() is not None), None)
            time.sleep(0.1)
        assert loser is not None, "neither sweep stopped: the lock let both run"
        winner = procs[1 - procs.index(loser)]
        _, err = loser.communicate()
        assert loser.returncode == 1 and "another sweep holds" in err and ".sweep.lock" in err, err
        assert f"PID {winner.pid} " in err and f"kill {winner.pid}" in err, err  # names the holder
        assert "Traceback" not in err
        # wait: job 1 done, job 3 failed, job 2 holding
        while time.time() < deadline:
            if len(list(out.glob("*/done"))) == 1 and len(list(out.glob("*/error.json"))) == 1:
                break
            assert winner.poll() is None, winner.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the sweep did not reach its failing job in time")
        winner.send_signal(signal.SIGKILL)
        winner.communicate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Workers inherit the lock, so it frees once they have noticed the kill and stopped their
    # kernels; releasing job 2 before that would race them (at-least-once, see the report).
    with SweepLock(out, wait_s=60):
        pass
    hold.unlink()  # a surviving orphan of job 2 would now finish and show up twice in runs.txt

    restart = subprocess.run(argv, cwd=ROOT, text=True, capture_output=True, timeout=180)
    assert restart.returncode == 1, restart.stderr  # 1: a job failed (the notebook), not a crash
    assert "3 jobs:" in restart.stdout and "1 skipped" in restart.stdout and "1 done" in restart.stdout
    assert "1 failed" in restart.stdout and "Traceback" not in restart.stderr
    # the failure table points at the executed notebook, which shows the notebook's own error
    failed_nb = next(out.glob("a=3*/failed.ipynb"))
    assert str(failed_nb) in restart.stdout and "RuntimeError: asked to fail" in restart.stdout
    assert "asked to fail" in failed_nb.read_text()
    import pandas as pd

    df = pd.read_csv(out / "sweep.csv")
    assert sorted(df.a) == [1, 2, 3] and df.name.is_unique
    assert dict(zip(df.a, df.status)) == {1: "skipped", 2: "done", 3: "failed"}
    done = sorted(p.parent.name for p in out.glob("*/done"))
    assert len(done) == 2 and sorted(runs(out)) == done  # each finished job ran exactly once
    for name in done:
        json.loads((out / name / "done").read_text())
        assert json.loads((out / name / "result.json").read_text())["a"] in (1, 2)
        nbformat_ok = json.loads((out / name / "executed.ipynb").read_text())
        assert nbformat_ok["cells"]
    assert not list(out.rglob("*.tmp*")) and not (out / next(iter(done)) / "failed.ipynb").exists()


# ------------------------------------------------------------------------------------ 4. bad data

def _jpeg_cut_in_half(path: Path) -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


DATA_FAULTS = {
    # name: (how to break a fresh fake benchmark, regex the error must match: the path and the fix)
    "zero-byte image": (lambda b: (b / "d1" / "a" / "empty.png").write_bytes(b""),
                        r"d1/a/empty\.png: zero-byte file.*(delete these files|--skip-bad)"),
    "truncated JPEG": (lambda b: _jpeg_cut_in_half(b / "d2" / "b" / "cut.jpg"),
                       r"d2/b/cut\.jpg: corrupt image \(image file is truncated.*--skip-bad"),
    "non-image file": (lambda b: (b / "d0" / "c" / "notes.txt").write_text("x"),
                       r"d0/c/notes\.txt: not an image file.*remove it.*--skip-bad"),
    "non-image named .jpg": (lambda b: (b / "d0" / "c" / "page.jpg").write_text("<html></html>"),
                             r"d0/c/page\.jpg: not an image PIL can read.*--skip-bad"),
    "class missing in one domain": (lambda b: shutil.rmtree(b / "d1" / "b"),
                                    r"fake/d1: domain 'd1' lacks class folder\(s\) \['b'\].*add the missing"),
    "empty domain": (lambda b: [shutil.rmtree(b / "d2"), (b / "d2").mkdir()],
                     r"fake/d2: domain 'd2' has no class folders \(empty domain\); remove it"),
    "benchmark folder missing": (lambda b: shutil.rmtree(b),
                                 r"benchmark folder .*fake does not exist; point to a folder laid out as"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_bad_data_is_named_with_the_fix_also_by_the_cli(fault, tmp_path, capsys):
    make_fake_benchmark(tmp_path / "fake", per_class=3)
    breaker, message = DATA_FAULTS[fault]
    breaker(tmp_path / "fake")
    with pytest.raises(DataError, match=message):
        load_benchmark(tmp_path / "fake", progress=False)
    rc, _, err = run_cli(capsys, *train_argv(tmp_path / "fake", tmp_path / "runs"))
    assert rc == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert any(re.search(message, line) for line in err.splitlines()), err
    assert no_files_written(tmp_path / "runs")


def test_skip_bad_trains_around_bad_files(tmp_path, capsys):
    make_fake_benchmark(tmp_path / "fake", per_class=3)
    _jpeg_cut_in_half(tmp_path / "fake" / "d2" / "b" / "cut.jpg")
    (tmp_path / "fake" / "d1" / "a" / "empty.png").write_bytes(b"")
    rc, out, _ = run_cli(capsys, *train_argv(tmp_path / "fake", tmp_path / "runs", skip_bad="true"))
    assert rc == 0 and "skipped 2 bad file(s)" in out


# ------------------------------------------------------------------------------------- 5. archives

def _tar(entries: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None, mode: str = "w") -> bytes:
    return make_tar(entries, mode=mode, links=links)


def _zip_symlink(entries: dict[str, bytes], name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in entries.items():
            zf.writestr(k, v)
        info = zipfile.ZipInfo(name)
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, target)
    return buf.getvalue()


GOOD = {f"B/d{i}/c/{k}.png": _png(10 * i + k) for i in range(2) for k in range(2)}


def _hostile(case: str, tmp: Path) -> bytes:
    outside = str(tmp / "outside.txt")
    return {
        "zip ../": lambda: make_zip({**GOOD, "B/../../outside.txt": b"x"}),
        "zip absolute": lambda: make_zip({**GOOD, outside: b"x"}),
        "zip backslash ..": lambda: make_zip({**GOOD, "B\\..\\..\\outside.txt": b"x"}),
        "zip symlink": lambda: _zip_symlink(GOOD, "B/d0/c/link.png", "../../../../outside.txt"),
        "tar ../": lambda: _tar({**GOOD, "B/../../outside.txt": b"x"}),
        "tar absolute": lambda: _tar({**GOOD, outside: b"x"}),
        "tar symlink relative": lambda: _tar(GOOD, {"B/d0/c/l.png": (tarfile.SYMTYPE, "../../../../outside.txt")}),
        "tar symlink absolute": lambda: _tar(GOOD, {"B/d0/c/l.png": (tarfile.SYMTYPE, outside)}),
        "tar hardlink relative": lambda: _tar(GOOD, {"B/d0/c/h.png": (tarfile.LNKTYPE, "../outside.txt")}),
        "tar hardlink absolute": lambda: _tar(GOOD, {"B/d0/c/h.png": (tarfile.LNKTYPE, "/etc/passwd")}),
        "tar.gz ../": lambda: _tar({**GOOD, "../outside.txt": b"x"}, mode="w:gz"),
    }[case]()


@pytest.mark.parametrize("case", ["zip ../", "zip absolute", "zip backslash ..", "zip symlink", "tar ../",
                                  "tar absolute", "tar symlink relative", "tar symlink absolute",
                                  "tar hardlink relative",
                                  "tar hardlink absolute", "tar.gz ../"])
def test_hostile_archive_entries_are_refused_and_nothing_lands_outside(case, tmp_path):
    (tmp_path / "data").mkdir()
    archive = tmp_path / "a.bin"  # format from content, not name
    archive.write_bytes(_hostile(case, tmp_path / "data"))
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(ArchiveError, match=r"a\.bin: refusing entry"):
        safe_extract(archive, tmp_path / "data" / "x", progress=False)
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(str(p).startswith(str(tmp_path / "data" / "x")) for p in new), new
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "data" / "outside.txt").exists()


def test_file_written_through_an_inside_symlink_cannot_escape(tmp_path):
    """The classic two-step: an innocent-looking link first, then a member written through it."""
    blob = _tar({"B/esc/evil.txt": b"x"}, {"B/esc": (tarfile.SYMTYPE, "../..")})
    # tarfile writes members in order; put the link first
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("B/esc")
        link.type, link.linkname = tarfile.SYMTYPE, "../.."
        tf.addfile(link)
        f = tarfile.TarInfo("B/esc/evil.txt")
        f.size = 1
        tf.addfile(f, io.BytesIO(b"x"))
    for i, data in enumerate((blob, buf.getvalue())):
        (tmp_path / f"{i}.tar").write_bytes(data)
        with pytest.raises(ArchiveError, match="refusing entry"):
            safe_extract(tmp_path / f"{i}.tar", tmp_path / "data" / "x", progress=False)
    dest = tmp_path / "data" / "x"  # the first archive wrote B/esc/evil.txt inside, before the link came
    assert [p for p in tmp_path.rglob("evil.txt") if dest not in p.parents] == []


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_truncated_archive_given_by_hand_leaves_nothing(kind, tmp_path, monkeypatch):
    """A half-downloaded archive passed with --archive: refused, no benchmark folder and no
    scratch left in the data dir. (tests/test_download.py covers the same through the downloader.)"""
    monkeypatch.setenv("VLDLIB_MIRROR", "http://127.0.0.1:9")  # nothing listens: never fetched
    spec = small("VLCS", ["dog"], per_class=3)
    entries = tree("VLCS/", spec.domains, spec.classes, per_class=3)
    blob = make_zip(entries) if kind == "zip" else make_tar(entries, mode="w:gz" if kind == "tar.gz" else "w")
    archive = tmp_path / f"VLCS.{kind}"
    archive.write_bytes(blob[: len(blob) // 2])
    data = tmp_path / "data"
    with pytest.raises(ArchiveError, match=rf"VLCS\.{kind}.*(truncated|corrupt)"):
        download_benchmark(spec, data, archive=archive, progress=False)
    left = [p.name for p in data.iterdir()] if data.exists() else []
    assert "VLCS" not in left and not [n for n in left if ".partial" in n], left


# -------------------------------------------------------------------------------------- 6. config

CONFIG_FAULTS = [
    (dict(backbone="resnet5O"), r"unknown backbone 'resnet5O'\. Closest names: .*resnet50"),
    (dict(dropout="1.0"), r"dropout rate must be in \[0, 1\), got 1\.0"),
    (dict(dropout="-0.1"), r"dropout rate must be in \[0, 1\)"),
    (dict(dropout="nan"), r"dropout rate must be in \[0, 1\)"),
    (dict(lr="0"), r"lr must be > 0 and finite, got 0\.0; e\.g\. --lr 1e-3"),
    (dict(lr="-1e-3"), r"lr must be > 0 and finite, got -0\.001"),
    (dict(lr="nan"), r"lr must be > 0 and finite, got nan"),
    (dict(lr="inf"), r"lr must be > 0 and finite, got inf"),
    (dict(steps="0"), r"steps must be > 0, got 0"),
    (dict(test_envs="7"), r"test env 7 out of range: fake has 3 domains.*--test-envs 0\.\.2"),
    (dict(test_envs="-1"), r"test env -1 out of range"),
    (dict(test_envs="0,1,2"), r"every domain of fake is held out"),
    (dict(batch_size="1000"), r"batch_size 1000 is larger than the 'in' split of domain 'd1'.*--batch-size <="),
    (dict(holdout="1.5"), r"holdout fraction must be in \(0, 1\), got 1\.5; e\.g\. --holdout 0\.2"),
    (dict(weight_decay="nan"), r"need weight_decay >= 0.*got nan"),
    (dict(head_lr_mult="0"), r"head_lr_mult must be > 0"),
    (dict(steps="ten"), r"config field 'steps': cannot use 'ten'"),
]


@pytest.mark.parametrize("flags, message", CONFIG_FAULTS, ids=[next(iter(f)) + "=" + str(next(iter(f.values())))
                                                               for f, _ in CONFIG_FAULTS])
def test_bad_config_fails_before_any_work_via_the_cli(bench, tmp_path, capsys, flags, message):
    rc, _, err = run_cli(capsys, *train_argv(bench, tmp_path / "runs", **flags))
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err  # 2: bad usage
    assert re.search(message, err), err
    assert no_files_written(tmp_path / "runs")  # no run folder, no records


@pytest.mark.parametrize("text, message", [
    (None, r"--config .*none\.yaml: cannot read it \(No such file or directory\); check the path"),
    ("lr: [1\n", r"--config .*c\.yaml: not valid YAML \(.*line 2.*\); fix the file"),
    ("- lr: 1\n", r"--config .*c\.yaml: expected a mapping of field: value, got a list"),
    ("lrr: 0.1\n", r"/c\.yaml: unknown config key\(s\) 'lrr' \(did you mean 'lr'\?\)"),
    ("steps: many\n", r"/c\.yaml: config field 'steps': cannot use 'many'"),
])
def test_bad_config_file_is_named_via_the_cli(bench, tmp_path, capsys, text, message):
    path = tmp_path / ("none.yaml" if text is None else "c.yaml")
    if text is not None:
        path.write_text(text)
    rc, _, err = run_cli(capsys, *train_argv(bench, tmp_path / "runs"), f"--config={path}")
    assert rc == (1 if text is None else 2) and "Traceback" not in err and re.search(message, err), err
    assert no_files_written(tmp_path / "runs")


def test_unknown_benchmark_name_is_printed_plainly(tmp_path, capsys):
    rc, _, err = run_cli(capsys, *train_argv(Path("PACZ"), tmp_path / "runs"))
    assert rc == 2 and err.startswith("error: unknown benchmark 'PACZ'. Did you mean PACS?"), err


# ------------------------------------------------------------------------------------ 7. divergence

def test_diverging_run_stops_at_the_first_non_finite_loss(bench, tmp_path, capsys):
    """Every step before the failure had a finite loss (one eval record per step), the failure is
    the last record, and the CLI says what to change. (tests/test_train.py covers the refusal to
    resume a failed run.)"""
    argv = train_argv(bench, tmp_path / "runs", lr="1e12", steps="40", eval_every="1", dropout="0")
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 1 and "non-finite loss" in err and "lr" in err and "Traceback" not in err, err
    run = next((tmp_path / "runs").iterdir())
    records = read_jsonl(run / "records.jsonl")
    *evals, failure = records
    assert failure["type"] == "failure" and all(r["type"] == "eval" for r in evals)
    assert [r["step"] for r in evals] == list(range(0, failure["step"] + 1))  # step 0, then stopped at the first
    assert all(np.isfinite(r["loss"]) for r in evals[1:]) and failure["step"] < 40
    assert not (run / "done").exists()
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 1 and "failed earlier" in err and "Delete the folder" in err


def test_non_finite_loss_is_reported_at_its_step_even_when_checked_in_batches(bench, tmp_path, monkeypatch):
    """A NaN loss injected at step 6: the failure record names step 6 and nothing is evaluated or
    checkpointed after it. On a GPU the loop reads losses in batches of 25 (no per-step sync), so
    run on one this covers that path too (device "auto")."""
    real_ce, calls = T.F.cross_entropy, []

    def nan_at_step_6(*a, **k):
        calls.append(1)
        loss = real_ce(*a, **k)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(T.F, "cross_entropy", nan_at_step_6)
    cfg = cfg_for(tmp_path, bench, steps=40, eval_every=20, average_from=20)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 6;"):
        train(cfg)
    run = run_dir_for(cfg)
    start, *rest = read_jsonl(run / "records.jsonl")  # the start (step 0) is evaluated before any update
    assert start["step"] == 0 and rest == [
        {"type": "failure", "step": 6, "reason": f"non-finite loss (nan) at step 6; lr {cfg.lr} is probably too high."}]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 0 and not (run / "done").exists()


# -------------------------------------------------------------- 8. output not writable, disk full

def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_output_folder_is_a_file(bench, tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    rc, _, err = run_cli(capsys, *train_argv(bench, tmp_path / "runs"))
    assert rc == 1 and "Traceback" not in err, err
    assert f"cannot write {tmp_path / 'runs'}" in err and "--out" in err, err
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_disk_full_keeps_previous_results_and_resumes(bench, reference, tmp_path, monkeypatch):
    """ENOSPC while writing last.pt, then records.jsonl (half a line written), then config.json:
    each error names the file and the fix; what was saved before still loads; once space is
    back the same run finishes with the reference's records."""
    cfg = cfg_for(tmp_path, bench)
    run = run_dir_for(cfg)

    # (a) last.pt at step 8: half the temporary file written, then the disk is full
    real_save, saves = torch.save, []

    def full_save(obj, f, *a, **k):
        if Path(f).name.startswith(".last.pt"):
            saves.append(f)
            if len(saves) == 3:  # steps 0 and 4 saved, step 8 fails
                Path(f).write_bytes(b"\0" * 100)
                raise _enospc(f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_save)
    with pytest.raises(T.RunOutputError, match=r"cannot write .*last\.pt.*No space left.*run the same command"):
        train(cfg)
    monkeypatch.undo()
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4  # the previous checkpoint
    assert not list(run.glob(".*.tmp"))  # the partial file was removed
    assert [r["step"] for r in read_jsonl(run / "records.jsonl")] == [0, 4, 8]

    # (b) records.jsonl: the disk fills half-way through a line
    def full_append(path, record):
        line = json.dumps(record, sort_keys=True)
        with open(path, "a") as fh:
            fh.write(line[: len(line) // 2])
        raise _enospc(path)

    monkeypatch.setattr(T, "append_jsonl", full_append)
    with pytest.raises(T.RunOutputError, match=r"cannot write .*records\.jsonl.*No space left"):
        train(cfg)
    monkeypatch.undo()
    assert [r["step"] for r in read_jsonl(run / "records.jsonl")] == [0, 4]  # the half line is ignored

    # (c) config.json: the rename of the complete temporary file fails
    real_replace = os.replace

    def full_replace(src, dst):
        if Path(dst).name == "config.json":
            raise _enospc(dst)
        return real_replace(src, dst)

    old_config = (run / "config.json").read_text()
    monkeypatch.setattr(U.os, "replace", full_replace)
    with pytest.raises(T.RunOutputError, match=r"cannot write .*config\.json.*No space left"):
        train(cfg)
    monkeypatch.undo()
    assert (run / "config.json").read_text() == old_config and not list(run.glob(".*.tmp"))

    # space is back: the same run resumes and ends as if nothing happened
    assert train(cfg) == run
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))
    load_run_model(run, "best")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MB tmpfs: a disk that really fills. Needs root with mount rights (else skipped; the
    monkeypatched test above covers the same on every machine)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_disk_names_the_file_and_resumes(bench, reference, tiny_disk, monkeypatch):
    """The disk fills up during step 8's evaluation. torch.save then fails with a C++ error that
    never says "disk" ("unexpected pos ..."): the error names the checkpoint and the free space."""
    cfg = cfg_for(tiny_disk, bench)
    real_predict, calls = T.predict_all, []

    def fill_disk_then_predict(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # step 0: model; step 4: model, wa; step 8: model
            with open(tiny_disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
        return real_predict(*a, **k)

    monkeypatch.setattr(T, "predict_all", fill_disk_then_predict)
    with pytest.raises(T.RunOutputError, match=r"cannot write .*(best|last)\.pt: .*\(0 MB free on that disk\)"):
        train(cfg)
    monkeypatch.undo()
    run = run_dir_for(cfg)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in read_jsonl(run / "records.jsonl")] in ([0, 4], [0, 4, 8])
    (tiny_disk / "filler").unlink()  # space is back
    train(cfg)
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))


# ------------------------------------------------------------------ 9. pickles that run code

def test_checkpoints_and_weight_files_never_unpickle_code(bench, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    evil = {"model": {"w": torch.zeros(1)}, "step": 4, "payload": _CreatesFile(marker)}
    cfg = cfg_for(tmp_path, bench, steps=4, eval_every=2, average_from=2)
    run = train(cfg)
    for name in ("best.pt", "last.pt"):
        torch.save(evil, run / name)
    assert not marker.exists()
    # best.pt: what soups and analyses load
    with pytest.raises(RuntimeError, match=r"best\.pt: refused.*needs code to load.*delete it"):
        load_run_model(run, "best")
    # last.pt: what a resume loads (the run made unfinished again)
    (run / "done").unlink()
    with pytest.raises(RuntimeError, match=r"last\.pt: refused"):
        train(cfg)
    # --weights-file: a hand-fetched "pretrained" file
    weights = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _CreatesFile(marker)}, weights)
    rc, _, err = run_cli(capsys, *train_argv(bench, tmp_path / "runs2", pretrained="true", weights_file=weights))
    assert rc == 1 and f"weights file {weights} was refused" in err and "Traceback" not in err, err
    assert no_files_written(tmp_path / "runs2")
    assert not marker.exists()  # the payload never ran
