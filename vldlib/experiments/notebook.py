"""What the experiment notebooks (00-06, report) share: the set-up from their parameters cell, the
base config, loading and checking the runs, the summary writer, and across-run soups per group.

A notebook's code is then its experiment: which grid to run, which tables, figures and effects
to show. `setup(globals())` reads the parameters cell (papermill injects overrides into the same
names), so every notebook starts with:

>>> nb = setup(globals())                                   # doctest: +SKIP
>>> run_dirs = run_grid(grid(nb.base_config(), test_envs=nb.test_env_axis(), **nb.hparams()))  # doctest: +SKIP
>>> df, curves, plateau = nb.collect(run_dirs)              # doctest: +SKIP

Notebook parameters are lists so one notebook runs a whole figure; `python -m vldlib sweep`
turns a YAML list into an axis and hands each job a single value. `as_list` accepts both, so the
same notebook serves `papermill -p` and the sweep:

>>> as_list(0.9), as_list([0.0, 0.9]), as_list([[0, 1, 2]]), as_list(None)
([0.9], [0.0, 0.9], [0, 1, 2], None)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch

from vldlib.config import TrainConfig
from vldlib.data import MultiDomainFolder
from vldlib.data import prepare_benchmark as prepare
from vldlib.data.registry import is_benchmark_path
from vldlib.evaluate import combine, convergence, power
from vldlib.evaluate.scores import load_runs
from vldlib.evaluate.selection import select
from vldlib.evaluate.tables import domainbed_table, to_markdown
from vldlib.loop import evaluate_logits, load_run_model
from vldlib.paths import resolve

def display(obj) -> None:
    """IPython's display in a notebook; print where IPython is missing (a GPU box or cluster node
    running `quickstart --runs-only` without Jupyter imports this module too)."""
    try:
        from IPython.display import display as show
    except ImportError:
        print(getattr(obj, "data", obj))
        return
    show(obj)


def Markdown(text: str):  # noqa: N802 - IPython's name
    try:
        from IPython.display import Markdown as md
    except ImportError:
        return text
    return md(text)


# What the CPU defaults are, against the paper: every experiment notebook's summary says it.
SCALE_CAVEAT = ("Scale caveat: the paper fine-tunes all of ResNet50 for 10,000 steps on photographs at 224 px; the "
                "CPU defaults train conv_head (the last 1x1 convolution) and the head of EfficientNet-Lite0 for {steps} steps on {benchmark} at "
                "{resolution} px. An effect absent here says nothing against the paper; one present here is a hint, not a "
                "replication.")

# --------------------------------------------------------------------------- parameters

def as_list(value: Any) -> list | None:
    """A notebook parameter as a list: a scalar becomes [scalar]; one level of nesting is flattened
    (a sweep grid writes a list-valued parameter as [[...]]); None stays None ("all")."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        out: list = []
        for v in value:
            out.extend(v if isinstance(v, (list, tuple)) else [v])
        return out
    return [value]


def setup_torch(num_threads: int | None) -> None:
    """Fix torch's CPU threads (> 0). Small CPU ops run fastest on 1 thread when cores are shared."""
    if num_threads:
        torch.set_num_threads(int(num_threads))


def prepare_benchmark(benchmark: str, data_dir: str, progress: bool = False):
    """`vldlib.data.prepare_benchmark`, plus the name to put in TrainConfig (the registered name,
    or the resolved folder path)."""
    bench = prepare(benchmark, data_dir, progress=progress)
    return bench, (str(resolve(benchmark)) if is_benchmark_path(benchmark) else benchmark)


def held_out(test_envs: Any, n_domains: int) -> list[int]:
    """Held-out domain indices: None means every domain in turn; each checked against the count."""
    envs = as_list(test_envs)
    envs = list(range(n_domains)) if envs is None else [int(t) for t in envs]
    bad = [t for t in envs if not 0 <= t < n_domains]
    if bad:
        raise ValueError(f"test_envs {bad} out of range: the benchmark has {n_domains} domains; use 0..{n_domains - 1}")
    return envs


# --------------------------------------------------------------------------- across runs (Figs 2, 7)

