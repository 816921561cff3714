"""The paper's reference numbers (Zhang & Bottou 2024, v1), read off its figures.

v1 publishes no tables, so every number here was read off a plot: treat differences smaller than
the read-off error (`READ_OFF_ERROR`) as noise. The numbers are means over all of the paper's runs
of a benchmark (4 held-out domains x the lr/wd grid x 3 seeds), each run's checkpoint chosen by
training-domain validation, so compare them with our means over the same things
(`vldlib.evaluate.tables.reference_comparison` does).

Method names follow `vldlib.evaluate.selection.select` and `vldlib.evaluate.combine`: "model" is plain fine-tuning (the
current weights, at the given dropout rate); "soup_uniform" and "ens_runs" are the uniform weight
average and the logit ensemble across runs (1x head learning rate, no dropout), compared with ours
of each run's best.pt; the "_last" variants (the runs' final weights) have no paper number.

>>> ref = paper_reference()
>>> float(ref.query("benchmark == 'PACS' and dropout == 0.9 and method == 'model'").ood_acc.iloc[0])
0.884
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from vldlib.config import TrainConfig

BENCHMARKS = ("VLCS", "OfficeHome", "PACS", "TerraIncognita")

# read-off error of the figure values (accuracy as a fraction)
READ_OFF_ERROR = {"VLCS": 0.001, "OfficeHome": 0.001, "PACS": 0.001, "TerraIncognita": 0.002}

READ_OFF_NOTE = ("Paper numbers are read off the figures of arXiv 2403.00946v1 (no tables published): "
                 "read-off error about +-0.001 (TerraIncognita +-0.002). They average all of the "
                 "paper's runs per benchmark (4 held-out domains x lr {1e-3, 5e-4} x wd {1e-4, 5e-5, "
                 "1e-5} x 3 seeds), ResNet50 IMAGENET1K_V2, training-domain validation.")

# (iid, ood) per benchmark, per dropout rate, plain fine-tuning (shared/paper.md, "Reference numbers")
_RATES: dict[float, dict[str, tuple[float, float]]] = {
    0.0: {"VLCS": (.874, .787), "OfficeHome": (.849, .708), "PACS": (.975, .865), "TerraIncognita": (.913, .513)},
    0.5: {"VLCS": (.876, .796), "OfficeHome": (.860, .729), "PACS": (.977, .875), "TerraIncognita": (.901, .531)},
    0.9: {"VLCS": (.874, .800), "OfficeHome": (.859, .734), "PACS": (.978, .884), "TerraIncognita": (.879, .536)},
    0.95: {"VLCS": (.873, .799), "OfficeHome": (.851, .729), "PACS": (.979, .885), "TerraIncognita": (.866, .523)},
}
# the paper's "mean o.o.d." column, kept to check the per-benchmark numbers against it
MEAN_OOD = {0.0: .718, 0.5: .733, 0.9: .739, 0.95: .734}

# o.o.d. only; across runs, 1x head lr, no dropout
_ACROSS_RUNS: dict[str, dict[str, float]] = {
    "soup_uniform": {"VLCS": .789, "OfficeHome": .713, "PACS": .870, "TerraIncognita": .520},
    "ens_runs": {"VLCS": .791, "OfficeHome": .713, "PACS": .871, "TerraIncognita": .525},
}

METHOD_LABELS = {
    "model": "fine-tuning",
    "wa": "weight avg. (trajectory)",
    "ens": "ensemble (trajectory)",
    "soup_uniform": "weight avg. (across runs)",
    "soup_greedy": "greedy soup (across runs)",
    "ens_runs": "ensemble (across runs)",
    "soup_uniform_last": "weight avg. (across runs, final weights)",
    "soup_greedy_last": "greedy soup (across runs, final weights)",
    "ens_runs_last": "ensemble (across runs, final weights)",
}


def paper_reference() -> pd.DataFrame:
    """One row per (benchmark, method, dropout): iid_acc, ood_acc (fractions), read_off_error.

    iid_acc is NaN where the paper gives only o.o.d. accuracy (the across-runs rows).

    >>> paper_reference().groupby("method").size().to_dict()
    {'ens_runs': 4, 'model': 16, 'soup_uniform': 4}
    """
    rows = []
    for rate, per_bench in _RATES.items():
        for bench, (iid, ood) in per_bench.items():
            rows.append({"benchmark": bench, "method": "model", "dropout": rate, "iid_acc": iid,
                         "ood_acc": ood, "read_off_error": READ_OFF_ERROR[bench]})
    for method, per_bench in _ACROSS_RUNS.items():
        for bench, ood in per_bench.items():
            rows.append({"benchmark": bench, "method": method, "dropout": 0.0, "iid_acc": float("nan"),
                         "ood_acc": ood, "read_off_error": READ_OFF_ERROR[bench]})
    return pd.DataFrame(rows)


def reference_benchmark(name: str) -> str | None:
    """The paper's spelling of a benchmark name, or None when the paper did not run it.

    >>> reference_benchmark("officehome"), reference_benchmark("emoji")
    ('OfficeHome', None)
    """
    return {b.lower(): b for b in BENCHMARKS}.get(str(name).lower())


# ----------------------------------------------------------------------------- the paper's setting
PAPER_BACKBONES = ("resnet50.tv_in1k", "resnet50.tv2_in1k")  # ResNet #1 and #2
PAPER_STEPS = 10_000  # on the four benchmarks with reference numbers
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A config column, with TrainConfig's default where it is absent or empty: a run that predates
    the field, or a hand-made row (e.g. a soup's) that does not record it. An unset field whose
    default is None (train_stages, weights_file) stays None."""
    if name not in frame:
        return pd.Series([_DEFAULTS[name]] * len(frame), index=frame.index, dtype=object)
    return frame[name].astype(object).where(frame[name].notna(), _DEFAULTS[name])


