"""Decode and validate FER2013 records, a work unit at a time (Ray-free).

A work unit is a small dict that names a slice of a source: a byte range of a CSV, or a list of
image files in a folder or a zip. `decode_unit` turns one into a contract table plus a report of
what it rejected or changed. Ray Data runs units in parallel (ferray.data.prepare); the GPU bench
runs the same function in a plain loop.

CSV chunks take a vectorized fast path; any chunk it cannot prove clean is re-read row by row by
the reference parser, which is the one that names the bad row, so both agree on every input.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ferray.data.contract import EMOTIONS, FER_SIZE, NUM_CLASSES, SPLITS, faces_table

NUM_PIXELS = FER_SIZE * FER_SIZE
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm")

# Folder names seen in the FER2013 repackagings users download, mapped to the label order.
EMOTION_ALIASES = {
    **{name: i for i, name in enumerate(EMOTIONS)},
    "anger": 0, "disgusted": 1, "fearful": 2, "happiness": 3, "sadness": 4, "surprised": 5,
}
# Split from the folder when the file name carries no Usage prefix.
SPLIT_FOLDERS = {"train": "Training", "training": "Training", "test": "PublicTest",
                 "publictest": "PublicTest", "privatetest": "PrivateTest"}

BAD_KINDS = (
    "malformed_row", "bad_label", "unknown_usage", "wrong_pixel_count", "non_integer_pixel",
    "pixel_out_of_range", "unreadable_image", "bad_image_size", "unknown_emotion", "unknown_split",
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
        self.parts.append((list(ids), np.asarray(labels, np.int64), list(splits),
                           images.reshape(-1, FER_SIZE, FER_SIZE)))

    def table(self) -> pa.Table:
        """The contract table with a `split` column (write_parquet partitions on it)."""
        if not self.parts:
            return faces_table([], np.zeros(0, np.int64), np.zeros((0, FER_SIZE, FER_SIZE), np.uint8),
                               splits=[])
        ids, labels, splits, images = zip(*self.parts)
        return faces_table(sum(ids, []), np.concatenate(labels), np.concatenate(images),
                           splits=sum(splits, []))


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
        raise BadRecord("malformed_row", where, f"has {len(fields)} fields, expected {len(columns)} "
                        f"({', '.join(columns)})")
    rec = dict(zip(columns, fields))
    label_text = rec["emotion"].strip()
    if not (label_text.isdigit() and int(label_text) < NUM_CLASSES):
        raise BadRecord("bad_label", where, f"emotion {label_text!r} is not a label 0..{NUM_CLASSES - 1}")
    usage = rec["usage"].strip()
    if usage not in SPLITS:
        raise BadRecord("unknown_usage", where, f"Usage {usage!r} is not one of {', '.join(SPLITS)}")
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
    """Vectorized parse of a clean chunk, or None if anything in it needs the reference parser."""
    columns = unit["columns"]
    try:
        table = pcsv.read_csv(
            pa.py_buffer(data),
            read_options=pcsv.ReadOptions(column_names=columns, use_threads=False, block_size=len(data) + 1),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns}),
        )
    except pa.ArrowInvalid:
        return None
    if table.num_rows != data.count(b"\n") + (not data.endswith(b"\n")):
        return None  # blank lines: Arrow skips them, the row numbers would shift
    try:
        labels = pc.cast(pc.utf8_trim_whitespace(table.column("emotion")), pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    usage = pc.utf8_trim_whitespace(table.column("usage"))
    if labels.min() < 0 or labels.max() >= NUM_CLASSES or not pc.all(pc.is_in(usage, pa.array(SPLITS))).as_py():
        return None
    images = parse_pixel_strings(table.column("pixels").combine_chunks(), NUM_PIXELS)
    if images is None:
        return None
    ids = [f"{unit['display']}:{row}" for row in range(unit["first_row"], unit["first_row"] + table.num_rows)]
    return ids, labels, usage.to_pylist(), images


# Values of up to three digits, looked up by the low nibbles of the token's bytes: the key packs
# digit0 | digit1 << 4 | digit2 << 8, and the table row is the token length.
_DIGITS_LUT = np.zeros((4, 4096), np.uint16)
for _k in range(4096):
    _d0, _d1, _d2 = _k & 15, (_k >> 4) & 15, (_k >> 8) & 15
    _DIGITS_LUT[1, _k], _DIGITS_LUT[2, _k], _DIGITS_LUT[3, _k] = _d0, 10 * _d0 + _d1, 100 * _d0 + 10 * _d1 + _d2
_DIGITS_LUT = _DIGITS_LUT.ravel()


def parse_pixel_strings(column: pa.StringArray, n_pixels: int) -> np.ndarray | None:
    """Space-separated pixel strings -> (rows, n_pixels) uint8, or None unless every row is clean.

    Clean means digits and single spaces only, n_pixels values of 1-3 digits, each <= 255. This is
    the hot loop of `ferray prepare` on a CSV; it works on whole chunks with no Python per value.
    """
    n_rows = len(column)
    offsets = np.frombuffer(column.buffers()[1], np.int32, n_rows + 1, column.offset * 4).astype(np.int64)
    text = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    offsets -= offsets[0]
    size = len(text)
    spaces = text == 32
    n_spaces = np.count_nonzero(spaces)
    if n_spaces != n_rows * (n_pixels - 1):
        return None
    if n_spaces + np.count_nonzero((text - np.uint8(48)) < 10) != size:
        return None  # something other than digits and spaces
    # Token starts: every row start and every byte after a space.
    starts_mask = np.zeros(size + 1, bool)
    starts_mask[1:] = spaces
    starts_mask[offsets] = True
    starts = np.flatnonzero(starts_mask)  # (rows * n_pixels + 1,), the last one is `size`
    row_first = np.searchsorted(starts, offsets)  # index of each row's first token
    if not (np.diff(row_first) == n_pixels).all():
        return None
    lengths = np.diff(starts) - 1
    lengths[row_first[1:] - 1] += 1  # a row's last token has no space after it
    starts = starts[:-1]
    if lengths.min() < 1 or lengths.max() > 3:
        return None
    padded = np.concatenate([text, np.zeros(3, np.uint8)])
    key = (padded[starts] & 15).astype(np.uint32)
    key |= (padded[starts + 1] & 15).astype(np.uint32) << 4
    key |= (padded[starts + 2] & 15).astype(np.uint32) << 8
    values = _DIGITS_LUT[key + (lengths.astype(np.uint32) << 12)]
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
        raise BadRecord("unknown_emotion", where,
                        f"emotion folder {emotion!r} is not one of {', '.join(EMOTIONS)}")
    prefix = name.split("_", 1)[0] if "_" in name else ""
    if prefix in SPLITS:
        return label, prefix
    split = SPLIT_FOLDERS.get(split_dir.lower())
    if split is None:
        raise BadRecord("unknown_split", where, f"no Usage prefix in the file name and folder {split_dir!r} "
                        f"is not one of {', '.join(sorted(SPLIT_FOLDERS))}")
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
        raise BadRecord("bad_image_size", where, f"is {gray.size[0]}x{gray.size[1]}, expected "
                        f"{FER_SIZE}x{FER_SIZE} (pass --resize to resize such images)")
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
