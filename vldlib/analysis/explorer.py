"""An interactive dropout explorer: pick a benchmark, a held-out domain, a rate and a budget, watch
a short fine-tune learn, and compare it with earlier runs.

Everything a widget does is a plain function here, so it runs (and is tested) without a browser:
`explorer_config` builds the `TrainConfig`, `run_live` trains it in a background thread while the
caller's thread polls the run's records.jsonl and calls back with the learning curve so far (the
progress bar and the plot), `earlier_curves` loads finished runs to compare against. `Explorer`
wires these to ipywidgets; its `run()` is the button's callback and can be called directly.

>>> ex = Explorer(data_dir="data", runs_dir="outputs/runs", defaults=dict(benchmark="emoji"))  # doctest: +SKIP
>>> display(ex.widget)     # in Jupyter                                                         # doctest: +SKIP
>>> ex.dropout.value = 0.9; ex.run()   # what the "run" button does                             # doctest: +SKIP
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from vldlib.config import TrainConfig
from vldlib.loop import run_dir_for
from vldlib.paths import resolve
from vldlib.utils import read_jsonl
from vldlib.experiments.grid import with_paths
from vldlib.evaluate.axes import min_span
from vldlib.evaluate.scores import load_runs, per_step_scores
from vldlib.loop.train import train
from vldlib.data import get_spec, list_benchmarks
from vldlib.data import load_benchmark
from vldlib.analysis.explorer_study import (  # noqa: F401  (the panel's yardstick; tests import them from here)
    STUDY_DESIGN,
    STUDY_TABLE,
    against_study,
    prediction_half_width,
    selected_point,
    study_for,
    study_reference,
    tuned,
)

# A short CPU fine-tune: the last stage and the head of the offline EfficientNet, on cached outputs
# of the frozen stages, at 96 px, without augmentation.
DEFAULTS: dict[str, Any] = dict(benchmark="emoji", test_env=0, dropout=0.9, steps=300, backbone="efficientnet_lite0.offline",
                                pretrained=True, resolution=96, train_stages=1, lr=0.01, weight_decay=1e-4,
                                batch_size=32, seed=0, device="auto")

EVALS_PER_RUN = 30  # points on the live curve; evaluating the cached-trunk tail is cheap next to a step


def explorer_config(data_dir: str, runs_dir: str, **values: Any) -> TrainConfig:
    """The `TrainConfig` of one explorer run (unknown keys are an error, missing ones from DEFAULTS)."""
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown explorer setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    v = {**DEFAULTS, **values}
    steps = int(v["steps"])
    every = max(1, steps // EVALS_PER_RUN)
    cache = v["train_stages"] is not None
    cfg = TrainConfig(benchmark=str(v["benchmark"]), data_dir=data_dir, test_envs=[int(v["test_env"])],
                      backbone=v["backbone"], pretrained=bool(v["pretrained"]), resolution=int(v["resolution"]),
                      train_stages=v["train_stages"], cache_trunk=cache, augment=False, dropout=float(v["dropout"]),
                      steps=steps, lr=float(v["lr"]), weight_decay=float(v["weight_decay"]),
                      batch_size=int(v["batch_size"]), eval_every=every, average_from=every, seed=int(v["seed"]),
                      device=v["device"], out=runs_dir, keep_last=False, progress=False, num_threads=1)
    cfg = with_paths(cfg)
    cfg.validate()
    return cfg


def curve_of(run_dir: str | Path) -> pd.DataFrame:
    """Learning curve of a run so far: step, loss, iid_acc, ood_acc (current weights)."""

    run_dir = Path(run_dir)
    if not (run_dir / "records.jsonl").exists() or not any(r.get("type") == "eval" for r in read_jsonl(run_dir / "records.jsonl")):
        return pd.DataFrame(columns=["step", "loss", "iid_acc", "ood_acc"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load_runs([run_dir])
    s = per_step_scores(df)
    return s[s.method == "model"].sort_values("step")[["step", "loss", "iid_acc", "ood_acc"]].reset_index(drop=True)


class LiveRun:
    """One explorer run trained in a background thread, stoppable in every phase.

    `stop()` (the stop button) or a KeyboardInterrupt while `watch` waits (Kernel > Interrupt) asks
    `train` to return: within a batch while it prepares (checking images, computing the frozen-trunk
    outputs, which it keeps for the next start), before its next step while it trains. The run then
    stays unfinished and resumable from its last checkpoint (evaluation), so pressing run again
    with the same settings continues it. `phase` says what it is doing, or last did ("" before it starts).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.run_dir = cfg, run_dir_for(cfg)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.phase = ""
        self.stopped_at: float | None = None  # time.perf_counter() of stop() and of the thread's end:
        self.ended_at: float | None = None  # the stop latency a status line reports
        self._thread = threading.Thread(target=self._work, daemon=True, name="vldlib-explorer")

    def _work(self) -> None:

        def report_phase(name: str) -> None:
            self.phase = name
        try:
            train(self.cfg, should_stop=self.stop_event.is_set, report_phase=report_phase)
        except BaseException as e:  # re-raised by watch() in the caller's thread
            self.error = e
        finally:
            self.ended_at = time.perf_counter()

    def start(self) -> LiveRun:
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self.stop_event.is_set():
            self.stopped_at = time.perf_counter()
        self.stop_event.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return (self.run_dir / "done").exists()

    def watch(self, on_update: Callable[[pd.DataFrame], None] | None = None, poll: float = 0.5,
              on_poll: Callable[[], None] | None = None) -> Path:
        """Wait for the run, calling `on_update(curve)` each time a new evaluation is recorded (and
        once at the end) and `on_poll()` every `poll` seconds (a status line); an interrupt stops
        the run cleanly. Returns the run dir as soon as the run's thread ends."""
        seen, records = -1, self.run_dir / "records.jsonl"
        read: tuple | None = None
        curve = curve_of(self.run_dir)
        try:
            while True:
                alive = self._thread.is_alive()
                stamp = _file_stamp(records)
                if stamp != read:  # parse the records only when the file changed
                    read, curve = stamp, curve_of(self.run_dir)
                if on_update is not None and len(curve) != seen:
                    seen = len(curve)
                    on_update(curve)
                if not alive:
                    break
                if on_poll is not None:
                    on_poll()
                self._thread.join(poll)  # returns at once when the run ends
        except KeyboardInterrupt:
            self.stop()
            self._thread.join()
            if on_update is not None:
                on_update(curve_of(self.run_dir))
            print(f"[vldlib] interrupted: {self.run_dir} stopped (resumable)")
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.run_dir


