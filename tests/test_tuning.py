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
