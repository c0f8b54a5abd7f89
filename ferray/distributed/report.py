"""`ferray report`: every run of the paper made (or reused), evaluated, and written up.

Stages, in order (each a Ray job step: the training runs are Ray Train runs and the upscaling a
Ray Data pipeline, so on a cluster they use the cluster; the evaluations run as Ray tasks with a
GPU when the driver is on a cluster, in this process otherwise):

  1. the 48x48 classifiers of the plan (VGG16, VGG19, Model A), then the SRGAN;
  2. the data upscaled 48 -> 96 by the SRGAN, then the classifiers on it (Model B);
  3. every classifier on the selection split and every untouched split (Validation + PublicTest for
     the image-folder download, PublicTest + PrivateTest for the full data), TTA off and on;
  4. the SR evaluation and grid (Figure 2), the ensemble bundle of A and B and its evaluation
     (Figure 5), training crops (Figure 3), guided backprop of A (Figure 4);
  5. report.json (every number, read from the runs' own files), report.md and report.html.

A finished run is reused, never retrained, when its config equals the plan's (the data compared by
manifest checksum rather than by path): from --reuse folders first, then OUT/runs. An interrupted
run in OUT/runs is resumed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ferray.bundle.card import VIEWS
from ferray.config import ConfigError, ExperimentConfig, from_dict
from ferray.config import differences as config_diff
from ferray.data.contract import FER_SIZE, DataError, load_split, read_manifest, selection_split, untouched_splits
from ferray.logs import quiet
from ferray.report.plan import ReportPlan
from ferray.report.shipped import shipped_record
from ferray.tasks import CLASSIFIER, SR, Task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- steps
class Steps:
    """Runs a stage's function here, or as a Ray task (one GPU if the cluster has one) on a cluster."""

    def __init__(self, remote: bool):
        self.remote = remote

    def __call__(self, fn: Callable, *args, gpu: bool = True, **kwargs):
        """A step's own progress is not shown (the report says what each step did); in a Ray task
        nothing configures ferray's loggers, so it is quiet there too."""
        if not self.remote:
            with quiet():
                return fn(*args, **kwargs)
        import ray

        gpus = 1 if gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        return ray.get(ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(fn).remote(*args, **kwargs))


# ------------------------------------------------------------------------------------------ runs
def config_differences(run_dir: Path, cfg: ExperimentConfig) -> list[str]:
    """What differs between a finished run and `cfg`: config values, and the data by checksum."""
    import yaml

    try:
        found = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, ConfigError, yaml.YAMLError) as e:
        return [f"its config.yaml is unreadable ({e})"]
    differences = [
        f"{k}: {theirs!r} (plan: {mine!r})"
        for k, (theirs, mine) in config_diff(found, cfg, ignore=("data.path",)).items()
    ]
    try:
        same_data = read_manifest(found.data.path)["checksum"] == read_manifest(cfg.data.path)["checksum"]
    except DataError:
        same_data = False
    if not same_data:
        differences.append(f"data: {found.data.path} is not the same faces as {cfg.data.path}")
    return differences


def finished_run(run_dir: Path) -> dict | None:
    from ferray.runs import BEST_FILE, read_record

    record = read_record(run_dir)
    if record is not None and (run_dir / BEST_FILE).is_file():
        # where the folder is now: a run folder copied or moved (another disk, another machine)
        # still names the paths it was written at
        return {**record.to_dict(), "run_dir": str(run_dir), "best_checkpoint": str(run_dir / BEST_FILE)}
    return None


def as_recorded(cfg: ExperimentConfig, task: Task) -> ExperimentConfig:
    """A copy of `cfg` as a run of it records its config: training pins what "auto" and "imagenet"
    resolve to on this machine (distributed.train.pin_outside_files), so a plan saying
    sr.content=auto matches the finished run that trained with the kind auto chose. Where the files
    cannot be resolved here, the plan as written (the comparison then names the difference)."""
    import copy

    from ferray.distributed.train import pin_outside_files
    from ferray.errors import ContentError, PretrainedWeightsError

    pinned = copy.deepcopy(cfg)
    try:
        pin_outside_files(pinned, task)
    except (ContentError, PretrainedWeightsError):
        return cfg
    return pinned


