"""Can a design tell the paper's effect from zero? Effects averaged over held-out domains, their
power, and the floors every accuracy is read against (chance, majority class).

The paper's effect is about 2 points of o.o.d. accuracy. A comparison is paired by seed: each
seed's o.o.d. accuracy is first averaged over the held-out domains (DomainBed's "Avg" column),
then rates are compared seed by seed, so differences between domains (lineart is harder than
clipart for every rate) do not inflate the error.

One rule, the verdicts' (`effects.is_detectable`): an effect is detectable when the 95% Student's
t interval of the paired difference excludes 0. So the smallest effect a design of n pairs can
detect is the interval's half-width, t_{0.975, n-1} x SE (`detectable`), and a design's target is
that half-width, `target_detectable` (1.4 points by default: below the paper's 2 points).

Power analysis (the standard one, from a pilot's variance, never from its mean): with the
standard deviation `sd` of one seed's domain-averaged difference, n seeds give SE = sd / sqrt(n),
so the seeds needed are the smallest n with t_{0.975, n-1} x sd / sqrt(n) <= target_detectable
(`seeds_for`). With few pilot seeds, `sd` is also estimated from the per-domain differences
(pooled over domains), which has more degrees of freedom; `seeds_needed` takes the larger of both
estimates.

>>> eff = {"n": 4, "se": 0.005, "mean": 0.01, "a_mean": 0.5, "b_mean": 0.51}
>>> power(eff, target_detectable=0.014)["seeds_needed"]
5
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from vldlib.evaluate.effects import paired_effect
from vldlib.evaluate.scores import ood_split
from vldlib.evaluate.student import critical_t

TARGET_DETECTABLE = 0.014  # the design's target: detect 1.4 points, below the paper's 2-point effect


def _method(selected: pd.DataFrame, method: str) -> pd.DataFrame:
    return selected[selected["method"] == method] if "method" in selected.columns else selected


def complete_seeds(selected: pd.DataFrame, a: Any, b: Any, by: str = "dropout") -> list:
    """Seeds that have a run for every held-out domain of the table at both `a` and `b`: only those
    can be averaged over domains first (a seed missing a domain would average a different set)."""
    envs = set(selected["test_env"].unique())
    keep = []
    for seed, g in selected[selected[by].isin([a, b])].groupby("seed"):
        if all(set(g[g[by] == side]["test_env"]) >= envs for side in (a, b)):
            keep.append(seed)
    return keep


def domain_averaged_effect(selected: pd.DataFrame, a: Any = 0.0, b: Any = 0.9, metric: str = "ood_acc",
                           method: str = "model", by: str = "dropout") -> dict:
    """Paired difference `metric(b) - metric(a)` by seed, each seed first averaged over the held-out
    domains; the dict of `effects.paired_effect` (n = seeds), plus `domains`."""
    sel = _method(selected, method)
    seeds = complete_seeds(sel, a, b, by)
    eff = paired_effect(sel[sel["seed"].isin(seeds)], a=a, b=b, metric=metric, method=method,
                        pair_on=("seed",), by=by)
    n_dom = int(sel["test_env"].nunique())
    eff.update(domains=n_dom, pair_on=f"seed, each the mean over {n_dom} held-out domain{'s' * (n_dom != 1)}")
    return eff


def detectable(se: float, n: int) -> float:
    """The smallest effect n pairs with standard error `se` can detect: the 95% t half-width
    t_{0.975, n-1} x se (NaN with fewer than 2 pairs)."""
    return critical_t(n - 1) * se if n > 1 else float("nan")


def seeds_for(sd: float, target_detectable: float = TARGET_DETECTABLE, most: int = 10_000) -> int | None:
    """The fewest pairs (at least 2) whose 95% t half-width t_{0.975, n-1} x sd / sqrt(n) is at most
    `target_detectable`; None for an unknown sd, or more than `most`."""
    if not math.isfinite(sd):
        return None
    for n in range(2, most + 1):
        if detectable(sd / math.sqrt(n), n) <= target_detectable:
            return n
    return None


def power(eff: Mapping[str, Any], target_detectable: float = TARGET_DETECTABLE) -> dict:
    """What a paired effect's design can detect: sd of one pair's difference, SE, the smallest
    detectable effect (the 95% t half-width) and the pairs needed for `target_detectable` (all in
    accuracy units)."""
    n, se = int(eff["n"]), float(eff["se"])
    sd = se * math.sqrt(n) if n > 1 and math.isfinite(se) else float("nan")
    return {"n": n, "sd": sd, "se": se, "detectable": detectable(se, n), "target_detectable": target_detectable,
            "seeds_needed": seeds_for(sd, target_detectable)}


def pooled_domain_sd(selected: pd.DataFrame, a: Any = 0.0, b: Any = 0.9, metric: str = "ood_acc",
                     method: str = "model", by: str = "dropout") -> tuple[float, int]:
    """sd of one seed's domain-averaged difference, from the per-domain differences: the variance
    over seeds of each domain's difference, pooled over domains and divided by the number of
    domains (domains are trained apart, so their seed noise is taken as independent). Returns
    (sd, degrees of freedom)."""
    sel = _method(selected, method)
    both = sel[sel[by].isin([a, b])].groupby(["test_env", "seed", by])[metric].mean().unstack(by)
    if a not in both.columns or b not in both.columns:
        return float("nan"), 0
    diff = (both[b] - both[a]).dropna().rename("d").reset_index()
    per = diff.groupby("test_env")["d"].agg(["var", "count"]).dropna()
    dof = int((per["count"] - 1).sum())
    if dof == 0:
        return float("nan"), 0
    pooled_var = float(((per["count"] - 1) * per["var"]).sum() / dof)
    return math.sqrt(pooled_var / diff["test_env"].nunique()), dof


def seeds_needed(selected: pd.DataFrame, a: Any = 0.0, b: Any = 0.9, target_detectable: float = TARGET_DETECTABLE,
                 metric: str = "ood_acc", method: str = "model", by: str = "dropout") -> pd.DataFrame:
    """The power analysis of a pilot, one row per way to estimate the sd (points): from the
    seeds' domain-averaged differences, and pooled from the per-domain differences. The last
    row, "design", takes the larger sd (the safer choice) and the seeds it needs (`seeds_for`)."""
    eff = domain_averaged_effect(selected, a, b, metric, method, by)
    direct = power(eff, target_detectable)
    sd_pooled, dof = pooled_domain_sd(selected, a, b, metric, method, by)
    rows = [{"estimate": "seeds' domain-averaged differences", "sd": direct["sd"], "dof": max(0, direct["n"] - 1)},
            {"estimate": "per-domain differences, pooled", "sd": sd_pooled, "dof": dof}]
    finite = [r["sd"] for r in rows if math.isfinite(r["sd"])]
    rows.append({"estimate": "design (the larger)", "sd": max(finite) if finite else float("nan"),
                 "dof": float("nan")})
    out = pd.DataFrame(rows)
    out["seeds_needed"] = [seeds_for(s, target_detectable) for s in out.sd]
    out["target_detectable_points"] = 100 * target_detectable
    out["sd"] = 100 * out["sd"]
    return out.rename(columns={"sd": "sd_points"})


def design_row(eff: Mapping[str, Any], target_detectable: float = TARGET_DETECTABLE) -> pd.DataFrame:
    """One line stating a finished study's power: difference, SE, n, the smallest detectable effect
    (the 95% t half-width), and whether it met the target (points)."""
    p = power(eff, target_detectable)
    return pd.DataFrame([{"difference_points": 100 * eff["mean"], "se_points": 100 * p["se"], "n_seeds": p["n"],
                          "held_out_domains": eff.get("domains"), "detectable_points (t95)": 100 * p["detectable"],
                          "target_detectable_points": 100 * target_detectable,
                          "target_met": bool(p["detectable"] <= target_detectable),
                          "seeds_for_target": p["seeds_needed"]}])


# --------------------------------------------------------------------------- floors

def floors(bench, envs: list[int], split: str, trial_seed: int = 0, holdout: float = 0.2) -> pd.DataFrame:
    """Per held-out domain, on the images that score it (`split` of the domain, the o.o.d. rule of
    `scores.ood_split`): their count, chance accuracy (1 / classes) and majority-class accuracy
    (the best any constant prediction can score there), with an "Avg" row over the domains, as
    DomainBed's Avg column averages them."""
    from vldlib.data.splits import split_domain

    rows = []
    for t in envs:
        labels = np.array([y for _, y in bench.samples[t]])
        ins, outs = split_domain(len(labels), trial_seed, t, holdout, bench.groups(t))
        part = labels[ins if split == "in" else outs]
        counts = np.bincount(part, minlength=len(bench.classes))
        rows.append({"domain": bench.domains[t], "test_images": int(len(part)), "chance": 1 / len(bench.classes),
                     "majority": counts.max() / max(1, len(part)), "majority_class": bench.classes[int(counts.argmax())]})
    out = pd.DataFrame(rows)
    if len(out):
        out.loc[len(out)] = {"domain": "Avg", "test_images": int(out.test_images.sum()), "chance": out.chance.mean(),
                             "majority": out.majority.mean(), "majority_class": ""}
    return out


