"""The report itself: Table 1, Figures 2-5, per-class accuracy, confusions, runs, commands, configs.

Every number comes from `record` (built by ferray.distributed.report from the runs' own files); report.json
holds that record, so the tables can be checked against the files they came from.
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
from pathlib import Path

from ferray import __version__
from ferray.bundle.card import VIEWS
from ferray.labels import EMOTIONS
from ferray.metrics import most_confused
from ferray.report.plan import ReportPlan
from ferray.report.render import Document


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def paper_pct(value) -> str:
    return "n/a" if value is None else f"{value:.3f}%"


def count(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def _rel(path, out: Path) -> str:
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return str(path)


def _q(path) -> str:
    return shlex.quote(str(path))


# ------------------------------------------------------------------------------------------ tables
def row_label(spec, facts: dict) -> str:
    """A run's label; "(from scratch)" where its experiment fine-tunes pretrained weights but the run
    trained without them (its scratch recipe, or a bench without the weights)."""
    from ferray.config import load_config

    wanted = load_config(spec.experiment).model.pretrained not in ("none", "")
    return f"{spec.label} (from scratch)" if wanted and facts.get("pretrained") is False else spec.label


def table1_rows(plan: ReportPlan, record: dict) -> list[list[str]]:
    splits, rows = record["splits"], []
    for spec in plan.runs:
        facts, evals, paper = record["models"][spec.key], record["evaluations"][spec.key], plan.paper.get(spec.key, {})
        rows.append(
            [
                row_label(spec, facts),
                count(facts["keras_params"]),
                str(facts["depth"] or "-"),
                *[pct(evals[s][v]["accuracy"]) if s in evals else "n/a" for s in splits for v in VIEWS],
                count(paper.get("params")),
                str(paper.get("depth", "n/a")),
                paper_pct(paper.get("PublicTest")),
                paper_pct(paper.get("PrivateTest")),
            ]
        )
    for row in plan.not_run:
        paper = plan.paper.get(row.key, {})
        rows.append(
            [
                f"{row.label} (not run here: `{row.command}`)",
                "-",
                "-",
                *["n/a"] * (2 * len(splits)),
                count(paper.get("params")),
                str(paper.get("depth", "n/a")),
                paper_pct(paper.get("PublicTest")),
                paper_pct(paper.get("PrivateTest")),
            ]
        )
    keys = list(plan.ensemble.values())
    ensemble, paper = record["ensemble"], plan.paper.get("ensemble", {})
    rows.append(
        [
            f"Ensemble ({' + '.join(keys)})",
            count(sum(record["models"][key]["keras_params"] for key in keys)),
            "-",
            *[pct(ensemble[s][v]["accuracy"]) if s in ensemble else "n/a" for s in splits for v in VIEWS],
            count(paper.get("params")),
            str(paper.get("depth", "n/a")),
            paper_pct(paper.get("PublicTest")),
            paper_pct(paper.get("PrivateTest")),
        ]
    )
    for name, measured in record.get("sets", {}).items():  # the bundle's other sets (all is the row above)
        members = [plan.ensemble[m] for m in measured["members"]]
        if name == "all" or len(members) == 1:  # a set of one member is that member's own row
            continue
        rows.append(
            [
                f"Set {name} ({' + '.join(members)})",
                count(sum(record["models"][key]["keras_params"] for key in members)),
                "-",
                *[pct(measured[s][v]["accuracy"]) if s in measured else "n/a" for s in splits for v in VIEWS],
                *["n/a"] * 4,
            ]
        )
    return rows + shipped_rows(record.get("shipped"), splits, plan.paper.get("ensemble", {}))


def shipped_rows(shipped: dict | None, splits: list[str], paper: dict) -> list[list[str]]:
    """The shipped bundle's members, then its sets of two or more (a set of one is its member's row,
    which names it); its `all` set beside the paper's ensemble."""
    if not shipped:
        return []
    rows, where = [], f"shipped `{shipped['bundle']}`"
    solo = {s["members"][0]: name for name, s in shipped["sets"].items() if len(s["members"]) == 1}
    for name, member in shipped["members"].items():
        also = f"; set {solo[name]}" if name in solo else ""
        also += "; served by its center crop" if name in shipped.get("center_only", ()) else ""
        label = f"{where}: member {name} ({member['model']}{also})"
        depth = str(member["depth"] or "-")
        rows.append([label, count(member["keras_params"]), depth, *_cells(member, splits), *["n/a"] * 4])
    for name, measured in shipped["sets"].items():
        if len(measured["members"]) == 1:
            continue
        theirs = paper if name == "all" else {}
        rows.append(
            [
                f"{where}: set {name} ({' + '.join(measured['members'])})",
                count(measured["keras_params"]),
                "-",
                *_cells(measured, splits),
                count(theirs.get("params")),
                str(theirs.get("depth", "n/a")),
                paper_pct(theirs.get("PublicTest")),
                paper_pct(theirs.get("PrivateTest")),
            ]
        )
    return rows


