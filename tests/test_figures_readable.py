"""The quickstart's figures read at the size JupyterLab shows them (issue 26 item 9): the curves
figure fits the notebook's output area (so it is not shrunk, its text with it), and in the o.o.d.
vs i.i.d. figure the methods' markers stay visible where their points coincide."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from vldlib.evaluate import convergence  # noqa: E402
from vldlib.evaluate import report as R  # noqa: E402

from test_results import accs, make_record, make_run  # noqa: E402

OUTPUT_AREA_PX = 833  # JupyterLab 4's output area in a 1280-px window, file browser open (headless Chromium)
NOTEBOOK_DPI = 100  # plt.show() in a notebook: matplotlib's figure.dpi
LEAST_POINTS = 8.0  # the smallest text, in points once shrunk to the output area, that reads


def shown_sizes(fig) -> tuple[float, list[tuple[str, float]]]:
    """(width in px at the notebook's dpi, [(text, size in points as shown)]): a figure wider than
    the output area is scaled down to it, and its text with it."""
    fig.set_dpi(NOTEBOOK_DPI)
    fig.canvas.draw()
    width = fig.get_tightbbox(fig.canvas.get_renderer()).width * NOTEBOOK_DPI
    scale = min(1.0, OUTPUT_AREA_PX / width)
    texts = [(t.get_text(), t.get_fontsize() * scale) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.get_window_extent().width > 0]
    return width, texts


@pytest.fixture
def two_rates(tmp_path):
    """Rates 0 and 0.9, 2 seeds, 3 methods with the same scores (as at rate 0, where the average
    and the ensemble land on the fine-tuned model), evaluated at steps 0-300."""
    for p in (0.0, 0.9):
        for seed in (0, 1):
            records = [make_record(step, accs(0.5 + 0.1 * p * step / 300, 0.45 + 0.002 * seed), ("model", "wa", "ens"))
                       for step in (0, 100, 200, 300)]
            make_run(tmp_path, f"p{p}_s{seed}", records, dropout=p, seed=seed, steps=300)
    return R.load_runs([tmp_path])


def test_the_curves_figure_is_shown_at_full_size_with_readable_text(two_rates):
    fig = convergence.plot_validation_curves(convergence.validation_curves(two_rates), hue="dropout")
    width, texts = shown_sizes(fig)
    small = [(t, round(size, 1)) for t, size in texts if size < LEAST_POINTS]
    plt.close(fig)
    assert width <= OUTPUT_AREA_PX, f"{width:.0f} px wide: JupyterLab shrinks it to {OUTPUT_AREA_PX / width:.0%}"
    assert not small, f"text shown under {LEAST_POINTS} points: {small[:5]}"


def test_coinciding_points_of_the_ood_vs_iid_figure_stay_visible(two_rates):
    fig = R.plot_iid_vs_ood(R.select(two_rates), hue="dropout", style="method", reference=False)
    width, texts = shown_sizes(fig)
    ax = fig.axes[0]
    points = [ln for ln in ax.lines if len(ln.get_xdata()) == 1 and ln.get_linestyle() in ("None", "")
              and ln.get_marker() not in ("|", "_")]  # not the error bars' caps
    at: dict[tuple, list] = {}
    for ln in points:
        at.setdefault((round(float(ln.get_xdata()[0]), 3), round(float(ln.get_ydata()[0]), 3)), []).append(ln)
    stacked = [lns for lns in at.values() if len(lns) > 1]
    plt.close(fig)
    assert stacked, "the fixture's three methods should coincide"
    for lns in stacked:
        looks = [(ln.get_marker(), ln.get_markersize()) for ln in lns]
        filled = [ln for ln in lns if ln.get_markerfacecolor() != "none"]
        # each a different shape and size, at most one filled: nested rings, none covering another
        assert len(set(looks)) == len(looks) and len({size for _, size in looks}) == len(looks), looks
        assert len(filled) <= 1, f"{len(filled)} filled markers on one spot: the top one hides the others"
    assert width <= OUTPUT_AREA_PX and min(size for _, size in texts) >= LEAST_POINTS
