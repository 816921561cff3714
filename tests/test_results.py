"""Result collection, model selection, tables and the report, on run directories written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from vldlib.evaluate import report as R
from vldlib.evaluate.reference import MEAN_OOD, paper_reference

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def make_record(step: int, accs: dict[int, tuple[float, float]], methods=("model",), loss: float = 0.5,
                lr: float = 1e-3) -> dict:
    """One eval record; `accs` maps env -> (in, out) accuracy, the same for every method
    unless a method-specific offset is wanted (use make_record twice and merge)."""
    per = {f"env{e}_{s}": a for e, (i, o) in accs.items() for s, a in (("in", i), ("out", o))}
    return {"type": "eval", "step": step, "loss": loss, "lr": lr, "step_time": 0.1, "peak_mem_mb": 10.0,
            "train_acc": 0.9, "acc": {m: dict(per) for m in methods}}


def make_run(root: Path, name: str, records: list[dict], test_env: int = 3, done: bool = True,
             benchmark: str = "PACS", truncate: bool = False, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"benchmark": benchmark, "data_dir": "/data", "test_envs": [test_env], "backbone": "resnet50.tv2_in1k",
           "pretrained": True, "dropout": 0.0, "lr": 1e-3, "head_lr_mult": 1.0, "weight_decay": 1e-4,
           "steps": 10000, "batch_size": 32, "seed": 0, "trial_seed": 0, "resolution": 224, "train_stages": None}
    cfg.update(config)
    (run / "config.json").write_text(json.dumps(cfg))
    meta = {"benchmark": benchmark, "domains": DOMAINS, "classes": ["dog", "cat"], "test_envs": [test_env],
            "train_envs": [e for e in range(4) if e != test_env], "init_fingerprint": "abc"}
    (run / "meta.json").write_text(json.dumps(meta))
    text = "".join(json.dumps(r) + "\n" for r in records)
    if truncate:
        text += '{"type": "eval", "step": 99'
    (run / "records.jsonl").write_text(text)
    if done:
        (run / "done").write_text("")
    return run


def accs(iid: float, ood: float, oracle: float = 0.5, test_env: int = 3, spread: float = 0.0):
    """Per-env (in, out) accuracies whose i.i.d. mean is `iid` and whose test 'in' is `ood`."""
    out = {}
    for k, e in enumerate(e for e in range(4) if e != test_env):
        d = spread * (k - 1)
        out[e] = (0.99, iid + d)
    out[test_env] = (ood, oracle)
    return out


# ---------------------------------------------------------------- loading

def test_load_runs_tidy(tmp_path):
    make_run(tmp_path / "sweep", "r1", [make_record(300, accs(.8, .6), ("model", "wa", "ens")),
                                         make_record(600, accs(.85, .7), ("model", "wa", "ens"))],
             truncate=True)
    with pytest.warns(UserWarning, match="no records.jsonl"):
        df = R.load_runs([tmp_path / "sweep", tmp_path / "sweep" / "r1", tmp_path / "sweep" / "r1" / "records.jsonl",
                          _empty(tmp_path)])
    assert len(df) == 2 * 3 * 4 * 2  # steps x methods x envs x splits; truncated last line ignored, no duplicates
    row = df[(df.step == 600) & (df.method == "wa") & (df.env == 3) & (df.split == "in")].iloc[0]
    assert row.acc == pytest.approx(.7) and bool(row.is_test) and row.domain == "sketch"
    assert row.test_env == 3 and row.test_envs == "3" and row.test_domain == "sketch"
    assert bool(row.done) and not bool(row.failed)
    assert row.lr == 1e-3 and row.step_lr == 1e-3 and row.backbone == "resnet50.tv2_in1k"
    assert {"loss", "train_acc", "trial_seed", "weight_decay", "train_stages"} <= set(df.columns)
    assert df[df.env != 3].is_test.eq(False).all()


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_load_runs_skips_and_flags(tmp_path):
    make_run(tmp_path, "failed_early", [{"type": "failure", "step": 17, "reason": "non-finite loss"}], done=False)
    make_run(tmp_path, "failed_late", [make_record(300, accs(.8, .6)),
                                       {"type": "failure", "step": 420, "reason": "non-finite loss"}], done=False)
    make_run(tmp_path, "running", [make_record(300, accs(.8, .6))], done=False)
    with pytest.warns(UserWarning, match="failed before its first evaluation"):
        df = R.load_runs([tmp_path])
    flags = df.groupby("run")[["done", "failed"]].first()
    flags.index = [Path(r).name for r in flags.index]
    assert flags.loc["failed_late"].tolist() == [False, True]
    assert flags.loc["running"].tolist() == [False, False]
    status = R.run_status([tmp_path])
    assert status.n_evals.tolist() == [0, 1, 1] and status.failed.tolist() == [True, True, False]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        R.load_runs([tmp_path / "nowhere"])


# ---------------------------------------------------------------- selection

def test_select_methods(tmp_path):
    recs = [make_record(300, accs(.80, .60, oracle=.90)),
            make_record(600, accs(.90, .65, oracle=.70)),   # best iid (tie with 900 -> earliest)
            make_record(900, accs(.90, .70, oracle=.80)),
            make_record(1000, accs(.70, .75, oracle=.60))]
    make_run(tmp_path, "r", recs)
    df = R.load_runs([tmp_path])
    td = R.select(df, "training_domain").iloc[0]
    assert (td.step, td.iid_acc, td.ood_acc) == (600, pytest.approx(.9), pytest.approx(.65))
    orc = R.select(df, "oracle").iloc[0]
    assert (orc.step, orc.ood_acc, orc.oracle_acc) == (300, pytest.approx(.6), pytest.approx(.9))
    last = R.select(df, "last").iloc[0]
    assert (last.step, last.ood_acc, last.last_step, last.n_evals) == (1000, pytest.approx(.75), 1000, 4)
    assert td.dropout == 0.0 and td.benchmark == "PACS" and td.test_domain == "sketch"
    with pytest.raises(ValueError, match="training_domain"):
        R.select(df, "leave_one_out")


def test_select_iid_is_mean_of_training_out_splits(tmp_path):
    make_run(tmp_path, "r", [make_record(300, accs(.8, .6, spread=.1, test_env=0), methods=("model", "wa"))],
             test_env=0)
    sel = R.select(R.load_runs([tmp_path]))
    assert sel.method.tolist() == ["model", "wa"]
    assert sel.iid_acc.tolist() == pytest.approx([.8, .8])  # .7, .8, .9 -> .8; test env 0 excluded
    assert R.split_scores({"env0_in": .9, "env0_out": .1, "env1_out": .5, "env2_out": .7}, [0]) == \
        pytest.approx({"iid_acc": .6, "ood_acc": .9, "oracle_acc": .1})


def test_select_per_method(tmp_path):
    r1, r2 = make_record(300, accs(.8, .6)), make_record(600, accs(.7, .9))
    r1["acc"]["wa"] = make_record(300, accs(.5, .5))["acc"]["model"]   # wa worse at 300
    r2["acc"]["wa"] = make_record(600, accs(.9, .8))["acc"]["model"]
    make_run(tmp_path, "r", [r1, r2])
    sel = R.select(R.load_runs([tmp_path])).set_index("method")
    assert sel.loc["model", "step"] == 300 and sel.loc["wa", "step"] == 600


# ---------------------------------------------------------------- summaries and tables

def _sweep(tmp_path: Path) -> pd.DataFrame:
    """2 dropout rates x 4 held-out domains x 2 seeds x 2 learning rates; ood = f(dropout, env, seed)."""
    for p in (0.0, 0.9):
        for t in range(4):
            for seed in (0, 1):
                for lr in (1e-3, 5e-4):
                    ood = 0.5 + 0.1 * p + 0.02 * t + 0.01 * seed + (0.002 if lr == 1e-3 else 0.0)
                    make_run(tmp_path, f"p{p}_t{t}_s{seed}_lr{lr}", [make_record(300, accs(.8 + .01 * seed, ood, test_env=t))],
                             test_env=t, dropout=p, seed=seed, lr=lr)
    return R.select(R.load_runs([tmp_path]))


def test_summarize_two_levels(tmp_path):
    sel = _sweep(tmp_path)
    s = R.summarize(sel, by=["dropout"], over="seed").set_index("dropout")
    # per seed: mean over envs (0.03) and lrs (0.001) -> seeds differ by 0.01 -> se = 0.005
    assert s.loc[0.9, "ood_acc_mean"] == pytest.approx(0.5 + 0.09 + 0.03 + 0.005 + 0.001)
    assert s.loc[0.9, "ood_acc_se"] == pytest.approx(0.005) and s.loc[0.9, "n"] == 2
    one = R.summarize(sel[sel.seed == 0], by=["dropout"], over="seed")
    assert one.ood_acc_se.tolist() == [0.0, 0.0] and one.n.tolist() == [1, 1]
    with pytest.raises(KeyError, match="no column"):
        R.summarize(sel, by=["nonexistent"])


def test_experiment_tables_name_a_weights_file_as_the_project_does(tmp_path, monkeypatch):
    sel = _sweep(tmp_path)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "vldlib").mkdir()  # tmp_path is now a checkout: the project root
    monkeypatch.chdir(tmp_path)
    start = tmp_path / "outputs" / "w" / "noisy.pt"
    sel = pd.concat([sel.assign(weights_file=None), sel.assign(weights_file=str(start))]).assign(experiment="e")
    md, tables = R.experiment_tables(sel)
    text = "\n".join(md)
    assert "outputs/w/noisy.pt" in text and str(tmp_path) not in text


def test_domainbed_table(tmp_path):
    sel = _sweep(tmp_path)
    t = R.domainbed_table(sel, rows=["method", "dropout"])
    assert list(t.columns) == ["method", "dropout", *DOMAINS, "Avg", "n"]
    assert t.n.tolist() == [2, 2]
    row = t[t.dropout == 0.9].iloc[0]
    assert row.art_painting == "59.6 ± 0.5"   # .5+.09+.005+.001 = .596
    assert row.Avg == "62.6 ± 0.5"
    # a row missing a held-out domain gets no average
    partial = R.domainbed_table(sel[~((sel.dropout == 0.0) & (sel.test_env == 2))])
    assert partial.set_index("dropout").loc[0.0, "Avg"] == "-" and partial.set_index("dropout").loc[0.0, "photo"] == "-"
    t2 = R.domainbed_table(sel, over=None)
    assert t2.iloc[0].Avg != "-" and t2.n.tolist() == [4, 4]  # 2 seeds x 2 lrs per cell
    both = pd.concat([sel, sel.assign(method="ens"), sel.assign(method="wa")])
    assert R.domainbed_table(both, rows=["method"]).method.tolist() == ["model", "wa", "ens"]
    mixed = pd.concat([sel, sel.assign(benchmark="VLCS")])
    with pytest.raises(ValueError, match="mixes benchmarks"):
        R.domainbed_table(mixed)
    assert list(R.benchmark_table(mixed).columns) == ["method", "dropout", "PACS", "VLCS", "Avg"]
    # one seed: mean alone (n=1 says why); rows never run are not listed (no n=0 rows)
    one = R.domainbed_table(sel[(sel.seed == 0) & ~((sel.dropout == 0.9) & (sel.lr == 5e-4))], rows=["dropout", "lr"])
    assert len(one) == 3 and one.n.tolist() == [1, 1, 1] and not one.stack().astype(str).str.contains("±").any()
    assert one.set_index(["dropout", "lr"]).loc[(0.9, 1e-3), "art_painting"] == "59.2"  # .5+.09+.002
    md, tex = R.to_markdown(t), R.to_latex(t)
    assert "| method" in md and "59.6 ± 0.5" in md
    assert r"art\_painting" in tex and r"$\pm$" in tex and r"\toprule" in tex


def test_reference_and_comparison(tmp_path):
    ref = paper_reference()
    assert set(ref.benchmark) == {"VLCS", "PACS", "OfficeHome", "TerraIncognita"}
    for rate, mean in MEAN_OOD.items():  # the per-benchmark numbers agree with the paper's mean column
        assert ref.query("method == 'model' and dropout == @rate").ood_acc.mean() == pytest.approx(mean, abs=0.0015)
    sel = _sweep(tmp_path)
    cmp = R.reference_comparison(sel)
    assert cmp[["benchmark", "dropout"]].values.tolist() == [["PACS", 0.0], ["PACS", 0.9]]
    assert cmp.set_index("dropout").loc[0.9, "paper_ood"] == "88.4"
    assert cmp.set_index("dropout").loc[0.9, "diff_ood"] == f"{100 * (0.626 - 0.884):+.1f}"
    # head lr x10 and from-scratch runs are not the paper's setting
    assert R.reference_comparison(sel.assign(head_lr_mult=10.0)).empty
    assert R.reference_comparison(sel.assign(benchmark="emoji")).empty


PAPER_ROW = {"benchmark": "PACS", "backbone": "resnet50.tv2_in1k", "pretrained": True, "weights_file": None,
             "head": "linear", "train_stages": None, "head_lr_mult": 1.0, "freeze_bn": True, "augment": True,
             "resolution": 224, "steps": 10000}


@pytest.mark.parametrize("change", [{}, {"backbone": "resnet50.tv_in1k"}, {"benchmark": "terraincognita"},
                                    {"backbone": "efficientnet_lite0.offline"}, {"resolution": 96}, {"steps": 600},
                                    {"train_stages": 1}, {"head": "multiblock3"}, {"augment": False},
                                    {"pretrained": False}, {"head_lr_mult": 10.0}, {"weights_file": "w-noise0.1.pt"},
                                    {"freeze_bn": False}, {"benchmark": "emoji"}])
def test_one_beside_the_paper_rule(tmp_path, change):
    """The paper's columns only for runs in its setting (issue 13 item 9): each departure alone
    excludes a run, in the rule, in reference_comparison and in the report's table."""
    expected = not change or change in ({"backbone": "resnet50.tv_in1k"}, {"benchmark": "terraincognita"})
    row = pd.DataFrame([{**PAPER_ROW, **change}])
    assert bool(R.in_paper_setting(row).iloc[0]) is expected
    assert len(R.paper_setting(row)) == int(expected)
    if change.get("benchmark") is None and not change.get("backbone"):
        run = make_run(tmp_path / "runs", "r", [make_record(10000, accs(.9, .8))], **{**PAPER_ROW, **change})
        text = R.report([run], out=tmp_path / "report")
        assert ("Beside the paper" in text) is expected
        assert (not R.reference_comparison(R.select(R.load_runs([run]))).empty) is expected


