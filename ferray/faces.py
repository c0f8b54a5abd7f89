"""From what a client sends to 48x48 faces: image decoding with limits, face detection, pixel rows.

Ray-free and used unchanged by `ferray predict` and the Serve ingress, so that the command line and
the HTTP API give the same answer for the same bytes. Every rejection is an `InputError` that says
what was wrong and carries the HTTP status a server should answer with (4xx, never 5xx).

Detection uses OpenCV's Haar cascade for frontal faces (shipped inside opencv-python-headless, so it
works offline). Each detected box is widened a little, because FER2013's faces are cropped looser
than Haar's boxes, then resized to 48x48 with area interpolation.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ferray.data.contract import FER_SIZE
from ferray.errors import InputError, LimitExceeded

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~120 MB of RGB; more is a bomb, not a photo
DEFAULT_MAX_REQUEST_PIXELS = 60_000_000  # all the images of one request together
MAX_ASPECT = 20  # a longer side more than this many times the shorter: a strip, not a photo of faces
DEFAULT_MAX_FACES = 64  # faces one request may ask the models for (detected, or pixel rows)
DETECTED_FRACTION = 20  # the detector looks for faces of 1/20 of the image's shorter side and up
BOX_MARGIN = 0.1  # fraction of the Haar box added on each side (FER2013 crops include some hair and chin)


@dataclass(frozen=True)
class Limits:
    """What one request may make the server do; each is refused with a LimitExceeded (413)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, checked on the header, before decoding
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # all images of a request, before decoding any
    max_faces: int = DEFAULT_MAX_FACES  # faces of a request (after detection), or pixel rows

    def check_faces(self, count: int, what: str = "faces in one request") -> None:
        if count > self.max_faces:
            raise LimitExceeded(
                f"{count:,} {what} is over the limit of {self.max_faces:,}",
                "max_faces_per_request",
                count,
                self.max_faces,
            )


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in the original image
    pixels: np.ndarray  # (48, 48) uint8


# ---------------------------------------------------------------------------------------- decoding
def decode_image(data: bytes, name: str = "image", limits: Limits = Limits()) -> np.ndarray:
    """Bytes of a PNG/JPEG/BMP/WebP image (any size, color or gray) -> (H, W) uint8 grayscale."""
    return decode_opened(open_image(data, name, limits), name)


def open_image(data: bytes, name: str = "image", limits: Limits = Limits()):
    """The image's header, read and checked (format, declared size) before any pixel is decoded.
    Only the accepted formats are offered to the decoder, so no other format's parser ever runs."""
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    if not data:
        raise InputError(f"{name}: empty body (0 bytes); send the bytes of a PNG, JPEG, BMP or WebP image")
    if len(data) > limits.max_bytes:
        raise LimitExceeded(
            f"{name}: {len(data):,} bytes is over the limit of {limits.max_bytes:,}",
            "max_body_bytes",
            len(data),
            limits.max_bytes,
        )
    try:
        # reads the header only: the size is known before decoding
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except DecompressionBombError as error:  # PIL's own guard fires on headers past ~179 MP
        declared = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(declared.group(1)) if declared else Image.MAX_IMAGE_PIXELS * 2
        raise LimitExceeded(
            f"{name}: declared size of {pixels:,} pixels is over the limit of {limits.max_pixels:,} pixels "
            "(a decompression bomb is refused before decoding)",
            "max_image_pixels",
            pixels,
            limits.max_pixels,
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{name}: not an image this API reads ({_sniff(data)}); send PNG, JPEG, BMP or WebP", status=415
        ) from None
    except Exception as error:  # PIL raises a zoo of types for broken headers
        raise InputError(f"{name}: unreadable image header ({error})") from None
    if image.format not in ALLOWED_FORMATS:
        raise InputError(f"{name}: {image.format} images are not accepted; send PNG, JPEG, BMP or WebP", status=415)
    width, height = image.size
    if width < 1 or height < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(
            f"{name}: declared size {width}x{height} is not a photo of faces (sides more than {MAX_ASPECT}x apart)",
            status=422,
        )
    if width * height > limits.max_pixels:
        raise LimitExceeded(
            f"{name}: declared size {width}x{height} ({width * height:,} pixels) is over the limit of "
            f"{limits.max_pixels:,} pixels (a decompression bomb is refused before decoding)",
            "max_image_pixels",
            width * height,
            limits.max_pixels,
        )
    return image


def decode_opened(image, name: str = "image") -> np.ndarray:
    """An opened (header-checked) image -> (H, W) uint8 grayscale."""
    try:
        return to_gray(image)
    except Exception as error:  # truncated or corrupt data surfaces only when the pixels are decoded
        raise InputError(f"{name}: corrupt or truncated {image.format} data ({error})") from None


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def sixteen_to_eight(wide: np.ndarray, rows: int = 256) -> np.ndarray:
    """16-bit gray -> 8 bits, rounded (65535 -> 255), in integers and a band of rows at a time: a
    40-megapixel 16-bit image needs no more than its own copy (float64 of it whole took ~320 MB)."""
    out = np.empty(wide.shape, np.uint8)
    for start in range(0, wide.shape[0], rows):
        band = np.clip(wide[start : start + rows], 0, 65535).astype(np.uint32)
        out[start : start + rows] = (band + 128) // 257
    return out


