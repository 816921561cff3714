"""What the experiment notebooks (01-06, report) share beyond vldlib.results: parameters that may
be a value or a list, across-run soups per group, paired contrasts between any two conditions,
weaker starting points, and the labels a report needs to keep experiments apart.

Notebook parameters are lists so one notebook runs a whole figure; `python -m vldlib sweep`
turns a YAML list into an axis and hands each job a single value. `as_list` accepts both, so the
same notebook serves `papermill -p` and the sweep:

>>> as_list(0.9), as_list([0.0, 0.9]), as_list([[0, 1, 2]]), as_list(None)
([0.9], [0.0, 0.9], [0, 1, 2], None)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from vldlib.results import METHOD_LABELS, summarize
from vldlib.summary import paired_difference


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
    from vldlib.data import get_spec
    from vldlib.data import prepare_benchmark as prepare
    from vldlib.paths import resolve

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


# --------------------------------------------------------------------------- starting points (Fig 8)

def noisy_weights(backbone: str, scale: float, path: str | os.PathLike, seed: int = 0,
                  pretrained: bool = True) -> Path:
    """Write the backbone's ImageNet weights with Gaussian noise added to every floating tensor
    of a conv/linear weight (std = scale x that tensor's std): a "less well pretrained" start
    that exists offline. BatchNorm statistics are left alone. Written once; reused after.
    `pretrained=False` adds the noise to a random initialisation (only for tests)."""
    from vldlib.models import create_model

    path = Path(path)
    if path.exists():
        return path
    model = create_model(backbone, num_classes=1000, pretrained=pretrained)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.dim() >= 2:  # conv and linear weights
            v = v + scale * v.std() * torch.randn(v.shape, generator=gen)
        sd[k] = v.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    tmp.replace(path)
    return path


def starting_point(spec: str, weights_dir: str | os.PathLike, pretrained: bool = True) -> dict[str, Any]:
    """TrainConfig fields for a starting point written "BACKBONE", "BACKBONE@random" or
    "BACKBONE@noise<scale>" (e.g. "efficientnet_lite0.offline@noise0.5").

    >>> starting_point("resnet50.tv_in1k", "w")
    {'backbone': 'resnet50.tv_in1k', 'pretrained': True, 'weights_file': None, 'start': 'resnet50.tv_in1k'}
    """
    backbone, _, mod = spec.partition("@")
    out = {"backbone": backbone, "pretrained": bool(pretrained), "weights_file": None, "start": spec}
    if not mod:
        return out
    if mod == "random":
        return {**out, "pretrained": False}
    if mod.startswith("noise"):
        try:
            scale = float(mod[len("noise"):])
        except ValueError:
            raise ValueError(f"starting point {spec!r}: write the noise scale as a number, e.g. "
                             f"{backbone}@noise0.5") from None
        path = Path(weights_dir) / f"{backbone}-noise{scale:g}.pt"
        path = path.with_name(path.stem + ("" if pretrained else "-randominit") + ".pt")
        return {**out, "pretrained": True, "weights_file": str(noisy_weights(backbone, scale, path, pretrained=bool(pretrained)))}
    raise ValueError(f"starting point {spec!r}: unknown modifier {mod!r}; use BACKBONE, BACKBONE@random "
                     f"or BACKBONE@noise<scale>")


def start_of(row: Mapping[str, Any]) -> str:
    """A readable starting-point label from a run's config columns (backbone, pretrained,
    weights_file)."""
    wf = row.get("weights_file")
    if isinstance(wf, str) and wf:
        stem = Path(wf).stem
        return f"{row.get('backbone')}@{stem[stem.index('-noise') + 1:]}" if "-noise" in stem else f"{row.get('backbone')}@{stem}"
    pre = row.get("pretrained", True)
    return str(row.get("backbone")) + ("" if pre in (True, "True", "true", 1) or pd.isna(pre) else "@random")


# --------------------------------------------------------------------------- across runs (Figs 2, 7)

def across_runs(selected: pd.DataFrame, group: Sequence[str] = ("benchmark", "test_envs", "dropout"),
                methods: Sequence[str] = ("soup_uniform", "soup_greedy", "ens_runs"), min_runs: int = 2,
                load_fn=None, eval_fn=None) -> pd.DataFrame:
    """Uniform/greedy soups and logit ensembles of the finished runs in each group, as rows like
    `select`'s (vldlib.soups.soup_frame), with `group`'s values.

    The runs of a group are the seeds and learning rates/weight decays that share `group`; the
    greedy soup is ordered by each run's selected i.i.d. accuracy (never the test domain).
    Groups with fewer than `min_runs` runs are skipped.
    """
    from vldlib import soups

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
                soups.check_compatible(runs, soups.SOUP_KEYS)
            except ValueError as e:  # e.g. from-scratch runs: every seed starts elsewhere
                print(f"weight averaging skipped for {dict(zip(cols, key))}: {e}")
                weight_methods = []
        if "soup_uniform" in weight_methods:
            res.append(soups.uniform_soup(runs, load_fn=load_fn, eval_fn=eval_fn))
        if "soup_greedy" in weight_methods:
            res.append(soups.greedy_soup(runs, load_fn=load_fn, eval_fn=eval_fn, scores=scores))
        if "ens_runs" in methods:
            res.append(soups.logit_ensemble(runs, load_fn=load_fn, eval_fn=eval_fn))
        if not res:
            continue
        frame = soups.soup_frame(res)
        for c, v in zip(cols, key):
            frame[c] = v
        rows.append(frame)
    if not rows:
        return pd.DataFrame(columns=["run", "method", "iid_acc", "ood_acc", *cols])
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- contrasts

def _mask(df: pd.DataFrame, cond: Mapping[str, Any]) -> pd.Series:
    m = pd.Series(True, index=df.index)
    for k, v in cond.items():
        if k not in df.columns:
            raise KeyError(f"condition {dict(cond)}: no column {k!r}; columns: {', '.join(map(str, df.columns))}")
        col = df[k]
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
            m &= np.isclose(pd.to_numeric(col, errors="coerce").astype(float), float(v))
        else:
            m &= col.astype(str) == str(v)
    return m


def label(cond: Mapping[str, Any]) -> str:
    """ "fine-tuning, dropout=0.9" from {"method": "model", "dropout": 0.9}."""
    parts = [METHOD_LABELS.get(str(v), str(v)) if k == "method" else f"{k}={v:g}" if isinstance(v, float)
             else f"{k}={v}" for k, v in cond.items()]
    return ", ".join(parts)


def contrast(selected: pd.DataFrame, a: Mapping[str, Any], b: Mapping[str, Any],
             pair_on: Sequence[str] = ("test_env", "seed"), metric: str = "ood_acc") -> dict[str, Any]:
    """Mean ± se of metric(b) - metric(a), paired on `pair_on` (each side first averaged within
    each pair key: over learning rates, say). Pair on ("test_env",) when one side has no seed
    (across-run soups)."""
    keys = [k for k in pair_on if k in selected.columns]
    left = selected[_mask(selected, a)].groupby(keys)[metric].mean()
    right = selected[_mask(selected, b)].groupby(keys)[metric].mean()
    return {"a": label(a), "b": label(b), "metric": metric, **paired_difference(left, right),
            "pair_on": ",".join(keys)}


def contrast_sentence(eff: Mapping[str, Any], what: str = "o.o.d. accuracy") -> str:
    """The contrast as a sentence, saying whether it exceeds two standard errors."""
    if eff["n"] == 0:
        return f"{eff['b']} vs {eff['a']}: no paired runs, nothing to compare."
    head = (f"{eff['b']} vs {eff['a']}: {what} {100 * eff['b_mean']:.1f}% vs {100 * eff['a_mean']:.1f}%, "
            f"difference {100 * eff['mean']:+.1f} ± {100 * eff['se']:.1f} points (n={eff['n']} pairs on {eff['pair_on']})")
    if math.isnan(eff["se"]):
        return head + "; a single pair, so no error bar."
    if abs(eff["mean"]) <= 2 * eff["se"] or eff["mean"] == 0:
        return head + ": within 2 standard errors of zero, no detectable difference."
    return head + (": more than 2 standard errors, a detectable gain." if eff["mean"] > 0
                   else ": more than 2 standard errors, a detectable loss.")


def contrast_table(selected: pd.DataFrame, baseline: Mapping[str, Any], others: Iterable[Mapping[str, Any]],
                   pair_on: Sequence[str] = ("test_env", "seed"), metric: str = "ood_acc") -> pd.DataFrame:
    """One contrast per condition in `others` against `baseline`, as a tidy table (points)."""
    rows = []
    for o in others:
        e = contrast(selected, baseline, o, pair_on, metric)
        rows.append({"condition": e["b"], "baseline": e["a"], "n": e["n"], "condition_acc": 100 * e["b_mean"],
                     "baseline_acc": 100 * e["a_mean"], "diff_points": 100 * e["mean"], "se_points": 100 * e["se"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plots

def plot_conditions(selected: pd.DataFrame, x: str, hue: str | None = None, metric: str = "ood_acc",
                    over: str | None = "seed", path: str | os.PathLike | None = None, title: str = ""):
    """Mean ± se of `metric` per `x` (and `hue`), one panel per benchmark: the paper's bar-style
    comparisons (Figs 6-8) as points with error bars."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    by = ["benchmark", x] + ([hue] if hue else [])
    data = selected.copy()
    if over is not None and over not in data.columns:
        over = None
    s = summarize(data, by=by, over=over, metrics=[metric])
    benches = sorted(s.benchmark.dropna().unique())
    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(4.8 * max(1, len(benches)), 3.6), squeeze=False)
    hues = sorted(s[hue].dropna().unique(), key=str) if hue else [None]
    xs = list(dict.fromkeys(s[x].tolist()))
    for ax, b in zip(axes[0], benches):
        sb = s[s.benchmark == b]
        for j, h in enumerate(hues):
            g = sb if h is None else sb[sb[hue] == h]
            pos = [xs.index(v) + (j - (len(hues) - 1) / 2) * 0.15 for v in g[x]]
            ax.errorbar(pos, 100 * g[f"{metric}_mean"], yerr=100 * g[f"{metric}_se"], fmt="o", capsize=3,
                        label=None if h is None else f"{hue}={h}")
        ax.set_xticks(range(len(xs)), [METHOD_LABELS.get(str(v), str(v)) for v in xs], rotation=20, ha="right")
        ax.set(title=title or str(b), xlabel=x, ylabel=("o.o.d." if metric == "ood_acc" else metric) + " accuracy (%)")
        if hue:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


