"""What the experiment notebooks (00-06, report) share: parameters that may be a value or a list,
the set-up from parameters, and across-run soups per group.

Notebook parameters are lists so one notebook runs a whole figure; `python -m vldlib sweep`
turns a YAML list into an axis and hands each job a single value. `as_list` accepts both, so the
same notebook serves `papermill -p` and the sweep:

>>> as_list(0.9), as_list([0.0, 0.9]), as_list([[0, 1, 2]]), as_list(None)
([0.9], [0.0, 0.9], [0, 1, 2], None)
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch

from vldlib.data import get_spec
from vldlib.data import prepare_benchmark as prepare
from vldlib.evaluate import combine
from vldlib.loop import evaluate_logits, load_run_model
from vldlib.paths import resolve

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
    try:
        get_spec(benchmark)
        return bench, benchmark
    except KeyError:
        return bench, str(resolve(benchmark))


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
                load_fn=None, eval_fn=None) -> pd.DataFrame:
    """Uniform/greedy soups and logit ensembles of the finished runs in each group, as rows like
    `select`'s (vldlib.combine.soup_frame), with `group`'s values.

    The runs of a group are the seeds and learning rates/weight decays that share `group`; the
    greedy soup is ordered by each run's selected i.i.d. accuracy (never the test domain).
    Groups with fewer than `min_runs` runs are skipped.
    """
    load_fn, eval_fn = load_fn or load_run_model, eval_fn or evaluate_logits
    cols = [c for c in group if c in selected.columns]
    plain = selected[selected.method == "model"]
    if "done" in plain.columns:
        plain = plain[plain.done.astype(bool)]
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
        if "soup_uniform" in weight_methods:
            res.append(combine.uniform_soup(runs, load_fn=load_fn, eval_fn=eval_fn))
        if "soup_greedy" in weight_methods:
            res.append(combine.greedy_soup(runs, load_fn=load_fn, eval_fn=eval_fn, scores=scores))
        if "ens_runs" in methods:
            res.append(combine.logit_ensemble(runs, load_fn=load_fn, eval_fn=eval_fn))
        if not res:
            continue
        frame = combine.soup_frame(res)
        for c, v in zip(cols, key):
            frame[c] = v
        rows.append(frame)
    if not rows:
        return pd.DataFrame(columns=["run", "method", "iid_acc", "ood_acc", *cols])
    return pd.concat(rows, ignore_index=True)
