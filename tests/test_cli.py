"""The `ferray` command as users run it (subprocesses, real exit codes)."""

import json
import subprocess
import sys

import pytest
from support import fresh_venv

from ferray.cli import build_parser


def _commands(parser=None) -> list[str]:
    """Every subcommand the parser has (read from it, so a new command is never left out)."""
    import argparse

    parser = parser or build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices) if actions else []


COMMANDS = _commands()


def test_the_command_list_is_complete():
    expected = {
        "demo",
        "prepare",
        "synth",
        "info",
        "train",
        "evaluate",
        "models",
        "sr",
        "distill",
        "tune",
        "ensemble",
        "quantize",
        "predict",
        "serve",
        "explain",
        "crops",
        "report",
    }
    assert set(COMMANDS) == expected
    sr = [a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "sr" in a.choices][0].choices[
        "sr"
    ]
    assert set(_commands(sr)) == {"train", "upscale", "eval"}


def ferray(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ferray.cli", *map(str, args)], capture_output=True, text=True, **kw)


def test_top_level_help_lists_every_command():
    result = ferray("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ferray {command}") and len(out.splitlines()) > 5


def test_prepare_of_missing_path_fails_cleanly(tmp_path):
    result = ferray("prepare", "--source", tmp_path / "nope.csv", "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "ferray prepare: error:" in result.stderr and "nope.csv: no such file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_synth_then_info_and_verify(tmp_path):
    made = ferray("synth", "--out", tmp_path / "d", "--n", 70, "--seed", 3)
    assert made.returncode == 0, made.stderr
    assert "70 faces" in made.stdout and "PublicTest" in made.stdout
    info = ferray("info", tmp_path / "d", "--verify")
    assert info.returncode == 0 and "verify: OK" in info.stdout
    raw = json.loads(ferray("info", tmp_path / "d", "--json").stdout)
    assert raw["rows"] == 70
    # a changed file is caught
    manifest = tmp_path / "d" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["checksum"] = "blake2b64-sum:0000000000000000"
    manifest.write_text(json.dumps(data))
    assert ferray("info", tmp_path / "d", "--verify").returncode == 1


def test_info_on_a_folder_that_is_not_prepared(tmp_path):
    result = ferray("info", tmp_path)
    assert result.returncode == 1 and "run `ferray prepare` first" in result.stderr


@pytest.fixture(scope="module")
def installed_ferray(tmp_path_factory):
    """`pip install .` (not editable) into a fresh venv, as a user installs a wheel; the venv sees
    the packages of the interpreter running the tests (torch, Ray) so that only ferray itself is
    built and installed."""
    from pathlib import Path

    venv = fresh_venv(tmp_path_factory.mktemp("wheel") / "venv")
    repo = Path(__file__).resolve().parents[1]
    built = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(repo)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, installed_ferray):
    # the installed `ferray` script of a non-editable install: recipes, bundle and Serve app come
    # from the package, not from this checkout
    where = subprocess.run(
        [str(installed_ferray / "bin" / "python"), "-c", "import ferray; print(ferray.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(installed_ferray)), where
    out = tmp_path / "demo"  # given relative, as users do: every stage must resolve it (Tune trials chdir)
    result = subprocess.run(
        [str(installed_ferray / "bin" / "ferray"), "demo", "--out", "demo", "--n", "210"],
        capture_output=True,
        text=True,
        timeout=900,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr  # the stages' reports are log lines (stderr), the manifest is printed
    assert "checksum:" in result.stdout and (out / "data" / "manifest.json").exists()
    assert (out / "runs" / "debug_a" / "best.pt").exists()
    assert "on PublicTest with ten-crop TTA: accuracy" in said
    assert (out / "runs" / "debug_a" / "eval-PublicTest-tta.png").exists()
    assert (out / "runs" / "debug_srgan" / "sr-grid-PublicTest.png").exists()
    assert json.loads((out / "data_sr" / "manifest.json").read_text())["image_size"] == [96, 96]
    assert "PSNR" in said
    # Model B's debug run (experiments/debug_b.yaml): 2 Ray Train workers on the SR faces
    model_b = json.loads((out / "runs" / "debug_b" / "result.json").read_text())
    assert model_b["workers"] == 2 and model_b["model"] == "resnet18_b"
    import torch

    payload = torch.load(out / "runs" / "debug_b" / "best.pt", weights_only=True)
    assert payload["pretrained"] is False and payload["config"]["augment"]["crop"] == 88
    assert (out / "runs" / "debug_tune" / "best.yaml").exists() and (
        out / "runs" / "debug_tune" / "search.png"
    ).exists()
    card = json.loads((out / "bundle" / "bundle.json").read_text())
    assert list(card["members"]) == ["a", "tuned", "b"] and card["members"]["b"]["input"] == "sr"
    assert card["sr"] is not None and card["sets"] == {"all": ["a", "tuned", "b"], "fast": ["a"]}
    assert "member tuned" in said and "set    fast" in said
    assert said.count("HTTP 200") == 5  # four PNG faces and one pixel row, answered over HTTP
    # the paper's report (experiments/paper_debug.yaml): the demo's runs reused, the two VGGs trained
    record = json.loads((out / "report" / "report.json").read_text())
    assert {k: r["reused"] for k, r in record["runs"].items()} == {
        "vgg16": False,
        "vgg19": False,
        "model_a": True,
        "model_b": True,
    }
    assert record["srgan"]["reused"] and record["data_sr_reused"] and record["splits"] == ["PublicTest", "PrivateTest"]
    assert record["runs"]["model_a"]["run_dir"] == str((out / "runs" / "debug_a").absolute())
    md = (out / "report" / "report.md").read_text()
    assert "## Table 1" in md and "## Figure 5" in md and (out / "report" / "report.html").stat().st_size > 0
    for figure in (
        "sr-grid-PublicTest.png",
        "fig3-crops.png",
        "fig4-guided-backprop.png",
        "fig5-confusion-PrivateTest.png",
    ):
        assert (out / "report" / "figures" / figure).stat().st_size > 0
    # the last step: the model that ships with ferray (trained on real faces) answers through ferray.load()
    assert "default model: xception_a" in said and "PublicTest accuracy" in said
    # where the time went, one figure per step (progress lines go to stderr)
    per_step = next(line for line in result.stderr.splitlines() if line.startswith("demo: seconds per step: "))
    assert per_step.count(", ") == 14 and per_step.split("step: ", 1)[1].startswith("1. synth ")
    print(per_step)  # shown with -rP: which steps the demo's minutes go to
    assert said.count("synthetic face ") == 4


def test_demo_folder_is_reused_only_if_it_is_a_demo(tmp_path):
    from ferray.data.contract import DataError
    from ferray.distributed.demo import MARKER, claim_folder

    claim_folder(tmp_path / "d")
    (tmp_path / "d" / "old").write_text("x")
    claim_folder(tmp_path / "d")  # an earlier demo: replaced
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [MARKER]
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="not a ferray demo folder"):
        claim_folder(tmp_path / "mine")


def _clean_env():
    import os

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["FERRAY_NUM_CPUS"] = "4"
    return env
