"""vldlib.analysis.usage_map (notebook 10's statistics) on small tables whose answers are computed
by hand here: paired differences by seed over held-out domains, Spearman's rho with ties, the
bootstrap over seeds, the sentences, and the study's configs with and without tuned choices."""

from __future__ import annotations

import math

from pathlib import Path

import pandas as pd
import pytest

from vldlib.analysis import usage_map as um
from vldlib.config import TrainConfig

CHOICES = str(Path(__file__).resolve().parents[1] / "notebooks" / "00_quickstart.choices.csv")


def _usage(values: dict, envs=(0, 1), metric: str = "participation_ratio", other: str = "ood_acc") -> pd.DataFrame:
    """A usage table: values[(backbone, depth, rate)] = {seed: [value per held-out domain]} for
    `metric`; `other` is 0.5 everywhere unless the value is a pair (metric values, other values)."""
    rows = []
    for (backbone, depth, rate), seeds in values.items():
        for seed, per_env in seeds.items():
            m, o = per_env if isinstance(per_env, tuple) else (per_env, [0.5] * len(envs))
            for t, v, w in zip(envs, m, o):
                rows.append({"backbone": backbone, "depth": depth, "resolution": 96, "train_fraction": 1.0,
                             "dropout": rate, "test_env": t, "test_domain": f"d{t}", "seed": seed, metric: v,
                             other: w})
    return pd.DataFrame(rows)


def test_cell_effect_is_the_paired_difference_by_seed_over_domains():
    # rate 0: 10 everywhere; rate 0.9 by seed, two held-out domains: means 15, 13, 17 -> differences 5, 3, 7
    u = _usage({("bb", 0, 0.0): {s: [10, 10] for s in (0, 1, 2)},
                ("bb", 0, 0.9): {0: [14, 16], 1: [12, 14], 2: [16, 18]}})
    e = um.cell_effects(u, metrics=["participation_ratio"])
    assert len(e) == 1
    r = e.iloc[0]
    se = 2 / math.sqrt(3)  # sd of (5, 3, 7) is 2
    half = 4.302652729911275 * se  # t_{0.975, 2}
    assert (r.a_mean, r.b_mean, r.difference, r.n, r.domains) == pytest.approx((10, 15, 5, 3, 2))
    assert r.se == pytest.approx(se) and r.ci_low == pytest.approx(5 - half) and r.ci_high == pytest.approx(5 + half)
    assert r.verdict == "increase" and r.cell == "bb, head"
    assert "paired difference +5 [95% CI +0.0317, +9.97]" in r.sentence and "n=3 pairs" in r.sentence
    # the seed differences are the pairs of that effect
    d = um.seed_differences(u, "participation_ratio")
    assert d.sort_values("seed")["diff"].tolist() == pytest.approx([5, 3, 7])
    # a seed missing a domain at one rate is left out of the pairs, not averaged over fewer domains
    short = u[~((u.seed == 2) & (u.dropout == 0.9) & (u.test_env == 1))]
    assert um.cell_effects(short, metrics=["participation_ratio"]).iloc[0].n == 2


def test_an_interval_containing_zero_says_no_detectable_change():
    u = _usage({("bb", 0, 0.0): {s: [10, 10] for s in (0, 1, 2)},
                ("bb", 0, 0.9): {0: [11, 11], 1: [9, 9], 2: [10.5, 10.5]}})
    e = um.cell_effects(u, metrics=["participation_ratio"])
    assert e.iloc[0].verdict == "none" and "no detectable effect" in e.iloc[0].sentence
    text = um.spread_sentence(e)
    assert "Of 1 (cell, rate) contrasts" in text and "1 no detectable change" in text
    assert "0 show a detectable increase" in text


def test_spearman_with_ties_matches_the_hand_computed_value():
    # ranks x (1, 2.5, 2.5, 4), y (4, 3, 2, 1): rho = -4.5 / sqrt(4.5 * 5) = -3 / sqrt(10)
    assert um.spearman([1, 2, 2, 3], [4, 3, 2, 1]) == pytest.approx(-3 / math.sqrt(10))
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, 1, -1, 0, 0) -> 1 - 12 / 120
    assert um.spearman([1, 2, 3, 4, 5], [10, 30, 20, 40, 50]) == pytest.approx(0.9)
    assert math.isnan(um.spearman([1, 2], [2, 1]))  # two points: +-1 whatever they are
    assert math.isnan(um.spearman([1, 2, 3], [5, 5, 5]))


def _three_cells(c_x: tuple[float, float]) -> pd.DataFrame:
    """Three cells, one rate against 0, two seeds, one domain: A's change in x is 4 for both seeds,
    B's 6, C's `c_x` per seed; the change in y is 1, 2, 3 (every seed)."""
    vals = {}
    for bb, dx, dy in (("A", (4, 4), 1), ("B", (6, 6), 2), ("C", c_x, 3)):
        vals[(bb, 0, 0.0)] = {s: ([0.0], [0.0]) for s in (0, 1)}
        vals[(bb, 0, 0.9)] = {s: ([dx[s]], [dy]) for s in (0, 1)}
    return _usage(vals, envs=(0,))


