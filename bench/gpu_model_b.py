"""Model B on SR-upscaled FER2013 on one GPU, Ray-free. One command:

    python bench/gpu_model_b.py [--data ../shared/data/fer2013] [--sr-epochs 5 | --sr-checkpoint CKPT | --bicubic]
    python bench/gpu_model_b.py --smoke          # a CPU check: a subset, tiny networks, 1 epoch

1. SR: trains an SRResNet generator (pixel MSE, --sr-epochs on the GPU) or loads an `ferray sr train`
   checkpoint, or uses bicubic; upscales every face 48 -> 96 on the GPU (ferray.sr.inference).
2. Trains experiments/model_b.yaml (ResNet50, 1-channel stem, 88x88 crops, SGD + cosine, bf16,
   channels_last) on the 96x96 faces held on the GPU, and prints epoch time, images/s and PublicTest
   accuracy with and without ten-crop TTA. ImageNet weights are used if torchvision's cache has them
   (the GPU machines here have no internet and the 98 MB file exceeds what a run may carry): the
   output says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def train_srresnet(x: np.ndarray, device, epochs: int, smoke: bool):
    from ferray.config import load_config
    from ferray.engine import TensorBatches
    from ferray.sr import engine as sr_engine

    size = ["sr.generator_channels=8", "sr.generator_blocks=1"] if smoke else []
    cfg = load_config(REPO / "experiments" / "srgan.yaml", size + [f"sr.pretrain_epochs={epochs}", f"train.epochs={epochs}",
                                                                   "sr.content=mse", "sr.lr_g=0.0005"])
    state = sr_engine.build_sr_state(cfg, device)
    batches = TensorBatches(torch.from_numpy(x).to(device), torch.zeros(len(x), dtype=torch.long, device=device), 128)
    for epoch in range(epochs):
        metrics = sr_engine.train_sr_epoch(state, batches)
        print(f"  srresnet epoch {epoch + 1}/{epochs}: pixel mse {metrics['train_pixel_mse']:.5f} "
              f"({metrics['train_seconds']:.1f}s)", flush=True)
    return state.core.eval()


@torch.no_grad()
def upscale_all(generator, faces: np.ndarray, device, batch: int = 1024) -> np.ndarray:
    from ferray.sr.nets import bicubic

    out = []
    for i in range(0, len(faces), batch):
        x = torch.from_numpy(faces[i : i + batch]).to(device).float().unsqueeze(1) / 255.0
        y = generator(x) if generator is not None else bicubic(x, 2)
        out.append((y.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).cpu().numpy())
    return np.concatenate(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--sr-checkpoint", type=Path, help="an `ferray sr train` checkpoint")
    parser.add_argument("--sr-epochs", type=int, default=5, help="SRResNet epochs when no checkpoint is given")
    parser.add_argument("--bicubic", action="store_true", help="upscale by bicubic instead of SR")
    parser.add_argument("--epochs", type=int, help="override train.epochs (model_b.yaml: 30)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from bench.gpu_model_a import find_fer2013, load_fer2013
    from ferray import engine
    from ferray.config import load_config
    from ferray.models.resnet_vgg import IMAGENET_FILES

    data = find_fer2013(args.data)
    if data is None:
        print("no FER2013 found; pass --data", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    cached = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES["resnet50"]
    overrides = list(args.overrides) + [f"model.pretrained={'imagenet' if cached.is_file() else 'none'}"]
    overrides += [f"train.epochs={args.epochs}"] if args.epochs else []
    if args.smoke:
        overrides += ["model.name=resnet18_b", "train.epochs=1", "train.batch_size=16"]
    cfg = load_config(REPO / "experiments" / "model_b.yaml", overrides)

    splits = load_fer2013(data)
    (x, y), (xt, yt) = splits["Training"], splits["PublicTest"]
    if args.smoke:
        rng = np.random.default_rng(0)
        pick, pick_t = rng.permutation(len(y))[:256], rng.permutation(len(yt))[:128]
        x, y, xt, yt = x[pick], y[pick], xt[pick_t], yt[pick_t]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"data: {len(y):,} Training / {len(yt):,} PublicTest faces; device {gpu}; torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    if args.bicubic:
        generator, how = None, "bicubic"
    elif args.sr_checkpoint:
        from ferray.sr.engine import generator_from_checkpoint

        generator, how = generator_from_checkpoint(args.sr_checkpoint, device)[0], f"SRGAN {args.sr_checkpoint}"
    else:
        generator, how = train_srresnet(x, device, 1 if args.smoke else args.sr_epochs, args.smoke), "SRResNet (trained here)"
    x96, xt96 = upscale_all(generator, x, device), upscale_all(generator, xt, device)
    print(f"upscaled 48 -> 96 by {how} in {time.perf_counter() - t0:.1f}s", flush=True)

    train = engine.TensorBatches(torch.from_numpy(x96).to(device), torch.from_numpy(y).to(device), cfg.train.batch_size)
    test = engine.TensorBatches(torch.from_numpy(xt96).to(device), torch.from_numpy(yt).to(device), 512,
                                shuffle=False, drop_last=False)
    state = engine.build_state(cfg, device)
    pretrained = bool(getattr(state.core, "pretrained", False))
    print(f"model B: {cfg.model.name}, ImageNet-pretrained: {'yes' if pretrained else 'no (weights not in ' + str(cached.parent) + ')'}",
          flush=True)
    times = []
    for epoch in range(cfg.train.epochs):
        metrics = engine.train_one_epoch(state, train, len(train))
        result = engine.evaluate(state.core, test, cfg.augment.crop, False, device, state.use_amp)
        engine.end_epoch(state, metrics, result)
        times.append(metrics["train_seconds"])
        print(f"epoch {epoch + 1:>3}/{cfg.train.epochs}  {metrics['train_seconds']:6.1f}s  {metrics['images_per_s']:7,.0f} img/s  "
              f"loss {metrics['train_loss']:.4f}  PublicTest {result['accuracy']:6.2%}", flush=True)
    tta = engine.evaluate(state.core, test, cfg.augment.crop, True, device, state.use_amp)
    summary = {"device": gpu, "upscale": how, "pretrained": pretrained, "epochs": cfg.train.epochs,
               "epoch_seconds": float(np.median(times)), "public_test_accuracy": result["accuracy"],
               "public_test_accuracy_tta": tta["accuracy"], "smoke": args.smoke}
    print(f"done: {summary['epoch_seconds']:.1f}s/epoch; PublicTest {result['accuracy']:.2%}, ten-crop TTA "
          f"{tta['accuracy']:.2%} (pretrained: {'yes' if pretrained else 'no'})")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
