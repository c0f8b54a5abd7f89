"""The `ferray` command: one subcommand per pipeline stage.

Subcommands import their stage lazily, so `ferray --help` is instant and nothing starts Ray until
a stage needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ferray import __version__
from ferray.cli_args import add_set_flag, echo, experiment_config, flag_overrides, format_manifest_of, run_flags
from ferray.cli_args import formatter as _formatter
from ferray.cli_bundles import add_ensemble, add_int8_flag, add_members_flag, add_predict, add_quantize, add_serve
from ferray.errors import UsageError

EPILOG = """\
stages: synth | prepare -> sr train -> sr upscale -> train / tune -> evaluate -> ensemble [-> quantize]
        -> serve / predict
the paper: report (every run, Table 1, Figures 2-5); explain (guided backprop); crops (training views)
Ray: set RAY_ADDRESS (or run under `ray job submit`) to use a cluster; otherwise an embedded Ray
is started on this machine. Run `ferray <command> --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferray",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Facial-expression recognition on FER2013, trained, tuned and served with Ray.",
    )
    parser.add_argument("--version", action="version", version=f"ferray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_demo(sub)
    _add_prepare(sub)
    _add_synth(sub)
    _add_info(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_models(sub)
    _add_sr(sub)
    _add_tune(sub)
    add_ensemble(sub)
    add_quantize(sub)
    add_predict(sub)
    add_serve(sub)
    _add_explain(sub)
    _add_crops(sub)
    _add_report(sub)
    _add_distill(sub)
    _add_verbosity(parser)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-q / -v on every command and subcommand (ferray -v train ..., ferray train ... -q)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        default=argparse.SUPPRESS,
        help="only warnings and errors (progress lines of training workers still show)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        default=argparse.SUPPRESS,
        help="debug messages too",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbosity(child)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=_formatter,
        help="run the pipeline end to end on synthetic faces",
        description="Run the whole pipeline on synthetic faces on an embedded Ray: a synthetic "
        "fer2013.csv -> prepare -> Model A -> SRGAN -> upscale -> a Tune search -> Model B -> the "
        "ensemble bundle -> Ray Serve over HTTP -> the paper's report (OUT/report/report.html). A few "
        "minutes on a laptop; it prints the seconds each step took. Every artifact goes under --out; "
        "rerunning replaces the previous demo there.",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for every artifact (default: ./ferray-demo)")
    p.add_argument("--n", type=int, default=1400, help="synthetic faces to make (default: 1400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        formatter_class=_formatter,
        help="FER2013 in any common form -> Parquet + manifest",
        description="Turn FER2013 into the prepared-data contract (Parquet per split + "
        "manifest.json) with Ray Data. Sources: Kaggle fer2013.csv, icml_face_data.csv, "
        "an image folder ROOT/{train,test}/<emotion>/<Usage>_<id>.jpg, or a .zip of "
        "either. The output appears only when complete.",
    )
    p.add_argument("--source", required=True, type=Path, help="fer2013.csv, icml_face_data.csv, image folder or .zip")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    p.add_argument(
        "--on-bad-record",
        choices=("error", "skip"),
        default="error",
        help="error (default): stop at the first bad record, naming it; skip: skip bad records, "
        "count them by kind in the manifest and list them in rejected.csv",
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="resize images that are not 48x48 (counted in the manifest) instead of rejecting them",
    )
    p.add_argument(
        "--validation",
        default="auto",
        metavar="auto|none|FRACTION",
        help="carve a class-stratified Validation split from Training to select models on: auto "
        "(default) carves 10%% when the source has no PrivateTest, so that PublicTest stays an "
        "untouched test; with PrivateTest, FER2013's own protocol selects on PublicTest",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the Validation faces and the Training order (default: 0)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)"
    )
    p.set_defaults(func=cmd_prepare)


def _add_synth(sub) -> None:
    from ferray.data.synth import FORMATS

    p = sub.add_parser(
        "synth",
        formatter_class=_formatter,
        help="write synthetic FER-like faces",
        description="Write synthetic 48x48 faces whose expression follows the 7 FER2013 "
        "labels, with random pose, lighting, noise and occluders. parquet writes the "
        "prepared contract directly; the other formats write a source for `ferray prepare`.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of faces (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same faces")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="output form (default: parquet)")
    p.add_argument(
        "--balance",
        choices=("uniform", "fer"),
        default="uniform",
        help="class balance: uniform (default) or FER2013's Training frequencies",
    )
    p.add_argument(
        "--difficulty", type=float, default=1.0, help="scale of expression spread and nuisances (default: 1)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_synth)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        formatter_class=_formatter,
        help="print a prepared dataset's manifest",
        description="Print a prepared dataset's manifest: source, counts per split and class, "
        "skipped records, checksum.",
    )
    p.add_argument("dir", type=Path, help="a folder written by `ferray prepare` or `ferray synth`")
    p.add_argument("--json", action="store_true", help="print the raw manifest.json")
    p.add_argument("--verify", action="store_true", help="re-read every file and check counts and checksum")
    p.set_defaults(func=cmd_info)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=_formatter,
        help="train a model with Ray Train",
        description="Train the experiment's model with Ray Train (TorchTrainer, DDP across "
        "workers): a checkpoint every epoch, the best kept by eval accuracy, lost workers "
        "restarted from the latest checkpoint. The run folder OUT/NAME holds config.yaml, "
        "metrics.jsonl, TensorBoard events, Ray's checkpoints, best.pt, best.fp16.pt (the selected weights in half "
        "precision: the file to keep) and result.json.",
    )
    p.add_argument("experiment", type=Path, help="an experiments/*.yaml file")
    run_flags(p, "run", "--workers", "data-parallel workers", "epochs", "e.g. --set optim.lr=0.003")
    p.add_argument(
        "--init",
        type=Path,
        metavar="WEIGHTS",
        help="a warm restart: start from the weights of a checkpoint of the same model (best.fp16.pt, best.pt, "
        "a bundle's member file), loaded strictly; the optimizer starts fresh and optim.warmup_epochs "
        "rises to optim.lr (set a lower peak for a second sitting). The run records the chain of "
        "runs it continues (overrides train.init)",
    )
    p.set_defaults(func=cmd_train)


# Flags shared by the commands that train (train, sr train, tune): each maps onto one config key.
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        formatter_class=_formatter,
        help="evaluate a checkpoint on a split",
        description="Accuracy, per-class accuracy and the normalized confusion matrix (PNG and "
        "JSON) of a checkpoint on any split of a prepared dataset. Runs on a GPU if there is one.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="a checkpoint file (e.g. RUN/best.pt)")
    what.add_argument(
        "--bundle",
        help="a serving bundle (`ferray ensemble`), or `default` for the model that ships "
        "with ferray: the bundle's report with each member's accuracy beside it",
    )
    p.add_argument("--data", required=True, type=Path, help="prepared data folder")
    p.add_argument("--split", default="PublicTest", help="split to evaluate (default: PublicTest)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ten-crop test-time augmentation (4 corners + center, mirrored); default: off for a "
        "checkpoint, as the bundle says for --bundle",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder for eval-<split>[-tta].json/.png (default: beside the checkpoint; "
        "for --bundle, none are written unless --out is given: a bundle may be the installed default)",
    )
    add_int8_flag(p)
    add_members_flag(p)
    p.set_defaults(func=cmd_evaluate)


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        formatter_class=_formatter,
        help="list the registered models",
        description="Every registered model with its parameters (PyTorch and Keras counting), "
        "depth and training input size.",
    )
    p.set_defaults(func=cmd_models)


def _add_sr(sub) -> None:
    from ferray.sr.cli import add_sr

    add_sr(sub, _formatter)


def _add_distill(sub) -> None:
    from ferray.distill.cli import add_distill

    add_distill(sub, _formatter)


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        formatter_class=_formatter,
        help="search hyperparameters with Ray Tune + Optuna + ASHA",
        description="Search an experiment's hyperparameters (e.g. the learning rate and the center-loss "
        "lambda) with Ray Tune: Optuna's TPE (seeded; the base config's values evaluated first), ASHA "
        "stopping weak trials early, each trial the training of `ferray train` (a one-worker trial in its "
        "own Tune actor, a multi-worker one as a Ray Train run). Writes trials.csv, "
        "search.png, best.yaml (ready for `ferray train`) and best.pt under OUT/NAME.",
    )
    p.add_argument("search", type=Path, help="a search file, e.g. experiments/tune_a.yaml")
    p.add_argument("--samples", type=int, help="number of trials (overrides search.samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at a time (default: what the resources allow)")
    run_flags(
        p,
        "search",
        "--workers-per-trial",
        "Ray Train workers per trial",
        "epochs per trial (ASHA's max_t)",
        "of the base experiment, e.g. --set train.batch_size=32",
    )
    p.set_defaults(func=cmd_tune)


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        formatter_class=_formatter,
        help="guided-backprop maps of a classifier's decision",
        description="Guided back-propagation (Springenberg et al. 2015): which pixels of a face raise "
        "a class's score. Give image files (each a face, or a photo with --detect), or --data to draw "
        "--per-class faces of each class of a split as one grid (the report's Figure 4). Writes PNG "
        "(+ JSON for images).",
    )
    p.add_argument("checkpoint", type=Path, help="a classifier checkpoint (RUN/best.pt, or a bundle's model_a.pt)")
    p.add_argument("images", nargs="*", type=Path, help="PNG, JPEG, BMP or WebP files")
    p.add_argument("--data", type=Path, help="prepared data: explain faces of --split instead of images")
    p.add_argument("--split", default="PublicTest", help="split for --data (default: PublicTest)")
    p.add_argument("--per-class", type=int, default=2, help="faces per class for --data (default: 2)")
    p.add_argument("--target", help="class to explain, e.g. happy (default: each face's predicted class)")
    p.add_argument("--detect", action="store_true", help="find faces in the images first (Haar cascade)")
    p.add_argument(
        "--out",
        type=Path,
        help="PNG to write (one image or --data), or a folder (several images); "
        "default: beside the image / the checkpoint",
    )
    p.set_defaults(func=cmd_explain)


def _add_crops(sub) -> None:
    p = sub.add_parser(
        "crops",
        formatter_class=_formatter,
        help="draw a face's random training views",
        description="A Training face and COUNT random views of it exactly as training makes them "
        "(crop, flip, rotation, shift, zoom, jitter per the experiment's augment section): the "
        "report's Figure 3, and a quick look at an augmentation before training with it.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="take the augmentation from a checkpoint's config")
    what.add_argument("--experiment", type=Path, help="take it from an experiments/*.yaml file")
    p.add_argument("--data", required=True, type=Path, help="prepared data folder")
    p.add_argument("--index", type=int, default=0, help="which Training face (default: 0)")
    p.add_argument("--count", type=int, default=8, help="views to draw (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_set_flag(p, "override a config value, e.g. --set augment.rotation=20 (repeatable)")
    p.add_argument("--out", type=Path, default=Path("crops.png"), help="PNG to write (default: crops.png)")
    p.set_defaults(func=cmd_crops)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        formatter_class=_formatter,
        help="the paper reproduced: every run, Table 1, Figures 2-5",
        description="Run (or reuse) every experiment of a report plan on prepared data: the VGG "
        "baselines, Model A, the SRGAN and the upscaled faces, Model B, the ensemble; evaluate each "
        "on PublicTest and PrivateTest with TTA off and on; draw Figures 2-5; write OUT/report.md, "
        "report.html and report.json. Training runs are Ray Train runs (on a cluster, they use the "
        "cluster; the plan's concurrent_runs trains independent ones at once). A finished run whose "
        "config matches is reused, an interrupted one resumed.",
    )
    p.add_argument("plan", type=Path, help="a report plan, e.g. experiments/paper.yaml or experiments/paper_debug.yaml")
    p.add_argument("--data", type=Path, help="prepared 48x48 data (overrides the plan's data)")
    p.add_argument(
        "--out", type=Path, default=Path("report"), help="folder for the runs, figures and report (default: ./report)"
    )
    p.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        metavar="RUNS",
        help="a folder of finished runs to reuse where their config matches (repeatable), e.g. ferray-demo/runs",
    )
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="never train: stop, naming the run and why, when a run has no finished match to reuse",
    )
    add_set_flag(p, "override a value in every run, e.g. --set scaling.gpus_per_worker=1 (repeatable)")
    p.set_defaults(func=cmd_report)


# ------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from ferray.distributed.train import run_training

    cfg = experiment_config(args)
    run_training(cfg, args.out, name=args.name, resume=args.resume)
    return 0


def cmd_tune(args) -> int:
    from ferray.distributed.tune import load_search, run_search

    spec = load_search(args.search, flag_overrides(args))
    if args.samples is not None:
        spec.samples = args.samples
    if args.max_concurrent is not None:
        spec.max_concurrent = args.max_concurrent
    if args.name:
        spec.name = args.name
    run_search(spec, args.out, resume=args.resume)
    return 0


def cmd_evaluate(args) -> int:
    if args.bundle is not None:
        from ferray.bundle import evaluate_bundle

        evaluate_bundle(
            args.bundle, args.data, args.split, args.out, tta=args.tta, int8=args.int8, members=args.members
        )
        return 0
    if args.int8:
        raise UsageError("--int8 needs --bundle: the int8 calibration lives in a bundle (`ferray quantize BUNDLE`)")
    if args.members != "all":
        raise UsageError("--members needs --bundle: a checkpoint is one model already")
    from ferray.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.data, args.split, bool(args.tta), args.out)
    return 0


def cmd_models(args) -> int:
    from ferray.models.registry import models_table

    print(models_table())
    return 0


def cmd_prepare(args) -> int:
    from ferray.distributed.prepare import prepare

    manifest = prepare(
        args.source,
        args.out,
        on_bad=args.on_bad_record,
        resize=args.resize,
        overwrite=args.overwrite,
        validation=args.validation,
        seed=args.seed,
    )
    print(format_manifest_of(manifest, args.out))
    return 0


def cmd_synth(args) -> int:
    from ferray.data.synth import SynthSpec, synthesize

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    result = synthesize(
        args.out,
        SynthSpec(n=args.n, seed=args.seed, balance=args.balance, difficulty=args.difficulty),
        args.format,
        args.overwrite,
    )
    if args.format == "parquet":
        print(format_manifest_of(result, args.out))
    else:
        print(f"wrote {args.n} synthetic faces as {args.format} to {args.out} ({result['splits']})")
    return 0


def cmd_info(args) -> int:
    from ferray.data.contract import read_manifest, verify

    manifest = read_manifest(args.dir)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest_of(manifest, args.dir))
    if args.verify:
        ok, found = verify(args.dir, manifest)
        print(f"verify: {'OK' if ok else 'MISMATCH'} (files: {found.rows} rows, {found.checksum})")
        return 0 if ok else 1
    return 0


def cmd_demo(args) -> int:
    from ferray.distributed.demo import run_demo

    run_demo(args.out, n=args.n, seed=args.seed)
    return 0


def cmd_explain(args) -> int:
    from ferray.explain import explain_image, explain_split

    if args.data is not None:
        if args.images:
            raise UsageError("give image files or --data, not both")
        if args.per_class < 1:
            raise UsageError("--per-class must be at least 1")
        explain_split(args.checkpoint, args.data, args.split, args.per_class, args.out)
        return 0
    if not args.images:
        raise UsageError("give at least one image file, or --data to explain faces of a prepared split")
    for image in args.images:
        out = args.out
        if out is not None and len(args.images) > 1:
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"{image.stem}-explain.png"
        explain_image(args.checkpoint, image, out, target=args.target, detect=args.detect)
    return 0


def cmd_crops(args) -> int:
    from ferray.figures import training_views

    path = training_views(
        args.data,
        args.out,
        checkpoint=args.checkpoint,
        experiment=args.experiment,
        overrides=args.overrides,
        index=args.index,
        count=args.count,
        seed=args.seed,
    )
    echo(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from ferray.distributed.report import run_report
    from ferray.report.plan import load_plan

    plan = load_plan(args.plan, data=args.data, sets=args.overrides)
    run_report(plan, args.out, reuse=args.reuse, reuse_only=args.reuse_only)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ferray.errors import FerrayError
    from ferray.logs import configure

    parser = build_parser()
    args = parser.parse_args(argv)
    configure(getattr(args, "verbosity", 0))
    try:
        return args.func(args)
    except FerrayError as e:
        print(f"ferray {args.command}: error: {e}", file=sys.stderr)
        return e.exit_status
    except BrokenPipeError:  # `ferray models | head`: the reader left; nothing to say to it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout at exit)
        return 0
    except KeyboardInterrupt as e:
        print(f"ferray {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
