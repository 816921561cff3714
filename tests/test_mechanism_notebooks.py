"""The mechanism, explorer and teaching notebooks run top to bottom under papermill on tiny fake
data (test_resnet, random weights, 32 px, a few steps) and write their results files."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import make_fake_benchmark

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

TINY = dict(backbone="test_resnet", pretrained=False, resolution=32, device="cpu")
CASES = {
    # two cells (head, the last stage) x three rates: 4 points for the cross-cell rank correlation
    "10_feature_usage": (dict(backbones=["test_resnet"], depths=[0, 1], dropout_rates=[0.0, 0.5, 0.9], test_envs=[0, 1],
                              seeds=[0, 1], steps=8, eval_every=2, batch_size=4, n_random=2, n_boot=200),
                         ["feature_usage.csv", "ablations.csv", "importances.csv", "usage_effects.csv",
                          "usage_vs_gain.csv", "importances.png", "ablations.png", "usage_effects.png",
                          "usage_vs_gain.png", "summary.md"]),
    "11_linearity": (dict(depths=[0, 1], dropout_rates=[0.0, 0.9], test_envs=[0, 1], seeds=[0, 1], steps=4, eval_every=2,
                          batch_size=4, tuned_by=None, lr=0.3, majority_margin=0.0),
                     ["linearity.csv", "arms.csv", "learns.csv", "pretrained_vs_scratch.csv", "linearity.png",
                      "summary.md"]),
    "12_dropout_vs_l2": (dict(test_envs=None, seeds=[0, 1], rates=[0.1, 0.9], steps=20, n_mc=5, deep_rates=[0.9],
                              deep_steps=3, workers=1),
                         ["fixed_weights.csv", "heads.csv", "ratios_by_rate.csv", "by_rate.csv", "depth_change.csv",
                          "penalty_vs_mc.png", "dropout_vs_penalty.png", "summary.md"]),
    "20_explorer": (dict(test_env=0, dropout=0.5, steps=4, batch_size=4, train_stages=1, interactive=True),
                    ["curve.csv", "earlier.csv", "curves.png"]),
    "30_teaching_dropout": (dict(scratch_resolution=32, scratch_width=8, test_envs=None, seeds=[0, 1], steps=10,
                                 eval_every=5, batch_size=8),
                            ["scratch_vs_pretrained.csv", "dropout_cost.csv", "scratch_vs_pretrained.png",
                             "lodo_protocol.png", "summary.md"]),
}


# the study notebooks run on the study's benchmark (the others illustrate on emoji)
DEFAULT_KEYS = {"10_feature_usage": ('benchmark = "ObjectStyles"', 'backbones = ["efficientnet_lite0.offline"]',
                                     'tuned_by = "notebooks/00_quickstart.choices.csv"'),
                "11_linearity": ('benchmark = "ObjectStyles"', 'backbone = "efficientnet_lite0.offline"',
                                 'tuned_by = "notebooks/00_quickstart.choices.csv"', "seeds = [0, 1, 2, 3, 4]",
                                 "test_envs = None"),
                "12_dropout_vs_l2": ('benchmark = "ObjectStyles"', 'backbone = "efficientnet_lite0.offline"'),
                "20_explorer": ('benchmark = "ObjectStyles"', 'backbone = "efficientnet_lite0.offline"',
                                'tuned_by = "notebooks/00_quickstart.choices.csv"',
                                'study_table = "outputs/quickstart/table.csv"'),
                "30_teaching_dropout": ('benchmark = "ObjectStyles"', 'backbone = "efficientnet_lite0.offline"',
                                        "test_envs = None", "seeds = [0, 1, 2, 3, 4]")}


def _fake_choices(path: Path, bench: Path, params: dict) -> str:
    """A choices table for notebook 10's tiny cells, made for the test's design (`tuning.DESIGN`):
    every cell, rate and held-out domain trains with lr 0.3, weight decay 1e-4 (large enough that
    the i.i.d.-selected checkpoints move off the start in a few steps)."""
    import pandas as pd

    rows = [{"backbone": b, "train_stages": d, "dropout": r, "test_env": t, "lr": 0.3, "weight_decay": 1e-4,
             "benchmark": str(bench), "resolution": params["resolution"], "steps": params["steps"], "augment": False,
             "pretrained": params["pretrained"], "batch_size": params["batch_size"]}
            for b in params["backbones"] for d in params["depths"] for r in params["dropout_rates"]
            for t in params["test_envs"]]
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_fake_benchmark(tmp_path_factory.mktemp("nb") / "fake", per_class=6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_structure(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert nb.cells[0].cell_type == "markdown"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    installs = nb.cells[1].get("id") == "install-vldlib"  # 20 and 30: the install cell (tests/test_install.py)
    assert len(params) == 1 and nb.cells.index(params[0]) == (2 if installs else 1)
    src = params[0].source
    for key in (*DEFAULT_KEYS.get(name, ("benchmark = \"emoji\"", "backbone = \"efficientnet_lite0.offline\"")),
                "data_dir = \"data\"", f"output_dir = \"outputs/{name}\"", "device = \"auto\""):
        assert key in src, f"{name}: parameters cell lacks {key}"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    for k in CASES[name][0]:
        assert f"\n{k} = " in "\n" + src, f"{name}: test parameter {k} is not a notebook parameter"


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_on_tiny_data(name, bench, tmp_path):
    import papermill as pm

    params, files = CASES[name]
    out = tmp_path / "out"
    params = {**TINY, **params, "benchmark": str(bench), "data_dir": str(tmp_path / "data"), "output_dir": str(out)}
    if name in ("10_feature_usage", "11_linearity", "20_explorer"):
        params["runs_dir"] = str(bench.parent / "runs")  # shared: the explorer compares with the others' runs
    if name == "10_feature_usage":  # the tuned path, on choices made for the tiny design
        params["tuned_by"] = _fake_choices(tmp_path / "choices.csv", bench, params)
    if name == "20_explorer":
        params["compare_dirs"] = [str(bench.parent / "runs")]
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"), parameters=params,
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    for f in files:
        assert (out / f).exists(), f"{name} did not write {f}"
    if name in CONCLUSIONS:
        CONCLUSIONS[name](out)


def _check_30(out: Path) -> None:
    """Every held-out domain and seed ran; the computed answer is the paired difference the CSV
    gives (recomputed here: per seed, the points each learner lost, averaged over the held-out
    domains, scratch minus pretrained; its t interval over the 2 seeds)."""
    import pandas as pd

    from vldlib.evaluate.student import critical_t

    c = pd.read_csv(out / "scratch_vs_pretrained.csv")
    assert sorted(c.test_env.unique()) == [0, 1, 2] and sorted(c.seed.unique()) == [0, 1]
    last = c[c.step == c.step.max()].set_index(["learner", "test_env", "seed", "p"]).val_acc
    lost = 100 * (last.xs(0.0, level="p") - last.xs(0.9, level="p"))
    by_seed = {k: v.groupby("seed").mean() for k, v in lost.groupby("learner")}
    scratch = next(v for k, v in by_seed.items() if "scratch" in k)
    head = next(v for k, v in by_seed.items() if "pretrained" in k)
    diff = scratch - head
    half = critical_t(1) * diff.std(ddof=1) / 2 ** 0.5
    summary = (out / "summary.md").read_text()
    assert f"{scratch.mean():+.1f} validation points" in summary and f"{head.mean():+.1f} points" in summary
    assert f"from scratch minus pretrained: {diff.mean():+.1f} points [95% CI {diff.mean() - half:+.1f}, " in summary
    assert "n=2 seeds, each the mean over 3 held-out domains" in summary
    excludes = diff.mean() - half > 0 or diff.mean() + half < 0
    expect = "does not show" if not excludes else "as the paper" if diff.mean() > 0 else "opposite"
    assert expect in summary, summary


def _check_10(out: Path) -> None:
    """Every cell's rates are contrasted with rate 0, and each printed paired difference is the one
    the per-run table gives (recomputed here from feature_usage.csv: by seed, each seed the mean over
    the held-out domains); the o.o.d. accuracy measured at best.pt is the run records' selected one;
    the figure's points are those differences; the rank correlation of 4 points is computed."""
    import pandas as pd

    from vldlib.evaluate.scores import load_runs
    from vldlib.evaluate.selection import select

    u = pd.read_csv(out / "feature_usage.csv")
    summary = (out / "summary.md").read_text()
    sel = select(load_runs(sorted(set(u.run))), "training_domain")
    sel = sel[sel.method == "model"].set_index("run").ood_acc
    assert u.set_index("run").ood_acc.to_dict() == pytest.approx(sel.to_dict())
    pts = pd.read_csv(out / "usage_vs_gain.csv")
    assert len(pts) == 4
    for (depth, b), p in pts.groupby(["depth", "dropout"]):
        per_seed = u[u.depth == depth].groupby(["dropout", "seed"])[["ood_acc", "participation_ratio"]].mean()
        diff = per_seed.loc[b] - per_seed.loc[0.0]
        assert p.y.item() == pytest.approx(diff.ood_acc.mean()) and p.x.item() == pytest.approx(diff.participation_ratio.mean())
        cell = p.cell.item()
        line = next(s for s in summary.splitlines() if s.startswith(f"- {cell}: dropout {b:g} vs 0: o.o.d. accuracy"))
        assert f"paired difference {100 * diff.ood_acc.mean():+.1f}" in line and "(n=2 pairs" in line, line
    assert "Spearman rank correlation" in summary and "across 4 points (2 cells x rates)" in summary
    assert "contrasts against rate 0, the effective number of features" in summary


