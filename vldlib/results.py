"""Collect run directories into one tidy table, select checkpoints, tabulate, plot, report.

A run directory (written by `vldlib.train`) holds config.json, meta.json, records.jsonl (one
"eval" record every 300 steps and at the last step, maybe a "failure" record) and `done`.
Everything below is a pure function of the tidy table that `load_runs` builds, so model
selection is tested with records written by hand, the way DomainBed tests its own.

Accuracy conventions (DomainBed's, which the paper uses): each domain is split 80/20 into "in"
and "out". For a run holding out env t,
  - i.i.d. (validation) accuracy = mean over training envs i != t of `env{i}_out`;
  - o.o.d. (test) accuracy       = `env{t}_in`, the test domain's 80% "in" part. (The "out" part
    of the test domain is reserved for the oracle selection method; it is never used for
    reporting, so o.o.d. numbers are comparable across selection methods.)
With several test envs, both are means over the envs concerned.

Example:
    >>> df = load_runs(["outputs/runs"])                      # doctest: +SKIP
    >>> sel = select(df, "training_domain")  # one row per (run, method)   # doctest: +SKIP
    >>> print(to_markdown(domainbed_table(sel[sel.benchmark == "PACS"])))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from vldlib.reference import METHOD_LABELS, READ_OFF_NOTE, paper_reference, reference_benchmark
from vldlib.utils import read_json, atomic_path, read_jsonl, write_text_atomic

SELECTIONS = ("training_domain", "oracle", "last")
METHODS = ("model", "wa", "ens")  # current weights, trajectory weight average, trajectory ensemble
_KEY = re.compile(r"^env(\d+)_(in|out)$")

# columns that vary within a run; everything else in the tidy table is constant per run
ROW_COLS = ["method", "step", "env", "domain", "split", "is_test", "acc", "loss", "step_lr",
            "train_acc", "step_time", "peak_mem_mb"]
RUN_COLS = ["run", "benchmark", "test_env", "test_envs", "test_domain", "done", "failed", "failure_reason"]
# config keys that must not split table rows by default: replicates and bookkeeping
REPLICATE_KEYS = ("seed", "trial_seed", "lr", "weight_decay", "data_dir", "test_envs", "test_env",
                  "test_domain", "out_dir", "run_dir")
# config keys that change *what* is being compared; the report adds them to the rows if they vary
EXTRA_ROW_KEYS = ("backbone", "pretrained", "weights_file", "head", "head_lr_mult", "train_stages", "freeze_bn",
                  "steps", "resolution")


# --------------------------------------------------------------------------- loading

def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (folders holding records.jsonl) at or below each path, sorted, no duplicates.

    >>> find_run_dirs(["outputs/runs"])   # doctest: +SKIP
    [PosixPath('outputs/runs/PACS-3f2a...'), ...]
    """
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory; pass run directories or folders "
                                    f"that contain them")
        if p.is_file():
            p = p.parent
        if (p / "records.jsonl").exists():
            found[p] = None
            continue
        sub = sorted(r.parent for r in p.rglob("records.jsonl"))
        if not sub:
            warnings.warn(f"{p}: no records.jsonl at or below it; skipped (not a run directory, or "
                          f"no run has evaluated yet)", stacklevel=2)
        found.update(dict.fromkeys(sub))
    return sorted(found)




