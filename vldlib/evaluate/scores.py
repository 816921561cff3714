"""Collect run directories into one tidy table, select checkpoints, tabulate, plot, report.

A run directory (written by `vldlib.loop.train`) holds config.json, meta.json, records.jsonl (one
"eval" record every 300 steps and at the last step, maybe a "failure" record) and `done`.
Everything downstream (`select`, `tables`, `plots`, `report`) is a pure function of the tidy
table that `load_runs` builds, so model selection is tested with records written by hand, the
way DomainBed tests its own. This module also holds THE rule for which split measures what
(`ood_split`, `split_scores`), used by the training loop, the tables and the soups alike.

Accuracy conventions (DomainBed's, which the paper uses): each domain is split 80/20 into "in"
and "out". For a run holding out env t,
  - i.i.d. (validation) accuracy = mean over training envs i != t of `env{i}_out`;
  - o.o.d. (test) accuracy       = `env{t}_in`, the test domain's 80% "in" part. (The "out" part
    of the test domain is reserved for the oracle selection method; it is never used for
    reporting, so o.o.d. numbers are comparable across selection methods.)
  - fit (eval-mode accuracy on the training data) = mean over training envs i != t of
    `env{i}_in`, the images the run trains on, scored with dropout off. Not `train_acc`, the
    training-mode accuracy (dropout on) of the training batches that the loop logs.
With several test envs, both are means over the envs concerned.

Example:
    >>> df = load_runs(["outputs/runs"])                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from vldlib.config import added_later_defaults
from vldlib.data import get_spec
from vldlib.utils import parse_jsonl, read_bounded_text

METHODS = ("model", "wa", "ens")  # current weights, trajectory weight average, trajectory ensemble
_KEY = re.compile(r"^env(\d+)_(in|out)$")

# columns that vary within a run; everything else in the tidy table is constant per run
ROW_COLS = ["method", "step", "env", "domain", "split", "is_test", "acc", "loss", "step_lr",
            "train_acc", "step_time", "peak_mem_mb", "rel_distance"]
RUN_COLS = ["run", "benchmark", "test_env", "test_envs", "test_domain", "done", "failed", "failure_reason",
            "missing_steps"]


# --------------------------------------------------------------------------- the rule
IID_SPLIT = "out"  # i.i.d. (validation) accuracy: the "out" split of every training domain
FIT_SPLIT = "in"  # the fit: eval-mode accuracy on the "in" split of every training domain (trained on)


def ood_split(benchmark: Any) -> str:
    """Which split of a held-out domain measures o.o.d. accuracy: "in" (DomainBed's), or "out" for
    benchmarks whose domains show the same objects (emoji): their "in" part was trained on in other
    styles, so only the "out" part holds objects never seen. `benchmark` is a loaded benchmark, a
    registered name, or a folder path (nothing known about shared objects: "in").

    Benchmarks grouped by object *within* domains (ObjectStyles: one emoji drawn by several vendors)
    get "in": no object is in two domains, so nothing of the held-out domain was seen in training,
    and its "in" split is DomainBed's test-domain number."""
    group_by_stem = getattr(benchmark, "group_by_stem", None)
    if group_by_stem is None:
        try:
            group_by_stem = get_spec(str(benchmark)).group_by_stem
        except KeyError:
            group_by_stem = False
    return "out" if group_by_stem else "in"


def accuracies(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """{"env0_in": accuracy, ...} from {"env0_in": (logits, labels), ...} (NaN for an empty split)."""
    return {k: float((logits.argmax(dim=1).cpu() == labels.cpu()).float().mean()) if len(labels) else float("nan")
            for k, (logits, labels) in sorted(outputs.items())}


# --------------------------------------------------------------------------- loading

def _is_run_dir(p: Path) -> bool:
    """A folder with records.jsonl, or a finished run (done + config.json) whose records were lost:
    found too, so a report says it is missing instead of silently leaving it out."""
    return (p / "records.jsonl").exists() or ((p / "done").is_file() and (p / "config.json").is_file())


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (folders holding records.jsonl, or `done` and config.json) at or below each
    path, sorted, no duplicates.

    >>> find_run_dirs(["outputs/runs"])   # doctest: +SKIP
    [PosixPath('outputs/runs/PACS-3f2a...'), ...]
    """
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory; pass run directories or folders "
                                    f"that contain them")
        if p.is_file():
            p = p.parent
        if _is_run_dir(p):
            found[p] = None
            continue
        sub = sorted({r.parent for r in [*p.rglob("records.jsonl"), *p.rglob("done")] if _is_run_dir(r.parent)})
        if not sub:
            warnings.warn(f"{p}: no records.jsonl at or below it; skipped (not a run directory, or "
                          f"no run has evaluated yet)", stacklevel=2)
        found.update(dict.fromkeys(sub))
    return sorted(found)




MAX_RUN_JSON_MB = 16  # config.json / meta.json: a few KB when vldlib writes them
MAX_RECORDS_MB = 64  # records.jsonl: about 1 KB an evaluation; 10,000 steps evaluated every 300 steps: 35 KB
MAX_STEPS = 10**7  # steps / eval_every beyond this are not a run's (DomainNet trains 30,000 steps)
MAX_EVALUATIONS = 10**6  # steps // eval_every: the evaluation steps a report lists for one run


def _parsed(path: Path, text: str, parse) -> Any:
    """`parse(text)`, its failures as a ValueError naming the file (deep nesting included)."""
    try:
        return parse(text)
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise ValueError(f"{path}: not valid JSON ({_short(str(e), 120)}); delete the run directory to recompute "
                         f"it") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be a run's file; delete or repair it") from None


def _json_object(path: Path) -> dict:
    """config.json / meta.json as a dict ({} when absent); not a regular file, too large, binary,
    malformed, too deeply nested or of the wrong shape: a ValueError naming the file."""
    text = read_bounded_text(path, MAX_RUN_JSON_MB * 2**20)
    data = {} if text is None else _parsed(path, text, json.loads)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _is_number(v: Any) -> bool:
    """A JSON number (true/false are not numbers, though Python counts them as ints)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_accuracy(v: Any) -> bool:
    """A number in [0, 1], or NaN (the accuracy of an empty split)."""
    return _is_number(v) and (v != v or 0 <= v <= 1)


def _is_count(v: Any, low: int = 0, high: int = MAX_STEPS) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


RECORD_NUMBERS = ("loss", "lr", "step_time", "peak_mem_mb", "rel_distance")  # read into the tidy table beside the accuracies


def _record_problem(r: Any) -> str | None:
    """What is wrong with one line of records.jsonl for the report, None when nothing."""
    if not isinstance(r, dict):
        return f"is a {type(r).__name__}, not a JSON object"
    if r.get("type", "eval") != "eval" or "acc" not in r:
        return None
    acc = r["acc"]
    if not (_is_count(r.get("step")) and isinstance(acc, dict)
            and all(isinstance(a, dict) or a is None for a in acc.values())):
        return ("is not an evaluation record (needs an integer 'step' and 'acc': {method: {split: accuracy}})")
    bad = [(k, v) for a in acc.values() for k, v in (a or {}).items() if not _is_accuracy(v)]
    bad += [(k, r[k]) for k in ("train_acc",) if r.get(k) is not None and not _is_accuracy(r[k])]
    if bad:
        return f"has accuracy {bad[0][0]}: {_short(bad[0][1])}, not a number in [0, 1]"
    bad = [(k, r[k]) for k in RECORD_NUMBERS if r.get(k) is not None and not _is_number(r[k])]
    return f"has {bad[0][0]}: {_short(bad[0][1])}, not a number" if bad else None


def _checked_records(path: Path) -> list[dict]:
    """records.jsonl, each line checked for the shape and values the report reads (a step in
    0..MAX_STEPS, accuracies in [0, 1]): a ValueError naming the file and line otherwise."""
    text = read_bounded_text(path, MAX_RECORDS_MB * 2**20)
    records = [] if text is None else _parsed(path, text, lambda t: parse_jsonl(t, path))
    for i, r in enumerate(records, 1):
        problem = _record_problem(r)
        if problem:
            raise ValueError(f"{path}: record {i} {problem}")
    return records


CONFIG_CHECKS: dict[str, tuple[str, Any]] = {  # key: (what it must be, the test); absent or null: not checked
    "dropout": ("a rate in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "train_fraction": ("a fraction in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "lr": ("a finite number >= 0", lambda v: _is_number(v) and 0 <= v < float("inf")),
    "head_lr_mult": ("a finite number >= 0", lambda v: _is_number(v) and 0 <= v < float("inf")),
    "weight_decay": ("a finite number >= 0", lambda v: _is_number(v) and 0 <= v < float("inf")),
    "steps": (f"an integer in 1..{MAX_STEPS}", lambda v: _is_count(v, 1)),
    "eval_every": (f"an integer in 1..{MAX_STEPS}", lambda v: _is_count(v, 1)),
    "average_from": (f"an integer in 0..{MAX_STEPS}", _is_count),
    "resolution": ("an integer in 1..100000", lambda v: _is_count(v, 1, 100_000)),
    "batch_size": ("an integer >= 1", lambda v: _is_count(v, 1, 2**31)),
    "seed": ("an integer", lambda v: _is_count(v, -(2**63), 2**63)),
    "trial_seed": ("an integer", lambda v: _is_count(v, -(2**63), 2**63)),
    "train_stages": ("an integer >= 0", lambda v: _is_count(v, 0, 10_000)),
    **{k: ("true or false", lambda v: isinstance(v, bool))
       for k in ("pretrained", "augment", "val_augment", "freeze_bn", "cache_images", "cache_trunk", "bf16")},
    **{k: ("a string", lambda v: isinstance(v, str)) for k in ("benchmark", "backbone", "head", "weights_file")},
}


def _check_config(path: Path, config: dict) -> None:
    """Every config.json value the report reads, each of its kind (`CONFIG_CHECKS`); with steps and
    eval_every, at most MAX_EVALUATIONS evaluations. A ValueError naming the file, key and value."""
    for key, (what, ok) in CONFIG_CHECKS.items():
        if config.get(key) is not None and not ok(config[key]):
            raise ValueError(f"{path}: {key} is {_short(config[key])}, not {what}")
    steps, every = config.get("steps"), config.get("eval_every")
    if steps is not None and every is not None and steps // every > MAX_EVALUATIONS:
        raise ValueError(f"{path}: steps {steps} evaluated every {every} steps is more than {MAX_EVALUATIONS} "
                         f"evaluations, not a run's")


def _check_meta(run: Path, meta: dict, config: dict) -> None:
    """test_envs (meta.json's, else config.json's): domain indices within meta's domains (-1 or 12
    for 3 domains would name another domain, or none); domains: names; ood_split: "in" or "out"."""
    domains = meta.get("domains")
    if domains is not None and not (isinstance(domains, list) and all(isinstance(d, str) for d in domains)):
        raise ValueError(f"{run / 'meta.json'}: domains is {domains!r}, not a list of names")
    source = "meta.json" if "test_envs" in meta else "config.json"
    test_envs = meta.get("test_envs", config.get("test_envs"))
    if test_envs is not None:
        envs = test_envs if isinstance(test_envs, list) else [test_envs]
        n = len(domains) if domains else MAX_STEPS
        if not envs or not all(_is_count(t, 0, n - 1) for t in envs):
            raise ValueError(f"{run / source}: test_envs is {_short(test_envs)}, not domain indices in 0..{n - 1}"
                             + (f" ({len(domains)} domains)" if domains else ""))
    if meta.get("ood_split", "in") not in ("in", "out"):
        raise ValueError(f"{run / 'meta.json'}: ood_split is {_short(meta['ood_split'])}, not 'in' or 'out'")


def _short(value: Any, n: int = 60) -> str:
    """repr of a value for a message, cut to `n` characters (a huge number has thousands of digits)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= n else text[: n - 3] + "..."


def read_run(run: Path) -> tuple[dict, dict, list[dict]]:
    """(config, meta, records) of one run directory, each checked for shape and for every value the
    report reads: a damaged file (garbage, binary, not a regular file, too large, a malformed line,
    JSON of the wrong shape, an accuracy outside [0, 1], an index outside the domains) is a
    ValueError that names it."""
    config, meta = _json_object(run / "config.json"), _json_object(run / "meta.json")
    _check_config(run / "config.json", config)
    _check_meta(run, meta, config)
    return config, meta, _checked_records(run / "records.jsonl")


def expected_eval_steps(eval_every: int, steps: int, upto: int) -> list[int]:
    """THE steps <= `upto` at which the loop writes an evaluation record: the start (step 0, a
    selection candidate), every `eval_every`, and the last step."""
    out = [0, *range(eval_every, min(upto, steps) + 1, eval_every)]
    if upto >= steps and steps not in out:
        out.append(steps)
    return out


def missing_eval_steps(config: dict, records: list[dict], done: bool) -> list[int]:
    """Evaluation steps the loop must have written (`expected_eval_steps`) but that records.jsonl
    lacks: up to the last step recorded, or to the end for a finished run. A lost or damaged
    records.jsonl shows here."""
    try:
        every, steps = int(config["eval_every"]), int(config["steps"])
    except (KeyError, TypeError, ValueError):
        return []  # written by hand or by an older version: nothing to check against
    have = {r.get("step") for r in records if r.get("type", "eval") == "eval" and "acc" in r}
    upto = steps if done else max((s for s in have if isinstance(s, int)), default=0)
    return [s for s in expected_eval_steps(every, steps, upto) if s not in have]


def readable(value: Any) -> Any:
    """Lists/dicts as short strings, so config columns stay hashable (groupby) and CSV-friendly."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _run_info(run: Path, config: dict, meta: dict, records: list[dict]) -> dict[str, Any] | None:
    test_envs = meta.get("test_envs", config.get("test_envs"))
    if test_envs is None:
        warnings.warn(f"{run}: neither config.json nor meta.json names test_envs, so the held-out "
                      f"domain is unknown; skipped", stacklevel=3)
        return None
    test_envs = [int(t) for t in (test_envs if isinstance(test_envs, (list, tuple)) else [test_envs])]
    domains = list(meta.get("domains") or [])
    failures = [r for r in records if r.get("type") == "failure"]
    info: dict[str, Any] = {
        "run": str(run),
        "benchmark": meta.get("benchmark", config.get("benchmark")),
        "test_env": test_envs[0] if len(test_envs) == 1 else pd.NA,
        "test_envs": readable(test_envs),
        "test_domain": ",".join(domains[t] if t < len(domains) else f"env{t}" for t in test_envs),
        "done": (run / "done").exists(),
        "failed": bool(failures),
        "failure_reason": failures[-1].get("reason", "") if failures else "",
        "missing_steps": readable(missing_eval_steps(config, records, (run / "done").exists())),
        # which split of the held-out domain measures o.o.d. accuracy (see split_scores)
        "ood_split": meta.get("ood_split", "in"),
    }
    # a field added after the run was written: the run used its default (`TrainConfig.ADDED_LATER`),
    # so a table mixing old and new runs has no NaN there, which `groupby` would silently drop
    for k, v in {**added_later_defaults(), **config}.items():
        if k in ("benchmark", "test_envs"):
            continue
        info[k if k not in info and k not in ROW_COLS else f"config_{k}"] = readable(v)
    info["_domains"] = domains
    info["_test_envs"] = set(test_envs)
    return info


def load_runs(paths: Iterable[str | Path], strict: bool = False) -> pd.DataFrame:
    """The tidy long table: one row per (run, step, method, env, split), with `acc`.

    `paths` are run directories or folders searched recursively for records.jsonl. Columns:
    run, benchmark, test_env (int, NA when several), test_envs ("3" or "0,1"), test_domain,
    method ("model" current weights, "wa" trajectory weight average, "ens" trajectory ensemble),
    step, env, domain, split ("in"/"out"), is_test, acc, loss, step_lr (the learning rate at that
    step; `lr` is the config's), train_acc (training-mode accuracy, dropout on, of the training
    batches since the last evaluation), step_time, peak_mem_mb, rel_distance (||theta_t - theta_0|| /
    ||theta_0|| over the trained parameters; NaN in records that predate it), done, failed, failure_reason,
    then every config.json key (list values joined by commas; a key clashing with the columns
    above becomes config_<key>), and missing_steps (evaluations records.jsonl lacks, "" for none).
    A truncated last line (killed writer) is ignored; runs without any eval record are skipped with
    a warning, and so is a damaged run folder (unless `strict`: then it is a ValueError naming it).

    >>> df = load_runs(["outputs/runs"])   # doctest: +SKIP
    >>> df.query("method == 'model' and is_test and split == 'in'").groupby("run").acc.max()  # doctest: +SKIP
    """
    rows: list[tuple] = []
    infos: list[dict[str, Any]] = []
    for run in find_run_dirs(paths):
        try:
            config, meta, records = read_run(run)
            info = _run_info(run, config, meta, records) if records else None
        except (ValueError, TypeError, RecursionError, OverflowError) as e:  # a value of the wrong type or size inside valid JSON
            if strict:
                raise ValueError(f"{run}: damaged run folder: {e}") from None
            warnings.warn(f"{run}: damaged run folder, skipped: {e} (--strict fails instead)", stacklevel=2)
            continue
        evals = [r for r in records if r.get("type", "eval") == "eval" and "acc" in r]
        if not evals:
            why = "it failed before its first evaluation" if any(r.get("type") == "failure" for r in records) \
                else "its records.jsonl is missing although it is done (records lost)" \
                if not (run / "records.jsonl").exists() else "no evaluation recorded yet"
            warnings.warn(f"{run}: {why}; skipped", stacklevel=2)
            continue
        if info is None:
            continue
        domains, test_envs = info.pop("_domains"), info.pop("_test_envs")
        infos.append(info)
        for r in evals:
            for method, accs in r["acc"].items():
                for key, acc in (accs or {}).items():
                    m = _KEY.match(key)
                    if m is None:
                        continue  # e.g. a future extra metric; the tidy table is per split only
                    env, split = int(m.group(1)), m.group(2)
                    rows.append((info["run"], method, int(r["step"]), env,
                                 domains[env] if env < len(domains) else f"env{env}", split,
                                 env in test_envs, float(acc), r.get("loss", np.nan), r.get("lr", np.nan),
                                 r.get("train_acc", np.nan), r.get("step_time", np.nan),
                                 r.get("peak_mem_mb", np.nan), r.get("rel_distance", np.nan)))
    if not infos:
        return pd.DataFrame(columns=["run", *ROW_COLS, *RUN_COLS[1:]])
    long = pd.DataFrame(rows, columns=["run", *ROW_COLS])
    runs = pd.DataFrame(infos)
    df = long.merge(runs, on="run", how="left", validate="many_to_one")
    df["test_env"] = df["test_env"].astype("Int64")
    front = ["run", "benchmark", "test_env", "test_envs", "test_domain", *ROW_COLS,
             "done", "failed", "failure_reason", "missing_steps"]
    return df[front + [c for c in df.columns if c not in front]].reset_index(drop=True)


STATUS_COLS = ["run", "done", "failed", "failure_reason", "n_evals", "last_step", "missing_steps", "records",
               "damaged"]


def run_status(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run directory found: done, failed, reason, number of evaluations, last step,
    missing_steps (evaluations records.jsonl lacks), records (whether records.jsonl exists) and
    damaged (why its files cannot be read, "" when they can).

    Runs that `load_runs` skips (no evaluation yet, failed at once, damaged, records lost) still
    show up here, so a report can say how many runs are missing and why.
    """
    out = []
    for run in find_run_dirs(paths):
        done = (run / "done").exists()
        try:
            config, _, records = read_run(run)
            damaged = ""
        except (ValueError, TypeError, RecursionError, OverflowError) as e:
            config, records, damaged = {}, [], str(e)
        evals = [r for r in records if r.get("type", "eval") == "eval" and "acc" in r]
        fails = [r for r in records if r.get("type") == "failure"]
        out.append({"run": str(run), "done": done, "failed": bool(fails),
                    "failure_reason": fails[-1].get("reason", "") if fails else "",
                    "n_evals": len(evals), "last_step": max((r["step"] for r in evals), default=None),
                    "missing_steps": readable(missing_eval_steps(config, records, done)) if not damaged else "",
                    "records": (run / "records.jsonl").exists(), "damaged": damaged})
    return pd.DataFrame(out, columns=STATUS_COLS)


def split_scores(acc: dict[str, float], test_envs: Iterable[int], ood_split: str = "in") -> dict[str, float]:
    """iid_acc, ood_acc and oracle_acc (test-domain "out") from one `{"env0_in": ..}` dict.

    `ood_split` is "in" (DomainBed's convention) except for benchmarks whose domains show the
    same objects (emoji): there the held-out domain's "in" part holds objects trained on in other
    styles, so o.o.d. is measured on its "out" part (objects never trained on), and the oracle on
    the "in" part. The run's meta.json says which.

    >>> split_scores({"env0_in": .9, "env0_out": .8, "env1_in": .5, "env1_out": .4}, [1])
    {'iid_acc': 0.8, 'ood_acc': 0.5, 'oracle_acc': 0.4}
    """
    test_envs = set(int(t) for t in test_envs)
    parts: dict[str, list[float]] = {"iid_acc": [], "ood_acc": [], "oracle_acc": []}
    for key, a in acc.items():
        m = _KEY.match(key)
        if m is None:
            continue
        env, split = int(m.group(1)), m.group(2)
        if env in test_envs:
            parts["ood_acc" if split == ood_split else "oracle_acc"].append(float(a))
        elif split == IID_SPLIT:
            parts["iid_acc"].append(float(a))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in parts.items()}


def per_step_scores(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, method, step): iid_acc, ood_acc, oracle_acc, fit_acc (see the module
    docstring), and the record's loss, train_acc, rel_distance and step_lr (NaN where absent)."""
    keys = ["run", "method", "step"]
    parts = {
        "iid_acc": df[~df.is_test & (df.split == IID_SPLIT)],
        "ood_acc": df[df.is_test & (df.split == df.ood_split)],
        "oracle_acc": df[df.is_test & (df.split != df.ood_split)],
        "fit_acc": df[~df.is_test & (df.split == FIT_SPLIT)],
    }
    scores = pd.concat({k: v.groupby(keys).acc.mean() for k, v in parts.items()}, axis=1)
    per_record = ["loss", "train_acc", "rel_distance", "step_lr"]
    extra = df.assign(**{c: np.nan for c in per_record if c not in df.columns}).groupby(keys)[per_record].first()
    return scores.join(extra).reset_index()




def validation_score(acc: dict[str, float], train_envs: list[int]) -> float:
    """Training-domain validation (the paper's model selection): the i.i.d. accuracy of
    `split_scores` over the training domains, as the loop scores each evaluation."""
    held_out = {int(k[3:].split("_")[0]) for k in acc if _KEY.match(k)} - set(train_envs)
    return split_scores(acc, held_out)["iid_acc"]
