"""The run folder's one writer and its typed record (issue 25)."""

import json

import pytest
import torch

from ferray import engine
from ferray.config import ConfigError, load_config
from ferray.fit import LocalRun, fit
from ferray.runs import RUN_FILES, RunRecord, read_record, record_from_dict
from ferray.tasks import CLASSIFIER


def _tiny_run(run_dir, synth_faces, facts=None, *sets):
    """Two epochs of the tiny model through fit() and LocalRun; returns the final state."""
    images, labels, _ = synth_faces
    x, y = torch.from_numpy(images[:64]), torch.from_numpy(labels[:64])
    base = ["model.name=xception_a_tiny", "train.epochs=2", "train.batch_size=32", "train.progress_seconds=0"]
    cfg = load_config(None, [*base, "data.selection_split=PublicTest", *sets])
    state = CLASSIFIER.build(cfg, torch.device("cpu"))
    run = LocalRun(run_dir, CLASSIFIER, cfg, facts)
    batches = engine.TensorBatches(x, y, 32)
    fit(CLASSIFIER, state, batches.epoch, lambda s: CLASSIFIER.evaluate(s, batches), 2, on_epoch=run.on_epoch)
    return state


def test_the_ray_free_runner_writes_the_record_ray_trains_writes(tmp_path, synth_faces):
    state = _tiny_run(tmp_path / "run", synth_faces, {"machine": {"cpu": "test"}, "compile": "off"})
    record = read_record(tmp_path / "run")
    assert isinstance(record, RunRecord) and record.metric == "eval_acc" and record.epochs == 2
    assert record.best_value == max(r["eval_acc"] for r in state.history)
    assert record.train_seconds == pytest.approx(sum(r["epoch_seconds"] for r in state.history), abs=0.2)
    assert record.machine == {"cpu": "test"} and record.facts == {"compile": "off"} and record.workers == 1
    assert {p.name for p in (tmp_path / "run").iterdir()} >= set(RUN_FILES) - {"provenance.json"}


def test_result_files_of_older_ferrays_are_read_and_bad_ones_named(tmp_path):
    legacy = {
        "name": "model_a_cpu",
        "task": "classifier",
        "model": "xception_a",
        "run_dir": "/r",
        "best_checkpoint": "/r/best.pt",
        "best_epoch": 20,
        "best_eval_acc": 0.667,
        "eval_split": "Validation",
        "epochs": 20,
        "compile": "on (default)",
    }
    record = record_from_dict(legacy)
    assert (record.metric, record.best_value, record.selection_split) == ("eval_acc", 0.667, "Validation")
    assert record.facts == {"compile": "on (default)"}
    with pytest.raises(ConfigError, match="missing key.*selection_split"):
        record_from_dict({k: v for k, v in legacy.items() if k != "eval_split"}, "r/result.json")
    (tmp_path / "result.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_record(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({**legacy, "epochs": "twenty"}))
    with pytest.raises(ConfigError, match="epochs: expected int"):
        read_record(tmp_path)


def test_a_bundle_carries_its_members_training_curves_drawn_from_the_run(tmp_path, synth_faces, prepared_synth):
    from ferray.bundle import build_bundle, read_bundle_card

    _tiny_run(tmp_path / "run", synth_faces, None, "train.ema_decay=0.9")
    build_bundle({"a": tmp_path / "run" / "best.pt"}, None, prepared_synth, tmp_path / "bundle", tests=False)
    card = read_bundle_card(tmp_path / "bundle")
    assert card.members["a"].curves == "training-a.png" and card.members["a"].weights in ("ema", "raw")
    assert (tmp_path / "bundle" / "training-a.png").stat().st_size > 10_000
    assert "![training curves of a](training-a.png)" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
