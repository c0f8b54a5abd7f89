"""`ferray distill ...`: the commands of distillation (ferray.distill)."""

from __future__ import annotations

from pathlib import Path


def add_distill(sub, formatter) -> None:
    p = sub.add_parser(
        "distill",
        formatter_class=formatter,
        help="teach Model A from the ensemble: the teacher bank",
        description="Distillation of the shipped ensemble into Model A. `bank` computes the teacher's "
        "fused probabilities for every face of a split on fixed views (the ten TTA views and "
        "augmented ones, each drawn from the seed and the face's id) with a Ray Data actor pool, and "
        "keeps them beside the prepared data (DATA/teacher_banks/NAME; derived from the data: never "
        "commit it).",
    )
    dsub = p.add_subparsers(dest="distill_command", metavar="<distill command>", required=True)
    b = dsub.add_parser(
        "bank",
        formatter_class=formatter,
        help="the teacher's probabilities on every view of a split",
        description="Every face of --split through the teacher bundle on --views views; written to "
        "DATA/teacher_banks/NAME with a manifest naming the data's checksum, the teacher's digest, "
        "the seed and the views, so a student never trains on a bank of other data or another teacher.",
    )
    b.add_argument("--bundle", default=None, help="the teacher bundle (default: the shipped one)")
    b.add_argument("--data", required=True, type=Path, help="prepared 48x48 data")
    b.add_argument("--split", default="Training", help="split (default: Training)")
    b.add_argument("--views", type=int, default=26, help="views per face: 10 TTA + augmented (default: 26)")
    b.add_argument("--seed", type=int, default=0, help="seed of the augmented views (default: 0)")
    b.add_argument("--actors", type=int, default=1, help="actors in the pool (default: 1)")
    b.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default: 1)")
    b.add_argument("--batch-size", type=int, default=128, help="faces per batch (default: 128)")
    b.add_argument("--name", help="the bank's folder name (default: TEACHER-SPLIT-Vv-sSEED)")
    b.set_defaults(func=cmd_distill_bank)


def cmd_distill_bank(args) -> int:
    from ferray.distributed.bank import make_bank

    out = make_bank(
        args.bundle,
        args.data,
        args.split,
        args.views,
        args.seed,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        name=args.name,
    )
    print(f"teacher bank: {out}")
    return 0
