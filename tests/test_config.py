"""The typed config: YAML, overrides, errors that name the key."""

from pathlib import Path

import pytest

from ferray.config import ConfigError, dump_yaml, from_dict, load_config, read_yaml, to_dict

ALL_FILES = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
# the others are Tune search files and report plans (tests/test_tune.py, tests/test_report.py), told
# apart by their top-level keys
EXPERIMENTS = [p for p in ALL_FILES if not {"search", "runs"} & set(read_yaml(p, "file"))]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads(path, tmp_path):
    cfg = load_config(path)
    assert cfg.name and from_dict(to_dict(cfg)) == cfg
    (tmp_path / "again.yaml").write_text(dump_yaml(cfg))
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    "what, load",
    [
        ("experiment file", lambda p: load_config(p)),
        ("search file", lambda p: __import__("ferray.distributed.tune", fromlist=["load_search"]).load_search(p)),
        ("report plan", lambda p: __import__("ferray.report.plan", fromlist=["load_plan"]).load_plan(p)),
        ("Serve config", lambda p: __import__("ferray.serve_app.settings", fromlist=["load_config"]).load_config(p)),
    ],
)
def test_every_yaml_kind_is_read_by_one_loader_with_the_same_errors(tmp_path, what, load):
    with pytest.raises(ConfigError, match=f"missing.yaml: no such {what}"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping at the top level"):
        load(tmp_path / "list.yaml")


def test_serve_settings_use_the_same_typed_builder_and_set_syntax():
    from ferray.distributed.serving import app_args

    args, _ = app_args(None, overrides=["model_a.max_batch_size=4", "model_a.max_ongoing_requests=16"])
    assert args["model_a"]["max_batch_size"] == 4
    for bad, message in [
        ("model_a.max_batch_size=four", "args.model_a.max_batch_size: expected int"),
        ("model_a.nope=1", r"args.model_a: unknown key\(s\) nope"),
        ("model_a", "expected key=value"),
        ("members=z", "args.members: members 'z': no member z; the bundle has the sets all, fast"),
        ("members=", r"members is empty; name a set of the bundle \(all, fast, ...\) or members"),
    ]:
        with pytest.raises(ConfigError, match=message):
            app_args(None, overrides=[bad])
    assert app_args(None, overrides=["members=fast"])[0]["members"] == "fast"


def test_the_fused_deployment_counts_calls_and_the_split_members_count_requests():
    """The fused layout's replicas take merged groups (two calls each: one computing, one waiting,
    so that Serve's router cannot pile both groups in flight on one replica), while a split member
    batches requests itself and must admit at least a batch of them."""
    from ferray.distributed.serving import app_args
    from ferray.serve_app.settings import parse_settings

    args, _ = app_args(None)
    shipped = parse_settings(args).ensemble
    assert shipped.max_ongoing_requests == 2 and shipped.max_batch_size > 2
    with pytest.raises(ConfigError, match=r"model_a: max_ongoing_requests \(2\) must be >= max_batch_size"):
        app_args(None, overrides=["model_a.max_ongoing_requests=2"])
    with pytest.raises(ConfigError, match="ensemble: max_ongoing_requests must be >= 1"):
        app_args(None, overrides=["ensemble.max_ongoing_requests=0"])


def test_paper_recipe_is_the_papers():
    cfg = load_config(Path(__file__).parents[1] / "experiments" / "model_a.yaml")
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs) == ("adamax", 0.01, 64, 250)
    assert cfg.augment.crop == 44 and cfg.model.name == "xception_a" and cfg.loss.center_lambda > 0


def test_overrides_types_and_errors(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "train.epochs=7", "optim.step_epochs=[3, 5]", "augment.flip=false"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.optim.step_epochs, cfg.augment.flip) == (3e-4, 7, [3, 5], False)
    assert load_config(None, ["distill.bank=x", "distill.bank="]).distill.bank == ""  # `key=` empties a text
    for bad, message in [
        ("optim.lr=fast", "optim.lr: expected float"),
        ("optim.lr=", "optim.lr: expected float, got ''"),
        ("optim.nope=1", "unknown key"),
        ("train.epochs=2.5", "train.epochs: expected int"),
        ("optim.lr", "expected key=value"),
        ("optim.schedule=linear", "choose one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  nmae: xception_a\n")
    with pytest.raises(ConfigError, match=r"x\.yaml.*model: unknown key\(s\) nmae"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_config(tmp_path / "missing.yaml")


def test_several_workers_on_fractions_of_a_gpu_are_refused():
    # Ray would place two ranks on one GPU, and NCCL aborts the process group.
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker 0.5 with scaling.workers 2: ranks of one run"):
        load_config(None, ["scaling.workers=2", "scaling.gpus_per_worker=0.5"])
    load_config(None, ["scaling.workers=1", "scaling.gpus_per_worker=0.5"])  # one rank on part of a GPU
    load_config(None, ["scaling.workers=2", "scaling.gpus_per_worker=1"])


def test_crop_checked_against_the_faces_as_upscaled():
    """A crop above the stored faces is fine when data.input_scale upscales them first (Model B on
    48x48 faces at 2x takes 88x88 crops); above the upscaled size it is refused, naming both."""
    from ferray.tasks import ClassifierTask

    manifest = {"image_size": [48, 48]}
    upscaled = from_dict({"data": {"path": "d", "input_scale": 2}, "augment": {"crop": 88}})
    ClassifierTask().check_data(manifest, upscaled)
    with pytest.raises(ConfigError, match=r"augment.crop 88 is larger than the 48x48 faces in d"):
        ClassifierTask().check_data(manifest, from_dict({"data": {"path": "d"}, "augment": {"crop": 88}}))
    too_big = from_dict({"data": {"path": "d", "input_scale": 2}, "augment": {"crop": 100}})
    with pytest.raises(ConfigError, match=r"100 is larger than the 96x96 faces \(upscaled 2x\)"):
        ClassifierTask().check_data(manifest, too_big)
