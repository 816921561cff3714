"""The fine-tuning loop: one config, one function, read top to bottom.

`train(cfg) -> run_dir` runs the paper's protocol (shared/paper.md) for one held-out domain:
3 training domains, batch 32 each, SGD with momentum, weight decay on every parameter, lr x0.1
at half-time, evaluation every 300 steps on the in/out split of every domain, the best
checkpoint by training-domain validation, and, in the same run, the uniform weight average along
the trajectory and the logit ensemble of the evaluated checkpoints.

    python -m vldlib train --benchmark PACS --data-dir data --test-envs 0 --dropout 0.9

The same loop serves the CPU demo: `train_stages`, `resolution` and `cache_trunk` make it small
(train the last stages on cached outputs of the frozen ones), never a second loop.

Run directory: config.json, meta.json, records.jsonl (append-only), best.pt, last.pt, done.
A killed run restarts from last.pt and writes the same records as an uninterrupted one: every
random draw (batch order, augmentation, dropout) is a function of (seed, step), not of history.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import pickle
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

from vldlib import config as config_io
from vldlib.data import DataError, load_benchmark
from vldlib.data.splits import out_files
from vldlib.loop_data import (Data, StepBatches, accuracies, batch_indices, compute_trunk, make_data,  # noqa: F401
                               predict_all, train_batches, trunk_features, validation_score)
from vldlib.models import (FineTuneNet, build_net, check_head, ModelConfigError, check_backbone, check_dropout, create_model,
                           data_config, param_groups, weights_fingerprint)
from vldlib.utils import (append_jsonl, atomic_path, config_hash, read_jsonl, seed_hash, write_json_atomic,
                          write_text_atomic)


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's protocol (ResNet #2, 10k steps, 90% dropout)."""

    # --- data
    benchmark: str = "PACS"  # registered name (under data_dir) or path to ROOT/<domain>/<class>/<img>
    data_dir: str = "data"  # where registered benchmarks live
    test_envs: list[int] = field(default_factory=lambda: [0])  # held-out domain index(es)
    trial_seed: int = 0  # seeds the 80/20 in/out split of every domain, nothing else
    holdout: float = 0.2  # fraction of every domain held out ("out" split)
    resolution: int = 224  # input size in pixels
    augment: bool = True  # DomainBed's training augmentation (off: eval resize only)
    augment_on: str = "workers"  # where augmentation runs: "workers" (PIL/tensors per image) or "device" (batched)
    cache_images: bool = False  # decode every image once into a memory-mapped uint8 cache
    skip_bad: bool = False  # skip unreadable images (counted and printed) instead of failing
    # --- model
    backbone: str = "resnet50.tv2_in1k"  # any timm name, or an offline backbone (efficientnet_lite0.offline)
    pretrained: bool = True  # ImageNet weights (False: random init, training from scratch)
    weights_file: str | None = None  # local weights instead of the hub (loaded with weights_only=True)
    dropout: float = 0.9  # rate on the pooled penultimate features (0 = plain fine-tuning)
    freeze_bn: bool = True  # BatchNorm running statistics fixed (affine parameters still trained)
    train_stages: int | None = None  # None: fine-tune all; k: only the last k stages + head; 0: head only
    head: str = "linear"  # "linear" (Dropout + Linear), or "multiblock<k>" (paper Figs 9-10, needs train_stages 0)
    cache_trunk: bool = False  # compute the frozen stages once and train on their outputs (needs augment off)
    # --- optimisation
    steps: int = 10_000  # SGD steps
    batch_size: int = 32  # per training domain (3 domains: 96 images a step)
    lr: float = 1e-3  # learning rate
    head_lr_mult: float = 1.0  # classifier lr = lr x this (paper Fig 6: 10)
    weight_decay: float = 1e-4  # on every parameter
    momentum: float = 0.9  # SGD momentum
    lr_decay_at: list[float] = field(default_factory=lambda: [0.5])  # fractions of steps where lr *= lr_decay
    lr_decay: float = 0.1  # lr multiplier at each of lr_decay_at
    # --- evaluation and averaging
    eval_every: int = 300  # evaluate (and checkpoint) every this many steps, and at the last step
    average_from: int = 300  # weight average and logit ensemble start at this step
    eval_batch_size: int = 256  # batch size for evaluation
    keep_last: bool = True  # keep last.pt after the run finished (needed only to extend it)
    # --- system
    seed: int = 0  # training seed: head init, batch order, augmentation, dropout masks
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    num_workers: int = -1  # data-loading processes (-1: auto, 0: main process)
    num_threads: int = 0  # CPU threads for torch (0: torch's default; 1 is fastest for tiny heads)
    channels_last: bool = False  # NHWC memory format (faster convolutions on GPUs)
    bf16: bool = False  # bfloat16 autocast (off until a short run shows accuracy within noise)
    compile: bool = False  # torch.compile the training forward (GPU speed; the first step compiles for a minute)
    tf32: bool = True  # TensorFloat-32 matmuls/convolutions on Ampere+ GPUs
    out: str = "outputs/runs"  # parent folder of run directories
    run_name: str | None = None  # run folder name (default: readable summary + config hash)
    progress: bool = True  # show a progress bar

    # Fields that do not change results: left out of the run's identity hash.
    NON_IDENTITY = ("data_dir", "device", "num_workers", "out", "run_name", "progress", "keep_last",
                    "eval_batch_size", "cache_images", "cache_trunk", "num_threads", "compile")

    def validate(self) -> None:
        """Errors before any work starts, each naming the value and the fix."""
        check_dropout(self.dropout)
        check_backbone(self.backbone)
        check_head(self.head, self.train_stages)
        if not (self.lr > 0 and math.isfinite(self.lr)):  # `not >`: NaN fails too
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}; e.g. --lr 1e-3 (the paper's grid: 1e-3, 5e-4)")
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError(f"batch sizes must be > 0, got batch_size={self.batch_size}")
        if not (0 <= self.weight_decay < math.inf) or not 0 <= self.momentum < 1:
            raise ValueError(f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay}, {self.momentum}")
        if not (0 < self.head_lr_mult < math.inf):
            raise ValueError(f"head_lr_mult must be > 0, got {self.head_lr_mult}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout fraction must be in (0, 1), got {self.holdout}; e.g. --holdout 0.2 (the paper's)")
        if not self.test_envs:
            raise ValueError("test_envs is empty: name at least one held-out domain index")
        if any(not 0 < f < 1 for f in self.lr_decay_at):
            raise ValueError(f"lr_decay_at are fractions of the run in (0, 1), got {self.lr_decay_at}")
        if self.eval_every <= 0 or self.average_from < 0:
            raise ValueError(f"eval_every must be > 0 and average_from >= 0")
        if self.augment_on not in ("workers", "device"):
            raise ValueError(f"augment_on must be 'workers' or 'device', got {self.augment_on!r}")
        if self.resolution < 16:
            raise ValueError(f"resolution {self.resolution} is too small (>= 16 px)")
        if self.cache_trunk and self.augment:
            raise ValueError("cache_trunk computes the frozen stages once per image, so it cannot "
                             "augment: set augment=False (--augment false) or cache_trunk=False.")
        if self.cache_trunk and self.train_stages is None:
            raise ValueError("cache_trunk needs a frozen trunk: set train_stages (e.g. 1, or 0 for the head only).")

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.NON_IDENTITY}


