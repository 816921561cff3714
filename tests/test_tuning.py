"""Every arm tuned the same way, by i.i.d. validation only (issue 22 section 2)."""

import pandas as pd
import pytest

from vldlib.evaluate.selection import choose_config, tuned


def _selected() -> pd.DataFrame:
    """Two rates x two configurations x two seeds, one held-out domain. By hand: at rate 0 the
    configuration (0.02, 0.1) has mean i.i.d. (0.70 + 0.72) / 2 = 0.71 > (0.60 + 0.64) / 2 = 0.62;
    at rate 0.9, (0.005, 1e-4) has 0.66 > 0.55. The o.o.d. column would pick the other ones."""
    rows = []
    for dropout, cfgs in ((0.0, {(0.005, 1e-4): (0.60, 0.64, 0.90), (0.02, 0.1): (0.70, 0.72, 0.10)}),
                          (0.9, {(0.005, 1e-4): (0.65, 0.67, 0.10), (0.02, 0.1): (0.55, 0.55, 0.90)})):
        for (lr, wd), (iid0, iid1, ood) in cfgs.items():
            for seed, iid in ((0, iid0), (1, iid1)):
                for method in ("model", "wa"):
                    rows.append({"run": f"r{dropout}{lr}{wd}{seed}", "method": method, "backbone": "b",
                                 "train_stages": 1, "dropout": dropout, "test_env": 0, "lr": lr,
                                 "weight_decay": wd, "seed": seed, "iid_acc": iid, "ood_acc": ood,
                                 "oracle_acc": ood})
    return pd.DataFrame(rows)


def test_choice_by_mean_iid_over_seeds():
    sel, choices = tuned(_selected())
    got = {r.dropout: (r.lr, r.weight_decay, round(r.iid_mean, 4)) for r in choices.itertuples()}
    assert got == {0.0: (0.02, 0.1, 0.71), 0.9: (0.005, 1e-4, 0.66)}
    assert set(choices.n_configs) == {2}
    assert len(sel) == 2 * 2 * 2  # 2 rates x 2 seeds x 2 methods of the chosen configurations
    assert set(zip(sel.dropout, sel.lr)) == {(0.0, 0.02), (0.9, 0.005)}


def test_selection_never_sees_ood_columns():
    df = _selected()
    with pytest.raises(ValueError, match="o.o.d. column"):
        choose_config(df[["backbone", "train_stages", "dropout", "test_env", "lr", "weight_decay", "seed",
                          "iid_acc", "ood_acc"]])
    scrambled = df.assign(ood_acc=1 - df.ood_acc, oracle_acc=0.0)
    assert tuned(scrambled)[1].equals(tuned(df)[1])


# --------------------------------------------------------------------------- the tuned study's runs
def _choices() -> pd.DataFrame:
    return pd.DataFrame([{"backbone": "test_resnet", "train_stages": 1, "dropout": r, "test_env": t, "lr": lr, "weight_decay": wd}
                         for (r, t), (lr, wd) in {(0.0, 0): (0.05, 0.1), (0.0, 1): (0.005, 1e-4),
                                                  (0.9, 0): (0.02, 1e-2), (0.9, 1): (0.05, 1e-4)}.items()])


def test_the_choices_are_replicated_on_the_other_seeds_and_nothing_else():
    from vldlib.config import TrainConfig
    from vldlib.experiments.grid import grid
    from vldlib.experiments.tuning import apply_choices, replicate_choices, split_seeds

    tune, rest = split_seeds([0, 1, 2, 3], [1, 0])
    assert (tune, rest) == ([0, 1], [2, 3])
    base = TrainConfig(benchmark="x", backbone="test_resnet", train_stages=1, steps=4)
    configs = grid(base, test_envs=[[0], [1]], dropout=[0.0, 0.9], lr=[0.005, 0.02, 0.05],
                   weight_decay=[1e-4, 1e-2, 0.1], seed=tune)
    assert len(configs) == 2 * 2 * 9 * 2
    chosen = apply_choices(configs, _choices())  # the tuning seeds' runs of the chosen configurations
    assert len(chosen) == 2 * 2 * 2
    replicas = replicate_choices(configs, _choices(), rest)
    assert sorted((c.seed, c.dropout, c.test_envs[0], c.lr, c.weight_decay) for c in replicas) == sorted(
        (s, r, t, lr, wd) for s in rest for (r, t, lr, wd) in
        [(0.0, 0, 0.05, 0.1), (0.0, 1, 0.005, 1e-4), (0.9, 0, 0.02, 1e-2), (0.9, 1, 0.05, 1e-4)])


