"""Notebook 12's study: dropout against its analytic penalties on a benchmark, per rate, held-out
domain, seed and depth, and the paired summaries its conclusion is computed from.

Design (the notebook explains it):

- depth 0 ("head"): a linear head on the frozen pretrained penultimate features, fitted full batch
  with dropout p on its inputs, and once per analytic penalty instead (`dropout_l2.fit_head`);
- depth 1 (the network's last stage below the head, e.g. EfficientNet's conv_head): each depth-0
  head and that stage trained on together from the pretrained weights, with the same regulariser
  (`dropout_l2.fit_deep`, on cached trunk outputs);
- a "seed" is the head's initialisation and the dropout masks (training and Monte Carlo); the data
  and the full-batch optimiser are the same for every seed;
- per cell (depth, held-out domain, seed, rate): at the dropout-trained weights, each penalty
  against the Monte-Carlo excess loss of dropout (`dropout_l2.excess_vs_penalties`); and every
  penalty-trained network against the dropout-trained one (accuracies, prediction agreement,
  relative head-weight difference).

Summaries are per seed first (the mean over held-out domains), then across seeds: mean, Student's
t 95% interval and n (`vldlib.evaluate`), paired on the seed where two things are compared.

>>> data = study_data(untrained_run_data(cfg))                         # doctest: +SKIP
>>> fixed, heads = run_study(data, test_envs=None, seeds=range(5), prm=StudyParams())  # doctest: +SKIP
>>> table = by_rate(heads, threshold=0.9)                              # doctest: +SKIP
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from vldlib.loop.device import usable_cores
from vldlib.analysis import dropout_l2 as dl2
from vldlib.evaluate.effects import paired_difference
from vldlib.evaluate.student import t_interval

DEPTH_LABELS = {0: "head", 1: "last stage + head"}  # `depth_labels(net)` names the stage
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StudyParams:
    """What is fitted in every (held-out domain, seed) cell; see the module docstring."""

    rates: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95)
    kinds: Sequence[str] = ("quadratic", "ridge")
    steps: int = 100
    lr: float = 0.01
    n_mc: int = 30
    depths: Sequence[int] = (0, 1)
    deep_rates: Sequence[float] = (0.9,)
    deep_kinds: Sequence[str] = ("quadratic",)
    deep_steps: int = 20
    deep_lr: float = 0.003

    def __post_init__(self):
        self.rates = [float(p) for p in self.rates]
        self.deep_rates = [float(p) for p in self.deep_rates]
        bad = [k for k in [*self.kinds, *self.deep_kinds] if k not in dl2.KINDS]
        if bad:
            raise ValueError(f"unknown penalty kind(s) {bad}; use {dl2.KINDS}")
        if not set(self.depths) <= {0, 1}:
            raise ValueError(f"depths must be among 0 (head) and 1 (last stage + head), got {list(self.depths)}")
        if 1 in self.depths:
            if not set(self.deep_rates) <= set(self.rates) or not set(self.deep_kinds) <= set(self.kinds):
                raise ValueError("depth 1 starts from the depth-0 fits: deep_rates must be among rates and "
                                 f"deep_kinds among kinds (got {self.deep_rates} of {self.rates}, "
                                 f"{list(self.deep_kinds)} of {list(self.kinds)})")


@dataclass
class StudyData:
    """Every (domain, split) of a benchmark as trunk outputs and as pretrained penultimate features."""

    trunk: dict[str, Split]  # "env{i}_in"/"env{i}_out" -> (trunk outputs, labels): depth 1's inputs
    feats: dict[str, Split]  # the same through the pretrained stages: depth 0's features
    net: torch.nn.Module  # a FineTuneNet with trainable stages (train_stages >= 1)
    num_classes: int
    domains: list[str]
    ood_split: str = "in"  # which part of a held-out domain is o.o.d. (`vldlib.evaluate.scores.ood_split`)

    def splits(self, test_env: int, depth: int) -> dict[str, Split]:
        """train (the other domains' "in" parts), iid (their "out" parts) and ood (the held-out
        domain's `ood_split` part), as features (depth 0) or trunk outputs (depth 1)."""
        store = self.feats if depth == 0 else self.trunk
        others = [i for i in range(len(self.domains)) if i != test_env]

        def cat(keys):
            return torch.cat([store[k][0] for k in keys]), torch.cat([store[k][1] for k in keys])

        return {"train": cat([f"env{i}_in" for i in others]), "iid": cat([f"env{i}_out" for i in others]),
                "ood": store[f"env{test_env}_{self.ood_split}"]}


def depth_labels(net) -> dict[int, str]:
    """{0: "head", 1: "<the stage train_stages=1 trains> + head"} ("conv_head + head" for EfficientNet)."""
    from vldlib.model.backbones import depth_name

    return {0: "head", 1: f"{depth_name(net.model, 1)} + head"}


@torch.no_grad()
def study_data(rd, batch: int = 512) -> StudyData:
    """`StudyData` from a `vldlib.analysis.runs.RunData` built with train_stages=1: its trunk outputs,
    and the penultimate features its pretrained stages give them (= the frozen features of
    train_stages=0, computed from the same cache)."""
    net = rd.net.eval()
    trunk = {k: (x.cpu(), y.cpu()) for k, (x, y) in rd.trunk["evals"].items()}
    feats = {k: (torch.cat([net.tail_features(x[i:i + batch]) for i in range(0, len(x), batch)]), y)
             for k, (x, y) in trunk.items()}
    return StudyData(trunk, feats, net, len(rd.meta["classes"]), list(rd.meta["domains"]),
                     rd.meta.get("ood_split", "in"))


# --------------------------------------------------------------------------- one cell: a held-out domain and a seed
def _predict(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return (X @ W.T + b).argmax(1)


def head_rows(models: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, Split]]], extra: dict | None = None
              ) -> list[dict]:
    """One row per mode: accuracy on each split, agreement with the "dropout" model's predictions,
    relative head-weight difference ||W - W_dropout|| / ||W_dropout||. `models`: mode -> (W, b,
    {split: (features, labels)}) (features per mode: at depth 1 each network has its own)."""
    Wd, bd, fd = models["dropout"]
    ref = {s: _predict(Wd, bd, X) for s, (X, _) in fd.items()}
    rows = []
    for mode, (W, b, feats) in models.items():
        row = {"mode": mode, "weight_norm": float(W.norm()), "rel_weight_diff": float((W - Wd).norm() / Wd.norm())}
        for s, (X, y) in feats.items():
            pred = _predict(W, b, X)
            row[f"acc_{s}"] = float((pred == y).float().mean())
            row[f"agree_{s}"] = float((pred == ref[s]).float().mean())
        rows.append({**(extra or {}), **row})
    return rows