class AveragedTrainable(AveragedModel):
    """`AveragedModel` that averages only the parameters being trained.

    Frozen parameters never change, so their average is themselves; skipping them makes the
    per-step average cost scale with what is trained (the head alone in a linear probe).
    """

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = [(a, p.detach().to(a.device)) for a, p in zip(self.module.parameters(), model.parameters())
                 if p.requires_grad]
        if not pairs:
            return
        averaged, current = [a for a, _ in pairs], [p for _, p in pairs]
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            average = self.multi_avg_fn or get_swa_multi_avg_fn()  # uniform (SWA) average by default
            average(averaged, current, self.n_averaged.to(averaged[0].device))
        self.n_averaged += 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; a failure record was written."""


class RunOutputError(RuntimeError):
    """Writing into the run directory failed: disk full, read-only, a file where a folder should be."""


def _free_space(path: Path) -> str:
    """' (N MB free on that disk)': torch reports a full disk as a cryptic C++ error; this says it plainly."""
    try:
        existing = next(p for p in [path, *path.parents] if p.is_dir())
        return f" ({shutil.disk_usage(existing).free / 2**20:.0f} MB free on that disk)"
    except (OSError, StopIteration):
        return ""


@contextlib.contextmanager
def _writing(path: Path, *also: type[Exception]) -> Iterator[None]:
    """Turn an OSError (or `also`) while writing `path` into a RunOutputError that names it and
    the fix. Every write is atomic or an fsynced append, so what the run saved before is intact
    and the same command resumes once the cause is gone."""
    try:
        yield
    except RunOutputError:
        raise
    except (OSError, *also) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise RunOutputError(f"cannot write {path}: {reason}{_free_space(path)}. Free disk space, or choose a "
                             f"writable --out (a folder, not a file); the records and checkpoints saved before are intact: "
                             f"run the same command again to resume.") from e


# ----------------------------------------------------------------------------- run directory
@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive lock on RUN_DIR/.lock while training; yield whether another process held it
    first (then that process has finished or died, and the run's files must be read again).

    `fcntl.flock`: the kernel releases it when its holder exits, even by kill -9, so a stale lock
    never blocks a resume.
    """
    path = run_dir / ".lock"
    with _writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
            print(f"[vldlib] {run_dir} is being trained by {holder}; waiting for it to finish", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {platform.node()}".encode(), 0)
        yield waited
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_dir_for(cfg: TrainConfig) -> Path:
    """outputs/runs/<benchmark>-te<t>-p<dropout>-lr<lr>-s<seed>-<hash of every result-changing knob>."""
    if cfg.run_name:
        return Path(cfg.out) / cfg.run_name
    bench = Path(cfg.benchmark).name if os.sep in cfg.benchmark else cfg.benchmark
    te = "+".join(map(str, cfg.test_envs))
    head = "" if cfg.head == "linear" else f"-{cfg.head}"
    name = f"{bench}-te{te}-p{cfg.dropout:g}-lr{cfg.lr:g}-s{cfg.seed}{head}-{config_hash(cfg.identity())}"
    return Path(cfg.out) / name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict) -> None:
    # torch.save reports a failed write (disk full) as a RuntimeError from its C++ writer
    with _writing(path, RuntimeError), atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as plain tensors and values: `weights_only=True` refuses pickles that run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"{path}: refused: it is a pickle that needs code to load ({first}). vldlib "
                           f"checkpoints hold only tensors and plain values, so this file was not written by "
                           f"vldlib or was altered; delete it to restart the run from scratch.") from None
    except Exception as e:
        raise RuntimeError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e}). It is not a vldlib "
                           f"checkpoint or it is damaged; delete it to restart the run from scratch.") from e


