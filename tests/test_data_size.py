"""Data-size subsets (`TrainConfig.train_fraction`, issue 23 section 3) and the run identity they
must leave alone: nested, per-domain, fixed by the trial seed; validation and the held-out domain
untouched; an existing run's folder name unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vldlib.config import TrainConfig, UsageError, from_dict
from vldlib.data import load_benchmark, split_domain
from vldlib.data.splits import ObjectGroups, train_subset
from vldlib.loop.batches import make_data
from vldlib.loop.rundir import run_dir_for
from vldlib.utils import config_hash

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- the subset itself
def test_subsets_are_nested_sized_and_deterministic():
    ins = np.sort(np.random.default_rng(1).choice(1000, 400, replace=False))
    subsets = {f: train_subset(ins, f, 3, 1) for f in (0.1, 0.25, 0.5, 0.75, 1.0)}
    for f, s in subsets.items():
        assert len(s) == round(f * 400) and set(s) <= set(ins) and list(s) == sorted(s)
    assert set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[0.75]) < set(subsets[1.0])
    assert subsets[1.0].tolist() == ins.tolist()
    assert train_subset(ins, 0.25, 3, 1).tolist() == subsets[0.25].tolist()  # the same call, the same images
    # drawn, not a slice: not the first or last quarter of the split
    assert subsets[0.25].tolist() not in (ins[:100].tolist(), ins[-100:].tolist())


def test_subsets_differ_per_domain_and_per_trial_seed():
    ins = np.arange(200)
    base = set(train_subset(ins, 0.5, 0, 0))
    assert set(train_subset(ins, 0.5, 0, 1)) != base  # another domain draws its own
    assert set(train_subset(ins, 0.5, 1, 0)) != base  # another trial seed too


def test_subsets_keep_objects_whole_and_nested():
    rng = np.random.default_rng(0)
    groups = ObjectGroups(f"g{k}" for k in rng.integers(0, 80, 500))
    ins, _ = split_domain(len(groups), 0, 2, 0.2, groups)
    small, large = (train_subset(ins, f, 0, 2, groups) for f in (0.25, 0.5))
    assert set(small) < set(large) <= set(ins)
    for sub in (small, large):
        kept = {groups[i] for i in sub}
        assert all(groups[i] not in kept for i in set(ins) - set(sub))  # an object is all in or all out
    sizes = {g: groups.count(g) for g in set(groups)}
    assert round(0.25 * len(ins)) <= len(small) < round(0.25 * len(ins)) + max(sizes.values())


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_a_fraction_outside_0_1_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="train fraction must be in"):
        train_subset(np.arange(10), bad, 0, 0)
    with pytest.raises(UsageError, match=r"train_fraction must be in \(0, 1\].*--train-fraction 0.25"):
        TrainConfig(benchmark=str(tmp_path), steps=10, eval_every=5, train_fraction=bad).validate()


# ----------------------------------------------------------------------------- what a run reads
def _files(ds) -> list[str]:
    return [Path(p).name for p, _ in ds.samples]


def _config(root: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(benchmark=str(root), test_envs=[0], backbone="test_resnet", pretrained=False,
                                 resolution=32, steps=4, eval_every=2, batch_size=2, num_workers=0, progress=False),
                          **kw})


def test_a_run_trains_on_the_subset_and_evaluates_the_rest_unchanged(fake_benchmark: Path):
    bench = load_benchmark(fake_benchmark, progress=False)
    full = make_data(_config(fake_benchmark), bench, MEAN, STD)
    quarter = make_data(_config(fake_benchmark, train_fraction=0.25), bench, MEAN, STD)
    half = make_data(_config(fake_benchmark, train_fraction=0.5, seed=7, lr=0.3, dropout=0.0), bench, MEAN, STD)
    half_again = make_data(_config(fake_benchmark, train_fraction=0.5, seed=0), bench, MEAN, STD)
    for env in range(3):
        ins, outs = split_domain(len(bench.samples[env]), 0, env, 0.2)  # DomainBed's split, fraction-free
        want_out = [Path(bench.samples[env][i][0]).name for i in outs]
        for data in (full, quarter, half):
            assert _files(data.evals[f"env{env}_out"]) == want_out  # validation untouched
        if env == 0:  # the held-out domain: scored on all of it, whatever the fraction
            for data in (quarter, half):
                assert _files(data.evals["env0_in"]) == _files(full.evals["env0_in"]) == [
                    Path(bench.samples[0][i][0]).name for i in ins]
            continue
        k = env - 1
        q, h, f = (set(_files(d.train[k])) for d in (quarter, half, full))
        assert len(q) == round(0.25 * len(ins)) and len(h) == round(0.5 * len(ins)) and len(f) == len(ins)
        assert q < h < f  # nested
        assert _files(half.train[k]) == _files(half_again.train[k])  # the run seed, lr, rate do not move it
        assert set(_files(half.evals[f"env{env}_in"])) == h  # fit_acc is measured on what it trains on
    assert quarter.key != full.key and half.key == half_again.key  # the trunk cache tells them apart


def test_a_fraction_too_small_for_the_batch_names_both_fixes(fake_benchmark: Path):
    bench = load_benchmark(fake_benchmark, progress=False)
    with pytest.raises(UsageError, match=r"at train_fraction 0.1 \(\d images\).*--batch-size.*--train-fraction"):
        make_data(_config(fake_benchmark, train_fraction=0.1, batch_size=4), bench, MEAN, STD)


# ----------------------------------------------------------------------------- run identity
# Hashes computed with the code before `train_fraction` existed (commit 9c1c1fb): an existing run
# folder keeps its name, so a finished run is still found finished.
PINNED = [
    ({}, "5af200eb9b", "PACS-te0-p0.9-lr0.001-s0-5af200eb9b"),
    (dict(benchmark="ObjectStyles", backbone="efficientnet_lite0.offline", resolution=96, augment=False,
          cache_trunk=True, train_stages=1, dropout=0.5, lr=5e-4, steps=300, eval_every=50, seed=2, test_envs=[2]),
     "5f9c70c362", "ObjectStyles-te2-p0.5-lr0.0005-s2-5f9c70c362"),
]


@pytest.mark.parametrize("fields,digest,folder", PINNED)
def test_existing_run_identities_are_unchanged(fields, digest, folder):
    cfg = TrainConfig(**fields)
    assert config_hash(cfg.identity()) == digest and run_dir_for(cfg).name == folder
    # the default spelled out (an int from YAML too) is the same run; another fraction is another run
    assert config_hash(from_dict(TrainConfig, {**fields, "train_fraction": 1}).identity()) == digest
    other = TrainConfig(**fields, train_fraction=0.5)
    assert config_hash(other.identity()) != digest and other.identity()["train_fraction"] == 0.5
    assert "train_fraction" not in cfg.identity()


def test_runs_written_before_the_field_read_as_the_whole_split(tmp_path: Path):
    """A run folder without train_fraction in its config.json trained on all of it: the table says
    1.0, not NaN (which a groupby by train_fraction would silently drop)."""
    from vldlib.evaluate.scores import load_runs

    from test_results import accs, make_record, make_run  # a run folder as vldlib writes one

    make_run(tmp_path, "old", [make_record(300, accs(.8, .6))])
    make_run(tmp_path, "quarter", [make_record(300, accs(.7, .5))], train_fraction=0.25)
    df = load_runs([tmp_path])
    per_run = df.groupby("run").train_fraction.first()
    assert per_run.to_dict() == {str(tmp_path / "old"): 1.0, str(tmp_path / "quarter"): 0.25}
    assert df.groupby("train_fraction").run.nunique().to_dict() == {0.25: 1, 1.0: 1}
