"""What a run writes of its weights, and what reads them (issue 25: the quickstart's time).

- Runs that keep no weights (`TrainConfig.save_weights=False`), what the studies that read only
  records.jsonl use: no .pt file outlives them, they resume like any other, they are the same run
  (folder, records) as one that keeps its weights, and whatever needs their weights refuses them,
  naming the run folder and the fix.
- last.pt holds the trained part only until the run's last evaluation, resumes onto the start built
  again, and refuses a start that changed.
- The weight average of one update is the network itself: not evaluated twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from vldlib.config import TrainConfig, UsageError
from vldlib.evaluate import combine as S
from vldlib.loop import WeightsNotKept, load_run_model, weights_file
from vldlib.loop import train as loop_train
from vldlib.loop.train import train
from vldlib.utils import read_jsonl

from test_soups import Fns, _tiny, make_run
from conftest import stop_after_steps
from test_train import kill_mid_run, stable, tiny_config


def no_weights(root: Path, **kw) -> TrainConfig:
    return tiny_config(root, **{"keep_last": False, **kw, "save_weights": False})


def pt_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".pt" in p.name)


def test_a_run_without_weights_writes_none_and_the_same_records(fake_benchmark, tmp_path, monkeypatch):
    written = []
    save = loop_train.save_checkpoint
    monkeypatch.setattr(loop_train, "save_checkpoint", lambda path, state: (written.append(path.name), save(path, state)))
    kw = dict(benchmark=str(fake_benchmark), steps=8)
    run = train(no_weights(tmp_path / "a", **kw))
    assert pt_files(run) == [] and (run / "done").exists()
    assert set(written) == {"last.pt"}  # the resume state during the run, and nothing else
    kept = train(tiny_config(tmp_path / "b", keep_last=False, **kw))
    assert pt_files(kept) == ["best.pt", "final.pt"]
    assert kept.name == run.name  # not part of the run's identity: the same run
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(kept / "records.jsonl"))


def test_a_killed_run_without_weights_resumes_with_identical_records(fake_benchmark, tmp_path, capsys):
    kw = dict(steps=16, eval_every=4, average_from=4, augment=True, dropout=0.5, benchmark=str(fake_benchmark))
    reference = train(no_weights(tmp_path / "ref", **kw))
    cfg = no_weights(tmp_path / "killed", **kw)
    run = kill_mid_run(cfg)
    assert not (run / "done").exists() and not (run / "best.pt").exists()
    capsys.readouterr()
    train(cfg)
    assert "resuming" in capsys.readouterr().out  # from last.pt, not from scratch
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))
    assert pt_files(run) == []


def test_weights_of_a_part_trained_with_them_are_not_left_behind(fake_benchmark, tmp_path):
    """Stopped with save_weights on (best.pt written), finished with it off: best.pt would be the
    best of the first part only, so it goes; the records are the uninterrupted run's."""
    kw = dict(benchmark=str(fake_benchmark), steps=12, keep_last=False)
    first = train(tiny_config(tmp_path, **kw), **stop_after_steps(6))
    assert (first / "best.pt").exists() and not (first / "done").exists()
    run = train(no_weights(tmp_path, **kw))
    assert run == first and pt_files(run) == []
    reference = train(no_weights(tmp_path / "ref", **kw))
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))


def test_keeping_last_pt_without_weights_is_refused_with_the_fix(tmp_path):
    with pytest.raises(UsageError, match="keep_last=False too"):
        TrainConfig(save_weights=False, steps=10, eval_every=5).validate()
    TrainConfig(save_weights=False, keep_last=False, steps=10, eval_every=5).validate()


def test_soups_and_ensembles_refuse_runs_without_weights_before_loading_any(tmp_path):
    kept = make_run(tmp_path, "kept")
    bare = make_run(tmp_path, "bare", save_weights=False)
    fns = Fns({"kept": _tiny(), "bare": _tiny()})
    for fn in (S.uniform_soup, S.greedy_soup, S.logit_ensemble):
        with pytest.raises(WeightsNotKept) as e:
            fn([kept, bare], load_fn=fns.load_fn, eval_fn=fns.eval_fn)
        assert str(bare) in str(e.value) and str(kept) not in str(e.value)
        assert "save_weights=False" in str(e.value) and "save_weights=True" in str(e.value)  # why, and the fix
    assert fns.loads == 0


