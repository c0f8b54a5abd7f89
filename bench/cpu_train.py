"""Model A's training step on the CPU: fp32 against the fast path ferray picks, in one run.

    python -m bench.cpu_train [--steps 12] [--threads 2] [--model xception_a] [--batch 64]
    python -m bench.cpu_train --members      # each member model's fast-path step against Model A's
    python -m bench.cpu_train --online-teacher   # a student taught online by the shipped bundle, against labels

The same engine step (ferray.engine.train_one_epoch: augmentation, forward, joint loss, backward,
AdaMax, center update) on the same random faces, timed after warm-up steps:
- baseline: fp32, NCHW (train.amp false, train.channels_last false);
- fast path: what `ferray train` uses on this machine: channels_last, plus bf16 autocast where the
  CPU has native bf16 (AVX512-BF16 / AMX; ferray.device decides, and prints which).
Prints images/s of each and the ratio last. Target: >= 1.8x (met on CPUs with native bf16; an
AVX2-only CPU has only channels_last to gain, since emulated bf16 is slower than fp32).

With --online-teacher [BUNDLE]: a student's fast-path step taught online (distill.online: the
teacher bundle, the shipped one by default, answers every step's views) against the same step on
labels alone, in one run: what an online teacher costs against a teacher bank (whose step costs
what the labels' does).

With --members: the fast-path step of every ensemble member's model on its own crops (the
experiments/*_cpu.yaml recipes' models), each as a ratio to Model A's rate measured in the same run:
what a sitting's budget buys of each member.

Then the SR generator's training step (ferray.sr.engine.train_sr_epoch) with
experiments/srgan_cpu.yaml's networks, NCHW against channels_last (what `ferray sr train` uses), in
a pre-training epoch (pixel loss) and an adversarial one (the discriminator's step as well).
"""

from __future__ import annotations

import argparse
import time

import torch


def images_per_s(cfg, steps: int, batch: int, warmup: int = 3, size: int = 48) -> float:
    from ferray.engine import TensorBatches, build_state, train_one_epoch

    state = build_state(cfg, torch.device("cpu"))
    faces = torch.randint(0, 256, (batch * (steps + warmup), size, size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (len(faces),))
    train_one_epoch(state, TensorBatches(faces[: batch * warmup], labels[: batch * warmup], batch), warmup)
    timed = TensorBatches(faces[batch * warmup :], labels[batch * warmup :], batch)
    t0 = time.perf_counter()
    train_one_epoch(state, timed, steps)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="xception_a")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--members", action="store_true", help="each member model's step against Model A's")
    parser.add_argument(
        "--online-teacher",
        nargs="?",
        const="default",
        metavar="BUNDLE",
        help="a student's step with an online teacher (default: the shipped bundle) against one on labels",
    )
    args = parser.parse_args()
    if args.online_teacher:
        torch.set_num_threads(args.threads)
        online_rows(args.online_teacher, args.steps, args.batch, args.model)
        return
    if args.members:
        torch.set_num_threads(args.threads)
        member_rows(args.steps, args.batch)
        return

    from ferray.config import load_config
    from ferray.device import cpu_has_native_bf16, cpu_model, use_bf16

    torch.set_num_threads(args.threads)
    base = [f"model.name={args.model}", f"train.batch_size={args.batch}"]
    fp32 = load_config(None, [*base, "train.amp=false", "train.channels_last=false"])
    fast = load_config(None, base)  # the defaults: amp and channels_last on, as every experiment has them
    bf16 = use_bf16("cpu", fast.train.amp)
    print(
        f"cpu: {cpu_model()}, {args.threads} threads; native bf16: {cpu_has_native_bf16()}; fast path: channels_last"
        f"{' + bf16 autocast' if bf16 else ' (fp32: no native bf16 here)'}; {args.model}, batch {args.batch}, "
        f"{args.steps} timed steps",
        flush=True,
    )
    baseline = images_per_s(fp32, args.steps, args.batch)
    print(f"fp32 NCHW (baseline): {baseline:7.1f} img/s", flush=True)
    quick = images_per_s(fast, args.steps, args.batch)
    print(f"fast path:            {quick:7.1f} img/s", flush=True)
    print(f"fast path / fp32: {quick / baseline:.2f}x (target >= 1.8x)")
    sr_rows(args.steps, args.batch)


