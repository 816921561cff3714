"""`python -m vldlib quickstart`: the project's main job, offline, on a CPU.

Executes `notebooks/00_quickstart.ipynb` with papermill (defaults, or `--param key=value`
overrides, `--config notebooks/00_quickstart.gpu.yaml` for the same study fully fine-tuned on a
GPU, or `--paper` for the paper's own configuration), writes the executed notebook,
tidy CSVs, figures and `summary.md` to `outputs/quickstart/`, and prints the summary.
Finished runs are kept, so an interrupted quickstart resumes where it stopped.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import time
from pathlib import Path

import yaml

from vldlib.cliargs import UsageError, add_flag, parse_sets, print_error, read_yaml_mapping
from vldlib.config import TrainConfig
from vldlib.data.registry import benchmark_label
from vldlib.experiments.grid import grid, run_grid, steps_for, with_paths
from vldlib.experiments.tuning import apply_choices, read_choices
from vldlib.paths import find_notebook, locate, project_root, resolve

NOTEBOOK = "notebooks/00_quickstart.ipynb"
PAPER_PARAMS = "notebooks/00_quickstart.paper.yaml"

# The quickstart's defaults. The notebook's parameters cell repeats them (papermill needs literal
# values there), and tests/test_quickstart.py checks that both agree; the bench times
# `quickstart_config()`, built from these.
DEFAULTS = {
    "benchmark": "ObjectStyles",
    "data_dir": "data",
    "output_dir": "outputs/quickstart",
    "runs_dir": None,
    "backbone": "efficientnet_lite0.offline",
    "pretrained": True,
    "resolution": 96,
    "train_stages": 1,
    "cache_trunk": True,
    "augment": False,
    "augment_on": "workers",
    "cache_images": False,
    "dropout_rates": [0.0, 0.9],
    "test_envs": None,
    "seeds": [10, 11, 12, 13, 14, 15, 16, 17, 18],
    "steps": 300,
    "tuned_by": "notebooks/00_quickstart.choices.csv",
    "lr": 0.02,
    "weight_decay": 1e-4,
    "batch_size": 32,
    "eval_every": 50,
    "selection": "training_domain",
    "target_detectable": 0.014,
    "device": "auto",
    "num_threads": 1,
    "parallel_runs": None,
}


def quickstart_config(device: str = "auto", params: dict | None = None) -> TrainConfig:
    """One run of the quickstart (`DEFAULTS`, or `params` over them): its largest dropout rate,
    its first held-out domain. What `python -m vldlib bench` times by default on a CPU."""
    p = {**DEFAULTS, **(params or {})}
    rate = max(p["dropout_rates"])
    return with_paths(TrainConfig(
        benchmark=p["benchmark"], data_dir=p["data_dir"], backbone=p["backbone"], pretrained=p["pretrained"],
        resolution=p["resolution"], train_stages=p["train_stages"], cache_trunk=p["cache_trunk"],
        augment=p["augment"], dropout=rate, steps=steps_for(p["steps"], rate), lr=p["lr"],
        weight_decay=p["weight_decay"], batch_size=p["batch_size"], eval_every=p["eval_every"],
        average_from=p["eval_every"], test_envs=[0] if p["test_envs"] is None else [p["test_envs"][0]],
        device=p["device"] if device == "auto" else device, num_threads=p["num_threads"], keep_last=False,
        save_weights=False, progress=False))


def study_grid(nb) -> list[TrainConfig]:
    """The study's runs from the notebook's set-up (`vldlib.experiments.notebook.setup`): every
    (seed, held-out domain, rate) with the same step budget. Seeds vary slowest, so a study stopped
    early (a time limit, Ctrl-C) has whole seeds finished: complete pairs for the comparison.

    `tuned_by` (a choices table of the effect map, notebook 07): each (rate, held-out domain) trains
    with the lr and weight decay that the map's i.i.d. validation chose for that cell, so both arms
    are tuned alike without the quickstart paying for the grid; None: `lr` and `weight_decay` as given.

    The runs keep no weights (`save_weights=False`): the study reads only their records (its "wa"
    and "ens" are the within-run average and ensemble, recorded at each evaluation), and 72 runs
    would otherwise write 2 GB of best.pt and final.pt."""
    p = nb.params
    if isinstance(p["steps"], dict):
        raise ValueError(f"steps={p['steps']}: the study gives every rate the same budget; pass one number")
    h = nb.hparams()
    configs = grid(nb.base_config(save_weights=False), seed=h["seed"], test_envs=nb.test_env_axis(),
                   dropout=list(p["dropout_rates"]), lr=h["lr"], weight_decay=h["weight_decay"])
    if p.get("tuned_by"):
        configs = apply_choices(configs, read_choices(locate(p["tuned_by"])), source=str(p["tuned_by"]))
    return configs


def run_study_runs(params: dict) -> list[Path]:
    """`quickstart --runs-only`: train the study's runs without the notebook (a GPU box or a cluster
    node without Jupyter). Running the quickstart again with the same parameters then finds them
    finished and only evaluates, tabulates and plots."""
    from vldlib.experiments import notebook

    p = {**DEFAULTS, **params}
    nb = notebook.setup(p, progress=True)
    return run_grid(study_grid(nb), parallel_runs=p.get("parallel_runs"))


def notebook_path(name: str = NOTEBOOK) -> Path:
    """The quickstart's notebook or parameter file: the checkout's, else the installed package's."""
    return find_notebook(name)


