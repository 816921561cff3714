"""The fine-tuning loop: one config, one function, read top to bottom.

`train(cfg) -> run_dir` runs the paper's protocol (shared/paper.md) for one held-out domain:
3 training domains, batch 32 each, SGD with momentum, weight decay on every parameter, lr x0.1
at half-time, evaluation every 300 steps on the in/out split of every domain, the best
checkpoint by training-domain validation, and, in the same run, the uniform weight average along
the trajectory and the logit ensemble of the evaluated checkpoints.

    python -m vldlib train --benchmark PACS --data-dir data --test-envs 0 --dropout 0.9

The same loop serves the CPU demo: `train_stages`, `resolution` and `cache_trunk` make it small
(train the last stages on cached outputs of the frozen ones), never a second loop.

What the loop reads (batches, cached trunk outputs, predictions) is `vldlib.loop.batches`; its
folder, lock and checkpoints `vldlib.loop.rundir`; the weight average `vldlib.loop.averaging`; the
dropout `vldlib.model.head`; the config `vldlib.config.TrainConfig`. A killed run restarts from last.pt and writes the same records as an uninterrupted one: every
random draw (batch order, augmentation, dropout) is a function of (seed, step), not of history.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: F401  (the step calls F.cross_entropy; tests patch it here)
from tqdm.auto import tqdm

from vldlib import config as config_io
from vldlib.config import TrainConfig
from vldlib.data import load_benchmark
from vldlib.data.splits import out_files
from vldlib.evaluate.combine import NOT_KEPT_FIX, WeightsNotKept, weights_kept
from vldlib.evaluate.scores import accuracies, ood_split, validation_score
from vldlib.loop.averaging import AveragedTrainable, refresh_bn_statistics  # noqa: F401  (tests import it from here)
from vldlib.loop.batches import bn_inputs, make_data, predict_all, train_batches, trunk_features
from vldlib.loop.device import cpu_plan, peak_memory_mb, resolve_device
from vldlib.loop.rundir import (  # noqa: F401
    ResumeRefused,
    RunOutputError,
    TrainingDiverged,
    check_records_reach,
    check_same_data,
    data_fingerprint,
    ends_with_newline,
    frozen_fingerprint,
    load_checkpoint,
    restore_state,
    resume_state,
    run_dir_for,
    run_lock,
    save_checkpoint,
    writing,
)
from vldlib.loop.step import TrainStep
from vldlib.model import FineTuneNet, build_net, create_model, data_config, weights_fingerprint
from vldlib.utils import (
    StopRequested,
    append_jsonl,
    check_stop,
    read_json,
    read_jsonl,
    seed_hash,
    write_json_atomic,
    write_text_atomic,
)


def first_non_finite(losses: list[torch.Tensor]) -> int | None:
    """Index of the first NaN/inf among recent losses (one device sync for all of them)."""
    bad = (~torch.isfinite(torch.stack(losses))).nonzero()
    return int(bad[0]) if len(bad) else None



class DistanceFromStart:
    """||theta - theta_0|| / ||theta_0|| over the trained parameters: how far fine-tuning moved the
    weights, relative to where they started (the paper's near-linear premise: a pretrained network
    fine-tuned on little data moves little). Calling it reads the network's current weights."""

    def __init__(self, net: torch.nn.Module):
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.norm = float(torch.sqrt(sum((s.double() ** 2).sum() for s in self.start)))

    def __call__(self) -> float:
        with torch.no_grad():
            sq = sum(((p.detach() - s).double() ** 2).sum() for p, s in zip(self.params, self.start))
        return float(torch.sqrt(sq)) / self.norm if self.norm > 0 else float("nan")


def start_fingerprint(model: torch.nn.Module, train_stages: int | None) -> str:
    """The fingerprint of a run's start, which across-run soups require to be equal. It covers the
    classifier, whose seeded init differs between seeds, except for a head-only run: a linear
    classifier on frozen features is linear in its weights, so averaging heads from any starts is
    averaging their logits (a soup there is an ensemble). With any trained stage below the head,
    heads from different starts meet a body that moved with each, and the average is no longer
    the runs' ensemble: those runs are refused."""
    linear = train_stages == 0
    return weights_fingerprint(model, exclude=model.get_classifier() if linear else None)