def _is_unset(v) -> bool:
    return v is None or str(v) in ("", "None", "nan", "null")


def in_paper_setting(frame: pd.DataFrame) -> pd.Series:
    """THE rule for showing the paper's numbers beside a run (used by `report`, report.ipynb and
    `vldlib.evaluate.tables.reference_comparison`): one of the paper's four benchmarks, ResNet50
    #1 or #2 pretrained on ImageNet (no other weights file), every stage fine-tuned with the plain
    Dropout + Linear head at 1x its lr, BatchNorm frozen, 224 px, DomainBed's augmentation, the
    paper's 10,000 steps. Any other run is shown without paper columns: a 96 px, 600-step or partly
    fine-tuned run measures something else. A boolean per row of `frame` (config columns).

    >>> row = pd.DataFrame([{"benchmark": "PACS", "backbone": "resnet50.tv2_in1k", "steps": 10000}])
    >>> bool(in_paper_setting(row).iloc[0]), bool(in_paper_setting(row.assign(steps=600)).iloc[0])
    (True, False)
    """
    col = lambda name: _column(frame, name)  # noqa: E731
    truthy = lambda v: v in (True, 1, "True", "true")  # noqa: E731
    keep = col("benchmark").map(lambda b: b is not None and reference_benchmark(str(b)) is not None)
    keep &= col("backbone").isin(PAPER_BACKBONES)
    keep &= col("pretrained").map(truthy) & col("weights_file").map(_is_unset)
    keep &= col("head").map(lambda h: _is_unset(h) or h == "linear") & col("train_stages").map(_is_unset)
    keep &= pd.to_numeric(col("head_lr_mult"), errors="coerce").fillna(1.0) == 1.0
    keep &= col("freeze_bn").map(lambda v: v is None or truthy(v)) & col("augment").map(lambda v: v is None or truthy(v))
    keep &= pd.to_numeric(col("resolution"), errors="coerce") == 224
    keep &= pd.to_numeric(col("steps"), errors="coerce").fillna(PAPER_STEPS) == PAPER_STEPS
    return keep.astype(bool)


def paper_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` in the paper's setting (`in_paper_setting`)."""
    return frame[in_paper_setting(frame)] if len(frame) else frame