def _readable(value: Any) -> Any:
    """Lists/dicts as short strings, so config columns stay hashable (groupby) and CSV-friendly."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _run_info(run: Path, config: dict, meta: dict, records: list[dict]) -> dict[str, Any] | None:
    test_envs = meta.get("test_envs", config.get("test_envs"))
    if test_envs is None:
        warnings.warn(f"{run}: neither config.json nor meta.json names test_envs, so the held-out "
                      f"domain is unknown; skipped", stacklevel=3)
        return None
    test_envs = [int(t) for t in (test_envs if isinstance(test_envs, (list, tuple)) else [test_envs])]
    domains = list(meta.get("domains") or [])
    failures = [r for r in records if r.get("type") == "failure"]
    info: dict[str, Any] = {
        "run": str(run),
        "benchmark": meta.get("benchmark", config.get("benchmark")),
        "test_env": test_envs[0] if len(test_envs) == 1 else pd.NA,
        "test_envs": _readable(test_envs),
        "test_domain": ",".join(domains[t] if t < len(domains) else f"env{t}" for t in test_envs),
        "done": (run / "done").exists(),
        "failed": bool(failures),
        "failure_reason": failures[-1].get("reason", "") if failures else "",
        # which split of the held-out domain measures o.o.d. accuracy (see split_scores)
        "ood_split": meta.get("ood_split", "in"),
    }
    for k, v in config.items():
        if k in ("benchmark", "test_envs"):
            continue
        info[k if k not in info and k not in ROW_COLS else f"config_{k}"] = _readable(v)
    info["_domains"] = domains
    info["_test_envs"] = set(test_envs)
    return info


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The tidy long table: one row per (run, step, method, env, split), with `acc`.

    `paths` are run directories or folders searched recursively for records.jsonl. Columns:
    run, benchmark, test_env (int, NA when several), test_envs ("3" or "0,1"), test_domain,
    method ("model" current weights, "wa" trajectory weight average, "ens" trajectory ensemble),
    step, env, domain, split ("in"/"out"), is_test, acc, loss, step_lr (the learning rate at that
    step; `lr` is the config's), train_acc, step_time, peak_mem_mb, done, failed, failure_reason,
    then every config.json key (list values joined by commas; a key clashing with the columns
    above becomes config_<key>). A truncated last line (killed writer) is ignored; runs without
    any eval record are skipped with a warning.

    >>> df = load_runs(["outputs/runs"])   # doctest: +SKIP
    >>> df.query("method == 'model' and is_test and split == 'in'").groupby("run").acc.max()  # doctest: +SKIP
    """
    rows: list[tuple] = []
    infos: list[dict[str, Any]] = []
    for run in find_run_dirs(paths):
        records = read_jsonl(run / "records.jsonl")
        evals = [r for r in records if r.get("type", "eval") == "eval" and "acc" in r]
        config, meta = read_json(run / "config.json"), read_json(run / "meta.json")
        if not evals:
            why = "it failed before its first evaluation" if any(r.get("type") == "failure" for r in records) \
                else "no evaluation recorded yet"
            warnings.warn(f"{run}: {why}; skipped", stacklevel=2)
            continue
        info = _run_info(run, config, meta, records)
        if info is None:
            continue
        domains, test_envs = info.pop("_domains"), info.pop("_test_envs")
        infos.append(info)
        for r in evals:
            for method, accs in r["acc"].items():
                for key, acc in (accs or {}).items():
                    m = _KEY.match(key)
                    if m is None:
                        continue  # e.g. a future extra metric; the tidy table is per split only
                    env, split = int(m.group(1)), m.group(2)
                    rows.append((info["run"], method, int(r["step"]), env,
                                 domains[env] if env < len(domains) else f"env{env}", split,
                                 env in test_envs, float(acc), r.get("loss", np.nan), r.get("lr", np.nan),
                                 r.get("train_acc", np.nan), r.get("step_time", np.nan),
                                 r.get("peak_mem_mb", np.nan)))
    if not infos:
        return pd.DataFrame(columns=["run", *ROW_COLS, *RUN_COLS[1:]])
    long = pd.DataFrame(rows, columns=["run", *ROW_COLS])
    runs = pd.DataFrame(infos)
    df = long.merge(runs, on="run", how="left", validate="many_to_one")
    df["test_env"] = df["test_env"].astype("Int64")
    front = ["run", "benchmark", "test_env", "test_envs", "test_domain", *ROW_COLS,
             "done", "failed", "failure_reason"]
    return df[front + [c for c in df.columns if c not in front]].reset_index(drop=True)


