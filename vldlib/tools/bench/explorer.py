"""The explorer's responsiveness, measured and printed (issue 26 items 5-6):

- stop latency: seconds from `stop()` to the run's thread ending, pressed in each phase of a run
  (checking the images, building the network, computing the frozen-trunk outputs, evaluating the
  start, training), each from the state that phase needs (empty caches for the first ones);
- first point: seconds from "Run All" (the cells sent to an already started kernel, as JupyterLab
  does) to the first plot of the default run in `20_explorer`'s output, with empty and with warm
  caches.

    python -m vldlib.tools.bench.explorer --benchmark ObjectStyles --data-dir data --stops
    python -m vldlib.tools.bench.explorer --benchmark emoji --data-dir /tmp/data --first-point

Every figure depends on what else the machine runs: the load average and the busiest other
processes are printed with them. Caches and runs go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vldlib.paths import resolve
from vldlib.loop.device import usable_cores

ROOT = Path(__file__).resolve().parents[3]
NOTEBOOK = ROOT / "notebooks" / "20_explorer.ipynb"
TRUNK = "computing the frozen-trunk outputs (cached for later runs)"
# (phase, seconds into it when stop is pressed, which caches it starts from)
STOPS = [("loading the benchmark", 0.5, "empty"), ("building the network", 0.0, "checked"),
         (TRUNK, 3.0, "checked"), ("evaluating the start", 0.0, "warm"), ("training", 2.0, "warm")]


def machine_load() -> str:
    """The load average and the three busiest processes other than this one: what shared the CPU."""
    one, five, _ = os.getloadavg()
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    busiest = [line.strip()[:110] for line in ps.splitlines()[1:] if str(os.getpid()) not in line.split()[:1]][:3]
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {usable_cores()} usable cores; busiest: " + " | ".join(busiest)


def stop_latencies(benchmark: str, data_dir: str, work: Path, repeat: int = 1) -> list[tuple[str, float, float]]:
    """[(phase, seconds into it when stopped, seconds from stop to the run's end)], each phase
    `repeat` times, the k-th stop 0.3 k s later into it (a stop lands anywhere in a batch)."""
    from vldlib.analysis import explorer as ex
    from vldlib.data import load_benchmark

    caches = {"empty": work / "cache-empty", "checked": work / "cache-checked", "warm": work / "cache-warm"}
    os.environ["VLDLIB_CACHE"] = str(caches["warm"])
    ex.run_live(ex.explorer_config(data_dir, str(work / "warm-runs"), benchmark=benchmark, steps=2))  # fills it
    os.environ["VLDLIB_CACHE"] = str(caches["checked"])
    load_benchmark(benchmark, data_dir, progress=False)  # the images checked, no trunk outputs (never a build)
    out = []
    plan = [(phase, delay + 0.3 * k, cache) for k in range(repeat) for phase, delay, cache in STOPS]
    for n, (phase, delay, cache) in enumerate(plan):
        os.environ["VLDLIB_CACHE"] = str(caches[cache] if cache != "empty" else work / f"cache-empty-{n}")
        live = ex.LiveRun(ex.explorer_config(data_dir, str(work / f"runs-{n}"), benchmark=benchmark, steps=3000))
        live.start()
        deadline = time.time() + 600
        while live.phase != phase and live.running and time.time() < deadline:
            time.sleep(0.005)
        if live.phase != phase:
            print(f"  never reached {phase!r} (last phase {live.phase!r}); skipped", flush=True)
            live.stop()
            live.watch()
            continue
        reached = time.perf_counter()
        time.sleep(delay)
        at = live.phase  # where the stop lands (a short phase may be over by then)
        live.stop()
        pressed = time.perf_counter()
        live.watch(poll=0.05)
        latency = live.ended_at - pressed
        out.append((at, pressed - reached, latency))
        print(f"  {at:<60} stop {pressed - reached:4.1f} s after {phase!r} began: the run ended "
              f"{latency:5.2f} s later", flush=True)
    return out


def first_point(benchmark: str, data_dir: str, work: Path, cache: Path, label: str) -> dict[str, float]:
    """Run 20_explorer's cells in a started kernel, as Run All does; seconds from the first cell to
    the default run's first plot, to the end of its cell, and to the end of the notebook."""
    from jupyter_client.manager import start_new_kernel
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    runs = work / f"runs-{label}"
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), {
        "benchmark": benchmark, "data_dir": data_dir, "output_dir": str(work / f"out-{label}"),
        "runs_dir": str(runs), "compare_dirs": [str(runs)], "interactive": True})
    env = {**os.environ, "VLDLIB_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(ROOT))
    try:
        t0, marks = time.perf_counter(), {}
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            msg_id = kc.execute(cell.source)
            while True:
                try:
                    msg = kc.get_iopub_msg(timeout=600)
                except queue.Empty:
                    raise TimeoutError("the kernel went silent for 10 minutes") from None
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "error":
                    raise RuntimeError(f"cell failed: {content['ename']}: {content['evalue']}")
                shown = content.get("data", {}) if kind in ("display_data", "update_display_data") else {}
                if "run_drawn" in cell.source and "image/png" in shown:
                    marks.setdefault("first point", time.perf_counter() - t0)
                elif "run_drawn" in cell.source and "text/html" in shown:  # the status line: the run's phase
                    phase = shown["text/html"].split(" (")[0].split(",")[0]
                    marks.setdefault(f"'{phase}' shown", time.perf_counter() - t0)
                if kind == "status" and content["execution_state"] == "idle":
                    break
            if "prepare_benchmark(" in cell.source:
                marks["imports and benchmark cell done"] = time.perf_counter() - t0
            if "run_drawn" in cell.source:
                marks["default run's cell done"] = time.perf_counter() - t0
        marks["notebook done"] = time.perf_counter() - t0
        return marks
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", default="emoji")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--stops", action="store_true", help="stop latency in each phase")
    p.add_argument("--repeat", type=int, default=1, help="stops pressed in each phase (default 1)")
    p.add_argument("--first-point", action="store_true", help="Run All to the default run's first point")
    a = p.parse_args(argv)
    data_dir = str(resolve(a.data_dir))
    with tempfile.TemporaryDirectory(prefix="vldlib-explorer-bench-") as tmp:
        work = Path(tmp)
        print(f"before: {machine_load()}", flush=True)
        if a.stops:
            print(f"stop latency ({a.benchmark}, explorer defaults, 3000 steps):", flush=True)
            out = stop_latencies(a.benchmark, data_dir, work, a.repeat)
            for phase, _, _ in STOPS:
                seen = [latency for name, _, latency in out if name == phase]
                if seen:
                    print(f"  {phase:<60} median {sorted(seen)[len(seen) // 2]:.2f} s, worst {max(seen):.2f} s "
                          f"({len(seen)} stops)", flush=True)
        if a.first_point:
            print(f"Run All of 20_explorer ({a.benchmark}), kernel already started:", flush=True)
            cache = work / "cache-first-point"
            for label in ("empty caches", "warm caches (same caches, new run)"):
                marks = first_point(a.benchmark, data_dir, work, cache, label.split()[0])
                print(f"  {label:<36} " + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()), flush=True)
        print(f"after: {machine_load()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
