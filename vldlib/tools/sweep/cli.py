"""`python -m vldlib sweep`: run a notebook over a grid of parameters, resumably.

    python -m vldlib sweep notebooks/train.ipynb --grid grids/fig3.yaml --out runs/fig3 --jobs 2 --gpus 0,1
    python -m vldlib sweep notebooks/train.ipynb --grid grids/fig3.yaml --out runs/fig3 --launcher slurm \\
        --partition gpu --gpus-per-node 1 --time 240 --jobs 8 --setup "module load cuda" --detach
    python -m vldlib sweep --status runs/fig3

A grid YAML maps each notebook parameter to a value or a list of values; lists are axes and the
jobs are their product (`layers: [[2, 3, 4]]` is one list-valued parameter). A YAML list of such
mappings concatenates their expansions. Each parameter set gets the folder DIR/<varying params>-<hash>;
the notebook receives `output_dir`, that folder. A folder holds `job.json`, `log.txt`,
`executed.ipynb` and, written last, `done`; jobs with `done` are skipped, so running the same
command again loses no finished work (delete `done` to force a job). A failed job leaves
`error.json` (and `failed.ipynb` when the notebook raised). DIR/sweep.csv summarises every job.

On SLURM the jobs form one array (`--jobs N` runs at most N at once). Job ids are kept in
DIR/slurm_jobs.json and each job.json, and JOB/slurm.out, JOB/slurm.err link the task's logs.
Running the command again reattaches to tasks still queued or running (a job that finished while
detached is then reported done, with its job id and state); `--detach` submits and returns;
`--status DIR` shows each job's state (and exits 1 when SLURM does not answer: it then shows the
last known states, with their age). A task at its time limit or preempted is requeued
(submitit's checkpoint): its notebook skips finished runs and training resumes from last.pt. A task
that leaves the queue without a result is reported failed with SLURM's state (FAILED, TIMEOUT,
OUT_OF_MEMORY, ...) and its log.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from vldlib.cliargs import UsageError, add_flag, print_error
from vldlib.tools.sweep.grid import parse_sets
from vldlib.tools.sweep.jobs import KERNEL
from vldlib.tools.sweep.lock import SweepLockedError
from vldlib.tools.sweep.runner import LAUNCHERS, failure_table, prepare, run_sweep


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (jobs running at once), got {value}")
    return value


def _dry_run(args: argparse.Namespace, overrides: dict, jobs: int | None) -> int:
    planned = prepare(args.notebook, args.grid, args.out, overrides)
    for job in planned:
        print(f"{'done' if job.done_path.exists() else 'todo'}  {job.out_dir}")
    if args.launcher == "slurm":
        how = f"one SLURM array, {f'{jobs} at a time' if jobs else 'all at once'}"
    else:
        how = f"{args.launcher} launcher, {jobs or 1} at a time"
    print(f"{len(planned)} jobs, {sum(not j.done_path.exists() for j in planned)} to run ({how})")
    return 0


def _status(out: str) -> int:
    from vldlib.tools.sweep.status import status_text, sweep_status

    try:
        df = sweep_status(out)
    except FileNotFoundError as e:
        return print_error(e)  # 1: no sweep there
    print(status_text(df))
    return 1 if df.attrs.get("unanswered") else 0  # the states shown may be stale: a script must not trust them


def _cmd(args: argparse.Namespace) -> int:
    if args.status:
        return _status(args.status)
    if not args.notebook or not args.out:
        return print_error(UsageError("give a NOTEBOOK and --out DIR (or --status DIR to look at a sweep)"))
    try:
        overrides = parse_sets(args.set or [])
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        jobs = args.jobs if args.jobs is not None else (len(gpus) if gpus and args.launcher == "local" else None)
        if args.dry_run:
            return _dry_run(args, overrides, jobs)
        options = {"partition": args.partition, "time": args.time, "gpus_per_node": args.gpus_per_node,
                   "cpus": args.cpus, "mem": args.mem, "slurm_opt": parse_sets(args.slurm_opt or [], "--slurm-opt"),
                   "setup": args.setup, "cluster": args.slurm_cluster,
                   "detach": args.detach, "poll_s": args.poll_s} if args.launcher == "slurm" else {}
        if args.detach and args.launcher != "slurm":
            raise ValueError("--detach needs --launcher slurm: local jobs are this process's children")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops workers cleanly, like Ctrl-C
        df = run_sweep(args.notebook, args.grid, args.out, launcher=args.launcher, jobs=jobs, gpus=gpus,
                       overrides=overrides, kernel_name=args.kernel, progress=not args.detach,
                       launcher_options={k: v for k, v in options.items() if v is not None})
    except ValueError as e:  # a bad --set, grid or option: bad usage (2)
        return print_error(e if isinstance(e, UsageError) else UsageError(str(e)))
    except (SweepLockedError, FileNotFoundError, RuntimeError) as e:  # another sweep, a missing file: 1
        return print_error(e)
    counts = df.status.value_counts().to_dict()
    print(f"{len(df)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f". Summary: {Path(args.out).resolve() / 'sweep.csv'}")
    if args.detach:
        print(f"detached: see `python -m vldlib sweep --status {args.out}`; run the same command again to wait "
              f"for the tasks (it reattaches, submitting nothing twice)")
    table = failure_table(df)
    if table:
        print("failures (open the notebook or log to see why; run the same command again to retry):")
        print(table)
        return 1
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a notebook over a grid of parameters (resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebook", nargs="?", help="notebook with a cell tagged 'parameters'")
    p.add_argument("--grid", help="YAML grid (parameter -> value or list); none = run the notebook once")
    p.add_argument("--out", help="output folder: one sub-folder per job, sweep.csv, lock")
    p.add_argument("--status", metavar="DIR", help="show each job's state in the sweep folder DIR; run nothing")
    p.add_argument("--launcher", default="local", choices=sorted(LAUNCHERS))
    p.add_argument("--jobs", type=_positive, default=None,
                   help="jobs at a time (local default: number of --gpus, else 1; slurm: the array's %%N, "
                        "default all)")
    p.add_argument("--gpus", help="comma-separated GPU ids handed one per job via CUDA_VISIBLE_DEVICES")
    add_flag(p, "--dry-run", help="print the jobs and whether each is done; run nothing")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter in every job "
                   "(YAML value; a list becomes an axis); repeatable")
    p.add_argument("--kernel", default=KERNEL, help="Jupyter kernel name (default: %(default)s)")
    s = p.add_argument_group("slurm launcher (submitit)")
    s.add_argument("--partition")
    s.add_argument("--time", type=int, default=None, help="minutes per task (default 1440); a task is "
                   "requeued at its limit (at most 3 times)")
    s.add_argument("--gpus-per-node", type=int, default=None)
    s.add_argument("--cpus", type=int, default=None, help="CPUs per task")
    s.add_argument("--mem", type=float, default=None, help="GB per task")
    s.add_argument("--setup", action="append", metavar="LINE", help="shell line run before each task, e.g. "
                   "'module load cuda'; repeatable")
    s.add_argument("--slurm-opt", action="append", metavar="KEY=VALUE", help="raw sbatch option; repeatable")
    add_flag(s, "--detach", help="submit and return; the tasks run on, see --status")
    s.add_argument("--poll-s", type=float, default=None, help="seconds between squeue calls (default 15)")
    s.add_argument("--slurm-cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit executor; 'local' tries the path without SLURM")
    p.set_defaults(func=_cmd)
