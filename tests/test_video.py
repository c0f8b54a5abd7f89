"""Videos (ferray.video): sampled frames answered, faces tracked across frames, smoothed, drawn."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from test_faces import detectable_face, face_photo

from ferray.errors import InputError
from ferray.video import CSV_HEADER, Tracker, predict_video_file, video_answers


def write_video(path: Path, face: np.ndarray, frames: int = 12) -> Path:
    """A 320x400 clip of `face` drifting right by 3 pixels a frame (OpenCV's VideoWriter)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (400, 320))
    photo = face_photo(face)
    for i in range(frames):
        moved = np.roll(photo, 3 * i, axis=1)
        writer.write(cv2.cvtColor(moved, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def fixed_classifier(faces: np.ndarray) -> np.ndarray:
    """Probabilities that follow the face's brightness (any deterministic map will do)."""
    p = np.full((len(faces), 7), 0.1)
    p[:, 3] += faces.reshape(len(faces), -1).mean(1) / 255
    return p / p.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, synth_faces):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", detectable_face(synth_faces[0]))


def test_every_sampled_frame_is_answered_and_the_face_keeps_its_track(clip):
    answers = list(video_answers(clip, fixed_classifier, every=2))
    assert [a["frame"] for a in answers] == [0, 2, 4, 6, 8, 10]
    assert answers[1]["time"] == pytest.approx(0.2)
    found = [a for a in answers if a["faces"]]
    assert len(found) >= 4, answers  # the detector finds the face in most frames
    assert {face["track"] for a in found for face in a["faces"][:1]} == {1}  # one face, one track
    xs = [a["faces"][0]["box"][0] for a in found]
    assert xs == sorted(xs)  # the box follows the drifting face
    for face in (f for a in found for f in a["faces"]):
        assert abs(sum(face["smoothed"].values()) - 1) < 1e-4 and face["label"] in face["probs"]


def test_tracks_match_by_overlap_and_end_after_missed_frames():
    tracker = Tracker()
    p = np.eye(7)[[3, 0]].astype(float)
    a, b = tracker.update([(0, 0, 50, 50), (200, 0, 50, 50)], p)
    assert (a.id, b.id) == (1, 2)
    (a2,) = tracker.update([(5, 0, 50, 50)], np.eye(7)[[4]])
    assert a2.id == 1 and a2.probs[3] == pytest.approx(0.5) and a2.probs[4] == pytest.approx(0.5)  # smoothed
    for _ in range(4):  # face 2 missed four sampled frames: its track ends
        tracker.update([(5, 0, 50, 50)], np.eye(7)[[4]])
    (_, back) = tracker.update([(5, 0, 50, 50), (200, 0, 50, 50)], p)
    assert back.id == 3


def test_the_command_writes_json_lines_or_csv_and_an_annotated_copy(clip, tmp_path):
    import cv2

    class Predictor:
        def predict_video(self, path, every=1):
            return video_answers(path, fixed_classifier, every=every)

    out = io.StringIO()
    said = []
    annotated = tmp_path / "annotated.mp4"
    answered = predict_video_file(Predictor(), clip, out, every=3, annotate=annotated, progress=said.append)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert answered == len(lines) == 4 and [line["frame"] for line in lines] == [0, 3, 6, 9]
    assert "frames answered" in said[-1]
    copy = cv2.VideoCapture(str(annotated))
    assert int(copy.get(cv2.CAP_PROP_FRAME_COUNT)) == 12  # every frame of the source, drawn on
    copy.release()
    rows = io.StringIO()
    predict_video_file(Predictor(), clip, rows, every=3, as_csv=True)
    table = rows.getvalue().splitlines()
    assert table[0].split(",") == CSV_HEADER and len(table) >= 2


def test_a_file_that_is_not_a_video_is_named(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(InputError, match="notes.mp4: not a video"):
        list(video_answers(bad, fixed_classifier))
    with pytest.raises(InputError, match="--every 0"):
        list(video_answers(bad, fixed_classifier, every=0))


def test_ferray_predict_answers_a_video_with_the_shipped_model(clip, tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "ferray.cli", "predict", str(clip), "--every", "4", "--members", "fast", "--csv"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = done.stdout.splitlines()
    assert rows[0].split(",") == CSV_HEADER and len(rows) >= 3  # frames 0, 4, 8, a face in most
    assert "frames answered" in done.stderr
    two = subprocess.run(
        [sys.executable, "-m", "ferray.cli", "predict", str(clip), str(clip)], capture_output=True, text=True
    )
    assert two.returncode == 1 and "one video at a time" in two.stderr
