"""`ferray tune`: Ray Tune + Optuna (TPE) + ASHA over an experiment's hyperparameters.

A search file names a base experiment, overrides, and a search space of dotted config keys:

    experiment: model_a.yaml            # relative to the search file
    set: [train.epochs=30]
    search:
      metric: eval_acc                  # reported each epoch, on the selection split (never a test split)
      mode: max
      samples: 20
      max_concurrent: 2                 # default: what the cluster's resources allow
      seed: 0
      space:
        optim.lr: {distribution: loguniform, low: 1.0e-4, high: 0.05}
        loss.center_lambda: {distribution: loguniform, low: 1.0e-5, high: 0.1}
      first: {optim.lr: 0.01}           # points evaluated first (default: the base config's values)
      asha: {grace_period: 2, reduction_factor: 2}     # or `asha: off`
      max_failures: 2
      ray_train: false                  # true: every trial a Ray Train run, even a one-worker one

A trial of several workers is the same Ray Train run as `ferray train` (ferray.distributed.train.build_trainer,
Train V2 inside Tune through TuneReportCallback); a one-worker trial runs the same loop on the same
batches in its own Tune actor (run_trial says why). Multi-worker and GPU trials work. Outputs under OUT/NAME:
trials.csv, search.png, best.yaml (an experiment `ferray train` accepts), best.pt, and the Tune
and Train state that `--resume` continues from.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ferray.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_runnable_config,
    read_yaml,
    to_dict,
)
from ferray.tasks import get_task

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclass
class Param:
    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    choices: list | None = None


@dataclass
class SearchSpec:
    name: str
    base: ExperimentConfig
    params: list[Param]
    metric: str = "eval_acc"
    mode: str = "max"
    samples: int = 10
    max_concurrent: int | None = None
    seed: int = 0
    first: list[dict] = field(default_factory=list)
    asha: dict | None = field(default_factory=lambda: {"grace_period": 2, "reduction_factor": 2})
    max_failures: int = 2
    ray_train: bool = False  # every trial a Ray Train run (else one-worker trials train in their actors)


# ------------------------------------------------------------------------------------------ parsing
def _config_field(cfg: ExperimentConfig, key: str, where: str):
    node = cfg
    parts = key.split(".")
    for part in parts:
        if not hasattr(node, part):
            raise ConfigError(
                f"{where}: search space key {key!r} is not a config key (e.g. optim.lr, loss.center_lambda)"
            )
        node = getattr(node, part)
    if isinstance(node, bool) or not isinstance(node, (int, float, str)):
        raise ConfigError(f"{where}: search space key {key!r} is not a number or a string")
    return node


def parse_param(key: str, spec: dict, base: ExperimentConfig, where: str) -> Param:
    current = _config_field(base, key, where)
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise ConfigError(f"{where}: {key}: expected {{distribution: {'|'.join(DISTRIBUTIONS)}, ...}}, got {spec!r}")
    dist = spec["distribution"]
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key}: distribution {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    unknown = set(spec) - {"distribution", "low", "high", "choices"}
    if unknown:
        raise ConfigError(f"{where}: {key}: unknown field(s) {', '.join(sorted(unknown))}")
    if dist == "choice":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list of choices")
        return Param(key, dist, choices=choices)
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: {key}: {dist} needs numeric low and high") from None
    if not low < high:
        raise ConfigError(f"{where}: {key}: empty or inverted range [{low}, {high}]")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {key}: loguniform needs low > 0, got {low}")
    if dist == "int" and not isinstance(current, int):
        raise ConfigError(f"{where}: {key}: int distribution on a non-integer setting")
    if dist != "int" and isinstance(current, str):
        raise ConfigError(f"{where}: {key}: numeric distribution on a text setting")
    return Param(key, dist, low, high)


def load_search(path: str | Path, overrides: list[str] = ()) -> SearchSpec:
    path = Path(path)
    data = read_yaml(path, "search file")
    where = str(path)
    unknown = set(data) - {"name", "experiment", "set", "search", "description"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: name, experiment, set, search)"
        )
    if "experiment" not in data or "search" not in data:
        raise ConfigError(f"{where}: needs `experiment:` (a base experiment file) and `search:`")
    base = load_runnable_config(path.parent / data["experiment"], list(data.get("set", [])) + list(overrides))
    search = data["search"]
    known = {
        "metric",
        "mode",
        "samples",
        "max_concurrent",
        "seed",
        "space",
        "first",
        "asha",
        "max_failures",
        "ray_train",
    }
    if set(search) - known:
        raise ConfigError(f"{where}: search: unknown key(s) {', '.join(sorted(set(search) - known))}")
    space = search.get("space") or {}
    if not space:
        raise ConfigError(f"{where}: search.space is empty")
    params = [parse_param(k, v, base, where) for k, v in space.items()]
    spec = SearchSpec(
        name=data.get("name", path.stem),
        base=base,
        params=params,
        metric=search.get("metric", "eval_acc"),
        mode=search.get("mode", "max"),
        samples=int(search.get("samples", 10)),
        max_concurrent=search.get("max_concurrent"),
        seed=int(search.get("seed", 0)),
        max_failures=int(search.get("max_failures", 2)),
        ray_train=search.get("ray_train", False),
    )
    if not isinstance(spec.ray_train, bool):
        raise ConfigError(f"{where}: search.ray_train: true or false, not {spec.ray_train!r}")
    reported = get_task("classifier").reported_metrics
    if spec.metric not in reported:
        raise ConfigError(
            f"{where}: metric {spec.metric!r} is not reported by the trainer (reported: {', '.join(reported)})"
        )
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"{where}: mode must be max or min, not {spec.mode!r}")
    if spec.samples < 1:
        raise ConfigError(f"{where}: samples must be at least 1")
    asha = search.get("asha", spec.asha)
    spec.asha = None if asha in (None, False, "off") else {"grace_period": 1, "reduction_factor": 2, **asha}
    first = search.get("first")
    first = [first] if isinstance(first, dict) else list(first or [])
    keys = [p.key for p in params]
    for i, point in enumerate(first):
        for key in point:
            if key not in keys:
                raise ConfigError(f"{where}: search.first names {key!r}, which is not in the search space")
        if set(point) != set(keys):  # Tune's searchers take only complete points
            raise ConfigError(
                f"{where}: search.first[{i}] must give every parameter of the space "
                f"({', '.join(keys)}); it lacks {', '.join(k for k in keys if k not in point)}"
            )
    # The base config's own values are evaluated first unless told otherwise: the paper's recipe
    # (where a `choice` parameter's base value is not among its choices there is no such point).
    base_point = {p.key: _config_field(base, p.key, where) for p in params}
    complete = all(base_point[p.key] in p.choices for p in params if p.distribution == "choice")
    spec.first = first or ([base_point] if complete else [])
    for point in spec.first:
        for p in params:
            value = point.get(p.key)
            if value is not None and p.distribution != "choice" and not p.low <= value <= p.high:
                raise ConfigError(
                    f"{where}: the first point's {p.key} = {value} lies outside [{p.low}, {p.high}] "
                    "(set search.first, or widen the range)"
                )
    return spec


def optuna_space(spec: SearchSpec) -> dict:
    import optuna

    space = {}
    for p in spec.params:
        if p.distribution == "choice":
            space[p.key] = optuna.distributions.CategoricalDistribution(p.choices)
        elif p.distribution == "int":
            space[p.key] = optuna.distributions.IntDistribution(int(p.low), int(p.high))
        else:
            space[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.distribution == "loguniform")
    return space


def trial_config(base: ExperimentConfig, sampled: dict) -> ExperimentConfig:
    data = apply_overrides(to_dict(base), [f"{k}={v}" for k, v in sampled.items()])
    return from_dict(data)


# ------------------------------------------------------------------------------------------ trials
def run_trial(
    config: dict, base: dict, trials_dir: str, train_rows: int, in_actor: bool = False, metric=("eval_acc", "max")
) -> None:
    """Tune function trainable: one training run of the sampled config, in RUN = TRIALS/<trial id>.

    A trial of several workers (or a streamed loader) is a Ray Train run (Train V2 inside Tune), named
    by the trial id so that a trial restarted by --resume or after a failure continues its own run.
    A one-worker trial (`in_actor`, see `trains_in_actor`) runs the same loop in the trial's own actor:
    Ray Train would add a controller, a worker and a Ray Data pipeline, five or so new processes
    that import torch, for no parallelism. Both keep the same files in RUN and report the same metrics.
    """
    import ray.tune

    from ferray.distributed.runtime import quiet_worker_logs

    quiet_worker_logs()
    cfg = trial_config(from_dict(base), config)
    run_dir = Path(trials_dir) / ray.tune.get_context().get_trial_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    if in_actor:
        train_in_trial(cfg, run_dir, *metric)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from ferray.distributed.train import build_trainer

    trainer = build_trainer(cfg, run_dir, train_rows, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def trains_in_actor(spec: SearchSpec) -> bool:
    """Whether every trial of the search trains in its Tune actor (one worker, the cached loader,
    neither of which the space can change, and no `ray_train: true`) rather than as a Ray Train run."""
    tunes_layout = any(p.key.startswith("scaling.") or p.key == "train.loader" for p in spec.params)
    one_worker = spec.base.scaling.workers == 1 and spec.base.train.loader == "cache"
    return one_worker and not tunes_layout and not spec.ray_train


TRIAL_BEST_DIR = "best"  # RUN/best/checkpoint.pt: the trial's best epoch so far, for best.pt


def train_in_trial(cfg: ExperimentConfig, run_dir: Path, metric: str = "eval_acc", mode: str = "max") -> None:
    """The training loop of a one-worker run, in the Tune actor: the faces read from their files in
    the order a cached shard has (the batches are then those of `ferray train`'s worker), each epoch
    a checkpoint for Tune (what a restarted trial resumes from), the best epoch by the search's
    metric kept in RUN/best (the search's best.pt is copied from there)."""
    import tempfile

    import ray.tune
    import torch

    from ferray import engine
    from ferray.device import training_machine_facts
    from ferray.distributed.train import (
        log_epoch,
        read_in_key_order,
        selection_batches,
        selection_rows,
        tensorboard_writer,
    )
    from ferray.engine import TensorBatches
    from ferray.fit import fit
    from ferray.runs import RunFolder
    from ferray.tasks import CLASSIFIER as task

    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    engine.seed_everything(cfg.train.seed)
    device = torch.device("cuda" if cfg.scaling.gpus_per_worker and torch.cuda.is_available() else "cpu")
    state = task.build(cfg, device, rank=0)
    run_files = RunFolder(run_dir)
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            task.restore(state, engine.load_checkpoint(folder, kind=task.kind))
        run_files.rewrite_epochs(state.history)
        print(f"resumed from the checkpoint of epoch {state.epoch}", flush=True)
    run_files.write_machine(training_machine_facts(state))
    images, labels, keys = read_in_key_order(cfg, device)
    train = TensorBatches(
        images, labels, cfg.train.batch_size, seed=cfg.train.seed, rank=0, keys=keys if cfg.distill.bank else None
    )
    selection = selection_batches(cfg, device)
    writer, best_dir = tensorboard_writer(run_dir), run_dir / TRIAL_BEST_DIR
    sign = 1 if mode == "max" else -1
    best = max((sign * r[metric] for r in state.history if metric in r), default=None)

    def report(state, row: dict) -> None:
        nonlocal best
        with tempfile.TemporaryDirectory() as folder:
            task.save(Path(folder) / engine.CHECKPOINT_FILE, state, row)
            log_epoch(run_files, writer, task.format_epoch(row, cfg), row)
            if best is None or sign * row[metric] >= best:  # ties: the later epoch (trial_rows takes the last)
                best = sign * row[metric]
                best_dir.mkdir(exist_ok=True)
                shutil.copy(Path(folder) / engine.CHECKPOINT_FILE, best_dir / engine.CHECKPOINT_FILE)
            metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            ray.tune.report(
                {**metrics, "checkpoint_path": str(best_dir)}, checkpoint=ray.tune.Checkpoint.from_directory(folder)
            )

    fit(
        task,
        state,
        train.epoch,
        lambda s: task.evaluate(s, selection),
        len(train),
        on_epoch=report,
        eval_images=selection_rows(cfg),
    )
    if writer is not None:
        writer.close()


def feasible_concurrency(cfg: ExperimentConfig, cluster: dict) -> int:
    """The trials that can ever run at once: on an autoscaling cluster, against the ceilings its node
    types declare (FERRAY_MAX_CPUS / FERRAY_MAX_GPUS; a fresh cluster is a head of 0 CPUs), else
    against what it has now."""
    from ferray.distributed.cluster import ceiling
    from ferray.distributed.train import run_resources

    need = run_resources(cfg)
    limits = [math.floor(ceiling(r, cluster.get(r, 0)) / n + 1e-9) for r, n in need.items() if n > 0]
    return max(0, min(limits)) if limits else 1


# ------------------------------------------------------------------------------------------- driver
def run_search(spec: SearchSpec, out: Path, resume: bool = False) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from ferray.distributed.cluster import check_shared_paths
    from ferray.distributed.runtime import connect
    from ferray.distributed.train import check_data, check_resources, pin_outside_files, run_resources
    from ferray.tasks import CLASSIFIER

    manifest = check_data(spec.base)  # makes data.path absolute: trials run in directories of their own
    outside = pin_outside_files(spec.base, CLASSIFIER)  # every trial reads the files found here
    search_dir = (Path(out) / spec.name).absolute()
    tuner_path = search_dir / "search"
    if resume and not tune.Tuner.can_restore(str(tuner_path)):
        raise ConfigError(f"--resume: no search to resume at {tuner_path}")
    if not resume and search_dir.exists():
        raise ConfigError(f"{search_dir} exists: pass --resume to continue it, or choose another --name/--out")
    info = connect()
    check_resources(spec.base)
    feasible = feasible_concurrency(spec.base, ray.cluster_resources())
    concurrent = spec.max_concurrent or max(1, min(feasible, spec.samples))
    if concurrent > feasible:
        raise ConfigError(
            f"max_concurrent {concurrent}: each trial needs {run_resources(spec.base)}, so this "
            f"cluster ({info.cpus:g} CPUs, {info.gpus:g} GPUs) runs at most {feasible} at once"
        )
    search_dir.mkdir(parents=True, exist_ok=True)
    check_shared_paths({"data": spec.base.data.path, "search folder": search_dir, **outside})
    epochs = spec.base.train.epochs
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=min(spec.asha["grace_period"], epochs),
            reduction_factor=spec.asha["reduction_factor"],
        )
        if spec.asha
        else FIFOScheduler()
    )
    # A trial that trains in its actor holds the worker's resources itself; one that starts a Train
    # run only waits on it, whose workers hold the real resources (a zero request is refused by
    # Tune, hence the token CPU share).
    in_actor = trains_in_actor(spec)
    need = run_resources(spec.base)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=to_dict(spec.base),
            trials_dir=str(search_dir / "trials"),
            train_rows=manifest["splits"][spec.base.data.train_split]["rows"],
            in_actor=in_actor,
            metric=(spec.metric, spec.mode),
        ),
        {k: v for k, v in need.items() if v} if in_actor else {"CPU": 0.01},
    )
    log.info(
        f"tune: {spec.samples} trials of {spec.base.name} over {', '.join(p.key for p in spec.params)}; "
        f"Optuna TPE (seed {spec.seed}), {'ASHA' if spec.asha else 'no early stopping'} on {spec.metric} of "
        f"{spec.base.data.selection_split} (the selection split), "
        f"{concurrent} at a time{', each in its Tune actor' if in_actor else ', each a Ray Train run'}; {search_dir}"
    )
    t0 = time.perf_counter()
    ends = TrialEnds(search_dir)
    if resume:
        # A restored Tuner keeps its saved run config, callbacks included (they write to the same folder).
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    else:
        import optuna

        searcher = OptunaSearch(
            space=optuna_space(spec),
            metric=spec.metric,
            mode=spec.mode,
            points_to_evaluate=spec.first,
            sampler=optuna.samplers.TPESampler(seed=spec.seed),
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=spec.samples,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=str(search_dir),
                verbose=1,
                callbacks=[ends.tune_callback()],
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # a trial training in its actor checkpoints to Tune each epoch: the latest is what it
                # resumes from (its best epoch is kept in its own folder)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    try:
        grid = tuner.fit()
    finally:
        ends.sweep()
    unfinished = unfinished_trials(spec, grid, ends.ended())
    if unfinished:
        raise SearchInterrupted(
            f"search {search_dir} stopped with {unfinished} of {spec.samples} trials unfinished; "
            f"continue it with --resume"
        )
    return summarize_search(spec, search_dir, grid, time.perf_counter() - t0)


class SearchInterrupted(KeyboardInterrupt):
    pass


ENDED_FILE = "ended.txt"


class TrialEnds:
    """What ferray does when Tune says a trial ended (it completed, ASHA stopped it, or it failed):

    * records its id in SEARCH/ended.txt. After Ctrl-C, Tune marks a trial that was still running
      TERMINATED in the results it returns, just like a finished one, so the status cannot tell an
      interrupted search from a finished one; Tune calls on_trial_complete only for real endings.
    * frees its workers' placement group. When ASHA (or an error) stops a trial, Tune kills its
      actor and with it the Train V2 controller, but the group stays reserved for the rest of the
      driver's life (ray-project/ray#54305): on a small cluster the next Train run then waits
      forever for those CPUs/GPUs. Each run records its group's id (ferray.distributed.train).
    """

    def __init__(self, search_dir: Path):
        self.search_dir = Path(search_dir)
        self.trials_dir = self.search_dir / "trials"

    def ended(self) -> set[str]:
        path = self.search_dir / ENDED_FILE
        return set(path.read_text().split()) if path.is_file() else set()

    def tune_callback(self):
        from ray.tune import Callback

        ends = self

        class OnTrialEnd(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                ends.record(trial.trial_id)

            def on_trial_error(self, iteration, trials, trial, **info):
                ends.record(trial.trial_id)

        return OnTrialEnd()

    def record(self, trial_id: str) -> None:
        with open(self.search_dir / ENDED_FILE, "a") as f:
            f.write(trial_id + "\n")
        self.release(trial_id)

    def sweep(self) -> None:
        """After the search (or an interrupted one): every trial's group, whatever ended it."""
        for run_dir in self.trials_dir.glob("*"):
            self.release(run_dir.name)

    def release(self, trial_id: str) -> None:
        from ferray.distributed.placement import release_placement_group

        try:
            release_placement_group(self.trials_dir / trial_id)
        except Exception as e:  # never fail a search over bookkeeping; say so
            print(f"tune: could not release trial {trial_id}'s placement group ({type(e).__name__}: {e})", flush=True)


def unfinished_trials(spec: SearchSpec, grid, ended: set[str]) -> int:
    """Trials not yet run or not done: Tune returns normally after Ctrl-C, with these left over.
    `ended`: the trials Tune reported as ended (TrialEnds), which a status cannot tell apart."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return spec.samples - len({t.trial_id for t in trials} & ended)


# ------------------------------------------------------------------------------------------ results
def trial_rows(spec: SearchSpec, grid) -> list[dict]:
    rows = []
    for order, result in enumerate(sorted(grid, key=lambda r: r.metrics.get("trial_id", "") if r.metrics else "")):
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        best, epochs, checkpoint = None, 0, None
        if frame is not None and spec.metric in frame:
            column = frame[spec.metric]
            idx = column.idxmax() if spec.mode == "max" else column.idxmin()
            best, epochs = float(column[idx]), int(frame["epoch"].max())
            if "checkpoint_path" in frame:
                candidates = frame.loc[frame[spec.metric] == best, "checkpoint_path"].dropna()
                checkpoint = candidates.iloc[-1] if len(candidates) else None
        rows.append(
            {
                "trial": metrics.get("trial_id") or Path(result.path).name,
                "order": order,
                **{p.key: result.config.get(p.key) for p in spec.params},
                spec.metric: best,
                "epochs": epochs,
                "stopped_early": 0 < epochs < spec.base.train.epochs,
                "status": "ERROR" if result.error else "TERMINATED",
                "checkpoint": checkpoint,
            }
        )
    return rows


def summarize_search(spec: SearchSpec, search_dir: Path, grid, seconds: float) -> dict:
    rows = trial_rows(spec, grid)
    scored = [r for r in rows if r[spec.metric] is not None]
    if not scored:
        raise RuntimeError(f"no trial of {search_dir} reported {spec.metric}; see the errors above")
    best = (max if spec.mode == "max" else min)(scored, key=lambda r: r[spec.metric])
    with open(search_dir / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best_cfg = trial_config(spec.base, {p.key: best[p.key] for p in spec.params})
    best_cfg.name = f"{spec.name}_best"
    best_cfg.description = (
        f"best of `ferray tune` {spec.name}: trial {best['trial']}, {spec.metric} {best[spec.metric]:.4f}"
    )
    (search_dir / "best.yaml").write_text(f"# {best_cfg.description}\n" + dump_yaml(best_cfg))
    checkpoint = best["checkpoint"]
    if checkpoint and Path(checkpoint, "checkpoint.pt").exists():
        shutil.copy(Path(checkpoint, "checkpoint.pt"), search_dir / "best.pt")
    plot_search(spec, rows, search_dir / "search.png")
    summary = {
        "name": spec.name,
        "selection_split": spec.base.data.selection_split,
        "trials": len(rows),
        "errors": sum(r["status"] == "ERROR" for r in rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "trial_epochs": sum(r["epochs"] for r in rows),
        "best": best,
        "best_config": str(search_dir / "best.yaml"),
        "best_checkpoint": str(search_dir / "best.pt") if (search_dir / "best.pt").exists() else checkpoint,
        "seconds": round(seconds, 1),
    }
    (search_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info(format_table(spec, rows))
    log.info(
        f"tune: {len(rows)} trials ({summary['stopped_early']} stopped early by ASHA, {summary['errors']} errors, "
        f"{summary['trial_epochs']} trial-epochs) in {seconds:.0f}s; best {spec.metric} {best[spec.metric]:.4f} "
        f"on {spec.base.data.selection_split} (selection) "
        f"(trial {best['trial']}); config {search_dir / 'best.yaml'}; checkpoint {summary['best_checkpoint']}"
    )
    return summary


def format_table(spec: SearchSpec, rows: list[dict]) -> str:
    keys = [p.key for p in spec.params]
    header = ["trial", *keys, spec.metric, "epochs", "status"]
    lines = ["  ".join(f"{h:>16}" for h in header)]
    for r in rows:
        cells = [
            str(r["trial"])[-16:],
            *(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys),
            "-" if r[spec.metric] is None else f"{r[spec.metric]:.4f}",
            str(r["epochs"]),
            r["status"] + (" (ASHA)" if r["stopped_early"] else ""),
        ]
        lines.append("  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot_search(spec: SearchSpec, rows: list[dict], path: Path) -> Path:
    """Left: the first two parameters (log axes where loguniform), colored by the metric.
    Right: the metric in trial order with the running best."""
    from ferray.plotting import pyplot, save

    plt = pyplot()

    scored = [r for r in rows if r[spec.metric] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    values = [r[spec.metric] for r in scored]
    numeric = [p for p in spec.params if p.distribution != "choice"]
    if len(numeric) >= 2:
        px, py = numeric[0], numeric[1]
        points = left.scatter(
            [r[px.key] for r in scored], [r[py.key] for r in scored], c=values, cmap="viridis", s=60, edgecolors="k"
        )
        left.set_xscale("log" if px.distribution == "loguniform" else "linear")
        left.set_yscale("log" if py.distribution == "loguniform" else "linear")
        left.set_xlabel(px.key)
        left.set_ylabel(py.key)
        fig.colorbar(points, ax=left, label=spec.metric)
    elif numeric:
        left.scatter([r[numeric[0].key] for r in scored], values)
        left.set_xscale("log" if numeric[0].distribution == "loguniform" else "linear")
        left.set_xlabel(numeric[0].key)
        left.set_ylabel(spec.metric)
    left.set_title("search space")
    order = sorted(scored, key=lambda r: r["order"])
    ys = [r[spec.metric] for r in order]
    running = [(max if spec.mode == "max" else min)(ys[: i + 1]) for i in range(len(ys))]
    right.plot(range(1, len(ys) + 1), ys, "o", label="trial")
    right.plot(range(1, len(ys) + 1), running, "-", label="best so far")
    early = [i + 1 for i, r in enumerate(order) if r["stopped_early"]]
    if early:
        right.plot(early, [order[i - 1][spec.metric] for i in early], "x", color="red", label="stopped by ASHA")
    right.set_xlabel("trial")
    right.set_ylabel(spec.metric)
    right.set_title("progress")
    right.legend()
    save(fig, path, dpi=110)
    return path
