"""`ferray train` through Ray Train on synthetic faces: 2 workers, resume, a lost worker."""

import json
import os
import signal
import threading
import time

import pytest

from ferray.config import load_config
from ferray.data.contract import read_manifest
from ferray.data.synth import SynthSpec, synthesize
from ferray.evaluate import evaluate_checkpoint
from ferray.train import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synth"
    synthesize(path, SynthSpec(n=280, seed=1))
    return path


def tiny(data, epochs, *extra):
    return load_config(None, [f"data.path={data}", "model.name=xception_a_tiny", f"train.epochs={epochs}",
                              "train.batch_size=32", "optim.lr=0.003", "loss.center_lambda=0.001",
                              "scaling.workers=2", "scaling.cpus_per_worker=1", *extra])


def epochs_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def test_two_workers_save_resume_and_evaluate(ray_session, synth_data, tmp_path):
    first = run_training(tiny(synth_data, 2), tmp_path, name="run", echo=lambda _: None)
    run_dir = tmp_path / "run"
    assert first["epochs"] == 2 and first["workers"] == 2
    assert {"config.yaml", "metrics.jsonl", "best.pt", "result.json"} <= {p.name for p in run_dir.iterdir()}
    assert list(run_dir.glob("tensorboard/events.out.tfevents.*"))
    assert epochs_logged(run_dir) == [1, 2]
    with pytest.raises(Exception, match="exists: pass --resume"):
        run_training(tiny(synth_data, 3), tmp_path, name="run", echo=lambda _: None)

    resumed = run_training(tiny(synth_data, 3), tmp_path, name="run", resume=True, echo=lambda _: None)
    assert resumed["epochs"] == 3 and epochs_logged(run_dir) == [1, 2, 3]  # continued, not restarted

    report = evaluate_checkpoint(run_dir / "best.pt", synth_data, "PrivateTest", tta=True, echo=lambda _: None)
    private = read_manifest(synth_data)["splits"]["PrivateTest"]["rows"]
    assert report["samples"] == private and (run_dir / "eval-PrivateTest-tta.png").stat().st_size > 1000


def _train_worker_pids():
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::RayTrainWorker"):
                        pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_a_killed_worker_resumes_from_the_latest_checkpoint(ray_session, synth_data, tmp_path):
    run_dir = tmp_path / "ft"
    killed = []

    def kill_after_second_epoch():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if len(epochs_logged(run_dir)) >= 2 and _train_worker_pids():
                pid = _train_worker_pids()[-1]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_after_second_epoch, daemon=True)
    watcher.start()
    result = run_training(tiny(synth_data, 6), tmp_path, name="ft", echo=lambda _: None)
    watcher.join(timeout=5)
    assert killed, "the test did not get to kill a worker"
    assert result["epochs"] == 6
    assert epochs_logged(run_dir) == [1, 2, 3, 4, 5, 6]  # each epoch once, none lost or repeated


def test_two_worker_model_b_debug_run_on_upscaled_faces(ray_session, synth_data, tmp_path):
    from pathlib import Path

    from ferray.sr.inference import upscale_local

    upscale_local(synth_data, tmp_path / "sr", "bicubic")
    experiment = Path(__file__).parents[1] / "experiments" / "debug_b.yaml"
    cfg = load_config(experiment, [f"data.path={tmp_path / 'sr'}", "train.epochs=1", "scaling.workers=2",
                                   "scaling.cpus_per_worker=1"])
    result = run_training(cfg, tmp_path, echo=lambda _: None)
    assert result["epochs"] == 1 and result["workers"] == 2 and result["model"] == "resnet18_b"
    import torch

    payload = torch.load(result["best_checkpoint"], weights_only=True)
    assert payload["pretrained"] is False and payload["config"]["augment"]["crop"] == 88