def run_status(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run directory found: done, failed, reason, number of evaluations, last step.

    Runs that `load_runs` skips (no evaluation yet, failed at once) still show up here, so a
    report can say how many runs are missing.
    """
    out = []
    for run in find_run_dirs(paths):
        records = read_jsonl(run / "records.jsonl")
        evals = [r for r in records if r.get("type", "eval") == "eval" and "acc" in r]
        fails = [r for r in records if r.get("type") == "failure"]
        out.append({"run": str(run), "done": (run / "done").exists(), "failed": bool(fails),
                    "failure_reason": fails[-1].get("reason", "") if fails else "",
                    "n_evals": len(evals), "last_step": max((r["step"] for r in evals), default=None)})
    return pd.DataFrame(out, columns=["run", "done", "failed", "failure_reason", "n_evals", "last_step"])


# --------------------------------------------------------------------------- selection

def split_scores(acc: dict[str, float], test_envs: Iterable[int], ood_split: str = "in") -> dict[str, float]:
    """iid_acc, ood_acc and oracle_acc (test-domain "out") from one `{"env0_in": ..}` dict.

    `ood_split` is "in" (DomainBed's convention) except for benchmarks whose domains show the
    same objects (emoji): there the held-out domain's "in" part holds objects trained on in other
    styles, so o.o.d. is measured on its "out" part (objects never trained on), and the oracle on
    the "in" part. The run's meta.json says which.

    >>> split_scores({"env0_in": .9, "env0_out": .8, "env1_in": .5, "env1_out": .4}, [1])
    {'iid_acc': 0.8, 'ood_acc': 0.5, 'oracle_acc': 0.4}
    """
    test_envs = set(int(t) for t in test_envs)
    parts: dict[str, list[float]] = {"iid_acc": [], "ood_acc": [], "oracle_acc": []}
    for key, a in acc.items():
        m = _KEY.match(key)
        if m is None:
            continue
        env, split = int(m.group(1)), m.group(2)
        if env in test_envs:
            parts["ood_acc" if split == ood_split else "oracle_acc"].append(float(a))
        elif split == "out":
            parts["iid_acc"].append(float(a))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in parts.items()}


def per_step_scores(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, method, step): iid_acc, ood_acc, oracle_acc (see the module docstring)."""
    keys = ["run", "method", "step"]
    parts = {
        "iid_acc": df[~df.is_test & (df.split == "out")],
        "ood_acc": df[df.is_test & (df.split == df.ood_split)],
        "oracle_acc": df[df.is_test & (df.split != df.ood_split)],
    }
    scores = pd.concat({k: v.groupby(keys).acc.mean() for k, v in parts.items()}, axis=1)
    extra = df.groupby(keys)[["loss", "train_acc"]].first()
    return scores.join(extra).reset_index()


def select(df: pd.DataFrame, method: str = "training_domain") -> pd.DataFrame:
    """Choose one checkpoint per (run, averaging method); one row each.

    - "training_domain" (the paper's): the step with the highest i.i.d. validation accuracy
      (mean `env{i}_out` over training envs); ties go to the earliest step.
    - "oracle": the step with the highest test-domain `env{t}_out` accuracy (DomainBed's
      test-domain validation, an optimistic upper bound; DomainBed itself applies it to the last
      checkpoint of each run when choosing hyperparameters, we apply it per checkpoint); o.o.d.
      accuracy is still reported on `env{t}_in`.
    - "last": the final evaluated step.

    Columns: run, method, selection, step, last_step, n_evals, iid_acc, ood_acc, oracle_acc,
    train_acc, loss, then the run's constant columns (benchmark, test_env, done, config keys...).

    >>> sel = select(load_runs(["outputs/runs"]), "training_domain")   # doctest: +SKIP
    """
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTIONS)}")
    if df.empty:
        return pd.DataFrame(columns=["run", "method", "selection", "step", "iid_acc", "ood_acc"])
    scores = per_step_scores(df)
    key = {"training_domain": "iid_acc", "oracle": "oracle_acc", "last": "step"}[method]
    usable = scores[scores[key].notna()]
    dropped = set(scores.run) - set(usable.run)
    if dropped:
        what = "training" if key == "iid_acc" else "test"
        warnings.warn(f"{len(dropped)} run(s) have no {what}-domain 'out' accuracy to select with, "
                      f"skipped: {', '.join(sorted(dropped))}", stacklevel=2)
    ascending = key == "step"  # last: largest step last; scores: highest first, then earliest step
    order = usable.sort_values(["run", "method", key, "step"], ascending=[True, True, ascending, True],
                               kind="mergesort")
    chosen = (order.groupby(["run", "method"], sort=False).tail(1) if ascending
              else order.groupby(["run", "method"], sort=False).head(1))
    stats = scores.groupby(["run", "method"]).step.agg(last_step="max", n_evals="size").reset_index()
    chosen = chosen.merge(stats, on=["run", "method"]).assign(selection=method)
    run_cols = [c for c in df.columns if c not in ROW_COLS]
    runs = df[run_cols].drop_duplicates("run")
    out = chosen.merge(runs, on="run", how="left")
    front = ["run", "method", "selection", "step", "last_step", "n_evals", "iid_acc", "ood_acc",
             "oracle_acc", "train_acc", "loss"]
    out = out[front + [c for c in out.columns if c not in front]]
    order_m = {m: i for i, m in enumerate(METHODS)}
    return (out.assign(_m=out.method.map(order_m).fillna(len(order_m)))
            .sort_values(["run", "_m"]).drop(columns="_m").reset_index(drop=True))


