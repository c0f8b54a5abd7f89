"""The fusion fit, the serving bundle, and `ferray predict` (Ray-free)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ferray.bundle import build_bundle, evaluate_bundle, fit_weight, load_bundle, stacking_cv_accuracy
from ferray.bundle.fusion import FusionRule, calibrate, expected_calibration_error, fit_temperature
from ferray.engine import CheckpointError
from ferray.faces import InputError
from ferray.predict import answer_images, local_predictor, predict_files
from ferray.testing import png_bytes


def one_hot(labels, n=7, sharp=0.9):
    probs = np.full((len(labels), n), (1 - sharp) / (n - 1))
    probs[np.arange(len(labels)), labels] = sharp
    return probs


def test_fit_weight_finds_the_member_that_is_right():
    labels = np.arange(70) % 7
    right, wrong = one_hot(labels), one_hot((labels + 1) % 7)
    assert fit_weight(right, wrong, labels) == (1.0, 1.0)  # all on A: ties broken toward lower log-loss
    w, accuracy = fit_weight(wrong, right, labels)
    assert w == 0.0 and accuracy == 1.0
    # each member right on half: A confident, B hesitant -> any weight that lets A win on its half and B on its
    mixed_a = np.where((labels < 4)[:, None], one_hot(labels, sharp=0.9), one_hot((labels + 1) % 7, sharp=0.3))
    mixed_b = np.where((labels < 4)[:, None], one_hot((labels + 1) % 7, sharp=0.3), one_hot(labels, sharp=0.9))
    w, accuracy = fit_weight(mixed_a, mixed_b, labels)
    assert accuracy == 1.0 and 0.2 < w < 0.8
    assert fit_weight(mixed_a, mixed_b, labels, log=True)[1] == 1.0


def test_stacking_is_cross_validated():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    informative = stacking_cv_accuracy(one_hot(labels), one_hot(rng.integers(0, 7, 200)), labels)
    noise = stacking_cv_accuracy(one_hot(rng.integers(0, 7, 200)), one_hot(rng.integers(0, 7, 200)), labels)
    assert informative > 0.95 and noise < 0.4  # 5-fold CV cannot memorize noise labels


def test_the_temperature_fitted_undoes_over_and_under_confidence():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 4000)
    logits = rng.normal(size=(4000, 7))
    logits[np.arange(4000), labels] += 1.5
    true_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    faces_labels = np.array([rng.choice(7, p=p) for p in true_probs])  # labels drawn from those probabilities
    for distortion in (0.5, 2.0):  # P^(1/0.5): over-confident; P^(1/2): under-confident
        distorted = calibrate(true_probs, distortion)
        t = fit_temperature(distorted, faces_labels)
        assert t == pytest.approx(1 / distortion, rel=0.15)
        fixed = calibrate(distorted, t)
        assert np.allclose(fixed.sum(1), 1) and (fixed.argmax(1) == distorted.argmax(1)).all()
        assert expected_calibration_error(fixed, faces_labels) < expected_calibration_error(distorted, faces_labels) / 2
    assert calibrate(true_probs, 1.0) is true_probs
    as_tensor = calibrate(torch.from_numpy(true_probs), 2.0)
    assert torch.allclose(as_tensor, torch.from_numpy(calibrate(true_probs, 2.0)))


def test_the_served_probabilities_are_calibrated_at_the_bundles_temperature(tiny_bundle, synth_faces, tmp_path):
    """The temperature is read from bundle.json: change it there and the answers change with it."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    card = json.loads((copy / "bundle.json").read_text())
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes(synth_faces[0][5]))
    answers = {}
    for temperature in (0.25, 4.0):
        card["fusion"]["temperature"] = temperature
        (copy / "bundle.json").write_text(json.dumps(card))
        ensemble, _ = load_bundle(copy)
        assert ensemble.temperature == temperature and ensemble.rule == FusionRule(
            card["fusion"]["weight_a"], temperature
        )
        (answer,) = predict_files(copy, [path])
        probs = np.array(list(answer["faces"][0]["probs"].values()))
        members = answer["faces"][0]["members"]
        pa, pb = (np.array(list(members[m].values()))[None] for m in ("a", "b"))
        assert np.allclose(probs, ensemble.rule(pa, pb)[0], atol=1e-6) and abs(probs.sum() - 1) < 1e-5
        answers[temperature] = probs
    assert answers[0.25].max() > answers[4.0].max()  # a lower temperature sharpens
    assert answers[0.25].argmax() == answers[4.0].argmax()


