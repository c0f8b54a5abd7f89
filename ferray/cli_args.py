"""What several `ferray` commands share: the help layout, the flags of a run (each the override of
a config key) and the experiment config they make."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def formatter(prog):
    return argparse.HelpFormatter(prog, max_help_position=32)


RUN_FLAGS = {
    "data": "data.path",
    "workers": "scaling.workers",
    "workers_per_trial": "scaling.workers",
    "gpus_per_worker": "scaling.gpus_per_worker",
    "epochs": "train.epochs",
    "init": "train.init",
}


def add_set_flag(p, help: str) -> None:
    """--set KEY=VALUE (repeatable), collected in args.overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def run_flags(p, what: str, workers_flag: str, workers_help: str, epochs_help: str, set_example: str) -> None:
    p.add_argument("--data", help="prepared data folder (overrides data.path)")
    p.add_argument(workers_flag, type=int, help=f"{workers_help} (overrides scaling.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (overrides scaling.gpus_per_worker)")
    p.add_argument("--epochs", type=int, help=f"{epochs_help} (overrides train.epochs)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder of runs (default: ./runs)")
    p.add_argument("--name", help=f"{what} name (default: the file's name)")
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the interrupted {what} OUT/NAME without repeating what finished",
    )
    add_set_flag(p, f"override any config value, {set_example} (repeatable)")


def flag_overrides(args) -> list[str]:
    """--set values, then the dedicated flags given (each the override of its config key)."""
    overrides = list(args.overrides)
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag, None)
        if isinstance(value, Path):
            value = value.resolve()  # the workers' working folder is not the caller's
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def experiment_config(args):
    from ferray.config import load_runnable_config

    return load_runnable_config(args.experiment, flag_overrides(args))


def format_manifest_of(manifest: dict, root) -> str:
    from ferray.data.describe import format_manifest

    return format_manifest(manifest, root)


def echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