def _parse_params(items: list[str]) -> dict:
    """--param KEY=VALUE as YAML (the sweep's rule); an unknown key is refused before anything runs,
    as `sweep` does: a typo would otherwise run the whole study with the default."""
    params = parse_sets(items, "--param")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        hints = [k + "".join(f" (did you mean {c!r}?)" for c in difflib.get_close_matches(k, DEFAULTS, n=1))
                 for k in unknown]
        raise UsageError(f"--param: {', '.join(hints)} not a parameter of the quickstart; its parameters: "
                         f"{', '.join(DEFAULTS)}")
    return params


def default_output_dir(params: dict) -> str:
    """outputs/quickstart for the default benchmark (its summary and figure are committed), and
    outputs/quickstart-<benchmark> for any other, so a study on another benchmark never overwrites them."""
    bench = params.get("benchmark", DEFAULTS["benchmark"])
    if bench == DEFAULTS["benchmark"]:
        return DEFAULTS["output_dir"]
    return f"{DEFAULTS['output_dir']}-{benchmark_label(str(bench))}"


def paper_params() -> dict:
    """The paper's configuration (`--paper`): notebooks/00_quickstart.paper.yaml."""
    return yaml.safe_load(notebook_path(PAPER_PARAMS).read_text())


def _output_dir(params: dict, paper: bool, out: str | None) -> Path:
    """Where run_quickstart writes (its --out, a --param output_dir, the paper file's, or the default)."""
    paper = paper_params() if paper else {}
    return resolve(out or params.get("output_dir") or paper.get("output_dir")
                   or default_output_dir({**paper, **params}))