def test_bundle_round_trip(tiny_bundle, prepared_synth, tmp_path):
    card = json.loads((tiny_bundle / "bundle.json").read_text())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        ".ferray-output",
        "MODEL_CARD.md",
        "bundle.json",
        "confusion-PrivateTest.png",
        "confusion-PublicTest.png",
        "model_a.pt",
        "model_b.pt",
        "sr.pt",
    ]
    # synthetic data has PrivateTest: the fusion is fitted on PublicTest, PrivateTest is the test
    assert card["selection_split"] == "PublicTest" and card["fusion"]["fitted_on"] == "PublicTest"
    assert {s: e["selection"] for s, e in card["evaluations"].items()} == {"PublicTest": True, "PrivateTest": False}
    assert 0 <= card["fusion"]["weight_a"] <= 1 and card["members"]["b"]["pretrained"] is False
    text = (tiny_bundle / "MODEL_CARD.md").read_text()
    assert "Fusion" in text and "## Calibration" in text and f"T = {card['fusion']['temperature']:.3f}" in text
    for evaluation in card["evaluations"].values():  # the calibration error before and after, per view
        assert all(0 <= v["ece"] <= 1 and 0 <= v["ece_uncalibrated"] <= 1 for v in evaluation["views"].values())
    ensemble, _ = load_bundle(tiny_bundle)
    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    result = ensemble.predict(faces)
    for key in ("probs", "a", "b"):
        assert torch.allclose(result[key].sum(1), torch.ones(5), atol=1e-5)
    # a replica that loads only one member computes the same probabilities
    only_a, _ = load_bundle(tiny_bundle, members=("a",))
    assert only_a.model_b is None and torch.allclose(only_a.probs_a(faces), result["a"])
    # served with the batch norms folded into the convolutions: the answers of the models as trained
    # (compared in fp32: on a CPU with native bf16 both would round to bf16, each in its own way)
    as_trained, _ = load_bundle(tiny_bundle, fold=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ensemble.model_a.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in as_trained.model_a.modules())
    ensemble.bf16 = as_trained.bf16 = False
    assert torch.allclose(as_trained.predict(faces)["probs"], ensemble.predict(faces)["probs"], atol=1e-5)
    report = evaluate_bundle(tiny_bundle, prepared_synth, "PublicTest", out=tmp_path)
    assert report["accuracy"] == pytest.approx(card["accuracy"]["PublicTest"]["ensemble"])
    assert report["members"]["a"] == pytest.approx(card["accuracy"]["PublicTest"]["a"])
    assert (tmp_path / "eval-PublicTest-tta.png").stat().st_size > 0


def test_bundle_refusals(tiny_bundle, prepared_synth, tmp_path):
    members = tiny_bundle.parent / "members"
    with pytest.raises(CheckpointError, match="give its SR checkpoint"):
        build_bundle(members / "a.pt", members / "b.pt", None, prepared_synth, tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a ferray bundle"):
        load_bundle(tmp_path)
    assert not (tmp_path / "x").exists()


def test_predict_matches_the_ensemble(tiny_bundle, synth_faces, tmp_path):
    face = synth_faces[0][3]
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes(face))
    (answer,) = predict_files(tiny_bundle, [path])
    ensemble, _ = load_bundle(tiny_bundle)
    expected = ensemble.predict(torch.from_numpy(face[None]))["probs"][0].numpy()
    got = np.array(list(answer["faces"][0]["probs"].values()))
    assert np.allclose(got, expected, atol=1e-6) and abs(got.sum() - 1) < 1e-5
    assert answer["faces"][0]["box"] == [0, 0, 48, 48]
    with pytest.raises(InputError, match="no such file"):
        predict_files(tiny_bundle, [tmp_path / "missing.png"])
    with pytest.raises(InputError, match="empty body"):
        answer_images([("empty.png", b"")], local_predictor(ensemble), ensemble.rule)


