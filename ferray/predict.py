"""Answers for images and pixel rows: one function builds the JSON that `ferray predict` prints and
that the HTTP API returns, so both give the same answer for the same bytes (Ray-free)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ferray.data.contract import EMOTIONS, FER_SIZE
from ferray.errors import LimitExceeded
from ferray.faces import DETECTED_FRACTION, Face, InputError, Limits, decode_opened, faces_in_image, open_image


def labelled(probs: np.ndarray) -> dict[str, float]:
    return {name: float(p) for name, p in zip(EMOTIONS, probs)}


def describe(faces: Sequence[Face], probs: dict[str, np.ndarray], rule: Callable) -> list[dict]:
    """Per face: its box, the fused label and calibrated probabilities (`rule`: the bundle's
    ferray.bundle.fusion.FusionRule over the answering members' `probs`), and each answering
    member's own probabilities."""
    fused = rule(probs)
    return [
        {
            "box": list(face.box),
            "label": EMOTIONS[int(fused[i].argmax())],
            "probs": labelled(fused[i]),
            "members": {name: labelled(p[i]) for name, p in probs.items()},
        }
        for i, face in enumerate(faces)
    ]


def find_faces(
    images: Sequence[tuple[str, bytes]], detect: bool, limits: Limits, detector: str = "haar"
) -> list[tuple[str, tuple, list[Face]]]:
    """(name, (height, width), faces) of each named image; InputError on anything unusable, and a
    LimitExceeded where the request as a whole is over its pixels (known from the headers, before any
    image is decoded) or its faces."""
    opened = [(name, open_image(data, name, limits)) for name, data in images]
    pixels = sum(image.size[0] * image.size[1] for _, image in opened)
    if pixels > limits.max_request_pixels:
        raise LimitExceeded(
            f"{len(opened)} images of {pixels:,} pixels together are over the limit of {limits.max_request_pixels:,}",
            "max_request_pixels",
            pixels,
            limits.max_request_pixels,
        )
    found, count = [], 0
    for name, image in opened:
        width, height = image.size
        scale = draft_for_faces(image) if detect else 1.0
        gray = decode_opened(image, name)
        faces = faces_in_image(gray, detect, name, detector)
        if scale != 1.0:  # boxes in the sent image's pixels, not the draft's
            faces = [Face(tuple(round(v * scale) for v in face.box), face.pixels) for face in faces]
        count += len(faces)
        limits.check_faces(count)
        found.append((name, (height, width) if scale != 1.0 else gray.shape, faces))
    return found


def draft_for_faces(image) -> float:
    """Have a large JPEG decoded at a fraction of its size (JPEG's DCT scaling: 1/2, 1/4 or 1/8,
    gray from the start) where the faces the detector can find stay at least 48 px: it looks for faces
    of 1/20 of the shorter side and up, so the draft keeps that side >= 20 x 48. A 40-megapixel photo
    then decodes to about 1 megapixel. Returns the factor from the draft's pixels to the image's."""
    if image.format != "JPEG":
        return 1.0
    width, height = image.size
    shorter = min(width, height)
    keep = DETECTED_FRACTION * FER_SIZE  # the shorter side the draft keeps at least
    if shorter < 2 * keep:
        return 1.0
    image.draft("L", (math.ceil(width * keep / shorter), math.ceil(height * keep / shorter)))
    return width / image.size[0]


def all_faces(found) -> np.ndarray:
    """Every face of `find_faces`' result, stacked (N, 48, 48) uint8, in order."""
    return np.stack([face.pixels for _, _, faces in found for face in faces]).astype(np.uint8)


def assemble(found, probs: dict[str, np.ndarray], rule: Callable) -> list[dict]:
    """The answer of each image, from the members' probabilities of `all_faces(found)`."""
    answers, start = [], 0
    for name, (height, width), faces in found:
        stop = start + len(faces)
        answers.append(
            {
                "image": name,
                "width": width,
                "height": height,
                "faces": describe(faces, {name: p[start:stop] for name, p in probs.items()}, rule),
            }
        )
        start = stop
    return answers


def answer_images(
    images: Sequence[tuple[str, bytes]],
    predict_members: Callable[[np.ndarray], tuple],
    rule: Callable,
    detect: bool = True,
    limits: Limits = Limits(),
    detector: str = "haar",
) -> list[dict]:
    """The answer for each named image; `predict_members` maps (N, 48, 48) uint8 -> {member: P},
    `rule` those -> the served probabilities."""
    found = find_faces(images, detect, limits, detector)
    return assemble(found, predict_members(all_faces(found)), rule)


def local_predictor(ensemble) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """(N, 48, 48) uint8 -> {member: P} as numpy, with an in-process ensemble."""

    def predict(faces: np.ndarray):
        return {name: p.numpy() for name, p in ensemble.member_probs(torch.from_numpy(faces)).items()}

    return predict


def predict_files(
    bundle: str | Path | None,
    paths: Sequence[str | Path],
    detect: bool = True,
    limits: Limits = Limits(),
    int8: bool = False,
    members: str = "all",
    detector: str = "haar",
) -> list[dict]:
    """`ferray predict`: the HTTP API's answer for image files, without a server (bundle None: the
    default model that ships with ferray; `int8`: the calibrated members in int8, see
    ferray.quantize; `members`: a set of the bundle's, or member names as a comma list; `detector`:
    haar or mtcnn, see ferray.faces.faces_in_image)."""
    from ferray.bundle import load_bundle

    images = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        images.append((str(path), path.read_bytes()))
    ensemble, _ = load_bundle(bundle, members=members, int8=int8)
    return answer_images(images, local_predictor(ensemble), ensemble.rule, detect, limits, detector)


def format_answers(answers: list[dict]) -> str:
    """A short human summary (the JSON has everything)."""
    lines = []
    for answer in answers:
        lines.append(f"{answer['image']} ({answer['width']}x{answer['height']}): {len(answer['faces'])} face(s)")
        for face in answer["faces"]:
            top = sorted(face["probs"].items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"  box {face['box']}: {face['label']}  (" + ", ".join(f"{k} {v:.0%}" for k, v in top) + ")")
    return "\n".join(lines)


def to_json(answers) -> str:
    return json.dumps(answers, indent=2)
