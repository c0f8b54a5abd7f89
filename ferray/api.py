"""The Python API: a bundle as a predictor, in two lines (Ray-free).

    import ferray
    model = ferray.load()                      # the model that ships with ferray (or ferray.load("BUNDLE"))
    model.predict("photo.jpg")                 # {"image", "width", "height", "faces": [{"box", "label", "probs", ...}]}
    model.predict(pil_image); model.predict(numpy_array); model.predict(jpeg_bytes)

The answer for a file or its bytes is exactly what `ferray predict` prints and the HTTP API returns:
all three go through ferray.predict. A PIL image or a numpy array skips only the decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ferray.faces import InputError, Limits


class Predictor:
    """A loaded bundle. `predict` takes a path, image bytes, a PIL image or a numpy array (H, W)
    grayscale or (H, W, 3) RGB, uint8."""

    def __init__(
        self,
        bundle: str | Path | None = None,
        device: str | None = None,
        limits: Limits = Limits(),
        int8: bool = False,
        members: str = "all",
        detector: str = "haar",
    ):
        from ferray.bundle import load_bundle, resolve_bundle
        from ferray.faces import DETECTORS

        if detector not in DETECTORS:
            raise InputError(f"detector {detector!r} is not one of {', '.join(DETECTORS)}")
        self.detector = detector
        from ferray.predict import local_predictor

        self.bundle = resolve_bundle(bundle)
        self.ensemble, self.card = load_bundle(self.bundle, device, members=members, int8=int8)
        self.limits = limits
        self._members = local_predictor(self.ensemble)

    @property
    def labels(self) -> list[str]:
        return list(self.card.labels)

    def predict(self, image: Any, detect: bool = True) -> dict:
        """The answer for one image: its size and, per face found, the box, label and probabilities."""
        return self.predict_many([image], detect)[0]

    def predict_many(self, images: Sequence[Any], detect: bool = True) -> list[dict]:
        """The answers for several images, their faces classified in one batch."""
        from ferray.faces import faces_in_image
        from ferray.predict import all_faces, assemble

        found = []
        for index, image in enumerate(images):
            name, gray = self._gray(image, index)
            found.append((name, gray.shape, faces_in_image(gray, detect, name, self.detector)))
        return assemble(found, self._members(all_faces(found)), self.ensemble.rule)

    def predict_video(self, path: str | Path, every: int = 1):
        """Per sampled frame (every `every`-th) of a video file: {frame, time, faces}, each face with
        its track id across frames, its box, label and probabilities, and the track's smoothed ones
        (ferray.video). A generator: frames are read and answered as they are consumed."""
        from ferray.video import video_answers

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return video_answers(path, lambda faces: self.ensemble.rule(self._members(faces)), self.detector, every)

    def _gray(self, image: Any, index: int) -> tuple[str, np.ndarray]:
        from ferray.faces import decode_image, to_gray

        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise InputError(f"{path}: no such file")
            return str(path), decode_image(path.read_bytes(), str(path), self.limits)
        if isinstance(image, (bytes, bytearray)):
            return f"image {index}", decode_image(bytes(image), f"image {index}", self.limits)
        if isinstance(image, np.ndarray):
            return f"array {index}", _array_to_gray(image, f"array {index}")
        if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image, without importing PIL here
            return f"image {index}", to_gray(image)
        raise InputError(
            f"image {index}: a {type(image).__name__}; pass a path, image bytes, a PIL image or a numpy array"
        )

    def __repr__(self) -> str:
        members = "+".join(self.ensemble.names())
        return f"Predictor({self.bundle}, members {members}, labels {self.labels})"


def _array_to_gray(array: np.ndarray, name: str) -> np.ndarray:
    from PIL import Image

    if array.dtype != np.uint8:
        raise InputError(f"{name}: dtype {array.dtype}; pass uint8 pixels 0..255")
    if array.ndim == 2:
        return np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.asarray(Image.fromarray(array[..., :3]).convert("L"), dtype=np.uint8)  # as decode_image does
    raise InputError(f"{name}: shape {array.shape}; pass (H, W) grayscale or (H, W, 3) RGB")


def load(
    bundle: str | Path | None = None,
    device: str | None = None,
    int8: bool = False,
    members: str = "all",
    detector: str = "haar",
) -> Predictor:
    """A predictor for `bundle` (a folder from `ferray ensemble`); None: the model that ships with ferray.
    `int8`: the calibrated members in int8 on the CPU (a bundle calibrated by `ferray quantize`; needs
    torchao). `members`: a set the bundle declares ("all", the default; "fast": fewer members, cheaper
    per face) or member names as a comma list ("a,r18"), fused at that set's own temperature
    (docs/benchmarks.md has each set's cost). `detector`: OpenCV's Haar cascade ("haar"), or the
    learned MTCNN ("mtcnn", `pip install 'ferray[mtcnn]'`), which also levels each face by its eyes."""
    return Predictor(bundle, device, int8=int8, members=members, detector=detector)