def first_non_finite(losses: list[torch.Tensor]) -> int | None:
    """Index of the first NaN/inf among recent losses (one device sync for all of them)."""
    bad = (~torch.isfinite(torch.stack(losses))).nonzero()
    return int(bad[0]) if len(bad) else None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _ends_with_newline(path: Path) -> bool:
    """False when the last line of `path` was cut by a kill (read_jsonl ignores such a line)."""
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------- the loop
def build_run_net(cfg: TrainConfig, num_classes: int, device: torch.device) -> tuple[FineTuneNet, dict, str]:
    """The network a run starts from, its input normalisation, and the fingerprint of its start.

    Seeded, so every run (and `vldlib.bench`, which times this same network) starts alike.
    """
    torch.manual_seed(seed_hash(cfg.seed, "init"))
    model = create_model(cfg.backbone, num_classes, pretrained=cfg.pretrained, dropout=cfg.dropout,
                         weights_file=cfg.weights_file)
    # Soups need a shared start: fingerprint everything but the (seeded) classifier, since
    # averaging linear heads on shared features equals averaging their logits.
    init_fingerprint = weights_fingerprint(model, exclude=model.get_classifier())
    net = build_net(model, cfg.head, cfg.train_stages, cfg.freeze_bn).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, data_config(model), init_fingerprint