def to_gray(image) -> np.ndarray:
    """A PIL image -> (H, W) uint8 grayscale, upright. Phone photos store their rotation in EXIF
    rather than in the pixels: applied first, or faces lie on their side and go undetected.
    16-bit images are scaled to 8 bits (PIL's convert("L") would clip them to white)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        return sixteen_to_eight(np.asarray(image))
    return np.asarray(image.convert("L"), dtype=np.uint8)


# Every accepted format's first bytes (WebP: "RIFF", 4 bytes of length, "WEBP"): a body that
# starts otherwise is refused once these have arrived, before the rest of it is read.
SIGNATURE_BYTES = 12


def format_of_start(head: bytes) -> str | None:
    """The accepted format whose signature `head` (a body's first SIGNATURE_BYTES) starts with."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_image_start(head: bytes, name: str = "body") -> None:
    """An InputError (415) unless `head` starts like an image this API reads."""
    if len(head) >= SIGNATURE_BYTES and format_of_start(head) is None:
        raise InputError(
            f"{name}: not an image this API reads ({_sniff(head)}); send PNG, JPEG, BMP or WebP", status=415
        )


def declared_pixels(data: bytes) -> int:
    """Width x height from the image's header (nothing decoded); 0 where the header is unreadable
    (decoding then names what is wrong)."""
    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS).size
    except Exception:  # noqa: BLE001 - any unreadable header: the decode stage reports it
        return 0
    return width * height


def _sniff(data: bytes) -> str:
    head = data[:16]
    if head.lstrip().startswith((b"{", b"[")):
        return "it looks like JSON: pixel rows go to /predict/pixels"
    if head.startswith(b"GIF8"):
        return "GIF"
    return f"first bytes {head[:8].hex(' ')}"


# --------------------------------------------------------------------------------------- detection
@lru_cache(maxsize=1)
def _cascade():
    import cv2

    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load its face detector from {path}; reinstall opencv-python-headless")
    return cascade