# ---------------------------------------------------------------- plots and report

def _legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
            for t in leg.get_texts()]


def test_iid_vs_ood_figure_shows_percent_rates_n_and_floors(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from vldlib.evaluate.plots import MIN_SPAN, RATE_COLORS

    sel = _sweep(tmp_path / "runs")
    fig = R.plot_iid_vs_ood(sel, reference=False, majority=0.35, chance=0.25, path=tmp_path / "a.png")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("i.i.d. accuracy (%)", "o.o.d. accuracy (%)")
    # the points are the sweep's known means in % (iid 0.805; ood 0.536 and 0.626, see _sweep), in the rates' colours
    points = {(round(float(ln.get_xdata()[0]), 3), round(float(ln.get_ydata()[0]), 3)): to_hex(ln.get_color())
              for ln in ax.lines if len(ln.get_xdata()) == 1 and ln.get_linestyle() in ("None", "")}
    assert points[(80.5, 53.6)] == RATE_COLORS[0.0] and points[(80.5, 62.6)] == RATE_COLORS[0.9]
    legend = _legend_texts(fig)
    # what a student reads: the rate named as a rate, the method in words, the number of seeds
    assert "dropout rate 0.9, fine-tuning (n=2)" in legend, legend
    assert not any("=ens" in t or "dropout=" in t for t in legend)
    # the floors lie far below the points: named in the legend, drawn, and not stretching the axis
    assert "majority class (35.0%) (below the axis)" in legend and "chance (25.0%) (below the axis)" in legend
    floor = [ln for ln in ax.lines if ln.get_linestyle() == ":"]
    assert sorted(float(ln.get_ydata()[0]) for ln in floor) == [25.0, 35.0]
    assert ax.get_ylim()[0] > 35.0
    assert fig.legends and not ax.get_legend()  # one legend, outside the panel
    # the means differ by 9 points on o.o.d. and not at all on i.i.d.: both axes still span >= MIN_SPAN
    assert ax.get_xlim()[1] - ax.get_xlim()[0] >= MIN_SPAN and ax.get_ylim()[1] - ax.get_ylim()[0] >= MIN_SPAN
    assert (tmp_path / "a.png").exists()
    plt.close(fig)


def test_floor_lines_keep_the_range_and_say_where_an_outside_floor_lies():
    import matplotlib.pyplot as plt

    from vldlib.evaluate.plots import floor_lines

    fig, ax = plt.subplots()
    ax.plot([0, 1], [40, 60])
    ax.set_ylim(40, 60)
    lines = floor_lines(ax, majority=0.5, chance=0.1)
    assert [ln.get_label() for ln in lines] == ["majority class (50.0%)", "chance (10.0%) (below the axis)"]
    assert ax.get_ylim() == (40, 60)
    fig2, ax2 = plt.subplots()
    ax2.set_xlim(0, 5)
    (line,) = floor_lines(ax2, majority=0.2, vertical=True)
    assert line.get_label() == "majority class (20.0%) (above the axis)" and ax2.get_xlim() == (0, 5)
    plt.close(fig)
    plt.close(fig2)


def test_rate_colours_are_fixed_and_distinct():
    from matplotlib.colors import to_rgb

    from vldlib.evaluate.plots import rate_color

    a, b = to_rgb(rate_color(0.9)), to_rgb(rate_color(0.95))
    assert sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 > 0.3  # not two near-identical yellows
    assert rate_color(0.9) == rate_color("0.9") == rate_color(0.90000001)


def test_rate_curve_never_pools_settings(tmp_path):
    import matplotlib.pyplot as plt

    sel = _sweep(tmp_path / "runs")
    # half of the runs trained only the head: they must be a line of their own
    mixed = pd.concat([sel, sel.assign(train_stages=0, ood_acc=sel.ood_acc - 0.2)], ignore_index=True)
    fig = R.plot_rate_curve(mixed, hue=["method", "train_stages"], reference=False, majority=0.4)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("dropout rate", "o.o.d. accuracy (%)")
    curves = [ln for ln in ax.lines if ln.get_marker() == "o"]  # not the floor lines or error-bar caps
    assert len(curves) == 2  # (method, train_stages) pairs, each over the two rates
    tops = sorted(round(float(ln.get_ydata()[1]), 1) for ln in curves)
    assert tops == [42.6, 62.6]  # the two settings' rate-0.9 means, in %, not pooled into 52.6
    legend = _legend_texts(fig)
    assert any(t == "fine-tuning, head only (n=2)" for t in legend), legend
    assert "majority class (40.0%)" in legend
    plt.close(fig)


def test_training_curves_and_conditions_figures(tmp_path):
    import matplotlib.pyplot as plt

    sel = _sweep(tmp_path / "runs")
    df = R.load_runs([tmp_path / "runs" / "p0.0_t0_s0_lr0.001"])
    fig = R.plot_training_curves(df, path=tmp_path / "c.png")
    assert fig.axes[0].get_ylabel() == "accuracy (%)" and not fig.axes[0].get_legend() and fig.legends
    assert "art_painting in (test)" in _legend_texts(fig)
    with pytest.raises(ValueError, match="pass run="):
        R.plot_training_curves(R.load_runs([tmp_path / "runs"]))
    fig2 = R.plot_conditions(sel, x="dropout", majority=0.3)
    ax = fig2.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dropout rate 0", "dropout rate 0.9"]
    assert ax.get_ylabel() == "o.o.d. accuracy (%)"
    assert [round(float(y), 1) for y in next(ln for ln in ax.lines if ln.get_marker() == "o").get_ydata()] == [53.6, 62.6]
    assert "mean ± se (n=2)" in _legend_texts(fig2)
    for f in (fig, fig2):
        plt.close(f)


def test_validation_curves_one_line_per_head_and_rate(tmp_path):
    import matplotlib.pyplot as plt

    from vldlib.evaluate import convergence

    for head in ("multiblock1", "multiblock3"):
        for p in (0.0, 0.9):
            make_run(tmp_path, f"{head}_{p}", [make_record(s, accs(.5 + .1 * p, .4)) for s in (100, 200)],
                     dropout=p, head=head)
    curves = convergence.validation_curves(R.load_runs([tmp_path]))
    fig = convergence.plot_validation_curves(curves, hue="dropout", style="head")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy (%)"
    drawn = [ln for ln in ax.lines if len(ln.get_xdata()) == 2]
    assert len(drawn) == 4  # (head, rate): never the two heads pooled into one line per rate
    assert sorted({round(float(ln.get_ydata()[0]), 1) for ln in drawn}) == [50.0, 59.0]
    plt.close(fig)


def test_report_cli(tmp_path, capsys):
    from vldlib.cli import main

    _sweep(tmp_path / "runs")
    make_run(tmp_path / "runs", "still_running", [make_record(300, accs(.8, .6))], done=False, dropout=0.5)
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## PACS: o.o.d. accuracy by held-out domain" in printed and "Beside the paper" in printed
    assert "still training were left out" in printed
    for f in ("results.csv", "selected.csv", "table.md", "table.tex", "ood_vs_iid.png", "rate_curve.png"):
        assert (out / f).exists(), f
    sel = pd.read_csv(out / "selected.csv")
    assert len(sel) == 32 and not sel.run.str.contains("still_running").any()
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--include-unfinished",
                 "--selection", "last"]) == 0
    assert len(pd.read_csv(out / "selected.csv")) == 33
    with pytest.warns(UserWarning, match="no records.jsonl"):
        assert main(["report", str(_empty(tmp_path)), "--out", str(out)]) == 2
    assert "no evaluated runs" in capsys.readouterr().err


def test_format_cell():
    assert R.format_cell(0.7871, 0.0032) == "78.7 ± 0.3"
    assert R.format_cell(float("nan"), 0.1) == "-"
    assert R.format_cell(0.5, float("nan"), percent=False, digits=3) == "0.500 ± 0.000"
    assert R.format_cell(0.7871, 0.0, n=1) == "78.7"  # one seed: no "± 0.0"
    assert not math.isnan(paper_reference().ood_acc.sum())


def test_report_says_how_validation_images_were_evaluated(tmp_path):
    plain = make_run(tmp_path / "runs", "plain", [make_record(300, accs(.9, .8))])
    aug = make_run(tmp_path / "runs", "aug", [make_record(300, accs(.9, .8))], val_augment=True, seed=1)
    assert "(resized, no augmentation)" in R.report([plain], out=tmp_path / "a")
    assert "with the training augmentation: val_augment" in R.report([aug], out=tmp_path / "b")
    assert "some runs with the training augmentation" in R.report([plain, aug], out=tmp_path / "c")
