"""The widened effect map (issue 23): the resolution axis, the whole rate axis, the rate that i.i.d.
validation picks, the data-size axis, and the budget check on constant-lr runs. Every number is
recomputed here by hand from the rows the code reads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vldlib.config import TrainConfig
from vldlib.experiments import effect_map, rate_curves, tuning

ROOT = Path(__file__).resolve().parents[1]

# o.o.d. accuracy per (rate, test_env, seed), by hand; i.i.d. accuracy is 0.8 - rate / 10
OOD = {0.0: {(0, 0): 0.50, (1, 0): 0.60, (0, 1): 0.52, (1, 1): 0.58, (0, 2): 0.49, (1, 2): 0.61},
       0.5: {(0, 0): 0.53, (1, 0): 0.62, (0, 1): 0.55, (1, 1): 0.61, (0, 2): 0.50, (1, 2): 0.64},
       0.9: {(0, 0): 0.49, (1, 0): 0.66, (0, 1): 0.50, (1, 1): 0.62, (0, 2): 0.47, (1, 2): 0.65}}


def _selected() -> pd.DataFrame:
    rows = [{"run": f"r{rate}-{env}-{seed}", "method": "model", "backbone": "b", "train_stages": 0, "dropout": rate,
             "test_env": env, "seed": seed, "ood_acc": acc, "iid_acc": 0.8 - rate / 10, "fit_acc": 0.9}
            for rate, cells in OOD.items() for (env, seed), acc in cells.items()]
    return pd.DataFrame(rows)


def _t_interval(d: np.ndarray) -> tuple[float, float, float]:
    se = d.std(ddof=1) / math.sqrt(len(d))
    half = stats.t.ppf(0.975, len(d) - 1) * se
    return d.mean(), d.mean() - half, d.mean() + half


def _per_seed_gain(b_of_env: dict[int, float]) -> np.ndarray:
    """Per seed: mean over the two domains of ood(b_of_env[env]) - ood(0)."""
    return np.array([np.mean([OOD[b_of_env[e]][(e, s)] - OOD[0.0][(e, s)] for e in (0, 1)]) for s in (0, 1, 2)])


def test_rate_table_pairs_each_rate_with_zero_by_seed():
    table = rate_curves.rate_table(_selected())
    assert list(table.dropout) == [0.5, 0.9] and set(table.n) == {3}
    for b in (0.5, 0.9):
        mean, low, high = _t_interval(_per_seed_gain({0: b, 1: b}))
        row = table[table.dropout == b].iloc[0]
        assert row.gain_points == pytest.approx(100 * mean)
        assert (row.gain_ci_low_points, row.gain_ci_high_points) == pytest.approx((100 * low, 100 * high))
        assert row.iid_diff_points == pytest.approx(-100 * b / 10)  # 0.8 - b/10 against 0.8
        assert row.depth_label == "head"


def test_the_picked_rate_is_the_best_iid_arm_per_domain_and_its_gain_is_paired():
    # the tuned arms' mean i.i.d. on the tuning seeds, per held-out domain: domain 0 prefers 0.5,
    # domain 1 ties 0.5 and 0.9 (the smaller wins). No o.o.d. column reaches the pick.
    choices = pd.DataFrame([{"backbone": "b", "train_stages": 0, "dropout": r, "test_env": e, "lr": 0.01,
                             "weight_decay": 1e-4, "iid_mean": m}
                            for (r, e), m in {(0.0, 0): 0.70, (0.5, 0): 0.75, (0.9, 0): 0.72,
                                              (0.0, 1): 0.60, (0.5, 1): 0.66, (0.9, 1): 0.66}.items()])
    picks = rate_curves.pick_rates(choices)
    assert dict(zip(picks.test_env, picks.picked_rate)) == {0: 0.5, 1: 0.5}
    only = rate_curves.pick_rates(choices, rates=[0.0, 0.9])  # among a subset of the rates
    assert dict(zip(only.test_env, only.picked_rate)) == {0: 0.9, 1: 0.9}

    table = rate_curves.selected_rate_table(_selected(), only)
    mean, low, high = _t_interval(_per_seed_gain({0: 0.9, 1: 0.9}))
    assert table.iloc[0].gain_points == pytest.approx(100 * mean) and table.iloc[0].picked_rates == "0.9 x2"
    # one domain picks 0 itself: it contributes 0 to each seed's mean
    mixed = pd.DataFrame({"backbone": ["b", "b"], "depth": [0, 0], "test_env": [0, 1], "picked_rate": [0.0, 0.9]})
    table = rate_curves.selected_rate_table(_selected(), mixed)
    mean, low, high = _t_interval(_per_seed_gain({0: 0.0, 1: 0.9}))
    row = table.iloc[0]
    assert row.gain_points == pytest.approx(100 * mean)
    assert (row.gain_ci_low_points, row.gain_ci_high_points) == pytest.approx((100 * low, 100 * high))
    assert row.picked_rates == "0 x1, 0.9 x1" and row.n == 3
    assert "i.i.d. validation picks 0 x1, 0.9 x1" in rate_curves.selected_sentences(table)[0]


def test_plateau_sentence_names_the_rates_still_rising():
    plateau = pd.DataFrame([{"backbone": "b", "depth": 0, "dropout": r, "gain": g, "fit_gain": f,
                             "plateaued": g < 0.01, "fit_plateaued": f < 0.01}
                            for r, g, f in ((0.0, 0.001, 0.0), (0.9, 0.002, 0.03))])
    text = rate_curves.plateau_sentence(plateau)
    assert "1 of 2" in text and "rate 0.9 (i.i.d. +0.2, fit +3.0 points)" in text and "rate 0 " not in text
    assert "all 1 (cell, rate)" in rate_curves.plateau_sentence(plateau[plateau.dropout == 0.0])


def test_the_plateau_check_reads_the_fit_too():
    from vldlib.evaluate.convergence import plateau_check

    curves = pd.DataFrame([{"run": "r", "dropout": 0.9, "step": s, "iid_acc": 0.7, "fit_acc": f, "train_acc": 0.5,
                            "step_lr": 0.01} for s, f in ((0, 0.5), (50, 0.80), (100, 0.84))])
    row = plateau_check(curves).iloc[0]
    assert row.fit_gain == pytest.approx(0.04)
    assert bool(row.plateaued) and not bool(row.fit_plateaued) and bool(row.lr_constant)


def test_resolution_axis_names_pixels_and_the_stored_size():
    from vldlib.data.benchmarks import stored_for

    assert [effect_map.resolution_of("native", f"efficientnet_lite{i}.offline") for i in range(3)] == [224, 240, 260]
    assert effect_map.resolution_of(96, "x") == 96
    with pytest.raises(ValueError, match="'big'.*pixels.*native"):
        effect_map.resolution_of("big", "efficientnet_lite0.offline")
    # the smallest stored size that holds the resolution; the largest when none does; others untouched
    assert [stored_for("ObjectStyles", r) for r in (96, 128, 129, 224, 260)] == \
        ["ObjectStyles", "ObjectStyles", "ObjectStyles@256", "ObjectStyles@256", "ObjectStyles@256"]
    assert stored_for("ObjectStyles@256", 96) == "ObjectStyles" and stored_for("PACS", 224) == "PACS"
    base = TrainConfig(benchmark="ObjectStyles", backbone="efficientnet_lite0.offline", cache_trunk=True, augment=False)
    cfgs = effect_map.configs(base, ["efficientnet_lite0.offline", "efficientnet_lite1.offline"], [0], [0.0],
                              [[0]], 10, resolutions=[96, "native"], train_fractions=[0.5, 1.0], seed=[0])
    got = [(c.backbone[-9:-8], c.resolution, c.benchmark, c.train_fraction) for c in cfgs]
    assert got == [("0", 96, "ObjectStyles", 0.5), ("1", 96, "ObjectStyles", 0.5),
                   ("0", 96, "ObjectStyles", 1.0), ("1", 96, "ObjectStyles", 1.0),
                   ("0", 224, "ObjectStyles@256", 0.5), ("1", 240, "ObjectStyles@256", 0.5),
                   ("0", 224, "ObjectStyles@256", 1.0), ("1", 240, "ObjectStyles@256", 1.0)]
    assert effect_map.benchmarks_of(cfgs) == ["ObjectStyles", "ObjectStyles@256"]


def test_choices_made_per_design_go_to_runs_of_that_design():
    """One table tuned at two resolutions and two data sizes: each run takes its own design's choice."""
    base = TrainConfig(benchmark="ObjectStyles", backbone="b", train_stages=0, steps=10, dropout=0.9, test_envs=[0])
    made = [base.__class__(**{**base.__dict__, "resolution": r, "benchmark": "ObjectStyles" if r == 96 else
                              "ObjectStyles@256", "train_fraction": f}) for r in (96, 224) for f in (0.5, 1.0)]
    lr = {(96, 0.5): 0.005, (96, 1.0): 0.02, (224, 0.5): 0.05, (224, 1.0): 0.01}
    choices = pd.DataFrame([{"backbone": "b", "train_stages": 0, "resolution": r, "train_fraction": f, "dropout": 0.9,
                             "test_env": 0, "lr": v, "weight_decay": 1e-4} for (r, f), v in lr.items()])
    choices = tuning.with_design(choices, made)
    assert dict(zip(choices.resolution, choices.benchmark)) == {96: "ObjectStyles", 224: "ObjectStyles@256"}
    for cfg in made:
        assert tuning.apply_choices([cfg], choices)[0].lr == lr[(cfg.resolution, cfg.train_fraction)]
    other = base.__class__(**{**base.__dict__, "resolution": 128})
    with pytest.raises(ValueError, match=r"tuned for another design: .*resolution=128"):
        tuning.apply_choices([other], choices, "map/choices.csv")
    assert all(c.lr_decay_at == [] for c in tuning.constant_lr(made)) and made[0].lr_decay_at == [0.5]


