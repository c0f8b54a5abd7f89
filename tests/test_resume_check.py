"""`ferray train --resume` continues the same run or refuses, naming what differs (issue 25)."""

import json

import pytest
from support import ferray_messages

from ferray.config import ConfigError, dump_yaml, load_config
from ferray.distributed.train import check_resume


def _run(tmp_path, *sets):
    cfg = load_config(None, ["model.name=xception_a_tiny", "train.epochs=4", *sets])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "provenance.json").write_text(json.dumps({"commit": "abc", "data_checksum": "sum:1"}))
    return run_dir


def test_a_resume_with_another_config_is_refused_naming_the_fields(tmp_path):
    run_dir = _run(tmp_path)
    other = load_config(None, ["model.name=xception_a_tiny", "train.epochs=4", "optim.lr=0.5", "train.seed=3"])
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 in the run, 0\.5 now; train\.seed: 0 in the run, 3 now"):
        check_resume(run_dir, other, {"checksum": "sum:1"})


def test_a_resume_on_other_faces_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    same = load_config(None, ["model.name=xception_a_tiny", "train.epochs=4"])
    with pytest.raises(ConfigError, match="other faces than the run trained on"):
        check_resume(run_dir, same, {"checksum": "sum:2"})


def test_the_listed_safe_changes_pass_and_are_said(tmp_path):
    run_dir = _run(tmp_path)
    longer = load_config(None, ["model.name=xception_a_tiny", "train.epochs=6", "train.progress_seconds=10"])
    with ferray_messages() as said:
        check_resume(run_dir, longer, {"checksum": "sum:1"})
    assert said == [
        "resume: train.epochs 4 -> 6 (the schedule re-plans to the new length)",
        "resume: train.progress_seconds 60.0 -> 10.0",
    ]
    (run_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="missing or unreadable"):
        check_resume(run_dir, longer, {"checksum": "sum:1"})