def obtain_run(
    cfg: ExperimentConfig, runs: Path, reuse: list[Path], task: Task = CLASSIFIER, train: bool = True
) -> dict:
    """A finished run of `cfg`: reused from `reuse` or `runs` when its config matches, else trained
    (train=False, `--reuse-only`: a ConfigError naming the run and why nothing matched)."""
    from ferray.distributed.train import run_training

    why_not, recorded = [], as_recorded(cfg, task)
    for folder in [*reuse, runs]:
        run_dir = folder / cfg.name
        summary = finished_run(run_dir)
        if summary is None:
            why_not.append(f"{run_dir}: no finished run there")
            continue
        differences = config_differences(run_dir, recorded)
        if not differences:
            log.info(f"report: reusing the finished run {run_dir}")
            return {**summary, "reused": True}
        if folder == runs:
            raise ConfigError(
                f"{run_dir} is a finished run of another config ({'; '.join(differences[:3])}); "
                "remove it or choose another --out"
            )
        log.info(f"report: not reusing {run_dir}: {'; '.join(differences[:3])}")
        why_not.append(f"{run_dir}: {'; '.join(differences[:3])}")
    if not train:
        raise ConfigError(f"--reuse-only: no finished run of {cfg.name} to reuse ({' | '.join(why_not)})")
    resume = (runs / cfg.name).is_dir()
    if resume:
        log.info(f"report: resuming the unfinished run {runs / cfg.name}")
    return {**run_training(cfg, runs, resume=resume, task=task).to_dict(), "reused": False}


def upscaled_data(plan: ReportPlan, generator: str, candidates: list[Path], out: Path) -> tuple[Path, bool]:
    """(folder, reused): faces upscaled from the plan's data by this generator, found or made."""
    from ferray.distributed.upscale import upscale

    checksum = read_manifest(plan.data)["checksum"]
    for folder in candidates:
        try:
            source = read_manifest(folder).get("source", {})
        except DataError:
            continue
        if source.get("from_checksum") == checksum and source.get("generator_checkpoint") == str(
            Path(generator).absolute()
        ):
            log.info(f"report: reusing the upscaled faces {folder}")
            return folder, True
    upscale(
        plan.data,
        out,
        "srgan",
        generator,
        actors=plan.sr_actors,
        gpus_per_actor=plan.sr_gpus_per_actor,
        overwrite=True,
    )
    return out, False


# ------------------------------------------------------------------------------------ evaluation
def evaluate_all(
    plan: ReportPlan, results: dict, data_of: dict, splits: list[str], out: Path, steps: Steps
) -> tuple[dict, dict]:
    """({key: {split: {"center": eval, "tta": eval}}}, {(key, split, view): (probs, ids)}): every
    classifier on every split, TTA off and on, each written to OUT/evaluations/KEY/eval-*.json."""
    from ferray.evaluate import evaluate_checkpoint

    evaluations, probs = {}, {}
    for spec in plan.runs:
        evaluations[spec.key] = {}
        for split in splits:
            evaluations[spec.key][split] = {}
            for view in VIEWS:
                result = steps(
                    evaluate_checkpoint,
                    results[spec.key]["best_checkpoint"],
                    data_of[spec.key],
                    split,
                    tta=view == "tta",
                    out=out / "evaluations" / spec.key,
                    keep_probs=True,
                )
                probs[spec.key, split, view] = (result.pop("probs"), result.pop("ids"))
                evaluations[spec.key][split][view] = result
    return evaluations, probs


def member_probs(probs: dict, members: dict[str, str], split: str, view: str) -> dict:
    """{member: P} of one split, every member's on the same faces in the same order (a member on SR
    faces read the upscaled copy)."""
    answers, first_ids = {}, None
    for member, key in members.items():
        p, ids = probs[key, split, view]
        if first_ids is not None and ids != first_ids:
            raise DataError(
                f"{split}: the upscaled faces are not the same faces as the 48x48 ones (ids differ); "
                "upscale again from this data"
            )
        answers[member], first_ids = p, ids
    return answers


def model_facts(checkpoint: str) -> dict:
    from ferray.engine import load_checkpoint
    from ferray.models import build_model, keras_params, num_params

    payload = load_checkpoint(checkpoint)
    cfg = from_dict(payload["config"])
    model = build_model(cfg.model.name)
    depth = getattr(model, "keras_depth", lambda: None)()
    return {
        "model": cfg.model.name,
        "params": num_params(model),
        "keras_params": keras_params(model),
        "depth": depth,
        "pretrained": bool(payload.get("pretrained", False)),
        "experiment": cfg.name,
    }


