"""DomainBed-style tables (mean ± standard error per held-out domain), the summary across
benchmarks, the paper's numbers beside ours, and Markdown/LaTeX output."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vldlib.data.folder import DataError, load_benchmark
from vldlib.evaluate.power import held_out_floor
from vldlib.evaluate.reference import METHOD_LABELS, paper_reference, paper_setting, reference_benchmark
from vldlib.evaluate.selection import check_columns, summarize


def format_cell(mean: float, se: float, percent: bool = True, digits: int = 1, n: int | None = None) -> str:
    """ "78.7 ± 0.3" (percent) or "0.787 ± 0.003"; "-" for a missing mean; the mean alone when
    `n` is 1 (one replicate has no standard error: "± 0.0" would claim a precision never measured).

    >>> format_cell(0.7871, 0.0032), format_cell(0.7871, 0.0, n=1)
    ('78.7 ± 0.3', '78.7')
    """
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    scale = 100.0 if percent else 1.0
    if n is not None and not pd.isna(n) and int(n) == 1:
        return f"{mean * scale:.{digits}f}"
    se = 0.0 if se is None or (isinstance(se, float) and math.isnan(se)) else se
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def floors(selected: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{"majority": {benchmark: rate}, "chance": {benchmark: 1/K}} for the benchmarks in
    `selected` whose folders can still be read (from each run's data_dir): the majority rate of the
    images that score each held-out domain present (`power.held_out_floor`), averaged over them like the
    o.o.d. accuracy it is the floor of. Benchmarks that cannot be read are left out (their figures
    then have no floor lines)."""
    out: dict[str, dict[str, float]] = {"majority": {}, "chance": {}}
    if selected.empty or "benchmark" not in selected:
        return out
    for b, g in selected.groupby("benchmark"):
        data_dir = g.data_dir.dropna().iloc[0] if "data_dir" in g and g.data_dir.notna().any() else None
        try:
            bench = load_benchmark(b, data_dir, check_images=False, progress=False)
        except (DataError, KeyError, OSError):
            continue
        held = [bench.domains.index(d) for d in g.get("test_domain", pd.Series(dtype=str)).dropna().unique()
                if d in bench.domains]
        if held:
            out["majority"][b] = held_out_floor(bench, held)[0]
        out["chance"][b] = 1.0 / len(bench.classes)
    return out


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
    pivot = summary.pivot_table(index=rows, columns=column, values=[f"{metric}_mean", f"{metric}_se", "n"],
                                dropna=False, sort=True, aggfunc="first")
    # dropna=False makes every combination of the row values; keep only rows some run filled
    pivot = pivot[pivot["n"].fillna(0).max(axis=1) > 0]
    cells = pd.DataFrame(index=pivot.index)
    for value in order:
        cells[value] = [format_cell(m, s, percent, digits, n) for m, s, n in
                        zip(pivot[(f"{metric}_mean", value)], pivot[(f"{metric}_se", value)], pivot[("n", value)])]
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
    check_columns(sel, [*rows, "test_domain", metric], "domainbed_table")
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
        avg_cells = {i: (s.loc[i, f"{metric}_mean"], s.loc[i, f"{metric}_se"], s.loc[i, "n"]) for i in s.index}
    else:  # rows are the replicates: mean of the domain means, se of a mean of independent means
        means, ses = table[f"{metric}_mean"][order], table[f"{metric}_se"][order]
        avg_cells = {i: (means.loc[i].mean(), math.sqrt((ses.loc[i] ** 2).sum()) / len(order), None)
                     for i in table.index if means.loc[i].notna().all()}
    out["Avg"] = [format_cell(*avg_cells[i][:2], percent, digits, n=avg_cells[i][2]) if i in avg_cells else "-"
                  for i in out.index]
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
    single = out["n"][benches].fillna(0).max(axis=1) <= 1
    table["Avg"] = [format_cell(m, e, percent, digits, n=1 if one else None) if ok else "-" for m, e, ok, one in
                    zip(means.mean(axis=1), np.sqrt((ses ** 2).sum(axis=1)) / len(benches), full, single)]
    return _method_first(table.reset_index())


def reference_comparison(selected: pd.DataFrame, over: str | None = "seed") -> pd.DataFrame:
    """Our means beside the paper's, for every (benchmark, method, dropout) the paper reports.

    Only runs in the paper's setting are compared (`vldlib.evaluate.reference.in_paper_setting`:
    ResNet50 #1/#2, full fine-tuning, 224 px, augmentation, 10,000 steps, ...); the benchmark names
    match case-insensitively. Columns: benchmark, method, dropout, n, ours_iid,
    ours_ood (mean ± se, percent), paper_iid, paper_ood, diff_ood (ours - paper, points).
    Empty when nothing matches.
    """
    cols = ["benchmark", "method", "dropout", "n", "ours_iid", "ours_ood", "paper_iid", "paper_ood",
            "diff_ood"]
    if selected.empty or "dropout" not in selected:
        return pd.DataFrame(columns=cols)
    sel = paper_setting(selected).copy()
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
        "ours_iid": [format_cell(a, b, n=k) for a, b, k in zip(m.iid_acc_mean, m.iid_acc_se, m.n)],
        "ours_ood": [format_cell(a, b, n=k) for a, b, k in zip(m.ood_acc_mean, m.ood_acc_se, m.n)],
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