def test_loading_the_weights_of_a_run_without_them_names_it_and_the_fix(fake_benchmark, tmp_path):
    from vldlib.analysis.runs import load_run_data

    run = train(no_weights(tmp_path, benchmark=str(fake_benchmark), steps=4, train_stages=1, cache_trunk=True,
                           augment=False))
    for which in ("best", "last"):
        for load in (load_run_model, load_run_data):
            with pytest.raises(WeightsNotKept, match="trained with save_weights=False") as e:
                load(run, which)
            assert str(run) in str(e.value) and "save_weights=True" in str(e.value)
    # a run whose file went missing otherwise: the message says that, not save_weights
    kept = train(tiny_config(tmp_path / "kept", benchmark=str(fake_benchmark), steps=4))
    assert weights_file(kept, "last").name == "last.pt"
    (kept / "best.pt").unlink()
    with pytest.raises(WeightsNotKept, match="file was removed"):
        load_run_model(kept, "best")


def test_across_runs_refuses_every_run_without_weights_at_once(tmp_path):
    from vldlib.experiments.notebook import across_runs

    runs = [make_run(tmp_path, f"r{i}", save_weights=i == 0) for i in range(3)]
    selected = pd.DataFrame({"run": [str(r) for r in runs], "method": "model", "benchmark": "PACS",
                             "test_envs": "2", "dropout": 0.9, "iid_acc": 0.5})
    fns = Fns({r.name: _tiny() for r in runs})
    with pytest.raises(WeightsNotKept, match="2 run") as e:
        across_runs(selected, load_fn=fns.load_fn, eval_fn=fns.eval_fn)
    assert str(runs[1]) in str(e.value) and str(runs[2]) in str(e.value) and str(runs[0]) not in str(e.value)
    assert fns.loads == 0


def test_the_quickstart_keeps_no_weights_and_notebooks_choose(fake_benchmark, tmp_path):
    from vldlib.experiments import notebook
    from vldlib.experiments.quickstart import DEFAULTS, quickstart_config, study_grid

    params = {**DEFAULTS, "benchmark": str(fake_benchmark), "output_dir": str(tmp_path / "qs"), "tuned_by": None,
              "seeds": [0], "resolution": 32, "backbone": "test_resnet", "pretrained": False}
    nb = notebook.setup(params)
    configs = study_grid(nb)
    assert configs and all(not c.save_weights and not c.keep_last for c in configs)
    assert not quickstart_config("cpu").save_weights
    assert nb.base_config().save_weights  # a study that reads weights keeps them by default
    assert not nb.base_config(save_weights=False).save_weights  # notebook 07's one-line change
    assert not notebook.setup({**params, "save_weights": False}).base_config().save_weights  # or a parameter
    assert replace(configs[0], save_weights=True).identity() == configs[0].identity()


# ----------------------------------------------------------------------------- last.pt: the trained part only

def test_last_pt_holds_the_trained_part_until_the_end_and_resumes_onto_the_start(fake_benchmark, tmp_path):
    """last.pt, written at every evaluation to resume from, leaves out the frozen parameters (the
    start's, built again on resume); the last one of a run that keeps it is whole, as before."""
    import torch

    kw = dict(benchmark=str(fake_benchmark), steps=12, train_stages=1)
    cfg = tiny_config(tmp_path, **kw)
    run = train(cfg, **stop_after_steps(6))
    mid = torch.load(run / "last.pt", weights_only=True)
    net, _ = load_run_model(run, "last")  # an unfinished run's last weights: its trained part over its start
    frozen = {k for k, p in net.model.named_parameters() if not p.requires_grad}
    trained = {k for k, p in net.model.named_parameters() if p.requires_grad}
    assert mid["step"] == 4 and frozen and not frozen & set(mid["model"]) and trained <= set(mid["model"])
    assert not {f"module.{k}" for k in frozen} & set(mid["averaged"])
    assert all(torch.equal(net.model.state_dict()[k], v) for k, v in mid["model"].items())
    train(cfg)
    end = torch.load(run / "last.pt", weights_only=True)
    assert end["step"] == 12 and set(end["model"]) == set(net.model.state_dict())  # whole: kept to extend
    reference = train(tiny_config(tmp_path / "ref", **kw))
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))
    assert all(torch.equal(v, torch.load(reference / "last.pt", weights_only=True)["model"][k])
               for k, v in end["model"].items())