# --------------------------------------------------------------------------- report helpers

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
    from vldlib.multiblock import head_of

    if df.empty:
        return df.assign(experiment=[], head=[], start=[])
    runs = df.drop_duplicates("run").set_index("run")
    cols = [c for c in ("backbone", "pretrained", "weights_file") if c in runs.columns]
    info = pd.DataFrame({
        "experiment": [experiment_of(r, results_dir) for r in runs.index],
        "head": [head_of(r) for r in runs.index],
        "start": [start_of(runs.loc[r, cols].to_dict()) for r in runs.index]}, index=runs.index)
    return df.drop(columns=[c for c in info.columns if c in df.columns]).merge(
        info, left_on="run", right_index=True, how="left")


def paper_setting(selected: pd.DataFrame) -> pd.DataFrame:
    """Runs set up like the paper's reference numbers: pretrained (no noise), the plain linear
    head, 1x head lr, every stage trained. (reference_comparison also filters pretrained and
    head lr; this adds the head and the partial fine-tuning.)"""
    keep = pd.Series(True, index=selected.index)
    if "head" in selected:
        keep &= selected["head"].fillna("linear") == "linear"
    if "weights_file" in selected:
        keep &= selected.weights_file.isna() | (selected.weights_file.astype(str).isin(["", "None"]))
    if "train_stages" in selected:
        keep &= selected.train_stages.isna() | selected.train_stages.astype(str).isin(["", "None", "nan"])
    return selected[keep]