def test_model_a_alone_answers_from_an_ensemble_bundle(tiny_bundle, synth_faces, tmp_path, prepared_synth):
    """members="a" (ferray.load, `ferray predict --members a`): no SR generator, no B, P_A at A's own
    temperature; anything else is refused naming the value."""
    import ferray
    from ferray.cli import main

    card = json.loads((tiny_bundle / "bundle.json").read_text())
    model = ferray.load(tiny_bundle, members="a")
    assert model.ensemble.model_b is None and model.ensemble.generator is None
    assert model.ensemble.rule == FusionRule(1.0, card["fusion"]["temperature_a"])
    face = synth_faces[0][4]
    (found,) = model.predict(face)["faces"]
    assert set(found["members"]) == {"a"}
    pa = model.ensemble.probs_a(torch.from_numpy(face[None])).numpy()
    assert np.allclose(list(found["probs"].values()), calibrate(pa, card["fusion"]["temperature_a"])[0], atol=1e-6)
    path, out = tmp_path / "face.png", tmp_path / "answer.json"
    path.write_bytes(png_bytes(face))
    assert main(["predict", str(path), "--bundle", str(tiny_bundle), "--members", "a", "--json-out", str(out)]) == 0
    (answer,) = json.loads(out.read_text())
    assert answer["faces"][0]["probs"] == pytest.approx(found["probs"], abs=1e-6)
    with pytest.raises(ValueError, match="members 'b': choose all or a"):
        ferray.load(tiny_bundle, members="b")
    report = evaluate_bundle(tiny_bundle, prepared_synth, "PublicTest", members="a")  # `evaluate --members a`
    assert set(report["members"]) == {"a"} and report["accuracy"] == report["members"]["a"]
    assert report["model"] == "Model A" and report["temperature"] == card["fusion"]["temperature_a"]


def test_a_bundle_of_model_a_alone(tiny_bundle, prepared_synth, tmp_path, synth_faces):
    from ferray.report.model_card import render_model_card

    members = tiny_bundle.parent / "members"
    card = build_bundle(members / "a.pt", None, None, prepared_synth, tmp_path / "solo")
    assert card.members.b is None and card.fusion.weight_a == 1.0 and card.alternatives == {}
    views = card.evaluations["PrivateTest"].views
    assert set(views) == {"center", "tta"} and views["tta"].members["a"] == views["tta"].accuracy
    assert "b" not in views["tta"].members
    text = (tmp_path / "solo" / "MODEL_CARD.md").read_text()
    assert text == render_model_card(card) and "PrivateTest | test (untouched)" in text and "**B**" not in text
    # weights ship in half precision
    weights = torch.load(tmp_path / "solo" / "model_a.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    ensemble, _ = load_bundle(tmp_path / "solo")
    assert ensemble.model_b is None
    faces = torch.from_numpy(synth_faces[0][:4])
    # A alone: the served answer is P_A at the bundle's temperature
    assert ensemble.temperature == card.fusion.temperature
    assert torch.equal(ensemble.predict(faces)["probs"], calibrate(ensemble.probs_a(faces), ensemble.temperature))
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes(synth_faces[0][0]))
    (answer,) = predict_files(tmp_path / "solo", [path])
    assert set(answer["faces"][0]["members"]) == {"a"}
    # the bundle's figures equal a fresh evaluation; nothing is written into the bundle
    before = sorted(p.name for p in (tmp_path / "solo").iterdir())
    report = evaluate_bundle(tmp_path / "solo", prepared_synth, "PrivateTest")
    assert report["accuracy"] == pytest.approx(views["tta"].accuracy) and report["selection"] is False
    assert evaluate_bundle(tmp_path / "solo", prepared_synth, "PublicTest")["selection"] is True
    assert sorted(p.name for p in (tmp_path / "solo").iterdir()) == before
    with pytest.raises(CheckpointError, match="give B's checkpoint"):
        build_bundle(members / "a.pt", None, members / "sr.pt", prepared_synth, tmp_path / "y")


def test_python_api_answers_like_ferray_predict(tiny_bundle, synth_faces, tmp_path):
    from PIL import Image

    import ferray

    face = synth_faces[0][5]
    path = tmp_path / "face.png"
    path.write_bytes(png_bytes(face))
    (expected,) = predict_files(tiny_bundle, [path])
    model = ferray.load(tiny_bundle)
    assert model.labels == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    rgb = np.repeat(face[:, :, None], 3, axis=2)
    for image in (path, str(path), path.read_bytes(), Image.fromarray(face), face, rgb):
        answer = model.predict(image)
        assert answer["faces"][0]["label"] == expected["faces"][0]["label"]
        assert answer["faces"][0]["probs"] == pytest.approx(expected["faces"][0]["probs"], abs=1e-6)
    assert len(model.predict_many([face, path])) == 2
    with pytest.raises(InputError, match="dtype float64"):
        model.predict(face.astype(float))
    with pytest.raises(InputError, match="a list"):
        model.predict([1, 2, 3])
    with pytest.raises(InputError, match="no such file"):
        model.predict(tmp_path / "missing.jpg")


