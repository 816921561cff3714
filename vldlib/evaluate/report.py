"""`python -m vldlib report RUNS...`: load, select, tabulate and plot every run into one folder.

Also the evaluate layer's front door: every step a report takes is importable from here
(`from vldlib.evaluate import report as R; R.select(R.load_runs([...]))`).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from vldlib.config import UsageError, add_flag, print_error
from vldlib.evaluate.plots import plot_conditions, plot_iid_vs_ood, plot_rate_curve, plot_training_curves
from vldlib.evaluate.premise import REGIME, premise_markdown, premise_table
from vldlib.evaluate.reference import READ_OFF_NOTE, in_paper_setting, paper_setting
from vldlib.evaluate.scores import find_run_dirs, load_runs, per_step_scores, run_status, split_scores
from vldlib.evaluate.selection import SELECTIONS, select, summarize
from vldlib.evaluate.tables import (
    benchmark_table,
    domainbed_table,
    floors,
    format_cell,
    reference_comparison,
    to_latex,
    to_markdown,
)
from vldlib.paths import shown
from vldlib.utils import atomic_path, write_text_atomic

__all__ = ["EXTRA_ROW_KEYS", "SELECTIONS", "benchmark_table", "collect_results", "default_rows", "domainbed_table",
           "enrich", "experiment_of", "experiment_tables", "find_files", "floors",
           "find_run_dirs", "format_cell", "in_paper_setting", "load_runs", "paper_setting", "per_step_scores", "plot_conditions",
           "plot_iid_vs_ood", "plot_rate_curve", "plot_training_curves", "reference_comparison", "report",
           "run_status", "select", "split_scores", "start_of", "summarize", "to_latex", "to_markdown"]

# config keys that change *what* is being compared; the report adds them to the rows if they vary
EXTRA_ROW_KEYS = ("backbone", "pretrained", "weights_file", "head", "head_lr_mult", "train_stages", "freeze_bn",
                  "steps", "resolution", "val_augment")




def validation_images(selected: pd.DataFrame) -> str:
    """How the i.i.d. (validation) images were evaluated, for the report's header: resized only
    (vldlib's default), with the training augmentation (`val_augment`, the official code's default),
    or a mix (then `val_augment` is a table row)."""
    used = selected["val_augment"].map(lambda v: v in (True, 1, "True", "true")) if "val_augment" in selected else None
    if used is None or not used.any():
        return "(resized, no augmentation)"
    if used.all():
        return "(with the training augmentation: val_augment, as the official code without --outsplit_noaug)"
    return "(some runs with the training augmentation: see the val_augment rows)"


def default_rows(selected: pd.DataFrame, base: Sequence[str] = ("method", "dropout"),
                 extra: Sequence[str] = EXTRA_ROW_KEYS) -> list[str]:
    """`base` plus the columns of `extra` that take several values, each once, so that e.g.
    pretrained and from-scratch runs are never pooled into one table row by accident (and a column
    named twice never breaks the table: "cannot insert head, already exists")."""
    rows = [c for c in base if c in selected.columns]
    for c in extra:
        if c in selected.columns and c not in rows and selected[c].nunique(dropna=False) > 1:
            rows.append(c)
    return rows


def report(paths: Sequence[str | Path], out: str | Path = "outputs/report", selection: str = "training_domain",
           rows: Sequence[str] | None = None, include_unfinished: bool = False,
           over: str | None = "seed", strict: bool = False) -> str:
    """Load, select, tabulate and plot; write everything into `out`; return the Markdown text.

    Files: results.csv (tidy, every evaluation), selected.csv (one row per run and method),
    table.md / table.tex (per benchmark: o.o.d. and i.i.d. DomainBed tables, then the summary
    across benchmarks and the comparison with the paper), ood_vs_iid.png, rate_curve.png.
    Runs still training (neither done nor failed) are left out unless `include_unfinished`. Runs
    whose records have gaps, finished runs whose records.jsonl is gone, and damaged run folders are
    named in the report's notes (a damaged folder is skipped; with `strict` it is an error).
    """
    out = Path(out)
    dirs = find_run_dirs(paths)  # once, so a path without runs is warned about once
    status = run_status(dirs)
    if strict and (status.damaged != "").any():
        bad = status[status.damaged != ""].iloc[0]
        raise ValueError(f"{bad.run}: damaged run folder: {bad.damaged} (without --strict it is skipped)")
    df = load_runs(dirs, strict=strict)
    if df.empty:
        raise UsageError(f"no evaluated runs under {', '.join(map(str, paths))}; train some first "
                         f"(python -m vldlib train ...) or check the paths")
    notes = []
    if not include_unfinished:
        running = df.loc[~df.done & ~df.failed, "run"].unique()
        if len(running):
            notes.append(f"{len(running)} run(s) still training were left out (--include-unfinished keeps them).")
            df = df[~df.run.isin(running)]
    if status.failed.any():
        notes.append(f"{int(status.failed.sum())} run(s) failed: "
                     + "; ".join(f"{Path(r.run).name}: {r.failure_reason}" for r in status[status.failed].itertuples()))
    for rows_, what in (
            (status[status.damaged != ""], "damaged run folder(s) were skipped (delete or repair them)"),
            (status[status.done & ~status.records], "finished run(s) have no records.jsonl (records lost; "
                                                    "retrain them: delete the folder and run the same command)"),
            (status[status.records & (status.missing_steps.fillna("") != "")], "run(s) have gaps in records.jsonl (evaluations "
                                                           "lost; their curves and selection use what is left)")):
        if len(rows_):
            detail = "; ".join(f"{Path(r.run).name}" + (f": steps {r.missing_steps}" if r.missing_steps else "")
                               + (f": {r.damaged}" if r.damaged else "") for r in rows_.itertuples())
            notes.append(f"{len(rows_)} {what}: {detail}")
            print(f"warning: {notes[-1]}", file=sys.stderr)
    if df.empty:
        raise UsageError("every run found is still training; pass --include-unfinished to report them anyway")
    sel = select(df, selection)
    rows = list(rows) if rows else default_rows(sel)
    over_eff = over if over in sel.columns else None

    md = [f"# Report ({selection.replace('_', '-')} selection)", "",
          f"{sel.run.nunique()} runs; accuracy in %, mean ± standard error over "
          f"{over_eff or 'runs'}; o.o.d. = held-out domain's 'in' split, i.i.d. = training domains' 'out' split "
          f"{validation_images(sel)}.",
          *[f"- {n}" for n in notes], ""]
    tex = []
    for b in sorted(sel.benchmark.dropna().unique()):
        for metric, name in (("ood_acc", "o.o.d."), ("iid_acc", "i.i.d.")):
            t = domainbed_table(sel, rows=rows, metric=metric, over=over_eff, benchmark=b)
            md += [f"## {b}: {name} accuracy by held-out domain", "", to_markdown(t), ""]
            tex += [f"% {b}: {name} accuracy by held-out domain", to_latex(t)]
    summary = benchmark_table(sel, rows=rows, over=over_eff)
    md += ["## o.o.d. accuracy per benchmark", "", to_markdown(summary), ""]
    tex += ["% o.o.d. accuracy per benchmark", to_latex(summary)]
    md += premise_section(sel, rows)
    ref = reference_comparison(sel, over=over_eff)
    outside = sel.loc[~in_paper_setting(sel), "run"].nunique()
    if len(ref):
        md += ["## Beside the paper", "", to_markdown(ref), "", READ_OFF_NOTE, ""]
        if outside:
            md += [f"{outside} run(s) outside the paper's setting (ResNet50 #1/#2, full fine-tuning, 224 px, "
                   f"augmentation, 10,000 steps, 1x head lr) are not compared with its numbers.", ""]
        tex += ["% beside the paper", to_latex(ref)]
    text = "\n".join(md)

    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "results.csv") as tmp:
            df.to_csv(tmp, index=False)
        with atomic_path(out / "selected.csv") as tmp:
            sel.to_csv(tmp, index=False)
        write_text_atomic(out / "table.md", text + "\n")
        write_text_atomic(out / "table.tex", "\n".join(tex))
        lines = floors(sel)
        series = [c for c in rows if c != "dropout"]  # one curve per setting: never pool head-only with full runs
        for name, fn in (("ood_vs_iid.png", lambda p: plot_iid_vs_ood(sel, path=p, **lines)),
                         ("rate_curve.png", lambda p: plot_rate_curve(sel, hue=series, path=p, **lines))):
            if "dropout" in sel.columns:
                plt.close(fn(out / name))
    except OSError as e:
        raise ReportOutputError(f"cannot write the report into {out}: {e.strerror or e}"
                                f"{f' ({e.filename})' if e.filename else ''}; choose a writable --out "
                                f"(a folder, not a file).") from None
    return text


def premise_section(selected: pd.DataFrame, rows: Sequence[str]) -> list[str]:
    """The report's premise gauge (`vldlib.evaluate.premise`), one regime per benchmark and setting
    the table rows keep apart: Markdown lines, none when there is no rate 0 to compare with."""
    if "dropout" not in selected.columns or not (selected["dropout"] == 0).any():
        return []
    by = list(dict.fromkeys([*REGIME, *(r for r in rows if r not in ("method", "dropout"))]))
    table = premise_table(selected, by=by)
    if table.empty:
        return []
    return ["## Premise gauge: each rate against 0, training-domain numbers only", "",
            "i.i.d. cost (paired by seed, 95% t interval), eval-mode fit on the training domains' 'in' split, "
            "training-mode accuracy (dropout on), and the relative distance the weights moved; no o.o.d. number "
            "is read.", "", premise_markdown(table), ""]


class ReportOutputError(RuntimeError):
    """The report's --out folder cannot be written (a file, read-only, disk full)."""


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report", help="tables and figures from run directories",
        description="Collect run directories, select one checkpoint per run, write results.csv, "
                    "selected.csv, table.md, table.tex, ood_vs_iid.png and rate_curve.png, and print "
                    "the Markdown tables (with the paper's numbers beside ours where they exist).")
    p.add_argument("runs", nargs="+", help="run directories or folders containing them")
    p.add_argument("--out", default="outputs/report", help="output folder (default: outputs/report)")
    p.add_argument("--selection", default="training_domain", choices=SELECTIONS,
                   help="checkpoint selection (default: training_domain, the paper's)")
    p.add_argument("--rows", default=None,
                   help="comma-separated columns that make table rows (default: method,dropout plus "
                        "backbone/pretrained/head_lr_mult/... when they vary)")
    p.add_argument("--over", default="seed", help="replicate column for standard errors (default: seed)")
    add_flag(p, "--include-unfinished", help="also report runs still training")
    add_flag(p, "--strict", help="fail on a damaged run folder instead of skipping it with a warning")

    def run(args: Any) -> int:
        try:
            text = report(args.runs, out=args.out, selection=args.selection,
                          rows=args.rows.split(",") if args.rows else None,
                          include_unfinished=args.include_unfinished, over=args.over, strict=args.strict)
        except (ValueError, KeyError, OSError, ReportOutputError) as e:
            return print_error(e)  # 2: paths without runs, an unknown column; 1: damaged (--strict), unwritable
        print(text)
        print(f"\nwritten to {args.out}/", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- the report notebook's helpers

def start_of(row: Mapping[str, Any]) -> str:
    """A readable starting-point label from a run's config columns (backbone, pretrained,
    weights_file)."""
    wf = row.get("weights_file")
    if isinstance(wf, str) and wf:
        stem = Path(wf).stem
        return f"{row.get('backbone')}@{stem[stem.index('-noise') + 1:]}" if "-noise" in stem else f"{row.get('backbone')}@{stem}"
    pre = row.get("pretrained", True)
    return str(row.get("backbone")) + ("" if pre in (True, "True", "true", 1) or pd.isna(pre) else "@random")


def _head_of(runs: pd.DataFrame, run: str) -> str:
    """The run's head, "multiblock<k>" or "linear", from its config column (older runs: linear)."""
    head = runs.loc[run, "head"] if "head" in runs.columns else None
    return head if isinstance(head, str) and head else "linear"


def experiment_of(run: str | os.PathLike, results_dir: str | os.PathLike) -> str:
    """The first folder of `run` under `results_dir` (the notebook's or sweep's output folder)."""
    try:
        rel = Path(run).resolve().relative_to(Path(results_dir).resolve())
    except ValueError:
        return "other"
    return rel.parts[0] if len(rel.parts) > 1 else "other"


def enrich(df: pd.DataFrame, results_dir: str | os.PathLike) -> pd.DataFrame:
    """Add the columns that keep experiments apart in a report: experiment (top folder), head
    ("linear" or "multiblock<k>"), start (backbone, @random or @noise<scale>)."""
    if df.empty:
        return df.assign(experiment=[], head=[], start=[])
    runs = df.drop_duplicates("run").set_index("run")
    cols = [c for c in ("backbone", "pretrained", "weights_file") if c in runs.columns]
    info = pd.DataFrame({
        "experiment": [experiment_of(r, results_dir) for r in runs.index],
        "head": [_head_of(runs, r) for r in runs.index],
        "start": [start_of(runs.loc[r, cols].to_dict()) for r in runs.index]}, index=runs.index)
    return df.drop(columns=[c for c in info.columns if c in df.columns]).merge(
        info, left_on="run", right_index=True, how="left")


def collect_results(results_dir: str | os.PathLike, out: str | os.PathLike, selection: str = "training_domain",
                    include_unfinished: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the report notebook starts from: every run under `results_dir` (not under `out`),
    finished ones only unless `include_unfinished`, labelled by `enrich` and selected.
    Returns (status per run folder, selected rows); selected.csv is written into `out`."""
    root, out = Path(results_dir), Path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folders without runs (figures, reports) are expected
        run_dirs = [r for r in find_run_dirs([root]) if out.resolve() not in r.resolve().parents]
    status = run_status(run_dirs)
    df = load_runs(run_dirs)
    if df.empty:
        raise ValueError(f"no evaluated runs under {root}; run the experiment notebooks first, or set results_dir")
    if not include_unfinished:
        df = df[df.done | df.failed]
    selected = select(enrich(df, root), selection)
    out.mkdir(parents=True, exist_ok=True)
    selected.to_csv(out / "selected.csv", index=False)
    return status, selected


def experiment_tables(selected: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """Per (experiment, benchmark), the o.o.d. and i.i.d. DomainBed tables, with rows for whatever
    varies within the experiment: (Markdown lines, one tidy frame of every table)."""
    md, tables = [], []
    if "weights_file" in selected:  # a row label: the file as the project names it, not this machine's path
        selected = selected.assign(weights_file=selected.weights_file.map(lambda v: shown(v) if isinstance(v, str) else v))
    for (exp, bench), sel in selected.groupby(["experiment", "benchmark"]):
        rows = default_rows(sel, extra=(*EXTRA_ROW_KEYS, "head", "start"))
        for metric, name in [("ood_acc", "o.o.d."), ("iid_acc", "i.i.d.")]:
            t = domainbed_table(sel, rows=rows, metric=metric)
            tables.append(t.assign(experiment=exp, benchmark=bench, metric=metric))
            md += [f"## {exp} / {bench}: {name} accuracy", "", to_markdown(t), ""]
    return md, pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def find_files(results_dir: str | os.PathLike, name: str) -> list[Path]:
    """Every file called `name` under results_dir (e.g. the across_runs.csv of each notebook)."""
    return sorted(Path(results_dir).rglob(name))