def _file_stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a file, None when missing: whether it changed since it was last read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def run_live(cfg: TrainConfig, on_update: Callable[[pd.DataFrame], None] | None = None, poll: float = 0.5) -> Path:
    """Train `cfg` (resuming or skipping as `train` does) in a background thread; call
    `on_update(curve)` from this thread each time a new evaluation is recorded. Returns the run dir.

    Training runs in a thread so that the caller keeps control (progress, Kernel > Interrupt, which
    stops the run cleanly); errors in the thread are re-raised here.
    """
    return LiveRun(cfg).start().watch(on_update, poll)


def run_drawn(cfg: TrainConfig, compare: Iterable[str | Path], title: str, poll: float = 0.25,
              study: pd.DataFrame | None = None) -> tuple[Path, pd.DataFrame]:
    """Train `cfg` (or reuse it) as `run_live` does, drawing it in the cell's output while it
    trains: a status line (what the run is doing, seconds since the start), and its learning curve
    next to the comparable finished runs under `compare` (and the study's numbers, `study`), redrawn at each evaluation, the first
    (step 0, the start) included. Returns (run dir, the earlier runs drawn).

    Display handles, not widgets: the drawing needs no front-end extension, so papermill, nbconvert
    and a notebook reopened without its kernel keep the last one. The run starts first: reading the
    earlier runs and loading matplotlib (2 s on the loaded 2-core machine) happen while it prepares,
    on the core its single thread leaves free, not after its first evaluation."""
    from IPython.display import HTML, Image, display

    t0, evaluated = time.perf_counter(), [""]
    live = LiveRun(cfg).start()
    status = display(HTML(f"starting {live.run_dir.name} ..."), display_id=True)
    plot = display(HTML(""), display_id=True)
    try:
        earlier = earlier_curves(compare, cfg.benchmark, cfg.test_envs[0], match=comparable(cfg))
    except BaseException:  # an interrupt or an error here stops the run: no thread left training
        live.stop()
        live.watch()
        raise
    earlier = earlier[earlier.run != str(live.run_dir)] if len(earlier) else earlier
    if not len(earlier):  # nothing to draw yet: load matplotlib now, while the run prepares on its one thread
        plot_curves(curve_of(live.run_dir).iloc[:0], None)

    def show_phase() -> None:
        status.update(HTML(f"{live.phase or 'starting'}{evaluated[0]} ({time.perf_counter() - t0:.0f} s): "
                           f"{live.run_dir.name}"))

    def draw(curve: pd.DataFrame) -> None:
        if len(curve) or len(earlier):
            plot.update(Image(data=figure_png(plot_curves(curve, earlier, title=title, total_steps=cfg.steps,
                                                          study=study)), format="png"))
        if len(curve):
            evaluated[0] = f", evaluated step {int(curve.step.iloc[-1])} of {cfg.steps}"
            show_phase()
    run_dir = live.watch(draw, poll, on_poll=show_phase)
    status.update(HTML(f"{'done' if live.finished else 'stopped (run the cell again to continue it)'} "
                       f"after {time.perf_counter() - t0:.0f} s: {run_dir.name}"))
    return run_dir, earlier


