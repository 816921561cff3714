"""The training loop: `train(cfg) -> run_dir`, and reuse of finished runs.

- `train.py`: the loop itself, top to bottom (set-up, resume, step, evaluate, checkpoint).
- `batches.py`: what the loop reads (datasets, step-indexed batches, cached trunk outputs, predictions).
- `averaging.py`: the weight average along the trajectory.
- `rundir.py`: the run folder: its name, lock, checkpoints and the errors that say how to recover.
- `device.py`: device choice and peak memory.
- `cli.py`: `python -m vldlib train`.
"""

from vldlib.loop.device import resolve_device
from vldlib.loop.rundir import RunOutputError, TrainingDiverged, run_dir_for
from vldlib.loop.train import WeightsNotKept, build_run_net, evaluate_logits, load_run_model, weights_file

# `train` itself is imported from its module (`from vldlib.loop.train import train`): binding the
# name here would hide the module `vldlib.loop.train`.
__all__ = ["RunOutputError", "TrainingDiverged", "WeightsNotKept", "build_run_net", "evaluate_logits",
           "load_run_model", "resolve_device", "run_dir_for", "weights_file"]