def _cells(measured: dict, splits: list[str]) -> list[str]:
    accuracy = measured["accuracy"]
    return [pct(accuracy[s][v]) if s in accuracy else "n/a" for s in splits for v in VIEWS]


def split_label(record: dict, split: str) -> str:
    """A split's column name: the selection split says so (its figures chose things: not a test)."""
    return f"{split} (selection)" if split == record.get("selection_split") else split


def table1_header(record: dict) -> list[str]:
    columns = [f"{split_label(record, s)}{v}" for s in record["splits"] for v in ("", " TTA")]
    return [
        "model",
        "params",
        "depth",
        *columns,
        "paper params",
        "paper depth",
        "paper PublicTest",
        "paper PrivateTest",
    ]


def per_class_rows(plan: ReportPlan, record: dict) -> tuple[list[str], list[list[str]]]:
    headline = record.get("headline_split", "PublicTest")
    columns = [
        (row_label(spec, record["models"][spec.key]), record["evaluations"][spec.key][headline]["tta"])
        for spec in plan.runs
    ]
    columns += [(f"Ensemble {split_label(record, s)}", record["ensemble"][s]["tta"]) for s in record["splits"]]
    header = ["class", f"faces ({headline})", *[name for name, _ in columns]]
    support = record["ensemble"][headline]["tta"]["support"]
    rows = [
        [name, count(support[name]), *[pct(result["per_class"][name]) for _, result in columns]] for name in EMOTIONS
    ]
    return header, rows


