"""Decode and validate FER2013 records, a work unit at a time (Ray-free).

A work unit is a small dict that names a slice of a source: a byte range of a CSV, or a list of
image files in a folder or a zip. `decode_unit` turns one into a contract table plus a report of
what it rejected or changed. Ray Data runs units in parallel (ferray.distributed.prepare); the GPU bench
runs the same function in a plain loop.

CSV chunks take a vectorized fast path; any chunk it cannot prove clean is re-read row by row by
the reference parser, which is the one that names the bad row, so both agree on every input.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa

from ferray.data.contract import EMOTIONS, FER_SIZE, NUM_CLASSES, USAGES, faces_table

NUM_PIXELS = FER_SIZE * FER_SIZE
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm")

# Folder names seen in the FER2013 repackagings users download, mapped to the label order.
EMOTION_ALIASES = {
    **{name: i for i, name in enumerate(EMOTIONS)},
    "anger": 0,
    "disgusted": 1,
    "fearful": 2,
    "happiness": 3,
    "sadness": 4,
    "surprised": 5,
}
# Split from the folder when the file name carries no Usage prefix.
SPLIT_FOLDERS = {
    "train": "Training",
    "training": "Training",
    "test": "PublicTest",
    "publictest": "PublicTest",
    "privatetest": "PrivateTest",
}

BAD_KINDS = (
    "malformed_row",
    "bad_label",
    "unknown_usage",
    "wrong_pixel_count",
    "non_integer_pixel",
    "pixel_out_of_range",
    "unreadable_image",
    "bad_image_size",
    "unknown_emotion",
    "unknown_split",
)


class BadRecord(Exception):
    """One record that cannot be used; `where` names the file and row or path."""

    def __init__(self, kind: str, where: str, detail: str):
        assert kind in BAD_KINDS, kind
        self.kind, self.where, self.detail = kind, where, detail
        super().__init__(f"{where}: {detail} [{kind}]")

    def __reduce__(self):  # keep the fields across Ray's process boundary
        return BadRecord, (self.kind, self.where, self.detail)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "where": self.where, "detail": self.detail}


@dataclass
class UnitReport:
    """What a unit did besides producing rows."""

    rejected: list[dict] = field(default_factory=list)
    resized: int = 0


class Rows:
    """Accumulates the good rows of one unit, in parts of (ids, labels, splits, images)."""

    def __init__(self) -> None:
        self.parts: list[tuple] = []

    def add(self, ids, labels, splits, images: np.ndarray) -> None:
        self.parts.append(
            (list(ids), np.asarray(labels, np.int64), list(splits), images.reshape(-1, FER_SIZE, FER_SIZE))
        )

    def table(self) -> pa.Table:
        """The contract table with a `split` column (write_parquet partitions on it)."""
        if not self.parts:
            return faces_table([], np.zeros(0, np.int64), np.zeros((0, FER_SIZE, FER_SIZE), np.uint8), splits=[])
        ids, labels, splits, images = zip(*self.parts)
        return faces_table(sum(ids, []), np.concatenate(labels), np.concatenate(images), splits=sum(splits, []))


def decode_unit(unit: dict, on_bad: str = "error", resize: bool = False) -> tuple[pa.Table, UnitReport]:
    """Decode one unit into a contract table with a `split` column, and a report.

    on_bad="error" raises the first BadRecord; "skip" records it in the report and goes on.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', not {on_bad!r}")
    rows, report = Rows(), UnitReport()
    if unit["kind"] == "csv":
        _decode_csv_chunk(unit, rows, report, on_bad)
    elif unit["kind"] == "images":
        _decode_images(unit, rows, report, on_bad, resize)
    else:
        raise ValueError(f"unknown unit kind {unit['kind']!r}")
    return rows.table(), report


def _reject(report: UnitReport, on_bad: str, bad: BadRecord) -> None:
    if on_bad == "error":
        raise bad
    report.rejected.append(bad.as_dict())


