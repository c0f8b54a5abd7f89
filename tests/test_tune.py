"""`ferray tune`: search space parsing and checks, a rigged search, and kill + resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ferray.config import ConfigError, load_config
from ferray.distributed.tune import feasible_concurrency, load_search, optuna_space

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def search_file(tmp_path, space, **search):
    path = tmp_path / "s.yaml"
    body = {
        "experiment": str(EXPERIMENTS / "debug_a.yaml"),
        "set": ["train.epochs=3"],
        "search": {"space": space, **search},
    }
    path.write_text(yaml.safe_dump(body))
    return path


def test_space_parses_to_optuna_distributions(tmp_path):
    spec = load_search(
        search_file(
            tmp_path,
            {
                "optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 0.01},
                "loss.center_alpha": {"distribution": "uniform", "low": 0.1, "high": 0.9},
                "train.batch_size": {"distribution": "int", "low": 16, "high": 64},
                "optim.name": {"distribution": "choice", "choices": ["adamax", "sgd"]},
            },
        )
    )
    dists = optuna_space(spec)
    assert dists["optim.lr"].log and dists["optim.lr"].low == 1e-4
    assert not dists["loss.center_alpha"].log and dists["train.batch_size"].high == 64
    assert dists["optim.name"].choices == ("adamax", "sgd")
    # the base recipe first, every parameter given (Tune's searchers refuse incomplete points)
    assert spec.first == [{"optim.lr": 0.003, "loss.center_alpha": 0.5, "train.batch_size": 64, "optim.name": "adamax"}]
    no_base = load_search(search_file(tmp_path, {"optim.name": {"distribution": "choice", "choices": ["sgd"]}}))
    assert no_base.first == []  # the base value is not a choice: no base point, the sampler starts
    assert spec.asha == {"grace_period": 2, "reduction_factor": 2}
    for path in (EXPERIMENTS / "tune_a.yaml", EXPERIMENTS / "debug_tune.yaml"):
        assert load_search(path).params


def test_one_worker_trials_train_in_their_actors_unless_told_or_shaped_otherwise(tmp_path):
    from ferray.distributed.tune import trains_in_actor

    lr = {"optim.lr": {"distribution": "uniform", "low": 0.001, "high": 0.2}}
    assert trains_in_actor(load_search(search_file(tmp_path, lr)))  # debug_a: one worker, cached faces
    assert not trains_in_actor(load_search(search_file(tmp_path, lr, ray_train=True)))
    assert not trains_in_actor(load_search(search_file(tmp_path, lr), ["scaling.workers=2"]))
    assert not trains_in_actor(load_search(search_file(tmp_path, lr), ["train.loader=stream"]))
    workers = {"scaling.workers": {"distribution": "choice", "choices": [1, 2]}}
    assert not trains_in_actor(load_search(search_file(tmp_path, {**lr, **workers})))


@pytest.mark.parametrize(
    "space, extra, message",
    [
        ({"optim.lrr": {"distribution": "uniform", "low": 0, "high": 1}}, {}, "not a config key"),
        ({"optim.lr": {"distribution": "loguniform", "low": 0.01, "high": 0.001}}, {}, "inverted range"),
        ({"optim.lr": {"distribution": "uniform", "low": 0.01, "high": 0.01}}, {}, "empty or inverted range"),
        ({"optim.lr": {"distribution": "loguniform", "low": 0, "high": 0.1}}, {}, "low > 0"),
        ({"optim.lr": {"distribution": "normal", "low": 0, "high": 0.1}}, {}, "not one of"),
        ({"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 0.2}}, {}, "outside"),
        ({"optim.lr": {"distribution": "uniform", "low": 0.001, "high": 0.2}}, {"metric": "eval_f1"}, "not reported"),
        ({}, {}, "space is empty"),
        (
            {
                "optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 0.01},
                "optim.name": {"distribution": "choice", "choices": ["adamax", "sgd"]},
            },
            {"first": [{"optim.lr": 0.001}]},
            r"first\[0\] must give every parameter.*lacks optim.name",
        ),
        ({"optim.lr": {"distribution": "uniform", "low": 0.001, "high": 0.2}}, {"ray_train": "yes"}, "ray_train"),
    ],
)
def test_bad_search_files_fail_before_any_trial(tmp_path, space, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_search(search_file(tmp_path, space, **extra))


def test_concurrency_is_bounded_by_resources(monkeypatch):
    for name in ("FERRAY_MAX_CPUS", "FERRAY_MAX_GPUS"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(None, ["scaling.workers=2", "scaling.cpus_per_worker=1"])
    assert feasible_concurrency(cfg, {"CPU": 4}) == 2 and feasible_concurrency(cfg, {"CPU": 3}) == 1
    gpu = load_config(None, ["scaling.gpus_per_worker=1"])
    assert feasible_concurrency(gpu, {"CPU": 16, "GPU": 1}) == 1
    # an autoscaling cluster starts as a head of 0 CPUs: the node types' ceilings count, not what is up now
    assert feasible_concurrency(gpu, {"CPU": 0, "GPU": 0}) == 0
    monkeypatch.setenv("FERRAY_MAX_CPUS", "128")
    monkeypatch.setenv("FERRAY_MAX_GPUS", "8")
    assert feasible_concurrency(gpu, {"CPU": 0, "GPU": 0}) == 8 and feasible_concurrency(cfg, {"CPU": 0}) == 64


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from ferray.data.synth import SynthSpec, synthesize

    path = tmp_path_factory.mktemp("tune") / "faces"
    synthesize(path, SynthSpec(n=280, seed=2))
    return path


def read_trials(search_dir):
    with open(search_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["cache", "stream"], ids=["in-actor", "ray-train"])
def test_rigged_search_stops_the_bad_trial_and_writes_its_outputs(ray_session, tiny_data, tmp_path, loader):
    """Both kinds of trial: one-worker trials with the cached loader train in their Tune actors, the
    others (here: the streamed loader) are Ray Train runs inside Tune."""
    from ferray.distributed.tune import run_search, trains_in_actor

    # Rigged through the loss itself, not through training dynamics: a center-loss weight of 10 makes
    # the epoch-1 train_loss several times that of lambda 0, whatever the optimizer did meanwhile.
    path = search_file(
        tmp_path,
        {"loss.center_lambda": {"distribution": "uniform", "low": 0.0, "high": 10.0}},
        samples=2,
        max_concurrent=1,
        seed=0,
        asha={"grace_period": 1, "reduction_factor": 2},
        metric="train_loss",
        mode="min",
        first=[{"loss.center_lambda": 0.0}, {"loss.center_lambda": 10.0}],
    )  # good, then hopeless
    spec = load_search(
        path,
        [
            f"data.path={tiny_data}",
            "scaling.cpus_per_worker=1",
            "train.batch_size=16",
            "train.epochs=2",
            f"train.loader={loader}",
        ],
    )
    assert trains_in_actor(spec) == (loader == "cache")
    before = set(ray_session.util.placement_group_table())
    summary = run_search(spec, tmp_path / "runs")
    search_dir = tmp_path / "runs" / "s"
    # a Train run records its workers' group (an in-actor trial has none of its own) ...
    recorded = list((search_dir / "trials").glob("*/placement_group"))
    assert len(recorded) == (0 if loader == "cache" else 2)
    # ... and no trial leaves a placement group reserved, not even the one ASHA stopped (ray#54305)
    table = ray_session.util.placement_group_table()
    made = {g: t for g, t in table.items() if g not in before}
    assert made and all(t["state"] == "REMOVED" for t in made.values()), made
    assert {f.read_text().strip() for f in recorded} <= set(made)
    rows = read_trials(search_dir)
    assert len(rows) == 2 and summary["trials"] == 2
    assert any(r["stopped_early"] == "True" for r in rows), rows  # ASHA cut the hopeless one at rung 1
    assert summary["trial_epochs"] < 2 * 2
    assert (search_dir / "search.png").stat().st_size > 5000
    best = load_config(search_dir / "best.yaml")
    assert best.loss.center_lambda == pytest.approx(float(summary["best"]["loss.center_lambda"]))
    assert best.loss.center_lambda < 10.0
    import torch

    assert torch.load(search_dir / "best.pt", weights_only=True)["kind"] == "classifier"


@pytest.mark.slow
def test_a_killed_search_resumes_without_repeating_finished_trials(tiny_data, tmp_path):
    """`ferray tune` as users run it: Ctrl-C after the first trial finished, then --resume."""
    path = search_file(
        tmp_path,
        {"optim.lr": {"distribution": "loguniform", "low": 1e-3, "high": 0.01}},
        samples=2,
        max_concurrent=1,
        asha="off",
        first=[{"optim.lr": 0.005}],
    )
    env = {**os.environ, "FERRAY_NUM_CPUS": "4"}
    env.pop("RAY_ADDRESS", None)
    args = [
        sys.executable,
        "-m",
        "ferray.cli",
        "tune",
        str(path),
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "runs"),
        "--set",
        "scaling.cpus_per_worker=1",
        "--set",
        "train.batch_size=32",
        "--epochs",
        "2",
    ]
    search_dir = tmp_path / "runs" / "s"
    trials = search_dir / "trials"

    def finished():
        return [
            d
            for d in trials.glob("*")
            if (d / "metrics.jsonl").exists() and len((d / "metrics.jsonl").read_text().splitlines()) == 2
        ]

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 400
    # finished = Tune has moved on to the next trial (a trial that has written its epoch but not yet
    # reported it to Tune is not finished)
    while time.time() < deadline and not (finished() and len(list(trials.glob("*"))) >= 2):
        time.sleep(0.5)
    assert finished(), "the first trial did not finish in time"
    done_before = {d.name: (d / "metrics.jsonl").read_text() for d in finished()}
    first.send_signal(signal.SIGINT)  # what Ctrl-C does
    first.wait(timeout=120)
    assert not (search_dir / "trials.csv").exists(), (tmp_path / "first.log").read_text()[
        -4000:
    ]  # interrupted, not finished

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_trials(search_dir)
    assert len(rows) == 2 and len({r["trial"] for r in rows}) == 2
    assert all(r["status"] == "TERMINATED" and r["epochs"] == "2" for r in rows)
    for name, text in done_before.items():  # finished trials were not run again
        assert (trials / name / "metrics.jsonl").read_text() == text
    assert json.loads((search_dir / "result.json").read_text())["trials"] == 2
