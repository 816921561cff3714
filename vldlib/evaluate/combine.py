"""Across-run weight averages (uniform and greedy model soups, DiWA) and logit ensembles.

The paper compares very large dropout with these "across runs" baselines: average the weights
of several fine-tuned runs (possible because they all start from the same pretrained weights, so
they stay in one linearly connected basin) or sum their logits. Both need the runs to see the
same data splits; weight averaging also needs the same architecture and initialisation, which is
what meta.json's `init_fingerprint` records. Incompatible runs are refused, naming them.

This module sits below the training loop (layers: `vldlib.evaluate` never imports `vldlib.loop`):
it is handed two callables,
    load_fn(run_dir, which="best") -> (torch.nn.Module, config_dict)   e.g. vldlib.loop.load_run_model
    eval_fn(model, config_dict)    -> {"env0_in": (logits, labels), "env0_out": ..., ...}
                                                                       e.g. vldlib.loop.evaluate_logits
so tests (and other training code) can inject their own; `vldlib.experiments.notebook.across_runs`
passes the loop's.

Example:
    >>> from vldlib.loop import evaluate_logits, load_run_model                          # doctest: +SKIP
    >>> soup = greedy_soup(runs, load_fn=load_run_model, eval_fn=evaluate_logits)       # doctest: +SKIP
    >>> soup["members"], soup["ood_acc"]                               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from vldlib.config import TrainConfig
from vldlib.evaluate.scores import accuracies, ood_split, readable, split_scores
from vldlib.utils import read_json

LoadFn = Callable[..., "tuple[nn.Module, dict[str, Any]]"]
EvalFn = Callable[[nn.Module, dict[str, Any]], "dict[str, tuple[torch.Tensor, torch.Tensor]]"]

# what must agree across runs: the evaluation data (benchmark, held-out envs, split seed and
# fraction) for any combination; the architecture, what was trained, the input size and the
# starting point as well for weight averaging
ENSEMBLE_KEYS = ("benchmark", "test_envs", "trial_seed", "holdout", "train_fraction")  # the last: training envs' "in"
SOUP_KEYS = ENSEMBLE_KEYS + ("backbone", "head", "train_stages", "resolution", "init_fingerprint")
# runs written before a field existed used its default
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.name in ("holdout", "head", "train_stages", "resolution", *TrainConfig.ADDED_LATER)}
WHICH = ("best", "last")  # best.pt (DiWA's choice) or the final weights (the paper's Fig 1)


# --------------------------------------------------------------------------- compatibility

class WeightsNotKept(FileNotFoundError):
    """A run's weights are needed (a soup, an ensemble across runs, an analysis of the network) but
    it did not keep them: trained with `save_weights=False` (records only), or its file was removed."""


NOT_KEPT_FIX = ("To use their weights, train them again with save_weights=True (the default): delete these run "
                "folders, or give the study another runs_dir (--out), and run it again; studies that read only "
                "records.jsonl (the quickstart, the effect map) use them as they are.")


def weights_kept(run: str | Path) -> bool:
    """Whether a run was trained to keep its weights: its config.json's `save_weights` (runs
    written before the field existed kept them)."""
    return read_json(Path(run) / "config.json").get("save_weights", True) is not False


def check_weights_kept(run_dirs: Iterable[str | Path], what: str = "combined") -> None:
    """Refuse, before any weights are read, runs trained with save_weights=False: one
    `WeightsNotKept` naming every such run folder and the fix."""
    missing = [str(r) for r in run_dirs if not weights_kept(r)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsNotKept(f"{len(missing)} run(s) kept no weights, so they cannot be {what}: {shown}. They were "
                             f"trained with save_weights=False (their config.json), which keeps records.jsonl "
                             f"only. {NOT_KEPT_FIX}")


def _run_facts(run: Path) -> dict[str, Any]:
    """config.json then meta.json (which wins: it records what the run actually did)."""
    return {**_DEFAULTS, **read_json(run / "config.json"), **read_json(run / "meta.json")}


def check_compatible(run_dirs: Sequence[str | Path], keys: Sequence[str] = SOUP_KEYS) -> dict[str, Any]:
    """The shared values of `keys` across the runs' config.json/meta.json; ValueError naming the
    runs otherwise (or when a run lacks a key, e.g. a meta.json without init_fingerprint).

    >>> check_compatible(["runs/a", "runs/b"])   # doctest: +SKIP
    {'benchmark': 'PACS', 'test_envs': '3', 'trial_seed': 0, 'backbone': ..., 'init_fingerprint': ...}
    """
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("no runs given to combine")
    if len(set(runs)) != len(runs):
        dup = sorted({str(r) for r in runs if runs.count(r) > 1})
        raise ValueError(f"runs listed twice: {', '.join(dup)}; each run may enter a soup or ensemble once")
    facts = {r: _run_facts(r) for r in runs}
    shared: dict[str, Any] = {}
    problems = []
    for key in keys:
        missing = [str(r) for r in runs if key not in facts[r]]
        if missing:
            problems.append(f"no {key!r} in config.json/meta.json of: {', '.join(missing)} "
                            f"(incomplete run directory? retrain it with vldlib.loop.train)")
            continue
        groups: dict[str, list[str]] = {}
        for r in runs:
            groups.setdefault(json.dumps(facts[r][key], sort_keys=True), []).append(str(r))
        if len(groups) > 1:
            problems.append(f"{key} differs: " + "; ".join(f"{v} in {', '.join(rs)}" for v, rs in groups.items()))
        else:
            shared[key] = readable(facts[runs[0]][key])
    if problems:
        why = ("weight averaging needs runs with one architecture and one initialisation, evaluated on the "
               "same splits" if "init_fingerprint" in keys else "an ensemble needs runs evaluated on the same splits")
        raise ValueError(f"cannot combine these runs ({why}): " + " | ".join(problems))
    return shared


# --------------------------------------------------------------------------- weight averaging

class StateDictAverage:
    """Running sum of state dicts: float tensors are averaged (in float64 on the CPU, cast back
    to their dtype), integer and bool buffers (BatchNorm's num_batches_tracked) are kept from
    the first member, since averaging a counter means nothing.

    >>> avg = StateDictAverage(); avg.add({"w": torch.tensor([0.])}); avg.add({"w": torch.tensor([2.])})
    >>> avg.average()["w"]
    tensor([1.])
    """

    def __init__(self) -> None:
        self.sum: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def _check(self, sd: dict[str, torch.Tensor], name: str) -> None:
        if not self.first:
            return
        if set(sd) != set(self.first):
            diff = sorted(set(sd) ^ set(self.first))[:5]
            raise ValueError(f"{name}: its weights have other names than {self.names[0]}'s (e.g. {diff}); "
                             f"only runs of one architecture can be averaged")
        bad = [k for k in sd if sd[k].shape != self.first[k].shape]
        if bad:
            raise ValueError(f"{name}: tensor shapes differ from {self.names[0]}'s for {bad[:5]} "
                             f"(different number of classes?); these runs cannot be averaged")

    @staticmethod
    def _sum(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: a[k] + b[k].detach().to("cpu", torch.float64) for k in a}

    def add(self, sd: dict[str, torch.Tensor], name: str = "") -> None:
        name = name or f"member {len(self.names)}"
        self._check(sd, name)
        if not self.first:
            self.first = {k: v.detach().to("cpu").clone() for k, v in sd.items()}
            self.sum = {k: v.detach().to("cpu", torch.float64).clone() for k, v in sd.items()
                        if v.is_floating_point()}
        else:
            self.sum = self._sum(self.sum, sd)
        self.names.append(name)

    def average(self, extra: dict[str, torch.Tensor] | None = None, name: str = "") -> dict[str, torch.Tensor]:
        """The average, or the average with `extra` included (without adding it: greedy soups try)."""
        if not self.first:
            raise ValueError("no state dict added yet")
        total, n = self.sum, len(self.names)
        if extra is not None:
            self._check(extra, name or "candidate")
            total, n = self._sum(self.sum, extra), n + 1
        return {k: (total[k] / n).to(v.dtype) if k in total else v.clone() for k, v in self.first.items()}


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]],
                        names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts (see `StateDictAverage` for what is averaged)."""
    avg = StateDictAverage()
    for i, sd in enumerate(state_dicts):
        avg.add(sd, names[i] if names else "")
    return avg.average()


# --------------------------------------------------------------------------- evaluation helpers

def _test_envs(cfg: dict[str, Any]) -> list[int]:
    t = cfg.get("test_envs", [])
    return [int(x) for x in (t if isinstance(t, (list, tuple)) else [t])]


def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be 'best' (each run's best.pt) or 'last' (its final weights), got {which!r}")


def _result(method: str, members: Sequence[Path], candidates: Sequence[Path], acc: dict[str, float],
            cfg: dict[str, Any], shared: dict[str, Any], which: str, **extra: Any) -> dict[str, Any]:
    return {"method": method, "members": [str(m) for m in members], "candidates": [str(c) for c in candidates],
            "which": which, "acc": acc, **split_scores(acc, _test_envs(cfg), ood_split(cfg.get("benchmark", ""))), "shared": shared, **extra}


def _shared_config(runs: Sequence[Path]) -> dict[str, Any]:
    """config.json keys whose value is the same in every run (dropout, backbone, ...)."""
    facts = [read_json(r / "config.json") for r in runs]
    shared = {k: readable(v) for k, v in facts[0].items() if all(k in f and f[k] == v for f in facts[1:])}
    meta = read_json(runs[0] / "meta.json")
    domains = list(meta.get("domains") or [])
    t = _test_envs(meta if "test_envs" in meta else facts[0])
    shared["test_domain"] = ",".join(domains[i] if i < len(domains) else f"env{i}" for i in t)
    if "benchmark" in meta:
        shared["benchmark"] = meta["benchmark"]
    return shared


# --------------------------------------------------------------------------- public recipes

def uniform_soup(run_dirs: Iterable[str | Path], which: str = "best", *, load_fn: LoadFn,
                 eval_fn: EvalFn) -> dict[str, Any]:
    """Average the weights of all runs (uniform soup, DiWA) and evaluate the average.

    Returns {"method": "soup_uniform", "members", "acc": {"env0_in": ..}, "iid_acc", "ood_acc",
    "oracle_acc", "shared": the config values common to all members, ...}.
    """
    _check_which(which)
    runs = [Path(r) for r in run_dirs]
    check_weights_kept(runs, "averaged into a soup")
    check_compatible(runs, SOUP_KEYS)
    avg, base, base_cfg = StateDictAverage(), None, None
    for run in runs:
        model, cfg = load_fn(run, which)
        avg.add(model.state_dict(), str(run))
        if base is None:
            base, base_cfg = model, cfg
        del model  # keep one model in memory, however many runs
    base.load_state_dict(avg.average())
    acc = accuracies(eval_fn(base, base_cfg))
    return _result("soup_uniform", runs, runs, acc, base_cfg, _shared_config(runs), which)


def greedy_soup(run_dirs: Iterable[str | Path], which: str = "best", *, load_fn: LoadFn,
                eval_fn: EvalFn, scores: dict[str, float] | None = None) -> dict[str, Any]:
    """Greedy soup (Wortsman et al. 2022): sort runs by training-domain validation accuracy,
    best first; add each run only if the soup's validation (i.i.d.) accuracy does not drop.

    Only i.i.d. validation accuracy guides the choice, never the held-out domain. `scores`
    ({run_dir: iid accuracy}) skips evaluating each run alone (e.g. pass `select(...)`'s
    iid_acc); otherwise every run is evaluated first. The result adds "scores" and "history"
    ([{"run", "soup_iid_acc", "added"}]) to `uniform_soup`'s keys.
    """
    _check_which(which)
    runs = [Path(r) for r in run_dirs]
    check_weights_kept(runs, "averaged into a soup")
    check_compatible(runs, SOUP_KEYS)
    if scores is None:
        scores = {}
        for run in runs:
            model, cfg = load_fn(run, which)
            scores[str(run)] = split_scores(accuracies(eval_fn(model, cfg)), _test_envs(cfg), ood_split(cfg.get("benchmark", "")))["iid_acc"]
            del model
    else:
        scores = {str(k): float(v) for k, v in scores.items()}
        missing = [str(r) for r in runs if str(r) not in scores]
        if missing:
            raise ValueError(f"greedy_soup: no score given for {', '.join(missing)}; pass scores for every run "
                             f"or scores=None to evaluate them")
    order = sorted(runs, key=lambda r: -scores[str(r)])  # stable: ties keep the given order
    base, base_cfg = load_fn(order[0], which)
    avg = StateDictAverage()
    avg.add(base.state_dict(), str(order[0]))
    acc = accuracies(eval_fn(base, base_cfg))
    best = split_scores(acc, _test_envs(base_cfg), ood_split(base_cfg.get("benchmark", "")))["iid_acc"]
    history = [{"run": str(order[0]), "soup_iid_acc": best, "added": True}]
    members = [order[0]]
    for run in order[1:]:
        model, _ = load_fn(run, which)
        sd = model.state_dict()
        base.load_state_dict(avg.average(extra=sd, name=str(run)))
        cand = accuracies(eval_fn(base, base_cfg))
        cand_iid = split_scores(cand, _test_envs(base_cfg), ood_split(base_cfg.get("benchmark", "")))["iid_acc"]
        added = cand_iid >= best
        history.append({"run": str(run), "soup_iid_acc": cand_iid, "added": bool(added)})
        if added:
            avg.add(sd, str(run))
            members.append(run)
            best, acc = cand_iid, cand
        del model, sd
    base.load_state_dict(avg.average())  # leave the model as the final soup, for callers that reuse it
    return _result("soup_greedy", members, order, acc, base_cfg, _shared_config(members), which,
                   scores=scores, history=history)


def logit_ensemble(run_dirs: Iterable[str | Path], which: str = "best", *, load_fn: LoadFn,
                   eval_fn: EvalFn) -> dict[str, Any]:
    """Sum the logits of all runs (the paper's output ensemble) and score the sum.

    Runs need the same evaluation data (benchmark, held-out envs, split seed), not the same
    architecture or initialisation. Same return keys as `uniform_soup`, method "ens_runs".
    """
    _check_which(which)
    runs = [Path(r) for r in run_dirs]
    check_weights_kept(runs, "ensembled")
    check_compatible(runs, ENSEMBLE_KEYS)
    total: dict[str, torch.Tensor] = {}
    labels: dict[str, torch.Tensor] = {}
    first_cfg = None
    for run in runs:
        model, cfg = load_fn(run, which)
        outputs = eval_fn(model, cfg)
        del model
        if first_cfg is None:
            first_cfg = cfg
            total = {k: lg.detach().to("cpu", torch.float64) for k, (lg, _) in outputs.items()}
            labels = {k: lb.detach().cpu() for k, (_, lb) in outputs.items()}
            continue
        if set(outputs) != set(total):
            raise ValueError(f"{run}: evaluated on splits {sorted(outputs)}, but {runs[0]} on {sorted(total)}")
        for k, (lg, lb) in outputs.items():
            if lg.shape != total[k].shape or not torch.equal(lb.detach().cpu(), labels[k]):
                raise ValueError(f"{run}: split {k} has other examples or labels than in {runs[0]}; "
                                 f"the ensemble needs identical evaluation sets (same data_dir and trial_seed)")
            total[k] += lg.detach().to("cpu", torch.float64)
    acc = accuracies({k: (total[k], labels[k]) for k in total})
    return _result("ens_runs", runs, runs, acc, first_cfg, _shared_config(runs), which)


def soup_frame(results: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Soup/ensemble results as rows shaped like `vldlib.evaluate.selection.select`'s, to concatenate with it.

    Each row: run ("<method> of N runs"), method (suffixed "_last" for the members' final weights,
    so tables and plots keep them apart from best.pt's), which, iid_acc, ood_acc, oracle_acc, n_members, and
    the config values shared by the members (benchmark, dropout, test_envs, ...; test_env when
    single). Values that differ across members (seed, lr, ...) are absent (NaN after concat).

    >>> sel_all = pd.concat([select(df), soup_frame([uniform_soup(runs)])])   # doctest: +SKIP
    """
    rows = []
    for r in results:
        row = dict(r.get("shared", {}))
        t = _test_envs({"test_envs": [int(x) for x in str(row.get("test_envs", "")).split(",") if x != ""]})
        method = r["method"] + ("_last" if r.get("which") == "last" else "")  # final weights: their own rows
        row.update({"run": f"{method} of {len(r['members'])} runs", "method": method,
                    "selection": r.get("which", ""), "which": r.get("which", ""), "iid_acc": r["iid_acc"], "ood_acc": r["ood_acc"],
                    "oracle_acc": r.get("oracle_acc"), "n_members": len(r["members"]),
                    "test_env": t[0] if len(t) == 1 else pd.NA})
        rows.append(row)
    return pd.DataFrame(rows)
