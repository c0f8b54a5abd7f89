"""The fusion fit, the serving bundle, and `ferray predict` (Ray-free)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ferray.bundle import build_bundle, evaluate_bundle, fit_weights, load_bundle, stacking_cv_accuracy
from ferray.bundle.fusion import (
    FusionRule,
    bootstrap_gain,
    calibrate,
    expected_calibration_error,
    fit_fusion,
    fit_temperature,
    fuse,
)
from ferray.engine import CheckpointError
from ferray.faces import InputError
from ferray.predict import answer_images, local_predictor, predict_files
from ferray.testing import png_bytes


def one_hot(labels, n=7, sharp=0.9):
    probs = np.full((len(labels), n), (1 - sharp) / (n - 1))
    probs[np.arange(len(labels)), labels] = sharp
    return probs


def test_fitted_weights_go_to_the_member_that_is_right_and_equal_ones_stay_unless_they_lose():
    labels = np.arange(700) % 7
    right, wrong = one_hot(labels), one_hot((labels + 1) % 7)
    weights = fit_weights({"a": right, "b": wrong}, labels)
    assert weights["a"] > 0.95 and sum(weights.values()) == pytest.approx(1, abs=1e-3)
    assert fit_weights({"a": wrong, "b": right, "c": wrong}, labels)["b"] > 0.95
    # equal weights: the mean, whatever the member count
    probs = {"a": right, "b": wrong, "c": one_hot(labels, sharp=0.5)}
    assert np.allclose(fuse(probs, {}), (right + wrong + probs["c"]) / 3)
    assert fuse({"a": right}, {"a": 0.1}) is right
    # auto: fitted weights that beat equal ones far beyond the bootstrap noise are taken, and said so
    sets = {"all": ["a", "b", "c"], "fast": ["a"]}
    fusion, alternatives, temperatures = fit_fusion({"a": right, "b": wrong, "c": wrong}, labels, "V", sets)
    assert fusion.weights["a"] > 0.95 and fusion.weights_choice.startswith("fitted: +")
    assert set(fusion.set_temperatures) == {"all", "fast"} and set(temperatures) == {"a", "b", "c"}
    assert {"fitted weights", "logit mean", "stacking (logistic regression, 5-fold CV)"} <= set(alternatives)
    # two members right on different faces: fitted weights gain nothing over equal ones, which stay
    mixed_a = np.where((labels < 4)[:, None], one_hot(labels, sharp=0.9), one_hot((labels + 1) % 7, sharp=0.3))
    mixed_b = np.where((labels < 4)[:, None], one_hot((labels + 1) % 7, sharp=0.3), one_hot(labels, sharp=0.9))
    fusion, _, _ = fit_fusion({"a": mixed_a, "b": mixed_b}, labels, "V", {"all": ["a", "b"]})
    assert fusion.weights == {"a": 1.0, "b": 1.0} and fusion.weights_choice.startswith("equal: fitted weights gained")
    equal, _, _ = fit_fusion({"a": right, "b": wrong}, labels, "V", {"all": ["a", "b"]}, weights="equal")
    assert equal.weights == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="choose one of auto, equal, fitted"):
        fit_fusion({"a": right}, labels, "V", {}, weights="best")


def test_the_bootstrap_noise_of_a_gain_shrinks_with_the_faces():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 4000)
    a, b = one_hot(np.where(rng.random(4000) < 0.7, labels, 0)), one_hot(np.where(rng.random(4000) < 0.7, labels, 0))
    gain, noise = bootstrap_gain(a, b, labels)
    small = bootstrap_gain(a[:400], b[:400], labels[:400])[1]
    assert abs(gain) < 3 * noise and small > 2.5 * noise > 0


def test_stacking_is_cross_validated():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    informative = stacking_cv_accuracy({"a": one_hot(labels), "b": one_hot(rng.integers(0, 7, 200))}, labels)
    noise = stacking_cv_accuracy({"a": one_hot(rng.integers(0, 7, 200)), "b": one_hot(rng.integers(0, 7, 200))}, labels)
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
        card["fusion"]["set_temperatures"]["all"] = temperature
        (copy / "bundle.json").write_text(json.dumps(card))
        ensemble, _ = load_bundle(copy)
        assert ensemble.rule == FusionRule(card["fusion"]["weights"], temperature)
        (answer,) = predict_files(copy, [path])
        probs = np.array(list(answer["faces"][0]["probs"].values()))
        members = {name: np.array(list(p.values()))[None] for name, p in answer["faces"][0]["members"].items()}
        assert set(members) == {"a", "b", "c"}
        assert np.allclose(probs, ensemble.rule(members)[0], atol=1e-6) and abs(probs.sum() - 1) < 1e-5
        answers[temperature] = probs
    assert answers[0.25].max() > answers[4.0].max()  # a lower temperature sharpens
    assert answers[0.25].argmax() == answers[4.0].argmax()


def test_a_three_member_bundle_round_trip(tiny_bundle, prepared_synth, tmp_path):
    card = json.loads((tiny_bundle / "bundle.json").read_text())
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        ".ferray-output",
        "MODEL_CARD.md",
        "bundle.json",
        "confusion-PrivateTest.png",
        "confusion-PublicTest.png",
        "model_a.pt",
        "model_b.pt",
        "model_c.pt",
        "sr.pt",
    ]
    assert card["format"] == "ferray.bundle/2" and list(card["members"]) == ["a", "b", "c"]
    assert {name: m["input"] for name, m in card["members"].items()} == {"a": "face", "b": "sr", "c": "face"}
    assert all(m["cost_ms"] > 0 for m in card["members"].values())  # timed where the bundle was built
    assert card["sets"] == {"all": ["a", "b", "c"], "fast": ["a"]}
    # synthetic data has PrivateTest: the fusion is fitted on PublicTest, PrivateTest is the test
    assert card["selection_split"] == "PublicTest" and card["fusion"]["fitted_on"] == "PublicTest"
    assert {s: e["selection"] for s, e in card["evaluations"].items()} == {"PublicTest": True, "PrivateTest": False}
    assert set(card["fusion"]["weights"]) == {"a", "b", "c"} and card["members"]["b"]["pretrained"] is False
    text = (tiny_bundle / "MODEL_CARD.md").read_text()
    assert "Fusion" in text and "## Calibration" in text and f"T = {card['fusion']['temperature']:.3f}" in text
    assert "**c**" in text and "`all` = a + b + c" in text and "ms a face where the bundle was built" in text
    for evaluation in card["evaluations"].values():  # the calibration error before and after, per view
        assert all(0 <= v["ece"] <= 1 and 0 <= v["ece_uncalibrated"] <= 1 for v in evaluation["views"].values())
        assert set(evaluation["views"]["tta"]["sets"]) == {"all", "fast"}
    ensemble, _ = load_bundle(tiny_bundle)
    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    result = ensemble.predict(faces)
    assert set(result["members"]) == {"a", "b", "c"}
    for probs in (result["probs"], *result["members"].values()):
        assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    # the fused answer is the fusion of the members' answers
    weights, temperature = card["fusion"]["weights"], card["fusion"]["set_temperatures"]["all"]
    total = sum(weights.values())
    by_hand = sum(weights[n] / total * result["members"][n] for n in weights)
    assert torch.allclose(result["probs"], calibrate(by_hand, temperature), atol=1e-6)
    # a replica that loads some members computes the same probabilities; a set answers with its own
    only_a, _ = load_bundle(tiny_bundle, members=("a",))
    assert only_a.names() == ("a",) and only_a.generator is None
    assert torch.allclose(only_a.probs("a", faces), result["members"]["a"])
    face_members, _ = load_bundle(tiny_bundle, members="a,c")
    assert face_members.names() == ("a", "c") and face_members.generator is None
    answer = face_members.predict(faces)
    assert set(answer["members"]) == {"a", "c"} and torch.allclose(answer["members"]["c"], result["members"]["c"])
    # served with the batch norms folded into the convolutions: the answers of the models as trained
    # (compared in fp32: on a CPU with native bf16 both would round to bf16, each in its own way)
    as_trained, _ = load_bundle(tiny_bundle, fold=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ensemble.members["a"].model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in as_trained.members["a"].model.modules())
    ensemble.bf16 = as_trained.bf16 = False
    assert torch.allclose(as_trained.predict(faces)["probs"], ensemble.predict(faces)["probs"], atol=1e-5)
    report = evaluate_bundle(tiny_bundle, prepared_synth, "PublicTest", out=tmp_path)
    assert report["accuracy"] == pytest.approx(card["accuracy"]["PublicTest"]["ensemble"])
    assert report["members"]["c"] == pytest.approx(card["accuracy"]["PublicTest"]["c"])
    assert report["sets"]["fast"] == pytest.approx(card["accuracy"]["PublicTest"]["set fast"])
    assert (tmp_path / "eval-PublicTest-tta.png").stat().st_size > 0


def test_a_long_forward_says_how_far_it_is_chunk_by_chunk(tiny_bundle, synth_faces):
    """`ferray ensemble` and `ferray evaluate --bundle` take minutes on a split: the members' forward
    tells its progress after each chunk of faces, with the rate and the time left, and the answers
    are the same as without it."""
    from ferray.logs import FaceProgress

    ensemble, _ = load_bundle(tiny_bundle, device="cpu")
    faces = torch.from_numpy(synth_faces[0][:10])
    lines = []
    progress = FaceProgress("ensemble: PublicTest", 10, every_s=0.0)
    progress.update = lambda n, said=progress.update: lines.append(said(n))
    probs = ensemble.member_probs(faces, batch=4, progress=progress)
    assert [line.split(" faces (")[0] for line in lines] == [
        "ensemble: PublicTest: 4/10",
        "ensemble: PublicTest: 8/10",
        "ensemble: PublicTest: 10/10",
    ]
    assert lines[-1].startswith("ensemble: PublicTest: 10/10 faces (100%), ") and lines[-1].endswith("left")
    plain = ensemble.member_probs(faces, batch=4)
    assert all(torch.equal(probs[name], plain[name]) for name in plain)


def test_building_again_with_a_cache_forwards_only_the_members_it_has_not_answered(
    tiny_bundle, prepared_synth, tmp_path, monkeypatch
):
    """`ferray ensemble --cache DIR`: a second build reads every member's answers back (the same
    card), a member with other weights is forwarded anew; entries differ by views and by faces."""
    from ferray.bundle.load import load_bundle as load
    from ferray.bundle.probs_cache import ProbsCache
    from ferray.bundle.runtime import Ensemble

    members = {name: tiny_bundle.parent / "members" / f"{name}.pt" for name in ("a", "c")}
    forwarded, forward = [], Ensemble.member_probs

    def counted(self, faces, batch=256, progress=None, names=None):
        forwarded.append(tuple(names or self.members))
        return forward(self, faces, batch, progress, names)

    monkeypatch.setattr(Ensemble, "member_probs", counted)
    cache = tmp_path / "cache"
    first = build_bundle(members, None, prepared_synth, tmp_path / "one", cache=cache)
    assert forwarded == [("a", "c")] * 4  # the selection split (TTA, center), then PrivateTest's two views
    again = build_bundle(members, None, prepared_synth, tmp_path / "two", cache=cache)
    assert forwarded == [("a", "c")] * 4 and again.evaluations == first.evaluations
    assert again.fusion == first.fusion
    forwarded.clear()
    other = {"a": members["a"], "c": tiny_bundle.parent / "members" / "b.pt"}  # c: other weights (B's, on SR faces)
    build_bundle(other, tiny_bundle.parent / "members" / "sr.pt", prepared_synth, tmp_path / "three", cache=cache)
    assert forwarded and all(names == ("c",) for names in forwarded)
    forwarded.clear()
    build_bundle(members, None, prepared_synth, tmp_path / "four", cache=cache, tta=False)
    assert forwarded == []  # both views of both splits were answered by the first build
    ensemble, keys = load(tmp_path / "one")[0], ProbsCache(cache)
    with_tta = keys.key(ensemble, "a", "sum:1", "PublicTest")
    assert with_tta != keys.key(ensemble, "a", "sum:1", "PrivateTest") != keys.key(ensemble, "a", "sum:2", "PublicTest")
    ensemble.tta = False
    assert keys.key(ensemble, "a", "sum:1", "PublicTest") != with_tta


def test_the_cheapest_views_that_keep_the_fused_accuracy_are_chosen():
    """--center-only auto: a member whose center crop does as well inside the ensemble is served by it
    (a tenth of its cost); one whose ten crops the fused answers need keeps them."""
    from ferray.bundle.views import choose_center_only, parse_center_only
    from ferray.config import ConfigError

    labels = np.array([0, 1, 2, 0])
    right, wrong = np.eye(3)[labels] * 0.8 + 0.1, np.eye(3)[(labels + 1) % 3] * 0.97 + 0.01
    tta = {"a": right, "b": right}
    ms = ({"a": 10.0, "b": 30.0}, {"a": 1.0, "b": 3.0})
    chosen, record = choose_center_only(tta, {"a": right, "b": right}, labels, *ms, "Validation")
    assert chosen == ["a", "b"] and record["cost_ms"] == 4.0 and record["cost_ms_every_member_tta"] == 40.0
    assert record["accuracy"] == record["accuracy_every_member_tta"] == 1.0 and "Validation" in record["how"]
    # b's center crop is confidently wrong (it would outvote a), a's as good: a alone is served so
    chosen, record = choose_center_only(tta, {"a": right, "b": wrong}, labels, *ms, "Validation")
    assert chosen == ["a"] and record["cost_ms"] == 31.0
    # a member that answers alone in a named set (fast) keeps its ten crops: the others may still go
    chosen, _ = choose_center_only(tta, {"a": right, "b": right}, labels, *ms, "Validation", frozenset({"a"}))
    assert chosen == ["b"]
    assert parse_center_only("auto", ["a", "b"]) == "auto" and parse_center_only("b, a", ["a", "b"]) == ["b", "a"]
    with pytest.raises(ConfigError, match=r"--center-only 'r18': none, auto, or members of the bundle \(a, b\)"):
        parse_center_only("r18", ["a", "b"])


def test_a_member_served_by_its_center_crop_answers_so_everywhere(tiny_bundle, prepared_synth, synth_faces, tmp_path):
    """--center-only c: the card records it, the bundle loads with it, and c's served answers (and
    the card's TTA columns) are its center crop's while the others keep ten crops."""
    from ferray.config import ConfigError

    members = {name: tiny_bundle.parent / "members" / f"{name}.pt" for name in ("a", "c")}
    card = build_bundle(members, None, prepared_synth, tmp_path / "b", center_only="c")
    assert card.center_only == ["c"] and card.center_only_choice["how"] == "named (--center-only)"
    views = card.evaluations["PrivateTest"].views
    assert views["tta"].members["c"] == views["center"].members["c"]
    assert "Served by the center crop alone: c" in (tmp_path / "b" / "MODEL_CARD.md").read_text()
    ensemble, _ = load_bundle(tmp_path / "b")
    assert ensemble.center_only == {"c"} and ensemble.member_tta("a") and not ensemble.member_tta("c")
    faces = torch.from_numpy(synth_faces[0][:6])
    served = ensemble.probs("c", faces)
    ensemble.tta = False
    assert torch.allclose(served, ensemble.probs("c", faces))
    auto = build_bundle(members, None, prepared_synth, tmp_path / "auto", center_only="auto")
    assert set(auto.center_only) <= {"c"}  # a is the fast set alone: it keeps its ten crops
    assert auto.center_only_choice["accuracy"] >= auto.center_only_choice["accuracy_every_member_tta"]
    with pytest.raises(ConfigError, match="--center-only 'b'"):
        build_bundle(members, None, prepared_synth, tmp_path / "bad", center_only="b")


def test_bundle_refusals(tiny_bundle, prepared_synth, tmp_path):
    from ferray.config import ConfigError

    members = tiny_bundle.parent / "members"
    with pytest.raises(CheckpointError, match="member b .* give it as an SR member"):
        build_bundle({"a": members / "a.pt", "b": members / "b.pt"}, None, prepared_synth, tmp_path / "x")
    with pytest.raises(CheckpointError, match="an SR generator, but no member reads SR faces"):
        build_bundle({"a": members / "a.pt"}, members / "sr.pt", prepared_synth, tmp_path / "x")
    with pytest.raises(ConfigError, match="set 'quick': z"):
        build_bundle({"a": members / "a.pt"}, None, prepared_synth, tmp_path / "x", sets={"quick": ["z"]})
    with pytest.raises(ConfigError, match="member name"):
        build_bundle({"a b": members / "a.pt"}, None, prepared_synth, tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a ferray bundle"):
        load_bundle(tmp_path)
    with pytest.raises(ConfigError, match="no member z; the bundle has the sets all, fast and the members a, b, c"):
        load_bundle(tiny_bundle, members="a,z")
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


def test_a_set_answers_with_its_members_at_its_own_temperature(tiny_bundle, synth_faces, tmp_path, prepared_synth):
    """members="fast" (ferray.load, `ferray predict --members fast`): Model A alone, no SR generator, no
    B, at the set's own temperature; member names answer too, a single one at its own temperature."""
    import ferray
    from ferray.cli import main

    card = json.loads((tiny_bundle / "bundle.json").read_text())
    model = ferray.load(tiny_bundle, members="fast")
    assert model.ensemble.names() == ("a",) and model.ensemble.generator is None
    assert model.ensemble.rule == FusionRule({"a": 1.0}, card["members"]["a"]["temperature"])
    face = synth_faces[0][4]
    (found,) = model.predict(face)["faces"]
    assert set(found["members"]) == {"a"}
    pa = model.ensemble.probs("a", torch.from_numpy(face[None])).numpy()
    assert np.allclose(list(found["probs"].values()), calibrate(pa, card["members"]["a"]["temperature"])[0], atol=1e-6)
    path, out = tmp_path / "face.png", tmp_path / "answer.json"
    path.write_bytes(png_bytes(face))
    assert main(["predict", str(path), "--bundle", str(tiny_bundle), "--members", "a", "--json-out", str(out)]) == 0
    (answer,) = json.loads(out.read_text())
    assert answer["faces"][0]["probs"] == pytest.approx(found["probs"], abs=1e-6)
    two = ferray.load(tiny_bundle, members="c,b")  # the bundle's order, whatever the list's
    assert two.ensemble.names() == ("b", "c") and two.ensemble.rule.temperature == card["fusion"]["temperature"]
    with pytest.raises(ValueError, match="members 'z': no member z"):
        ferray.load(tiny_bundle, members="z")
    report = evaluate_bundle(tiny_bundle, prepared_synth, "PublicTest", members="fast")  # `evaluate --members fast`
    assert report["model"] == "member a" and report["accuracy"] == report["members"]["a"]
    assert set(report["members"]) == {"a", "b", "c"} and set(report["sets"]) == {"all", "fast"}
    assert report["temperature"] == card["members"]["a"]["temperature"]