def detect_boxes(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Frontal-face boxes (x, y, w, h), largest first, of a grayscale image."""
    import cv2

    smallest = max(24, min(gray.shape) // DETECTED_FRACTION)
    found = _cascade().detectMultiScale(
        cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest)
    )
    boxes = [tuple(int(v) for v in box) for box in found]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


def crop_face(gray: np.ndarray, box: tuple[int, int, int, int], margin: float = BOX_MARGIN) -> np.ndarray:
    """The square around `box`, widened by `margin` and clipped to the image, resized to 48x48."""

    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = max(0, math.floor(cx - side / 2)), max(0, math.floor(cy - side / 2))
    x1, y1 = min(gray.shape[1], math.ceil(cx + side / 2)), min(gray.shape[0], math.ceil(cy + side / 2))
    return resize48(gray[y0:y1, x0:x1])


def resize48(gray: np.ndarray) -> np.ndarray:
    import cv2

    if gray.shape == (FER_SIZE, FER_SIZE):
        return np.ascontiguousarray(gray)
    shrinking = gray.shape[0] >= FER_SIZE and gray.shape[1] >= FER_SIZE
    return cv2.resize(gray, (FER_SIZE, FER_SIZE), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


DETECTORS = ("haar", "mtcnn")
# How FER2013 frames its faces against MTCNN's box: the 48x48 square's side in box sides, and its
# centre's offset from the box's in box sides (x right, y down, in the levelled face's frame); the
# medians over 380 of 400 random Training faces, each enlarged 4x and padded for the detector
# (`python -m bench.landmarks --data data/fer2013`). A face found in a photo is cut to this square,
# so the model sees it framed as it saw its training faces. Framing by the box reproduces FER2013's
# framing better than mapping the five landmarks onto their mean places: the landmarks of FER2013's
# faces spread by 3.5-5.3 px (sd) between faces, and the models learned each face as it was framed
# (docs/benchmarks.md, bench/detect.py).
FER_BOX_SIDE = 0.932
FER_BOX_OFFSET = (0.001, -0.008)
FRAME_OVERSAMPLE = 4  # the warp draws 4x the final size, then shrinks by area (no aliasing)


def levelled_face(gray: np.ndarray, box: tuple[int, int, int, int], landmarks: np.ndarray) -> np.ndarray:
    """The face as FER2013 frames its faces, 48x48: the square of FER_BOX_SIDE box sides about the
    box's centre (moved by FER_BOX_OFFSET), turned so that the eyes (from the landmarks) are level."""
    from ferray.mtcnn import eye_angle

    x, y, w, h = box
    side, angle = max(w, h), eye_angle(landmarks)
    turn = math.radians(angle)
    dx, dy = FER_BOX_OFFSET[0] * side, FER_BOX_OFFSET[1] * side  # in the levelled frame, turned into the image's
    cx = x + w / 2 + dx * math.cos(turn) - dy * math.sin(turn)
    cy = y + h / 2 + dx * math.sin(turn) + dy * math.cos(turn)
    return turned_square(gray, cx, cy, FER_BOX_SIDE * side, angle)


def turned_square(gray: np.ndarray, cx: float, cy: float, side: float, angle: float) -> np.ndarray:
    """The square of `side` pixels about (cx, cy), turned by `angle` degrees (cv2's sense), 48x48;
    beyond the image's edge its edge pixels are repeated."""
    import cv2

    big = FRAME_OVERSAMPLE * FER_SIZE
    warp = cv2.getRotationMatrix2D((cx, cy), angle, big / side)
    warp[:, 2] += (big - 1) / 2 - np.array([cx, cy])  # onto the middle of the patch's pixel centres
    patch = cv2.warpAffine(gray, warp, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return resize48(patch)


def detected_faces(gray: np.ndarray, detector: str = "haar") -> list[Face]:
    """Every face `detector` finds in a grayscale image, cropped to 48x48 (mtcnn: levelled by its
    eyes first), largest first; none found is an empty list."""
    if detector == "mtcnn":
        from ferray import mtcnn

        # faces of 40 px and up (or 1/20 of the shorter side): smaller ones make poor 48x48 crops, and
        # each pyramid level below costs more than all above it
        found = mtcnn.detect(gray, min_face=max(40, min(gray.shape) // DETECTED_FRACTION))
        return [Face(d.box, levelled_face(gray, d.box, d.landmarks)) for d in found]
    if detector == "haar":
        return [Face(box, crop_face(gray, box)) for box in detect_boxes(gray)]
    raise InputError(f"detector {detector!r} is not one of {', '.join(DETECTORS)}")


def faces_in_image(gray: np.ndarray, detect: bool = True, name: str = "image", detector: str = "haar") -> list[Face]:
    """A 48x48 image is a face as is; with `detect` a larger one yields every face found by
    `detector` (mtcnn: each levelled by its eyes), else the whole image is resized to one face."""
    height, width = gray.shape
    if (height, width) == (FER_SIZE, FER_SIZE) or not detect:
        return [Face((0, 0, width, height), resize48(gray))]
    faces = detected_faces(gray, detector)
    if not faces:
        raise InputError(
            f"{name}: no face found in the {width}x{height} image; send a closer photo, or "
            "?detect=false to classify the whole image as one face",
            status=422,
        )
    return faces


# -------------------------------------------------------------------------------------- pixel rows
def _rows_by_numpy(rows: list) -> np.ndarray | None:
    """Rows that are all plain in-range ints, checked in one numpy pass (a 10 MB body in
    milliseconds); None where anything is off, for the row-by-row check that names the first bad value."""
    expected = FER_SIZE * FER_SIZE
    if not all(type(row) is list and len(row) == expected for row in rows):
        return None
    if set(map(type, itertools.chain.from_iterable(rows))) != {int}:  # bools, floats, strings: row by row
        return None
    try:
        array = np.asarray(rows, dtype=np.int64)
    except OverflowError:  # an int past 64 bits: out of range, said by the row check
        return None
    if array.size and (array.min() < 0 or array.max() > 255):
        return None
    return array.astype(np.uint8).reshape(len(rows), FER_SIZE, FER_SIZE)


def faces_from_pixels(payload, name: str = "body", limits: Limits = Limits()) -> np.ndarray:
    """JSON {"pixels": row} or {"pixels": [row, ...]}, a row being 2,304 ints 0..255 in FER2013 order
    (row-major 48x48) -> (N, 48, 48) uint8."""
    if not isinstance(payload, dict) or "pixels" not in payload:
        raise InputError(
            f'{name}: expected a JSON object {{"pixels": [2304 ints]}} or {{"pixels": [[...], ...]}}', status=422
        )
    rows = payload["pixels"]
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{name}: 'pixels' must be a non-empty list", status=422)
    if not isinstance(rows[0], list):
        rows = [rows]
    limits.check_faces(len(rows), f"{name}: pixel rows")
    fast = _rows_by_numpy(rows)
    if fast is not None:
        return fast
    faces = np.empty((len(rows), FER_SIZE, FER_SIZE), dtype=np.uint8)
    for index, row in enumerate(rows):
        faces[index] = _pixel_row(row, f"{name}: pixels[{index}]" if len(rows) > 1 else f"{name}: pixels")
    return faces


def _pixel_row(row, where: str) -> np.ndarray:
    expected = FER_SIZE * FER_SIZE
    if not isinstance(row, list):
        raise InputError(f"{where}: expected a list of {expected} ints, got {type(row).__name__}", status=422)
    if len(row) != expected:
        raise InputError(f"{where}: {len(row)} values, expected {expected} (48x48)", status=422)
    for position, value in enumerate(row):
        # bool is an int in Python, and NaN / 3.5 are not pixels: name the first bad value exactly
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise InputError(f"{where}[{position}]: {value!r} is not an integer pixel value", status=422)
        if not 0 <= value <= 255:
            raise InputError(f"{where}[{position}]: {value!r} is out of range 0..255", status=422)
    return np.asarray(row, dtype=np.uint8).reshape(FER_SIZE, FER_SIZE)