def build_run_net(cfg: TrainConfig, num_classes: int, device: torch.device) -> tuple[FineTuneNet, dict, str]:
    """The network a run starts from, its input normalisation, and the fingerprint of its start.

    Seeded, so every run (and `vldlib.tools.bench`, which times this same network) starts alike.
    """
    torch.manual_seed(seed_hash(cfg.seed, "init"))
    model = create_model(cfg.backbone, num_classes, pretrained=cfg.pretrained, dropout=cfg.dropout,
                         weights_file=cfg.weights_file)
    net = build_net(model, cfg.head, cfg.train_stages, cfg.freeze_bn).to(device)
    init_fingerprint = start_fingerprint(model, cfg.train_stages)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, data_config(model), init_fingerprint


def train(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None,
          report_phase: Callable[[str], None] | None = None) -> Path:
    """Run (or resume, or skip if finished) one fine-tuning run; returns its directory.

    `should_stop` (e.g. a threading.Event's is_set; the explorer's stop button) is asked in every
    phase, at most a batch apart: while images are checked, before the network is built, while the
    frozen-trunk outputs are computed, while waiting for a lock, and before each step. When it says
    yes the run returns unfinished, resumable from its last checkpoint (evaluation), and what the
    preparation finished (checked images, computed trunk outputs) is kept for the next start. An
    evaluation under way is finished first: it is what saves the steps before it.
    `report_phase(name)` is called as each phase starts ("loading the benchmark", ..., "training"),
    for a caller that shows what a run is doing before its first evaluation."""
    cfg = cfg.resolved()  # the benchmark's steps and evaluation interval where they were left unset
    cfg.validate()
    run_dir = run_dir_for(cfg)
    try:
        return _train(cfg, run_dir, should_stop, report_phase or (lambda _phase: None))
    except StopRequested:  # raised by a phase of the preparation (the step loop returns by itself)
        print(f"[vldlib] stopped while preparing {run_dir} (nothing trained yet in this start)")
        return run_dir


