"""`ferray demo`: the pipeline end to end on synthetic faces, every artifact under one folder.

Stages so far: synthesize a FER2013-style CSV -> prepare it with Ray Data -> train the debug
Model A with Ray Train -> evaluate it. Each later stage (SR, tuning, ensemble, serving, report)
appends itself here.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from ferray.data.contract import DataError

MARKER = ".ferray-demo"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DEFAULT_OUT = Path("ferray-demo")


def claim_folder(out: Path) -> None:
    """Use `out` for the demo; a folder from an earlier demo is replaced, anything else is refused."""
    if out.exists():
        if not (out / MARKER).exists():
            raise DataError(f"{out} exists and is not a ferray demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `ferray demo`; rerunning the demo replaces this folder\n")


def run_demo(out: Path | None, n: int = 1400, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    from ferray.cli import format_manifest
    from ferray.config import load_config
    from ferray.data.prepare import prepare
    from ferray.data.synth import SynthSpec, synthesize
    from ferray.evaluate import evaluate_checkpoint
    from ferray.train import run_training

    if out is None:
        out = DEFAULT_OUT
        echo(f"demo: no --out given, writing to {out.absolute()}")
    out = Path(out)
    claim_folder(out)
    t0 = time.perf_counter()
    steps = 4
    echo(f"[1/{steps}] synth: {n} synthetic faces as a Kaggle-style fer2013.csv")
    synthesize(out / "source", SynthSpec(n=n, seed=seed), fmt="csv")
    echo(f"[2/{steps}] prepare: fer2013.csv -> Parquet + manifest (Ray Data)")
    manifest = prepare(out / "source" / "fer2013.csv", out / "data", echo=echo)
    print(format_manifest(manifest, out / "data"))
    echo(f"[3/{steps}] train: experiments/debug_a.yaml (Model A layout at 1/8 width, Ray Train)")
    cfg = load_config(EXPERIMENTS / "debug_a.yaml", [f"data.path={out / 'data'}", f"train.seed={seed}"])
    run = run_training(cfg, out / "runs", echo=echo)
    echo(f"[4/{steps}] evaluate: the best checkpoint on PublicTest with ten-crop TTA")
    evaluation = evaluate_checkpoint(run["best_checkpoint"], out / "data", "PublicTest", tta=True, echo=print)
    echo(f"demo: done in {time.perf_counter() - t0:.0f}s; artifacts under {out.absolute()}")
    return {"out": out, "manifest": manifest, "run": run, "evaluation": evaluation}
