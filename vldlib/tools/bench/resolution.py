"""What training at a backbone's native resolution costs against the CPU studies' 96 px (issue 23
section 1): one quickstart run (`quickstart_config`: cached trunk, no augmentation, one thread, an
evaluation every 50 steps) per (resolution, depth), timed twice: cold (the frozen trunk's outputs
computed, once per benchmark, backbone, resolution and depth) and warm (every later run of a
study: rates, seeds, learning rates reuse them).

    python -m vldlib.tools.bench.resolution --data-dir /tmp/data --out /tmp/bench-res

Everything it writes (runs, the trunk cache, the checked-images list, results.json) goes under
`--out`; the benchmarks are read from `--data-dir` (built there first when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_SIZES = ("96:ObjectStyles", "224:ObjectStyles@256")  # trained px : the stored benchmark it reads


def time_config(cfg, out: Path, name: str) -> dict:
    """Wall time of one run of `cfg` under `out`, and the loop's own mean step time."""
    from vldlib.loop.train import train
    from vldlib.utils import read_jsonl

    t0 = time.perf_counter()
    run_dir = train(replace(cfg, out=str(out / "runs"), run_name=name))
    wall = time.perf_counter() - t0
    evals = [r for r in read_jsonl(run_dir / "records.jsonl") if r.get("type", "eval") == "eval" and r["step"] > 0]
    step_s = sum(r["step_time"] for r in evals) / len(evals)
    return {"wall_s": round(wall, 2), "step_ms": round(1000 * step_s, 2), "evals": len(evals) + 1}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding the benchmarks named in --sizes")
    p.add_argument("--out", required=True, help="folder for everything this writes (created)")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                   help=f"comma list of PX:BENCHMARK (default {','.join(DEFAULT_SIZES)})")
    p.add_argument("--stages", default="0,1", help="train_stages values: 0 head only, 1 conv_head (default 0,1)")
    p.add_argument("--backbone", default="efficientnet_lite0.offline")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VLDLIB_CACHE"] = str(out / "cache")  # a cold trunk cache, and nothing written elsewhere

    from vldlib.experiments.quickstart import quickstart_config

    sizes = [(int(px), bench) for px, bench in (s.split(":", 1) for s in args.sizes.split(","))]
    rows = []
    for px, bench in sizes:
        for stages in (int(k) for k in args.stages.split(",")):
            cfg = quickstart_config(args.device, {"benchmark": bench, "data_dir": args.data_dir, "resolution": px,
                                                  "train_stages": stages, "steps": args.steps,
                                                  "backbone": args.backbone})
            cfg = replace(cfg, steps=args.steps, progress=False)
            tag = f"{bench}-{px}px-ts{stages}"
            cold = time_config(cfg, out, f"{tag}-cold")
            warm = time_config(replace(cfg, seed=cfg.seed + 1), out, f"{tag}-warm")
            rows.append({"benchmark": bench, "resolution": px, "train_stages": stages, "steps": args.steps,
                         "cold_s": cold["wall_s"], "warm_s": warm["wall_s"],
                         "trunk_s": round(cold["wall_s"] - warm["wall_s"], 2), "step_ms": warm["step_ms"],
                         "evals": warm["evals"]})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["train_stages"]: r for r in rows if r["resolution"] == sizes[0][0]}
    print(f"\n{args.backbone}, {args.steps} steps, cache_trunk, {cfg.num_threads} thread(s), device {args.device}")
    print(f"{'benchmark':<18}{'px':>5}{'stages':>7}{'run (warm) s':>14}{'trunk once s':>14}{'step ms':>9}"
          f"{'x ' + str(sizes[0][0]) + ' px':>10}")
    for r in rows:
        ratio = r["warm_s"] / base[r["train_stages"]]["warm_s"] if r["train_stages"] in base else float("nan")
        print(f"{r['benchmark']:<18}{r['resolution']:>5}{r['train_stages']:>7}{r['warm_s']:>14.1f}{r['trunk_s']:>14.1f}"
              f"{r['step_ms']:>9.1f}{ratio:>10.1f}")
    result = {"backbone": args.backbone, "device": args.device, "threads": cfg.num_threads, "rows": rows,
              "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