def test_a_bundle_in_the_first_format_loads_and_answers_as_it_did(tmp_path, synth_faces):
    """The shipped default (ferray.bundle/1: A + SR -> B, one weight for A): the same answers as
    w * P_A + (1 - w) * P_B at its temperature, and Model A alone at A's own."""
    from ferray.bundle import default_bundle_path, read_bundle_card

    raw = json.loads((default_bundle_path() / "bundle.json").read_text())
    if raw["format"] != "ferray.bundle/1":
        pytest.skip("the default bundle is no longer in the first format")
    card = read_bundle_card("default")
    assert card.upgraded_from == "ferray.bundle/1" and card.sets == {"all": ["a", "b"], "fast": ["a"]}
    assert card.members["b"].input == "sr" and card.sr is not None
    ensemble, _ = load_bundle("default", "cpu")
    faces = torch.from_numpy(synth_faces[0][:3])
    result = ensemble.predict(faces)
    w, temperature = raw["fusion"]["weight_a"], raw["fusion"]["temperature"]
    by_hand = calibrate(w * result["members"]["a"] + (1 - w) * result["members"]["b"], temperature)
    assert torch.allclose(result["probs"], by_hand, atol=1e-6)
    alone, _ = load_bundle("default", "cpu", members="a")
    assert alone.rule.temperature == raw["fusion"]["temperature_a"]