# -------------------------------------------------------------------------------------------- CSV
def read_chunk(unit: dict) -> bytes:
    with open(unit["path"], "rb") as f:
        f.seek(unit["start"])
        return f.read(unit["end"] - unit["start"])


def _decode_csv_chunk(unit: dict, rows: Rows, report: UnitReport, on_bad: str) -> None:
    data = read_chunk(unit)
    fast = _fast_csv_chunk(data, unit)
    if fast is not None:
        rows.add(*fast)
        return
    for i, fields in enumerate(csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))):
        if not fields:
            continue  # a blank line is no record
        row = unit["first_row"] + i
        try:
            label, split, pixels = parse_csv_row(fields, unit["columns"], row, unit["display"])
        except BadRecord as bad:
            _reject(report, on_bad, bad)
            continue
        rows.add([f"{unit['display']}:{row}"], [label], [split], pixels)


def csv_where(display: str, row: int) -> str:
    return f"{display} row {row} (line {row + 1})"


def parse_csv_row(fields: list[str], columns: list[str], row: int, display: str):
    """The reference parser of one CSV record -> (label, split, (2304,) uint8 pixels)."""
    where = csv_where(display, row)
    if len(fields) != len(columns):
        raise BadRecord(
            "malformed_row", where, f"has {len(fields)} fields, expected {len(columns)} ({', '.join(columns)})"
        )
    rec = dict(zip(columns, fields))
    label_text = rec["emotion"].strip()
    if not (label_text.isdigit() and int(label_text) < NUM_CLASSES):
        raise BadRecord("bad_label", where, f"emotion {label_text!r} is not a label 0..{NUM_CLASSES - 1}")
    usage = rec["usage"].strip()
    if usage not in USAGES:
        raise BadRecord("unknown_usage", where, f"Usage {usage!r} is not one of {', '.join(USAGES)}")
    tokens = rec["pixels"].split()
    for k, tok in enumerate(tokens):
        if not tok.isdigit():
            raise BadRecord("non_integer_pixel", where, f"pixel {k} is {tok!r}, not an integer")
        if int(tok) > 255:
            raise BadRecord("pixel_out_of_range", where, f"pixel {k} is {tok}, outside 0..255")
    if len(tokens) != NUM_PIXELS:
        raise BadRecord("wrong_pixel_count", where, f"has {len(tokens)} pixels, expected {NUM_PIXELS} (48x48)")
    return int(label_text), usage, np.array(tokens, dtype=np.uint8)


def _fast_csv_chunk(data: bytes, unit: dict):
    """Vectorized parse of a clean chunk -> (ids, labels, splits, images), or None if anything in
    it needs the reference parser (quotes around the label, blank lines, stray spaces, bad values).

    Works on the raw bytes: one line per record, exactly two commas per line, so each field's
    bounds come from the comma and newline positions without a CSV reader.
    """
    raw = np.frombuffer(data, np.uint8)
    if raw[-1] != 10:
        raw = np.append(raw, np.uint8(10))
    line_end = np.flatnonzero(raw == 10)
    n_rows = len(line_end)
    line_start = np.concatenate(([0], line_end[:-1] + 1))
    commas = np.flatnonzero(raw == 44)
    if len(commas) != 2 * n_rows:
        return None
    commas = commas.reshape(n_rows, 2)
    # Sorted commas, two per line on average: all inside their own line <=> exactly two per line.
    if not ((commas[:, 0] > line_start) & (commas[:, 1] < line_end)).all():
        return None
    text_end = line_end - (raw[line_end - 1] == 13)  # CRLF files
    starts = dict(zip(unit["columns"], (line_start, commas[:, 0] + 1, commas[:, 1] + 1)))
    ends = dict(zip(unit["columns"], (commas[:, 0], commas[:, 1], text_end)))

    if not (ends["emotion"] - starts["emotion"] == 1).all():
        return None
    labels = raw[starts["emotion"]].astype(np.int64) - 48
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        return None
    split_index = _match_names(raw, starts["usage"], ends["usage"], USAGES)
    if split_index is None:
        return None
    px_start, px_end = starts["pixels"], ends["pixels"]
    if (raw[px_start] == 34).any():  # "quoted" pixel strings
        if not ((raw[px_start] == 34) & (raw[px_end - 1] == 34)).all():
            return None
        px_start, px_end = px_start + 1, px_end - 1
    # Outside the pixel fields every line holds exactly one digit (its label) and no space.
    images = parse_pixels(raw, px_start, px_end, NUM_PIXELS, digits_outside=n_rows)
    if images is None:
        return None
    first = unit["first_row"]
    ids = [f"{unit['display']}:{row}" for row in range(first, first + n_rows)]
    return ids, labels, np.asarray(USAGES)[split_index].tolist(), images


