"""Expressions through a video: faces found in sampled frames, tracked across frames by the overlap of
their boxes, each track's probabilities smoothed (a face's expression changes slower than one frame's
answer flickers), optionally drawn back onto the video.

    for frame in ferray.load().predict_video("clip.mp4", every=2): ...
    ferray predict clip.mp4 [--every 2] [--csv] [--annotate out.mp4]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferray.data.contract import EMOTIONS
from ferray.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
MATCH_IOU = 0.3  # a face continues a track when its box overlaps the track's last box at least this much
SMOOTHING = 0.5  # weight of the newest frame in a track's moving average of probabilities
LOST_AFTER = 3  # sampled frames a track may miss its face before it ends


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def sampled_frames(path: str | Path, every: int = 1) -> Iterator[tuple[int, float, np.ndarray, float]]:
    """(frame index, time in seconds, grayscale frame, frames per second) of every `every`-th frame."""
    import cv2

    if every < 1:
        raise InputError(f"--every {every}: sample at least every frame (1)")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError(f"{path}: not a video this machine's OpenCV can read (or no such file)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    index = 0
    try:
        while True:
            if index % every:
                if not capture.grab():
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
                yield index, index / fps, cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), fps
            index += 1
    finally:
        capture.release()


def frame_count(path: str | Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        capture.release()


def overlap(a, b) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


@dataclass
class Track:
    id: int
    box: tuple
    probs: np.ndarray  # smoothed
    missed: int = 0


@dataclass
class Tracker:
    """Greedy matching of each frame's boxes to the live tracks by overlap, best pairs first."""

    tracks: list[Track] = field(default_factory=list)
    next_id: int = 1

    def update(self, boxes: list[tuple], probs: np.ndarray) -> list[Track]:
        """The track of each box (in order), its smoothed probabilities updated."""
        pairs = sorted(
            ((overlap(box, track.box), i, j) for i, box in enumerate(boxes) for j, track in enumerate(self.tracks)),
            reverse=True,
        )
        chosen: dict[int, Track] = {}
        taken: set[int] = set()
        for iou, i, j in pairs:
            if iou < MATCH_IOU:
                break
            if i in chosen or j in taken:
                continue
            track = self.tracks[j]
            track.box, track.missed = boxes[i], 0
            track.probs = SMOOTHING * probs[i] + (1 - SMOOTHING) * track.probs
            chosen[i] = track
            taken.add(j)
        for j, track in enumerate(self.tracks):
            if j not in taken:
                track.missed += 1
        for i, box in enumerate(boxes):
            if i not in chosen:
                chosen[i] = Track(self.next_id, box, probs[i].copy())
                self.next_id += 1
                self.tracks.append(chosen[i])
        self.tracks = [t for t in self.tracks if t.missed <= LOST_AFTER]
        return [chosen[i] for i in range(len(boxes))]


def video_answers(
    path: str | Path,
    classify: Callable[[np.ndarray], np.ndarray],
    detector: str = "haar",
    every: int = 1,
) -> Iterator[dict]:
    """Per sampled frame: {frame, time, faces: [{track, box, label, probs, smoothed}]}; `classify`
    maps (N, 48, 48) uint8 faces to their served probabilities (N, 7)."""
    from ferray.faces import detected_faces
    from ferray.predict import labelled

    tracker = Tracker()
    for index, seconds, gray, _ in sampled_frames(path, every):
        faces = detected_faces(gray, detector)
        probs = classify(np.stack([f.pixels for f in faces])) if faces else np.zeros((0, len(EMOTIONS)))
        tracks = tracker.update([f.box for f in faces], probs)
        yield {
            "frame": index,
            "time": round(seconds, 3),
            "faces": [
                {
                    "track": track.id,
                    "box": list(face.box),
                    "label": EMOTIONS[int(p.argmax())],
                    "probs": labelled(p),
                    "smoothed": labelled(track.probs),
                    "smoothed_label": EMOTIONS[int(track.probs.argmax())],
                }
                for face, p, track in zip(faces, probs, tracks)
            ],
        }


def csv_rows(answer: dict) -> list[list]:
    """One CSV row per face of a frame's answer: frame, time, track, box, label, smoothed label, probs."""
    return [
        [answer["frame"], answer["time"], face["track"], *face["box"], face["label"], face["smoothed_label"]]
        + [face["smoothed"][name] for name in EMOTIONS]
        for face in answer["faces"]
    ]


CSV_HEADER = ["frame", "time", "track", "x", "y", "w", "h", "label", "smoothed_label"] + [
    f"p_{name}" for name in EMOTIONS
]


class Annotator:
    """Writes each frame of the source with its faces' boxes, track ids and smoothed labels."""

    def __init__(self, source: str | Path, out: str | Path):
        import cv2

        probe = cv2.VideoCapture(str(source))
        fps = probe.get(cv2.CAP_PROP_FPS) or 25.0
        size = (int(probe.get(cv2.CAP_PROP_FRAME_WIDTH)), int(probe.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        probe.release()
        self.source, self.out = cv2.VideoCapture(str(source)), str(out)
        self.writer = cv2.VideoWriter(self.out, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self.writer.isOpened():
            raise InputError(f"--annotate {out}: OpenCV cannot write a video there")
        self.faces: list[dict] = []
        self.position = 0

    def write_until(self, answer: dict | None) -> None:
        """Copy frames up to (and including) `answer`'s, drawn with the latest faces; None: to the end."""
        import cv2

        last = answer["frame"] if answer is not None else float("inf")
        while self.position <= last:
            ok, frame = self.source.read()
            if not ok:
                return
            if answer is not None and self.position == answer["frame"]:
                self.faces = answer["faces"]
            for face in self.faces:
                x, y, w, h = face["box"]
                cv2.rectangle(frame, (x, y), (x + w, y + h), (42, 102, 226), 2)
                text = f"{face['track']}: {face['smoothed_label']}"
                cv2.putText(frame, text, (x, max(12, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (42, 102, 226), 1)
            self.writer.write(frame)
            self.position += 1

    def close(self) -> None:
        self.write_until(None)
        self.source.release()
        self.writer.release()


def predict_video_file(
    predictor,
    path: str | Path,
    out,
    every: int = 1,
    as_csv: bool = False,
    annotate: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """`ferray predict clip.mp4`: each sampled frame's answer written to `out` as a JSON line (or CSV
    rows), the boxes drawn onto a copy of the video with `annotate`, progress with frames per second.
    Returns the frames answered."""
    import csv
    import json
    import time

    total = frame_count(path)
    writer = csv.writer(out) if as_csv else None
    if writer is not None:
        writer.writerow(CSV_HEADER)
    drawer = Annotator(path, annotate) if annotate else None
    t0 = last_said = time.perf_counter()
    answered = 0
    try:
        for answer in predictor.predict_video(path, every=every):
            if writer is not None:
                writer.writerows(csv_rows(answer))
            else:
                out.write(json.dumps(answer) + "\n")
            if drawer is not None:
                drawer.write_until(answer)
            answered += 1
            now = time.perf_counter()
            if progress is not None and now - last_said > 2.0:
                last_said = now
                share = f" ({100 * answer['frame'] / total:.0f}%)" if total else ""
                progress(f"video: frame {answer['frame']:,}/{total:,}{share}, {answered / (now - t0):.1f} frames/s")
    finally:
        if drawer is not None:
            drawer.close()
    if progress is not None:
        progress(f"video: {answered:,} frames answered in {time.perf_counter() - t0:.1f} s")
    return answered
