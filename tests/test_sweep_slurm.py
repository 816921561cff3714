"""A real single-node SLURM (Debian's slurm-wlm and munge) runs `python -m vldlib sweep --launcher slurm`.

The test starts a throwaway cluster in a temporary folder (its own slurm.conf, munged with its own
key and socket, no accounting, loopback only), then: a detached 2-job array; `--status`; a re-run
that reattaches instead of submitting again; one task cancelled (scancel) and the other's process
killed (kill -9), both reported failed with SLURM's state; a re-run whose task is preempted
(USR2, as submitit's own `_interrupt` sends) and requeued; an identical re-run that skips both; a
task pending on the partition's time limit is warned about. A second sweep checks that each state
shown says what SLURM did (slurmctld stopped, scancel, a failing notebook, a job finished while
detached); a third that a task's CPUs size its training runs. The daemons are always stopped.
`.ci/setup` installs the packages; without them (or without root) the test is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TOOLS = ["slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "scontrol", "sinfo"]
MISSING = [t for t in TOOLS if shutil.which(t, path=SBIN) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM/munge not installed ({', '.join(MISSING)} missing): "
                       f"apt-get install -y slurm-wlm munge (.ci/setup does it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the throwaway SLURM runs its daemons as root (SlurmUser=root)"),
]

BODY = """\
import json, os, pathlib, time
pathlib.Path(output_dir, "pid").write_text(str(os.getppid()))  # the SLURM task's python (papermill)
with open(os.path.join(output_dir, "attempts.txt"), "a") as f:
    f.write("attempt\\n")
while hold and os.path.exists(hold):  # lets the test act while this job runs
    time.sleep(0.1)
if fail:
    raise RuntimeError("asked to fail")
pathlib.Path(output_dir, "result.json").write_text(json.dumps({"a": a}))
with open(os.path.join(os.path.dirname(output_dir), "runs.txt"), "a") as f:
    f.write(os.path.basename(output_dir) + "\\n")