def across_runs(selected: pd.DataFrame, group: Sequence[str] = ("benchmark", "test_envs", "dropout"),
                methods: Sequence[str] = ("soup_uniform", "soup_greedy", "ens_runs"), min_runs: int = 2,
                load_fn=None, eval_fn=None, which: Sequence[str] = combine.WHICH) -> pd.DataFrame:
    """Uniform/greedy soups and logit ensembles of the finished runs in each group, as rows like
    `select`'s (vldlib.combine.soup_frame), with `group`'s values.

    The runs of a group are the seeds and learning rates/weight decays that share `group`; the
    greedy soup is ordered by each run's selected i.i.d. accuracy (never the test domain).
    Groups with fewer than `min_runs` runs are skipped. `which`: each run's best.pt (DiWA's choice),
    its final weights (the paper's Fig 1), or both (the default; column `which` tells them apart;
    the greedy soup of final weights orders runs by their final weights' i.i.d. accuracy).
    """
    load_fn, eval_fn = load_fn or load_run_model, eval_fn or evaluate_logits
    cols = [c for c in group if c in selected.columns]
    plain = selected[selected.method == "model"]
    if "done" in plain.columns:
        plain = plain[plain.done.astype(bool)]
    # every run that will be read, refused at once (naming them all and the fix) if any kept no
    # weights (save_weights=False), before the first group's soup spends minutes
    if methods:
        combine.check_weights_kept(sorted({r for _, g in plain.groupby(cols, dropna=False, sort=True)
                                           if g.run.nunique() >= min_runs for r in g.run.unique()}),
                                   "averaged or ensembled across runs")
    rows = []
    for key, g in plain.groupby(cols, dropna=False, sort=True):
        runs = sorted(g.run.unique())
        if len(runs) < min_runs:
            continue
        key = key if isinstance(key, tuple) else (key,)
        scores = dict(zip(g.run, g.iid_acc))
        res = []
        weight_methods = [m for m in ("soup_uniform", "soup_greedy") if m in methods]
        if weight_methods:
            try:
                combine.check_compatible(runs, combine.SOUP_KEYS)
            except ValueError as e:  # e.g. from-scratch runs: every seed starts elsewhere
                print(f"weight averaging skipped for {dict(zip(cols, key))}: {e}")
                weight_methods = []
        for w in as_list(which):
            if "soup_uniform" in weight_methods:
                res.append(combine.uniform_soup(runs, w, load_fn=load_fn, eval_fn=eval_fn))
            if "soup_greedy" in weight_methods:
                res.append(combine.greedy_soup(runs, w, load_fn=load_fn, eval_fn=eval_fn,
                                               scores=scores if w == "best" else None))
            if "ens_runs" in methods:
                res.append(combine.logit_ensemble(runs, w, load_fn=load_fn, eval_fn=eval_fn))
        if not res:
            continue
        frame = combine.soup_frame(res)
        for c, v in zip(cols, key):
            frame[c] = v
        rows.append(frame)
    if not rows:
        return pd.DataFrame(columns=["run", "method", "which", "iid_acc", "ood_acc", *cols])
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- one notebook's set-up

# parameters-cell names that are TrainConfig fields, copied into `base_config` as they are
CONFIG_PARAMS = ("data_dir", "backbone", "pretrained", "resolution", "train_stages", "cache_trunk", "augment",
                 "augment_on", "cache_images", "channels_last", "batch_size", "eval_every", "device", "freeze_bn",
                 "lr_decay_at", "train_fraction", "save_weights")


