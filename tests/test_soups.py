"""Soups and ensembles across runs, with tiny models and injected load/eval functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vldlib.evaluate import combine as S

SPLITS = [f"env{e}_{s}" for e in range(3) for s in ("in", "out")]  # test env 2


def make_run(root: Path, name: str, fingerprint: str = "fp0", backbone: str = "tiny", test_envs=(2,),
             trial_seed: int = 0, seed: int = 0, dropout: float = 0.9, meta: bool = True, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "benchmark": "PACS", "test_envs": list(test_envs), "backbone": backbone, "trial_seed": trial_seed,
        "seed": seed, "dropout": dropout, "lr": 1e-3, **config}))
    if meta:
        (run / "meta.json").write_text(json.dumps({
            "benchmark": "PACS", "domains": ["art_painting", "cartoon", "photo"], "test_envs": list(test_envs),
            "init_fingerprint": fingerprint}))
    return run


class Fns:
    """load_fn/eval_fn over an in-memory {run name: model}, counting calls."""

    def __init__(self, models: dict[str, nn.Module], eval_fn=None):
        self.models, self.loads, self.evals = models, 0, 0
        self._eval = eval_fn

    def load_fn(self, run_dir, which="best"):
        self.loads += 1
        src = self.models[Path(run_dir).name]
        model = type(src)() if not isinstance(src, nn.Sequential) else _tiny()
        model.load_state_dict(src.state_dict())  # a fresh copy, as loading a checkpoint gives
        return model, json.loads((Path(run_dir) / "config.json").read_text())

    def eval_fn(self, model, cfg):
        self.evals += 1
        return self._eval(model, cfg)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
Y = torch.tensor([0, 1, 0, 1])


def linear_eval(model, cfg):
    model.eval()
    with torch.no_grad():
        return {k: (model(X), Y) for k in SPLITS}


def test_uniform_soup_averages_floats_keeps_int_buffers(tmp_path):
    a, b = _tiny(), _tiny()
    with torch.no_grad():
        a[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        b[0].weight.copy_(torch.tensor([[3.0, 2.0], [0.0, -1.0]]))
        a[1].running_mean.fill_(1.0)
        b[1].running_mean.fill_(3.0)
    a[1].num_batches_tracked.fill_(5)
    b[1].num_batches_tracked.fill_(7)
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", seed=1)]
    seen = {}

    def spy_eval(model, cfg):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return linear_eval(model, cfg)

    fns = Fns({"a": a, "b": b}, spy_eval)
    res = S.uniform_soup(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    assert torch.allclose(seen["0.weight"], torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    assert torch.allclose(seen["1.running_mean"], torch.tensor([2.0, 2.0]))
    assert seen["1.num_batches_tracked"].item() == 5 and seen["1.num_batches_tracked"].dtype == torch.long
    assert res["method"] == "soup_uniform" and res["members"] == [str(r) for r in runs]
    assert set(res["acc"]) == set(SPLITS) and fns.evals == 1
    assert res["iid_acc"] == pytest.approx((res["acc"]["env0_out"] + res["acc"]["env1_out"]) / 2)
    assert res["ood_acc"] == res["acc"]["env2_in"]
    assert res["shared"]["dropout"] == 0.9 and "seed" not in res["shared"]
    assert res["shared"]["test_domain"] == "photo"


def test_average_state_dicts_refuses_other_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        S.average_state_dicts([nn.Linear(2, 2).state_dict(), nn.Linear(2, 3).state_dict()], ["r1", "r2"])
    with pytest.raises(ValueError, match="other names"):
        S.average_state_dicts([nn.Linear(2, 2).state_dict(), _tiny().state_dict()], ["r1", "r2"])
    half = S.average_state_dicts([{"w": torch.tensor([1.0], dtype=torch.float16)},
                                  {"w": torch.tensor([2.0], dtype=torch.float16)}])
    assert half["w"].dtype == torch.float16 and half["w"].item() == 1.5


class Scalar(nn.Module):
    """One weight w; the synthetic eval scores it i.i.d. 1 - |w - 1| and o.o.d. w / 2."""

    def __init__(self, w: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))


def scalar_eval(model, cfg, n: int = 1000):
    w = float(model.w.detach())

    def outputs(acc):
        k = round(n * min(max(acc, 0.0), 1.0))
        logits = torch.zeros(n, 2)
        logits[:k, 0] = 1.0   # the first k right (label 0), the rest wrong
        logits[k:, 1] = 1.0
        return logits, torch.zeros(n, dtype=torch.long)

    iid, ood = 1 - abs(w - 1), w / 2
    return {k: outputs(ood if k.startswith("env2") else iid) for k in SPLITS}


def test_greedy_soup_adds_and_refuses(tmp_path):
    weights = {"a": 0.9, "b": 1.3, "c": 0.0, "d": 1.1}   # alone: iid .9, .7, 0, .9
    runs = [make_run(tmp_path, n, seed=i) for i, n in enumerate(weights)]
    fns = Fns({n: Scalar(w) for n, w in weights.items()}, scalar_eval)
    res = S.greedy_soup(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    # order a, d (tie: given order), b, c. {a}: .9; +d -> w=1.0: 1.0 kept; +b -> 1.1: .9 refused;
    # +c -> .667 refused, although its o.o.d. score would not be the guide anyway
    assert [Path(m).name for m in res["members"]] == ["a", "d"]
    assert [Path(c).name for c in res["candidates"]] == ["a", "d", "b", "c"]
    assert [h["added"] for h in res["history"]] == [True, True, False, False]
    assert res["iid_acc"] == pytest.approx(1.0) and res["ood_acc"] == pytest.approx(0.5)
    assert res["scores"][str(runs[2])] == pytest.approx(0.0)
    assert fns.evals == 4 + 4  # each run alone, then the first soup and three candidates


def test_greedy_soup_with_given_scores_keeps_equal_scores(tmp_path):
    weights = {"a": 0.9, "b": 1.3, "c": 0.0, "d": 1.1}
    runs = [make_run(tmp_path, n, seed=i) for i, n in enumerate(weights)]
    fns = Fns({n: Scalar(w) for n, w in weights.items()}, scalar_eval)
    scores = {str(runs[2]): 1.0, str(runs[0]): 0.5, str(runs[1]): 0.4, str(runs[3]): 0.3}
    res = S.greedy_soup(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn, scores=scores)
    # c (.0); +a -> .45 kept; +b -> .733 kept; +d -> .825 kept
    assert [Path(m).name for m in res["members"]] == ["c", "a", "b", "d"]
    assert fns.evals == 4
    with pytest.raises(ValueError, match="no score given"):
        S.greedy_soup(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn, scores={str(runs[0]): 1.0})


def test_logit_ensemble_sums_logits(tmp_path):
    torch.manual_seed(0)
    models = {"a": _tiny(), "b": _tiny(), "c": _tiny()}
    runs = [make_run(tmp_path, n, fingerprint=f"fp_{n}", backbone=f"arch_{n}") for n in models]  # allowed
    fns = Fns(models, linear_eval)
    res = S.logit_ensemble(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    with torch.no_grad():
        total = sum(m.eval()(X) for m in models.values())
    expect = (total.argmax(1) == Y).float().mean().item()
    assert res["method"] == "ens_runs" and res["acc"]["env0_in"] == pytest.approx(expect)
    assert res["ood_acc"] == pytest.approx(expect)


def test_logit_ensemble_refuses_other_labels(tmp_path):
    def eval_fn(model, cfg):
        out = linear_eval(model, cfg)
        if cfg["seed"] == 0:
            return out
        return {k: (lg, 1 - lb) for k, (lg, lb) in out.items()}

    runs = [make_run(tmp_path, "a", seed=0), make_run(tmp_path, "b", seed=1)]
    fns = Fns({"a": _tiny(), "b": _tiny()}, eval_fn)
    with pytest.raises(ValueError, match="other examples or labels"):
        S.logit_ensemble(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn)


def test_incompatible_runs_refused(tmp_path):
    a, b = make_run(tmp_path, "a", fingerprint="fp0"), make_run(tmp_path, "b", fingerprint="fp1")
    fns = Fns({"a": _tiny(), "b": _tiny()}, linear_eval)
    for fn in (S.uniform_soup, S.greedy_soup):
        with pytest.raises(ValueError, match=r"init_fingerprint differs.*fp0.*a.*fp1.*b"):
            fn([a, b], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    assert fns.loads == 0  # refused before loading anything
    c = make_run(tmp_path, "c", backbone="other")
    d = make_run(tmp_path, "d", test_envs=(1,))
    e = make_run(tmp_path, "e", meta=False)
    with pytest.raises(ValueError, match="backbone differs"):
        S.uniform_soup([a, c], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    with pytest.raises(ValueError, match="test_envs differs"):
        S.logit_ensemble([a, d], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    with pytest.raises(ValueError, match="no 'init_fingerprint'.*/e"):
        S.uniform_soup([a, e], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    with pytest.raises(ValueError, match="listed twice"):
        S.uniform_soup([a, a], load_fn=fns.load_fn, eval_fn=fns.eval_fn)


def test_soups_refuse_other_holdout_stages_head_or_resolution(tmp_path):
    """Same benchmark, domains and start, but another split fraction, training subset, trained part,
    head or input size: averaging such weights (or, for the split and the subset, ensembling them:
    their training domains' "in" splits differ) is meaningless."""
    a = make_run(tmp_path, "a")  # written before these fields existed: the defaults
    fns = Fns({}, linear_eval)
    for i, (key, value) in enumerate([("holdout", 0.3), ("train_stages", 1), ("head", "multiblock3"),
                                      ("resolution", 96), ("train_fraction", 0.5)]):
        other = make_run(tmp_path, f"o{i}", **{key: value})
        with pytest.raises(ValueError, match=f"{key} differs"):
            S.uniform_soup([a, other], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    with pytest.raises(ValueError, match="holdout differs"):
        S.logit_ensemble([a, tmp_path / "o0"], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    with pytest.raises(ValueError, match="train_fraction differs"):
        S.logit_ensemble([a, tmp_path / "o4"], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    same = make_run(tmp_path, "same", holdout=0.2, head="linear", train_stages=None, resolution=224,
                    train_fraction=1.0)
    assert S.check_compatible([a, same])["resolution"] == 224  # explicit defaults equal missing ones
    with pytest.raises(ValueError, match="which must be"):
        S.uniform_soup([a, same], "final", load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    assert fns.loads == 0


def test_soups_of_best_or_last_weights_of_real_runs(fake_benchmark, tmp_path):
    """which="best" averages the runs' best.pt, which="last" their final weights (final.pt, since
    keep_last=False drops last.pt), checked against the checkpoint files read here."""
    from vldlib.config import TrainConfig
    from vldlib.loop import evaluate_logits, load_run_model
    from vldlib.loop.train import train

    runs = [train(TrainConfig(benchmark=str(fake_benchmark), backbone="test_resnet", pretrained=False, resolution=32,
                              steps=4, eval_every=2, average_from=2, batch_size=4, num_workers=0, out=str(tmp_path / "r"),
                              progress=False, lr=lr, seed=0, train_stages=1, augment=False, keep_last=False,
                              device="cpu", num_threads=1)) for lr in (0.05, 0.02)]  # one start: same seed
    best_steps = [torch.load(r / "best.pt", weights_only=True)["step"] for r in runs]
    assert best_steps != [4, 4]  # so best and last differ for some run
    for which, file in (("best", "best.pt"), ("last", "final.pt")):
        seen = {}

        def spy(model, cfg):
            seen.update({k: v.clone() for k, v in model.model.state_dict().items()})
            return evaluate_logits(model, cfg, device="cpu")

        res = S.uniform_soup(runs, which, load_fn=load_run_model, eval_fn=spy)
        ckpts = [torch.load(r / file, weights_only=True)["model"] for r in runs]
        w = "fc.weight" if "fc.weight" in ckpts[0] else next(k for k in ckpts[0] if k.endswith("weight"))
        assert torch.allclose(seen[w], (ckpts[0][w] + ckpts[1][w]) / 2)
        assert res["which"] == which
    final = [torch.load(r / "final.pt", weights_only=True) for r in runs]
    assert [f["step"] for f in final] == [4, 4] and not (runs[0] / "last.pt").exists()
    frame = S.soup_frame([res])
    assert frame.method.tolist() == ["soup_uniform_last"] and frame.which.tolist() == ["last"]


def test_soup_frame_joins_selected_rows(tmp_path):
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", seed=1)]
    fns = Fns({"a": _tiny(), "b": _tiny()}, linear_eval)
    frame = S.soup_frame([S.uniform_soup(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn),
                          S.logit_ensemble(runs, load_fn=fns.load_fn, eval_fn=fns.eval_fn)])
    assert frame.method.tolist() == ["soup_uniform", "ens_runs"]
    assert frame.test_env.tolist() == [2, 2] and frame.test_domain.tolist() == ["photo", "photo"]
    assert frame.n_members.tolist() == [2, 2] and frame.benchmark.tolist() == ["PACS", "PACS"]
    assert (frame.dropout == 0.9).all()


def test_no_training_import_at_import_time(monkeypatch):
    """Soups sit below the training loop (the import-linter layers): they import without it and
    are handed the loop's loaders (vldlib.experiments.notebook.across_runs passes them)."""
    import importlib

    monkeypatch.setitem(sys.modules, "vldlib.loop", None)  # any import of the loop now raises
    monkeypatch.setitem(sys.modules, "vldlib.loop.train", None)
    try:
        importlib.reload(S)
        with pytest.raises(TypeError, match="load_fn"):
            S.uniform_soup(["somewhere"])  # no default loader: the caller names it
    finally:
        monkeypatch.undo()
        importlib.reload(S)