class _Console:
    """Where papermill writes what the notebook's cells print (stream outputs only: a figure's or a
    table's text repr, `<Figure size 1040x520 with 32 Axes>`, is for the notebook, not the terminal).
    Looks up sys.stdout/sys.stderr at each write, so a redirected or captured stream gets it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> None:
        stream = getattr(sys, self.name)
        stream.write(text)
        stream.flush()

    def flush(self) -> None:
        getattr(sys, self.name).flush()


# The kernel's own log lines go to the terminal (its stderr is ours): at its default level ipykernel
# warns on every start that "Kernel is running over TCP without encryption" (it listens on 127.0.0.1
# and every message is signed with the key of a connection file only this user can read) and, after a
# kill, that its parent exited. Its errors still show.
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]


def read_params_file(path: str | Path) -> dict:
    """A YAML file of notebook parameters (`00_quickstart.gpu.yaml`; a shipped one is found by its
    name from any folder, see `vldlib.paths.locate`); errors name the file."""
    p = locate(path)
    data = read_yaml_mapping(p, "parameter: value")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"--config {p}: unknown parameters {unknown}; the notebook's are {sorted(DEFAULTS)}.")
    return data


def run_quickstart(params: dict | None = None, *, paper: bool = False, output_dir: str | None = None,
                   log_output: bool = True, config: str | Path | None = None) -> Path:
    """Execute the quickstart notebook; return the output folder. `config`: a YAML file of
    parameters (e.g. notebooks/00_quickstart.gpu.yaml), under `params`. `log_output`: show what the
    notebook's cells print (one line per run, ...) on the console as it runs."""
    params = dict(params or {})
    if config is not None:
        params = {**read_params_file(config), **params}
    if paper:
        params = {**paper_params(), **params}
    if output_dir is not None:
        params["output_dir"] = output_dir
    out = resolve(params.get("output_dir") or default_output_dir(params))
    params["output_dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    import papermill as pm  # here, not at the top: `--runs-only` works where Jupyter is not installed

    console = {"stdout_file": _Console("stdout"), "stderr_file": _Console("stderr")} if log_output else {}
    # written as it runs: after a failure it shows the error in place
    pm.execute_notebook(str(notebook_path()), str(out / "00_quickstart.ipynb"), parameters=params,
                        cwd=str(project_root()), progress_bar=False, kernel_name="python3",
                        extra_arguments=QUIET_KERNEL, **console)
    return out


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run the offline CPU study (notebooks/00_quickstart.ipynb)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  python -m vldlib quickstart\n"
                              "  python -m vldlib quickstart --param seeds=[0,1,2,3,4,5,6] --param steps=600\n"
                              "  python -m vldlib quickstart --config notebooks/00_quickstart.gpu.yaml   # GPU, fully fine-tuned\n"
                              "  python -m vldlib quickstart --paper --data-dir /datasets   # GPU, real PACS\n\n"
                              "parameters (--param KEY=VALUE; the notebook's parameters cell, defaults shown):\n"
                              + "".join(f"  {k} = {v!r}\n" for k, v in DEFAULTS.items())
                              + "  (output_dir: outputs/quickstart-<benchmark> when the benchmark is not the default)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter of the notebook (value read as YAML); repeatable")
    add_flag(p, "--paper", help=f"use the paper's configuration ({PAPER_PARAMS})")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="parameters from a YAML file, e.g. notebooks/00_quickstart.gpu.yaml (the study fully "
                        "fine-tuned on a GPU); --param overrides it")
    add_flag(p, "--runs-only", help="train the study's runs and stop, without the notebook (needs no Jupyter); "
                                    "the same command without it then renders the notebook from the finished runs")
    p.add_argument("--data-dir", help="where benchmarks live (default: data/)")
    p.add_argument("--out", help="output folder (default: outputs/quickstart)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        params = _parse_params(args.param)
        if args.config:
            params = {**read_params_file(args.config), **params}
        if not args.runs_only:
            notebook_path()  # found before anything runs; the error names where it looked
    except (ValueError, FileNotFoundError) as e:
        return print_error(e)
    if args.data_dir:
        params["data_dir"] = args.data_dir
    t0 = time.perf_counter()
    try:
        if args.runs_only:
            return _cli_runs_only(params, args, t0)
        out = run_quickstart(params, paper=args.paper, output_dir=args.out)
    except KeyboardInterrupt:  # Ctrl-C: one line, not the kernel's traceback
        # nbclient's cell task ends with the interrupted cell's error, and asyncio would log it
        # with its whole traceback when the task is collected at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        partial = ("" if args.runs_only else
                   f" (partial notebook: {_output_dir(params, args.paper, args.out) / '00_quickstart.ipynb'})")
        print(f"\ninterrupted: finished runs are kept; run the same command again to resume{partial}",
              file=sys.stderr)
        return 130
    except Exception as e:  # papermill raises PapermillExecutionError with the cell's traceback
        if args.runs_only:  # no notebook: the error as it is
            raise
        print(f"error: the quickstart notebook failed: {e}", file=sys.stderr)
        print(f"the executed notebook, showing the error in place, is "
              f"{_output_dir(params, args.paper, args.out) / '00_quickstart.ipynb'}; "
              "finished runs are kept, so running the same command again resumes", file=sys.stderr)
        return 1
    print()
    print((out / "summary.md").read_text())
    print(f"[vldlib] quickstart finished in {time.perf_counter() - t0:.0f} s; notebook, tables and figures in {out}")
    return 0


def _cli_runs_only(params: dict, args: argparse.Namespace, t0: float) -> int:
    if args.paper:
        params = {**paper_params(), **params}
    params["output_dir"] = str(_output_dir(params, False, args.out))
    run_dirs = run_study_runs(params)
    done = sum((d / "done").exists() for d in run_dirs)
    print(f"[vldlib] {done} of {len(run_dirs)} runs finished in {time.perf_counter() - t0:.0f} s, under "
          f"{params['output_dir']}; the same command without --runs-only renders the notebook from them")
    return 0 if done == len(run_dirs) else 1