def online_rows(teacher: str, steps: int, batch: int, model: str) -> None:
    """The student's fast-path rate on labels, then with the online teacher, and their ratio."""
    from ferray.config import load_config
    from ferray.device import cpu_has_native_bf16, cpu_model

    sets = [f"model.name={model}", f"train.batch_size={batch}", "loss.center_lambda=0"]
    print(f"cpu: {cpu_model()}, native bf16: {cpu_has_native_bf16()}; {model}, batch {batch}, {steps} timed steps")
    alone = images_per_s(load_config(None, sets), steps, batch)
    print(f"on labels (or a teacher bank): {alone:7.1f} img/s", flush=True)
    taught = images_per_s(load_config(None, [*sets, "distill.online=true", f"distill.teacher={teacher}"]), steps, batch)
    print(f"online teacher ({teacher}):   {taught:7.1f} img/s", flush=True)
    print(f"online / labels: {taught / alone:.2f}x (the teacher's forward in every step)")


# the members' models with their crops: (label, registered model, crop)
MEMBERS = (
    ("Model A (xception_a)", "xception_a", 44),
    ("ResNet18 on 48x48 (resnet18_48)", "resnet18_48", 44),
    ("VGG, pooled head (vgg_gap)", "vgg_gap", 44),
    ("Model B (resnet18_b, 96x96 SR faces)", "resnet18_b", 88),
)


def member_rows(steps: int, batch: int) -> None:
    """Each member model's fast-path training rate and its ratio to Model A's (the first row)."""
    from ferray.config import load_config
    from ferray.device import cpu_has_native_bf16, cpu_model

    print(f"cpu: {cpu_model()}, native bf16: {cpu_has_native_bf16()}; batch {batch}, {steps} timed steps", flush=True)
    rates = {}
    for label, model, crop in MEMBERS:
        sets = [f"model.name={model}", f"train.batch_size={batch}", f"augment.crop={crop}"]
        cfg = load_config(None, [*sets, "loss.center_lambda=0"])
        rates[label] = images_per_s(cfg, steps, batch, size=96 if crop > 48 else 48)
        first = next(iter(rates.values()))
        print(f"{label:<38} {rates[label]:7.1f} img/s  ({rates[label] / first:.2f}x Model A's)", flush=True)


def sr_images_per_s(cfg, steps: int, batch: int, adversarial: bool, warmup: int = 2) -> float:
    from ferray.engine import TensorBatches
    from ferray.sr.engine import build_sr_state, train_sr_epoch

    state = build_sr_state(cfg, torch.device("cpu"))
    state.epoch = cfg.sr.pretrain_epochs if adversarial else 0
    faces = torch.randint(0, 256, (batch * (steps + warmup), 48, 48), dtype=torch.uint8)
    labels = torch.zeros(len(faces), dtype=torch.int64)
    train_sr_epoch(state, TensorBatches(faces[: batch * warmup], labels[: batch * warmup], batch), warmup)
    timed = TensorBatches(faces[batch * warmup :], labels[batch * warmup :], batch)
    t0 = time.perf_counter()
    train_sr_epoch(state, timed, steps)
    return steps * batch / (time.perf_counter() - t0)


def sr_rows(steps: int, batch: int) -> None:
    """srgan_cpu's step, NCHW against channels_last, in both phases."""
    from ferray.config import load_config
    from ferray.resources import recipe

    sets = [f"train.batch_size={batch}", "sr.content=mse"]
    nchw = load_config(recipe("srgan_cpu.yaml"), [*sets, "train.channels_last=false"])
    last = load_config(recipe("srgan_cpu.yaml"), sets)
    for phase, adversarial in (("pre-training", False), ("adversarial", True)):
        before = sr_images_per_s(nchw, steps, batch, adversarial)
        after = sr_images_per_s(last, steps, batch, adversarial)
        print(
            f"SR {phase:12s} (srgan_cpu nets): NCHW {before:7.1f} img/s, channels_last {after:7.1f} img/s "
            f"({after / before:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