def describe_run(curve: pd.DataFrame, earlier: pd.DataFrame) -> str:
    """One sentence on the run's last evaluation, computed from its curve, and how many earlier
    runs (and rates) it is drawn against."""
    if not len(curve):
        return "the run recorded no evaluation yet."
    last = curve.iloc[-1]
    n = earlier.run.nunique() if len(earlier) else 0
    rates = ", ".join(f"{r:g}" for r in sorted(earlier.dropout.unique())) if n else "none"
    return (f"last evaluation, step {int(last.step)}: training loss {last.loss:.3f}, i.i.d. {100 * last.iid_acc:.1f}%, "
            f"o.o.d. {100 * last.ood_acc:.1f}%; compared with {n} earlier run(s) on this benchmark and held-out "
            f"domain (dropout rates: {rates}).")


def earlier_curves(paths: Iterable[str | Path], benchmark: str, test_env: int, match: dict[str, Any] | None = None
                   ) -> pd.DataFrame:
    """Per-step scores of finished runs under `paths` on the same benchmark and held-out domain
    (columns: run, step, iid_acc, ood_acc, dropout, ...); empty if none. `match` keeps only runs
    whose config has these values (e.g. the same backbone and resolution), so the comparison
    differs in the dropout rate, not in everything else."""
    import warnings

    dirs = [resolve(p) for p in paths if resolve(p).exists()]
    cols = ["run", "step", "iid_acc", "ood_acc", "dropout"]
    if not dirs:
        return pd.DataFrame(columns=cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load_runs(dirs)
    if df.empty:
        return pd.DataFrame(columns=cols)
    name = Path(benchmark).name
    df = df[df.done & (df.benchmark.astype(str).str.lower() == name.lower()) & (df.test_envs == str(test_env))]
    for key, value in (match or {}).items():
        if key in df.columns:
            df = df[df[key].astype(str) == str(value)]
    if df.empty:
        return pd.DataFrame(columns=cols)
    s = per_step_scores(df)
    s = s[s.method == "model"]
    keys = [c for c in ("dropout", "pretrained", "train_stages", "steps", "resolution", "backbone") if c in df.columns]
    return s.merge(df.drop_duplicates("run")[["run", *keys]], on="run")


def comparable(cfg: TrainConfig) -> dict[str, Any]:
    """Config values an earlier run must share to be drawn next to `cfg` (all but rate and seed)."""
    return {"backbone": cfg.backbone, "pretrained": cfg.pretrained, "train_stages": cfg.train_stages,
            "resolution": cfg.resolution}


def plot_curves(curve: pd.DataFrame, earlier: pd.DataFrame | None = None, title: str = "", total_steps: int | None = None,
                study: pd.DataFrame | None = None):
    """Training loss, i.i.d. validation and o.o.d. test accuracy against step: this run bold,
    earlier runs thinner, one colour per dropout rate, each over its own full range of steps, so a
    new rate can be judged against what was already tried.

    The loss axis is logarithmic: the training loss (measured with dropout on) of the rates ends
    orders of magnitude apart. With the default settings on emoji (the official nn.Linear head
    init), rate 0 falls from 2.1 to 0.018 in 300 steps, 0.5 to 0.07, 0.9 from 4.0 only to 1.3; on
    a linear axis the 0.9 run flattens the others onto the floor after a third of the run, on a log
    axis every rate's fall reads as its ratio. (Per-rate normalisation would hide that 0.9 stays
    high, which is the point of the comparison.) `study` (`study_for`): the study's mean o.o.d.
    accuracy per rate, dashed, with the 95% prediction band of one new seed. Before the run has a training loss (its only
    evaluation is step 0, the start) the loss panel says so instead of drawing axes around nothing,
    and the accuracy axes span at least `axes.MIN_SPAN` points.

    Built on `matplotlib.figure.Figure` (not pyplot), so the explorer's watcher thread can draw
    without touching the notebook's figure manager; show it with `display(fig)`."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    rates = sorted(earlier.dropout.unique()) if earlier is not None and len(earlier) else []
    study = study if study is not None and len(study) else None
    colour = {r: f"C{i % 10}" for i, r in enumerate(sorted({*rates, *([] if study is None else study.dropout)}))}
    panels = (("loss", "training loss (log scale)", "cross-entropy"), ("iid_acc", "i.i.d. validation", "accuracy (%)"),
              ("ood_acc", "o.o.d. test", "accuracy (%)"))
    for ax, (metric, name, unit) in zip(axes, panels):
        scale = 1 if metric == "loss" else 100
        drawn = []
        for run, g in (earlier.groupby("run") if rates else ()):
            if metric in g:
                ax.plot(g.step, scale * g[metric], color=colour[g.dropout.iloc[0]], alpha=0.8, lw=1.2)
                drawn.append(g[metric])
        if metric == "ood_acc" and study is not None:
            for r in study.itertuples():
                half = prediction_half_width(r.se, r.n)
                ax.axhspan(100 * (r.mean - half), 100 * (r.mean + half), color=colour[r.dropout], alpha=0.12, lw=0)
                ax.axhline(100 * r.mean, color=colour[r.dropout], ls="--", lw=1.2,
                           label=f"study, rate {r.dropout:g}: mean of {r.n} seeds, 95% band of one seed")
                drawn.append(pd.Series([r.mean - half, r.mean + half]))
        if len(curve) and metric in curve:
            ax.plot(curve.step, scale * curve[metric], "o-", color="black", ms=3, lw=2.2, label="this run")
            drawn.append(curve[metric])
        right = max(total_steps or 0, int(earlier.step.max()) if rates else 0)
        if right:
            ax.set_xlim(-0.02 * right, right * 1.02)  # the start's point (step 0) inside the frame
        ax.set(title=name, xlabel="step", ylabel=unit)
        ax.grid(alpha=0.3)
        if metric != "loss":
            min_span(ax, "y")  # one point, or a flat start, is not stretched into a fake trend
        else:
            values = pd.to_numeric(pd.concat(drawn), errors="coerce") if drawn else pd.Series(dtype=float)
            if (values > 0).any():
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.01 0.02 0.05 0.1 ... 5 10
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.set_yticks([])
                ax.text(0.5, 0.5, "no training loss yet:\nthe first is recorded at the\nfirst evaluation after step 0",
                        transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35")
    for r in rates:
        axes[-1].plot([], [], color=colour[r], lw=1.2, label=f"earlier, dropout rate {r:g}")
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:  # no legend (and no matplotlib warning) before anything is drawn
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """PNG bytes of a figure (for an ipywidgets.Image and the static copy left in the output)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def available_benchmarks(data_dir: str, extra: Iterable[str] = ()) -> list[str]:
    """Registered benchmarks present under data_dir (or buildable offline), plus `extra` names/paths."""

    out = []
    for name in list_benchmarks():
        spec = get_spec(name)
        if spec.builder is not None or (resolve(data_dir) / spec.dirname).is_dir():
            out.append(name)
    return list(dict.fromkeys([*extra, *out]))


def benchmark_domains(benchmark: str, data_dir: str) -> list[str]:
    """Domain names of a benchmark (building the offline one on first use)."""

    try:
        spec = get_spec(benchmark)
    except KeyError:
        spec = None
    if spec is not None and spec.builder is not None:
        spec.builder(resolve(data_dir), progress=False)
    bench = load_benchmark(benchmark if spec else str(resolve(benchmark)), resolve(data_dir), progress=False)
    return list(bench.domains)


class Explorer:
    """The widget panel. `widget` is what to display; the run button calls `run(wait=False)`, the
    stop button `stop()`.

    A button's callback must return at once: the kernel handles widget messages (the stop button's
    click among them) only between cell executions and callbacks, so the run trains in a thread
    and a second thread draws its curve into an Image widget (safe from a thread, unlike capturing
    into an Output widget)."""

    def __init__(self, data_dir: str = "data", runs_dir: str = "outputs/runs", compare: Iterable[str] = ("outputs",),
                 defaults: dict[str, Any] | None = None, tuned_by: str | Path | None = None,
                 study_table: str | Path | None = None):
        import ipywidgets as w

        self.data_dir, self.runs_dir, self.compare = data_dir, runs_dir, list(compare)
        self.tuned_by, self.study_table = tuned_by, study_table
        self.study = pd.DataFrame()
        self.defaults = {**DEFAULTS, **(defaults or {})}
        d = self.defaults
        self.benchmark = w.Dropdown(options=available_benchmarks(data_dir, [d["benchmark"]]), value=d["benchmark"],
                                    description="benchmark")
        self.test_env = w.Dropdown(description="held out")
        self.dropout = w.FloatSlider(value=d["dropout"], min=0.0, max=0.95, step=0.05, description="dropout",
                                     continuous_update=False)
        self.steps = w.BoundedIntText(value=d["steps"], min=1, max=100_000, step=10, description="steps")
        self.button = w.Button(description="run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="stop", button_style="warning", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=d["steps"], description="progress")
        self.status = w.HTML("").add_class("vldlib-explorer-status")  # classes: found by the browser test
        self.image = w.Image(format="png").add_class("vldlib-explorer-plot")
        self.recipe = w.HTML("").add_class("vldlib-explorer-recipe")  # the lr/weight decay, the study's yardstick
        self.benchmark.observe(lambda change: self._set_domains(), names="value")
        self._set_domains()
        self.button.on_click(lambda _b: self.run(wait=False))
        self.stop_button.on_click(lambda _b: self.stop())
        self.widget = w.VBox([w.HBox([self.benchmark, self.test_env]), w.HBox([self.dropout, self.steps]),
                              w.HBox([self.button, self.stop_button, self.progress]), self.status, self.recipe, self.image])
        self.live: LiveRun | None = None
        self.last_run: Path | None = None
        self.last_curve: pd.DataFrame | None = None
        self.png: bytes = b""
        self._recipe = ""

    def _set_domains(self) -> None:
        domains = benchmark_domains(self.benchmark.value, self.data_dir)
        self.test_env.options = [(f"{i}: {name}", i) for i, name in enumerate(domains)]
        self.test_env.value = min(int(self.defaults["test_env"]), len(domains) - 1)

    def settings(self) -> dict[str, Any]:
        """The widget values merged into the defaults: the run `run()` would start."""
        return {**self.defaults, "benchmark": self.benchmark.value, "test_env": int(self.test_env.value),
                "dropout": round(float(self.dropout.value), 4), "steps": int(self.steps.value)}

    def _draw(self, curve: pd.DataFrame, earlier: pd.DataFrame, title: str, steps: int) -> None:
        """Draw the curve (with the earlier runs) into the panel; with nothing of either to draw,
        hide the image rather than show empty axes (the status line says why)."""
        self.last_curve = curve
        self.progress.value = int(curve.step.max()) if len(curve) else 0
        if not len(curve) and not len(earlier):
            self.png, self.image.value = b"", b""
            self.image.layout.display = "none"
            return
        self.png = figure_png(plot_curves(curve, earlier, title=title, total_steps=steps, study=self.study))
        # HTML widgets: the text is escaped (an error naming "<output_dir>/choices.csv" would lose its tag)
        self.recipe.value = html.escape(self._recipe + (" " + against_study(curve, self.study, float(self.dropout.value),
                                                                            self._domain()) if len(curve) else ""))
        self.image.value = self.png
        self.image.layout.display = None

    def _domain(self) -> str:
        return str(self.test_env.label).split(": ", 1)[-1]

    def config(self) -> TrainConfig:
        """The run the widgets show, with its cell's tuned lr and weight decay where `tuned_by` has
        them; sets the recipe line and the study's numbers it is drawn against."""
        cfg, self._recipe = tuned(explorer_config(self.data_dir, self.runs_dir, **self.settings()), self.tuned_by)
        self.study = study_for(cfg, self.study_table, self._domain())
        self.recipe.value = html.escape(self._recipe)
        return cfg

    def show(self, run_dir: str | Path) -> None:
        """Draw an existing run (e.g. the notebook's default run) into the panel."""
        run_dir = Path(run_dir)
        cfg = self.config()
        earlier = self._earlier(cfg, run_dir)
        self.progress.max = cfg.steps
        self._draw(curve_of(run_dir), earlier, self._title(cfg), cfg.steps)
        self.last_run = run_dir
        self.status.value = f"showing {run_dir.name}"

    def _earlier(self, cfg: TrainConfig, run_dir: Path) -> pd.DataFrame:
        """The finished runs `cfg` is compared with (not itself)."""
        earlier = earlier_curves(self.compare, cfg.benchmark, cfg.test_envs[0], match=comparable(cfg))
        return earlier[earlier.run != str(run_dir)] if len(earlier) else earlier

    def _title(self, cfg: TrainConfig) -> str:
        return f"dropout rate {cfg.dropout:g}, held out {self.test_env.label}, {cfg.steps} steps"

    def snapshot(self):
        """The panel's current plot as a static image, for viewers without widgets."""
        from IPython.display import Image

        return Image(data=self.png, format="png")

    def stop(self) -> None:
        """Ask the current run to stop: within a batch while it prepares, before its next step
        while it trains (it stays resumable)."""
        if self.live is not None and self.live.running:
            self.live.stop()
            self.status.value = f"stopping {self.live.run_dir.name} ..."

    def run(self, _button: Any = None, wait: bool = True) -> Path | None:
        """Train the configuration the widgets show (or reuse it if finished), live. With
        `wait=False` (the button) it returns at once; otherwise it returns the run dir when the
        run ends (an interrupt stops it cleanly).

        The run starts before anything else is done (loading the earlier runs happens in the
        watcher thread), so the button's callback returns at once and a stop is heard at once."""
        if self.live is not None and self.live.running:
            self.status.value = "a run is in progress: stop it first"
            return None
        cfg = self.config()
        live = self.live = LiveRun(cfg)
        self.progress.max, self.progress.value = cfg.steps, 0
        title = self._title(cfg)
        self.status.value = f"starting {live.run_dir.name} ..."
        self.button.disabled, self.stop_button.disabled = True, False
        t0 = time.perf_counter()
        live.start()  # before returning: a stop pressed right after run finds it running

        def show_phase() -> None:
            if not live.stop_event.is_set():
                self.status.value = f"{live.phase or 'starting'} ({time.perf_counter() - t0:.0f} s): {live.run_dir.name}"

        def draw(curve: pd.DataFrame, earlier: pd.DataFrame) -> None:
            if not live.running and live.error is None:  # the run ended: say so before the last drawing
                self.last_curve = curve
                self.status.value = self._ending(live, live.ended_at - t0)
            self._draw(curve, earlier, title, cfg.steps)

        def watch() -> Path:
            try:
                earlier = self._earlier(cfg, live.run_dir)
                self.last_run = live.watch(lambda curve: draw(curve, earlier), on_poll=show_phase)
            except Exception as e:
                self.status.value = f"<b>failed</b>: {html.escape(f'{type(e).__name__}: {e}')}"
                raise
            finally:
                self.button.disabled, self.stop_button.disabled = False, True
            self.status.value = self._ending(live, live.ended_at - t0)
            return live.run_dir

        if wait:
            return watch()
        threading.Thread(target=watch, daemon=True, name="vldlib-explorer-watch").start()
        return None

    def _ending(self, live: LiveRun, seconds: float) -> str:
        """The status line once a run ended: done or stopped, where, and (stopped) how soon after
        the stop; a run stopped before its first evaluation says so instead of plotting nothing."""
        end = self.last_curve.iloc[-1] if self.last_curve is not None and len(self.last_curve) else None
        if live.finished:
            state = "done"
        elif end is None:
            return (f"stopped before its first evaluation, while {live.phase or 'starting'}: nothing of "
                    f"this run to plot yet (press run to start it again; finished preparation is kept). "
                    f"{live.run_dir.name}")
        else:
            state = "stopped (press run to continue it)"
        latency = (f", {live.ended_at - live.stopped_at:.1f} s after stop"
                   if live.stopped_at and live.ended_at and not live.finished else "")
        return (f"{state} after {seconds:.0f} s{latency}: {live.run_dir.name}" +
                (f"; step {int(end.step)}: i.i.d. {100 * end.iid_acc:.1f}%, o.o.d. {100 * end.ood_acc:.1f}%"
                 if end is not None else ""))
