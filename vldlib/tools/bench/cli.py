"""`python -m vldlib bench`: the command line of the benchmarks (see `vldlib.tools.bench.bench`)."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from vldlib.config import UsageError, add_flag, print_error
from vldlib.experiments.quickstart import quickstart_config
from vldlib.loop import resolve_device
from vldlib.tools.bench import precision, split
from vldlib.tools.bench.bench import OUT, BenchConfig, device_name, run_bench, write_synthetic_domains
from vldlib.tools.bench.gpu_check import GPU_PLAN, SMOKE_PLAN, gpu_check
from vldlib.tools.bench.runs import image_run_config, run_config_bench, steps_scaling, sweep_note
from vldlib.utils import atomic_path, write_json_atomic, write_text_atomic

IMAGE_OPTIONS = ("backbone", "resolution", "domains", "train_stages", "data", "batch_size")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training throughput: compute limit vs DomainBed's path vs vldlib's",
                       description=__doc__.split("\n\n")[0] + "\n\n" + CONFIGS_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  python -m vldlib bench                       # CPU: the quickstart's runs\n"
                              "  python -m vldlib bench --steps-scaling 200,600   # a run's time vs its steps\n"
                              "  python -m vldlib bench --run-split 6             # where a quickstart run's time goes\n"
                              "  python -m vldlib bench --resolution 64 --domains 3 --train-stages 2\n"
                              "  python -m vldlib bench --device cuda --backbone resnet50 --bf16\n"
                              "  python -m vldlib bench --gpu-check")
    d = BenchConfig()
    p.add_argument("--config", choices=("quickstart", "images"),
                   help="what to time (default: quickstart on a CPU unless an image option is given, "
                        "images on a GPU)")
    g = p.add_argument_group("image options (--config images)")
    g.add_argument("--backbone", help="timm name or offline backbone (default: resnet50 on GPU, "
                                      "efficientnet_lite0.offline on CPU)")
    g.add_argument("--resolution", type=int, help="pixels (default 224 on GPU, 64 on CPU)")
    g.add_argument("--batch-size", type=int, help=f"per domain (default {d.batch_size})")
    g.add_argument("--domains", type=int, help=f"training domains per step (default {d.domains})")
    g.add_argument("--train-stages", type=int,
                   help="train the last k stages (-1, the default: 2 on CPU, all on GPU; -2: all)")
    g.add_argument("--data", help="'synthetic' (the default), a benchmark folder or a registered name")
    g.add_argument("--data-dir", default=d.data_dir)
    add_flag(g, "--bf16", help="bf16 autocast in the compute and fast paths")
    add_flag(g, "--compile", help="torch.compile the compute and fast paths' forward")
    p.add_argument("--device", default=d.device)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--workers", type=int, default=d.workers, help="plain path's DataLoader workers in all")
    p.add_argument("--paths", default=",".join(d.paths), help="comma list of compute,plain,fast")
    p.add_argument("--json", help="output file (default outputs/bench/bench-<device>-<what>.json)")
    p.add_argument("--steps-scaling", nargs="?", const="200,600", metavar="N,M",
                   help="time real training runs of N and M steps instead (default 200,600)")
    p.add_argument("--bf16-accuracy", nargs="?", const="0,1,2", metavar="SEEDS",
                   help="train the quickstart's runs in fp32 and bf16 for these seeds (default 0,1,2) and "
                        "compare their accuracy (vldlib.tools.bench.precision); finished runs are reused")
    p.add_argument("--run-split", nargs="?", const=4, type=int, metavar="N",
                   help="train N quickstart runs (default 4; records only, as the quickstart) in a temporary "
                        "folder and print where each run's time goes, then the cold quickstart's one-off costs "
                        "(vldlib.tools.bench.split)")
    add_flag(p, "--run-split-weights", help="with --run-split: keep the runs' weights (best.pt, final.pt), "
                                            "to compare with the quickstart's records-only runs")
    add_flag(p, "--gpu-check", help="the self-contained GPU report (~6 min on an H100)")
    add_flag(p, "--gpu-check-smoke",
                   help="every --gpu-check stage on the CPU with tiny models (a minute): checks the script itself")
    p.add_argument("--budget", type=float, default=450.0,
                   help="--gpu-check's internal time budget in seconds (under 8 min in all)")
    p.set_defaults(func=_cli_bench)


CONFIGS_HELP = """\
--config quickstart: the runs of `python -m vldlib quickstart` (its notebook's parameters: cached
    frozen trunk, the trained tail on the CPU); the CPU target, fast >= 0.9 x compute, is about it.
