"""The whole paper on FER2013 on one GPU, Ray-free: VGG16, VGG19, Model A, the SRGAN and the
upscaled faces, Model B, the ensemble; then Table 1 and Figures 2-5. One command:

    bash bench/gpu_paper.sh [--minutes 8] [--data DIR] [--out paper-gpu]
    bash bench/gpu_paper.sh --smoke        # a CPU check: a subset, tiny models, a minute

Each run is its experiments/*.yaml recipe (the runs of experiments/paper.yaml) trained from the
ferray core alone, every face held on the GPU as uint8 and augmented there, bf16 autocast. The
training time is --minutes in all, shared by SHARES; each run's epoch count is cut to what its
share allows (measured over its first epochs; the cosine schedules are re-planned to the new
length) and the cut is recorded in the run's config.yaml. The best epoch by PublicTest accuracy is
kept, as `ferray train` keeps it. Writes OUT/report.md, report.html and report.json through
ferray.report.document (the same report `ferray report` writes) and prints Table 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the GPU machine has the working tree, not an installed ferray

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARES = {"vgg16": 0.12, "vgg19": 0.13, "model_a": 0.33, "srgan": 0.10, "model_b": 0.32}
SMOKE = {  # tiny stand-ins with the same code paths, for a CPU check of the script
    "vgg16": ["model.name=vgg16_tiny"], "vgg19": ["model.name=vgg19_tiny"], "model_a": ["model.name=xception_a_tiny"],
    "model_b": ["model.name=resnet18_b", "train.batch_size=32"],
    "srgan": ["sr.generator_channels=8", "sr.generator_blocks=1", "sr.discriminator_channels=8", "sr.content=mse"],
}


def planned_epochs(epoch_seconds: list[float], budget_s: float, planned: int) -> int:
    """Epochs that fit the budget, from the wall time of the epochs so far (the first includes warm-up)."""
    per_epoch = float(np.median(epoch_seconds[1:] or epoch_seconds))
    left = budget_s - sum(epoch_seconds)
    return int(min(planned, len(epoch_seconds) + max(0.0, left) // max(per_epoch, 1e-6)))


def train_classifier(key: str, cfg, train, test, budget_s: float, run_dir: Path, device) -> dict:
    from ferray import engine

    run_dir.mkdir(parents=True, exist_ok=True)
    state = engine.build_state(cfg, device)
    planned, times, best_state, t0 = cfg.train.epochs, [], None, time.perf_counter()
    state.cfg = cfg
    while state.epoch < cfg.train.epochs:
        started = time.perf_counter()
        metrics = engine.train_one_epoch(state, train, len(train))
        result = engine.evaluate(state.core, test, cfg.augment.crop, False, device, state.use_amp, cfg.data.input_scale)
        row = engine.end_epoch(state, metrics, result)
        times.append(time.perf_counter() - started)
        if len(times) in (1, 2):  # re-plan the run (and its cosine schedule) to the budget
            cfg.train.epochs = state.schedule.epochs = planned_epochs(times, budget_s, planned)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["improved"] or best_state is None:
            best_state = (copy.deepcopy(state.core.state_dict()), row)
        print(f"  {key} epoch {state.epoch:>3}/{cfg.train.epochs}  {metrics['train_seconds']:6.1f}s  "
              f"{metrics['images_per_s']:8,.0f} img/s  loss {metrics['train_loss']:.4f}  PublicTest "
              f"{result['accuracy']:6.2%}", flush=True)
    state.core.load_state_dict(best_state[0])
    state.epoch = best_state[1]["epoch"]
    return finish(key, cfg, run_dir, lambda path: engine.save_checkpoint(path, state, best_state[1]), best_state[1],
                  time.perf_counter() - t0, planned, "best_eval_acc", best_state[1]["eval_acc"]) | {"core": state.core}


def train_srgan(cfg, train, test, budget_s: float, run_dir: Path, device) -> dict:
    from ferray.sr import engine as sr_engine

    run_dir.mkdir(parents=True, exist_ok=True)
    state = sr_engine.build_sr_state(cfg, device)
    planned, pretrain, times, best, t0 = cfg.train.epochs, cfg.sr.pretrain_epochs, [], None, time.perf_counter()
    while state.epoch < cfg.train.epochs:
        started = time.perf_counter()
        metrics = sr_engine.train_sr_epoch(state, train)
        row = sr_engine.end_sr_epoch(state, metrics, sr_engine.evaluate_sr(state.core, test, device))
        times.append(time.perf_counter() - started)
        if len(times) == 1:  # an adversarial epoch costs about 3 pixel-loss ones: plan in pixel-epoch units
            total = planned_epochs(times, budget_s / (1 + 2 * (planned - pretrain) / planned), planned)
            cfg.sr.pretrain_epochs = max(1, round(total * pretrain / planned))
            cfg.train.epochs = total
        if row["improved"] or best is None:
            best = (copy.deepcopy(state.core.state_dict()), row)
        print(f"  srgan epoch {state.epoch:>3}/{cfg.train.epochs} [{row['phase']}]  {metrics['train_seconds']:6.1f}s  "
              f"PSNR {row['eval_psnr']:.2f} dB (bicubic {row['eval_bicubic_psnr']:.2f})", flush=True)
    state.core.load_state_dict(best[0])
    summary = finish("srgan", cfg, run_dir, lambda path: sr_engine.save_sr_checkpoint(path, state, best[1]), best[1],
                     time.perf_counter() - t0, planned, "best_eval_psnr", best[1]["eval_psnr"])
    return summary | {"content_loss": best[1]["content_loss"], "core": state.core.eval()}


def finish(key: str, cfg, run_dir: Path, save, row: dict, seconds: float, planned: int, metric: str, value: float) -> dict:
    from ferray.config import dump_yaml

    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    save(run_dir / "best.pt")
    summary = {"name": run_dir.name, "model": "srgan" if key == "srgan" else cfg.model.name, "run_dir": str(run_dir),
               "best_checkpoint": str(run_dir / "best.pt"), "best_epoch": row["epoch"], metric: value,
               "epochs": cfg.train.epochs, "planned_epochs": planned, "seconds": round(seconds, 1), "workers": 1,
               "gpus_per_worker": 1 if torch.cuda.is_available() else 0, "reused": False}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{key}: {cfg.train.epochs} of {planned} planned epochs in {seconds / 60:.1f} min; best epoch {row['epoch']}",
          flush=True)
    return summary


def evaluate_views(core, cfg, faces, labels, device, out: Path, key: str, split: str) -> dict:
    """{"plain": eval, "tta": eval} with probabilities, each also written to OUT/evaluations/KEY."""
    from ferray import engine

    batches = engine.TensorBatches(faces, labels, 512, shuffle=False, drop_last=False)
    views = {}
    for view in ("plain", "tta"):
        result = engine.evaluate(core, batches, cfg.augment.crop, view == "tta", device, device.type == "cuda",
                                 cfg.data.input_scale, keep_probs=True)
        result.update({"model": cfg.model.name, "split": split, "tta": view == "tta"})
        (out / "evaluations" / key).mkdir(parents=True, exist_ok=True)
        stem = f"eval-{split}" + ("-tta" if view == "tta" else "")
        (out / "evaluations" / key / f"{stem}.json").write_text(
            json.dumps({k: v for k, v in result.items() if k != "probs"}, indent=2) + "\n")
        views[view] = result
    return views


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="FER2013 folder/CSV/prepared dir "
                        "(default: .fer2013/ in the repo if carried there, else ../shared/data/fer2013)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time for all runs together (default: 8)")
    parser.add_argument("--out", type=Path, default=Path("paper-gpu"), help="report folder (default: paper-gpu)")
    parser.add_argument("--plan", type=Path, default=REPO / "experiments" / "paper.yaml")
    parser.add_argument("--smoke", action="store_true", help="a subset and tiny models, to check the script on a CPU")
    args = parser.parse_args()

    from bench.gpu_model_a import find_fer2013, load_fer2013
    from bench.gpu_model_b import upscale_all
    from ferray.models.resnet_vgg import IMAGENET_FILES
    from ferray.report.plan import load_plan

    data = find_fer2013(args.data)
    if data is None:
        print("no FER2013 found; pass --data", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    plan = load_plan(args.plan, data=data)
    out = args.out.absolute()
    splits = load_fer2013(data)
    if args.smoke:
        rng = np.random.default_rng(0)
        splits = {s: (x[p], y[p]) for s, (x, y) in splits.items()
                  for p in [rng.permutation(len(y))[: 600 if s == "Training" else 140]]}
    names = [s for s in ("PublicTest", "PrivateTest") if s in splits]
    on_device = {s: (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)) for s, (x, y) in splits.items()}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"data: {', '.join(f'{len(y):,} {s}' for s, (_, y) in splits.items())} faces from {data} in "
          f"{time.perf_counter() - t_start:.0f}s; device {gpu}; torch {torch.__version__}; {args.minutes:g} min of training",
          flush=True)

    from ferray import engine

    budget = {k: args.minutes * 60 * share for k, share in SHARES.items()}
    cached = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES["resnet50"]

    def config(experiment: Path, key: str, data_path):
        sets = [f"data.path={data_path}", *(SMOKE[key] if args.smoke else [])]
        if key == "model_b":
            sets.append(f"model.pretrained={'imagenet' if cached.is_file() and not args.smoke else 'none'}")
        from ferray.config import load_config

        return load_config(experiment, sets)

    def batches(split, faces=None, train=False, cfg=None):
        x, y = on_device[split]
        size = cfg.train.batch_size if train else 512
        return engine.TensorBatches(x if faces is None else faces, y, size, shuffle=train, drop_last=train,
                                    seed=cfg.train.seed if cfg else 0)

    runs, cores, configs, evaluations = {}, {}, {}, {}
    for spec in [s for s in plan.runs if not s.on_sr]:
        cfg = config(spec.experiment, spec.key, data)
        print(f"{spec.label}: {spec.experiment.name}, up to {cfg.train.epochs} epochs in {budget[spec.key] / 60:.1f} min",
              flush=True)
        result = train_classifier(spec.key, cfg, batches("Training", train=True, cfg=cfg), batches("PublicTest"),
                                  budget[spec.key], out / "runs" / cfg.name, device)
        cores[spec.key], configs[spec.key], runs[spec.key] = result.pop("core"), cfg, result
    cfg_sr = config(plan.sr_experiment, "srgan", data)
    print(f"SRGAN: {plan.sr_experiment.name}, up to {cfg_sr.train.epochs} epochs in {budget['srgan'] / 60:.1f} min", flush=True)
    srgan = train_srgan(cfg_sr, batches("Training", train=True, cfg=cfg_sr), batches("PublicTest"), budget["srgan"],
                        out / "runs" / cfg_sr.name, device)
    generator = srgan.pop("core")
    t0 = time.perf_counter()
    upscaled = {s: torch.from_numpy(upscale_all(generator, x, device)).to(device) for s, (x, _) in splits.items()}
    print(f"upscaled {sum(len(y) for _, y in splits.values()):,} faces 48 -> 96 in {time.perf_counter() - t0:.1f}s", flush=True)
    for spec in [s for s in plan.runs if s.on_sr]:
        cfg = config(spec.experiment, spec.key, out / "data_sr (in memory)")
        print(f"{spec.label}: {spec.experiment.name}, up to {cfg.train.epochs} epochs in {budget[spec.key] / 60:.1f} min "
              f"(ImageNet weights: {'yes' if 'imagenet' == cfg.model.pretrained else 'no, not in ' + str(cached.parent)})",
              flush=True)
        result = train_classifier(spec.key, cfg, batches("Training", upscaled["Training"], True, cfg),
                                  batches("PublicTest", upscaled["PublicTest"]), budget[spec.key], out / "runs" / cfg.name,
                                  device)
        cores[spec.key], configs[spec.key], runs[spec.key] = result.pop("core"), cfg, result

    for spec in plan.runs:
        evaluations[spec.key] = {s: evaluate_views(cores[spec.key], configs[spec.key],
                                                   upscaled[s] if spec.on_sr else on_device[s][0], on_device[s][1],
                                                   device, out, spec.key, s) for s in names}
    record = assemble(plan, out, data, names, runs, srgan, evaluations, cores, configs, generator, splits, device)
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    record["made_by"] = " ".join(["bash bench/gpu_paper.sh", *sys.argv[1:]]) + (
        " (smoke: a subset and tiny stand-ins for every model; the labels are the plan's)" if args.smoke else "")
    from ferray.report.document import TABLE1_HEADER, table1_rows, write_report

    paths = write_report(plan, record, out)
    print_table(TABLE1_HEADER, table1_rows(plan, record))
    print(f"done in {record['seconds'] / 60:.1f} min; {paths['md']}")
    return 0


def assemble(plan, out: Path, data: Path, names, runs, srgan, evaluations, cores, configs, generator, splits, device) -> dict:
    """The record `ferray report` builds, from this process's runs: ensemble, figures, hardware."""
    from ferray.ensemble import fit_weight, fused_report, stacking_cv_accuracy, write_fused_report
    from ferray.explain import explain_grid
    from ferray.figures import plot_crops
    from ferray.metrics import plot_confusion
    from ferray.report.build import hardware, model_facts
    from ferray.sr.evaluation import sr_report

    key_a, key_b = plan.ensemble
    figures = out / "figures"
    probs = {(k, s, v): evaluations[k][s][v].pop("probs") for k in evaluations for s in names for v in ("plain", "tta")}
    labels = {s: splits[s][1] for s in names}
    pa, pb = probs[key_a, "PublicTest", "tta"], probs[key_b, "PublicTest", "tta"]
    weight, _ = fit_weight(pa, pb, labels["PublicTest"])
    weight_log, accuracy_log = fit_weight(pa, pb, labels["PublicTest"], log=True)
    ensemble = {s: {v: fused_report(probs[key_a, s, v], probs[key_b, s, v], labels[s], weight, s, v == "tta", "-")
                    for v in ("plain", "tta")} for s in names}
    for split in ensemble.values():
        for report in split.values():
            write_fused_report(report, out / "evaluations" / "ensemble")
    sr, grid = sr_report(generator, splits["PublicTest"][0], "PublicTest", figures, plan.figures["sr_faces"], device)
    sr.update({"epoch": srgan["best_epoch"], "content_loss": srgan["content_loss"]})
    cfg_a = configs[key_a]
    crops = plot_crops(splits["Training"][0][0], cfg_a.augment, figures / "fig3-crops.png", plan.figures["crops"],
                       title=f"random {cfg_a.augment.crop}x{cfg_a.augment.crop} training views ({cfg_a.name})")
    guided = explain_grid(cores[key_a], cfg_a, splits["PublicTest"][0], labels["PublicTest"], plan.figures["explain_per_class"],
                          figures / "fig4-guided-backprop.png", f"{cfg_a.model.name}: guided backprop on PublicTest", device)
    fig5 = {s: str(plot_confusion(ensemble[s]["tta"]["confusion"], figures / f"fig5-confusion-{s}.png",
                                  f"ensemble on {s} (TTA): {ensemble[s]['tta']['accuracy']:.2%}")) for s in names}
    return {"plan": plan.name, "plan_file": str(plan.source), "data": str(data), "splits": names,
            "data_source": f"read by bench/gpu_paper.py, Ray-free; {len(splits['Training'][1]):,} Training faces",
            "runs": runs, "srgan": srgan, "evaluations": evaluations, "data_sr": None, "data_sr_reused": False,
            "models": {k: model_facts(r["best_checkpoint"]) for k, r in runs.items()}, "bundle": None,
            "fusion": {"method": "probability mean", "weight_a": weight, "fitted_on": "PublicTest",
                       "how": "grid over w in [0, 1] step 0.01, max accuracy, ties by log-loss"},
            "fusion_alternatives": {"logit mean": {"weight_a": weight_log, "accuracy": accuracy_log},
                                    "stacking (logistic regression, 5-fold CV)":
                                        {"accuracy": stacking_cv_accuracy(pa, pb, labels["PublicTest"])}},
            "ensemble": ensemble, "sr_eval": sr, "guided_faces": guided["faces"], "hardware": hardware(),
            "figures": {"fig2": str(grid), "fig3": str(crops), "fig4": guided["figure"], "fig5": fig5}}


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    sys.exit(main())
