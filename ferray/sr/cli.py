"""`ferray sr ...`: the SRGAN's commands (train, upscale a dataset, evaluate)."""

from __future__ import annotations

from pathlib import Path

from ferray.cli_args import experiment_config, format_manifest_of, run_flags


def add_sr(sub, formatter) -> None:
    p = sub.add_parser(
        "sr",
        formatter_class=formatter,
        help="SRGAN x2: train, upscale a dataset, evaluate",
        description="Super-resolution of the faces (SRGAN x2): train the generator on 24 -> 48 "
        "pairs made from the faces themselves, upscale a prepared dataset 48 -> 96 with a Ray "
        "Data actor pool, and measure PSNR/SSIM against bicubic.",
    )
    srsub = p.add_subparsers(dest="sr_command", metavar="<sr command>", required=True)
    t = srsub.add_parser(
        "train",
        formatter_class=formatter,
        help="train the SRGAN with Ray Train",
        description="Pre-train the generator with pixel MSE (SRResNet), then train it "
        "adversarially (content + 1e-3 adversarial loss), through Ray Train like `ferray train` "
        "(checkpoints, --resume, metrics.jsonl). The run records which content loss was used.",
    )
    t.add_argument("experiment", type=Path, help="an experiments/*srgan*.yaml file")
    run_flags(
        t,
        "run",
        "--workers",
        "data-parallel workers",
        "total epochs, pre-training included",
        "e.g. --set sr.content=mse",
    )
    t.set_defaults(func=cmd_sr_train)
    u = srsub.add_parser(
        "upscale",
        formatter_class=formatter,
        help="upscale a prepared dataset 48 -> 96",
        description="Apply the generator to every split 48 -> 96 with Ray Data map_batches over "
        "an actor pool (one GPU per actor where there are GPUs), writing the prepared-data "
        "contract at 96x96 with a manifest that records the generator checkpoint.",
    )
    u.add_argument("--checkpoint", type=Path, help="an `ferray sr train` checkpoint (e.g. RUN/best.pt)")
    u.add_argument("--data", required=True, type=Path, help="prepared 48x48 data")
    u.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    u.add_argument(
        "--method",
        choices=("srgan", "bicubic"),
        default="srgan",
        help="srgan (default) or the bicubic baseline (no --checkpoint needed)",
    )
    u.add_argument("--actors", type=int, default=1, help="actors in the pool (default: 1)")
    u.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default: 0, CPU)")
    u.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor when on CPU (default: 1)"
    )
    u.add_argument("--batch-size", type=int, default=256, help="faces per batch (default: 256)")
    u.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    u.set_defaults(func=cmd_sr_upscale)
    e = srsub.add_parser(
        "eval",
        formatter_class=formatter,
        help="PSNR/SSIM of SR vs bicubic, and a figure",
        description="PSNR and SSIM of the generator against bicubic at 24 -> 48 on a split "
        "of the 48x48 data, and a PNG grid of LR / bicubic / SR / HR faces (the paper's Figure 2).",
    )
    e.add_argument("--checkpoint", required=True, type=Path, help="an `ferray sr train` checkpoint")
    e.add_argument("--data", required=True, type=Path, help="prepared 48x48 data")
    e.add_argument("--split", default="PublicTest", help="split (default: PublicTest)")
    e.add_argument("--out", type=Path, help="folder for the JSON and the PNG (default: beside the checkpoint)")
    e.set_defaults(func=cmd_sr_eval)


def cmd_sr_train(args) -> int:
    from ferray.distributed.train import run_training
    from ferray.tasks import SR

    run_training(experiment_config(args), args.out, name=args.name, resume=args.resume, task=SR)
    return 0


def cmd_sr_upscale(args) -> int:
    from ferray.distributed.upscale import upscale

    manifest = upscale(
        args.data,
        args.out,
        args.method,
        str(args.checkpoint) if args.checkpoint else None,
        args.actors,
        args.gpus_per_actor,
        args.batch_size,
        args.overwrite,
        cpus_per_actor=args.cpus_per_actor,
    )
    print(format_manifest_of(manifest, args.out))
    return 0


def cmd_sr_eval(args) -> int:
    from ferray.sr.evaluation import evaluate_generator

    evaluate_generator(args.checkpoint, args.data, args.split, args.out)
    return 0
