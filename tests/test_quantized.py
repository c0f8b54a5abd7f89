"""int8 CPU inference: calibration, its storage in a bundle, the bucketed compiled forward."""

import importlib.util
import json
import shutil
import sys

import pytest
import torch

from ferray.errors import CheckpointError, UsageError
from ferray.models import build_model
from ferray.models.quantized import BUCKETS, Int8Unavailable, QuantizedClassifier, calibrate, quantize_for_cpu

CROP = 44
# torchao is the `int8` extra (pip install -e '.[dev,int8]'); without it these tests skip and the
# ones below that never reach torchao still run
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")


def test_without_torchao_int8_says_how_to_install_it(monkeypatch, tiny_bundle):
    monkeypatch.setitem(sys.modules, "torchao", None)  # an import of torchao now fails, as where it is absent
    for name in [m for m in sys.modules if m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(Int8Unavailable, match=r"pip install 'ferray\[int8\]'"):
        calibrate(build_model("xception_a_tiny").eval(), CROP, torch.zeros(2, 1, CROP, CROP))


@pytest.fixture(scope="module")
def tiny():
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed")
    torch.manual_seed(0)
    model = build_model("xception_a_tiny").eval()
    crops = torch.randn(64, 1, CROP, CROP)
    return model, crops, calibrate(model, CROP, crops)


def test_calibration_is_json_and_the_int8_copy_computes_what_the_model_does(tiny):
    model, crops, ranges = tiny
    assert json.loads(json.dumps(ranges)) == ranges  # stored as a bundle file
    assert ranges["calibration_crops"] == 64 and len(ranges["observers"]) > 20
    assert all(o["scale"] > 0 and 0 <= o["zero_point"] <= 255 for o in ranges["observers"])
    int8 = quantize_for_cpu(model, ranges, compile=False)
    with torch.no_grad():
        reference, quantized = model(crops), int8(crops)
    error = (quantized - reference).abs().mean() / reference.abs().mean()
    assert quantized.shape == (64, 7) and error < 0.05, float(error)  # int8 rounding, not a different function
    assert (quantized.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_ranges_that_do_not_fit_the_model_are_refused_by_name(tiny):
    model, _, ranges = tiny
    short = {**ranges, "observers": ranges["observers"][:-1]}
    with pytest.raises(CheckpointError, match="calibrate again with `ferray quantize`"):
        quantize_for_cpu(model, short, where="bundle X's int8 calibration", compile=False)
    with pytest.raises(CheckpointError, match="format"):
        quantize_for_cpu(model, {**ranges, "format": "other"}, compile=False)
    bad = {**ranges, "observers": [{**ranges["observers"][0], "scale": -1.0}, *ranges["observers"][1:]]}
    with pytest.raises(CheckpointError, match=r"malformed .*observers\[0\]: scale -1.0"):
        quantize_for_cpu(model, bad, compile=False)
    with pytest.raises(CheckpointError, match="malformed .*KeyError"):
        quantize_for_cpu(model, {k: v for k, v in ranges.items() if k != "crop"}, compile=False)
    with pytest.raises(ValueError, match="crops"):
        calibrate(model, CROP, torch.zeros(3, 3, CROP, CROP))


class _Shapes(torch.nn.Module):
    """A stand-in graph that records the batch shapes it is given and answers each row's mean."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return x.mean(dim=(1, 2, 3))[:, None].expand(-1, 7)


@pytest.mark.parametrize("n, sizes", [(1, [1]), (3, [10]), (10, [10]), (11, [32]), (32, [32]), (45, [32, 32])])
def test_batches_are_padded_to_a_few_compiled_shapes_without_changing_any_row(n, sizes):
    graph = _Shapes()
    classifier = QuantizedClassifier(graph, CROP, compile=False)
    x = torch.randn(n, 1, CROP, CROP)
    out = classifier(x)
    assert graph.sizes == sizes and set(sizes) <= set(BUCKETS)
    assert torch.allclose(out[:, 0], x.mean(dim=(1, 2, 3)))  # padding rows are cut off, real rows untouched


def test_int8_without_a_calibration_says_how_to_make_one(tiny_bundle):
    from ferray.bundle import load_bundle

    with pytest.raises(
        Int8Unavailable, match=f"member a has no int8 calibration: make one with `ferray quantize {tiny_bundle}"
    ):
        load_bundle(tiny_bundle, "cpu", members=("a",), int8=True)


def test_ranges_made_for_other_crops_are_refused(tiny_bundle, tiny):
    from ferray.bundle import load_bundle

    ensemble, _ = load_bundle(tiny_bundle, "cpu", members=("a",))
    ensemble.int8, ensemble.int8_ranges = True, {"a": {**tiny[2], "crop": 40}}
    with pytest.raises(CheckpointError, match="made for 40x40 crops"):
        ensemble.probs("a", torch.zeros(1, 48, 48, dtype=torch.uint8))


def test_quantize_refuses_the_installed_default_and_bad_face_counts(tiny_bundle, prepared_synth, tmp_path):
    from ferray.quantize import quantize_bundle

    with pytest.raises(UsageError, match="copy it"):
        quantize_bundle("default", prepared_synth)
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    with pytest.raises(UsageError, match="--faces 0"):
        quantize_bundle(copy, prepared_synth, faces=0)
    assert not (copy / "model_a.int8.json").exists()  # nothing written on a refusal


def test_int8_flag_needs_a_bundle(capsys, tmp_path):
    from ferray.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path), "--int8"]) != 0
    assert "--int8 needs --bundle" in capsys.readouterr().err


@pytest.mark.slow  # compiles three batch shapes (~10-15 s each on 2 cores)
def test_compiled_int8_matches_the_eager_int8_graph(tiny):
    model, crops, ranges = tiny
    eager, compiled = quantize_for_cpu(model, ranges, compile=False), quantize_for_cpu(model, ranges)
    for n in (1, 7, 45):  # every bucket, padded and not
        with torch.no_grad():
            assert torch.allclose(compiled(crops[:n]), eager(crops[:n]), atol=0.05, rtol=0.05), n


@needs_torchao
@pytest.mark.slow  # calibrates, compiles and evaluates a tiny bundle: ~1 min
def test_quantize_writes_ranges_and_figures_that_evaluate_reproduces(tiny_bundle, prepared_synth, tmp_path):
    from ferray.bundle import evaluate_bundle, read_bundle_card
    from ferray.quantize import quantize_bundle
    from ferray.report.model_card import render_model_card

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    entry = quantize_bundle(copy, prepared_synth, faces=20)
    card = read_bundle_card(copy)
    assert card.members["a"].int8 == entry and (copy / entry.ranges).is_file() and entry.ranges == "model_a.int8.json"
    assert entry.calibration["split"] == "Training" and entry.calibration["faces"] == 20
    assert set(entry.evaluations) == set(card.evaluations)
    assert (copy / "MODEL_CARD.md").read_text() == render_model_card(card) and "## int8" in render_model_card(card)
    split = next(s for s, e in entry.evaluations.items() if not e.selection)
    report = evaluate_bundle(copy, prepared_synth, split, tmp_path / "eval", tta=True, int8=True)
    assert report["precision"].startswith("int8") and (tmp_path / "eval" / f"eval-{split}-tta-int8.json").is_file()
    assert report["members"]["a"] == pytest.approx(entry.evaluations[split].accuracy["tta"])
    # a Serve replica with model_a.int8 forwards the same int8 model (compiled in its __init__)
    from ferray.bundle import load_bundle
    from ferray.serve_app.app import Member

    replica = Member.func_or_class(str(copy), ["a"], {"int8": True, "threads": torch.get_num_threads()})
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    expected = load_bundle(copy, "cpu", members=("a",), int8=True)[0].probs("a", faces)
    assert torch.allclose(torch.from_numpy(replica._run(faces.numpy())), expected, atol=1e-5)