"""


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check,
                          env={**os.environ, "PATH": SBIN})


class Cluster:
    """slurmctld + slurmd + munged under one folder; `stop()` ends exactly the daemons it started."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vldlib-slurm-"))  # short: munge's socket path is limited
        self.conf = self.dir / "slurm.conf"
        self.pid_files = [self.dir / n for n in ("slurmd.pid", "slurmctld.pid", "munged.pid")]

    def start(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "munge.sock"
        _run("munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
             f"--log-file={d / 'log/munged.log'}", f"--seed-file={d / 'munged.seed'}", "--origin=127.0.0.1")
        wait_for("munged's socket", sock.exists, 10)
        node = dict(kv.split("=", 1) for kv in _run("slurmd", "-C").stdout.split() if "=" in kv)
        self.conf.write_text(f"""\
ClusterName=vldlibtest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={node.get('CPUs', 2)} RealMemory={node.get('RealMemory', 1000)} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=localhost Default=NO MaxTime=30 State=UP
""")
        os.environ["SLURM_CONF"] = str(self.conf)
        _run("slurmctld", "-f", str(self.conf))
        _run("slurmd", "-N", "localhost", "-f", str(self.conf))
        wait_for("the node to be idle", lambda: _run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
                 .startswith("idle"), 60)

    def stop_controller(self) -> None:
        """slurmctld ends (SIGTERM, as an admin or a crash would leave it); the node and its tasks run on."""
        pid = int((self.dir / "slurmctld.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_for("slurmctld to exit", lambda: not Path(f"/proc/{pid}").exists(), 30, every=0.2)

    def start_controller(self) -> None:
        """slurmctld again, from its saved state: the tasks that ran on are its tasks again."""
        _run("slurmctld", "-f", str(self.conf))
        wait_for("squeue to answer", lambda: _run("squeue", "-h", check=False).returncode == 0, 60)

    def stop(self) -> None:
        _run("scancel", "-u", "root", check=False)
        try:
            wait_for("the queue to empty", lambda: not _run("squeue", "-h", check=False).stdout.strip(), 30)
        except pytest.fail.Exception:
            pass
        for pid_file in self.pid_files:
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.time() + 10
            while time.time() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        os.environ.pop("SLURM_CONF", None)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted((self.dir / "log").glob("*.log")))


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
    except BaseException as e:
        log = c.log_tail()
        c.stop()
        if isinstance(e, (subprocess.CalledProcessError, pytest.fail.Exception)):
            stderr = getattr(e, "stderr", "")
            pytest.fail(f"could not start the throwaway SLURM: {e}\n{stderr}\n{log}")
        raise
    yield c
    c.stop()


def make_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('a = 1\nhold = ""\nfail = False\noutput_dir = "."')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def sweep(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vldlib", "sweep", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, "PATH": SBIN})


def sweep_bg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vldlib", "sweep", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PATH": SBIN})


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def queue() -> dict[str, tuple[str, str, str]]:
    out = _run("squeue", "-h", "-r", "-o", "%i|%T|%r|%j").stdout
    return {p[0]: (p[1], p[2], p[3]) for p in (ln.split("|") for ln in out.splitlines()) if len(p) == 4}


def test_real_slurm_detach_reattach_fail_requeue_skip(cluster, tmp_path):
    old_umask = os.umask(0o022)
    t0, timeline = time.time(), []

    def mark(event: str) -> None:
        timeline.append(f"{time.time() - t0:6.1f} s  {event}")

    try:
        nb = make_notebook(tmp_path / "tiny.ipynb")
        out, hold = tmp_path / "out", {1: tmp_path / "hold1", 2: tmp_path / "hold2"}
        for h in hold.values():
            h.touch()
        grid = tmp_path / "grid.yaml"
        grid.write_text("".join(f"- {{a: {a}, hold: '{h}'}}\n" for a, h in hold.items()))
        args = [str(nb), "--grid", str(grid), "--out", str(out), "--launcher", "slurm", "--jobs", "2",
                "--time", "10", "--poll-s", "1"]

        # 1. --detach submits one array (at most 2 at once) and returns
        r = sweep(*args, "--detach")
        assert r.returncode == 0, r.stderr
        assert "2 jobs:" in r.stdout and "detached" in r.stdout, r.stdout
        registry = json.loads((out / "slurm_jobs.json").read_text())
        folders = {a: next(out.glob(f"a={a},*")) for a in hold}
        ids = {a: registry[folders[a].name]["job_id"] for a in hold}
        array_id = ids[1].split("_")[0]
        assert ids == {1: f"{array_id}_0", 2: f"{array_id}_1"}
        shown = _run("scontrol", "show", "job", "-o", array_id).stdout
        assert "ArrayTaskThrottle=2" in shown, shown  # --jobs 2 -> %2
        script = (out / "slurm-logs" / array_id / f"{array_id}_submission.sh").read_text()
        assert "#SBATCH --array=0-1%2" in script and f"#SBATCH --job-name=sweep:{out.name}" in script, script
        csv = pd.read_csv(out / "sweep.csv", dtype=str)
        assert set(csv.status) <= {"pending", "running"} and set(csv.job_id) == set(ids.values()), csv
        for a, d in folders.items():
            spec = json.loads((d / "job.json").read_text())
            assert spec["slurm"]["job_id"] == ids[a] and (d / "slurm.err").resolve() == Path(spec["slurm"]["stderr"])
        mark(f"detached: array {array_id}, tasks {sorted(ids.values())}")
        # meanwhile, a sweep asking more time than the partition allows (checked in step 5)
        pending = sweep_bg(str(nb), "--set", "a=9", "--out", str(tmp_path / "stuck"), "--launcher", "slurm",
                           "--partition", "short", "--time", "60", "--poll-s", "1")

        wait_for("both tasks to run their notebook", lambda: all((d / "pid").exists() for d in folders.values()),
                 120)
        names = {q[2] for q in queue().values()}
        assert {f"{out.name}:{d.name}" for d in folders.values()} <= names, names  # tasks named after the point
        r = sweep("--status", str(out))
        assert r.returncode == 0 and "2 jobs: 2 running" in r.stdout and ids[1] in r.stdout, r.stdout
        mark("both RUNNING; --status shows them")

        # 2. a re-run reattaches; then one task is cancelled and the other's process killed
        rerun = sweep_bg(*args)
        try:
            err = ""
            deadline = time.time() + 90
            while "reattached to 2" not in err:
                assert rerun.poll() is None, rerun.communicate()
                assert time.time() < deadline, "the re-run did not reattach"
                time.sleep(0.5)
                err = _peek(rerun)
            assert json.loads((out / "slurm_jobs.json").read_text()) == registry  # nothing submitted twice
            mark("re-run reattached to both (no new submission)")
            _run("scancel", ids[1])
            os.kill(int((folders[2] / "pid").read_text()), signal.SIGKILL)
            mark(f"scancel {ids[1]}; kill -9 the task process of {ids[2]}")
            stdout, stderr = rerun.communicate(timeout=120)
        finally:
            if rerun.poll() is None:
                rerun.kill()
        assert rerun.returncode == 1, stderr
        df = pd.read_csv(out / "sweep.csv", dtype=str).set_index("a")
        assert list(df.status) == ["failed", "failed"], df.to_string()
        assert df.state["1"] == "CANCELLED" and df.state["2"] == "FAILED", df.to_string()
        killed = json.loads((folders[2] / "error.json").read_text())
        assert killed["state"] == "FAILED" and killed["job_id"] == ids[2] and Path(killed["log"]).exists()
        assert f"SLURM task {ids[2]} ended FAILED" in df.error["2"] and killed["log"] in df.error["2"]
        assert (folders[1] / "error.json").exists() and "CANCELLED" in stdout and "FAILED" in stdout, stdout
        mark(f"re-run ended: {dict(df.state)} (error.json written, log {Path(killed['log']).name})")

        # 3. re-run: both resubmitted; a=1 is preempted (USR2) and requeued, then finishes
        hold[2].unlink()
        attempts = lines(folders[1] / "attempts.txt")
        rerun = sweep_bg(*args)
        try:
            wait_for("a=1 to start again", lambda: lines(folders[1] / "attempts.txt") > attempts, 120)
            new_id = json.loads((out / "slurm_jobs.json").read_text())[folders[1].name]["job_id"]
            assert new_id not in ids.values()
            mark(f"resubmitted as {new_id}; sending USR2 (preemption)")
            _run("scancel", "--signal=USR2", new_id)
            wait_for("the requeue", lambda: queue().get(new_id, ("",))[0] == "PENDING", 60)
            mark(f"{new_id} requeued: {queue().get(new_id)}")
            _run("scontrol", "update", f"JobId={new_id}", "StartTime=now")  # skip SLURM's requeue delay
            wait_for("the requeued task to start", lambda: lines(folders[1] / "attempts.txt") > attempts + 1, 120)
            mark(f"{new_id} running again")
            hold[1].unlink()
            stdout, stderr = rerun.communicate(timeout=120)
        finally:
            if rerun.poll() is None:
                rerun.kill()
        assert rerun.returncode == 0, stderr
        assert "2 jobs: 2 done" in stdout, stdout
        df = pd.read_csv(out / "sweep.csv", dtype=str).set_index("a")
        assert df.job_id["1"] == new_id and df.state["1"] == "COMPLETED", df.to_string()
        assert "Restarts=1" in _run("scontrol", "show", "job", "-o", new_id).stdout
        assert "requeued" in (folders[1] / "log.txt").read_text()
        mark(f"both done ({dict(df.state)}, elapsed {dict(df.elapsed_s)})")

        # 4. an identical re-run skips both, submits nothing, touches no job file
        before = {p: p.stat().st_mtime_ns for d in folders.values() for p in (d / "log.txt", d / "executed.ipynb")}
        r = sweep(*args)
        assert r.returncode == 0 and "2 jobs: 2 skipped" in r.stdout, r.stdout + r.stderr
        assert {p: p.stat().st_mtime_ns for p in before} == before
        assert all(q[2] == "sweep:stuck" for q in queue().values()), queue()  # nothing of `out` queued
        assert sorted((out / "runs.txt").read_text().split()) == sorted(d.name for d in folders.values())
        for p in (out / "sweep.csv", folders[1] / "done", folders[1] / "job.json", out / "slurm_jobs.json"):
            assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))  # umask 022 respected
        r = sweep("--status", str(out))
        assert "2 jobs: 2 done" in r.stdout, r.stdout
        mark("identical re-run: 2 skipped, nothing submitted; --status: 2 done")

        # 5. the task pending on the partition's time limit was warned about; interrupting leaves it queued
        try:
            deadline = time.time() + 150  # SLURM sets the pending reason at its next scheduling pass
            while "PartitionTimeLimit" not in _peek(pending):
                assert pending.poll() is None and time.time() < deadline, (queue(), _peek(pending)[-3000:])
                time.sleep(0.5)
            mark("PartitionTimeLimit warned")
            pending.send_signal(signal.SIGTERM)
            stderr = _peek(pending) + pending.communicate(timeout=60)[1]
        finally:
            if pending.poll() is None:
                pending.kill()
        assert "keep running" in stderr and "scancel" in stderr, stderr
        assert any(q[1] == "PartitionTimeLimit" for q in queue().values())
        mark("the interrupted sweep left its task queued")
    except BaseException:
        print(cluster.log_tail())
        raise
    finally:
        if "pending" in locals() and pending.poll() is None:
            pending.kill()
        os.umask(old_umask)
        print("\n".join(["real SLURM timeline:", *timeline]))