def test_resuming_onto_another_start_is_refused(fake_benchmark, tmp_path):
    """The frozen parameters come from the start built again: a weights file replaced meanwhile
    would resume the trained part on another trunk. Refused, naming the file and the fix."""
    import torch

    from vldlib.loop.rundir import ResumeRefused
    from vldlib.model import create_model

    weights = tmp_path / "start.pth"
    torch.manual_seed(0)
    torch.save(create_model("test_resnet", 3, pretrained=False).state_dict(), weights)
    original = weights.read_bytes()
    cfg = tiny_config(tmp_path, benchmark=str(fake_benchmark), steps=12, train_stages=1, pretrained=True,
                      weights_file=str(weights))
    run = train(cfg, **stop_after_steps(6))
    torch.manual_seed(1)
    torch.save(create_model("test_resnet", 3, pretrained=False).state_dict(), weights)
    with pytest.raises(ResumeRefused, match="frozen part built again now differs") as e:
        train(cfg)
    assert str(run) in str(e.value)
    weights.write_bytes(original)
    train(cfg)
    assert (run / "done").exists()


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("freeze_bn", [True, False])
def test_the_average_of_one_update_is_not_evaluated_twice(fake_benchmark, tmp_path, monkeypatch, freeze_bn):
    """At `average_from` the weight average holds one update, this step's weights: with frozen
    BatchNorm its predictions are the network's, and the loop reuses them (one pass over the
    evaluation data fewer); unfrozen, the average gets its own statistics and is evaluated."""
    calls = []
    predict = loop_train.predict_all
    monkeypatch.setattr(loop_train, "predict_all", lambda fwd, *a, **k: (calls.append(fwd), predict(fwd, *a, **k))[1])
    cfg = tiny_config(tmp_path, benchmark=str(fake_benchmark), steps=6, eval_every=2, average_from=2,
                      freeze_bn=freeze_bn, train_stages=1, augment=False, cache_trunk=True)
    records = read_jsonl(train(cfg) / "records.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert len(calls) == 4 + (2 if freeze_bn else 3)  # the network at 0, 2, 4, 6; the average at 4, 6 (and 2)
    if freeze_bn:
        assert records[1]["acc"]["wa"] == records[1]["acc"]["model"]


def test_the_effect_map_notebook_keeps_no_weights_when_told(fake_benchmark, tmp_path):
    """Notebook 07 reads only records: `save_weights=False` as a papermill parameter reaches its
    runs through `Notebook.base_config` (the notebook itself unchanged), and it still completes."""
    pm = pytest.importorskip("papermill")
    out = tmp_path / "em"
    params = dict(benchmark=str(fake_benchmark), output_dir=str(out), backbones=["test_resnet"], depths=[1],
                  dropout_rates=[0.0, 0.9], pretrained=False, resolution=32, seeds=[0], test_envs=[0], steps=2,
                  eval_every=1, batch_size=4, lr=[0.05], weight_decay=[1e-4], single_recipe=None, save_weights=False)
    pm.execute_notebook(str(Path(__file__).resolve().parents[1] / "notebooks/07_effect_map.ipynb"),
                        str(tmp_path / "07.ipynb"), parameters=params, cwd=str(Path(__file__).resolve().parents[1]),
                        progress_bar=False, kernel_name="python3")
    runs = [p for p in (out / "runs").iterdir() if p.is_dir()]
    # the 2 tuned runs and their 2 constant-lr budget checks: none of them keeps weights
    assert (out / "summary.md").exists() and len(runs) == 4 and all((r / "done").exists() for r in runs)
    assert [p for r in runs for p in r.iterdir() if ".pt" in p.name] == []