def train(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None) -> Path:
    """Run (or resume, or skip if finished) one fine-tuning run; returns its directory.

    `should_stop` (e.g. a threading.Event's is_set) is asked before each step; when it says yes the
    run returns unfinished, resumable from its last checkpoint (the explorer's stop button)."""
    cfg.validate()
    run_dir = run_dir_for(cfg)
    if (run_dir / "done").exists():
        print(f"[vldlib] already finished: {run_dir} (delete its 'done' file to run it again)")
        return run_dir
    records_path = run_dir / "records.jsonl"
    old = read_jsonl(records_path)
    if old and old[-1].get("type") == "failure":
        raise TrainingDiverged(f"{run_dir} failed earlier at step {old[-1]['step']}: {old[-1]['reason']} "
                               f"Delete the folder to retry, or change the config (e.g. a lower --lr).")
    device = resolve_device(cfg.device)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda"

    # --- model: pretrained backbone, dropout on the penultimate features, frozen BN
    bench = load_benchmark(cfg.benchmark, cfg.data_dir, skip_bad=cfg.skip_bad, progress=cfg.progress)
    net, norm, init_fingerprint = build_run_net(cfg, len(bench.classes), device)

    # --- data: per-domain training sets and every eval split (optionally as cached trunk outputs)
    data = make_data(cfg, bench, norm["mean"], norm["std"])
    features = trunk_features(net, data, cfg, device) if cfg.cache_trunk else None
    forward = net.tail if features is not None else net
    # compiled for training only: evaluation (eval mode) would compile a second graph for little gain
    train_forward = torch.compile(forward, dynamic=False) if cfg.compile else forward

    # --- optimiser: SGD, momentum, the same weight decay on every parameter, step decay
    optimizer = torch.optim.SGD(param_groups(net, cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    milestones = sorted({max(1, int(round(f * cfg.steps))) for f in cfg.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_decay)
    # Parameters are averaged; buffers (BatchNorm statistics) follow the current model: they are
    # frozen by default, and averaging integer counters is meaningless anyway.
    averaged = AveragedTrainable(net, multi_avg_fn=get_swa_multi_avg_fn(), use_buffers=False)
    ensemble_logits: dict[str, torch.Tensor] = {}
    best_score, start = -1.0, 0

    # --- one process per run: a second one (two notebooks sharing runs) waits here, then
    # finds the run done, or resumes it from where the first stopped
    with _writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) as waited:
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
            net.model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            averaged.load_state_dict(ckpt["averaged"])
            ensemble_logits, best_score, start = ckpt["ensemble_logits"], ckpt["best_score"], ckpt["step"]
            kept = [r for r in old if r.get("step", 0) <= start]
            # Also rewrite when a kill left half a line: the next append would be glued to it.
            if len(kept) != len(old) or not _ends_with_newline(records_path):
                with _writing(records_path):
                    write_text_atomic(records_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            print(f"[vldlib] resuming {run_dir} from step {start}")
        elif records_path.exists():  # records (or half a line) but no checkpoint: killed before the first one
            records_path.unlink()
        with _writing(run_dir / "config.json"):
            write_json_atomic(run_dir / "config.json", asdict(cfg))
        with _writing(run_dir / "meta.json"):
            write_json_atomic(run_dir / "meta.json", {
                "benchmark": bench.name, "domains": data.domains, "classes": data.classes, "test_envs": cfg.test_envs,
                "train_envs": data.train_envs, "ood_split": "out" if bench.group_by_stem else "in",
                "split_sizes": {k: len(v) for k, v in data.evals.items()},
                "out_files": out_files(bench, cfg.trial_seed, cfg.holdout),  # check the split against DomainBed's
                "init_fingerprint": init_fingerprint, "device": str(device), "python": platform.python_version(),
                "torch": torch.__version__, "num_params": sum(p.numel() for p in net.parameters()),
                "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad)})

        from tqdm.auto import tqdm

        ood_split = "out" if bench.group_by_stem else "in"
        bar = tqdm(total=cfg.steps, initial=start, desc=run_dir.name, disable=not cfg.progress, dynamic_ncols=True)
        # Running sums stay on the device: reading a GPU value each step would stall the pipeline.
        # For the same reason the finiteness check reads the recent losses in batches on a GPU.
        check_every = 1 if device.type == "cpu" else 25
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        loss_sum, correct, seen, recent = zero(), zero(), 0, []
        t_interval, last_eval = time.perf_counter(), start
        net.train()
        for step, batch in enumerate(train_batches(data, cfg, start, device, features), start=start):
            if should_stop is not None and should_stop():  # stopped by the caller: resumes from last.pt
                bar.close()
                return run_dir
            # one SGD step on the concatenated per-domain batches; every random draw seeded by the step
            torch.manual_seed(seed_hash(cfg.seed, "step", step))
            x = torch.cat([b[0] for b in batch])
            y = torch.cat([b[1] for b in batch])
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = train_forward(x)
            loss = F.cross_entropy(logits.float(), y)
            recent.append(loss.detach())
            at_eval = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
            bad = first_non_finite(recent) if len(recent) >= check_every or at_eval else None
            if bad is not None:
                bad_step, bad_loss = step - len(recent) + 1 + bad, recent[bad].item()
                reason = f"non-finite loss ({bad_loss}) at step {bad_step}; lr {cfg.lr} is probably too high."
                with _writing(records_path):
                    append_jsonl(records_path, {"type": "failure", "step": bad_step, "reason": reason})
                bar.close()
                raise TrainingDiverged(f"{run_dir}: {reason} A failure record was written.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done_steps = step + 1
            if done_steps >= cfg.average_from:
                averaged.update_parameters(net)
                if not cfg.freeze_bn:
                    for b_avg, b in zip(averaged.module.buffers(), net.buffers()):
                        b_avg.copy_(b)
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
            net.eval()
            preds = predict_all(forward, data.evals, cfg, device, features)
            acc = {"model": accuracies(preds)}
            if done_steps >= cfg.average_from:
                averaged.eval()
                wa_forward = averaged.module.tail if features is not None else averaged.module
                acc["wa"] = accuracies(predict_all(wa_forward, data.evals, cfg, device, features))
                for k, (lg, y_k) in preds.items():
                    ensemble_logits[k] = ensemble_logits.get(k, torch.zeros_like(lg)) + lg
                acc["ens"] = accuracies({k: (ensemble_logits[k], preds[k][1]) for k in preds})
            net.train()
            record = {"type": "eval", "step": done_steps, "loss": loss_sum.item() / max(1, n_interval),
                      "lr": optimizer.param_groups[-1]["lr"] / cfg.head_lr_mult,
                      "train_acc": correct.item() / max(1, seen),
                      "step_time": step_time, "peak_mem_mb": peak_memory_mb(device), "acc": acc}
            score = validation_score(acc["model"], data.train_envs)
            if score > best_score:
                best_score = score
                save_checkpoint(run_dir / "best.pt", {"model": net.model.state_dict(), "step": done_steps,
                                                      "config": asdict(cfg), "score": score})
            with _writing(records_path):
                append_jsonl(records_path, record)
            save_checkpoint(run_dir / "last.pt", {
                "model": net.model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "averaged": averaged.state_dict(),
                "ensemble_logits": ensemble_logits, "best_score": best_score, "step": done_steps,
                "config": asdict(cfg)})
            bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{score:.3f}",
                            test=f"{np.mean([acc['model'][f'env{t}_{ood_split}'] for t in cfg.test_envs]):.3f}")
            loss_sum, correct, seen, t_interval, last_eval = zero(), zero(), 0, time.perf_counter(), done_steps
        bar.close()
        if not cfg.keep_last:
            (run_dir / "last.pt").unlink(missing_ok=True)
        with _writing(run_dir / "done"):
            write_text_atomic(run_dir / "done", time.strftime("%Y-%m-%d %H:%M:%S\n"))
        return run_dir


# ----------------------------------------------------------------------------- reuse of finished runs
def load_run_model(run_dir: str | os.PathLike, which: str = "best") -> tuple[FineTuneNet, dict]:
    """The network of a run at its best (training-domain validation) or last checkpoint."""
    run_dir = Path(run_dir)
    cfg = config_io.load_file(TrainConfig, run_dir / "config.json")
    meta = json.loads((run_dir / "meta.json").read_text())
    model = create_model(cfg.backbone, len(meta["classes"]), pretrained=False, dropout=cfg.dropout)
    net = build_net(model, cfg.head, cfg.train_stages, cfg.freeze_bn)
    net.model.load_state_dict(load_checkpoint(run_dir / f"{which}.pt")["model"])
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


# ----------------------------------------------------------------------------- command line
def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune one model (resumable)",
                       description="Fine-tune one model on a benchmark with one held-out domain. Every "
                                   "TrainConfig field is a flag; --config FILE.yaml sets several at once.",
                       epilog="example: python -m vldlib train --benchmark emoji --data-dir data --test-envs 0 "
                              "--dropout 0.9 --backbone efficientnet_lite0.offline --resolution 64 --steps 600")
    p.add_argument("--config", help="YAML/JSON file of config values (flags override it)")
    config_io.add_arguments(p, TrainConfig, config_io.field_docs(TrainConfig))
    p.set_defaults(func=_cli_train)


def _read_config_file(path: str) -> dict:
    """The --config file as a dict; a missing file, bad YAML or an unknown key names the file."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ValueError(f"--config {p}: cannot read it ({e.strerror or e}); check the path.") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {p}: not valid YAML ({' '.join(str(e).split())}); fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {p}: expected a mapping of field: value, got a {type(data).__name__}.")
    try:  # unknown keys and bad values, named with the file
        config_io.from_dict(TrainConfig, data, source=str(p))
    except ValueError as e:
        raise ValueError(str(e) if str(p) in str(e) else f"{p}: {e}") from None
    return data


def _cli_train(args: argparse.Namespace) -> int:
    try:
        base = _read_config_file(args.config) if args.config else {}
        cfg = config_io.from_args(TrainConfig, args, base)
        print(json.dumps(asdict(cfg), indent=1))
        run_dir = train(cfg)
    except (ValueError, KeyError, ModelConfigError, DataError, TrainingDiverged, RuntimeError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)  # no repr quotes
        return 1
    print(f"[vldlib] run directory: {run_dir}")
    return 0