def _check_11(out: Path) -> None:
    """Both arms ran at depth 1 only, over every held-out domain and seed; whether each arm learns and
    each paired pretrained - scratch agreement difference are the ones the per-run table gives
    (recomputed here: by seed, each seed the mean over the held-out domains)."""
    import pandas as pd

    t = pd.read_csv(out / "linearity.csv")
    summary = (out / "summary.md").read_text()
    assert set(t[t.init == "scratch"].depth) == {1} and set(t[t.init == "pretrained"].depth) == {0, 1}
    assert sorted(t.test_env.unique()) == [0, 1] and sorted(t.seed.unique()) == [0, 1]
    head = t[t.depth == 0]
    assert (head.agreement == 1).all() and head.rel_logit_error.max() < 1e-4  # linear in its parameters: exact
    ood = t[t.split == "ood"]
    learns = pd.read_csv(out / "learns.csv").set_index(["depth", "init", "dropout"])
    for (depth, init, p), g in ood.groupby(["depth", "init", "dropout"]):
        per_seed = g.groupby("seed").margin.mean()
        row = learns.loc[(depth, init, p)]
        assert row["mean"] == pytest.approx(per_seed.mean()) and row.n == 2
        line = next(s for s in summary.splitlines() if f", {init}, dropout {p:g}**" in s
                    and s.startswith(f"- **{'head' if depth == 0 else 'layer4'}"))
        assert ("does NOT beat" in line) == (not row.learns), line
    eff = pd.read_csv(out / "pretrained_vs_scratch.csv")
    for p, g in ood[ood.depth == 1].groupby("dropout"):
        per = g.groupby(["init", "seed"]).agreement.mean()
        diff = (per["pretrained"] - per["scratch"]).mean()
        r = eff[(eff.dropout == p) & (eff.metric == "agreement")].iloc[0]
        assert r.difference == pytest.approx(diff) and r.n == 2 and r.domains == 2
    assert "effect map" in summary


