"""The experiment notebooks (01-06) and the report run top to bottom under papermill.

Each experiment notebook gets a tiny fake benchmark (3 domains x 3 classes x 6 images), timm's
`test_resnet` with random weights at 32 px and a few steps, and must write its results files.
The report runs on hand-made run directories (records written by hand, as in test_results.py),
including PACS runs so that the comparison with the paper's numbers is exercised too.
Also unit tests of vldlib.experiments, vldlib.evaluate.effects and vldlib.model.multiblock that need no notebook.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_fake_benchmark

from vldlib.evaluate import effects, report
from vldlib.experiments import notebook as figures
from vldlib.experiments import starts
from vldlib.model import MultiBlockNet, create_model, residual_units

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"

TINY = dict(backbone="test_resnet", pretrained=False, resolution=32, steps=2, eval_every=1, batch_size=4,
            seeds=[0], test_envs=[0], num_threads=1)
# notebook -> (its own tiny parameters, files it must write)
CASES = {
    "01_ood_comparison": (dict(seeds=[0, 1]), ["summary.md", "table.csv", "across_runs.csv", "ood_vs_iid.png"]),
    "02_dropout_sweep": (dict(dropout_rates=[0.0, 0.9]), ["summary.md", "table.csv", "rate_curve.png", "rate_curve.csv"]),
    "03_head_lr_and_combinations": (dict(seeds=[0, 1]), ["summary.md", "table.csv", "table_fig7.csv", "head_lr.png"]),
    "04_from_scratch": (dict(dropout_rates=[0.0, 0.9]), ["summary.md", "table.csv", "rate_curve.png"]),
    "05_pretraining_quality": (dict(starting_points=["test_resnet", "test_resnet@noise0.5"]),
                               ["summary.md", "table.csv", "fig8.csv", "pretraining.png"]),
    "06_linear_finetuning": (dict(dropout_rates=[0.0, 0.9], blocks=[1, 2]), ["summary.md", "table.csv", "rate_curve.png"]),
}


def _scored_majority(root: Path, env: int) -> float:
    """The majority-class rate of the images that score held-out domain `env` (trial seed 0), counted
    here from the split itself."""
    from collections import Counter

    from vldlib.data import load_benchmark, split_domain
    from vldlib.evaluate.scores import ood_split

    bench = load_benchmark(str(root), progress=False)
    labels = [y for _, y in bench.samples[env]]
    ins, outs = split_domain(len(labels), 0, env, 0.2, bench.groups(env))
    part = [labels[i] for i in (ins if ood_split(bench) == "in" else outs)]
    return max(Counter(part).values()) / len(part)


def _execute(name: str, params: dict, tmp: Path) -> None:
    pm = pytest.importorskip("papermill")
    pm.execute_notebook(str(NB / f"{name}.ipynb"), str(tmp / f"{name}.out.ipynb"), parameters=params,
                        cwd=str(ROOT), progress_bar=False, kernel_name="python3")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    return make_fake_benchmark(tmp_path_factory.mktemp("bench") / "fake")


@pytest.mark.parametrize("name", sorted(CASES))
def test_experiment_notebook_runs(name, fake, tmp_path):
    own, files = CASES[name]
    params = {**TINY, **own, "benchmark": str(fake), "output_dir": str(tmp_path / name)}
    if name == "05_pretraining_quality":
        params.pop("backbone")  # 05 takes its backbones from starting_points
    _execute(name, params, tmp_path)
    out = tmp_path / name
    for f in files:
        assert (out / f).exists(), f"{name} did not write {f}"
    selected = pd.read_csv(out / "selected.csv")
    assert set(selected.method) >= {"model", "wa", "ens"}
    _check_selected_against_records(out, selected)
    summary = (out / "summary.md").read_text()
    assert _check_verdicts(summary) >= 1, f"{name}: no computed effect sentence in its summary"
    assert "fake" in summary and "on emoji" not in summary  # the caveat names the benchmark that ran
    # the floor of the images that score held-out d0: its "in" split (80% of 6 images x 3 classes)
    assert f"Majority class of the held-out domain(s): {100 * _scored_majority(fake, 0):.1f}%" in summary
    if name in PAIRED:  # the verdicts' numbers, recomputed here from the selected runs
        model = selected[(selected.selection == "training_domain") & (selected.method == "model")]
        for sides, key, a, b in PAIRED[name](model):
            d = _paired(model, key, a, b)
            found = re.search(re.escape(sides) + r": o\.o\.d\. accuracy .*?paired difference ([+-][\d.]+)", summary)
            assert found, (sides, summary)
            assert float(found.group(1)) == pytest.approx(100 * d, abs=0.051), sides
    if name == "02_dropout_sweep":  # the best rate it names is the best row of the table it prints
        best = re.search(r"Best rate by mean o\.o\.d\. accuracy: ([\d.]+) \(([\d.]+)", summary)
        table = pd.read_csv(out / "table.csv")
        avg = table[table.method == "model"].set_index("dropout").Avg.map(lambda c: float(str(c).split(" ")[0]))
        assert float(best.group(2)) == pytest.approx(avg.max(), abs=0.051)
        assert avg[float(best.group(1))] == avg.max()


# "B vs A: o.o.d. accuracy b% vs a%, paired difference +d [95% CI +lo, +hi] points (n=k pairs ...; SE s,
# t(k-1)=t, p=p): verdict"
EFFECT = re.compile(r"(?P<sides>[^:\n]+): [oi]\.[oi]\.d\. accuracy (?P<b>[\d.]+)% vs (?P<a>[\d.]+)%, paired difference "
                    r"(?P<d>[+-][\d.]+)(?: \[95% CI (?P<lo>[+-][\d.]+), (?P<hi>[+-][\d.]+)\])? points "
                    r"\(n=(?P<n>\d+) pairs[^\n]*?\)(?P<verdict>[:;][^\n]*)")


def _check_verdicts(summary: str) -> int:
    """Every effect sentence agrees with its own numbers: the difference is the two means'
    difference and lies in its interval, and the verdict (detectable or not) follows from whether
    the 95% t interval excludes 0."""
    count = 0
    for m in EFFECT.finditer(summary):
        count += 1
        a, b, d = float(m["a"]), float(m["b"]), float(m["d"])
        assert d == pytest.approx(b - a, abs=0.11), m[0]
        if m["lo"] is None:
            assert "no interval" in m["verdict"], m[0]
            continue
        lo, hi = float(m["lo"]), float(m["hi"])
        assert lo - 0.05 <= d <= hi + 0.05, m[0]
        if lo < -0.05 and hi > 0.05:
            assert "no detectable effect" in m["verdict"], m[0]
        elif lo > 0.05 or hi < -0.05:
            assert ("detectable improvement" if d > 0 else "detectable loss") in m["verdict"], m[0]
    return count


def _paired(model: pd.DataFrame, key: dict, a, b) -> float:
    """Mean over (held-out domain, seed) of o.o.d.(b) - o.o.d.(a), each side averaged over the rest."""
    col = next(iter(key))
    rest = model
    for k, v in key[col].items():
        rest = rest[rest[k] == v]
    side = {v: rest[rest[col] == v].groupby(["test_env", "seed"]).ood_acc.mean() for v in (a, b)}
    return float((side[b] - side[a]).dropna().mean())


# notebook -> the paired contrasts its summary must state: (sides as printed, {column: other conditions}, a, b)
PAIRED = {
    "02_dropout_sweep": lambda m: [("dropout 0.9 vs 0", {"dropout": {}}, 0.0, 0.9)],
    "01_ood_comparison": lambda m: [("fine-tuning, dropout=0.9 vs fine-tuning, dropout=0", {"dropout": {}}, 0.0, 0.9)],
    "06_linear_finetuning": lambda m: [(f"fine-tuning, head=multiblock{k}, dropout=0.9 vs fine-tuning, "
                                        f"head=multiblock{k}, dropout=0", {"dropout": {"head": f"multiblock{k}"}}, 0.0, 0.9)
                                       for k in (1, 2)],
}


def _check_selected_against_records(out: Path, selected: pd.DataFrame) -> None:
    """Each selected row, recomputed from its run's records.jsonl: the step with the highest mean
    training-domain "out" accuracy (earliest on ties) and the held-out domain's accuracy there."""
    runs = {p.parent.name: p.parent for p in out.rglob("records.jsonl")}
    rows = selected[selected.selection == "training_domain"] if "selection" in selected else selected
    assert len(rows)
    for row in rows.itertuples():
        run = runs[Path(str(row.run)).name]
        meta = json.loads((run / "meta.json").read_text())
        test_env = json.loads((run / "config.json").read_text())["test_envs"][0]
        evals = [r for r in map(json.loads, (run / "records.jsonl").read_text().splitlines())
                 if r.get("type") == "eval" and row.method in r["acc"]]
        iid = [sum(r["acc"][row.method][f"env{e}_out"] for e in meta["train_envs"]) / len(meta["train_envs"])
               for r in evals]
        best = evals[max(range(len(evals)), key=lambda k: (iid[k], -evals[k]["step"]))]
        assert row.step == best["step"], (row.run, row.method)
        assert row.ood_acc == pytest.approx(best["acc"][row.method][f"env{test_env}_{meta['ood_split']}"])