def _train(cfg: TrainConfig, run_dir: Path, should_stop: Callable[[], bool] | None,
           report_phase: Callable[[str], None]) -> Path:
    """`train`'s body. A stop asked during the preparation raises `StopRequested` out of it (from
    any depth: image checks, trunk outputs, a lock); the step loop returns by itself."""
    if (run_dir / "done").exists():
        print(f"[vldlib] already finished: {run_dir} (delete its 'done' file to run it again)")
        return run_dir
    records_path = run_dir / "records.jsonl"
    old = read_jsonl(records_path)
    if old and old[-1].get("type") == "failure":
        raise TrainingDiverged(f"{run_dir} failed earlier at step {old[-1]['step']}: {old[-1]['reason']} "
                               f"Delete the folder to retry, or change the config (e.g. a lower --lr).")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda" and cfg.cudnn_benchmark

    # --- model: pretrained backbone, dropout on the penultimate features, frozen BN
    report_phase("loading the benchmark")
    bench = load_benchmark(cfg.benchmark, cfg.data_dir, skip_bad=cfg.skip_bad, progress=cfg.progress,
                           should_stop=should_stop)
    fingerprint = data_fingerprint(bench)
    check_same_data(run_dir, read_json(run_dir / "meta.json"), fingerprint)  # before anything is written
    check_stop(should_stop)
    report_phase("building the network")
    net, norm, init_fingerprint = build_run_net(cfg, len(bench.classes), device)
    moved = DistanceFromStart(net)  # the start, before a checkpoint is loaded into the net
    frozen = frozen_fingerprint(net.model)  # what a last.pt without the frozen parameters resumes onto

    # --- data: per-domain training sets and every eval split (optionally as cached trunk outputs)
    data = make_data(cfg, bench, norm["mean"], norm["std"])
    # torch threads and loader workers that together fit the cores (see cpu_plan)
    loads_with_workers = cfg.augment_on == "workers" and not cfg.cache_trunk
    torch.set_num_threads(cpu_plan(cfg.num_workers if loads_with_workers else 0, cfg.num_threads, len(data.train))[0])
    held_out_split = ood_split(bench)  # which part of a held-out domain measures o.o.d. accuracy
    check_stop(should_stop)
    if cfg.cache_trunk:
        report_phase("computing the frozen-trunk outputs (cached for later runs)")
    features = trunk_features(net, data, cfg, device, should_stop) if cfg.cache_trunk else None
    forward = net.tail if features is not None else net
    # compiled for training only: evaluation (eval mode) would compile a second graph for little gain
    train_forward = torch.compile(forward, dynamic=False) if cfg.compile else forward

    # --- optimiser (SGD, momentum, weight decay on every parameter, step decay) and weight average
    sgd = TrainStep(net, cfg, train_forward)
    optimizer, scheduler, averaged = sgd.optimizer, sgd.scheduler, sgd.averaged
    ensemble_logits: dict[str, torch.Tensor] = {}
    best_score, start = -1.0, 0

    # --- one process per run: a second one (two notebooks sharing runs) waits here, then
    # finds the run done, or resumes it from where the first stopped
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    check_stop(should_stop)
    with run_lock(run_dir, should_stop) as waited:
        if waited and (run_dir / "done").exists():
            print(f"[vldlib] finished meanwhile by another process: {run_dir}")
            return run_dir
        old = read_jsonl(records_path) if waited else old
        for orphan in run_dir.glob(".*.tmp"):  # half-written by a killed process (atomic_path); ours now
            orphan.unlink(missing_ok=True)
        if waited and old and old[-1].get("type") == "failure":
            raise TrainingDiverged(f"{run_dir} failed in another process at step {old[-1]['step']}: "
                                   f"{old[-1]['reason']} Delete the folder to retry, or change the config.")

        # --- resume from the last checkpoint; drop records written after it
        if (run_dir / "last.pt").exists():
            ckpt = load_checkpoint(run_dir / "last.pt")
            check_records_reach(records_path, old, cfg, ckpt["step"])  # before anything is rewritten
            restore_state(net.model, ckpt["model"], ckpt.get("frozen"), run_dir / "last.pt")
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            restore_state(averaged, ckpt["averaged"], None, run_dir / "last.pt")  # a copy of the start just checked
            ensemble_logits, best_score, start = ckpt["ensemble_logits"], ckpt["best_score"], ckpt["step"]
            kept = [r for r in old if r.get("step", 0) <= start]
            # Also rewrite when a kill left half a line: the next append would be glued to it.
            if len(kept) != len(old) or not ends_with_newline(records_path):
                with writing(records_path):
                    write_text_atomic(records_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            print(f"[vldlib] resuming {run_dir} from step {start}")
        elif records_path.exists():  # records (or half a line) but no checkpoint: killed before the first one
            records_path.unlink()
        with writing(run_dir / "config.json"):
            write_json_atomic(run_dir / "config.json", asdict(cfg))
        with writing(run_dir / "meta.json"):
            write_json_atomic(run_dir / "meta.json", {
                "benchmark": bench.name, "domains": data.domains, "classes": data.classes, "test_envs": cfg.test_envs,
                "train_envs": data.train_envs, "ood_split": held_out_split,
                "split_sizes": {k: len(v) for k, v in data.evals.items()}, "data_fingerprint": fingerprint,
                "out_files": out_files(bench, cfg.trial_seed, cfg.holdout),  # check the split against DomainBed's
                "init_fingerprint": init_fingerprint, "device": str(device), "python": platform.python_version(),
                "torch": torch.__version__, "num_params": sum(p.numel() for p in net.parameters()),
                "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad)})

        bar = tqdm(total=cfg.steps, initial=start, desc=run_dir.name, disable=not cfg.progress, dynamic_ncols=True)

        def evaluate(done_steps: int, interval: dict | None) -> None:
            """Evaluate the current weights (and, from `average_from`, the weight average and the
            logit ensemble); append the record; save best.pt when validation improves (unless
            `save_weights` is off), and last.pt (the resume state, whatever `save_weights`).
            `interval`: the training statistics since the last evaluation (None at step 0)."""
            nonlocal best_score
            net.eval()
            preds = predict_all(forward, data.evals, cfg, device, features)
            acc = {"model": accuracies(preds)}
            if done_steps >= max(1, cfg.average_from):  # the average and the ensemble start after an update
                if cfg.freeze_bn and int(averaged.n_averaged) == 1:
                    # averaged once, at this very step (it updates at every step from average_from):
                    # the average is the current network, frozen BatchNorm statistics included, so its
                    # predictions are those just made. One pass over the evaluation data saved: 1 in
                    # 13 of a quickstart run's, which are 20% of its time
                    acc["wa"] = dict(acc["model"])
                else:
                    averaged.eval()
                    wa_forward = averaged.module.tail if features is not None else averaged.module
                    if not cfg.freeze_bn:  # BatchNorm statistics of the averaged weights, not the current ones'
                        refresh_bn_statistics(averaged.module, wa_forward, bn_inputs(data, cfg, features), device)
                    acc["wa"] = accuracies(predict_all(wa_forward, data.evals, cfg, device, features))
                for k, (lg, y_k) in preds.items():
                    ensemble_logits[k] = ensemble_logits.get(k, torch.zeros_like(lg)) + lg
                acc["ens"] = accuracies({k: (ensemble_logits[k], preds[k][1]) for k in preds})
            net.train()
            # step 0 (the official code evaluates it too, and it is a selection candidate) has no
            # training statistics; `lr` is the rate the optimizer used at this step (at step 0: the first)
            record = {"type": "eval", "step": done_steps, "acc": acc, "peak_mem_mb": peak_memory_mb(device),
                      "lr": cfg.lr if interval is None else interval["lr"], "rel_distance": moved()}
            if interval is not None:
                record.update(loss=interval["loss"], train_acc=interval["train_acc"], step_time=interval["step_time"])
            score = validation_score(acc["model"], data.train_envs)
            if score > best_score:
                best_score = score
                if cfg.save_weights:
                    save_checkpoint(run_dir / "best.pt", {"model": net.model.state_dict(), "step": done_steps,
                                                          "config": asdict(cfg), "score": score})
                else:  # one written before a resume without weights is no longer the best: never left stale
                    with writing(run_dir / "best.pt"):
                        (run_dir / "best.pt").unlink(missing_ok=True)
            with writing(records_path):
                append_jsonl(records_path, record)
            # the whole weights only where a finished run keeps last.pt (load_run_model reads them);
            # otherwise what training changed, over the start a resume builds again (resume_state)
            whole = cfg.keep_last and done_steps == cfg.steps
            save_checkpoint(run_dir / "last.pt", {
                "model": net.model.state_dict() if whole else resume_state(net.model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "averaged": averaged.state_dict() if whole else resume_state(averaged),
                "frozen": frozen, "ensemble_logits": ensemble_logits, "best_score": best_score,
                "step": done_steps, "config": asdict(cfg)})
            bar.set_postfix(val=f"{score:.3f}", **({} if interval is None else {"loss": f"{interval['loss']:.3f}"}),
                            test=f"{np.mean([acc['model'][f'env{t}_{held_out_split}'] for t in cfg.test_envs]):.3f}")

        check_stop(should_stop)
        if start == 0 and not (run_dir / "last.pt").exists():
            report_phase("evaluating the start")
            evaluate(0, None)  # the pretrained start: a selection candidate, as in the official code
        # Running sums stay on the device: reading a GPU value each step would stall the pipeline.
        # For the same reason the finiteness check reads the recent losses in batches on a GPU.
        check_every = 1 if device.type == "cpu" else 25
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        loss_sum, correct, seen, recent = zero(), zero(), 0, []
        t_interval, last_eval = time.perf_counter(), start
        report_phase("training")
        net.train()
        for step, batch in enumerate(train_batches(data, cfg, start, device, features), start=start):
            if should_stop is not None and should_stop():  # stopped by the caller: resumes from last.pt
                bar.close()
                return run_dir
            # one SGD step on the concatenated per-domain batches; every random draw seeded by the step
            loss, logits, y = sgd.loss(step, batch)
            recent.append(loss.detach())
            at_eval = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
            bad = first_non_finite(recent) if len(recent) >= check_every or at_eval else None
            if bad is not None:
                bad_step, bad_loss = step - len(recent) + 1 + bad, recent[bad].item()
                reason = f"non-finite loss ({bad_loss}) at step {bad_step}; lr {cfg.lr} is probably too high."
                with writing(records_path):
                    append_jsonl(records_path, {"type": "failure", "step": bad_step, "reason": reason})
                bar.close()
                raise TrainingDiverged(f"{run_dir}: {reason} A failure record was written.")
            done_steps = step + 1
            lr_used = optimizer.param_groups[-1]["lr"] / cfg.head_lr_mult  # before the scheduler moves it
            sgd.update(loss, done_steps)
            if len(recent) >= check_every or at_eval:
                recent.clear()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.update(1)

            if done_steps % cfg.eval_every and done_steps != cfg.steps:
                continue
            # --- evaluate the current weights, the weight average and the logit ensemble
            n_interval = done_steps - last_eval
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the queued steps belong to this interval's time
            step_time = (time.perf_counter() - t_interval) / max(1, n_interval)
            evaluate(done_steps, {"loss": loss_sum.item() / max(1, n_interval), "lr": lr_used,
                                  "train_acc": correct.item() / max(1, seen), "step_time": step_time})
            loss_sum, correct, seen, t_interval, last_eval = zero(), zero(), 0, time.perf_counter(), done_steps
        bar.close()
        if not cfg.keep_last and cfg.save_weights:  # the final weights only (soups of the last weights read them)
            save_checkpoint(run_dir / "final.pt", {"model": net.model.state_dict(), "step": cfg.steps,
                                                   "config": asdict(cfg)})
        # `done` before removing last.pt: a kill between the two leaves a finished run with a spare
        # last.pt, never a run without last.pt that would restart from scratch
        with writing(run_dir / "done"):
            write_text_atomic(run_dir / "done", time.strftime("%Y-%m-%d %H:%M:%S\n"))
        if not cfg.keep_last:
            (run_dir / "last.pt").unlink(missing_ok=True)
        if not cfg.save_weights:  # resumed from a part trained with weights: none of them is this run's
            for name in ("best.pt", "final.pt"):
                (run_dir / name).unlink(missing_ok=True)
        return run_dir


# ----------------------------------------------------------------------------- reuse of finished runs
def weights_file(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """The file holding a run's weights at its best (training-domain validation) or last checkpoint
    (`which` "best": best.pt; "last": final.pt, the final weights of a run that did not keep last.pt,
    or last.pt). `WeightsNotKept` naming the run folder, why and the fix when there is none: a run
    trained with save_weights=False keeps records.jsonl only."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' (best.pt) or 'last' (the final weights), got {which!r}")
    run_dir = Path(run_dir)
    # final.pt first: a run that keeps it may hold a spare last.pt (killed before removing it)
    candidates = [run_dir / "best.pt"] if which == "best" else [run_dir / "final.pt", run_dir / "last.pt"]
    found = next((p for p in candidates if p.exists()), None)
    if found is not None:
        return found
    names = " or ".join(p.name for p in candidates)
    if not (run_dir / "config.json").exists():
        raise WeightsNotKept(f"{run_dir}: no {names} and no config.json: not a run folder, or a run not started; "
                             f"train it first (vldlib.loop.train).")
    if not weights_kept(run_dir):
        raise WeightsNotKept(f"{run_dir}: no {names}: the run was trained with save_weights=False (its "
                             f"config.json), which keeps records.jsonl only. {NOT_KEPT_FIX}")
    state = "finished" if (run_dir / "done").exists() else "not finished"
    raise WeightsNotKept(f"{run_dir}: no {names} (the run is {state}): the file was removed, or part of the run "
                         f"was trained with save_weights=False. Delete {run_dir} and train it again with "
                         f"save_weights=True (the default) to get its weights.")


def load_run_model(run_dir: str | os.PathLike, which: str = "best") -> tuple[FineTuneNet, dict]:
    """The network of a run at its best (training-domain validation) or last checkpoint (`which`;
    see `weights_file`, whose error names the run and the fix when it kept no weights)."""
    run_dir = Path(run_dir)
    path = weights_file(run_dir, which)
    cfg = config_io.load_file(TrainConfig, run_dir / "config.json")
    meta = json.loads((run_dir / "meta.json").read_text())
    ckpt = load_checkpoint(path)
    model = create_model(cfg.backbone, len(meta["classes"]), pretrained=False, dropout=cfg.dropout)
    net = build_net(model, cfg.head, cfg.train_stages, cfg.freeze_bn)
    if path.name == "last.pt" and not set(net.model.state_dict()) <= set(ckpt["model"]):
        # an unfinished run's last.pt holds its trained part (resume_state): put it over its start
        net = build_run_net(cfg, len(meta["classes"]), torch.device("cpu"))[0]
        restore_state(net.model, ckpt["model"], ckpt.get("frozen"), path)
    else:
        net.model.load_state_dict(ckpt["model"])
    net.eval()
    return net, asdict(cfg)


def evaluate_logits(net: FineTuneNet, cfg: dict | TrainConfig, device: str = "auto"
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits and labels of every (domain, split) of the run's benchmark, for soups and ensembles."""
    if isinstance(cfg, dict):
        cfg = config_io.from_dict(TrainConfig, cfg)
    dev = resolve_device(device)
    norm = data_config(net.model)
    bench = load_benchmark(cfg.benchmark, cfg.data_dir, skip_bad=cfg.skip_bad, progress=False)
    data = make_data(cfg, bench, norm["mean"], norm["std"])
    net = net.to(dev).eval()
    if cfg.cache_trunk:
        features = trunk_features(net, data, cfg, dev)
        return predict_all(net.tail, data.evals, cfg, dev, features)
    return predict_all(net, data.evals, cfg, dev)