def _match_names(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray, names) -> np.ndarray | None:
    """Index into `names` of each field raw[starts:ends], or None if any field is not one of them."""
    index = np.full(len(starts), -1)
    for k, name in enumerate(names):
        code = np.frombuffer(name.encode(), np.uint8)
        rows = np.flatnonzero(ends - starts == len(code))
        if len(rows):
            hit = (raw[starts[rows, None] + np.arange(len(code))] == code).all(axis=1)
            index[rows[hit]] = k
    return None if (index < 0).any() else index


@functools.cache
def pixel_parser() -> str:
    """ "c" when the optional C extension is built (and FERRAY_PIXEL_PARSER is not "numpy"), else "numpy"."""
    if os.environ.get("FERRAY_PIXEL_PARSER", "").lower() == "numpy":
        return "numpy"
    try:
        from ferray.data import _pixels  # noqa: F401
    except ImportError:
        return "numpy"
    return "c"


def parse_pixels(
    raw: np.ndarray, field_start: np.ndarray, field_end: np.ndarray, n_pixels: int, digits_outside: int = 0
) -> np.ndarray | None:
    """Pixel fields -> (rows, n_pixels) uint8, or None unless all are clean; C when built, else numpy."""
    if pixel_parser() == "numpy":
        return parse_pixel_fields(raw, field_start, field_end, n_pixels, digits_outside)
    from ferray.data import _pixels

    out = np.empty((len(field_start), n_pixels), np.uint8)
    ok = _pixels.parse_fields(
        raw, np.ascontiguousarray(field_start, np.int64), np.ascontiguousarray(field_end, np.int64), n_pixels, out
    )
    return out if ok else None


@functools.cache
def _digits_table() -> np.ndarray:
    """Value of a token of 1-3 digits from its length and the low nibbles of its first 3 bytes.

    Index: d0 | d1 << 4 | d2 << 8 | length << 12 (a 16-bit key; the table is 128 KiB).
    """
    key = np.arange(4 << 12)
    d0, d1, d2, length = key & 15, (key >> 4) & 15, (key >> 8) & 15, key >> 12
    value = np.select([length == 1, length == 2, length == 3], [d0, 10 * d0 + d1, 100 * d0 + 10 * d1 + d2])
    return value.astype(np.uint16)