def test_every_experiment_notebook_has_a_paper_parameter_set():
    import papermill as pm
    import yaml

    for name in CASES:
        declared = pm.inspect_notebook(str(NB / f"{name}.ipynb"))
        path = NB / f"{name}.paper.yaml"
        grid = yaml.safe_load(path.read_text())
        unknown = set(grid) - set(declared)
        assert not unknown, f"{path.name} sets {unknown}, not parameters of {name}"
        assert "output_dir" not in grid  # set by the sweep
    domainnet = yaml.safe_load((NB / "02_dropout_sweep.domainnet.yaml").read_text())
    assert domainnet["benchmark"] == "DomainNet" and domainnet["steps"] == 30000


# --------------------------------------------------------------------------- the report

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def _run(root: Path, name: str, test_env: int, dropout: float, seed: int, ood: float, benchmark: str = "PACS",
         **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {"benchmark": benchmark, "data_dir": "/data", "test_envs": [test_env], "backbone": "resnet50.tv2_in1k",
           "pretrained": True, "dropout": dropout, "lr": 1e-3, "head_lr_mult": 1.0, "weight_decay": 1e-4,
           "steps": 10000, "seed": seed, "trial_seed": 0, "resolution": 224, "train_stages": None,
           "weights_file": None, **config}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "meta.json").write_text(json.dumps({"benchmark": benchmark, "domains": DOMAINS, "classes": ["a", "b"],
                                               "test_envs": [test_env], "init_fingerprint": "x"}))
    recs = []
    for step, f in [(300, 0.9), (600, 1.0)]:
        acc = {f"env{e}_{s}": (ood * f if e == test_env and s == "in" else 0.8 * f) for e in range(4) for s in ("in", "out")}
        recs.append({"type": "eval", "step": step, "loss": 0.5, "acc": {m: acc for m in ("model", "wa", "ens")}})
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "done").write_text("")
    return run


