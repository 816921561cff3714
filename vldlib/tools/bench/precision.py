"""bf16 autocast against fp32, measured on accuracy rather than assumed harmless.

`TrainConfig.bf16` stays off by default until this check, on the configuration in question,
shows bf16's accuracy within noise of fp32's. The same runs are trained in both precisions and
paired on (held-out domain, seed): same initialisation, batches and dropout masks, so only the
arithmetic differs and the paired difference has a small error bar.

    python -m vldlib bench --bf16-accuracy          # the quickstart's runs, 3 seeds (CPU: a few minutes)

The GPU check (`vldlib.tools.bench.gpu_check`) runs it on full fine-tuning, where bf16 would be used.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

from vldlib.config import TrainConfig
from vldlib.data import prepare_benchmark
from vldlib.evaluate.effects import effect_sentence, is_detectable, paired_effect
from vldlib.evaluate.scores import load_runs
from vldlib.evaluate.selection import select
from vldlib.evaluate.tables import to_markdown
from vldlib.experiments.grid import grid, run_grid

METRICS = {"ood_acc": "o.o.d. accuracy", "iid_acc": "i.i.d. validation accuracy"}


def bf16_accuracy(base: TrainConfig, out: str | os.PathLike, *, seeds: Sequence[int] = (0, 1, 2),
                  test_envs: Sequence[int] = (0,), progress: bool = True) -> dict:
    """Train `base` in fp32 and in bf16 for every (held-out domain, seed); compare the selected
    checkpoints (training-domain validation, current weights).

    Returns {"table": per pair accuracies, "effects": {metric: paired effect}, "sentences",
    "within_noise"}: within noise when no metric's paired difference is detectable (its 95%
    t interval contains 0). Finished runs under `out` are reused, so a second call only reports.
    """

    if len(seeds) < 2:
        raise ValueError(f"bf16_accuracy needs at least 2 seeds for an error bar, got {list(seeds)}")
    base = dataclasses.replace(base, out=str(Path(out) / "runs"))
    prepare_benchmark(base.benchmark, base.data_dir)  # builds the offline emoji benchmark if needed
    configs = grid(base, test_envs=[[t] for t in test_envs], seed=list(seeds), bf16=[False, True])
    run_dirs = run_grid(configs, progress=progress)
    sel = select(load_runs(run_dirs), "training_domain")
    sel = sel[sel["method"] == "model"]
    table = (sel.pivot_table(index=["test_env", "seed"], columns="bf16", values=list(METRICS))
             .rename(columns={False: "fp32", True: "bf16"}))
    table.columns = [f"{m}_{p}" for m, p in table.columns]
    effects, sentences = {}, []
    for metric, what in METRICS.items():
        eff = paired_effect(sel, a=False, b=True, metric=metric, by="bf16")
        effects[metric] = eff
        sentences.append(effect_sentence({**eff, "by": "precision", "a_label": "fp32", "b_label": "bf16"}, what))
    within = all(not math.isnan(e["se"]) and not is_detectable(e) for e in effects.values())
    return {"table": table.reset_index(), "effects": effects, "sentences": sentences, "within_noise": within,
            "config": dataclasses.asdict(base), "seeds": list(seeds), "test_envs": list(test_envs)}


def markdown(res: dict, device: str) -> str:
    """The check as a short Markdown report: what ran, the paired table, the verdict."""

    c = res["config"]
    lines = [f"# bf16 autocast vs fp32 accuracy ({device})", "",
             f"{c['backbone']}, {c['resolution']} px, train_stages {c['train_stages']}, cache_trunk "
             f"{c['cache_trunk']}, augment {c['augment']}, dropout {c['dropout']}, {c['steps']} steps, "
             f"benchmark {c['benchmark']}; held-out domains {res['test_envs']}, seeds {res['seeds']}; "
             f"checkpoints chosen by training-domain validation.", "",
             to_markdown(res["table"].round(4)), ""]
    lines += [f"- {s}" for s in res["sentences"]]
    verdict = ("within noise: bf16 may be turned on for this configuration" if res["within_noise"] else
               "not shown to be within noise: keep bf16 off for this configuration")
    lines += ["", f"Verdict: {verdict}."]
    return "\n".join(lines) + "\n"
