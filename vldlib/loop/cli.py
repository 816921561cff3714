"""`python -m vldlib train`: one run from flags or a --config file."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


from vldlib import config as config_io
from vldlib.cliargs import read_yaml_mapping
from vldlib.config import TrainConfig, UsageError
from vldlib.data import DataError
from vldlib.loop.rundir import TrainingDiverged
from vldlib.loop.train import train
from vldlib.model import ModelConfigError


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
    p = Path(path)
    data = read_yaml_mapping(p, "field: value")
    try:  # unknown keys and bad values, named with the file
        config_io.from_dict(TrainConfig, data, source=str(p))
    except ValueError as e:
        raise UsageError(str(e) if str(p) in str(e) else f"{p}: {e}") from None
    return data


def _cli_train(args: argparse.Namespace) -> int:
    try:
        base = _read_config_file(args.config) if args.config else {}
        cfg = config_io.from_args(TrainConfig, args, base)
        print(json.dumps(asdict(cfg), indent=1))
        run_dir = train(cfg)
    except (ValueError, KeyError, ModelConfigError, DataError, TrainingDiverged, RuntimeError) as e:
        return config_io.print_error(e)  # 2: a bad value or option; 1: the run failed
    print(f"[vldlib] run directory: {run_dir}")
    return 0