def test_report_notebook_on_hand_made_runs(tmp_path):
    results_dir = tmp_path / "outputs"
    for t in range(2):
        for p in (0.0, 0.5, 0.9):
            for s in range(2):
                _run(results_dir / "02_dropout_sweep" / "runs", f"pacs-t{t}-p{p}-s{s}", t, p, s, 0.7 + 0.05 * p + 0.01 * s)
                _run(results_dir / "04_from_scratch" / "runs", f"scratch-t{t}-p{p}-s{s}", t, p, s, 0.5 - 0.1 * p,
                     pretrained=False)
    _run(results_dir / "06_linear_finetuning" / "runs", "mb-t0", 0, 0.9, 0, 0.6, train_stages=0, head="multiblock3")
    # two heads in one experiment: "head" varies within its table (once crashed the report:
    # "cannot insert head, already exists")
    _run(results_dir / "06_linear_finetuning" / "runs", "mb1-t0", 0, 0.9, 0, 0.55, train_stages=0, head="multiblock1")
    soups = pd.DataFrame([{"run": "soup_uniform of 2 runs", "method": "soup_uniform", "iid_acc": 0.8, "ood_acc": 0.71,
                           "benchmark": "PACS", "test_env": 0, "test_domain": "art_painting", "dropout": 0.0,
                           "pretrained": True, "head_lr_mult": 1.0}])
    (results_dir / "01_ood_comparison").mkdir()
    soups.to_csv(results_dir / "01_ood_comparison" / "across_runs.csv", index=False)
    out = tmp_path / "report"
    _execute("report", {"results_dir": str(results_dir), "output_dir": str(out)}, tmp_path)
    text = (out / "report.md").read_text()
    assert "02_dropout_sweep / PACS" in text and "Beside the paper" in text
    ref = pd.read_csv(out / "reference_comparison.csv")
    assert set(ref.dropout) == {0.0, 0.5, 0.9} and "soup_uniform" in set(ref.method)
    assert (out / "paper_setting" / "table.md").exists()  # vldlib.evaluate.report bundle
    for f in ("ood_vs_iid.png", "rate_curves.png", "tables.csv", "selected.csv"):
        assert (out / f).exists(), f
    sel = pd.read_csv(out / "selected.csv")
    assert set(sel.experiment) == {"02_dropout_sweep", "04_from_scratch", "06_linear_finetuning"}
    assert set(sel["head"]) == {"linear", "multiblock1", "multiblock3"}
    # the rate curves keep pretrained and from-scratch runs apart (hand-made means: 0.7 + 0.05p + 0.005 and 0.5 - 0.1p)
    curves = pd.read_csv(out / "rate_curves.csv").set_index(["experiment", "dropout"]).ood_acc_mean
    assert curves[("02_dropout_sweep", 0.9)] == pytest.approx(0.75) and curves[("04_from_scratch", 0.9)] == pytest.approx(0.41)
    assert (pd.read_csv(out / "tables.csv").n > 0).all()  # no empty rows