def test_a_bundle_of_model_a_alone(tiny_bundle, prepared_synth, tmp_path, synth_faces):
    from ferray.report.model_card import render_model_card

    members = tiny_bundle.parent / "members"
    card = build_bundle({"a": members / "a.pt"}, None, prepared_synth, tmp_path / "solo")
    assert card.names() == ("a",) and card.sets == {"all": ["a"]} and card.alternatives == {}
    views = card.evaluations["PrivateTest"].views
    assert set(views) == {"center", "tta"} and views["tta"].members["a"] == views["tta"].accuracy
    text = (tmp_path / "solo" / "MODEL_CARD.md").read_text()
    assert text == render_model_card(card) and "PrivateTest | test (untouched)" in text and "**b**" not in text
    # weights ship in half precision
    weights = torch.load(tmp_path / "solo" / "model_a.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    ensemble, _ = load_bundle(tmp_path / "solo")
    assert ensemble.names() == ("a",)
    faces = torch.from_numpy(synth_faces[0][:4])
    # A alone: the served answer is P_A at the member's own temperature
    assert ensemble.rule.temperature == card.members["a"].temperature
    expected = calibrate(ensemble.probs("a", faces), ensemble.rule.temperature)
    assert torch.equal(ensemble.predict(faces)["probs"], expected)
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
    for which, member in ensemble.members.items():
        runner, autocast = ensemble.runner(which)
        assert isinstance(runner, FrozenModule) and runner.how == "bfloat16, frozen TorchScript"
        assert autocast is False and ensemble.runner(which)[0] is runner  # made once
        assert next(member.model.parameters()).dtype == torch.float32  # the member itself is untouched
    a = ensemble.members["a"]
    eager = predict_proba(a.model, faces.clone(), a.cfg.augment.crop, True, amp=True)
    assert torch.allclose(got["members"]["a"], eager, atol=1e-6)
    ensemble.bf16 = False  # fp32 forwards the member itself
    assert ensemble.runner("a") == (a.model, False)
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
    model = ensemble.members["a"].model
    x = torch.randn(3, 1, 44, 44)
    frozen = freeze_for_cpu(model, 44)

    def no_tracing(*_, **__):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "trace", no_tracing)
    eager = freeze_for_cpu(model, 44)
    assert "eager (RuntimeError: no TorchScript here)" in eager.how
    assert torch.allclose(eager(x).float(), frozen(x).float(), atol=1e-2)
    with pytest.raises(ValueError, match="eval mode"):
        freeze_for_cpu(model.train(), 44)


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
    data["fusion"]["temperature"] = "warm"
    (broken / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"bundle.json: fusion.temperature: expected float"):
        read_bundle_card(broken)
    data["fusion"]["temperature"] = 1.0
    del data["members"]["a"]["crop"]
    (broken / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"members.a: missing key\(s\) crop"):
        read_bundle_card(broken)


