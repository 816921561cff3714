"""The effect map (notebook 07 and vldlib.experiments.effect_map) and the power analysis
(vldlib.evaluate.power): conclusions recomputed here by hand from the tables the code wrote."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vldlib.evaluate import power
from vldlib.experiments import effect_map

ROOT = Path(__file__).resolve().parents[1]


def _selected(diffs: dict[tuple[int, int], float], base: float = 0.5, backbone: str = "b", depth=1) -> pd.DataFrame:
    """Selected rows: o.o.d. accuracy `base` at rate 0 and base + diff at 0.9, per (test_env, seed)."""
    rows = []
    for (env, seed), d in diffs.items():
        for rate, acc in ((0.0, base + 0.01 * env), (0.9, base + 0.01 * env + d)):
            rows.append({"run": f"{backbone}-{depth}-{env}-{seed}-{rate}", "method": "model", "test_env": env,
                         "seed": seed, "dropout": rate, "ood_acc": acc, "iid_acc": 0.8, "backbone": backbone,
                         "train_stages": depth})
    return pd.DataFrame(rows)


def test_domain_averaged_effect_pairs_by_seed_after_averaging_domains():
    diffs = {(0, 0): 0.02, (1, 0): 0.04, (0, 1): 0.00, (1, 1): 0.00, (0, 2): 0.01, (1, 2): 0.03}
    eff = power.domain_averaged_effect(_selected(diffs))
    per_seed = np.array([0.03, 0.0, 0.02])  # each seed's mean over the two domains, by hand
    assert eff["n"] == 3 and eff["domains"] == 2
    assert eff["mean"] == pytest.approx(per_seed.mean())
    assert eff["se"] == pytest.approx(per_seed.std(ddof=1) / math.sqrt(3))


def test_a_seed_missing_a_domain_is_left_out():
    diffs = {(0, 0): 0.02, (1, 0): 0.04, (0, 1): 0.00, (1, 1): 0.00, (0, 2): 0.5}  # seed 2 lacks domain 1
    eff = power.domain_averaged_effect(_selected(diffs))
    assert eff["n"] == 2 and eff["mean"] == pytest.approx(np.mean([0.03, 0.0]))


def test_seeds_needed_follows_the_variance_not_the_mean():
    rng = np.random.default_rng(0)
    diffs = {(e, s): float(rng.normal(0, 0.02)) for e in range(4) for s in range(3)}
    shifted = {k: v + 0.05 for k, v in diffs.items()}  # same spread, another mean
    a = power.seeds_needed(_selected(diffs), target_detectable=0.014)
    b = power.seeds_needed(_selected(shifted), target_detectable=0.014)
    assert list(a.seeds_needed) == list(b.seeds_needed)
    # by hand: pooled per-domain variance over seeds, divided by the 4 domains
    d = pd.Series(diffs)
    pooled = d.groupby(level=0).var(ddof=1).mean()
    sd = math.sqrt(pooled / 4)
    assert a.sd_points.iloc[1] == pytest.approx(100 * sd)
    per_seed = d.groupby(level=1).mean()
    assert a.sd_points.iloc[0] == pytest.approx(100 * per_seed.std(ddof=1))
    # the fewest seeds whose 95% t half-width t_{0.975, n-1} x sd / sqrt(n) is at most 1.4 points
    design_sd = max(sd, per_seed.std(ddof=1))
    n = a.seeds_needed.iloc[-1]
    assert stats.t.ppf(0.975, n - 1) * design_sd / math.sqrt(n) <= 0.014
    assert n == 2 or stats.t.ppf(0.975, n - 2) * design_sd / math.sqrt(n - 1) > 0.014


def test_floors_count_the_scored_images(fake_benchmark):
    from vldlib.data import load_benchmark
    from vldlib.data.splits import split_domain

    bench = load_benchmark(str(fake_benchmark))
    f = power.floors(bench, [0, 1], "in")
    ins, _ = split_domain(len(bench.samples[0]), 0, 0, 0.2)
    labels = [bench.samples[0][i][1] for i in ins]
    assert f.test_images.iloc[0] == len(ins)
    assert f.majority.iloc[0] == pytest.approx(max(labels.count(c) for c in set(labels)) / len(labels))
    assert f.chance.iloc[0] == pytest.approx(1 / len(bench.classes))
    assert f.domain.iloc[-1] == "Avg" and f.majority.iloc[-1] == pytest.approx(f.majority.iloc[:2].mean())


def test_gain_table_and_spectrum_text_agree():
    strong = {(e, s): 0.03 + 0.001 * s for e in range(2) for s in range(3)}  # clearly positive
    noisy = {(e, s): (0.02 if s % 2 else -0.02) for e in range(2) for s in range(3)}
    sel = pd.concat([_selected(strong, depth=1), _selected(noisy, depth=0)])
    gains = effect_map.gain_table(sel)
    verdicts = dict(zip(gains.depth, gains.verdict))
    assert verdicts == {1: "improvement", 0: "none"}
    text = effect_map.spectrum_text(gains)
    assert text.startswith("The effect appears in 1 of 2 cells") and "b last 1 units (+3.1" in text


def test_effect_map_notebook_conclusion_agrees_with_its_table(fake_benchmark, tmp_path):
    """The tuned map: the grid on the tuning seed, each cell's choice by i.i.d. validation (checked
    against a choice recomputed by hand from the tuning runs), only the choice on the other seed,
    and every verdict recomputed from the chosen runs."""
    pm = pytest.importorskip("papermill")
    out = tmp_path / "em"
    params = dict(benchmark=str(fake_benchmark), output_dir=str(out), backbones=["test_resnet", "test_efficientnet"],
                  depths=[0, 1], dropout_rates=[0.0, 0.9], pretrained=False, resolution=32, seeds=[0, 1],
                  tuning_seeds=[0], test_envs=[0, 1], steps=4, eval_every=2, batch_size=4, lr=[0.01, 0.05],
                  weight_decay=[1e-4], single_recipe=[0.05, 1e-4])
    pm.execute_notebook(str(ROOT / "notebooks/07_effect_map.ipynb"), str(tmp_path / "07.ipynb"), parameters=params,
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    for name in ("gains.csv", "accuracy.csv", "gain_vs_depth.png", "accuracy.png", "summary.md", "floors.csv",
                 "choices.csv", "dropout_vs_tuned_l2.csv", "gains_single_recipe.csv", "tuning_selected.csv"):
        assert (out / name).exists(), name
    tuning_runs = pd.read_csv(out / "tuning_selected.csv")
    assert set(tuning_runs.seed) == {0} and set(tuning_runs.lr) == {0.01, 0.05}  # the grid ran on the tuning seed
    # the choice by hand: per (backbone, depth, rate, held-out domain), the lr with the best i.i.d.
    # accuracy of the fine-tuned network on seed 0; ties to the smaller lr
    model = tuning_runs[tuning_runs.method == "model"].sort_values("lr")
    by_hand = {(r.backbone, r.train_stages, r.dropout, r.test_env): r.lr for r in
               model.loc[model.groupby(["backbone", "train_stages", "dropout", "test_env"]).iid_acc.idxmax()].itertuples()}
    choices = pd.read_csv(out / "choices.csv")
    assert {(r.backbone, r.train_stages, r.dropout, r.test_env): r.lr for r in choices.itertuples()} == by_hand
    selected = pd.read_csv(out / "selected.csv")
    assert set(selected.seed) == {0, 1} and set(selected.steps) == {4}
    for r in selected.itertuples():  # only each cell's chosen configuration, on both seeds
        assert r.lr == by_hand[(r.backbone, r.train_stages, r.dropout, r.test_env)]
    assert len(selected[selected.method == "model"]) == 2 * 2 * 2 * 2 * 2  # backbones x depths x rates x domains x seeds
    gains = pd.read_csv(out / "gains.csv")
    assert len(gains) == 4  # 2 backbones x 2 depths
    summary = (out / "summary.md").read_text()
    for r in gains.itertuples():  # every verdict recomputed from the selected checkpoints by hand
        g = selected[(selected.method == "model") & (selected.backbone == r.backbone)
                     & (selected.train_stages == r.depth)]
        per = g.groupby(["seed", "dropout"]).ood_acc.mean().unstack()
        d = per[0.9] - per[0.0]
        se = d.std(ddof=1) / math.sqrt(len(d))
        assert r.gain_points == pytest.approx(100 * d.mean()) and r.se_points == pytest.approx(100 * se)
        half = stats.t.ppf(0.975, len(d) - 1) * se  # the 95% Student's t interval, n - 1 dof
        expected = "none" if abs(d.mean()) <= half else ("improvement" if d.mean() > 0 else "loss")
        assert r.verdict == expected
    n_imp = int((gains.verdict == "improvement").sum())
    assert (f"appears in {n_imp} of 4 cells" if n_imp else "appears in none of the 4 cells") in summary
    l2 = pd.read_csv(out / "dropout_vs_tuned_l2.csv")
    assert list(l2.gain_points) == pytest.approx(list(gains.gain_points))
    assert "Dropout against tuned L2" in summary and "Secondary view, one untuned recipe" in summary


def test_depths_are_named_for_what_they_train():
    """EfficientNet-Lite's train_stages=1 is conv_head (one 1x1 conv), not a stage; 2 adds blocks.6,
    the last MBConv stage, which holds one block in every Lite variant; ResNet's are layer4, layer3-4."""
    assert effect_map.depth_label(0, "efficientnet_lite0.offline") == "head"
    assert effect_map.depth_label(1, "efficientnet_lite0.offline") == "conv_head"
    assert effect_map.depth_label(2, "efficientnet_lite1.offline") == "blocks.6 (1 MBConv block) + conv_head"
    assert effect_map.depth_label(3, "efficientnet_lite0.offline") == "blocks.5-6 (5 MBConv blocks) + conv_head"
    assert effect_map.depth_label(2, "resnet50.tv2_in1k") == "layer3-4"
    assert effect_map.depth_label(None, "resnet50.tv2_in1k") == "all"