def test_real_slurm_states_say_what_happened(cluster, tmp_path):
    """Issue 26 (3, 4): what `--status` and a re-run say must be what SLURM did. A detached 3-job
    array, 2 at a time: no progress bar; the third pends for JobArrayTaskLimit, a reason, not an
    error; with slurmctld down `--status` says so, shows the last known states with their age and
    exits 1; a cancelled task is CANCELLED, a failed notebook FAILED (not COMPLETED, nor an empty
    state); a job that finished while detached is reported done with its job id and state."""
    from vldlib.tools.sweep.status import sweep_status

    nb = make_notebook(tmp_path / "tiny.ipynb")
    out, hold = tmp_path / "out", {1: tmp_path / "hold1", 2: tmp_path / "hold2"}
    for h in hold.values():
        h.touch()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"- {{a: 1, hold: '{hold[1]}'}}\n- {{a: 2, hold: '{hold[2]}', fail: true}}\n- {{a: 3}}\n")
    args = ["--out", str(out), "--launcher", "slurm", "--jobs", "2", "--time", "10", "--poll-s", "1"]
    r = sweep(str(nb), "--grid", str(grid), *args, "--detach")
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stderr and "job/s" not in r.stderr, r.stderr  # no progress bar for a detached sweep
    registry = json.loads((out / "slurm_jobs.json").read_text())
    folders = {a: next(out.glob(f"a={a}*")) for a in (1, 2, 3)}
    ids = {a: registry[folders[a].name]["job_id"] for a in folders}
    try:
        wait_for("a=1 and a=2 to run their notebook", lambda: all((folders[a] / "pid").exists() for a in (1, 2)),
                 120)
        wait_for("a=3 to pend for the array's limit", lambda: queue().get(ids[3], ("", ""))[1] == "JobArrayTaskLimit",
                 60)
        df = sweep_status(out).set_index("job_id")
        assert (df.status[ids[3]], df.reason[ids[3]], df.error[ids[3]]) == ("pending", "JobArrayTaskLimit", ""), df

        cluster.stop_controller()
        try:
            r = sweep("--status", str(out))
        finally:
            cluster.start_controller()
        assert r.returncode == 1, r.stdout + r.stderr
        assert "squeue did not answer" in r.stdout and "3 jobs: 3 unknown" in r.stdout, r.stdout
        rows = {a: next(ln for ln in r.stdout.splitlines() if ln.strip().startswith(folders[a].name)) for a in folders}
        for a, state in ((1, "RUNNING"), (2, "RUNNING"), (3, "PENDING")):
            assert f" {state} " in rows[a] and " ago" in rows[a] and ids[a] in rows[a], rows[a]

        _run("scancel", ids[1])  # its kernel dies, the task writes error.json (DeadKernelError), then leaves
        hold[2].unlink()  # a=2's notebook raises
        wait_for("a=1 and a=2 to leave the queue", lambda: not {ids[1], ids[2]} & set(queue()), 120)
        df = sweep_status(out).set_index("job_id")
        assert (df.status[ids[1]], df.state[ids[1]]) == ("failed", "CANCELLED"), df.to_string()
        assert (df.status[ids[2]], df.state[ids[2]]) == ("failed", "FAILED"), df.to_string()
        assert "asked to fail" in df.error[ids[2]]
        assert "JobState=FAILED" in _run("scontrol", "show", "job", "-o", ids[2]).stdout

        wait_for("a=3 to finish while no sweep watches", lambda: (folders[3] / "done").exists(), 120)
        wait_for("a=3 to leave the queue", lambda: ids[3] not in queue(), 60)
        only3 = tmp_path / "grid3.yaml"
        only3.write_text("- {a: 3}\n")  # the same parameters, the same folder: nothing to submit
        for status in ("done", "skipped"):  # reported once as done, then as finished before
            r = sweep(str(nb), "--grid", str(only3), *args)
            assert r.returncode == 0 and f"1 jobs: 1 {status}" in r.stdout, r.stdout + r.stderr
            row = pd.read_csv(out / "sweep.csv", dtype=str).iloc[0]
            assert (row.status, row.job_id, row.state) == (status, ids[3], "COMPLETED"), row
    finally:
        _run("scancel", ids[1].split("_")[0], check=False)