# --------------------------------------------------------------------------- summaries and tables

def _check_cols(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: no column(s) {missing} in the table; available: {', '.join(map(str, df.columns))}")


def summarize(selected: pd.DataFrame, by: Sequence[str] = ("benchmark", "method", "dropout"),
              over: str | None = "seed", metrics: Sequence[str] = ("iid_acc", "ood_acc")) -> pd.DataFrame:
    """Mean, standard error and n of each metric per group, the replicates being values of `over`.

    Two levels, as in DomainBed's reporting: first average everything within each (group, `over`
    value) (held-out domains, learning rates, ... whatever is not in `by`), then take mean and
    standard error std/sqrt(n) across the `over` values (se = 0 when n = 1; look at n).
    `over=None` treats every row as a replicate.

    >>> summarize(sel, by=["benchmark", "dropout"])   # doctest: +SKIP
      benchmark  dropout  iid_acc_mean  iid_acc_se  ood_acc_mean  ood_acc_se  n
    """
    by = list(by)
    _check_cols(selected, [*by, *metrics] + ([over] if over else []), "summarize")
    data = selected
    if over is not None:
        data = selected.groupby(by + [over], dropna=False, sort=True)[list(metrics)].mean().reset_index()
    g = data.groupby(by, dropna=False, sort=True)
    out = g.size().rename("n").to_frame()
    for m in metrics:
        mean, std, cnt = g[m].mean(), g[m].std(ddof=1), g[m].count()
        out[f"{m}_mean"] = mean
        out[f"{m}_se"] = (std / np.sqrt(cnt)).where(cnt > 1, 0.0)
    cols = [c for m in metrics for c in (f"{m}_mean", f"{m}_se")] + ["n"]
    return out[cols].reset_index()


def format_cell(mean: float, se: float, percent: bool = True, digits: int = 1) -> str:
    """ "78.7 ± 0.3" (percent) or "0.787 ± 0.003"; "-" for a missing mean.

    >>> format_cell(0.7871, 0.0032)
    '78.7 ± 0.3'
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    scale = 100.0 if percent else 1.0
    se = 0.0 if se is None or (isinstance(se, float) and math.isnan(se)) else se
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def _only_benchmark(selected: pd.DataFrame, benchmark: str | None) -> pd.DataFrame:
    if benchmark is not None:
        selected = selected[selected.benchmark == benchmark]
        if selected.empty:
            raise ValueError(f"no selected runs of benchmark {benchmark!r}")
    names = sorted(selected.benchmark.dropna().unique())
    if len(names) > 1:
        raise ValueError(f"the table mixes benchmarks {names}; pass benchmark=NAME "
                         f"(one table per benchmark) or use benchmark_table")
    return selected


def _method_first(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in the reading order of the paper: fine-tuning, trajectory averages, across runs."""
    if "method" not in table.columns:
        return table
    rank = {m: i for i, m in enumerate(METHOD_LABELS)}
    key = table.method.map(lambda m: rank.get(m, len(rank)))
    return table.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def _cell_table(summary: pd.DataFrame, rows: list[str], column: str, order: Sequence[Any], metric: str,
                percent: bool, digits: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table of "mean ± se" cells, one column per value of `column` in `order`; the pivot of
    means and se's it was formatted from)."""
    pivot = summary.pivot_table(index=rows, columns=column, values=[f"{metric}_mean", f"{metric}_se"],
                                dropna=False, sort=True, aggfunc="first")
    cells = pd.DataFrame(index=pivot.index)
    for value in order:
        cells[value] = [format_cell(m, s, percent, digits) for m, s in
                        zip(pivot[(f"{metric}_mean", value)], pivot[(f"{metric}_se", value)])]
    return cells, pivot


def domainbed_table(selected: pd.DataFrame, rows: Sequence[str] = ("method", "dropout"),
                    metric: str = "ood_acc", over: str | None = "seed", benchmark: str | None = None,
                    percent: bool = True, digits: int = 1) -> pd.DataFrame:
    """DomainBed's table: one row per `rows` value, one column per held-out domain, then "Avg".

    Cells are "mean ± se" over `over` (see `summarize`). "Avg" first averages the held-out
    domains within each replicate, then takes mean ± se across replicates; it is "-" unless the
    row has every held-out domain present in the table (an average over a subset misleads).
    "n" is the number of replicates (the most of any cell), so that se = 0 with n = 1 reads right.

    >>> print(to_markdown(domainbed_table(sel, benchmark="PACS")))   # doctest: +SKIP
    | method | dropout | art_painting | cartoon | photo | sketch | Avg | n |
    """
    rows = list(rows)
    sel = _only_benchmark(selected, benchmark)
    _check_cols(sel, [*rows, "test_domain", metric], "domainbed_table")
    order = (sel[["test_env", "test_domain"]].drop_duplicates()
             .sort_values(["test_env", "test_domain"], na_position="last").test_domain.tolist())
    order = list(dict.fromkeys(order))
    per = summarize(sel, by=rows + ["test_domain"], over=over, metrics=[metric])
    out, table = _cell_table(per, rows, "test_domain", order, metric, percent, digits)
    # Avg over held-out domains, for rows that have every domain of the table
    if over is not None:  # DomainBed: average the domains within each replicate, then mean ± se
        data = sel.groupby(rows + [over, "test_domain"], dropna=False)[metric].mean().reset_index()
        g = data.groupby(rows + [over], dropna=False)
        avg = g[metric].mean()[g.test_domain.nunique() == len(order)].reset_index()
        s = summarize(avg, by=rows, over=over, metrics=[metric]).set_index(rows)
        avg_cells = {i: (s.loc[i, f"{metric}_mean"], s.loc[i, f"{metric}_se"]) for i in s.index}
    else:  # rows are the replicates: mean of the domain means, se of a mean of independent means
        means, ses = table[f"{metric}_mean"][order], table[f"{metric}_se"][order]
        avg_cells = {i: (means.loc[i].mean(), math.sqrt((ses.loc[i] ** 2).sum()) / len(order))
                     for i in table.index if means.loc[i].notna().all()}
    out["Avg"] = [format_cell(*avg_cells[i], percent, digits) if i in avg_cells else "-" for i in out.index]
    out["n"] = per.groupby(rows, dropna=False).n.max().reindex(out.index).fillna(0).astype(int)
    return _method_first(out.reset_index())


def benchmark_table(selected: pd.DataFrame, rows: Sequence[str] = ("method", "dropout"),
                    metric: str = "ood_acc", over: str | None = "seed", percent: bool = True,
                    digits: int = 1) -> pd.DataFrame:
    """One column per benchmark (its mean over held-out domains, ± se over `over`), then "Avg".

    "Avg" is the mean of the benchmark columns, shown only for rows that have every benchmark
    in the table; its se comes from the per-benchmark se's (independent runs): sqrt(sum se^2)/k.
    """
    rows = list(rows)
    s = summarize(selected, by=rows + ["benchmark"], over=over, metrics=[metric])
    benches = sorted(selected.benchmark.dropna().unique())
    table, out = _cell_table(s, rows, "benchmark", benches, metric, percent, digits)
    means, ses = out[f"{metric}_mean"][benches], out[f"{metric}_se"][benches]
    full = means.notna().all(axis=1)
    table["Avg"] = [format_cell(m, e, percent, digits) if ok else "-" for m, e, ok in
                    zip(means.mean(axis=1), np.sqrt((ses ** 2).sum(axis=1)) / len(benches), full)]
    return _method_first(table.reset_index())


def _comparable(selected: pd.DataFrame) -> pd.DataFrame:
    """Runs set up like the paper's reference numbers: pretrained, 1x head lr."""
    keep = pd.Series(True, index=selected.index)
    if "pretrained" in selected:
        keep &= selected.pretrained.astype("boolean").fillna(True).astype(bool)
    if "head_lr_mult" in selected:
        keep &= pd.to_numeric(selected.head_lr_mult, errors="coerce").fillna(1.0) == 1.0
    return selected[keep]


def reference_comparison(selected: pd.DataFrame, over: str | None = "seed") -> pd.DataFrame:
    """Our means beside the paper's, for every (benchmark, method, dropout) the paper reports.

    Only pretrained runs with a 1x head learning rate are compared (the paper's setting); the
    benchmark names match case-insensitively. Columns: benchmark, method, dropout, n, ours_iid,
    ours_ood (mean ± se, percent), paper_iid, paper_ood, diff_ood (ours - paper, points).
    Empty when nothing matches.
    """
    cols = ["benchmark", "method", "dropout", "n", "ours_iid", "ours_ood", "paper_iid", "paper_ood",
            "diff_ood"]
    if selected.empty or "dropout" not in selected:
        return pd.DataFrame(columns=cols)
    sel = _comparable(selected).copy()
    sel["benchmark"] = sel.benchmark.map(reference_benchmark)
    sel = sel[sel.benchmark.notna()]
    if sel.empty:
        return pd.DataFrame(columns=cols)
    sel["dropout"] = pd.to_numeric(sel.dropout).round(4)
    ours = summarize(sel, by=["benchmark", "method", "dropout"], over=over)
    ref = paper_reference().assign(dropout=lambda r: r.dropout.round(4))
    m = ours.merge(ref, on=["benchmark", "method", "dropout"], how="inner")
    pct = lambda v: "-" if pd.isna(v) else f"{100 * v:.1f}"  # noqa: E731
    out = pd.DataFrame({
        "benchmark": m.benchmark, "method": m.method, "dropout": m.dropout, "n": m.n,
        "ours_iid": [format_cell(a, b) for a, b in zip(m.iid_acc_mean, m.iid_acc_se)],
        "ours_ood": [format_cell(a, b) for a, b in zip(m.ood_acc_mean, m.ood_acc_se)],
        "paper_iid": m.iid_acc.map(pct), "paper_ood": m.ood_acc.map(pct),
        "diff_ood": [f"{100 * (a - b):+.1f}" for a, b in zip(m.ood_acc_mean, m.ood_acc)],
    })
    return out[cols].sort_values(["benchmark", "method", "dropout"]).reset_index(drop=True)


def to_markdown(table: pd.DataFrame, **kwargs: Any) -> str:
    """GitHub Markdown via pandas (needs the `tabulate` package, listed in requirements.txt)."""
    try:
        return table.to_markdown(index=False, **kwargs)
    except ImportError as e:
        raise ImportError(f"{e}. Install it with: .venv/bin/python -m pip install tabulate") from None


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(s: Any) -> str:
    text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))
    return text.replace("±", r"$\pm$")