def _answers(labels: np.ndarray, right: np.ndarray, confidence: float, wrong_share: float) -> np.ndarray:
    """Probabilities that put `confidence` on the label where `right`, else `wrong_share` on the next class."""
    rows = np.arange(len(labels))
    probs = np.full((len(labels), 7), 0.0)
    probs[rows, labels] = np.where(right, confidence, 0.05)
    probs[rows, (labels + 1) % 7] = np.where(right, 0.02, wrong_share)
    rest = 1 - probs.sum(1, keepdims=True)
    empty = probs == 0
    return probs + empty * rest / empty.sum(1, keepdims=True)


def test_greedy_selection_keeps_the_members_that_help_and_says_how(tiny_bundle, prepared_synth, tmp_path):
    from ferray.bundle.fusion import greedy_selection, selected_members
    from ferray.data.contract import load_split

    _, labels, _ = load_split(prepared_synth, "PublicTest")
    first = np.arange(len(labels)) < int(0.7 * len(labels))
    # a is right on the first 70% (confidently enough), c on the rest; together they are right everywhere;
    # b, behind the SR generator, answers noise: greedy keeps a and c, and the bundle drops b and the SR
    probs = {
        "a": _answers(labels, first, 0.6, 0.4),
        "b": np.random.default_rng(0).dirichlet(np.ones(7), len(labels)),
        "c": _answers(labels, ~first, 0.9, 0.3),
    }
    path = greedy_selection(probs, labels)
    assert [step["members"] for step in path][:2] == [["a"], ["a", "c"]]
    assert path[0]["accuracy"] == pytest.approx(first.mean()) and path[1]["accuracy"] == 1.0
    assert selected_members(path) == ["a", "c"]
    members = tiny_bundle.parent / "members"
    candidates = {name: members / f"{name}.pt" for name in ("a", "b", "c")}
    out = tmp_path / "chosen"
    card = build_bundle(candidates, members / "sr.pt", prepared_synth, out, probs=probs, select="greedy", tests=False)
    assert list(card.members) == ["a", "c"] and card.sr is None and card.sets == {"all": ["a", "c"], "fast": ["a"]}
    assert card.selection["candidates"] == ["a", "b", "c"] and card.selection["kept"] == ["a", "c"]
    assert card.accuracy["PublicTest"]["ensemble"] == 1.0
    files = {p.name for p in out.iterdir()}
    assert {"model_a.pt", "model_c.pt", "selection-PublicTest.png"} <= files and not {"model_b.pt", "sr.pt"} & files
    text = (out / "MODEL_CARD.md").read_text()
    assert "## Members chosen" in text and "left out b" in text and "| a + c | 100.00% |" in text
    assert load_bundle(out)[0].names() == ("a", "c")
    # a set that asks for a member the selection left out (a distilled `fast` one) keeps it for that
    # set alone: the ensemble is still the chosen a + c, fused and calibrated without it
    out = tmp_path / "with_fast"
    card = build_bundle(
        candidates,
        members / "sr.pt",
        prepared_synth,
        out,
        probs=probs,
        select="greedy",
        tests=False,
        sets={"fast": ["b"]},
    )
    assert list(card.members) == ["a", "b", "c"] and card.sr is not None  # b reads the SR faces
    assert card.sets == {"all": ["a", "c"], "fast": ["b"]} and card.selection["kept"] == ["a", "c"]
    assert card.accuracy["PublicTest"]["ensemble"] == 1.0 and set(card.fusion.weights) == {"a", "c"}
    assert card.accuracy["PublicTest"]["set fast"] == card.accuracy["PublicTest"]["b"]
    assert load_bundle(out)[0].names() == ("a", "c") and load_bundle(out, members="fast")[0].names() == ("b",)
    with pytest.raises(Exception, match=r"set 'slow': z \(the members are a, b, c\)"):
        build_bundle(
            candidates,
            members / "sr.pt",
            prepared_synth,
            tmp_path / "x",
            probs=probs,
            select="greedy",
            tests=False,
            sets={"slow": ["z"]},
        )