def test_rank_correlation_bootstrap_over_seeds_by_hand():
    # C's seeds change x by 0 and 10. C's point is their mean, 5: x order A(4) C(5) B(6) against y
    # order A B C -> rho = 1 - 6 (0 + 1 + 1) / 24 = 0.5. A bootstrap draw of C's two seeds gives
    # x = 0 (prob 1/4: rho -0.5), 5 (1/2: rho 0.5) or 10 (1/4: rho 1); A and B never move.
    u = _three_cells((0, 10))
    pts = um.points(u)
    assert pts.set_index("cell").x.to_dict() == {"A, head": 4, "B, head": 6, "C, head": 5}
    assert pts.set_index("cell").x_se["C, head"] == pytest.approx(5)  # sd of (0, 10) / sqrt(2)
    corr = um.rank_correlation(u, n_boot=2000, seed=1)
    assert corr["rho"] == pytest.approx(0.5) and (corr["n_points"], corr["n_cells"]) == (3, 3)
    assert (corr["ci_low"], corr["ci_high"]) == pytest.approx((-0.5, 1.0))
    assert corr["n_valid"] == 2000
    text = um.correlation_sentence(corr)
    assert "rho = +0.50 [95% bootstrap interval over seeds -0.50, +1.00" in text
    assert "no detectable rank correlation" in text and "With 3 points" in text


def test_rank_correlation_without_seed_noise_has_no_width():
    u = _three_cells((8, 8))  # C's change 8 for both seeds: every draw is the point itself
    corr = um.rank_correlation(u, n_boot=200)
    assert corr["rho"] == pytest.approx(1.0) and (corr["ci_low"], corr["ci_high"]) == pytest.approx((1.0, 1.0))
    assert "the interval excludes 0" in um.correlation_sentence(corr)


def test_rank_correlation_of_two_points_is_not_computed():
    u = _usage({("bb", 0, 0.0): {s: [10] for s in (0, 1)}, ("bb", 0, 0.9): {0: [12], 1: [13]},
                ("bb", 1, 0.0): {s: [10] for s in (0, 1)}, ("bb", 1, 0.9): {0: [11], 1: [11]}}, envs=(0,))
    corr = um.rank_correlation(u)
    assert corr["n_points"] == 2 and math.isnan(corr["rho"]) and math.isnan(corr["ci_low"])
    assert "not computed, 2 points: a rank correlation needs at least 3" in um.correlation_sentence(corr)
    assert sorted(um.points(u).cell) == ["bb, head", "bb, last 1 units"]


def test_summary_states_the_answers_and_tables(tmp_path):
    u = _three_cells((0, 10))
    e = um.cell_effects(u, metrics=["participation_ratio", "ood_acc"])
    pts, corr = um.points(u), um.rank_correlation(u, n_boot=100)
    text = um.summary_text("Feature usage", "design line", e, pts, corr)
    assert text.startswith("# Feature usage\n\ndesign line\n")
    assert um.correlation_sentence(corr) in text and um.spread_sentence(e) in text
    assert text.count("C, head: dropout 0.9 vs 0") == 2  # one sentence per metric named
    fig = um.plot_usage_vs_gain(pts, corr)
    fig.savefig(tmp_path / "x.png")
    fig = um.plot_effects(e)
    fig.savefig(tmp_path / "y.png")


def test_study_configs_take_the_tuned_choices_or_the_given_recipe(tmp_path):
    base = TrainConfig(benchmark="ObjectStyles", backbone="efficientnet_lite0.offline", resolution=96, steps=300,
                       batch_size=32, augment=False, pretrained=True, lr=0.02, weight_decay=1e-4)
    plain = um.study_configs(base, ["efficientnet_lite0.offline"], [0, 1], [0.0, 0.9], [0, 1, 2, 3], [10, 11], 300)
    assert len(plain) == 2 * 2 * 4 * 2 and {(c.lr, c.weight_decay) for c in plain} == {(0.02, 1e-4)}
    assert {c.train_stages for c in plain} == {0, 1} and {c.seed for c in plain} == {10, 11}
    tuned = um.study_configs(base, ["efficientnet_lite0.offline"], [0, 1], [0.0, 0.9], [0, 1, 2, 3], [10, 11], 300,
                             tuned_by=CHOICES)
    choices = pd.read_csv(CHOICES)
    for c in tuned:
        row = choices[(choices.train_stages == c.train_stages) & (choices.dropout == c.dropout)
                      & (choices.test_env == c.test_envs[0])].iloc[0]
        assert (c.lr, c.weight_decay) == (row.lr, row.weight_decay)
    with pytest.raises(KeyError, match="dropout=0.5"):  # a cell the choices lack is an error, never untuned
        um.study_configs(base, ["efficientnet_lite0.offline"], [0], [0.0, 0.5], [0], [10], 300,
                         tuned_by=CHOICES)
    with pytest.raises(ValueError, match="steps"):  # choices made for another design are refused
        um.study_configs(base, ["efficientnet_lite0.offline"], [0], [0.0], [0], [10], 100,
                         tuned_by=CHOICES)
    assert len(tuned) == len(plain)