def test_bf16_cpu_inference_runs_a_frozen_copy_that_answers_as_autocast(tiny_bundle):
    from ferray.augment import predict_proba
    from ferray.models.frozen import FrozenModule

    ensemble, _ = load_bundle(tiny_bundle, "cpu")
    ensemble.bf16 = True  # forced: where bf16 is only emulated (AVX2 CPUs) this path is slow, but right
    faces = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8)
    got = ensemble.predict(faces)
    for which, model, _cfg in (("a", ensemble.model_a, ensemble.cfg_a), ("b", ensemble.model_b, ensemble.cfg_b)):
        runner, autocast = ensemble.runner(which)
        assert isinstance(runner, FrozenModule) and runner.how == "bfloat16, frozen TorchScript"
        assert autocast is False and ensemble.runner(which)[0] is runner  # made once
        assert next(model.parameters()).dtype == torch.float32  # the member itself is untouched
    eager = predict_proba(ensemble.model_a, faces.clone(), ensemble.cfg_a.augment.crop, True, amp=True)
    assert torch.allclose(got["a"], eager, atol=1e-6)
    ensemble.bf16 = False  # fp32 forwards the member itself
    assert ensemble.runner("a") == (ensemble.model_a, False)
    assert (ensemble.predict(faces)["probs"] - got["probs"]).abs().max() < 0.05  # bf16 rounding, no more


def test_the_sr_generator_runs_a_frozen_copy_whose_faces_are_what_sr_upscale_writes(tiny_bundle, prepared_synth):
    """On the CPU the SR generator forwards a frozen fp32 channels_last copy, in serving and in `sr
    upscale` alike: the eager generator's pixels, off by one level at most and rarely, and the same
    pixels in both for a chunk of faces."""
    from ferray.data.contract import pixels_to_images, read_split
    from ferray.models.frozen import FrozenModule
    from ferray.sr.inference import Upscaler
    from ferray.sr.nets import generated_faces

    ensemble, _ = load_bundle(tiny_bundle, "cpu")
    faces = torch.from_numpy(pixels_to_images(read_split(prepared_synth, "Training").column("pixels"))[:16].copy())
    served = ensemble.upscale(faces)
    (copy,) = [copy for (which, _), (_, copy) in ensemble._frozen.items() if which == "sr"]
    assert isinstance(copy, FrozenModule) and copy.how == "float32, frozen TorchScript"
    with torch.no_grad():
        eager = generated_faces(ensemble.generator, faces)
    off = (served.int() - eager.int()).abs()
    assert off.max() <= 1 and (off > 0).float().mean() < 1e-3
    upscaler = Upscaler("srgan", str(tiny_bundle / "sr.pt"))
    assert np.array_equal(upscaler.upscale(faces.numpy()), served.numpy())  # a chunk of 16: the same forward
    ensemble.freeze = False  # the generator itself, eager
    assert torch.equal(ensemble.upscale(faces), eager)


def test_freezing_that_fails_falls_back_to_the_eager_copy(tiny_bundle, monkeypatch):
    from ferray.models.frozen import freeze_for_cpu

    ensemble, _ = load_bundle(tiny_bundle, "cpu", members=("a",))
    x = torch.randn(3, 1, 44, 44)
    frozen = freeze_for_cpu(ensemble.model_a, 44)

    def no_tracing(*_, **__):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "trace", no_tracing)
    eager = freeze_for_cpu(ensemble.model_a, 44)
    assert "eager (RuntimeError: no TorchScript here)" in eager.how
    assert torch.allclose(eager(x).float(), frozen(x).float(), atol=1e-2)
    with pytest.raises(ValueError, match="eval mode"):
        freeze_for_cpu(ensemble.model_a.train(), 44)


def test_the_bundle_card_is_a_typed_record_and_bad_cards_are_named(tiny_bundle, tmp_path):
    import shutil

    from ferray.bundle import read_bundle_card

    card = read_bundle_card(tiny_bundle)
    assert card.evaluations["PrivateTest"].views["tta"].accuracy == pytest.approx(
        json.loads((tiny_bundle / "bundle.json").read_text())["evaluations"]["PrivateTest"]["views"]["tta"]["accuracy"]
    )
    with pytest.raises(AttributeError):
        card.evaluations["PrivateTest"].views["tta"].acuracy  # noqa: B018  (a typo fails, never a silent None)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    data = json.loads((broken / "bundle.json").read_text())
    data["fusion"]["weight_a"] = "half"
    (broken / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"bundle.json: fusion.weight_a: expected float"):
        read_bundle_card(broken)
    del data["members"]["a"]
    data["fusion"]["weight_a"] = 0.5
    (broken / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"members: missing key\(s\) a"):
        read_bundle_card(broken)
