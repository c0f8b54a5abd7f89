"""Model B on SR-upscaled FER2013 on one GPU, Ray-free, inside a fixed time budget. From the repo root:

    python -m bench.gpu_model_b [--minutes 8] [--data DIR] [--private fer2013.csv] [--sr-checkpoint CKPT | --bicubic]
    python -m bench.gpu_model_b --smoke        # a CPU check of every path: a subset, tiny networks

1. SR: trains experiments/srgan.yaml through the core loop (ferray.fit) for a fifth of the time
   (the generator kept is the last adversarial epoch, not the best-PSNR one), or loads an
   `ferray sr train` checkpoint, or uses bicubic; upscales every face 48 -> 96 on the GPU.
2. Trains experiments/model_b.yaml (ResNet50 fine-tuned from ImageNet) on the 96x96 faces held on the
   GPU for the rest of the time. Without torchvision's cached ImageNet weights (these GPU machines have
   no internet) it trains model_b.yaml's scratch recipe, experiments/model_b_scratch.yaml, and says so:
   the fine-tuning recipe never runs on random weights.
The best epoch is chosen on the selection split (Validation, carved as `ferray prepare` carves it,
where there is no PrivateTest); every test split is then evaluated with and without ten-crop TTA.
OUT/result.json (and OUT/srgan/result.json) are rewritten after every epoch and every evaluation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, add_common_args, device_and_flags, load_data, overrides

SMOKE_B = ["model.name=resnet18_b", "train.batch_size=16", "train.compile=false"]
SMOKE_SR = [
    "sr.generator_channels=8",
    "sr.generator_blocks=1",
    "sr.discriminator_channels=8",
    "sr.pretrain_epochs=1",
    "train.batch_size=32",
    "train.epochs=2",
    "train.budget_minutes=0",
]  # one pre-training, one adversarial epoch
SR_SHARE = 0.2


@torch.no_grad()
def upscale_all(generator, faces: np.ndarray, device, batch: int = 1024) -> np.ndarray:
    """48 -> 96 by the generator (None: bicubic), rounded to uint8 as `ferray sr upscale` writes it."""
    from ferray.sr.nets import bicubic

    out = []
    for i in range(0, len(faces), batch):
        x = torch.from_numpy(faces[i : i + batch]).to(device).float().unsqueeze(1) / 255.0
        y = generator(x) if generator is not None else bicubic(x, 2)
        out.append((y.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).cpu().numpy())
    return np.concatenate(out)


def upscaled(faces, generator, device):
    from ferray.data.memory import Faces

    return Faces(upscale_all(generator, faces.images, device), faces.labels, faces.ids)


def make_generator(args, splits, device, out: Path, minutes: float, content_checkpoint: str | None = None):
    """(generator or None for bicubic, how it was made)."""
    from ferray.config import load_runnable_config
    from ferray.local import train_local
    from ferray.tasks import SR

    if args.bicubic:
        return None, "bicubic"
    if args.sr_checkpoint:
        from ferray.sr.engine import generator_from_checkpoint

        return generator_from_checkpoint(args.sr_checkpoint, device)[0], f"SRGAN {args.sr_checkpoint}"
    sets = [
        f"train.budget_minutes={minutes}",
        f"data.selection_split={splits['selection']}",
        *(SMOKE_SR if args.smoke else []),
    ]
    if content_checkpoint:
        sets.append(f"sr.content_checkpoint={content_checkpoint}")
    cfg = load_runnable_config(REPO / "experiments" / "srgan.yaml", sets)
    print(f"SRGAN: up to {cfg.train.epochs} epochs in {minutes:.1f} min", flush=True)
    state, run = train_local(cfg, splits["Training"], splits[splits["selection"]], device, out / "srgan", task=SR)
    kind = state.content.kind
    return state.core.eval(), f"SRGAN trained here ({kind} content loss, epoch {run.best['epoch']} of {state.epoch})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "gpu-model-b", minutes=8.0)
    parser.add_argument("--sr-checkpoint", type=Path, help="an `ferray sr train` checkpoint instead of training one")
    parser.add_argument("--bicubic", action="store_true", help="upscale by bicubic instead of SR")
    args = parser.parse_args()

    from ferray.config import load_runnable_config
    from ferray.local import evaluate_tests, train_local

    device, name = device_and_flags()
    out = args.out.absolute()
    splits, tests = load_data(args, out)
    selection = splits["selection"]
    sr_minutes = 0.0 if args.bicubic or args.sr_checkpoint else args.minutes * SR_SHARE
    print(
        f"data: {len(splits['Training']):,} Training faces from {splits['data']}; selecting on {selection}, testing on "
        f"{', '.join(tests)}; device {name}",
        flush=True,
    )
    t0 = time.perf_counter()
    generator, how = make_generator(args, splits, device, out, sr_minutes)
    big = {s: upscaled(splits[s], generator, device) for s in ("Training", selection)}
    big_tests = {s: upscaled(f, generator, device) for s, f in tests.items()}
    print(f"upscaled 48 -> 96 by {how} ({time.perf_counter() - t0:.0f}s with the SR training)", flush=True)

    args.minutes -= sr_minutes
    cfg = load_runnable_config(
        REPO / "experiments" / "model_b.yaml",
        [
            f"data.path={splits['data']} (upscaled in memory)",
            f"data.selection_split={selection}",
            *overrides(args, SMOKE_B),
        ],
    )
    print(
        f"model B: {cfg.name} ({cfg.model.name}, "
        f"{'ImageNet weights' if cfg.model.pretrained != 'none' else 'from scratch'}), "
        f"up to {cfg.train.epochs} epochs in {args.minutes:.1f} min",
        flush=True,
    )
    state, run = train_local(
        cfg,
        big["Training"],
        big[selection],
        device,
        out,
        facts={
            "made_by": " ".join(["python -m bench.gpu_model_b", *sys.argv[1:]]),
            "upscale": how,
            "smoke": args.smoke,
            "test_splits": list(tests),
        },
    )
    run.facts["pretrained"] = bool(getattr(state.core, "pretrained", False))
    results = evaluate_tests(state, run, big_tests, device)
    summary = run.write_result(state, tests=results)
    print(
        f"done: {cfg.name} {'(from scratch)' if not run.facts['pretrained'] else '(ImageNet)'}, {summary.epochs} "
        f"epochs in {summary.train_seconds / 60:.1f} min; best epoch {summary.best_epoch}, {selection} "
        f"(selection) {summary.best_value:.2%}; "
        + "; ".join(f"{s} {r['center']['accuracy']:.2%}, TTA {r['tta']['accuracy']:.2%}" for s, r in results.items())
        + f"; {out / 'result.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
