"""The commands of bundles: `ferray ensemble` (members fused into a bundle), `quantize`, `predict`
and `serve`, and the flags they share (--members, --int8)."""

from __future__ import annotations

import sys
from pathlib import Path

from ferray.cli_args import add_set_flag, echo, formatter
from ferray.errors import UsageError


def add_members_flag(p) -> None:
    p.add_argument(
        "--members",
        default="all",
        metavar="SET|NAMES",
        help="the members that answer: a set the bundle declares (all, the default: every member; fast: "
        "fewer members, cheaper per face) or member names as a comma list (e.g. a, or a,r18), fused at "
        "that set's own temperature; `ferray evaluate --bundle` shows every member and set",
    )


def add_int8_flag(p) -> None:
    p.add_argument(
        "--int8",
        action="store_true",
        help="forward Model A in int8 on the CPU (a bundle calibrated by `ferray quantize`; needs "
        "torchao: pip install 'ferray[int8]'); each batch shape compiles once, before its first answer",
    )


def add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize",
        formatter_class=formatter,
        help="calibrate a bundle's Model A for int8 CPU inference",
        description="Record Model A's activation ranges on the ten TTA views of --faces Training "
        "faces (the test splits stay untouched), write them into BUNDLE (model_a.int8.json, a few kB; "
        "the int8 weights are made from the bundle's own on load), then evaluate the int8 model on "
        "the splits the bundle was evaluated on and add those accuracies to bundle.json and "
        "MODEL_CARD.md. Needs torchao (pip install 'ferray[int8]'). Minutes on a CPU: calibrating, "
        "compiling and evaluating with TTA.",
    )
    p.add_argument(
        "bundle", type=Path, help="the bundle folder to calibrate (written into; copy the installed default first)"
    )
    p.add_argument("--data", required=True, type=Path, help="prepared 48x48 data folder with a Training split")
    p.add_argument("--member", help="the member to calibrate (default: the bundle's first, Model A in a paper bundle)")
    p.add_argument(
        "--faces", type=int, default=256, help="Training faces to calibrate on (default: 256, ten views each)"
    )
    p.add_argument("--seed", type=int, default=0, help="which faces (default: 0)")
    p.set_defaults(func=cmd_quantize)


