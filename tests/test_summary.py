"""Computed conclusions: paired effects, their sentences, and the plateau check."""

from __future__ import annotations

import pandas as pd
import pytest

from vldlib.evaluate.convergence import plateau_check
from vldlib.evaluate.effects import effect_sentence, paired_effect


def selected(diffs: list[float]) -> pd.DataFrame:
    rows = []
    for i, d in enumerate(diffs):
        rows.append({"method": "model", "dropout": 0.0, "test_env": i % 3, "seed": i, "ood_acc": 0.5})
        rows.append({"method": "model", "dropout": 0.9, "test_env": i % 3, "seed": i, "ood_acc": 0.5 + d})
    return pd.DataFrame(rows)


def test_paired_effect_mean_and_standard_error():
    eff = paired_effect(selected([0.02, 0.04, 0.06]))
    assert eff["n"] == 3 and eff["mean"] == pytest.approx(0.04)
    assert eff["se"] == pytest.approx(0.02 / 3 ** 0.5)


@pytest.mark.parametrize("diffs, verdict", [
    ([0.10, 0.11, 0.12, 0.10], "detectable improvement"),
    ([-0.10, -0.11, -0.12, -0.10], "detectable loss"),
    ([0.05, -0.04, 0.03, -0.05], "no detectable effect"),
    ([0.05], "one pair only"),
    ([0.0, 0.0, 0.0], "no detectable effect"),  # identical runs: se 0, no difference
])
def test_effect_sentence_follows_the_numbers(diffs, verdict):
    assert verdict in effect_sentence(paired_effect(selected(diffs)))


def test_effect_sentence_gives_the_t_interval_and_notes_two_pairs():
    few = effect_sentence(paired_effect(selected([0.10, 0.13])))  # 7.7 SE, but 2 pairs: 12.7 SE each side
    assert "no detectable effect" in few and "1 degree of freedom" in few and "t(1)=" in few
    many = effect_sentence(paired_effect(selected([0.10, 0.11, 0.12, 0.10, 0.11, 0.12])))  # 6 pairs, 5 dof: 11.0 ± 2.571 x 0.365
    assert "detectable improvement" in many and "degree of freedom" not in many
    assert "[95% CI +10.1, +11.9] points" in many and "t(5)=" in many and "p<0.0001" in many


def test_effect_sentence_without_pairs():
    df = selected([0.1])
    assert "nothing to compare" in effect_sentence(paired_effect(df[df.dropout == 0.0]))


def test_plateau_check_flags_a_rising_curve():
    rows = []
    for p, slope in ((0.0, 0.0), (0.9, 0.05)):
        for step in (100, 200, 300, 400):
            rows.append({"run": f"r{p}", "step": step, "dropout": p, "iid_acc": 0.5 + slope * step / 100,
                         "fit_acc": 0.9, "train_acc": 0.7})
    table = plateau_check(pd.DataFrame(rows)).set_index("dropout")
    assert bool(table.loc[0.0, "plateaued"]) and not bool(table.loc[0.9, "plateaued"])
    assert table.loc[0.9, "gain"] == pytest.approx(0.05) and table.loc[0.9, "fit_acc_at_end"] == 0.9
    assert table.loc[0.9, "training_mode_acc_at_end"] == 0.7


def test_fit_note_names_the_settings_that_did_not_fit_their_training_data():
    from vldlib.evaluate.convergence import fit_note

    rows = [{"run": f"r{p}", "step": step, "dropout": p, "iid_acc": 0.5, "fit_acc": acc, "train_acc": acc - 0.1}
            for p, acc in ((0.0, 1.0), (0.9, 0.7)) for step in (100, 200)]
    note = fit_note(pd.DataFrame(rows))
    assert "dropout=0.9: 70% (training-mode accuracy, dropout on: 60%)" in note and "eval-mode" in note
    assert "dropout=0.0" not in note and "longer budget" in note
    fitted = pd.DataFrame([{**r, "fit_acc": 0.99} for r in rows])  # training-mode accuracy does not count
    assert fit_note(fitted).startswith("Every setting fitted its training data")