RUNS_AT_ONCE = """\
from vldlib.config import TrainConfig
from vldlib.experiments.grid import parallel_runs_for
print("runs at once:", parallel_runs_for([TrainConfig(device="cpu", num_threads=1)] * 4, None))
"""


def test_real_slurm_task_trains_as_many_runs_at_once_as_it_has_cpus(cluster, tmp_path):
    """A task given 1 CPU on a node of several trains one run at a time, not one per core of the node
    (the node's affinity mask is all of it here: TaskPlugin=task/none binds nothing)."""
    script = tmp_path / "runs_at_once.py"
    script.write_text(RUNS_AT_ONCE)
    node_cpus = int(_run("sinfo", "-h", "-o", "%c").stdout.split()[0].rstrip("+"))
    answers = {}
    for cpus in sorted({1, min(2, node_cpus)}):
        log = tmp_path / f"cpus{cpus}.out"
        _run("sbatch", f"--cpus-per-task={cpus}", f"--output={log}", f"--chdir={ROOT}",
             f"--export=ALL,PYTHONPATH={ROOT}", "--wrap", f"{sys.executable} {script}")
        answers[cpus] = wait_for(f"the {cpus}-CPU task's answer", lambda: "runs at once:" in (
            log.read_text() if log.exists() else "") and log.read_text(), 180)
    assert {c: a.split("runs at once:")[1].split()[0] for c, a in answers.items()} == {c: str(c) for c in answers}


_PEEKED: dict[int, str] = {}


def _peek(proc: subprocess.Popen) -> str:
    """What a running sweep has written to stderr so far (read without blocking)."""
    import fcntl

    fd = proc.stderr.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        chunk = os.read(fd, 1 << 16).decode(errors="replace")
    except BlockingIOError:
        chunk = ""
    _PEEKED[proc.pid] = _PEEKED.get(proc.pid, "") + chunk
    return _PEEKED[proc.pid]
