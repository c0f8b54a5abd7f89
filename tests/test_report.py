"""`ferray report`: the plan file, reuse decisions, the document, and a whole report over finished runs.

The whole report built from real training runs is the last step of the demo (test_cli); here the
runs are untrained checkpoints written as finished runs, so every other stage runs in seconds.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from support import ferray_messages

from ferray.config import ConfigError, dump_yaml
from ferray.report.plan import load_plan
from ferray.runs import RunFolder, RunRecord
from ferray.tasks import get_task

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write_plan(folder: Path, **changes) -> Path:
    plan = yaml.safe_load((EXPERIMENTS / "paper_debug.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            plan.pop(key, None)
        else:
            plan[key] = value
    for run in plan["runs"]:
        run["experiment"] = str(EXPERIMENTS / run["experiment"])
    plan["sr"]["experiment"] = str(EXPERIMENTS / plan["sr"]["experiment"])
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def fake_run(runs: Path, cfg, task: str = "classifier") -> Path:
    """A finished run as `ferray train` leaves it (config.yaml as training pins it, best.pt,
    result.json), untrained."""
    import torch

    from ferray.distributed.report import as_recorded
    from ferray.engine import build_state, save_checkpoint
    from ferray.sr.engine import build_sr_state, save_sr_checkpoint

    run_dir = runs / cfg.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(as_recorded(cfg, get_task(task))))
    cpu = torch.device("cpu")
    if task == "sr":
        save_sr_checkpoint(run_dir / "best.pt", build_sr_state(cfg, cpu), {"eval_psnr": 20.0})
        metric, value = "eval_psnr", 20.0
    else:
        save_checkpoint(run_dir / "best.pt", build_state(cfg, cpu), {"eval_acc": 0.2})
        metric, value = "eval_acc", 0.2
    record = RunRecord(
        name=cfg.name,
        task=task,
        model="srgan" if task == "sr" else cfg.model.name,
        run_dir=str(run_dir),
        best_checkpoint=str(run_dir / "best.pt"),
        selection_split="PublicTest",
        metric=metric,
        best_value=value,
        best_epoch=1,
        epochs=1,
        seconds=1.5,
    )
    RunFolder(run_dir).write_record(record)
    return run_dir


# ------------------------------------------------------------------------------------------- plan
def test_the_shipped_plans_load(prepared_synth):
    for name in ("paper.yaml", "paper_debug.yaml"):
        plan = load_plan(EXPERIMENTS / name, data=prepared_synth)
        assert [r.key for r in plan.runs] == ["vgg16", "vgg19", "model_a", "model_b"]
        assert plan.run("model_b").on_sr and plan.ensemble == {"a": "model_a", "b": "model_b"}
    assert load_plan(EXPERIMENTS / "paper.yaml").paper["ensemble"] == {"PublicTest": 71.608, "PrivateTest": 73.244}


def test_the_cpu_plan_applies_each_runs_own_overrides_and_lists_the_rows_it_does_not_run(prepared_synth, tmp_path):
    import yaml

    from ferray.report.document import table1_rows

    assert [r.key for r in load_plan(EXPERIMENTS / "paper_cpu.yaml").runs] == ["model_a", "model_b"]
    raw = yaml.safe_load((EXPERIMENTS / "paper_cpu.yaml").read_text())
    for run in raw["runs"]:
        run["experiment"] = str(EXPERIMENTS / run["experiment"])
    second = {"key": "model_a_v2", "label": "Model A, second generation", "sets": ["train.epochs=20"]}
    raw["runs"].insert(1, second | {"experiment": str(EXPERIMENTS / "model_a_cpu_v2.yaml")})
    raw["sr"]["experiment"] = str(EXPERIMENTS / raw["sr"]["experiment"])
    raw["ensemble"] = {"a": "model_a", "a2": "model_a_v2", "b": "model_b"}  # three members
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(raw))
    plan = load_plan(tmp_path / "plan.yaml", data=prepared_synth)
    assert [r.key for r in plan.runs] == ["model_a", "model_a_v2", "model_b"] and plan.run("model_b").on_sr
    assert plan.run_config(plan.run("model_a"), prepared_synth).name == "model_a_cpu"
    cfg_a = plan.run_config(plan.run("model_a_v2"), prepared_synth)
    assert cfg_a.name == "model_a_cpu_v2" and cfg_a.train.epochs == 20  # the run's own --set, not the recipe's 42
    assert plan.run_config(plan.run("model_b"), prepared_synth).train.epochs == 30
    assert plan.config(plan.sr_experiment, prepared_synth).sr.content == "mse"
    assert [r.key for r in plan.not_run] == ["vgg16", "vgg19"]
    evaluation, keys = {"accuracy": 0.5}, ("model_a", "model_a_v2", "model_b")
    record = {
        "splits": ["Validation", "PublicTest"],
        "models": {k: {"keras_params": 10, "depth": 3, "pretrained": False} for k in keys},
        "evaluations": {
            k: {s: dict.fromkeys(("center", "tta"), evaluation) for s in ("Validation", "PublicTest")} for k in keys
        },
        "ensemble": {s: dict.fromkeys(("center", "tta"), evaluation) for s in ("Validation", "PublicTest")},
        "sets": {
            name: {"members": members, **{s: dict.fromkeys(("center", "tta"), {"accuracy": 0.25}) for s in splits}}
            for name, members in (("all", ["a", "a2", "b"]), ("fast", ["a"]), ("no_sr", ["a", "a2"]))
            for splits in [("Validation", "PublicTest")]
        },
    }
    rows = table1_rows(plan, record)
    vgg16 = next(row for row in rows if row[0].startswith("VGG16"))
    assert "not run here: `ferray train experiments/vgg16.yaml" in vgg16[0] and vgg16[3:7] == ["n/a"] * 4
    assert vgg16[7] == "14,714,688" and len({len(row) for row in rows}) == 1
    # a row per member (each is a run), the full ensemble, and each set of several members
    labels = [row[0] for row in rows]
    assert "Ensemble (model_a + model_a_v2 + model_b)" in labels
    assert not any(label.startswith("Set fast") for label in labels)  # one member: its own row
    no_sr = next(row for row in rows if row[0] == "Set no_sr (model_a + model_a_v2)")
    assert no_sr[1] == "20" and no_sr[3:7] == ["25.00%"] * 4


def test_table1_shows_the_shipped_bundles_members_and_sets_as_its_card_measured_them(tiny_bundle, prepared_synth):
    """`shipped:` adds a row per member of the bundle and per set of several, with the figures
    `ferray ensemble` recorded for every split and view; the `all` set sits beside the paper's
    ensemble. Figures measured on other faces, or a split the bundle never measured, are refused."""
    from ferray.bundle.load import read_bundle_card
    from ferray.data.contract import DataError, read_manifest
    from ferray.report.document import pct, shipped_rows
    from ferray.report.shipped import shipped_record

    card, checksum = read_bundle_card(tiny_bundle), read_manifest(prepared_synth)["checksum"]
    splits = ["PublicTest", "PrivateTest"]
    shipped = shipped_record(str(tiny_bundle), checksum, splits)
    assert list(shipped["members"]) == ["a", "b", "c"] and shipped["sets"]["all"]["members"] == ["a", "b", "c"]
    assert shipped["members"]["a"]["keras_params"] > card.members["a"].parameters  # + batch-norm statistics
    rows = shipped_rows(shipped, splits, {"PublicTest": 71.608, "PrivateTest": 73.244})
    labels = [row[0] for row in rows]
    where = f"shipped `{tiny_bundle}`"
    assert labels == [
        f"{where}: member a (xception_a_tiny; set fast)",
        f"{where}: member b (xception_a_tiny)",
        f"{where}: member c (xception_a_tiny)",
        f"{where}: set all (a + b + c)",
    ]
    views = card.evaluations["PrivateTest"].views
    assert rows[1][5:7] == [pct(views["center"].members["b"]), pct(views["tta"].members["b"])]
    assert rows[3][3:7] == [pct(card.evaluations[s].views[v].accuracy) for s in splits for v in ("center", "tta")]
    assert rows[3][9:] == ["71.608%", "73.244%"] and rows[0][9:] == ["n/a", "n/a"]
    assert len({len(row) for row in rows}) == 1
    with pytest.raises(DataError, match=r"shipped: .* measured on other faces .*blake2b64-sum:0000"):
        shipped_record(str(tiny_bundle), "blake2b64-sum:0000", splits)
    with pytest.raises(DataError, match=r"shipped: .* has no evaluation of Validation"):
        shipped_record(str(tiny_bundle), checksum, ["Validation", "PublicTest"])


def test_the_cpu_plan_shows_the_installed_default(prepared_synth):
    assert load_plan(EXPERIMENTS / "paper_cpu.yaml", data=prepared_synth).shipped == "default"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": 1}, r"unknown key\(s\) colour"),
        ({"runs": []}, r"runs: a list"),
        ({"ensemble": {"a": "model_a", "b": "resnet"}}, r"ensemble.b must name one of the runs"),
        ({"figures": {"crops": 0}}, r"figures.crops: expected a positive integer"),
        ({"paper": {"model_c": {"params": 1}}}, r"paper.model_c"),
        ({"data": None}, r"no data"),
        ({"not_run": [{"label": "VGG16"}]}, r"not_run\[0\]: expected \{key, label, command\}"),
        ({"runs": [{"key": "model_a", "experiment": "debug_a.yaml", "sets": "train.epochs=2"}]}, r"runs\[0\].sets"),
        ({"concurrent_runs": 0}, r"concurrent_runs: a positive integer"),
        ({"concurrent_runs": "2"}, r"concurrent_runs: a positive integer"),
        ({"shipped": "nowhere"}, r"shipped: nowhere: not a ferray bundle \(no bundle.json"),
        ({"shipped": 3}, r"shipped: `default` or a bundle folder, not 3"),
    ],
)
def test_bad_plans_are_refused_naming_the_file_and_field(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_plan(write_plan(tmp_path, **changes))
    assert "plan.yaml" in str(caught.value)


def test_a_missing_experiment_or_bad_override_is_caught_before_any_run(tmp_path):
    path = write_plan(tmp_path)
    text = path.read_text().replace("debug_vgg19.yaml", "nope.yaml")
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"runs\[1\].experiment: .*nope.yaml: no such experiment file"):
        load_plan(path)
    with pytest.raises(ConfigError, match="optim.nme|nme"):
        load_plan(write_plan(tmp_path), sets=["optim.nme=adam"])


# ---------------------------------------------------------------------------- runs side by side
def test_the_gate_admits_runs_only_while_they_fit_beside_each_other():
    from ferray.distributed.report import RunGate

    gate = RunGate({"CPU": 4, "GPU": 1}, most=3)
    one_cpu, two_cpus, one_gpu = {"CPU": 1, "GPU": 0}, {"CPU": 2, "GPU": 0}, {"CPU": 1, "GPU": 1}
    with gate.admit(one_cpu):
        assert gate.fits(one_cpu) and gate.fits(two_cpus) and gate.fits(one_gpu)
        with gate.admit(two_cpus):
            assert not gate.fits(one_cpu)  # 4 CPUs, 3 taken: the last one is left to Ray Data's tasks
    with gate.admit(one_gpu):
        assert not gate.fits(one_gpu) and gate.fits(one_cpu)
    with gate.admit({"CPU": 8, "GPU": 0}):  # too big even alone: admitted alone (ferray train says why)
        assert not gate.fits(one_cpu)
    assert gate.free == {"CPU": 4, "GPU": 1} and gate.running == 0
    narrow = RunGate({"CPU": 16}, most=2)
    with narrow.admit(one_cpu), narrow.admit(one_cpu):
        assert not narrow.fits(one_cpu)  # `concurrent_runs` bounds it however many CPUs are free


def test_independent_runs_train_side_by_side_and_a_failed_one_lets_the_others_finish(
    prepared_synth, tmp_path, monkeypatch
):
    import threading

    import ray

    from ferray.distributed import report

    plan = load_plan(write_plan(tmp_path), data=prepared_synth)
    on_fer = [s for s in plan.runs if not s.on_sr]  # vgg16, vgg19 (1 CPU each), model_a (2 CPUs)
    side_by_side = threading.Barrier(2, timeout=10)  # broken unless the two VGG runs are under way together
    finished = []

    def fake_obtain_run(cfg, runs, reuse, train=True):
        if cfg.name.startswith("debug_vgg"):
            side_by_side.wait()
        if cfg.name == "debug_vgg19":
            raise RuntimeError("vgg19 fell over")
        finished.append(cfg.name)
        return {"name": cfg.name}

    monkeypatch.setattr(report, "obtain_run", fake_obtain_run)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(RuntimeError, match="vgg19 fell over"):
        report.obtain_runs(plan, on_fer, prepared_synth, tmp_path / "runs", [], train=True)
    assert sorted(finished) == ["debug_a", "debug_vgg16"]  # the failure stopped neither of the others
    finished.clear()
    plan.concurrent_runs = 1  # one at a time: the two VGGs never meet
    monkeypatch.setattr(report, "obtain_run", lambda cfg, *a, **k: finished.append(cfg.name) or {"name": cfg.name})
    got = report.obtain_runs(plan, on_fer, prepared_synth, tmp_path / "runs", [], train=True)
    assert list(got) == ["vgg16", "vgg19", "model_a"] and finished == ["debug_vgg16", "debug_vgg19", "debug_a"]


# ------------------------------------------------------------------------------------------ reuse
def test_reuse_needs_the_same_config_and_the_same_faces(tmp_path, prepared_synth):
    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.report import config_differences, obtain_run

    plan = load_plan(write_plan(tmp_path), data=prepared_synth)
    cfg = plan.config(plan.run("model_a").experiment, prepared_synth)
    elsewhere, runs = tmp_path / "elsewhere", tmp_path / "out" / "runs"
    run_dir = fake_run(elsewhere, cfg)
    assert config_differences(run_dir, cfg) == []
    with ferray_messages() as said:
        assert obtain_run(cfg, runs, [elsewhere])["reused"] is True
    assert said == [f"report: reusing the finished run {run_dir}"]
    # a run folder moved since it was written (another disk, another machine) is found where it is now
    import shutil

    moved_dir = shutil.move(str(run_dir), str(tmp_path / "moved" / run_dir.name))
    found = obtain_run(cfg, runs, [tmp_path / "moved"])
    assert found["reused"] and found["best_checkpoint"] == str(Path(moved_dir) / "best.pt")
    shutil.move(moved_dir, str(run_dir))

    changed = plan.config(plan.run("model_a").experiment, prepared_synth)
    changed.optim.lr = 0.5
    assert config_differences(run_dir, changed) == ["optim.lr: 0.003 (plan: 0.5)"]
    other = synthesize(tmp_path / "other", SynthSpec(n=70, seed=9)) and tmp_path / "other"
    moved = plan.config(plan.run("model_a").experiment, other)
    assert config_differences(run_dir, moved) == [f"data: {cfg.data.path} is not the same faces as {other.absolute()}"]

    # --reuse-only: a run nothing matches is refused, naming each folder tried and why, never trained
    with pytest.raises(ConfigError, match=r"--reuse-only: no finished run of debug_a.*optim.lr: 0.003"):
        obtain_run(changed, runs, [elsewhere], train=False)
    with pytest.raises(ConfigError, match="no finished run there"):
        obtain_run(cfg, runs, [tmp_path / "moved"], train=False)
    assert obtain_run(cfg, runs, [elsewhere], train=False)["reused"] is True

    fake_run(runs, changed)  # a finished run of another config inside the report's own folder: refused
    with pytest.raises(ConfigError, match="is a finished run of another config"):
        obtain_run(cfg, runs, [])


def test_a_run_is_reused_by_a_plan_that_names_what_training_resolved(tmp_path, prepared_synth):
    """Training pins sr.content=auto to the kind it chose; the plan still says auto and must match."""
    from ferray.distributed.report import obtain_run
    from ferray.distributed.train import pin_outside_files
    from ferray.tasks import SR

    plan = load_plan(write_plan(tmp_path), data=prepared_synth)
    model_a = fake_run(tmp_path / "elsewhere", plan.config(plan.run("model_a").experiment, prepared_synth))
    sr_cfg = plan.config(plan.sr_experiment, prepared_synth)
    sr_cfg.sr.content, sr_cfg.sr.content_checkpoint = "auto", str(model_a / "best.pt")
    trained = plan.config(plan.sr_experiment, prepared_synth)
    trained.sr.content, trained.sr.content_checkpoint = "auto", str(model_a / "best.pt")
    pin_outside_files(trained, SR)
    assert trained.sr.content == "model_a"  # what a run records
    fake_run(tmp_path / "elsewhere", trained, task="sr")
    assert obtain_run(sr_cfg, tmp_path / "runs", [tmp_path / "elsewhere"], task=SR, train=False)["reused"]
    sr_cfg.sr.content = "mse"  # a plan that asks for another loss does not match it
    with pytest.raises(ConfigError, match="sr.content: 'model_a' \\(plan: 'mse'\\)"):
        obtain_run(sr_cfg, tmp_path / "runs", [tmp_path / "elsewhere"], task=SR, train=False)


@pytest.mark.slow
def test_upscaled_faces_are_found_by_source_or_made_with_ray_data(tmp_path, prepared_synth, ray_session):
    from ferray.distributed.report import upscaled_data
    from ferray.sr.inference import upscale_local

    plan = load_plan(write_plan(tmp_path), data=prepared_synth)
    plan.data = Path(prepared_synth).absolute()
    generator = fake_run(tmp_path / "runs", plan.config(plan.sr_experiment, prepared_synth), task="sr") / "best.pt"
    other = fake_run(tmp_path / "runs2", plan.config(plan.sr_experiment, prepared_synth), task="sr") / "best.pt"
    upscale_local(prepared_synth, tmp_path / "mine", "srgan", str(generator))
    upscale_local(prepared_synth, tmp_path / "theirs", "srgan", str(other))
    assert upscaled_data(plan, str(generator), [tmp_path / "theirs", tmp_path / "mine"], tmp_path / "new") == (
        tmp_path / "mine",
        True,
    )
    folder, reused = upscaled_data(plan, str(generator), [tmp_path / "theirs"], tmp_path / "new")
    assert (folder, reused) == (tmp_path / "new", False)
    made, mine = (json.loads((tmp_path / p / "manifest.json").read_text()) for p in ("new", "mine"))
    assert made["checksum"] == mine["checksum"]  # Ray Data's actors wrote exactly the faces the plain loop did


# --------------------------------------------------------------------------------------- document
def test_markdown_and_html_say_the_same_and_escape():
    from ferray.report.render import Document

    doc = Document("t <1>")
    doc.table(["a|b", "c"], [["x<y", 2]], note="run `ferray x`")
    doc.code("a: <b>", "yaml", "config")
    md, page = doc.markdown(), doc.html()
    assert "| a\\|b | c |" in md and "| x<y | 2 |" in md and "<details><summary>config</summary>" in md
    assert "<td>x&lt;y</td>" in page and "<code>ferray x</code>" in page and "a: &lt;b&gt;" in page
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


# ---------------------------------------------------------------------------------- whole report
@pytest.fixture(scope="module")
def finished_report(tmp_path_factory, prepared_synth, tiny_bundle, ray_session):
    """The debug plan over finished (untrained) runs of every experiment and their upscaled faces,
    with a shipped bundle's rows."""
    from ferray.distributed.report import run_report
    from ferray.sr.inference import upscale_local

    root = tmp_path_factory.mktemp("report")
    plan = load_plan(write_plan(root, shipped=str(tiny_bundle)), data=prepared_synth)
    runs = root / "finished"
    made = {spec.key: fake_run(runs, plan.run_config(spec, prepared_synth)) for spec in plan.runs if not spec.on_sr}
    sr_cfg = plan.config(plan.sr_experiment, prepared_synth)
    # as the report trains it: without VGG19's weights, the content loss uses Model A's features
    sr_cfg.sr.content_checkpoint = str(made[plan.first_member] / "best.pt")
    generator = fake_run(runs, sr_cfg, task="sr") / "best.pt"
    upscale_local(prepared_synth, root / "data_sr", "srgan", str(generator))
    fake_run(runs, plan.config(plan.run("model_b").experiment, root / "data_sr"))
    with ferray_messages() as said:
        record = run_report(plan, root / "out", reuse=[runs], remote_steps=True)
    return root / "out", record, said