def hardware() -> dict:
    """The Ray cluster's resources (or this machine's, without Ray: the GPU bench) and versions."""
    import torch

    try:
        import ray
    except ImportError:
        ray = None
    live = ray is not None and ray.is_initialized()
    resources = ray.cluster_resources() if live else {}
    accelerators = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    if not live and torch.cuda.is_available():
        accelerators = [torch.cuda.get_device_name()]
    return {
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]) if live else 1,
        "cpus": resources.get("CPU", os.cpu_count()),
        "gpus": resources.get("GPU", torch.cuda.device_count()),
        "accelerators": accelerators,
        "driver": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        "driver_gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__ if ray is not None else "not installed",
    }


# ---------------------------------------------------------------------------------------- report
def run_report(
    plan: ReportPlan,
    out: str | Path,
    reuse: list[Path] = (),
    remote_steps: bool | None = None,
    reuse_only: bool = False,
) -> dict:
    from ferray.distributed.cluster import check_shared_paths
    from ferray.distributed.runtime import connect

    t0 = time.perf_counter()
    out = Path(out).absolute()
    manifest = read_manifest(plan.data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        raise DataError(
            f"{plan.data}: the report starts from the prepared 48x48 faces, not "
            f"{manifest['image_size'][0]}x{manifest['image_size'][1]}"
        )
    plan.data = plan.data.absolute()
    selection = selection_split(manifest, "auto", str(plan.data))
    splits = [selection, *untouched_splits(manifest, selection)]
    if "PublicTest" not in manifest["splits"]:
        raise DataError(f"{plan.data}: no PublicTest faces; Figures 2 and 4 and the paper's columns need them")
    # the shipped bundle's rows are read now: a bundle measured on other faces fails before any training
    shipped = shipped_record(plan.shipped, manifest["checksum"], splits) if plan.shipped else None
    reuse = [Path(r).absolute() for r in reuse]
    for folder in reuse:
        if not folder.is_dir():
            raise ConfigError(f"--reuse {folder}: no such folder of runs")
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    info = connect()
    check_shared_paths({"data": plan.data, "report folder": out})
    steps = Steps(info.mode == "cluster" if remote_steps is None else remote_steps)
    log.info(
        f"report: {plan.name} on {plan.data} (selecting on {selection}, testing on {', '.join(splits[1:])}); "
        f"{len(plan.runs)} classifiers + SRGAN + ensemble; "
        f"out {out}; ray {info.mode}{'; evaluations as Ray tasks' if steps.remote else ''}"
    )

    runs_record = obtain_all_runs(plan, out, reuse, train=not reuse_only)
    log.info("report: evaluating every model (TTA off and on)")
    evaluations, probs = evaluate_all(plan, runs_record["runs"], runs_record.pop("data_of"), splits, out, steps)
    from ferray.data.describe import describe_source

    record = {
        "plan": plan.name,
        "plan_file": str(plan.source),
        "data": str(plan.data),
        "splits": splits,
        "selection_split": selection,
        "headline_split": headline_split(splits),
        "data_source": describe_source(manifest.get("source", {})),
        "data_checksum": manifest["checksum"],
        **runs_record,
        "evaluations": evaluations,
        "models": {k: model_facts(r["best_checkpoint"]) for k, r in runs_record["runs"].items()},
        "shipped": shipped,
    }
    record.update(make_figures(plan, record, probs, figures, out, splits, steps))
    record["hardware"] = hardware()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    from ferray.report.document import write_report

    paths = write_report(plan, record, out)
    log.info(f"report: done in {record['seconds']:.0f}s; {paths['md']} and {paths['html']}")
    return record


def obtain_all_runs(plan: ReportPlan, out: Path, reuse: list[Path], train: bool = True) -> dict:
    """Every run of the plan, reused or trained, in order: the 48x48 classifiers, the SRGAN, the
    upscaled faces, the classifiers on them. {runs, data_of, srgan, data_sr, data_sr_reused}."""
    runs, data_of = out / "runs", {}
    on_fer = [s for s in plan.runs if not s.on_sr]
    results = obtain_runs(plan, on_fer, plan.data, runs, reuse, train)
    data_of.update(dict.fromkeys(results, plan.data))
    log.info(f"report: [SRGAN] {plan.sr_experiment.name}")
    sr_cfg = plan.config(plan.sr_experiment, plan.data)
    first = plan.first_member
    if first in results and not sr_cfg.sr.content_checkpoint and sr_cfg.sr.content in ("auto", "model_a"):
        # without VGG19's ImageNet weights (content: auto), the content loss uses Model A's features
        sr_cfg.sr.content_checkpoint = results[first]["best_checkpoint"]
    srgan = obtain_run(sr_cfg, runs, reuse, task=SR, train=train)
    on_sr = [s for s in plan.runs if s.on_sr]
    if not on_sr:
        return {"runs": results, "data_of": data_of, "srgan": srgan, "data_sr": None, "data_sr_reused": False}
    candidates = [_run_data(folder / plan.run_config(s, plan.data).name) for folder in reuse for s in on_sr]
    data_sr, reused = upscaled_data(
        plan, srgan["best_checkpoint"], [c for c in candidates if c] + [out / "data_sr"], out / "data_sr"
    )
    on_sr_results = obtain_runs(plan, on_sr, data_sr, runs, reuse, train)
    results.update(on_sr_results)
    data_of.update(dict.fromkeys(on_sr_results, data_sr))
    return {"runs": results, "data_of": data_of, "srgan": srgan, "data_sr": str(data_sr), "data_sr_reused": reused}


def obtain_runs(
    plan: ReportPlan, specs: list, data: Path, runs: Path, reuse: list[Path], train: bool
) -> dict[str, dict]:
    """{key: run} for runs that do not depend on each other, up to `plan.concurrent_runs` at once.

    Each run is its own Ray Train job. They are driven from threads of this process (Ray Train runs
    its controller from any thread, as Tune does; a thread waiting on Ray costs no CPU), and a run
    starts only when the ones under way leave room for its workers (`RunGate`): a run Ray had to queue
    would time out waiting for its workers. A failed run does not stop the others: each finishes (and
    stays resumable), then the first error is raised."""
    import threading

    def obtain(spec, cfg):
        log.info(f"report: [{spec.label}] {spec.experiment.name} on {data}")
        return obtain_run(cfg, runs, reuse, train=train)

    if plan.concurrent_runs <= 1 or len(specs) <= 1:
        return {spec.key: obtain(spec, plan.run_config(spec, data)) for spec in specs}
    import ray

    from ferray.distributed.train import run_resources

    gate, outcomes = RunGate(ray.cluster_resources(), plan.concurrent_runs), {}

    def worker(spec):
        try:
            cfg = plan.run_config(spec, data)
            with gate.admit(run_resources(cfg)):
                outcomes[spec.key] = (obtain(spec, cfg), None)
        except BaseException as e:  # handed to the caller below, once the others have finished
            outcomes[spec.key] = (None, e)

    # daemon threads: a Ctrl-C ends the report at once (the runs stop with Ray, resumable) instead of
    # waiting at exit for every run to finish
    threads = [threading.Thread(target=worker, args=(spec,), daemon=True, name=f"run-{spec.key}") for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # join() with a timeout: the main thread stays interruptible
            thread.join(timeout=0.5)
    errors = [outcomes[spec.key][1] for spec in specs if outcomes[spec.key][1] is not None]
    if errors:
        raise errors[0]
    return {spec.key: outcomes[spec.key][0] for spec in specs}


class RunGate:
    """Admits runs while they fit beside each other: at most `most` at once, their CPUs and GPUs
    within the cluster's, and one CPU left over for the Ray Data tasks that feed them (Train
    workers holding every CPU starve those tasks and the runs hang). A run that does not fit even
    alone is admitted alone (`ferray train`'s own resource check then names what is missing)."""

    def __init__(self, total: dict, most: int):
        import threading

        self.free = {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0))}
        self.most, self.running, self.ready = most, 0, threading.Condition()

    def fits(self, need: dict) -> bool:
        if self.running == 0:
            return True
        if self.running >= self.most:
            return False
        left = {r: self.free[r] - need.get(r, 0) for r in self.free}
        return left["CPU"] >= 1 - 1e-9 and left["GPU"] >= -1e-9

    @contextmanager
    def admit(self, need: dict):
        with self.ready:
            self.ready.wait_for(lambda: self.fits(need))
            self.running += 1
            for r in self.free:
                self.free[r] -= need.get(r, 0)
        try:
            yield
        finally:
            with self.ready:
                self.running -= 1
                for r in self.free:
                    self.free[r] += need.get(r, 0)
                self.ready.notify_all()