def test_a_cell_without_a_choice_or_another_design_is_refused(tmp_path):
    from vldlib.config import TrainConfig
    from vldlib.experiments.tuning import apply_choices, read_choices, with_design

    cfg = TrainConfig(benchmark="x", backbone="test_resnet", train_stages=2, dropout=0.9, test_envs=[0], steps=4)
    with pytest.raises(KeyError, match="no tuned configuration for backbone=test_resnet, train_stages=2, dropout=0.9"):
        apply_choices([cfg], _choices(), "map/choices.csv")
    made_for = TrainConfig(benchmark="x", backbone="test_resnet", train_stages=1, steps=300, resolution=96)
    other = TrainConfig(benchmark="x", backbone="test_resnet", train_stages=1, dropout=0.9, test_envs=[0], steps=600,
                        resolution=96)
    with pytest.raises(ValueError, match=r"map/choices.csv: tuned for another design: steps=600 \(the choices were "
                                         r"made for 300\)"):
        apply_choices([other], with_design(_choices(), made_for), "map/choices.csv")
    same = TrainConfig(benchmark="x", backbone="test_resnet", train_stages=1, dropout=0.9, test_envs=[0], steps=300, resolution=96)
    assert apply_choices([same], with_design(_choices(), made_for))[0].lr == 0.02
    # read back from a CSV where a missing value made the column float: 96.0 is the design 96
    table = with_design(_choices(), made_for).astype({"resolution": float, "train_fraction": str})
    (tmp_path / "c.csv").write_text(table.to_csv(index=False))
    assert apply_choices([same], read_choices(tmp_path / "c.csv"))[0].lr == 0.02
    wrong_size = TrainConfig(benchmark="x", backbone="test_resnet", train_stages=1, dropout=0.9, test_envs=[0],
                             steps=300, resolution=128)
    with pytest.raises(ValueError, match=r"resolution=128 \(the choices were made for 96"):
        apply_choices([wrong_size], read_choices(tmp_path / "c.csv"), "map/choices.csv")
    with pytest.raises(FileNotFoundError, match="tuned_by='nope.csv': no such file.*notebook 07"):
        read_choices("nope.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv: no column"):
        read_choices(tmp_path / "bad.csv")


def test_tuning_seeds_alone_choose():
    """Seed 1 alone would choose the other configuration at rate 0; with seeds=[0] the choice is
    seed 0's, and seed 1's runs of that choice are kept."""
    df = _selected()
    df.loc[(df.dropout == 0.0) & (df.seed == 1) & (df.lr == 0.005), "iid_acc"] = 0.99
    sel, choices = tuned(df, seeds=[0])
    assert dict(zip(choices.dropout, choices.lr)) == {0.0: 0.02, 0.9: 0.005}
    assert set(sel.seed) == {0, 1}
    _, both = tuned(df)
    assert dict(zip(both.dropout, both.lr))[0.0] == 0.005  # (0.60 + 0.99) / 2 > 0.71: the tuning seed mattered


def test_the_quickstart_ships_the_choices_the_committed_map_made():
    """The quickstart's `tuned_by` is a copy that ships with the notebooks (a wheel has no
    outputs/); it must be the committed effect map's own choices, not a table edited by hand."""
    from pathlib import Path

    from vldlib.experiments.quickstart import DEFAULTS

    root = Path(__file__).resolve().parents[1]
    shipped = pd.read_csv(root / DEFAULTS["tuned_by"])
    made = pd.read_csv(root / "outputs/effect_map_6seeds/choices.csv")
    pd.testing.assert_frame_equal(shipped, made)
