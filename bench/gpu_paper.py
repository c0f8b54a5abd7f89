"""The whole paper on FER2013 on one GPU, Ray-free: VGG16, VGG19, Model A, the SRGAN and the
upscaled faces, Model B, the ensemble; then Table 1 and Figures 2-5. One command:

    bash bench/gpu_paper.sh [--minutes 8] [--data DIR] [--private fer2013.csv] [--out paper-gpu]
    bash bench/gpu_paper.sh --smoke        # a CPU check of every path: a subset, tiny models, a few minutes

Each run is its experiments/*.yaml recipe (the runs of experiments/paper.yaml) trained through the
core loop (ferray.fit, ferray.local) on faces held on the GPU as uint8: bf16 autocast, channels_last.
--minutes is the training time of all runs together, shared by SHARES; each run trains the epochs
its share holds, its schedule planned over them. Every choice (best epochs, the fusion weight) is
made on the selection split (Validation, carved as `ferray prepare` carves it, where the data has no
PrivateTest); the test splits (PublicTest, and PrivateTest from --private) are only evaluated. Model
B falls back to its scratch recipe when the ImageNet weights are missing (the table says "from
scratch"); the SRGAN's content loss uses Model A's features when VGG19's weights are missing.
Writes OUT/report.md, report.html and report.json through ferray.report.document (the same report
`ferray report` writes), each run's folder with a result.json rewritten after every epoch, and
prints Table 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from bench.common import REPO, add_common_args, device_and_flags, load_data
from bench.gpu_model_b import upscaled

SHARES = {"vgg16": 0.12, "vgg19": 0.13, "model_a": 0.33, "srgan": 0.10, "model_b": 0.32}
SMOKE = {  # tiny stand-ins with the same code paths, for a CPU check of the script
    "vgg16": ["model.name=vgg16_tiny"],
    "vgg19": ["model.name=vgg19_tiny"],
    "model_a": ["model.name=xception_a_tiny", "train.compile=false"],
    "model_b": ["model.name=resnet18_b", "train.batch_size=32", "train.compile=false"],
    "srgan": [
        "sr.generator_channels=8",
        "sr.generator_blocks=1",
        "sr.discriminator_channels=8",
        "sr.pretrain_epochs=1",
        "train.epochs=2",
        "train.budget_minutes=0",
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "paper-gpu", minutes=8.0)
    parser.add_argument("--plan", type=Path, default=REPO / "experiments" / "paper.yaml")
    args = parser.parse_args()

    from ferray.config import load_runnable_config
    from ferray.local import evaluate_tests, train_local
    from ferray.report.plan import load_plan
    from ferray.tasks import SR

    t_start = time.perf_counter()
    device, name = device_and_flags()
    out = args.out.absolute()
    splits, tests = load_data(args, out)
    selection = splits["selection"]
    plan = load_plan(args.plan, data=splits["data"])
    print(
        f"data: {len(splits['Training']):,} Training faces from {splits['data']}; selecting on {selection}, testing on "
        f"{', '.join(tests)}; device {name}; torch {torch.__version__}; {args.minutes:g} min of training",
        flush=True,
    )

    def config(experiment: Path, key: str, *extra: str):
        sets = [
            f"data.selection_split={selection}",
            f"train.budget_minutes={args.minutes * SHARES[key]:.4f}",
            *args.overrides,
            *extra,
            *(SMOKE[key] if args.smoke else []),
        ]
        return load_runnable_config(experiment, [f"data.path={Path(splits['data']).absolute()}", *plan.sets, *sets])

    runs, cores, configs, evaluations, probs = {}, {}, {}, {}, {}
    made_by = " ".join(["bash bench/gpu_paper.sh", *sys.argv[1:]])

    def classifier(spec, faces: dict):
        """Train on faces["Training"], select on the selection split, evaluate it and every test split."""
        cfg = config(spec.experiment, spec.key)
        print(
            f"{spec.label}: {cfg.name} ({cfg.model.name}), up to {cfg.train.epochs} epochs in "
            f"{cfg.train.budget_minutes:.1f} min",
            flush=True,
        )
        state, run = train_local(
            cfg, faces["Training"], faces[selection], device, out / "runs" / cfg.name, facts={"made_by": made_by}
        )
        found = {}
        evaluated = evaluate_tests(
            state,
            run,
            {s: faces[s] for s in [selection, *tests]},
            device,
            selection=selection,
            probs=found,
        )
        evaluations[spec.key] = {s: {"center": v["center"], "tta": v["tta"]} for s, v in evaluated.items()}
        probs.update({(spec.key, s, view): p for (s, view), p in found.items()})
        cores[spec.key], configs[spec.key] = state.core.eval(), cfg
        runs[spec.key] = run.write_result(state).to_dict() | {"reused": False}

    small = {"Training": splits["Training"], selection: splits[selection], **tests}
    for spec in [s for s in plan.runs if not s.on_sr]:
        classifier(spec, small)
    key_a = plan.first_member
    cfg_sr = config(
        plan.sr_experiment, "srgan", f"sr.content_checkpoint={out / 'runs' / configs[key_a].name / 'best.pt'}"
    )
    print(f"SRGAN: up to {cfg_sr.train.epochs} epochs in {cfg_sr.train.budget_minutes:.1f} min", flush=True)
    sr_state, sr_run = train_local(
        cfg_sr,
        splits["Training"],
        splits[selection],
        device,
        out / "runs" / cfg_sr.name,
        task=SR,
        facts={"made_by": made_by},
    )
    generator = sr_state.core.eval()
    srgan = sr_run.write_result(sr_state).to_dict() | {"content_loss": sr_state.content.kind, "reused": False}
    t0 = time.perf_counter()
    big = {s: upscaled(f, generator, device) for s, f in small.items()}
    print(
        f"upscaled {sum(len(f) for f in big.values()):,} faces 48 -> 96 in {time.perf_counter() - t0:.1f}s", flush=True
    )
    for spec in [s for s in plan.runs if s.on_sr]:
        classifier(spec, big)

    record = assemble(plan, out, small, selection, runs, srgan, evaluations, probs, cores, configs, generator, device)
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    record["made_by"] = made_by + (
        " (smoke: a subset and tiny stand-ins for every model; the labels are the plan's)" if args.smoke else ""
    )
    from ferray.report.document import table1_header, table1_rows, write_report

    paths = write_report(plan, record, out)
    print_table(table1_header(record), table1_rows(plan, record))
    print(f"done in {record['seconds'] / 60:.1f} min; {paths['md']}")
    return 0


def assemble(
    plan, out: Path, faces: dict, selection: str, runs, srgan, evaluations, probs, cores, configs, generator, device
) -> dict:
    """The record `ferray report` builds, from this process's runs: ensemble, figures, hardware."""
    from ferray.bundle import FusionRule, fit_fusion, fused_report, write_fused_report
    from ferray.bundle.fusion import set_accuracies
    from ferray.distributed.report import hardware, headline_split, model_facts
    from ferray.explain import explain_grid
    from ferray.figures import plot_crops
    from ferray.metrics import plot_confusion
    from ferray.sr.evaluation import sr_report

    key_a, members = plan.first_member, plan.ensemble
    figures = out / "figures"
    names = [s for s in faces if s != "Training"]  # the selection split first, then the tests

    def member_probs(split: str, view: str) -> dict:
        return {member: probs[key, split, view] for member, key in members.items()}

    sets = {"all": list(members)} | ({"fast": [next(iter(members))]} if len(members) > 1 else {})
    fusion, alternatives, _ = fit_fusion(member_probs(selection, "tta"), faces[selection].labels, selection, sets)
    rule = FusionRule(fusion.weights, fusion.set_temperatures.get("all", fusion.temperature))
    ensemble = {
        s: {v: fused_report(member_probs(s, v), faces[s].labels, rule, s, v == "tta", "-") for v in ("center", "tta")}
        for s in names
    }

    def set_accuracy(name: str, set_members: list, split: str, view: str) -> float:
        measured = set_accuracies(member_probs(split, view), faces[split].labels, fusion.weights, {name: set_members})
        return measured[name]

    measured_sets = {
        name: {"members": set_members}
        | {s: {v: {"accuracy": set_accuracy(name, set_members, s, v)} for v in ("center", "tta")} for s in names}
        for name, set_members in sets.items()
    }
    for split in ensemble.values():
        for report in split.values():
            write_fused_report(report, out / "evaluations" / "ensemble")
    public = faces["PublicTest"]
    sr, grid = sr_report(generator, public.images, "PublicTest", figures, plan.figures["sr_faces"], device)
    sr.update({"epoch": srgan["best_epoch"], "content_loss": srgan["content_loss"]})
    cfg_a = configs[key_a]
    crops = plot_crops(
        faces["Training"].images[0],
        cfg_a.augment,
        figures / "fig3-crops.png",
        plan.figures["crops"],
        title=f"random {cfg_a.augment.crop}x{cfg_a.augment.crop} training views ({cfg_a.name})",
    )
    guided = explain_grid(
        cores[key_a],
        cfg_a,
        public.images,
        public.labels,
        plan.figures["explain_per_class"],
        figures / "fig4-guided-backprop.png",
        f"{cfg_a.model.name}: guided backprop on PublicTest",
        device,
    )
    fig5 = {
        s: str(
            plot_confusion(
                ensemble[s]["tta"]["confusion"],
                figures / f"fig5-confusion-{s}.png",
                f"ensemble on {s} (TTA): {ensemble[s]['tta']['accuracy']:.2%}",
            )
        )
        for s in names
    }
    return {
        "plan": plan.name,
        "plan_file": str(plan.source),
        "data": str(plan.data),
        "splits": names,
        "selection_split": selection,
        "headline_split": headline_split(names),
        "data_source": f"read by bench/gpu_paper.py, Ray-free; {len(faces['Training']):,} Training faces",
        "runs": runs,
        "srgan": srgan,
        "evaluations": evaluations,
        "data_sr": None,
        "data_sr_reused": False,
        "models": {k: model_facts(r["best_checkpoint"]) for k, r in runs.items()},
        "bundle": None,
        "fusion": dataclasses.asdict(fusion),
        "fusion_alternatives": alternatives,
        "ensemble": ensemble,
        "sets": measured_sets,
        "sr_eval": sr,
        "guided_faces": guided["faces"],
        "hardware": hardware(),
        "figures": {"fig2": str(grid), "fig3": str(crops), "fig4": guided["figure"], "fig5": fig5},
    }


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    sys.exit(main())