def run_cell(data: StudyData, test_env: int, seed: int, prm: StudyParams, device: str = "cpu"
             ) -> tuple[list[dict], list[dict]]:
    """Every fit of one (held-out domain, seed): rows of the fixed-weight table and of the heads table."""
    dev = torch.device(device)
    to = lambda sp: {s: (X.to(dev), y.to(dev)) for s, (X, y) in sp.items()}
    f0 = to(data.splits(test_env, 0))
    x1 = to(data.splits(test_env, 1)) if 1 in prm.depths else None
    X, y = f0["train"]
    C = data.num_classes
    fixed, heads = [], []
    for p in prm.rates:
        keys = {"test_env": test_env, "domain": data.domains[test_env], "seed": seed, "p": p}
        fits = {m: dl2.fit_head(X, y, C, p, m, prm.steps, prm.lr, seed=seed) for m in ["dropout", *prm.kinds]}
        if 0 in prm.depths:
            d = fits["dropout"]
            fixed.append({"depth": 0, **keys, **dl2.excess_vs_penalties(d.W, d.b, X, y, p, prm.n_mc, seed)})
            heads += head_rows({m: (f.W, f.b, f0) for m, f in fits.items()}, {"depth": 0, **keys})
        if x1 is not None and p in prm.deep_rates:
            deep = {m: dl2.fit_deep(data.net, x1["train"][0], y, C, p, m, prm.deep_steps, prm.deep_lr, seed=seed,
                                    init=fits[m]) for m in ["dropout", *prm.deep_kinds]}
            feats = {m: {s: (f.features(xs), ys) for s, (xs, ys) in x1.items()} for m, f in deep.items()}
            d, Xd = deep["dropout"], feats["dropout"]["train"][0]
            fixed.append({"depth": 1, **keys, **dl2.excess_vs_penalties(d.W, d.b, Xd, y, p, prm.n_mc, seed)})
            rows = head_rows({m: (f.W, f.b, feats[m]) for m, f in deep.items()}, {"depth": 1, **keys})
            heads += [{**r, "body_moved": deep[r["mode"]].body_moved} for r in rows]
    return fixed, heads


_DATA: StudyData | None = None