def test_rate_and_size_axes_in_the_notebook(fake_benchmark, tmp_path):
    """Notebook 07 with three rates and two training-set sizes: each (size, rate, domain) tuned on its
    own, the picks recomputed by hand from the tuning runs' chosen arms, the size table's gains from
    the selected checkpoints, and a constant-lr run of every choice for the budget check."""
    pm = pytest.importorskip("papermill")
    out = tmp_path / "em"
    params = dict(benchmark=str(fake_benchmark), output_dir=str(out), backbones=["test_resnet"], depths=[0],
                  dropout_rates=[0.0, 0.5, 0.9], pretrained=False, resolution=32, train_fractions=[0.5, 1.0],
                  seeds=[0, 1, 2], tuning_seeds=[0], test_envs=[0, 1], steps=4, eval_every=2, batch_size=4,
                  lr=[0.01, 0.05], weight_decay=[1e-4], single_recipe=None)
    pm.execute_notebook(str(ROOT / "notebooks/07_effect_map.ipynb"), str(tmp_path / "07.ipynb"), parameters=params,
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    choices = pd.read_csv(out / "choices.csv")
    assert len(choices) == 2 * 3 * 2  # sizes x rates x domains, each tuned on its own
    tuning_runs = pd.read_csv(out / "tuning_selected.csv")
    model = tuning_runs[tuning_runs.method == "model"]
    best = model.sort_values("lr").groupby(["train_fraction", "dropout", "test_env"]).iid_acc.max()
    by_hand = {}  # per (size, domain): the rate whose chosen configuration has the best i.i.d.; ties to the smaller rate
    for (frac, env), g in best.groupby(level=["train_fraction", "test_env"]):
        g = g.droplevel(["train_fraction", "test_env"])
        by_hand[(frac, env)] = min(r for r, v in g.items() if v == g.max())
    picks = pd.read_csv(out / "picked_rates.csv")
    assert {(r.train_fraction, r.test_env): r.picked_rate for r in picks.itertuples()} == by_hand
    selected = pd.read_csv(out / "selected.csv")
    sel = selected[selected.method == "model"]
    table = pd.read_csv(out / "selected_rate.csv")
    assert sorted(table.train_fraction) == [0.5, 1.0]
    for r in table.itertuples():  # the picked arm's gain over 0, by seed, each seed averaged over the domains
        g = sel[sel.train_fraction == r.train_fraction]
        diffs = [np.mean([g[(g.seed == s) & (g.test_env == e) & (g.dropout == by_hand[(r.train_fraction, e)])].ood_acc.item()
                          - g[(g.seed == s) & (g.test_env == e) & (g.dropout == 0.0)].ood_acc.item() for e in (0, 1)])
                 for s in (0, 1, 2)]
        assert r.gain_points == pytest.approx(100 * np.mean(diffs)) and r.n == 3
    rates = pd.read_csv(out / "rate_curves.csv")
    assert len(rates) == 2 * 2 and set(rates.dropout) == {0.5, 0.9}  # sizes x rates above 0
    plateau = pd.read_csv(out / "plateau_constant_lr.csv")
    assert len(plateau) == 2 * 3 and plateau.lr_constant.all()  # sizes x rates, every run at one lr
    summary = (out / "summary.md").read_text()
    assert "Budget check (constant lr, tuning seeds)" in summary and "i.i.d. validation picks" in summary
    assert (out / "rate_curves_depth0.png").exists()


def test_size_sentences_say_whether_the_picked_rate_falls_with_the_data():
    table = pd.DataFrame([{"backbone": b, "depth": 0, "depth_label": "head", "train_fraction": f, "picked_mean": m,
                           "picked_rates": "x", "gain_points": 1.0, "gain_ci_low_points": 0.0, "gain_ci_high_points": 2.0}
                          for b, ms in (("a", (0.86, 0.55, 0.5)), ("c", (0.6, 0.4, 0.7))) for f, m in zip((0.25, 0.5, 1.0), ms)])
    text = rate_curves.size_sentences(table)
    assert text[0].startswith("a head") and "25%: 0.86" in text[0] and text[0].endswith("As the data grow it falls.")
    assert text[1].endswith("neither falls nor rises steadily.")
    assert rate_curves.size_sentences(table.drop(columns="train_fraction")) == []