def add_ensemble(sub) -> None:
    p = sub.add_parser(
        "ensemble",
        formatter_class=formatter,
        help="fuse any number of trained members into a serving bundle",
        description="Fuse trained members by the mean of their probabilities: equal weights by default "
        "(fitted weights only where they beat equal ones on the selection split by more than its "
        "bootstrap noise), then one temperature fitted on the selection split, and one per named "
        "set and per member for answers from fewer members. Members read the 48x48 face or, when "
        "they were trained on larger faces, the SR generator's (--sr, shared by all of them). The "
        "mean of log-probabilities and stacking are measured too and recorded. Every untouched "
        "split is then evaluated (center crop and TTA) for the model card. Writes the serving "
        "bundle OUT: bundle.json, half-precision checkpoints, confusion matrices and MODEL_CARD.md.",
    )
    p.add_argument(
        "--member",
        dest="members",
        action="append",
        default=[],
        metavar="NAME=CKPT",
        help="a member: its name (letters, digits, _) and checkpoint, e.g. r18=runs/resnet18_48_cpu/best.fp16.pt "
        "(repeatable; the first is the fast set's)",
    )
    p.add_argument("--a", type=Path, help="shorthand for --member a=CKPT (Model A)")
    p.add_argument("--b", type=Path, help="shorthand for --member b=CKPT (Model B)")
    p.add_argument("--sr", type=Path, help="the SR generator the members trained on larger faces read")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="NAME=M1,M2",
        help="a named set of members (repeatable; default: all = every member, or those --select "
        "chooses, fast = the first); a member a set names stays in the bundle for it",
    )
    p.add_argument(
        "--weights",
        choices=("auto", "equal", "fitted"),
        default="auto",
        help="the fusion's member weights: equal, fitted (min log-loss on the selection split), or auto: "
        "fitted only where they beat equal ones by more than the split's bootstrap noise",
    )
    p.add_argument(
        "--select",
        choices=("none", "greedy"),
        default="none",
        help="none: every member is kept; greedy: the members are candidates, and the bundle keeps those "
        "that greedy forward selection (equal weights) chooses on the selection split; the path is in the "
        "model card and a figure",
    )
    p.add_argument("--data", required=True, type=Path, help="prepared 48x48 data folder")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument(
        "--split", help="split the fusion is fitted on (default: the selection split the first member was chosen on)"
    )
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no ten-crop test-time augmentation")
    p.add_argument(
        "--no-tests",
        dest="tests",
        action="store_false",
        help="do not evaluate the untouched splits (faster; the model card then has no test figures)",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        type=Path,
        default=None,
        help="keep each member's answers on each split in DIR and read them back in later builds: building "
        "again with another candidate or set forwards only the members not answered before (an entry is "
        "found only for the same weights, views, precision and faces). Derived from the data: keep it "
        "beside the data, never publish it",
    )
    p.add_argument(
        "--center-only",
        metavar="auto|none|M1,M2",
        default="none",
        help="members served by the center crop alone (a tenth of their ten-crop cost): auto, the cheapest "
        "choice whose fused accuracy on the selection split is at least that of every member with ten "
        "crops; or the members named; none (default): every member with ten crops",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_ensemble)


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        formatter_class=formatter,
        help="classify the faces in images, without a server",
        description="The answer the HTTP API gives (/predict), for image files, from a bundle in "
        "this process: a summary on stderr and the JSON on stdout (or --json-out).",
    )
    p.add_argument("images", nargs="+", type=Path, help="PNG, JPEG, BMP or WebP files, or one video")
    p.add_argument(
        "--bundle", help="serving bundle (default: the model that ships with ferray, Model A trained on FER2013)"
    )
    p.add_argument(
        "--no-detect",
        dest="detect",
        action="store_false",
        help="classify each whole image as one face (no face detection)",
    )
    p.add_argument(
        "--detector",
        choices=("haar", "mtcnn"),
        default="haar",
        help="haar: OpenCV's cascade (default); mtcnn: the learned detector, which levels each face by its eyes "
        "(pip install 'ferray[mtcnn]')",
    )
    p.add_argument("--json-out", type=Path, help="write the JSON here instead of stdout")
    video = p.add_argument_group("videos (.mp4, .avi, .mov, .mkv, .webm: one at a time)")
    video.add_argument("--every", type=int, default=1, help="answer every N-th frame (default: every frame)")
    video.add_argument("--csv", action="store_true", help="CSV rows (one per face) instead of JSON lines")
    video.add_argument("--annotate", type=Path, help="write a copy of the video with boxes and labels here (.mp4)")
    add_int8_flag(p)
    add_members_flag(p)
    p.set_defaults(func=cmd_predict)


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        formatter_class=formatter,
        help="serve the ensemble over HTTP with Ray Serve",
        description="Start the Serve application of serve/config.yaml for BUNDLE on the Ray this "
        "command connects to (embedded by default) and print its URL. Ctrl-C or SIGTERM shuts the "
        "application (and an embedded Ray) down. API docs at URL/docs, a web page at URL/.",
    )
    p.add_argument(
        "--bundle",
        help="serving bundle (`ferray ensemble` or `ferray demo`; default: the model that ships "
        "with ferray, Model A trained on FER2013)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--config", type=Path, help="Serve config (default: serve/config.yaml of the package)")
    add_set_flag(p, "override an application arg, e.g. --set model_a.max_batch_size=1 (repeatable)")
    add_members_flag(p)
    limits = p.add_argument_group(
        "limits per client address",
        "kept by the HAProxy in front of a Ray this command starts (on a cluster: your load balancer's); "
        "0 turns one off",
    )
    limits.add_argument(
        "--client-requests-per-s",
        type=float,
        metavar="N",
        help="requests a second from one address, over 10 s; beyond, each request is held 2 s, then "
        "answered 429 (default: 200)",
    )
    limits.add_argument(
        "--client-upload-mb-per-s",
        type=float,
        metavar="MB",
        help="request bodies of one address share this bandwidth; larger uploads are forwarded slower, "
        "not refused (default: 8)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_ensemble(args) -> int:
    from ferray.bundle import build_bundle

    build_bundle(
        ensemble_members(args),
        args.sr,
        args.data,
        args.out,
        split=args.split,
        tta=args.tta,
        overwrite=args.overwrite,
        tests=args.tests,
        sets=_named_lists(args.sets, "--set") or None,
        weights=args.weights,
        select=args.select,
        cache=args.cache,
        center_only=args.center_only,
    )
    return 0


def ensemble_members(args) -> dict[str, Path]:
    """--a, --b and every --member NAME=CKPT, in that order; each name once."""
    members: dict[str, Path] = {}
    pairs = [("a", args.a), ("b", args.b)] + [
        (name, Path(path)) for name, path in _named_values(args.members, "--member").items()
    ]
    for name, path in pairs:
        if path is None:
            continue
        if name in members:
            raise UsageError(f"member {name!r} is given twice")
        members[name] = path
    if not members:
        raise UsageError("no members: give --member NAME=CKPT (repeatable), or --a CKPT [--b CKPT]")
    return members


def _named_values(items: list[str], flag: str) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"{flag} {item!r}: write NAME=VALUE")
        if name.strip() in values:
            raise UsageError(f"{flag} {name.strip()!r} is given twice")
        values[name.strip()] = value.strip()
    return values


def _named_lists(items: list[str], flag: str) -> dict[str, list[str]]:
    return {
        name: [v.strip() for v in value.split(",") if v.strip()] for name, value in _named_values(items, flag).items()
    }


def cmd_quantize(args) -> int:
    from ferray.quantize import quantize_bundle

    quantize_bundle(args.bundle, args.data, faces=args.faces, seed=args.seed, member=args.member)
    return 0


def cmd_predict(args) -> int:
    from ferray.predict import format_answers, predict_files, to_json
    from ferray.video import is_video

    if any(is_video(path) for path in args.images):
        return _predict_video(args)
    answers = predict_files(
        args.bundle, args.images, detect=args.detect, int8=args.int8, members=args.members, detector=args.detector
    )
    echo(format_answers(answers))
    if args.json_out:
        args.json_out.write_text(to_json(answers) + "\n")
    else:
        print(to_json(answers))
    return 0


def _predict_video(args) -> int:
    from ferray.api import Predictor
    from ferray.errors import UsageError
    from ferray.video import predict_video_file

    if len(args.images) != 1:
        raise UsageError("give one video at a time (images may be given several)")
    predictor = Predictor(args.bundle, int8=args.int8, members=args.members, detector=args.detector)
    out = open(args.json_out, "w", newline="") if args.json_out else sys.stdout  # noqa: SIM115 - closed below
    try:
        predict_video_file(predictor, args.images[0], out, args.every, args.csv, args.annotate, progress=echo)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_serve(args) -> int:
    from ferray.distributed.client_limits import export_limits
    from ferray.distributed.serving import serve_forever

    export_limits(args.client_requests_per_s, args.client_upload_mb_per_s)  # before its Ray starts
    overrides = args.overrides + ([f"members={args.members}"] if args.members != "all" else [])
    serve_forever(args.bundle, port=args.port, host=args.host, config=args.config, overrides=overrides)
    return 0