@dataclass
class Notebook:
    """One experiment notebook's resolved set-up (see `setup`)."""

    params: dict[str, Any]  # the parameters cell's values (after papermill's overrides)
    out: Path  # output_dir, resolved against the project root
    runs_out: Path  # where run folders go (runs_dir, or output_dir/runs)
    bench: MultiDomainFolder
    benchmark: str  # the name to put in TrainConfig (registered name, or the resolved folder path)
    envs: list[int] = field(default_factory=list)  # held-out domain indices, in turn

    @property
    def domains(self) -> list[str]:
        return self.bench.domains

    def base_config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig every run of the notebook starts from: its parameters, averaging and
        evaluation every `eval_every` steps, runs under `runs_out`, last.pt not kept. A study that
        reads only records.jsonl (no soups across runs, no analysis of the weights) passes
        `save_weights=False` (or the notebook's parameter of that name): no best.pt or final.pt,
        30 MB a Lite0 run."""
        p = self.params
        fields = {k: p[k] for k in CONFIG_PARAMS if k in p}
        if not isinstance(p.get("steps"), dict) and p.get("steps") is not None:  # None: the benchmark's
            fields["steps"] = int(p["steps"])
        fields.update(benchmark=self.benchmark, average_from=p.get("eval_every") or 300, out=str(self.runs_out),
                      keep_last=False, num_threads=p.get("num_threads") or 0)
        return dataclasses.replace(TrainConfig(**fields), **overrides)

    def hparams(self) -> dict[str, list]:
        """The replicate axes: learning rates, weight decays and seeds (each a value or a list)."""
        p = self.params
        return dict(lr=as_list(p["lr"]), weight_decay=as_list(p["weight_decay"]), seed=as_list(p["seeds"]))

    def test_env_axis(self) -> list[list[int]]:
        return [[t] for t in self.envs]

    def collect(self, run_dirs: Sequence[Path], by: Sequence[str] = ("dropout",), hue: str = "dropout",
                label: Callable[[pd.DataFrame], pd.DataFrame] | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Load the runs (results.csv; `label` adds the notebook's own columns), plot their
        validation curves (curves.png, shown inline) and check that each setting plateaued
        (plateau.csv, shown): (df, curves, plateau)."""
        df = load_runs(run_dirs)
        if label is not None:
            df = label(df)
        df.to_csv(self.out / "results.csv", index=False)
        curves = convergence.validation_curves(df)
        style = next((c for c in by if c != hue and c in curves.columns), None)  # one line per (style, rate)
        fig = convergence.plot_validation_curves(curves, hue=hue, style=style)
        fig.savefig(self.out / "curves.png", dpi=100, bbox_inches="tight")
        plt.show()
        plateau = convergence.plateau_check(curves, by=tuple(by))
        plateau.to_csv(self.out / "plateau.csv", index=False)
        display(plateau)
        return df, curves, plateau

    def floors(self) -> dict[str, float]:
        """{"majority": the majority-class rate of the images that score the held-out domains
        (`power.held_out_floor`), averaged over them, "chance": 1/K}: pass them to a figure
        (`plot_rate_curve(..., **nb.floors())`) so every accuracy has its floor beside it."""
        majority, chance = power.held_out_floor(self.bench, self.envs)
        return {"majority": majority, "chance": chance}

    def show_tables(self, selected: pd.DataFrame, rows: Sequence[str] = ("method", "dropout"),
                    name: str = "table") -> pd.DataFrame:
        """The o.o.d. and i.i.d. DomainBed tables (rows never run are left out), shown, the o.o.d.
        one saved as `name`.csv and returned (it is the table the summary prints)."""
        table = domainbed_table(selected, rows=rows)
        table.to_csv(self.out / f"{name}.csv", index=False)
        iid = domainbed_table(selected, rows=rows, metric="iid_acc")
        display(Markdown("**o.o.d. accuracy**\n\n" + to_markdown(table) + "\n\n**i.i.d. accuracy**\n\n"
                         + to_markdown(iid)))
        return table

    def select(self, df: pd.DataFrame) -> pd.DataFrame:
        """One checkpoint per run by the notebook's `selection` (selected.csv)."""
        selected = select(df, self.params.get("selection", "training_domain"))
        selected.to_csv(self.out / "selected.csv", index=False)
        return selected

    def write_summary(self, title: str, selected: pd.DataFrame, table: pd.DataFrame, lines: Sequence[str],
                      caveat: str = SCALE_CAVEAT, extra: str = "", **facts: Any) -> str:
        """summary.md: what ran, the error's n (one seed: no standard error), the held-out domains'
        majority-class and chance rates, the o.o.d. table, one line per computed effect, the scale
        caveat (formatted with the parameters, `facts` over them, and the benchmark's name);
        written, shown, and returned."""
        p = {**self.params, **facts, "benchmark": self.bench.name}  # the name a reader knows, not a folder path
        held = ", ".join(self.domains[t] for t in self.envs)
        floor = self.floors()
        seeds = selected.seed.nunique() if "seed" in selected else 0
        error = ("mean ± standard error over seeds" if seeds > 1 else
                 "one seed (n=1): no standard error, so differences below a few points may be noise")
        text = (f"# {title}\n\n{selected.run.nunique()} runs on `{self.bench.name}` (held out: {held}), backbone\n"
                f"`{p.get('backbone')}`, {p.get('steps')} steps, resolution {p.get('resolution')}, "
                f"train_stages={p.get('train_stages')}, selection: {p.get('selection', 'training_domain')}.\n"
                f"Accuracy in %, {error}. Majority class of the held-out domain(s): "
                f"{100 * floor['majority']:.1f}%; chance: {100 * floor['chance']:.1f}%.\n\n{to_markdown(table)}\n\n"
                + "\n".join("- " + s for s in lines) + "\n\n" + (extra + "\n\n" if extra else "")
                + caveat.format(**p) + "\n")
        (self.out / "summary.md").write_text(text)
        display(Markdown(text))
        return text


def setup(params: Mapping[str, Any], progress: bool = False) -> Notebook:
    """A notebook's set-up from its parameters (pass `globals()`): torch threads, the output
    folders, the benchmark (built first when it is an offline one), the held-out domains.
    Only the parameter names are read; nothing is written into `params`."""
    p = {k: v for k, v in params.items()
         if not k.startswith("_") and isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))}
    setup_torch(p.get("num_threads"))
    out = resolve(p["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    runs_out = resolve(p["runs_dir"]) if p.get("runs_dir") else out / "runs"
    pd.set_option("display.precision", 3)
    bench, name = prepare_benchmark(p["benchmark"], p.get("data_dir", "data"), progress=progress)
    envs = held_out(p.get("test_envs"), len(bench.domains))
    print(f"{bench.name}: domains {bench.domains}; held out in turn: {[bench.domains[t] for t in envs]}")
    return Notebook(p, out, runs_out, bench, name, envs)