@pytest.mark.slow
def test_report_reuses_every_finished_run_and_the_upscaled_faces(finished_report):
    out, record, said = finished_report
    assert all(run["reused"] for run in record["runs"].values()) and record["srgan"]["reused"], said
    assert record["data_sr_reused"] and not (out / "runs").exists()
    assert not any(line.startswith("train:") for line in said)


@pytest.mark.slow
def test_report_has_every_table_and_readable_figures(finished_report):
    from PIL import Image

    out, record, _ = finished_report
    md = (out / "report.md").read_text()
    for heading in (
        "Table 1",
        "Figure 2",
        "Figure 3",
        "Figure 4",
        "Figure 5",
        "Per-class accuracy",
        "Most confused pairs",
        "Runs: time and hardware",
        "Commands",
        "Configs",
    ):
        assert f"## {heading}" in md, heading
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 5  # Figures 2, 3, 4 and 5 on PublicTest and PrivateTest
    for image in images:
        with Image.open(out / image) as png:
            png.load()
            assert png.format == "PNG" and min(png.size) > 100 and np.asarray(png).std() > 0
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 5 and page.count("<table>") == md.count("\n|---")
    assert "ferray explain" in md and "ferray sr eval" in md and "ferray crops" in md


@pytest.mark.slow
def test_table_numbers_are_the_evaluation_files(finished_report):
    from ferray.report.document import pct

    out, record, _ = finished_report
    table = {
        row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]]
        for row in (out / "report.md").read_text().split("## Table 1")[1].split("\n\n")[1].splitlines()[2:]
    }
    labels = {
        "vgg16": "VGG16 (1/8 width)",
        "vgg19": "VGG19 (1/8 width)",
        "model_a": "Model A (1/8 width)",
        "model_b": "Model B (SRGAN + ResNet18)",
    }
    for key, label in labels.items():
        files = out / "evaluations" / key
        expected = [
            pct(json.loads((files / f"eval-{s}{t}.json").read_text())["accuracy"])
            for s in ("PublicTest", "PrivateTest")
            for t in ("", "-tta")
        ]
        assert table[label][2:6] == expected, key
    ensemble = [
        pct(json.loads((out / "evaluations" / "ensemble" / f"eval-{s}{t}.json").read_text())["accuracy"])
        for s in ("PublicTest", "PrivateTest")
        for t in ("", "-tta")
    ]
    assert table["Ensemble (model_a + model_b)"][2:6] == ensemble
    assert table["Model A (1/8 width)"][0] == f"{record['models']['model_a']['keras_params']:,}"
    assert table["Ensemble (model_a + model_b)"][8:] == ["71.608%", "73.244%"]  # the paper's, from the plan
    shipped = record["shipped"]["sets"]["all"]["accuracy"]
    shipped_all = next(cells for label, cells in table.items() if label.endswith(": set all (a + b + c)"))
    assert shipped_all[2:6] == [pct(shipped[s][v]) for s in ("PublicTest", "PrivateTest") for v in ("center", "tta")]
    # synthetic data has PrivateTest: FER2013's protocol selects on PublicTest, and the table says so
    header = (out / "report.md").read_text().split("## Table 1")[1].split("\n\n")[1].splitlines()[0]
    assert (
        "PublicTest (selection)" in header and "PrivateTest TTA" in header and "PrivateTest (selection)" not in header
    )
    assert record["selection_split"] == "PublicTest" and record["headline_split"] == "PrivateTest"


@pytest.mark.slow
def test_ensemble_numbers_match_evaluating_the_bundle(finished_report, prepared_synth):
    from ferray.bundle import evaluate_bundle

    out, record, _ = finished_report
    direct = evaluate_bundle(out / "bundle", prepared_synth, "PrivateTest", out=out / "check")
    assert direct["confusion"] == record["ensemble"]["PrivateTest"]["tta"]["confusion"]