def _start_worker(data: StudyData) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def _cell(test_env: int, seed: int, prm: StudyParams, device: str):
    return run_cell(_DATA, test_env, seed, prm, device)


def run_study(data: StudyData, test_envs: Iterable[int] | None, seeds: Iterable[int], prm: StudyParams,
              workers: int | None = None, device: str = "cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_cell` for every held-out domain (None: all) and seed: (fixed-weight table, heads table).

    `workers` processes (None: one per CPU core; 1: in this process) share the cells on a CPU; on a
    GPU they run one after the other. Each cell is seeded, so the tables do not depend on `workers`."""
    envs = list(range(len(data.domains))) if test_envs is None else [int(e) for e in test_envs]
    cells = [(e, int(s)) for e in envs for s in seeds]
    if device != "cpu":
        workers = 1
    cores = usable_cores()  # what this process may use (a SLURM task's share, a cgroup's quota)
    n = max(1, min(len(cells), workers or cores))
    if n == 1:
        results = [run_cell(data, e, s, prm, device) for e, s in cells]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_start_worker, initargs=(data,)) as pool:
            results = list(pool.map(_cell, *zip(*[(e, s, prm, device) for e, s in cells])))
    order = ["depth", "test_env", "seed", "p"]
    fixed = pd.DataFrame([r for f, _ in results for r in f]).sort_values(order, kind="stable")
    heads = pd.DataFrame([r for _, h in results for r in h]).sort_values(order, kind="stable")
    return fixed.reset_index(drop=True), heads.reset_index(drop=True)


# --------------------------------------------------------------------------- summaries across seeds
def seed_means(df: pd.DataFrame, value: str, keys: Sequence[str]) -> pd.Series:
    """`value` per (keys, seed), averaged over held-out domains: one number per seed."""
    return df.groupby([*keys, "seed"])[value].mean()


def mean_interval(values: pd.Series) -> dict[str, float]:
    """n, mean, standard error and Student's t 95% interval of independent values (here: seeds)."""
    v = values.dropna().astype(float)
    n = int(len(v))
    mean = float(v.mean()) if n else math.nan
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    ci = t_interval(mean, se, n)
    return {"n": n, "mean": mean, "se": se, "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]}


def ratio_by_rate(fixed: pd.DataFrame, kinds: Sequence[str] = dl2.KINDS) -> pd.DataFrame:
    """Per (depth, p, kind): penalty / Monte-Carlo excess at the dropout-trained weights, mean over
    seeds of the per-seed mean over domains, with its 95% t interval and n."""
    rows = []
    for kind in kinds:
        per_seed = seed_means(fixed, f"ratio_{kind}", ["depth", "p"])
        for (depth, p), g in per_seed.groupby(level=["depth", "p"]):
            rows.append({"depth": depth, "p": p, "kind": kind, **mean_interval(g)})
    return pd.DataFrame(rows)


def _contains_zero(eff: dict) -> bool:
    return bool(eff["ci_low"] <= 0 <= eff["ci_high"])


def by_rate(heads: pd.DataFrame, threshold: float = 0.9) -> pd.DataFrame:
    """Per (depth, p, penalty mode): o.o.d. agreement with the dropout network (mean over seeds, 95%
    t interval), relative head-weight difference, and the paired accuracy differences penalty -
    dropout on o.o.d. and i.i.d. data in points (pairs: seeds, each the mean over held-out domains).

    `verdict`: "holds" when the mean o.o.d. agreement is at least `threshold` and both accuracy
    intervals contain 0; "breaks" otherwise; "undecided" below 2 seeds (no interval)."""
    rows = []
    for (depth, p), g in heads.groupby(["depth", "p"]):
        drop = g[g["mode"] == "dropout"]
        for mode, h in g[g["mode"] != "dropout"].groupby("mode", sort=False):
            agree = mean_interval(seed_means(h, "agree_ood", []))
            row = {"depth": depth, "p": p, "mode": mode, "n": agree["n"], "agree_ood": agree["mean"],
                   "agree_ci_low": agree["ci_low"], "agree_ci_high": agree["ci_high"],
                   "agree_iid": float(seed_means(h, "agree_iid", []).mean()),
                   "rel_weight_diff": float(seed_means(h, "rel_weight_diff", []).mean())}
            for split in ("ood", "iid"):
                eff = paired_difference(100 * seed_means(drop, f"acc_{split}", []),
                                        100 * seed_means(h, f"acc_{split}", []))
                row.update({f"{split}_dropout": eff["a_mean"], f"{split}_penalty": eff["b_mean"],
                            f"{split}_diff_points": eff["mean"], f"{split}_ci_low": eff["ci_low"],
                            f"{split}_ci_high": eff["ci_high"], f"{split}_p": eff["p"]})
            if row["n"] < 2:
                row["verdict"] = "undecided"
            else:
                same = _contains_zero({"ci_low": row["ood_ci_low"], "ci_high": row["ood_ci_high"]}) and \
                    _contains_zero({"ci_low": row["iid_ci_low"], "ci_high": row["iid_ci_high"]})
                row["verdict"] = "holds" if row["agree_ood"] >= threshold and same else "breaks"
            rows.append(row)
    return pd.DataFrame(rows)


def depth_change(heads: pd.DataFrame) -> pd.DataFrame:
    """Per (p, penalty mode) fitted at both depths: depth 1 minus depth 0, paired on seed (each the
    mean over held-out domains), of the o.o.d. agreement with dropout (points) and of the o.o.d.
    accuracy difference penalty - dropout (points)."""
    h = heads.copy()
    drop = h[h["mode"] == "dropout"].set_index(["depth", "test_env", "seed", "p"])["acc_ood"]
    h["gap_ood"] = h["acc_ood"].to_numpy() - drop.reindex(pd.MultiIndex.from_frame(h[drop.index.names])).to_numpy()
    rows = []
    both = h[h["mode"] != "dropout"].groupby(["p", "mode"])["depth"].nunique()
    for p, mode in both[both == 2].index:
        g = h[(h.p == p) & (h["mode"] == mode)]
        for value in ("agree_ood", "gap_ood"):
            eff = paired_difference(*(100 * seed_means(g[g.depth == d], value, []) for d in (0, 1)))
            eff["p_value"] = eff.pop("p")  # "p" is the rate here
            rows.append({"p": p, "mode": mode, "value": value, **eff})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the tuned weight-decay control (07)
def tuned_l2_control(path: str | Path, backbone: str, depths: Iterable[int], table: pd.DataFrame | None = None,
                     labels: dict[int, str] = DEPTH_LABELS, name: str | None = None
                     ) -> tuple[pd.DataFrame | None, str]:
    """The effect map's `dropout_vs_tuned_l2.csv` rows for this backbone and these depths, and a
    sentence stating them (or saying why there are none); with `table` (`by_rate`), this study's
    dropout - penalty o.o.d. difference at the control's rate and depth beside them. `name`: how the
    sentences name the file (default: `path`)."""
    shown = name or str(path)
    path = Path(path)
    if not path.is_file():
        return None, (f"The tuned weight-decay control (`{shown}`, written by notebook 07) is not there yet: run "
                      f"07 (its power or rates settings) to compare.")
    t = pd.read_csv(path)
    need = {"backbone", "depth", "gain_points", "ci_low_points", "ci_high_points", "n"}
    if not need <= set(t.columns):
        return None, f"`{shown}` lacks the columns {sorted(need - set(t.columns))}; not compared."
    t = t[(t.backbone == backbone) & t.depth.isin(list(depths))]
    if t.empty:
        return None, f"`{shown}` has no row for {backbone} at depth(s) {list(depths)}; not compared."
    rate_cols = [c for c in t.columns if c.startswith("ood_") and c != "ood_0"]
    rate = rate_cols[0][len("ood_"):] if rate_cols else "?"
    parts, ours = [], []
    for _, r in t.iterrows():
        s = (f"{r.get('depth_label', r.depth)}: {r.gain_points:+.1f} [{r.ci_low_points:+.1f}, "
             f"{r.ci_high_points:+.1f}] o.o.d. points (n={int(r.n)})")
        if "iid_cost_points" in r:
            s += f", i.i.d. {r.iid_cost_points:+.1f} [{r.iid_ci_low_points:+.1f}, {r.iid_ci_high_points:+.1f}]"
        parts.append(s)
        here = pd.DataFrame() if table is None or rate == "?" else \
            table[(table.depth == r.depth) & ((table.p - float(rate)).abs() < 1e-9)]
        for _, h in here.iterrows():  # flipped to the control's direction: dropout - alternative
            ours.append(f"{labels.get(int(h.depth), h.depth)}, {h['mode']}: {-h.ood_diff_points:+.1f} "
                        f"[{-h.ood_ci_high:+.1f}, {-h.ood_ci_low:+.1f}] (n={int(h.n)})")
    text = (f"The effect map's control (`{shown}`): dropout {rate} against weight decay tuned on i.i.d. validation "
            f"(each arm's lr and weight decay tuned), dropout minus L2: " + "; ".join(parts) + ".")
    if ours:
        text += (f" Here, dropout {rate} minus its analytic penalty (untuned, same optimiser), o.o.d. points: "
                 + "; ".join(ours) + ". The control asks whether dropout beats the best plain L2; this notebook, "
                 "whether dropout behaves like its own L2-type penalty.")
    return t, text


# --------------------------------------------------------------------------- conclusion and figures
def _rates(ps) -> str:
    return ", ".join(f"{p:g}" for p in ps) if len(ps) else "none"


def conclusion_lines(ratios: pd.DataFrame, table: pd.DataFrame, change: pd.DataFrame, threshold: float,
                     band: Sequence[float], n_mc: int, labels: dict[int, str] = DEPTH_LABELS) -> list[str]:
    """The summary sentences, every number computed from the three summary tables."""
    lines = []
    sq = ratios[ratios.kind == "squared"]
    if len(sq):
        lines.append(f"- Fixed weights, squared loss (an exact identity): penalty / Monte-Carlo excess between "
                     f"{sq['mean'].min():.3f} and {sq['mean'].max():.3f} over rates and depths ({n_mc} masks; "
                     f"the gap from 1 is Monte-Carlo error).")
    lo_b, hi_b = band
    for (depth, kind), g in ratios[ratios.kind != "squared"].groupby(["depth", "kind"]):
        g = g.sort_values("p")
        inside = set(g[(g["mean"] >= lo_b) & (g["mean"] <= hi_b)].p)
        each = ", ".join(f"{r['mean']:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] at p={r.p:g}" for _, r in g.iterrows())
        lines.append(f"- Fixed weights, cross-entropy, {labels[depth]}: {kind} penalty / Monte-Carlo excess loss "
                     f"{each} (n={int(g.n.min())} seeds); its mean lies within [{lo_b:g}, {hi_b:g}] at p = "
                     f"{_rates(sorted(inside))}, outside at p = {_rates([p for p in g.p if p not in inside])}.")
    if len(table):
        lines.append(f"- The rule for trained networks: the analogy holds at a rate when the mean o.o.d. agreement "
                     f"with the dropout network is at least {100 * threshold:g}% and the 95% t intervals of both "
                     f"accuracy differences (penalty - dropout, o.o.d. and i.i.d.) contain 0; n={int(table.n.min())} "
                     f"seeds, each the mean over the held-out domains.")
    for (depth, mode), g in table.groupby(["depth", "mode"], sort=False):
        g = g.sort_values("p")
        why = []
        for _, r in g[g.verdict == "breaks"].iterrows():
            bits = [f"agreement {100 * r.agree_ood:.1f}%"] if r.agree_ood < threshold else []
            bits += [f"{name} {r[f'{s}_diff_points']:+.1f} [{r[f'{s}_ci_low']:+.1f}, {r[f'{s}_ci_high']:+.1f}] "
                     f"points" for s, name in (("ood", "o.o.d."), ("iid", "i.i.d."))
                     if not r[f"{s}_ci_low"] <= 0 <= r[f"{s}_ci_high"]]
            why.append(f"p={r.p:g}: " + ", ".join(bits))
        lines.append(f"- {labels[depth]}, the {mode} penalty in place of dropout: the analogy holds at p = "
                     f"{_rates(list(g[g.verdict == 'holds'].p))} and breaks at p = "
                     f"{_rates(list(g[g.verdict == 'breaks'].p))}"
                     + (f" ({'; '.join(why)})" if why else "")
                     + (f"; undecided (fewer than 2 seeds) at p = {_rates(list(g[g.verdict == 'undecided'].p))}"
                        if (g.verdict == "undecided").any() else "") + ".")
    stage = labels[1].removesuffix(" + head")
    for _, r in change.iterrows():
        what = ("o.o.d. agreement with dropout" if r.value == "agree_ood"
                else "o.o.d. accuracy difference (penalty - dropout)")
        detect = ("the interval excludes 0: depth changes it" if not r.ci_low <= 0 <= r.ci_high
                  else "the interval contains 0: no detectable change with depth")
        lines.append(f"- Depth, p={r.p:g}, {r['mode']} penalty: training {stage} too changes the {what} by "
                     f"{r['mean']:+.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}] points (from {r.a_mean:.1f} to "
                     f"{r.b_mean:.1f}; n={int(r.n)} seeds paired): {detect}.")
    return lines


def by_rate_markdown(table: pd.DataFrame, labels: dict[int, str] = DEPTH_LABELS) -> str:
    """`by_rate` as a compact markdown table: agreement and both accuracy differences with their
    intervals, n and the verdict, per depth, rate and penalty."""
    def ci(m, lo, hi, scale=1.0, fmt="+.1f"):
        return f"{scale * m:{fmt}} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"

    rows = [{"depth": labels[r.depth], "p": f"{r.p:g}", "penalty": r["mode"],
             "o.o.d. agreement (%)": ci(r.agree_ood, r.agree_ci_low, r.agree_ci_high, 100, ".1f"),
             "relative weight difference": f"{r.rel_weight_diff:.2f}",
             "o.o.d. penalty - dropout (points)": ci(r.ood_diff_points, r.ood_ci_low, r.ood_ci_high),
             "i.i.d. penalty - dropout (points)": ci(r.iid_diff_points, r.iid_ci_low, r.iid_ci_high),
             "n": int(r.n), "verdict": r.verdict} for _, r in table.iterrows()]
    return pd.DataFrame(rows).to_markdown(index=False)


def plot_ratios(ratios: pd.DataFrame, band: Sequence[float], labels: dict[int, str] = DEPTH_LABELS):
    """Penalty / Monte-Carlo excess loss per rate at the dropout-trained weights, one panel per depth."""
    import matplotlib.pyplot as plt

    depths = sorted(ratios.depth.unique())
    fig, axes = plt.subplots(1, len(depths), figsize=(5.2 * len(depths), 3.8), squeeze=False, sharex=True, sharey=True)
    for ax, depth in zip(axes[0], depths):
        for i, (kind, g) in enumerate(ratios[ratios.depth == depth].groupby("kind")):
            g = g.sort_values("p")
            low = g.ci_low.clip(lower=g["mean"] / 100)  # a log axis: a lower bound at or below 0 is drawn short
            ax.errorbar(g.p, g["mean"], yerr=[g["mean"] - low, g.ci_high - g["mean"]], marker="o", capsize=3,
                        color=f"C{i}", label=f"{kind} / MC excess ({'squared' if kind == 'squared' else 'CE'} loss)")
        ax.axhspan(*band, color="0.9", zorder=0, label=f"[{band[0]:g}, {band[1]:g}]")
        ax.axhline(1, color="k", lw=0.8)
        ax.set(yscale="log", xlabel="dropout rate p", ylabel="analytic penalty / Monte-Carlo excess loss",
               title=f"{labels[depth]}: at the dropout-trained weights")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_by_rate(table: pd.DataFrame, threshold: float, labels: dict[int, str] = DEPTH_LABELS):
    """Per rate: o.o.d. agreement with dropout, and the o.o.d. and i.i.d. accuracy differences
    (penalty - dropout), with 95% t intervals over seeds; line per (depth, penalty)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for i, ((depth, mode), g) in enumerate(table.groupby(["depth", "mode"])):
        g = g.sort_values("p")
        kw = dict(marker="os"[depth], ls="-" if depth == 0 else "--", capsize=3, color=f"C{i}",
                  label=f"{labels[depth]}, {mode}")
        axes[0].errorbar(g.p, 100 * g.agree_ood, yerr=[100 * (g.agree_ood - g.agree_ci_low),
                                                       100 * (g.agree_ci_high - g.agree_ood)], **kw)
        for ax, s in zip(axes[1:], ("ood", "iid")):
            ax.errorbar(g.p, g[f"{s}_diff_points"], yerr=[g[f"{s}_diff_points"] - g[f"{s}_ci_low"],
                                                          g[f"{s}_ci_high"] - g[f"{s}_diff_points"]], **kw)
    axes[0].axhline(100 * threshold, color="k", lw=0.8, ls=":")
    axes[0].set(title="same prediction as the dropout network (o.o.d.)", ylabel="agreement (%)")
    for ax, s in zip(axes[1:], ("o.o.d.", "i.i.d.")):
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"{s} accuracy: penalty - dropout", ylabel="points (95% t interval)")
    for ax in axes:
        ax.set_xlabel("dropout rate p")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


__all__ = ["StudyParams", "StudyData", "study_data", "run_cell", "run_study", "head_rows", "seed_means",
           "mean_interval", "ratio_by_rate", "by_rate", "depth_change", "tuned_l2_control", "conclusion_lines",
           "by_rate_markdown",
           "plot_ratios", "plot_by_rate", "depth_labels", "DEPTH_LABELS"]