def to_latex(table: pd.DataFrame, **kwargs: Any) -> str:
    """A LaTeX tabular (booktabs rules); names are escaped and "±" becomes $\\pm$."""
    t = table.copy()
    t.columns = [_latex_escape(c) for c in t.columns]
    for c in t.columns:
        t[c] = t[c].map(_latex_escape)
    return t.to_latex(index=False, escape=False, **kwargs)


# --------------------------------------------------------------------------- plots

def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _label(method: Any) -> str:
    return METHOD_LABELS.get(str(method), str(method))


def _panels(n: int, width: float = 4.2, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


def plot_iid_vs_ood(selected: pd.DataFrame, hue: str = "dropout", style: str = "method",
                    over: str | None = "seed", reference: bool = True, path: str | Path | None = None):
    """i.i.d. vs o.o.d. accuracy, one panel per benchmark, like the paper's Fig 2.

    One point per (hue, style) value, averaged over held-out domains and everything else not
    named; error bars are ± se over `over`. With `reference`, the paper's points (fine-tuning
    at each dropout rate) are drawn as grey crosses on the benchmarks it ran. Returns the Figure.
    """
    import seaborn as sns

    _check_cols(selected, [hue, style, "benchmark"], "plot_iid_vs_ood")
    benches = sorted(selected.benchmark.dropna().unique())
    fig, axes = _panels(len(benches))
    s = summarize(selected, by=["benchmark", hue, style], over=over)
    hues = sorted(s[hue].dropna().unique(), key=str)
    colors = dict(zip(hues, sns.color_palette("viridis", max(len(hues), 1))))
    markers = dict(zip(sorted(s[style].dropna().unique(), key=str), "osD^vP*X"))
    for ax, b in zip(axes, benches):
        for _, r in s[s.benchmark == b].iterrows():
            ax.errorbar(100 * r.iid_acc_mean, 100 * r.ood_acc_mean, xerr=100 * r.iid_acc_se,
                        yerr=100 * r.ood_acc_se, fmt=markers.get(r[style], "o"), color=colors.get(r[hue]),
                        ms=7, capsize=2, label=f"{hue}={r[hue]}, {_label(r[style])}")
        ref_b = reference_benchmark(b)
        if reference and ref_b:
            ref = paper_reference().query("benchmark == @ref_b and method == 'model'")
            ax.scatter(100 * ref.iid_acc, 100 * ref.ood_acc, marker="x", color="grey", label="paper (fine-tuning)")
            for _, r in ref.iterrows():
                ax.annotate(f"{r.dropout:g}", (100 * r.iid_acc, 100 * r.ood_acc), fontsize=7, color="grey")
        ax.set(title=str(b), xlabel="i.i.d. accuracy (%)", ylabel="o.o.d. accuracy (%)")
    if benches:
        handles, labels = axes[0].get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        fig.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(uniq), 4), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_rate_curve(selected: pd.DataFrame, x: str = "dropout", hue: str = "method", metric: str = "ood_acc",
                    over: str | None = "seed", reference: bool = True, path: str | Path | None = None):
    """`metric` vs the dropout rate (or any numeric `x`), one panel per benchmark, like Fig 3.

    Error bars are ± se over `over`; the paper's fine-tuning curve is drawn dashed in grey where
    the benchmark matches. Returns the Figure.
    """
    _check_cols(selected, [x, hue, metric, "benchmark"], "plot_rate_curve")
    benches = sorted(selected.benchmark.dropna().unique())
    fig, axes = _panels(len(benches))
    s = summarize(selected, by=["benchmark", hue, x], over=over, metrics=[metric])
    for ax, b in zip(axes, benches):
        sb = s[s.benchmark == b]
        for h, g in sb.groupby(hue, sort=True):
            g = g.sort_values(x)
            ax.errorbar(g[x], 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_se"], marker="o",
                        capsize=2, label=_label(h))
        ref_b = reference_benchmark(b)
        if reference and ref_b and x == "dropout" and metric in ("ood_acc", "iid_acc"):
            ref = paper_reference().query("benchmark == @ref_b and method == 'model'").sort_values("dropout")
            ax.plot(ref.dropout, 100 * ref[metric], "--x", color="grey", label="paper (fine-tuning)")
        ax.set(title=str(b), xlabel=x, ylabel=("o.o.d." if metric == "ood_acc" else metric) + " accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_training_curves(df: pd.DataFrame, run: str | None = None, method: str = "model",
                         path: str | Path | None = None):
    """Accuracy of every split vs step for one run (and the training loss), to check a plateau.

    Solid lines are "in" splits, dashed "out"; the held-out domain is drawn thick. `run` may be
    omitted when the table holds a single run.
    """
    runs = sorted(df.run.unique())
    if run is None:
        if len(runs) != 1:
            raise ValueError(f"the table holds {len(runs)} runs; pass run=... one of: {', '.join(runs[:10])}"
                             + (" ..." if len(runs) > 10 else ""))
        run = runs[0]
    d = df[(df.run == str(run)) & (df.method == method)]
    if d.empty:
        raise ValueError(f"no rows for run={run!r}, method={method!r}; methods present: "
                         f"{sorted(df[df.run == str(run)].method.unique())}")
    fig, (ax, ax2) = _panels(2)
    for (env, split), g in d.groupby(["env", "split"], sort=True):
        g = g.sort_values("step")
        test = bool(g.is_test.iloc[0])
        ax.plot(g.step, 100 * g.acc, "-" if split == "in" else "--", marker="o", ms=3, color=f"C{env % 10}",
                lw=2.5 if test else 1.2, label=f"{g.domain.iloc[0]} {split}{' (test)' if test else ''}")
    steps = d.drop_duplicates("step").sort_values("step")
    ax.set(title=f"{Path(str(run)).name}: {_label(method)}", xlabel="step", ylabel="accuracy (%)")
    ax.legend(fontsize=7)
    ax2.plot(steps.step, steps.loss, marker="o", ms=3, label="training loss")
    if steps.train_acc.notna().any():
        ax2b = ax2.twinx()
        ax2b.grid(False)
        ax2b.plot(steps.step, 100 * steps.train_acc, marker="o", ms=3, color="C1", label="training accuracy")
        ax2b.set_ylabel("training accuracy (%)", color="C1")
    ax2.set(xlabel="step", ylabel="loss", title="training")
    fig.tight_layout()
    _save(fig, path)
    return fig