def floor_rows(table: pd.DataFrame, floor: pd.DataFrame, rows: tuple[str, ...] = ("method", "dropout")) -> pd.DataFrame:
    """`table` (a `domainbed_table`) with two more rows, chance and majority class, in its columns."""
    extra = []
    for name, col in (("chance", "chance"), ("majority class", "majority")):
        row = {c: "" for c in table.columns}
        row[rows[0]] = name
        for _, f in floor.iterrows():
            if f["domain"] in table.columns:
                row[f["domain"]] = f"{100 * f[col]:.1f}"
        row["n"] = 0
        extra.append(row)
    return pd.concat([table, pd.DataFrame(extra)], ignore_index=True)


def held_out_floor(bench, envs: list[int]) -> tuple[float, float]:
    """(majority-class, chance) accuracy of the held-out domains `envs`, as fractions: `floors` on
    the split that scores them (`scores.ood_split`), averaged over the domains like the o.o.d.
    accuracy it is the floor of. What summaries and figures draw."""
    return average_floor(floors(bench, sorted(envs), ood_split(bench)))


def average_floor(floor: pd.DataFrame) -> tuple[float, float]:
    """(majority-class, chance) accuracy averaged over the held-out domains (the `floors` table's
    "Avg" row), as fractions: what a figure of domain-averaged accuracies is read against."""
    avg = floor[floor.domain == "Avg"].iloc[0]
    return float(avg["majority"]), float(avg["chance"])
