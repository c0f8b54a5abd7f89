"""Model A on FER2013 on one GPU, Ray-free, as fast as the recipe allows. One command:

    python bench/gpu_model_a.py [--data ../shared/data/fer2013] [--epochs 250] [--out result.json]
    python bench/gpu_model_a.py --smoke          # a minute on a CPU: a subset, 2 epochs

Reads FER2013 (image folder, fer2013.csv, or a prepared folder) with ferray's own Ray-free
readers, keeps every face on the GPU as uint8 (66 MB), augments on the GPU, and trains the paper
recipe (experiments/model_a.yaml: AdaMax lr 0.01, batch 64, center loss, 44x44 crops) with bf16
autocast, channels_last and torch.compile (CUDA graphs by default: at batch 64 the step is launch
bound). Prints epoch time, images/s and PublicTest accuracy with and without ten-crop TTA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the GPU machine has the working tree, not an installed ferray

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _decode(unit):
    from ferray.data.contract import pixels_to_images
    from ferray.data.records import decode_unit

    table, _ = decode_unit(unit)
    return (pixels_to_images(table.column("pixels")).copy(), table.column("label").to_numpy(),
            np.asarray(table.column("split").to_pylist()))


def find_fer2013(given: Path | None) -> Path | None:
    """--data, else FER2013 carried into the repo (.fer2013/), else ../shared/data/fer2013."""
    return given or next((p for p in (REPO / ".fer2013", REPO.parent / "shared" / "data" / "fer2013") if p.exists()), None)


def load_fer2013(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (faces uint8 (N,48,48), labels)} from a source or a prepared folder, without Ray."""
    from ferray.data.contract import MANIFEST, SPLITS, load_split
    from ferray.data.sources import open_source

    if (path / MANIFEST).exists():
        return {s: load_split(path, s)[:2] for s in SPLITS if (path / f"split={s}").exists()}
    units = open_source(path).units
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(_decode, units))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    splits = np.concatenate([p[2] for p in parts])
    return {s: (images[splits == s], labels[splits == s]) for s in SPLITS if (splits == s).any()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="FER2013 folder/CSV/prepared dir "
                        "(default: .fer2013/ in the repo if carried there, else ../shared/data/fer2013)")
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "model_a.yaml")
    parser.add_argument("--epochs", type=int, help="override train.epochs (paper: 250)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--eval-every", type=int, default=10, help="PublicTest accuracy every N epochs")
    parser.add_argument("--compile", choices=("reduce-overhead", "default", "none"), default="reduce-overhead")
    parser.add_argument("--smoke", action="store_true", help="a subset and 2 epochs, to check the script on a CPU")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    from ferray import engine
    from ferray.config import load_config

    data = find_fer2013(args.data)
    if data is None:
        print("no FER2013 found; pass --data", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    if args.smoke:
        overrides += ["train.epochs=2"]
    cfg = load_config(args.experiment, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    splits = load_fer2013(data)
    x, y = splits["Training"]
    xt, yt = splits["PublicTest"]
    if args.smoke:  # a random subset: the folder order is by class
        pick, pick_t = np.random.default_rng(0).permutation(len(y))[:512], np.random.default_rng(1).permutation(len(yt))[:256]
        x, y, xt, yt = x[pick], y[pick], xt[pick_t], yt[pick_t]
    load_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"data: {len(y):,} Training / {len(yt):,} PublicTest faces from {data} in {load_s:.1f}s; device {gpu}; "
          f"torch {torch.__version__}", flush=True)

    train = engine.TensorBatches(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device),
                                 cfg.train.batch_size, seed=cfg.train.seed)
    test = engine.TensorBatches(torch.from_numpy(xt).to(device), torch.from_numpy(yt).to(device), 1024,
                                shuffle=False, drop_last=False)
    state = engine.build_state(cfg, device)
    if args.compile != "none" and device.type == "cuda":
        state.model = torch.compile(state.model, mode=None if args.compile == "default" else args.compile)

    epoch_times, log = [], []
    t_train = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        metrics = engine.train_one_epoch(state, train, len(train))
        epoch_times.append(metrics["train_seconds"])
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % args.eval_every == 0 or last or epoch == 0:
            result = engine.evaluate(state.core, test, cfg.augment.crop, False, device, state.use_amp)
            row = engine.end_epoch(state, metrics, result)
            log.append(row)
            print(f"epoch {epoch + 1:>3}/{cfg.train.epochs}  {metrics['train_seconds']:5.2f}s  "
                  f"{metrics['images_per_s']:8,.0f} img/s  loss {metrics['train_loss']:.4f}  "
                  f"train {metrics['train_acc']:6.2%}  PublicTest {result['accuracy']:6.2%}", flush=True)
        else:
            state.epoch += 1
    train_s = time.perf_counter() - t_train
    plain = engine.evaluate(state.core, test, cfg.augment.crop, False, device, state.use_amp)
    tta = engine.evaluate(state.core, test, cfg.augment.crop, True, device, state.use_amp)
    steady = epoch_times[1:] or epoch_times  # the first epoch includes compilation
    summary = {
        "device": gpu, "torch": torch.__version__, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
        "compile": args.compile, "train_seconds": round(train_s, 1), "first_epoch_seconds": round(epoch_times[0], 2),
        "epoch_seconds": round(float(np.median(steady)), 3),
        "images_per_s": round(len(train) * cfg.train.batch_size / float(np.median(steady)), 1),
        "public_test_accuracy": plain["accuracy"], "public_test_accuracy_tta": tta["accuracy"],
        "per_class_tta": tta["per_class"], "config": cfg.name, "smoke": args.smoke,
    }
    print(f"done: {cfg.train.epochs} epochs in {train_s / 60:.1f} min (first epoch {epoch_times[0]:.1f}s incl. "
          f"compile; then {summary['epoch_seconds']:.2f}s/epoch, {summary['images_per_s']:,.0f} img/s); "
          f"PublicTest {plain['accuracy']:.2%}, with ten-crop TTA {tta['accuracy']:.2%}")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "log": log}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
