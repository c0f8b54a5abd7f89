"""Decoding with limits, face detection and pixel rows: every bad input is an InputError with a 4xx status."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from support import encode

from ferray.faces import InputError, Limits, decode_image, detect_boxes, faces_from_pixels, faces_in_image


def face_photo(face: np.ndarray, size: int = 192) -> np.ndarray:
    """A 320x400 'photo' with the face enlarged in it (as a camera would see it)."""
    import cv2

    photo = np.full((320, 400), 128, np.uint8)
    photo[60 : 60 + size, 100 : 100 + size] = cv2.resize(face, (size, size), interpolation=cv2.INTER_CUBIC)
    return photo


def detectable_face(images: np.ndarray) -> np.ndarray:
    """The first synthetic face that OpenCV's Haar cascade finds in a photo (about half of them)."""
    for face in images:
        if detect_boxes(face_photo(face)):
            return face
    raise AssertionError("no synthetic face was detected at all")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_every_format_decodes_to_gray(fmt, synth_faces):
    face = synth_faces[0][0]
    color = np.stack([face, face // 2, 255 - face], axis=-1)
    for array in (face, color):
        gray = decode_image(encode(array, fmt))
        assert gray.shape == (48, 48) and gray.dtype == np.uint8
    if fmt in ("PNG", "BMP"):  # lossless: the gray face comes back exactly
        assert np.array_equal(decode_image(encode(face, fmt)), face)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares width x height (a decompression bomb's trick)."""
    data = encode(np.zeros((8, 8), np.uint8), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 400, "empty body"),
        (b"hello, this is not an image at all", 415, "not an image"),
        (json.dumps({"pixels": [0] * 2304}).encode(), 415, "looks like JSON"),
        (png_declaring(100_000, 100_000), 413, "decompression bomb"),
        (png_declaring(9_000, 8_000), 413, "over the limit of 40,000,000 pixels"),
    ],
    ids=["empty", "text", "json", "bomb", "too-large"],
)
def test_bad_bytes_are_named(body, status, words):
    with pytest.raises(InputError, match=words) as error:
        decode_image(body, "upload.png")
    assert error.value.status == status and "upload.png" in str(error.value)


def test_truncated_and_unaccepted_images(synth_faces):
    jpeg = encode(synth_faces[0][0], "PNG")
    with pytest.raises(InputError, match="corrupt or truncated") as error:
        decode_image(jpeg[: len(jpeg) // 2])
    assert error.value.status == 400
    gif = encode(synth_faces[0][0], "GIF")
    with pytest.raises(InputError, match="GIF") as error:
        decode_image(gif)
    assert error.value.status == 415
    with pytest.raises(InputError, match="over the limit") as error:
        decode_image(jpeg, limits=Limits(max_bytes=100))
    assert error.value.status == 413


def test_detection_finds_the_face_and_crops_it(synth_faces):
    face = detectable_face(synth_faces[0])
    photo = face_photo(face)
    faces = faces_in_image(photo)
    assert len(faces) >= 1
    x, y, w, h = faces[0].box
    assert 60 <= x + w / 2 - 100 <= 250 and 40 <= y + h / 2 <= 270  # the box sits on the pasted face
    assert faces[0].pixels.shape == (48, 48)
    # without detection the whole photo is one face
    whole = faces_in_image(photo, detect=False)
    assert len(whole) == 1 and whole[0].box == (0, 0, 400, 320)
    # a 48x48 image is a face as it is, never searched
    assert np.array_equal(faces_in_image(face)[0].pixels, face)


def test_a_large_jpeg_is_decoded_at_draft_size_with_boxes_in_its_own_pixels(synth_faces):
    """A 2400x1920 photo decodes at 1/2 (the shorter side stays >= 20 x 48): boxes and sizes are the
    sent image's, and the face is found where a full decode finds it."""
    import cv2

    from ferray.predict import find_faces

    face = detectable_face(synth_faces[0])
    photo = cv2.resize(face_photo(face), (2400, 1920), interpolation=cv2.INTER_CUBIC)
    jpeg = encode(photo, "JPEG")
    png = encode(photo, "PNG")  # decoded whole: the reference
    ((_, size, drafted),) = find_faces([("photo.jpg", jpeg)], True, Limits())
    ((_, _, whole),) = find_faces([("photo.png", png)], True, Limits())
    assert size == (1920, 2400) and drafted and whole
    (x, y, w, h), (x0, y0, w0, h0) = drafted[0].box, whole[0].box
    assert abs(x - x0) <= 0.05 * w0 and abs(y - y0) <= 0.05 * h0 and abs(w - w0) <= 0.1 * w0 and abs(h - h0) <= 0.1 * h0
    assert np.abs(drafted[0].pixels.astype(int) - whole[0].pixels).mean() < 12

    from PIL import Image

    from ferray.predict import draft_for_faces

    image = Image.open(io.BytesIO(jpeg))
    assert draft_for_faces(image) == 2.0 and image.size == (1200, 960) and min(image.size) >= 20 * 48
    assert draft_for_faces(Image.open(io.BytesIO(png))) == 1.0  # only JPEG has draft decoding


def test_a_photo_without_a_face_is_a_422():
    sky = np.tile(np.linspace(40, 220, 400, dtype=np.uint8), (300, 1))
    with pytest.raises(InputError, match="no face found in the 400x300") as error:
        faces_in_image(sky, name="sky.png")
    assert error.value.status == 422 and "detect=false" in str(error.value)


def test_pixel_rows_parse_and_every_mistake_is_located():
    row = list(range(256)) * 9
    assert faces_from_pixels({"pixels": row}).shape == (1, 48, 48)
    both = faces_from_pixels({"pixels": [row, row[::-1]]})
    assert both.shape == (2, 48, 48) and both[0, 0, 5] == 5
    bad = [
        ([1, 2, 3], "pixels: 3 values, expected 2304"),
        (row[:-1] + [256], r"pixels\[2303\]: 256 is out of range"),
        (row[:-1] + [-1], "out of range"),
        (row[:-1] + [float("nan")], "not an integer"),
        (row[:-1] + [float("inf")], "not an integer"),
        (row[:-1] + [3.5], "3.5 is not an integer"),
        (row[:-1] + [True], "True is not an integer"),
        (row[:-1] + ["7"], "'7' is not an integer"),
    ]
    for pixels, words in bad:
        with pytest.raises(InputError, match=words) as error:
            faces_from_pixels({"pixels": pixels})
        assert error.value.status == 422
    with pytest.raises(InputError, match=r"pixels\[1\]: 1 values"):
        faces_from_pixels({"pixels": [row, [0]]})
    for payload in ({"pixel": row}, [row], {"pixels": []}, {"pixels": 5}):
        with pytest.raises(InputError):
            faces_from_pixels(payload)


def test_exif_orientation_is_applied_before_detection():
    """A phone photo stores its rotation in EXIF: decoding must return the upright image."""
    from PIL import Image

    upright = np.zeros((40, 60), np.uint8)
    upright[:, :30] = 200  # left half bright
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # the sensor's pixels, turned
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    gray = decode_image(buffer.getvalue(), "phone.jpg")
    assert gray.shape == (40, 60)
    assert gray[:, :25].mean() > 150 and gray[:, 35:].mean() < 50


def test_sixteen_bit_images_are_scaled_not_clipped():
    from PIL import Image

    wide = np.full((48, 48), 32768, np.uint16)
    wide[:, 24:] = 65535
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    gray = decode_image(buffer.getvalue(), "scan.png")
    assert gray.dtype == np.uint8 and gray[0, 0] == 128 and gray[0, 47] == 255


def test_sixteen_bit_scaling_is_exact_rounding_over_every_value():
    from ferray.faces import sixteen_to_eight

    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(np.round(every / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(sixteen_to_eight(every, rows=7), expected)  # bands that do not divide the rows
    assert sixteen_to_eight(np.array([[-5, 70000]], np.int32)).tolist() == [[0, 255]]  # mode "I" beyond 16 bits


def test_a_header_pillow_itself_refuses_is_a_413_naming_the_limit_and_the_size():
    import struct
    import zlib

    import pytest

    from ferray.errors import LimitExceeded
    from ferray.faces import Limits, open_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)  # 400 megapixels of gray declared
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(LimitExceeded) as refused:
        open_image(bomb, "bomb.png", Limits())
    body = refused.value.body()
    assert (body["limit"], body["value"], body["allowed"]) == ("max_image_pixels", 400_000_000, Limits().max_pixels)
    assert "bomb.png" in body["error"] and refused.value.status == 413


def test_limits_name_themselves_and_pixel_rows_are_checked_by_numpy():
    import json

    import numpy as np
    import pytest
    from support import encode

    from ferray.errors import InputError, LimitExceeded
    from ferray.faces import Limits, faces_from_pixels
    from ferray.predict import find_faces

    limits = Limits(max_faces=3, max_request_pixels=10_000)
    row = list(range(256)) * 9  # 2,304 values
    with pytest.raises(LimitExceeded) as refused:
        faces_from_pixels({"pixels": [row] * 4}, limits=limits)
    assert (
        refused.value.body()
        == {"error": str(refused.value), "limit": "max_faces_per_request", "value": 4, "allowed": 3}
        and refused.value.status == 413
    )
    fast = faces_from_pixels(json.loads(json.dumps({"pixels": [row, row[::-1]]})))
    assert fast.dtype == np.uint8 and fast.shape == (2, 48, 48) and fast[1, -1, -1] == 0
    for bad, words in (
        ([*row[:-1], True], "True is not an integer"),
        ([*row[:-1], 2**70], "out of range"),
        ([*row[:-1], 1.5], "1.5 is not an integer"),
    ):
        with pytest.raises(InputError, match=words):  # the numpy pass declines; the row check names the value
            faces_from_pixels({"pixels": bad})
    big = encode(np.zeros((80, 80), np.uint8), "PNG")  # 6,400 pixels: two are over 10,000
    with pytest.raises(LimitExceeded, match="max_request_pixels") as refused:
        find_faces([("a", big), ("b", big)], detect=False, limits=limits)
    assert refused.value.value == 12_800
    with pytest.raises(LimitExceeded, match="max_faces_per_request"):
        small = encode(np.zeros((48, 48), np.uint8), "PNG")
        find_faces([(str(i), small) for i in range(4)], detect=False, limits=limits)


@pytest.mark.parametrize("angle", [23.0, -30.0, 0.0])
def test_a_found_face_is_cut_levelled_as_fer2013_frames_its_faces(angle):
    """A 48x48 face put into a photo turned, enlarged and shifted, with the box a detector would give
    it (FER2013's square is FER_BOX_SIDE of it) and its eyes: levelled_face gives the 48x48 face back."""
    import cv2

    from ferray.faces import FER_BOX_OFFSET, FER_BOX_SIDE, levelled_face

    rng = np.random.default_rng(3)
    face = cv2.normalize(cv2.GaussianBlur(rng.normal(size=(48, 48)), (0, 0), 2.0), None, 0, 255, cv2.NORM_MINMAX)
    face = face.astype(np.uint8)
    scale, centre = 3.1, np.array([330.0, 250.0])
    place = cv2.getRotationMatrix2D((23.5, 23.5), angle, scale)  # about the middle of its pixel centres
    place[:, 2] += centre - [23.5, 23.5]
    photo = cv2.warpAffine(face, place, (640, 480), flags=cv2.INTER_CUBIC)
    eyes = np.array([[16.0, 18.0, 1.0], [33.0, 18.0, 1.0]]) @ place.T
    landmarks = np.vstack([eyes, np.zeros((3, 2))])  # the nose and mouth corners play no part
    side = 48 * scale / FER_BOX_SIDE
    turn = np.radians(-angle)  # the eyes' line in the photo (cv2 turns counter-clockwise on screen)
    offset = np.array(FER_BOX_OFFSET) * side
    box_centre = centre - [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]] @ offset
    box = (box_centre[0] - side / 2, box_centre[1] - side / 2, side, side)
    back = levelled_face(photo, box, landmarks)
    assert back.shape == (48, 48) and back.dtype == np.uint8
    inner = (slice(3, 45), slice(3, 45))
    assert np.abs(back[inner].astype(float) - face[inner]).mean() < 4.0
    assert np.corrcoef(back[inner].ravel(), face[inner].ravel())[0, 1] > 0.98