def _check_12(out: Path) -> None:
    """Every held-out domain and seed was fitted; each verdict and paired o.o.d. difference in the
    summary is the one the per-network table gives (recomputed here from heads.csv)."""
    import pandas as pd

    from vldlib.evaluate.student import critical_t

    h = pd.read_csv(out / "heads.csv")
    t = pd.read_csv(out / "by_rate.csv")
    summary = (out / "summary.md").read_text()
    assert sorted(h.test_env.unique()) == [0, 1, 2] and sorted(h.seed.unique()) == [0, 1]
    assert set(h[h.depth == 1].p) == {0.9} and set(h[h.depth == 0].p) == {0.1, 0.9}
    for (depth, mode, p), row in t.set_index(["depth", "mode", "p"]).iterrows():
        g = h[(h.depth == depth) & (h.p == p)]
        contains0 = []
        for split in ("ood", "iid"):
            per_seed = lambda m: 100 * g[g["mode"] == m].groupby("seed")[f"acc_{split}"].mean()
            diff = per_seed(mode) - per_seed("dropout")
            half = critical_t(len(diff) - 1) * diff.std(ddof=1) / len(diff) ** 0.5
            assert row[f"{split}_diff_points"] == pytest.approx(diff.mean()) and row.n == len(diff) == 2
            assert row[f"{split}_ci_high"] == pytest.approx(diff.mean() + half)
            contains0.append(diff.mean() - half <= 1e-9 and diff.mean() + half >= -1e-9)
        agree = g[g["mode"] == mode].groupby("seed").agree_ood.mean().mean()
        assert row.verdict == ("holds" if agree >= 0.9 and all(contains0) else "breaks")
    assert "n=2 seeds, each the mean over the held-out domains" in next(
        s for s in summary.splitlines() if s.startswith("- The rule for trained networks"))
    for (depth, mode), g in t.groupby(["depth", "mode"]):
        label = "head" if depth == 0 else "layer4 + head"
        line = next(s for s in summary.splitlines() if s.startswith(f"- {label}, the {mode} penalty in place of dropout"))
        holds = ", ".join(f"{p:g}" for p in g[g.verdict == "holds"].p) or "none"
        assert f"holds at p = {holds} and" in line, line
    assert "Depth, p=0.9, quadratic penalty: training layer4 too" in summary
    assert "dropout_vs_tuned_l2.csv" in summary  # the tuned-L2 control: shown, or said to be absent


CONCLUSIONS = {"30_teaching_dropout": _check_30, "10_feature_usage": _check_10, "11_linearity": _check_11,
               "12_dropout_vs_l2": _check_12}
