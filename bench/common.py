"""What the Ray-free GPU benches share: finding FER2013, the device, the flags, the smoke subset.

Run the benches as modules from the repository root (`python -m bench.gpu_model_a`): the GPU
machines have the working tree, not an installed ferray or Ray. Beside PyTorch the benches need
numpy, pyarrow (ferray's readers of FER2013) and PyYAML (the experiment files), which the lent
GPU machines' image holds; elsewhere `BENCH_NEEDS` missing are named before anything starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE_ROWS = {"Training": 600, "Validation": 140, "PublicTest": 140, "PrivateTest": 140}
SMOKE_MINUTES = 0.5


def find_fer2013(given: Path | None) -> Path | None:
    """--data, else FER2013 carried into the repo (.fer2013/), else ../shared/data/fer2013."""
    return given or next(
        (p for p in (REPO / ".fer2013", REPO.parent / "shared" / "data" / "fer2013") if p.exists()), None
    )


def add_common_args(parser: argparse.ArgumentParser, out: str, minutes: float) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="FER2013 folder/CSV/zip or a prepared folder "
        "(default: .fer2013/ in the repo if carried there, else ../shared/data/fer2013)",
    )
    parser.add_argument(
        "--private",
        type=Path,
        help="a folder or CSV holding PrivateTest (e.g. the full fer2013.csv): "
        "evaluated at the end, center crop and ten-crop TTA",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"training time: the epochs that fit, the schedule planned over them (default: {minutes:g}; "
        f"with --smoke: {SMOKE_MINUTES:g})",
    )
    parser.set_defaults(full_minutes=minutes)
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default: {out})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the experiment, e.g. --set train.batch_size=128",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a subset and tiny models: a CPU check of every path of "
        "the script (--private and --minutes included) in a minute or two",
    )


BENCH_NEEDS = {"numpy": "numpy", "pyarrow": "pyarrow", "yaml": "pyyaml", "PIL": "pillow"}


def check_needs() -> None:
    """Exit naming every package the benches need and this Python lacks (pip names)."""
    import importlib.util

    missing = [package for module, package in BENCH_NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"the GPU benches need {', '.join(missing)} beside PyTorch: pip install {' '.join(missing)}")


def device_and_flags() -> tuple[torch.device, str]:
    check_needs()
    from ferray.device import fast_cuda_math

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast_cuda_math(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    return device, name


def load_data(args, out: Path) -> tuple[dict, dict]:
    """(splits, tests): every split of --data (Validation carved where there is no PrivateTest) and
    the test splits (the untouched ones, plus --private's PrivateTest). --smoke: random subsets, and
    a PrivateTest CSV made from PublicTest faces when --private is not given, so its path runs too."""
    from ferray.data.contract import selection_split
    from ferray.data.memory import load_faces, load_private

    if args.minutes is None:  # a smoke run plans its epochs too, over a budget of seconds
        args.minutes = SMOKE_MINUTES if args.smoke else args.full_minutes
    data = find_fer2013(args.data)
    if data is None:
        sys.exit("no FER2013 found; pass --data")
    splits = load_faces(data)
    if args.smoke:
        rng = np.random.default_rng(0)
        splits = {s: f.subset(rng.permutation(len(f))[: SMOKE_ROWS.get(s, 140)]) for s, f in splits.items()}
        if args.private is None:
            args.private = write_private_csv(splits["PublicTest"], out / "smoke-private.csv")
    selection = selection_split({"splits": splits})
    tests = {s: f for s, f in splits.items() if s not in ("Training", selection)}
    if args.private is not None:
        tests["PrivateTest"] = load_private(args.private)
    return {"data": data, "selection": selection, **splits}, tests


def write_private_csv(faces, path: Path) -> Path:
    """A Kaggle-style fer2013.csv whose rows are PrivateTest (for --smoke)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("emotion,pixels,Usage\n")
        for image, label in zip(faces.images, faces.labels):
            f.write(f"{label},{' '.join(map(str, image.ravel()))},PrivateTest\n")
    return path


def overrides(args, smoke_sets: list[str]) -> list[str]:
    sets = [*args.overrides, f"train.budget_minutes={args.minutes}"]
    return sets + (smoke_sets if args.smoke else [])