# --------------------------------------------------------------------------- report command

def default_rows(selected: pd.DataFrame, base: Sequence[str] = ("method", "dropout")) -> list[str]:
    """`base` plus the EXTRA_ROW_KEYS that take several values, so that e.g. pretrained and
    from-scratch runs are never pooled into one table row by accident."""
    rows = [c for c in base if c in selected.columns]
    for c in EXTRA_ROW_KEYS:
        if c in selected.columns and c not in rows and selected[c].nunique(dropna=False) > 1:
            rows.append(c)
    return rows


def report(paths: Sequence[str | Path], out: str | Path = "outputs/report", selection: str = "training_domain",
           rows: Sequence[str] | None = None, include_unfinished: bool = False,
           over: str | None = "seed") -> str:
    """Load, select, tabulate and plot; write everything into `out`; return the Markdown text.

    Files: results.csv (tidy, every evaluation), selected.csv (one row per run and method),
    table.md / table.tex (per benchmark: o.o.d. and i.i.d. DomainBed tables, then the summary
    across benchmarks and the comparison with the paper), ood_vs_iid.png, rate_curve.png.
    Runs still training (neither done nor failed) are left out unless `include_unfinished`.
    """
    out = Path(out)
    dirs = find_run_dirs(paths)  # once, so a path without runs is warned about once
    status = run_status(dirs)
    df = load_runs(dirs)
    if df.empty:
        raise ValueError(f"no evaluated runs under {', '.join(map(str, paths))}; train some first "
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
    if df.empty:
        raise ValueError("every run found is still training; pass --include-unfinished to report them anyway")
    sel = select(df, selection)
    rows = list(rows) if rows else default_rows(sel)
    over_eff = over if over in sel.columns else None

    md = [f"# Report ({selection.replace('_', '-')} selection)", "",
          f"{sel.run.nunique()} runs; accuracy in %, mean ± standard error over "
          f"{over_eff or 'runs'}; o.o.d. = held-out domain's 'in' split, i.i.d. = training domains' 'out' split.",
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
    ref = reference_comparison(sel, over=over_eff)
    if len(ref):
        md += ["## Beside the paper", "", to_markdown(ref), "", READ_OFF_NOTE, ""]
        tex += ["% beside the paper", to_latex(ref)]
    text = "\n".join(md)

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "selected.csv") as tmp:
        sel.to_csv(tmp, index=False)
    write_text_atomic(out / "table.md", text + "\n")
    write_text_atomic(out / "table.tex", "\n".join(tex))
    import matplotlib.pyplot as plt

    for name, fn in (("ood_vs_iid.png", lambda p: plot_iid_vs_ood(sel, path=p)),
                     ("rate_curve.png", lambda p: plot_rate_curve(sel, path=p))):
        if "dropout" in sel.columns:
            plt.close(fn(out / name))
    return text


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
    p.add_argument("--include-unfinished", action="store_true", help="also report runs still training")

    def run(args: Any) -> int:
        try:
            text = report(args.runs, out=args.out, selection=args.selection,
                          rows=args.rows.split(",") if args.rows else None,
                          include_unfinished=args.include_unfinished, over=args.over)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
        print(text)
        print(f"\nwritten to {args.out}/", file=sys.stderr)
        return 0

    p.set_defaults(func=run)