# --------------------------------------------------------------------------- library units

def test_one_path_or_name_rule(tmp_path, monkeypatch):
    """Registered names are names (even beside a folder of that name); separators or a leading "."
    make a path; every layer asks the same function."""
    from vldlib.config import TrainConfig
    from vldlib.data import resolve_benchmark
    from vldlib.data.registry import benchmark_label, is_benchmark_path
    from vldlib.experiments.grid import with_paths
    from vldlib.loop.rundir import run_dir_for

    monkeypatch.chdir(tmp_path)
    (tmp_path / "PACS").mkdir()
    (tmp_path / "mine").mkdir()
    assert [is_benchmark_path(x) for x in ("PACS", "pacs", "mine", "data/PACS", "./PACS", str(tmp_path))] == \
        [False, False, True, True, True, True]
    assert resolve_benchmark("PACS", "d")[0] == Path("d") / "PACS" and resolve_benchmark("mine")[1] is None
    assert benchmark_label(tmp_path / "x" / "fake") == "fake" and benchmark_label("emoji") == "emoji"
    cfg = TrainConfig(benchmark=str(tmp_path / "fake"), out=str(tmp_path))
    assert run_dir_for(cfg).name.startswith("fake-te") and with_paths(cfg).benchmark == str(tmp_path / "fake")
    assert with_paths(TrainConfig(benchmark="emoji")).benchmark == "emoji"
    with pytest.raises(KeyError, match="Did you mean"):
        resolve_benchmark("PAC")  # a typo is a name that is not registered: say so, with the close ones


def test_as_list_accepts_scalars_lists_and_sweep_style_nesting():
    assert figures.as_list(0.9) == [0.9]
    assert figures.as_list([[0, 1], 2]) == [0, 1, 2]
    assert figures.as_list(None) is None
    assert figures.held_out(None, 3) == [0, 1, 2] and figures.held_out(2, 3) == [2]
    with pytest.raises(ValueError, match="out of range"):
        figures.held_out([5], 3)


def test_contrast_pairs_and_says_when_within_noise():
    sel = pd.DataFrame({"method": "model", "dropout": [0.0, 0.9] * 3, "test_env": [0, 0, 1, 1, 2, 2],
                        "seed": 0, "ood_acc": [0.5, 0.6, 0.5, 0.62, 0.5, 0.58]})
    eff = effects.contrast(sel, {"dropout": 0.0}, {"dropout": 0.9})
    assert eff["n"] == 3 and abs(eff["mean"] - 0.1) < 1e-9
    assert "detectable improvement" in effects.effect_sentence(eff)  # the one effect sentence's words
    same = effects.contrast(sel, {"dropout": 0.0}, {"dropout": 0.0})
    assert "no detectable effect" in effects.effect_sentence(same)


def test_starting_points(tmp_path):
    assert starts.starting_point("resnet50.tv_in1k", tmp_path)["weights_file"] is None
    assert starts.starting_point("test_resnet@random", tmp_path)["pretrained"] is False
    sp = starts.starting_point("test_resnet@noise0.5", tmp_path, pretrained=False)
    assert Path(sp["weights_file"]).exists()
    assert report.start_of({"backbone": "test_resnet", "pretrained": True, "weights_file": sp["weights_file"]}) \
        .startswith("test_resnet@noise0.5")
    with pytest.raises(ValueError, match="unknown modifier"):
        starts.starting_point("test_resnet@blur", tmp_path)


def test_multiblock_net_is_linear_in_the_frozen_features():
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, pretrained=False, dropout=0.0)
    net = MultiBlockNet(model, blocks=2).eval()
    assert len(residual_units(model)) == 5  # stem + one BasicBlock per layer
    x = torch.randn(2, 3, 32, 32)
    phi = net.trunk(x)
    ext = net._trunk[0]
    assert phi.shape == (2, 2, max(ext.dims)) and ext.dims[-1] == model.num_features and not phi.requires_grad
    assert torch.allclose(net(x), net.tail(phi))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"model.head.v", "model.head.fc.weight", "model.head.fc.bias"}
    # y = V (sum_i v_i * phi_i) + b
    h = net.model.head
    assert torch.allclose(net.tail(phi), h.fc((h.v * phi).sum(1)), atol=1e-6)
    net.train()
    assert not net.model.backbone.training and net.model.head.training
