"""The typed config: YAML, overrides, errors that name the key."""

from pathlib import Path

import pytest

from ferray.config import ConfigError, dump_yaml, from_dict, load_config, to_dict

ALL_FILES = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
# the others are Tune search files and report plans (tests/test_tune.py, tests/test_report.py)
EXPERIMENTS = [p for p in ALL_FILES if "search:" not in p.read_text() and "runs:" not in p.read_text()]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    cfg = load_config(path)
    assert cfg.name and from_dict(to_dict(cfg)) == cfg
    assert load_config_from_text(dump_yaml(cfg)) == cfg


def load_config_from_text(text, tmp=Path("/tmp")):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return load_config(f.name)


def test_paper_recipe_is_the_papers():
    cfg = load_config(Path(__file__).parents[1] / "experiments" / "model_a.yaml")
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs) == ("adamax", 0.01, 64, 250)
    assert cfg.augment.crop == 44 and cfg.model.name == "xception_a" and cfg.loss.center_lambda > 0


def test_overrides_types_and_errors(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "train.epochs=7", "optim.step_epochs=[3, 5]", "augment.flip=false"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.optim.step_epochs, cfg.augment.flip) == (3e-4, 7, [3, 5], False)
    for bad, message in [("optim.lr=fast", "optim.lr: expected float"), ("optim.nope=1", "unknown key"),
                         ("train.epochs=2.5", "train.epochs: expected int"), ("optim.lr", "expected key=value"),
                         ("optim.schedule=linear", "choose one of")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  nmae: xception_a\n")
    with pytest.raises(ConfigError, match=r"x\.yaml.*model: unknown key\(s\) nmae"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_config(tmp_path / "missing.yaml")