def run_rows(plan: ReportPlan, record: dict, out: Path) -> list[list[str]]:
    rows = []
    labelled = [(row_label(s, record["models"][s.key]), record["runs"][s.key]) for s in plan.runs]
    for label, run in labelled + [(f"SRGAN ({record['sr_eval']['content_loss']} content loss)", record["srgan"])]:
        best = f"{run['best_value']:.2f} dB" if run["metric"] == "eval_psnr" else pct(run["best_value"])
        rows.append(
            [
                label,
                run["model"],
                str(run["epochs"]),
                str(run["best_epoch"]),
                best,
                f"{run['seconds'] / 60:.1f} min",
                f"{run['workers']} x {run['gpus_per_worker']:g} GPU",
                "reused" if run.get("reused") else "trained here",
                _rel(run["run_dir"], out),
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------- commands
def commands(plan: ReportPlan, record: dict, out: Path) -> dict[str, list[str]]:
    sets = " ".join(f"--set {_q(s)}" for s in plan.sets)
    data, runs, figures = _q(record["data"]), record["runs"], out / "figures"
    data_sr = _q(record["data_sr"]) if record["data_sr"] else "DATA_SR"  # None: upscaled in memory (the GPU bench)
    a = plan.first_member
    srgan = record["srgan"]

    def train_line(spec) -> str:
        data_for = data_sr if spec.on_sr else data
        out = _q(Path(runs[spec.key]["run_dir"]).parent)
        own = "".join(f" --set {_q(s)}" for s in spec.sets)
        return f"ferray train {_q(spec.experiment)} --data {data_for} --out {out} {sets}{own}"

    train = [train_line(s) for s in plan.runs if not s.on_sr]
    train.append(
        f"ferray sr train {_q(plan.sr_experiment)} --data {data} --out {_q(Path(srgan['run_dir']).parent)} {sets}"
    )
    if any(s.on_sr for s in plan.runs):
        gpus = f" --gpus-per-actor {plan.sr_gpus_per_actor:g}" if plan.sr_gpus_per_actor else ""
        train.append(
            f"ferray sr upscale --data {data} --out {data_sr} --checkpoint "
            f"{_q(srgan['best_checkpoint'])} --actors {plan.sr_actors}{gpus} --overwrite"
        )
    train += [train_line(s) for s in plan.runs if s.on_sr]
    train = [line.rstrip() for line in train]
    evaluate = []
    for spec in plan.runs:
        data_for = data_sr if spec.on_sr else data
        for split in record["splits"]:
            evaluate.append(
                f"ferray evaluate --checkpoint {_q(runs[spec.key]['best_checkpoint'])} --data {data_for} "
                f"--split {split} --no-tta   # and --tta"
            )
    bundle = _q(record["bundle"] or "BUNDLE")  # None: the fusion was fitted in memory (the GPU bench)
    members = " ".join(f"--member {m}={_q(runs[key]['best_checkpoint'])}" for m, key in plan.ensemble.items())
    on_sr = {spec.key for spec in plan.runs if spec.on_sr} & set(plan.ensemble.values())
    sr = f" --sr {_q(srgan['best_checkpoint'])}" if on_sr else ""
    ensemble = [f"ferray ensemble {members}{sr} --data {data} --out {bundle} --overwrite"]
    ensemble += [
        f"ferray evaluate --bundle {bundle} --data {data} --split {s} --tta   # Figure 5; without --tta: center crop"
        for s in record["splits"]
    ]
    figure = {
        "Figure 2": f"ferray sr eval --checkpoint {_q(srgan['best_checkpoint'])} --data {data} --split PublicTest "
        f"--out {_q(figures)}",
        "Figure 3": f"ferray crops --checkpoint {_q(runs[a]['best_checkpoint'])} --data {data} "
        f"--count {plan.figures['crops']} "
        f"--out {_q(record['figures']['fig3'])}",
        "Figure 4": f"ferray explain {_q(runs[a]['best_checkpoint'])} --data {data} --split PublicTest --per-class "
        f"{plan.figures['explain_per_class']} --out {_q(record['figures']['fig4'])}",
    }
    return {
        "train": train,
        "evaluate": evaluate,
        "ensemble": ensemble,
        "figures": [f"{k}: `{v}`" for k, v in figure.items()],
    }


# ---------------------------------------------------------------------------------------- document
def build_document(plan: ReportPlan, record: dict, out: Path) -> Document:
    doc = Document(f"ferray report: {plan.name}")
    doc.paragraph(
        f"{plan.description} Data: `{record['data']}` ({record['data_source']}); splits evaluated: "
        f"{', '.join(record['splits'])}. Written {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"ferray {__version__} from `{plan.source}` in {record['seconds'] / 60:.1f} min."
    )
    if record.get("made_by"):
        doc.paragraph(
            f"Made by `{record['made_by']}`, Ray-free on one device; the commands below are the Ray "
            "path's equivalents (`ferray prepare` the data first)."
        )
    selection = record.get("selection_split")
    if selection:
        tests = [s for s in record["splits"] if s != selection]
        doc.paragraph(
            f"Protocol: every choice made from data (best epochs, the fusion weight) was made on "
            f"**{selection}**, so its columns are not a test; {', '.join(tests) or 'no split'} "
            f"{'was' if len(tests) == 1 else 'were'} never used to choose anything. Headline: "
            f"**{record['headline_split']}**. The paper's own columns select on PublicTest and test on "
            "PrivateTest."
        )
    _table1(doc, plan, record)
    _figures(doc, plan, record, out)
    header, rows = per_class_rows(plan, record)
    doc.heading("Per-class accuracy (ten-crop TTA)")
    doc.table(header, rows)
    doc.heading("Most confused pairs (ensemble, TTA)")
    doc.bullets(
        [
            f"{s}: "
            + ", ".join(f"{t} -> {p} {r:.1%}" for t, p, r in most_confused(record["ensemble"][s]["tta"]["confusion"]))
            for s in record["splits"]
        ]
    )
    _runs(doc, plan, record, out)
    return doc


def _table1(doc: Document, plan: ReportPlan, record: dict) -> None:
    fusion = record["fusion"]
    doc.heading("Table 1: accuracy, parameters and depth")
    doc.table(
        table1_header(record),
        table1_rows(plan, record),
        note="Params are counted as a Keras summary totals them (weights + batch-norm moving statistics), "
        "as the paper counts; depth is weight layers. The paper's VGG figures count the conv base only. "
        f"Ensemble: weights {_weights(fusion)} ({fusion.get('weights_choice', 'fitted')}) on "
        f"{fusion['fitted_on']} ({fusion['how']}), "
        "the same for the center-crop and TTA columns; its params are A's plus B's (the SR generator adds "
        "its own at inference). n/a: not measured here, or not given in the plan's `paper:` section."
        + _shipped_note(record.get("shipped")),
    )
    alternatives = record["fusion_alternatives"]
    doc.paragraph(
        f"Other fusions measured on {fusion['fitted_on']} when the bundle was built: "
        + "; ".join(f"{name} {pct(v['accuracy'])}" for name, v in alternatives.items() if "accuracy" in v)
        + "."
    )


def _shipped_note(shipped: dict | None) -> str:
    if not shipped:
        return ""
    views = "served with ten-crop TTA" if shipped["tta"] else "served with the center crop"
    return (
        f" Rows `shipped`: the bundle {shipped['bundle']} (built {shipped['created'][:10]}, {views}), its "
        "figures as `ferray ensemble` measured them on these same faces when it built the bundle (its "
        "bundle.json), not measured again; its `all` set is the model ferray serves."
    )


def _weights(fusion: dict) -> str:
    """The members' shares of the fused mean (a record of an older ferray has A's weight alone)."""
    if "weights" not in fusion:
        return f"a {fusion['weight_a']:.2f}, b {1 - fusion['weight_a']:.2f}"
    total = sum(fusion["weights"].values())
    return ", ".join(f"{name} {w / total:.2f}" for name, w in fusion["weights"].items())


def _figures(doc: Document, plan: ReportPlan, record: dict, out: Path) -> None:
    sr, figures = record["sr_eval"], record["figures"]
    doc.heading("Figure 2: LR, bicubic, SR and HR faces")
    doc.image(
        _rel(figures["fig2"], out), "Figure 2: 24x24 input, bicubic x2, SRGAN x2 and the 48x48 original (PublicTest)"
    )
    doc.table(
        ["24 -> 48 on PublicTest", "PSNR (dB)", "SSIM"],
        [
            ["bicubic", f"{sr['bicubic_psnr']:.2f}", f"{sr['bicubic_ssim']:.4f}"],
            ["SRGAN (ours)", f"{sr['psnr']:.2f}", f"{sr['ssim']:.4f}"],
            ["gain", f"{sr['psnr_gain']:+.2f}", f"{sr['ssim_gain']:+.4f}"],
        ],
        note=f"{sr['samples']:,} faces; generator epoch {sr['epoch']}, content loss {sr['content_loss']}.",
    )
    doc.heading("Figure 3: random training crops")
    doc.image(
        _rel(figures["fig3"], out), "Figure 3: one Training face and random views as Model A's training makes them"
    )
    doc.heading("Figure 4: guided back-propagation of Model A")
    doc.image(
        _rel(figures["fig4"], out),
        f"Figure 4: {plan.figures['explain_per_class']} PublicTest faces per class "
        "(columns: true class) and the guided-backprop map of the predicted class",
    )
    doc.heading("Figure 5: normalized confusion matrices of the ensemble")
    for split, path in figures["fig5"].items():
        doc.image(_rel(path, out), f"Figure 5: the ensemble on {split} (ten-crop TTA), rows normalized")


def _runs(doc: Document, plan: ReportPlan, record: dict, out: Path) -> None:
    hw = record["hardware"]
    doc.heading("Runs: time and hardware")
    doc.table(
        ["run", "model", "epochs", "best epoch", "best eval", "time", "workers", "source", "folder"],
        run_rows(plan, record, out),
    )
    accelerators = ", ".join(hw["accelerators"]) or "none named"
    doc.bullets(
        [
            f"Ray cluster at report time: {hw['nodes']} node(s), {hw['cpus']:g} CPUs, {hw['gpus']:g} GPUs "
            f"({accelerators}); driver {hw['driver']}, GPU {hw['driver_gpu'] or 'none'}",
            f"Python {hw['python']}, torch {hw['torch']}, ray {hw['ray']}, ferray {__version__}",
            f"the report took {record['seconds'] / 60:.1f} min"
            f"{'; the upscaled faces were reused' if record['data_sr_reused'] else ''}",
        ]
    )
    steps = commands(plan, record, out)
    doc.heading("Commands")
    doc.paragraph(
        f"The whole report: `ferray report {_q(plan.source)} --data {_q(record['data'])} --out {_q(out)}` "
        "(add `--reuse RUNS` to reuse finished runs). Each step alone:"
    )
    doc.code("\n".join(steps["train"]), "sh", "training, in order")
    doc.code("\n".join(steps["evaluate"]), "sh", "Table 1: evaluations")
    doc.code("\n".join(steps["ensemble"]), "sh", "the ensemble bundle and Figure 5")
    doc.bullets(steps["figures"])
    doc.heading("Configs")
    for label, run in [(s.label, record["runs"][s.key]) for s in plan.runs] + [("SRGAN", record["srgan"])]:
        doc.code(
            (Path(run["run_dir"]) / "config.yaml").read_text(),
            "yaml",
            f"{label}: {_rel(run['run_dir'], out)}/config.yaml",
        )


def write_report(plan: ReportPlan, record: dict, out: Path) -> dict:
    doc = build_document(plan, record, out)
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    paths["md"].write_text(doc.markdown())
    paths["html"].write_text(doc.html())
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n")
    return paths