--config images: a backbone on images (augmentation, decoded-image cache, device batches), the
    configuration of the GPU targets (resnet50, 224 px, 3 x 32)."""


def _image_options_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in IMAGE_OPTIONS)


def _pick_config(args: argparse.Namespace, device: str) -> str:
    if args.config:
        return args.config

    image_options = _image_options_given(args) or args.bf16 or args.compile
    return "images" if image_options or resolve_device(device).type != "cpu" else "quickstart"


def _cli_bench(args: argparse.Namespace) -> int:

    if args.gpu_check or args.gpu_check_smoke:

        if args.gpu_check_smoke:
            return gpu_check(args.budget, out=OUT / "smoke", plan=SMOKE_PLAN)
        return gpu_check(args.budget, plan=GPU_PLAN)
    d = BenchConfig()
    cfg = BenchConfig(backbone=args.backbone, resolution=args.resolution, batch_size=args.batch_size or d.batch_size,
                      domains=args.domains or d.domains,
                      train_stages={None: d.train_stages, -2: None}.get(args.train_stages, args.train_stages),
                      device=args.device, data=args.data or d.data, data_dir=args.data_dir, steps=args.steps,
                      warmup=args.warmup, repeats=args.repeats, bf16=args.bf16, compile=args.compile,
                      workers=args.workers,
                      paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()))
    try:
        which = _pick_config(args, cfg.device)
        if which == "quickstart" and _image_options_given(args):
            raise UsageError("--config quickstart times the quickstart notebook's own configuration; "
                             "--backbone/--resolution/--domains/--train-stages/--data/--batch-size apply to "
                             "--config images (or change the notebook's parameters)")
        if args.steps_scaling:
            return _cli_steps_scaling(args, cfg, which)
        if args.run_split is not None:
            return _cli_run_split(args, cfg, which)
        if args.bf16_accuracy:
            return _cli_bf16_accuracy(args, cfg, which)
        if which == "quickstart":
            tcfg = quickstart_config(cfg.device)
            print(f"[vldlib] bench: the quickstart's runs ({tcfg.backbone}, {tcfg.resolution} px, train_stages "
                  f"{tcfg.train_stages}, cache_trunk {tcfg.cache_trunk}, augment {tcfg.augment}, {tcfg.num_threads} "
                  f"thread(s)) on {device_name(cfg.resolved().device)}", flush=True)
            res = run_config_bench(tcfg, cfg, name="quickstart", json_path=args.json)
        else:
            print(f"[vldlib] bench on {device_name(cfg.resolved().device)}", flush=True)
            res = run_bench(cfg, json_path=args.json)
        print(f"[vldlib] written {res['json']}")
        return 0
    except (ValueError, RuntimeError, OSError) as e:
        return print_error(e)  # 2: options that do not go together; 1: the benchmark failed


def _cli_steps_scaling(args: argparse.Namespace, cfg: BenchConfig, which: str) -> int:

    try:
        n, m = (int(s) for s in args.steps_scaling.split(","))
    except ValueError:
        raise UsageError(f"--steps-scaling expects N,M (two step counts), got {args.steps_scaling!r}") from None
    c = cfg.resolved()
    if which == "quickstart":
        tcfg = quickstart_config(c.device)
    else:
        root = c.data
        if c.data == "synthetic":
            root = write_synthetic_domains(OUT / "data" / "synthetic", domains=max(4, c.domains))
        tcfg = image_run_config(root, backbone=c.backbone, resolution=c.resolution, device=c.device,
                                batch_size=c.batch_size, train_stages=c.train_stages, bf16=c.bf16)
    with tempfile.TemporaryDirectory() as tmp:
        res = steps_scaling(tcfg, (n, m), tmp)
    res["config"] = asdict(tcfg)
    cpu = torch.device(c.device).type == "cpu"
    tcfg = tcfg.resolved()  # the benchmark's steps when unset
    run_s = res["fixed_s"] + res["slope_s_per_step"] * tcfg.steps
    res["note"] = (f"A run of this configuration ({tcfg.steps} steps, evaluated once): {run_s:.0f} s.\n"
                   + sweep_note(run_s, unit="CPU core" if cpu and tcfg.num_threads == 1 else "GPU" if not cpu
                                else "machine"))
    path = Path(args.json) if args.json else OUT / f"steps-scaling-{torch.device(c.device).type}-{which}.json"
    write_json_atomic(path, res)
    for r in res["runs"]:
        print(f"  {r['steps']:6d} steps: {r['wall_s']:7.1f} s wall, loop {1e3 * r['step_time_s']:.1f} ms/step, "
              f"{r['other_s']:.1f} s setup and evaluation")
    print(f"  slope {1e3 * res['slope_s_per_step']:.1f} ms/step = {res['slope_over_step_time']:.2f} x the loop's "
          f"step time; fixed {res['fixed_s']:.1f} s a run")
    print(res["note"])
    print(f"[vldlib] written {path}")
    return 0


def _cli_run_split(args: argparse.Namespace, cfg: BenchConfig, which: str) -> int:

    if which != "quickstart":
        raise UsageError("--run-split times the quickstart's own runs; image options do not apply")
    if args.run_split < 1:
        raise UsageError(f"--run-split N: N is a number of runs (1 or more), got {args.run_split}")
    tcfg = quickstart_config(cfg.resolved().device)
    overrides = {"save_weights": True} if args.run_split_weights else {}
    print(f"[vldlib] bench: where {args.run_split} quickstart runs' time goes ({tcfg.steps} steps, evaluated every "
          f"{tcfg.eval_every}, {'weights kept' if overrides else 'records only'}, {tcfg.num_threads} thread(s)) on "
          f"{device_name(cfg.resolved().device)}", flush=True)
    res = split.run_split(tcfg, args.run_split, overrides=overrides)
    path = Path(args.json) if args.json else OUT / f"run-split-{torch.device(tcfg.device).type}.json"
    write_json_atomic(path, res)
    print(f"[vldlib] written {path}")
    return 0


def _cli_bf16_accuracy(args: argparse.Namespace, cfg: BenchConfig, which: str) -> int:

    if which != "quickstart":
        raise UsageError("--bf16-accuracy trains the quickstart's runs (pretrained, on the emoji benchmark); "
                         "image options do not apply (the GPU check runs it on full fine-tuning)")
    try:
        seeds = [int(s) for s in args.bf16_accuracy.split(",")]
    except ValueError:
        raise UsageError(f"--bf16-accuracy expects seeds like 0,1,2, got {args.bf16_accuracy!r}") from None
    out = OUT / "bf16_accuracy"
    res = precision.bf16_accuracy(quickstart_config(cfg.device), out, seeds=seeds)
    text = precision.markdown(res, device_name(cfg.resolved().device))
    with atomic_path(out / "bf16_accuracy.csv") as tmp:
        res["table"].to_csv(tmp, index=False)
    write_text_atomic(out / "bf16_accuracy.md", text)
    print(text)
    print(f"[vldlib] written {out / 'bf16_accuracy.md'}")
    return 0