def parse_pixel_fields(
    raw: np.ndarray, field_start: np.ndarray, field_end: np.ndarray, n_pixels: int, digits_outside: int = 0
) -> np.ndarray | None:
    """Space-separated pixel fields raw[field_start[r]:field_end[r]] -> (rows, n_pixels) uint8.

    Returns None unless every field is clean: digits and single spaces only, n_pixels values of
    1-3 digits, each <= 255. The caller vouches that outside the fields `raw` holds no space and
    exactly `digits_outside` digits. This is the hot loop of `ferray prepare` on a CSV: whole
    chunks at a time, no Python per value, about 25 ns a value on one core.
    """
    n_rows, size = len(field_start), len(raw)
    field_bytes = int((field_end - field_start).sum())
    spaces = raw == 32
    n_spaces = np.count_nonzero(spaces)
    if n_spaces != n_rows * (n_pixels - 1):
        return None
    if np.count_nonzero((raw - np.uint8(48)) < 10) != field_bytes - n_spaces + digits_outside:
        return None  # something other than digits and spaces inside a field
    # Token starts: each field start and every byte after a space.
    start_mask = np.zeros(size, bool)
    start_mask[1:] = spaces[:-1]
    start_mask[field_start] = True
    starts = np.flatnonzero(start_mask)
    if len(starts) != n_rows * n_pixels:
        return None
    row_first = np.searchsorted(starts, field_start)
    if not (np.diff(row_first) == n_pixels).all():
        return None  # spaces and tokens balance overall but not row by row
    lengths = np.empty(len(starts), np.int64)
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1])
    lengths -= 1
    row_last = np.append(row_first[1:], len(starts)) - 1
    lengths[row_last] = field_end - starts[row_last]  # a field's last token ends at the field end
    if lengths.min() < 1 or lengths.max() > 3:
        return None  # leading, trailing or double spaces, or four digits
    nibbles = np.zeros(size + 2, np.uint8)
    np.bitwise_and(raw, 15, out=nibbles[:size])
    key = nibbles[starts].astype(np.uint16)
    key |= nibbles[1:][starts].astype(np.uint16) << 4
    key |= nibbles[2:][starts].astype(np.uint16) << 8
    key |= lengths.astype(np.uint16) << 12
    values = _digits_table()[key]
    if values.max() > 255:
        return None
    return values.astype(np.uint8).reshape(n_rows, n_pixels)


# ----------------------------------------------------------------------------------------- images
def label_and_split(relpath: str, where: str) -> tuple[int, str]:
    """Label and split of `<split dir>/<emotion>/<Usage>_<id>.<ext>` (a path inside the source)."""
    parts = PurePosixPath(relpath).parts
    if len(parts) < 3:
        raise BadRecord("unknown_split", where, "expected <train|test>/<emotion>/<file>")
    split_dir, emotion, name = parts[-3], parts[-2], parts[-1]
    label = EMOTION_ALIASES.get(emotion.lower())
    if label is None:
        raise BadRecord("unknown_emotion", where, f"emotion folder {emotion!r} is not one of {', '.join(EMOTIONS)}")
    prefix = name.split("_", 1)[0] if "_" in name else ""
    if prefix in USAGES:
        return label, prefix
    split = SPLIT_FOLDERS.get(split_dir.lower())
    if split is None:
        raise BadRecord(
            "unknown_split",
            where,
            f"no Usage prefix in the file name and folder {split_dir!r} "
            f"is not one of {', '.join(sorted(SPLIT_FOLDERS))}",
        )
    return label, split


def decode_image(data: bytes, where: str, resize: bool) -> tuple[np.ndarray, bool]:
    """Image bytes -> ((48, 48) uint8 grayscale, whether it was resized)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadRecord("unreadable_image", where, f"cannot decode image ({e})") from None
    if gray.size == (FER_SIZE, FER_SIZE):
        return np.asarray(gray, np.uint8), False
    if not resize:
        raise BadRecord(
            "bad_image_size",
            where,
            f"is {gray.size[0]}x{gray.size[1]}, expected {FER_SIZE}x{FER_SIZE} (pass --resize to resize such images)",
        )
    return np.asarray(gray.resize((FER_SIZE, FER_SIZE), Image.Resampling.LANCZOS), np.uint8), True


def _decode_images(unit: dict, rows: Rows, report: UnitReport, on_bad: str, resize: bool) -> None:
    archive = zipfile.ZipFile(unit["root"]) if unit["archive"] else None
    display = unit["display"]
    try:
        for member in unit["members"]:
            rel = member[len(unit["prefix"]) :]
            where = f"{display}/{rel}" if archive else os.path.join(display, rel)
            try:
                label, split = label_and_split(rel, where)
                if archive is not None:
                    data = archive.read(member)
                else:
                    with open(os.path.join(unit["root"], member), "rb") as f:
                        data = f.read()
                image, was_resized = decode_image(data, where, resize)
            except BadRecord as bad:
                _reject(report, on_bad, bad)
                continue
            report.resized += was_resized
            rows.add([rel], [label], [split], image)
    finally:
        if archive is not None:
            archive.close()
