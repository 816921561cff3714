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

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from vldlib.config import TrainConfig
from vldlib.loop import run_dir_for
from vldlib.paths import resolve
from vldlib.utils import read_jsonl

# A short CPU fine-tune: the last stage and the head of the offline EfficientNet, on cached outputs
# of the frozen stages, at 96 px, without augmentation.
DEFAULTS: dict[str, Any] = dict(benchmark="emoji", test_env=0, dropout=0.9, steps=300, backbone="efficientnet_lite0.offline",
                                pretrained=True, resolution=96, train_stages=1, lr=0.01, weight_decay=1e-4,
                                batch_size=32, seed=0, device="auto")


def explorer_config(data_dir: str, runs_dir: str, **values: Any) -> TrainConfig:
    """The `TrainConfig` of one explorer run (unknown keys are an error, missing ones from DEFAULTS)."""
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown explorer setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    v = {**DEFAULTS, **values}
    steps = int(v["steps"])
    every = max(1, steps // 10)  # ten points on the live curve
    cache = v["train_stages"] is not None
    from vldlib.experiments.grid import with_paths
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
    from vldlib.evaluate.scores import load_runs, per_step_scores

    run_dir = Path(run_dir)
    if not (run_dir / "records.jsonl").exists() or not any(r.get("type") == "eval" for r in read_jsonl(run_dir / "records.jsonl")):
        return pd.DataFrame(columns=["step", "loss", "iid_acc", "ood_acc"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load_runs([run_dir])
    s = per_step_scores(df)
    return s[s.method == "model"].sort_values("step")[["step", "loss", "iid_acc", "ood_acc"]].reset_index(drop=True)


def run_live(cfg: TrainConfig, on_update: Callable[[pd.DataFrame], None] | None = None, poll: float = 0.5) -> Path:
    """Train `cfg` (resuming or skipping as `train` does) in a background thread; call
    `on_update(curve)` from this thread each time a new evaluation is recorded. Returns the run dir.

    Training runs in a thread so that the caller (a widget callback in the kernel's main thread)
    keeps control and can push progress to the front-end; errors in the thread are re-raised here.
    """
    from vldlib.loop.train import train

    run_dir = run_dir_for(cfg)
    error: list[BaseException] = []

    def work() -> None:
        try:
            train(cfg)
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=work, daemon=True, name="vldlib-explorer")
    t.start()
    seen = -1
    while True:
        alive = t.is_alive()
        curve = curve_of(run_dir)
        if on_update is not None and len(curve) != seen:
            seen = len(curve)
            on_update(curve)
        if not alive:
            break
        time.sleep(poll)
    t.join()
    if error:
        raise error[0]
    return run_dir


def earlier_curves(paths: Iterable[str | Path], benchmark: str, test_env: int, match: dict[str, Any] | None = None
                   ) -> pd.DataFrame:
    """Per-step scores of finished runs under `paths` on the same benchmark and held-out domain
    (columns: run, step, iid_acc, ood_acc, dropout, ...); empty if none. `match` keeps only runs
    whose config has these values (e.g. the same backbone and resolution), so the comparison
    differs in the dropout rate, not in everything else."""
    import warnings

    from vldlib.evaluate.scores import load_runs, per_step_scores
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


def plot_curves(curve: pd.DataFrame, earlier: pd.DataFrame | None = None, title: str = "", total_steps: int | None = None):
    """i.i.d. validation and o.o.d. test accuracy against step: this run bold, earlier runs faint
    (coloured by dropout rate), so a new rate can be judged against what was already tried."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, metric, name in zip(axes, ("iid_acc", "ood_acc"), ("i.i.d. validation", "o.o.d. test")):
        if earlier is not None and len(earlier):
            rates = sorted(earlier.dropout.unique())
            cmap = plt.get_cmap("viridis")
            for run, g in earlier.groupby("run"):
                r = g.dropout.iloc[0]
                c = cmap(rates.index(r) / max(1, len(rates) - 1))
                ax.plot(g.step, 100 * g[metric], color=c, alpha=0.35, lw=1)
            for i, r in enumerate(rates):
                ax.plot([], [], color=cmap(i / max(1, len(rates) - 1)), alpha=0.5, label=f"earlier, p={r:g}")
        if len(curve):
            ax.plot(curve.step, 100 * curve[metric], "o-", color="crimson", lw=2.5, label="this run")
        if total_steps:
            ax.set_xlim(0, total_steps * 1.02)
        ax.set(title=name, xlabel="step", ylabel="accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def available_benchmarks(data_dir: str, extra: Iterable[str] = ()) -> list[str]:
    """Registered benchmarks present under data_dir (or buildable offline), plus `extra` names/paths."""
    from vldlib.data import get_spec, list_benchmarks

    out = []
    for name in list_benchmarks():
        spec = get_spec(name)
        if spec.builder is not None or (resolve(data_dir) / spec.dirname).is_dir():
            out.append(name)
    return list(dict.fromkeys([*extra, *out]))


def benchmark_domains(benchmark: str, data_dir: str) -> list[str]:
    """Domain names of a benchmark (building the offline one on first use)."""
    from vldlib.data import get_spec, load_benchmark

    try:
        spec = get_spec(benchmark)
    except KeyError:
        spec = None
    if spec is not None and spec.builder is not None:
        spec.builder(resolve(data_dir), progress=False)
    bench = load_benchmark(benchmark if spec else str(resolve(benchmark)), resolve(data_dir), progress=False)
    return list(bench.domains)


class Explorer:
    """The widget panel. `widget` is what to display; `run()` is the run button's callback."""

    def __init__(self, data_dir: str = "data", runs_dir: str = "outputs/runs", compare: Iterable[str] = ("outputs",),
                 defaults: dict[str, Any] | None = None):
        import ipywidgets as w

        self.data_dir, self.runs_dir, self.compare = data_dir, runs_dir, list(compare)
        self.defaults = {**DEFAULTS, **(defaults or {})}
        d = self.defaults
        self.benchmark = w.Dropdown(options=available_benchmarks(data_dir, [d["benchmark"]]), value=d["benchmark"],
                                    description="benchmark")
        self.test_env = w.Dropdown(description="held out")
        self.dropout = w.FloatSlider(value=d["dropout"], min=0.0, max=0.95, step=0.05, description="dropout",
                                     continuous_update=False)
        self.steps = w.IntSlider(value=d["steps"], min=min(20, d["steps"]), max=max(2000, d["steps"]), step=10,
                                 description="steps", continuous_update=False)
        self.button = w.Button(description="run", button_style="primary", icon="play")
        self.progress = w.IntProgress(value=0, min=0, max=d["steps"], description="progress")
        self.status = w.HTML("")
        self.plot = w.Output()
        self.benchmark.observe(lambda change: self._set_domains(), names="value")
        self._set_domains()
        self.button.on_click(self.run)
        self.widget = w.VBox([w.HBox([self.benchmark, self.test_env]), w.HBox([self.dropout, self.steps]),
                              w.HBox([self.button, self.progress]), self.status, self.plot])
        self.last_run: Path | None = None
        self.last_curve: pd.DataFrame | None = None

    def _set_domains(self) -> None:
        domains = benchmark_domains(self.benchmark.value, self.data_dir)
        self.test_env.options = [(f"{i}: {name}", i) for i, name in enumerate(domains)]
        self.test_env.value = min(int(self.defaults["test_env"]), len(domains) - 1)

    def settings(self) -> dict[str, Any]:
        """The widget values merged into the defaults: the run `run()` would start."""
        return {**self.defaults, "benchmark": self.benchmark.value, "test_env": int(self.test_env.value),
                "dropout": round(float(self.dropout.value), 4), "steps": int(self.steps.value)}

    def _draw(self, curve: pd.DataFrame, earlier: pd.DataFrame, title: str, steps: int) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import clear_output, display

        self.progress.value = int(curve.step.max()) if len(curve) else 0
        fig = plot_curves(curve, earlier, title=title, total_steps=steps)
        with self.plot:
            clear_output(wait=True)
            display(fig)
        plt.close(fig)

    def run(self, _button: Any = None) -> Path:
        """Train the configuration the widgets show (or reuse it if finished), live."""
        s = self.settings()
        cfg = explorer_config(self.data_dir, self.runs_dir, **s)
        this = run_dir_for(cfg)
        earlier = earlier_curves(self.compare, cfg.benchmark, s["test_env"], match=comparable(cfg))
        earlier = earlier[earlier.run != str(this)] if len(earlier) else earlier
        self.progress.max, self.progress.value = cfg.steps, 0
        title = f"p={cfg.dropout:g}, held out {self.test_env.label}, {cfg.steps} steps"
        self.status.value = f"training {this.name} ..."
        self.button.disabled = True
        t0 = time.perf_counter()
        try:
            def update(curve: pd.DataFrame) -> None:
                self.last_curve = curve
                self._draw(curve, earlier, title, cfg.steps)
            self.last_run = run_live(cfg, update)
        except Exception as e:
            self.status.value = f"<b>failed</b>: {type(e).__name__}: {e}"
            raise
        finally:
            self.button.disabled = False
        self.last_curve = curve_of(self.last_run)
        end = self.last_curve.iloc[-1] if len(self.last_curve) else None
        self.status.value = (f"done in {time.perf_counter() - t0:.0f} s: {self.last_run.name}" +
                             (f"; last step i.i.d. {100 * end.iid_acc:.1f}%, o.o.d. {100 * end.ood_acc:.1f}%"
                              if end is not None else ""))
        return self.last_run
