"""The explorer's stop (button and interrupt), resume, and what its plot shows, without a browser
(the browser itself: tests/test_explorer_browser.py)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_fake_benchmark
from vldlib.analysis import explorer as ex
from vldlib.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(backbone="test_resnet", pretrained=False, resolution=32, train_stages=1, batch_size=4, lr=0.05,
            device="cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    make_fake_benchmark(root / "fake", per_class=6)
    return root


def _cfg(root, **kw):
    return ex.explorer_config(str(root), str(root / "runs"), **{**TINY, "benchmark": str(root / "fake"), **kw})


def _evals(run_dir):
    return [r["step"] for r in read_jsonl(run_dir / "records.jsonl") if r.get("type") == "eval"]


def test_stop_leaves_a_resumable_run_and_run_again_finishes_it(root):
    cfg = _cfg(root, steps=300, dropout=0.5)
    assert cfg.eval_every == 300 // ex.EVALS_PER_RUN
    live = ex.LiveRun(cfg)

    def stop_after_first(curve):
        if len(curve) and curve.step.max() > 0:  # the first evaluation after step 0 (the start)
            live.stop()
    run_dir = live.start().watch(stop_after_first, poll=0.05)
    assert not live.finished and not (run_dir / "done").exists()
    assert (run_dir / "last.pt").exists() and 0 < max(_evals(run_dir)) < 300
    stopped_at = max(_evals(run_dir))
    again = ex.LiveRun(cfg)
    again.start().watch(poll=0.05)
    steps = _evals(run_dir)
    assert again.finished and steps[-1] == 300 and steps == sorted(set(steps)) and stopped_at in steps


def test_interrupt_while_watching_stops_cleanly(root, capsys):
    cfg = _cfg(root, steps=300, dropout=0.7)
    live = ex.LiveRun(cfg)

    raised = []

    def interrupt(curve):  # Kernel > Interrupt raises KeyboardInterrupt where the caller waits
        if len(curve) and not raised:
            raised.append(True)
            raise KeyboardInterrupt
    run_dir = live.start().watch(interrupt, poll=0.05)
    assert not live.running and not live.finished and (run_dir / "last.pt").exists()
    assert "interrupted" in capsys.readouterr().out


def test_panel_button_run_returns_at_once_and_stop_button_stops_it(root):
    panel = ex.Explorer(data_dir=str(root), runs_dir=str(root / "runs"), compare=[str(root / "runs")],
                        defaults={**TINY, "benchmark": str(root / "fake"), "steps": 3000, "dropout": 0.3})
    panel.button.click()  # what the browser's click does: returns while the run trains
    assert panel.button.disabled and not panel.stop_button.disabled and panel.live.running
    deadline = time.time() + 120
    while panel.progress.value == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert panel.progress.value > 0 and panel.png[:4] == b"\x89PNG"
    panel.stop_button.click()
    while panel.button.disabled and time.time() < deadline:
        time.sleep(0.05)
    assert not panel.live.running and not panel.live.finished
    assert panel.status.value.startswith("stopped") and panel.progress.value < 3000
    assert panel.image.value == panel.png and panel.snapshot().data == panel.png


def test_plot_shows_loss_both_accuracies_and_earlier_runs_over_their_full_range():
    curve = pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.8], "iid_acc": [0.5, 0.6], "ood_acc": [0.4, 0.45]})
    earlier = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "step": [100, 200, 500] * 2, "loss": [1, 0.5, 0.2] * 2,
                            "iid_acc": [0.5, 0.7, 0.9] * 2, "ood_acc": [0.3, 0.4, 0.5] * 2,
                            "dropout": [0.0] * 3 + [0.9] * 3})
    fig = ex.plot_curves(curve, earlier, title="t", total_steps=20)
    loss, iid, ood = fig.axes[:3]
    assert [a.get_title() for a in (loss, iid, ood)] == ["training loss (log scale)", "i.i.d. validation", "o.o.d. test"]
    assert iid.get_ylabel() == "accuracy (%)" and loss.get_ylabel() == "cross-entropy"
    assert all(a.get_xlim()[1] >= 500 for a in (loss, iid, ood))  # earlier runs not clipped to this run's 20 steps
    assert max(iid.lines[0].get_ydata()) == pytest.approx(90)  # percent, not fraction
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["this run", "earlier, dropout rate 0", "earlier, dropout rate 0.9"]
    colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in ood.lines[:2]}
    assert len(colours) == 2  # one colour per rate


def test_loss_axis_is_logarithmic_so_a_high_rate_does_not_flatten_the_others():
    """Issue 26 item 7: a run whose loss starts near 26 squeezed every other rate to a flat line on a
    linear axis; on the log axis a rate whose loss falls from 2 to 0.1 spans most of the panel."""
    curve = pd.DataFrame({"step": [0, 10, 20], "loss": [float("nan"), 2.0, 0.1], "iid_acc": [0.3, 0.5, 0.6],
                          "ood_acc": [0.3, 0.4, 0.45]})
    earlier = pd.DataFrame({"run": ["a"] * 3, "step": [10, 20, 30], "loss": [26.0, 8.0, 3.0],
                            "iid_acc": [0.5, 0.6, 0.7], "ood_acc": [0.3, 0.4, 0.5], "dropout": [0.9] * 3})
    loss = ex.plot_curves(curve, earlier, total_steps=30).axes[0]
    assert loss.get_yscale() == "log"
    lo, hi = (np.log10(v) for v in loss.get_ylim())
    assert (np.log10(2.0) - np.log10(0.1)) / (hi - lo) > 0.4  # the low run's fall: not a flat line at the bottom


def test_a_curve_without_a_training_loss_says_so_instead_of_meaningless_axes():
    """Issue 26 item 5: a run stopped right after its start evaluation (step 0 has no training loss)
    left a loss axis from -0.04 to 0.04; the loss panel now says why it is empty."""
    start_only = pd.DataFrame({"step": [0], "loss": [float("nan")], "iid_acc": [0.3], "ood_acc": [0.3]})
    loss = ex.plot_curves(start_only, None, total_steps=300).axes[0]
    assert "no training loss yet" in " ".join(t.get_text() for t in loss.texts)
    assert not len(loss.get_yticks())


def test_stop_while_the_run_prepares_is_heard_and_says_nothing_was_evaluated(root, monkeypatch):
    """Issue 26 item 5: a stop pressed while the frozen-trunk outputs are computed acts within a
    batch (it waited for the whole phase, 26 s on ObjectStyles), and the panel shows a message, not
    an empty plot."""
    from vldlib.model import FineTuneNet

    trunk = FineTuneNet.trunk
    # 6 splits of at most 15 images, one batch each: a 12 s phase, heard within a batch (2 s)
    monkeypatch.setattr(FineTuneNet, "trunk", lambda self, x: (time.sleep(2), trunk(self, x))[1])
    bench = make_fake_benchmark(root / "fresh", per_class=6)  # its trunk outputs are not cached yet
    panel = ex.Explorer(data_dir=str(root), runs_dir=str(root / "runs"), compare=[str(root / "nothing")],
                        defaults={**TINY, "benchmark": str(bench), "steps": 300})
    panel.button.click()
    deadline = time.time() + 60
    while not panel.live.phase.startswith("computing the frozen-trunk") and time.time() < deadline:
        time.sleep(0.02)
    assert "computing the frozen-trunk" in panel.live.phase
    time.sleep(1)
    assert "computing the frozen-trunk" in panel.status.value  # the status line says what the run is doing
    t0 = time.perf_counter()
    panel.stop_button.click()
    while panel.button.disabled and time.perf_counter() - t0 < 30:
        time.sleep(0.02)
    assert time.perf_counter() - t0 < 5, f"the stop took {time.perf_counter() - t0:.1f} s"
    assert panel.status.value.startswith("stopped before its first evaluation"), panel.status.value
    assert panel.image.layout.display == "none" and panel.png == b""


def test_run_button_returns_at_once_even_when_earlier_runs_load_slowly(root, monkeypatch):
    """The button's callback runs in the kernel: while it works, no other widget message (the stop
    button's click) is handled. Loading the earlier runs (every run under `compare`) is the
    watcher's job, not the callback's."""
    slow = ex.earlier_curves
    monkeypatch.setattr(ex, "earlier_curves", lambda *a, **k: (time.sleep(10), slow(*a, **k))[1])
    panel = ex.Explorer(data_dir=str(root), runs_dir=str(root / "runs"), compare=[str(root / "runs")],
                        defaults={**TINY, "benchmark": str(root / "fake"), "steps": 3000, "dropout": 0.35})
    t0 = time.perf_counter()
    panel.button.click()
    assert time.perf_counter() - t0 < 3 and panel.live.running
    panel.stop_button.click()
    deadline = time.time() + 60
    while panel.button.disabled and time.time() < deadline:
        time.sleep(0.05)
    assert not panel.live.running and not panel.live.finished


def test_empty_plot_draws_without_a_legend_warning():
    empty = pd.DataFrame(columns=["step", "loss", "iid_acc", "ood_acc"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = ex.plot_curves(empty, None, total_steps=10)
        assert ex.figure_png(fig)[:4] == b"\x89PNG" and not fig.legends


def test_lodo_figure_colours_the_scored_part_of_the_held_out_domain():
    from vldlib.analysis import teaching

    for ood_split, scored_bar in (("in", 0), ("out", 1)):
        fig = teaching.plot_lodo_protocol(["a", "b"], ood_split=ood_split)
        ax = fig.axes[0]
        test_colour = ax.get_legend().legend_handles[2].get_facecolor()
        first_row = [b for b in ax.patches if abs(b.get_y() + b.get_height() / 2) < 1e-6]  # hold out "a"
        held_out = sorted(first_row, key=lambda b: b.get_x())[:2]  # domain "a": its in and out bars
        assert held_out[scored_bar].get_facecolor() == test_colour
        assert held_out[1 - scored_bar].get_facecolor() != test_colour
        assert f"'{ood_split}' of the held-out domain" in ax.get_legend().get_texts()[2].get_text()


@pytest.mark.parametrize("scratch_loss,head_loss,word", [(10.0, 2.0, "as the paper"), (2.0, 10.0, "opposite"),
                                                         (3.0, 3.4, "does not show")])
def test_dropout_cost_answer_follows_the_numbers(scratch_loss, head_loss, word):
    """Two held-out domains x three seeds. Domain 1 loses 2 points more than domain 0 for both
    learners; seed s adds s points to the scratch CNN's loss (seeds 0, 1, 2). By hand: the scratch
    CNN loses scratch_loss + 1 (domains) + 1 (mean of 0, 1, 2) on average, the head head_loss + 1;
    per seed the difference is scratch_loss - head_loss + s, mean d = scratch_loss - head_loss + 1,
    sd 1, SE 1/sqrt(3), t(2) = 4.303: half-width 2.484."""
    from vldlib.analysis import teaching

    rows = []
    for learner, lost in ((teaching.SCRATCH, scratch_loss), (teaching.PRETRAINED, head_loss)):
        for env in (0, 1):
            for seed in (0, 1, 2):
                extra = 2 * env + (seed if learner == teaching.SCRATCH else 0)
                rows += [dict(step=100, learner=learner, p=0.0, val_acc=0.8, train_loss=0.5, test_env=env, seed=seed,
                              val_majority=0.2 + 0.1 * env),
                         dict(step=100, learner=learner, p=0.9, val_acc=0.8 - (lost + extra) / 100, train_loss=0.9,
                              test_env=env, seed=seed, val_majority=0.2 + 0.1 * env)]
    table, answer = teaching.dropout_cost(pd.DataFrame(rows))
    # the floor: domain 0's validation majority 20%, domain 1's 30%, averaged like the accuracies
    assert table.loc[teaching.SCRATCH, "majority class (%)"] == pytest.approx(25.0)
    assert "Always answering the majority class scores 25.0% on these validation images" in answer
    d = scratch_loss - head_loss + 1
    assert table.loc[teaching.SCRATCH, "val. points lost"] == pytest.approx(scratch_loss + 2)
    assert table.loc[teaching.PRETRAINED, "val. points lost"] == pytest.approx(head_loss + 1)
    assert table.loc[teaching.SCRATCH, "n"] == 3
    assert table.loc[teaching.PRETRAINED, "clean loss added"] == pytest.approx(0.4)
    assert f"from scratch minus pretrained: {d:+.1f} points [95% CI {d - 2.484:+.1f}, {d + 2.484:+.1f}]" in answer
    assert "n=3 seeds, each the mean over 2 held-out domains" in answer
    assert word in answer and f"{scratch_loss + 2:+.1f} validation points" in answer


def test_the_validation_floor_is_the_majority_class_rate():
    import torch

    from vldlib.analysis import teaching

    assert teaching.majority_rate(torch.tensor([0, 1, 1, 2, 1, 0, 1, 2])) == 0.5  # class 1: 4 of 8
    assert teaching.validation_floor(pd.DataFrame(dict(step=[0], val_acc=[0.5]))) is None  # recorded without it


def test_dropout_cost_with_one_run_each_has_no_interval():
    from vldlib.analysis import teaching

    rows = [dict(step=10, learner=lr, p=p, val_acc=0.5 - p / 10, train_loss=1.0)
            for lr in (teaching.SCRATCH, teaching.PRETRAINED) for p in (0.0, 0.9)]
    _, answer = teaching.dropout_cost(pd.DataFrame(rows))
    assert "With one seed there is no interval" in answer and "n=1 seed," in answer


def test_study_reference_and_a_run_against_it_by_hand(tmp_path):
    """A quickstart table ("48.8 ± 0.5", 9 seeds): mean 0.488, SE 0.005; one new seed's 95% t
    prediction half-width t(8) x sd x sqrt(1 + 1/9) = 2.306 x 0.015 x 1.0541 = 0.03646. The run
    below: i.i.d. 0.5, 0.7, 0.7 at steps 0, 10, 20, so training-domain validation picks step 10
    (earliest of the tie), whose o.o.d. 0.45 is 0.038 below the mean: outside the band."""
    from vldlib.analysis import explorer as ex

    table = tmp_path / "table.csv"
    table.write_text("method,dropout,clipart,Avg,n\nmodel,0.0,48.8 ± 0.5,51.5 ± 0.2,9\n"
                     "model,0.9,46.6 ± 0.5,50.8 ± 0.3,9\nwa,0.0,1.0 ± 0.1,1.0 ± 0.1,9\n")
    ref = ex.study_reference(table, "clipart")
    assert ref.dropout.tolist() == [0.0, 0.9] and ref.n.tolist() == [9, 9]
    assert ref["mean"].tolist() == pytest.approx([0.488, 0.466]) and ref.se.tolist() == pytest.approx([0.005, 0.005])
    assert ex.prediction_half_width(0.005, 9) == pytest.approx(0.03646, abs=2e-5)
    curve = pd.DataFrame({"step": [0, 10, 20], "loss": [2.0, 1.0, 0.5], "iid_acc": [0.5, 0.7, 0.7],
                          "ood_acc": [0.4, 0.45, 0.6]})
    line = ex.against_study(curve, ref, 0.0, "clipart")
    assert "selects step 10" in line and "o.o.d. 45.0%" in line and "48.8% (SE 0.5)" in line
    assert "within 3.6 points" in line and "8 dof" in line and "outside it" in line
    assert "inside it" in ex.against_study(curve.assign(ood_acc=[0.4, 0.47, 0.6]), ref, 0.0, "clipart")
    assert "not 0.5" in ex.against_study(curve, ref, 0.5, "clipart")
    fig = ex.plot_curves(curve, None, total_steps=20, study=ref)  # the study drawn on the o.o.d. panel
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "study, rate 0.9: mean of 9 seeds, 95% band of one seed" in labels
    assert ex.study_reference(table, "photo").empty and ex.study_reference(tmp_path / "none.csv", "clipart").empty


def test_study_numbers_only_for_the_study_design_and_tuned_recipe_or_a_stated_fallback(tmp_path):
    from vldlib.analysis import explorer as ex

    table = tmp_path / "table.csv"
    table.write_text("method,dropout,clipart,n\nmodel,0.0,48.8 ± 0.5,9\n")
    cfg = ex.explorer_config("data", str(tmp_path / "runs"), benchmark="ObjectStyles", test_env=0, dropout=0.0)
    assert len(ex.study_for(cfg, table, "clipart")) == 1
    assert ex.study_for(ex.explorer_config("data", str(tmp_path / "runs"), benchmark="ObjectStyles", steps=100),
                        table, "clipart").empty  # another step budget: no yardstick
    choices = ROOT / "notebooks" / "00_quickstart.choices.csv"
    new, line = ex.tuned(cfg, choices)
    want = pd.read_csv(choices).query("train_stages == 1 and dropout == 0.0 and test_env == 0").iloc[0]
    assert (new.lr, new.weight_decay) == (want.lr, want.weight_decay) and "as the effect map tuned them" in line
    same, line = ex.tuned(dataclasses.replace(cfg, backbone="test_resnet"), choices)
    assert same.lr == cfg.lr and line.startswith("untuned (lr 0.01, weight decay 0.0001)")
    assert ex.tuned(cfg, None)[1].endswith("as given (tuned_by=None)")


def test_the_recipe_line_shows_an_error_text_as_text(root):
    """The recipe line is an HTML widget: an error that names "<output_dir>/choices.csv" must show
    that name, not lose it as an unknown tag (the README's screenshot read "as /choices.csv")."""
    panel = ex.Explorer(data_dir=str(root), runs_dir=str(root / "runs"), compare=[str(root / "nothing")],
                        defaults={**TINY, "benchmark": str(root / "fake")}, tuned_by=str(root / "missing.csv"))
    panel.config()
    assert "&lt;output_dir&gt;/choices.csv" in panel.recipe.value and "<output_dir>" not in panel.recipe.value
