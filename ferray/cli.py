"""The `ferray` command: one subcommand per pipeline stage.

Subcommands import their stage lazily, so `ferray --help` is instant and nothing starts Ray until
a stage needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ferray import __version__

EPILOG = """\
stages: synth | prepare -> (later: sr, train, tune, ensemble, evaluate, serve, report)
Ray: set RAY_ADDRESS (or run under `ray job submit`) to use a cluster; otherwise an embedded Ray
is started on this machine. Run `ferray <command> --help` for each command's options.
"""


def _formatter(prog):
    return argparse.HelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferray", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Facial-expression recognition on FER2013, trained, tuned and served with Ray.",
    )
    parser.add_argument("--version", action="version", version=f"ferray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_demo(sub)
    _add_prepare(sub)
    _add_synth(sub)
    _add_info(sub)
    return parser


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", formatter_class=_formatter, help="run the pipeline end to end on synthetic faces",
                       description="Run the whole pipeline on synthetic faces on an embedded Ray: make a "
                       "synthetic fer2013.csv, prepare it, and print its manifest. Every artifact goes "
                       "under --out; rerunning replaces the previous demo there.")
    p.add_argument("--out", type=Path, default=None, help="folder for every artifact (default: ./ferray-demo)")
    p.add_argument("--n", type=int, default=1400, help="synthetic faces to make (default: 1400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", formatter_class=_formatter, help="FER2013 in any common form -> Parquet + manifest",
                       description="Turn FER2013 into the prepared-data contract (Parquet per split + "
                       "manifest.json) with Ray Data. Sources: Kaggle fer2013.csv, icml_face_data.csv, "
                       "an image folder ROOT/{train,test}/<emotion>/<Usage>_<id>.jpg, or a .zip of "
                       "either. The output appears only when complete.")
    p.add_argument("--source", required=True, type=Path, help="fer2013.csv, icml_face_data.csv, image folder or .zip")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="error (default): stop at the first bad record, naming it; skip: skip bad records, "
                   "count them by kind in the manifest and list them in rejected.csv")
    p.add_argument("--resize", action="store_true",
                   help="resize images that are not 48x48 (counted in the manifest) instead of rejecting them")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    p.set_defaults(func=cmd_prepare)


def _add_synth(sub) -> None:
    from ferray.data.synth import FORMATS

    p = sub.add_parser("synth", formatter_class=_formatter, help="write synthetic FER-like faces",
                       description="Write synthetic 48x48 faces whose expression follows the 7 FER2013 "
                       "labels, with random pose, lighting, noise and occluders. parquet writes the "
                       "prepared contract directly; the other formats write a source for `ferray prepare`.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of faces (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same faces")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="output form (default: parquet)")
    p.add_argument("--balance", choices=("uniform", "fer"), default="uniform",
                   help="class balance: uniform (default) or FER2013's Training frequencies")
    p.add_argument("--difficulty", type=float, default=1.0, help="scale of expression spread and nuisances (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_synth)


def _add_info(sub) -> None:
    p = sub.add_parser("info", formatter_class=_formatter, help="print a prepared dataset's manifest",
                       description="Print a prepared dataset's manifest: source, counts per split and class, "
                       "skipped records, checksum.")
    p.add_argument("dir", type=Path, help="a folder written by `ferray prepare` or `ferray synth`")
    p.add_argument("--json", action="store_true", help="print the raw manifest.json")
    p.add_argument("--verify", action="store_true", help="re-read every file and check counts and checksum")
    p.set_defaults(func=cmd_info)


# ------------------------------------------------------------------------------------- commands
def cmd_prepare(args) -> int:
    from ferray.data.prepare import prepare

    manifest = prepare(args.source, args.out, on_bad=args.on_bad_record, resize=args.resize,
                       overwrite=args.overwrite, echo=_echo)
    print(format_manifest(manifest, args.out))
    return 0


def cmd_synth(args) -> int:
    from ferray.data.synth import SynthSpec, synthesize

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    result = synthesize(args.out, SynthSpec(n=args.n, seed=args.seed, balance=args.balance,
                                            difficulty=args.difficulty), args.format, args.overwrite)
    if args.format == "parquet":
        print(format_manifest(result, args.out))
    else:
        print(f"wrote {args.n} synthetic faces as {args.format} to {args.out} ({result['splits']})")
    return 0


def cmd_info(args) -> int:
    from ferray.data.contract import read_manifest, summarize

    manifest = read_manifest(args.dir)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(manifest, args.dir))
    if args.verify:
        found = summarize(args.dir)
        ok = found.checksum == manifest["checksum"] and found.splits() == manifest["splits"]
        print(f"verify: {'OK' if ok else 'MISMATCH'} (files: {found.rows} rows, {found.checksum})")
        return 0 if ok else 1
    return 0


def cmd_demo(args) -> int:
    from ferray.demo import run_demo

    run_demo(args.out, n=args.n, seed=args.seed, echo=_echo)
    return 0


# ---------------------------------------------------------------------------------------- output
def format_manifest(m: dict, root) -> str:
    from ferray.data.contract import EMOTIONS

    h, w = m["image_size"]
    src = m.get("source", {})
    lines = [f"{root}: {m['rows']:,} faces, {h}x{w} grayscale ({m['format']})",
             f"source: {src.get('path', src.get('kind', '?'))}" + (f" [{src['kind']}]" if "path" in src else "")]
    names = ["split", *EMOTIONS, "total"]
    width = [max(11, len(n) + 1) if i == 0 else max(8, len(n) + 1) for i, n in enumerate(names)]
    lines.append("".join(n.ljust(width[0]) if i == 0 else n.rjust(width[i]) for i, n in enumerate(names)))
    for split, info in m["splits"].items():
        cells = [split.ljust(width[0])]
        cells += [f"{info['classes'][e]:,}".rjust(width[i + 1]) for i, e in enumerate(EMOTIONS)]
        cells.append(f"{info['rows']:,}".rjust(width[-1]))
        lines.append("".join(cells))
    skipped = m.get("skipped", {})
    if skipped.get("total"):
        kinds = ", ".join(f"{k} {n}" for k, n in skipped["by_kind"].items())
        lines.append(f"skipped: {skipped['total']} bad records ({kinds}); listed in {skipped.get('records_file')}")
    else:
        lines.append("skipped: none")
    for key, value in m.get("notes", {}).items():
        lines.append(f"note: {key}: {value}")
    lines.append(f"checksum: {m['checksum']}")
    return "\n".join(lines)


class UsageError(Exception):
    pass


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from ferray.data.contract import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, UsageError) as e:
        print(f"ferray {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ferray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
