"""Student's t verdicts and the premise gauge: t quantiles, paired intervals by hand, the rule
that replaced "2 SE", and the gauge's sentences, which never read an o.o.d. number."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vldlib.evaluate import premise
from vldlib.evaluate.effects import effect_sentence, is_detectable, paired_difference
from vldlib.evaluate.power import detectable, seeds_for
from vldlib.evaluate.student import critical_t, t_interval, t_quantile


@pytest.mark.parametrize("dof, table", [(1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (8, 2.306), (30, 2.042)])
def test_t_quantiles_match_the_printed_table(dof, table):
    assert t_quantile(0.975, dof) == pytest.approx(table, abs=1e-3)
    assert critical_t(dof) == pytest.approx(table, abs=1e-3)


def test_paired_interval_by_hand_on_four_numbers():
    left = pd.Series([0.50, 0.60, 0.55, 0.45], index=[0, 1, 2, 3])
    right = pd.Series([0.53, 0.61, 0.60, 0.47], index=[0, 1, 2, 3])
    eff = paired_difference(left, right)
    d = [0.03, 0.01, 0.05, 0.02]  # right - left
    mean = sum(d) / 4  # 0.0275
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    se = sd / 2
    half = 3.182446 * se  # t_{0.975, 3}
    assert eff["n"] == 4 and eff["dof"] == 3
    assert eff["mean"] == pytest.approx(mean) and eff["se"] == pytest.approx(se)
    assert eff["ci_low"] == pytest.approx(mean - half, rel=1e-5)
    assert eff["ci_high"] == pytest.approx(mean + half, rel=1e-5)
    assert eff["t"] == pytest.approx(3.2205, abs=1e-4)  # sd 0.017078, se 0.0085391
    assert eff["p"] == pytest.approx(0.0486, abs=2e-4)  # just below 0.05: t 3.22 > t_{0.975, 3} = 3.18
    assert eff["ci_low"] == pytest.approx(0.000325, abs=2e-6) and is_detectable(eff)


def test_t_not_two_standard_errors_decides_with_three_pairs():
    """mean 2.5 SE: "more than 2 SE" called it an effect; the t interval (4.30 SE on 2 dof) does not."""
    eff = {"n": 3, "mean": 0.025, "se": 0.01, "a_mean": 0.5, "b_mean": 0.525, "by": "dropout", "a": 0.0, "b": 0.9}
    assert abs(eff["mean"]) > 2 * eff["se"]
    assert not is_detectable(eff)
    sentence = effect_sentence(eff)
    assert "no detectable effect" in sentence and "t(2)=2.5" in sentence and "[95% CI -1.8, +6.8]" in sentence
    assert is_detectable({**eff, "mean": 0.05})  # 5 SE > 4.30 SE
    assert "detectable improvement" in effect_sentence({**eff, "mean": 0.05, "b_mean": 0.55})


def test_one_pair_and_identical_runs():
    assert t_interval(0.1, float("nan"), 1)["ci_low"] != t_interval(0.1, float("nan"), 1)["ci_low"]  # NaN
    one = paired_difference(pd.Series([0.5]), pd.Series([0.6]))
    assert math.isnan(one["ci_low"]) and math.isnan(one["p"]) and math.isnan(one["dof"]) and not is_detectable(one)
    same = paired_difference(pd.Series([0.5, 0.6]), pd.Series([0.5, 0.6]))
    assert same["p"] == 1.0 and not is_detectable(same)


def test_detectable_effect_and_seeds_use_the_t_half_width():
    assert detectable(0.01, 9) == pytest.approx(0.02306, abs=1e-5)
    assert math.isnan(detectable(0.01, 1))
    n = seeds_for(0.02, target_detectable=0.014)  # sd 2 points, target 1.4 points
    assert critical_t(n - 1) * 0.02 / math.sqrt(n) <= 0.014 < critical_t(n - 2) * 0.02 / math.sqrt(n - 1)
    assert n == 11


# --------------------------------------------------------------------------- the premise gauge

def gauge_selected(iid_cost: float, fit_b: float, seeds: int = 4, backbone: str = "lite0") -> pd.DataFrame:
    """A hand-made selected table: 2 held-out domains x `seeds` seeds x rates {0, 0.9}; rate 0.9
    costs `iid_cost` i.i.d. (with a little seed noise) and fits `fit_b` of its training data."""
    rows = []
    rng = np.random.default_rng(0)
    for seed in range(seeds):
        noise = 0.002 * rng.standard_normal()
        for env in (0, 1):
            for rate in (0.0, 0.9):
                rows.append({"run": f"{backbone}-{seed}-{env}-{rate}", "method": "model", "benchmark": "ObjectStyles",
                             "backbone": backbone, "train_stages": 1, "dropout": rate, "seed": seed,
                             "test_env": env, "iid_acc": 0.6 + (iid_cost + noise if rate else 0.0),
                             "fit_acc": fit_b if rate else 1.0, "train_acc": 0.74 if rate else 0.99,
                             "rel_distance": 0.05 if rate else 0.08, "ood_acc": 0.4 + 0.02 * rate,
                             "oracle_acc": 0.41})
    return pd.DataFrame(rows)


def test_premise_inside_when_the_rate_is_free_and_fits():
    table = premise.premise_table(gauge_selected(iid_cost=0.002, fit_b=0.98))
    assert len(table) == 1
    r = table.iloc[0]
    assert r.inside == True and r.n == 4 and r.iid_ci_low_points > -1  # noqa: E712
    assert r.fit_points == pytest.approx(98.0) and r.training_mode_points == pytest.approx(74.0)
    assert r.rel_distance == pytest.approx(0.05) and r.rel_distance_a == pytest.approx(0.08)
    (sentence,) = premise.premise_sentences(table)
    assert "backbone=lite0" in sentence and "train_stages=1" in sentence
    assert "inside the paper's premise" in sentence and "eval-mode fit 98.0% >= 95%" in sentence
    assert "training-mode accuracy, dropout on: 74.0%" in sentence and "weights moved 0.05" in sentence


@pytest.mark.parametrize("cost, fit, reason", [
    (-0.062, 0.99, "it costs i.i.d. accuracy: -6.2 points"),
    (0.0, 0.70, "it does not fit its training data: eval-mode fit 70.0% < 95%"),
])
def test_premise_outside_says_which_condition_failed(cost, fit, reason):
    table = premise.premise_table(gauge_selected(iid_cost=cost, fit_b=fit))
    (sentence,) = premise.premise_sentences(table)
    assert table.iloc[0].inside == False and "outside the paper's premise" in sentence  # noqa: E712
    assert reason in sentence


def test_premise_per_regime_and_undetermined_with_one_seed():
    both = pd.concat([gauge_selected(0.0, 0.99), gauge_selected(-0.05, 0.99, backbone="lite1")])
    table = premise.premise_table(both, by=("backbone",))
    assert table.set_index("backbone").inside.to_dict() == {"lite0": True, "lite1": False}
    one = premise.premise_table(gauge_selected(0.0, 0.99, seeds=1))
    assert one.iloc[0].inside is None and "premise undetermined" in premise.premise_sentences(one)[0]


def test_premise_gauge_never_reads_ood_columns():
    sel = gauge_selected(iid_cost=-0.03, fit_b=0.9)
    garbage = sel.assign(ood_acc=np.nan, oracle_acc="garbage", ood_other=object())
    pd.testing.assert_frame_equal(premise.premise_table(sel), premise.premise_table(garbage))
    assert set(premise.training_side(garbage, ["backbone"]).columns).isdisjoint({"ood_acc", "oracle_acc", "ood_other"})


def test_premise_markdown_quotes_the_paper():
    text = premise.premise_markdown(premise.premise_table(gauge_selected(0.0, 0.99)))
    assert "PACS 0.975 -> 0.978" in text and "VLCS 0.874 -> 0.874" in text and "OfficeHome 0.849 -> 0.859" in text
    assert "TerraIncognita 0.913 -> 0.879" in text and "| dropout |" in text.replace("|   dropout |", "| dropout |")
    assert premise.IID_COST_LIMIT == -0.01


# --------------------------------------------------------------------------- from records to the gauge

def test_select_carries_fit_acc_and_rel_distance(tmp_path):
    from test_results import accs, make_record, make_run

    from vldlib.evaluate import report as R

    rec = make_record(300, accs(.8, .6, test_env=3))  # training domains' "in" split: 0.99 each
    make_run(tmp_path, "new", [{**make_record(0, accs(.1, .1)), "rel_distance": 0.0}, {**rec, "rel_distance": 0.04}])
    make_run(tmp_path, "old", [rec])  # written before the loop recorded the distance
    df = R.load_runs([tmp_path])
    assert "rel_distance" in df.columns
    sel = R.select(df).set_index("run")
    new, old = sel.loc[str(tmp_path / "new")], sel.loc[str(tmp_path / "old")]
    assert new.fit_acc == pytest.approx(0.99) and new.train_acc == pytest.approx(0.9)  # eval mode vs dropout on
    assert new.rel_distance == pytest.approx(0.04) and math.isnan(old.rel_distance)


def test_report_prints_the_premise_gauge(tmp_path):
    from test_results import accs, make_record, make_run

    from vldlib.evaluate import report as R

    for seed in range(3):
        for rate, cost in ((0.0, 0.0), (0.9, -0.05 - 0.002 * seed)):
            for env in (0, 1):
                a = accs(0.8 + cost, 0.6, test_env=env)
                make_run(tmp_path / "runs", f"r{seed}{rate}{env}", [{**make_record(300, a), "rel_distance": 0.1}],
                         test_env=env, seed=seed, dropout=rate)
    text = R.report([tmp_path / "runs"], out=tmp_path / "rep")
    assert "## Premise gauge" in text and "outside the paper's premise" in text
    assert "it costs i.i.d. accuracy: -5.2 points" in text and "PACS 0.975 -> 0.978" in text


def test_premise_says_when_too_few_seeds_leave_the_cost_unknown():
    wide = premise.verdict({"n": 3, "iid_cost_points": 0.0, "iid_ci_low_points": -20.7, "iid_ci_high_points": 20.7,
                            "fit_points": 99.0})
    assert wide == (False, "its i.i.d. cost is not shown to be small: +0.0 points [95% CI -20.7, +20.7] "
                           "does not lie above -1 point")