def _run_data(run_dir: Path) -> Path | None:
    """The data folder a finished run was trained on, if it is one."""
    import yaml

    try:
        return Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def headline_split(splits: list[str]) -> str:
    """The split a report leads with: a test (never the selection split, the first of `splits`),
    PrivateTest where there is one, as FER2013's own protocol reports."""
    tests = splits[1:]
    return "PrivateTest" if "PrivateTest" in tests else (tests[0] if tests else splits[0])


def make_figures(
    plan: ReportPlan,
    record: dict,
    probs: dict,
    figures: Path,
    out: Path,
    splits: list[str],
    steps: Steps,
) -> dict:
    from ferray.bundle import build_bundle, fused_report, fusion_rule, write_fused_report
    from ferray.explain import explain_split
    from ferray.figures import plot_crops
    from ferray.metrics import plot_confusion
    from ferray.sr.evaluation import evaluate_generator

    runs, members = record["runs"], plan.ensemble
    on_sr = {spec.key for spec in plan.runs if spec.on_sr}
    log.info("report: Figure 2 (SR), the ensemble bundle (Figure 5), Figures 3 and 4")
    sr = steps(
        evaluate_generator,
        record["srgan"]["best_checkpoint"],
        plan.data,
        "PublicTest",
        out=figures,
        faces=plan.figures["sr_faces"],
    )
    # The members' probabilities from the evaluations above: an SR member's on the upscaled faces equal
    # what the bundle computes (SR on the fly, rounded to uint8 as `sr upscale` writes), so nothing is run twice.
    bundle = out / "bundle"
    selection = record["selection_split"]
    card = build_bundle(
        {member: runs[key]["best_checkpoint"] for member, key in members.items()},
        record["srgan"]["best_checkpoint"] if on_sr & set(members.values()) else None,
        plan.data,
        bundle,
        split=selection,
        overwrite=True,
        tests=False,
        probs=member_probs(probs, members, selection, "tta"),
        inputs={member: "sr" if key in on_sr else "face" for member, key in members.items()},
    )
    rule, ensemble, sets = fusion_rule(card, card.names()), {}, {}
    for split in splits:
        labels = load_split(plan.data, split)[1]
        ensemble[split] = {
            view: fused_report(member_probs(probs, members, split, view), labels, rule, split, view == "tta", bundle)
            for view in VIEWS
        }
        for report in ensemble[split].values():
            write_fused_report(report, out / "evaluations" / "ensemble")
        for name, set_members in card.sets.items():
            set_rule = fusion_rule(card, tuple(set_members))
            sets.setdefault(name, {"members": list(set_members)})[split] = {
                view: {"accuracy": set_accuracy(member_probs(probs, members, split, view), set_rule, labels)}
                for view in VIEWS
            }
    confusion = {
        split: str(
            plot_confusion(
                ensemble[split]["tta"]["confusion"],
                figures / f"fig5-confusion-{split}.png",
                f"ensemble on {split} (TTA): {ensemble[split]['tta']['accuracy']:.2%}",
            )
        )
        for split in splits
    }
    cfg_a = from_dict(_config_of(runs[plan.first_member]["best_checkpoint"]))
    faces, _, _ = load_split(plan.data, "Training")
    crops = plot_crops(
        faces[0],
        cfg_a.augment,
        figures / "fig3-crops.png",
        plan.figures["crops"],
        seed=0,
        title=f"random {cfg_a.augment.crop}x{cfg_a.augment.crop} training views ({cfg_a.name})",
    )
    guided = steps(
        explain_split,
        runs[plan.first_member]["best_checkpoint"],
        plan.data,
        "PublicTest",
        plan.figures["explain_per_class"],
        figures / "fig4-guided-backprop.png",
    )
    return {
        "sr_eval": sr,
        "bundle": str(bundle),
        "fusion": dataclasses.asdict(card.fusion),
        "fusion_alternatives": card.alternatives,
        "ensemble": ensemble,
        "sets": sets,
        "figures": {
            "fig2": str(figures / "sr-grid-PublicTest.png"),
            "fig3": str(crops),
            "fig4": guided["figure"],
            "fig5": confusion,
        },
        "guided_faces": guided["faces"],
    }


def set_accuracy(probs: dict, rule, labels) -> float:
    """The accuracy of a set's fused answers (`rule` weighs only its members)."""
    fused = rule({member: probs[member] for member in rule.weights})
    return float((fused.argmax(1) == labels).mean())


def _config_of(checkpoint: str) -> dict:
    from ferray.engine import load_checkpoint

    return load_checkpoint(checkpoint)["config"]