def find_files(results_dir: str | os.PathLike, name: str) -> list[Path]:
    """Every file called `name` under results_dir (e.g. the across_runs.csv of each notebook)."""
    return sorted(Path(results_dir).rglob(name))


def full_training_stages(backbone: str, train_stages: int | None, cache_trunk: bool) -> int | None:
    """Training from scratch trains every stage. `train_stages=None` with `cache_trunk` becomes
    "all k stages" (an empty trunk), so the cached "trunk outputs" are the preprocessed images
    and the loop skips decoding and resizing: the same training, much faster on a CPU."""
    if train_stages is not None or not cache_trunk:
        return train_stages
    from vldlib.models import create_model, model_stages

    return len(model_stages(create_model(backbone, 2, pretrained=False)))


def fit_note(curves: pd.DataFrame, by: Sequence[str] = ("dropout",), threshold: float = 0.95) -> str:
    """A sentence on whether each setting fitted its training data by the last step.

    The plateau check looks at i.i.d. validation only, and after the lr decay every curve looks
    flat; with 90% dropout the head may still be far from fitting the training domains (in eval
    mode), and then the rates are compared before convergence, not at it.
    """
    if curves.empty or "train_in_acc" not in curves:
        return "No training-domain accuracy recorded: cannot say whether the runs fitted their training data."
    last = curves[curves.step == curves.groupby("run").step.transform("max")]
    acc = last.groupby(list(by)).train_in_acc.mean()
    low = acc[acc < threshold]
    if low.empty:
        return f"Every setting fitted its training data (training-domain accuracy >= {100 * threshold:.0f}% at the last step)."
    def name(k):
        k = k if isinstance(k, tuple) else (k,)
        return ", ".join(f"{c}={v}" for c, v in zip(by, k))
    return (f"Not fitted by the last step (training-domain accuracy below {100 * threshold:.0f}%): "
            + "; ".join(f"{name(k)}: {100 * v:.0f}%" for k, v in low.items())
            + ". Those rows compare under-trained runs; raise `steps` (or `lr`) before concluding about them.")
