"""The prepared-data contract every stage reads and writes (Ray-free).

A prepared dataset is a folder:

    DIR/manifest.json                       what is inside, where it came from, a checksum
    DIR/split=<Usage>/<part>.parquet        one row per face: id, label, pixels

The split is the Hive partition of the folder name, so `pyarrow.dataset` and `ray.data.read_parquet`
both give it back as a column: (id, label, split, pixels). `pixels` is fixed_size_binary(H*W), the
grayscale face in row-major uint8, which turns into a numpy array without a copy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ferray import __version__
from ferray.errors import DataError
from ferray.labels import EMOTIONS, FER_SIZE, NUM_CLASSES  # noqa: F401  (re-exported: part of the contract)

USAGES = ("Training", "PublicTest", "PrivateTest")  # FER2013's "Usage" values, the splits a source holds
VALIDATION = "Validation"  # carved from Training by `ferray prepare` where there is no PrivateTest
SPLITS = ("Training", VALIDATION, "PublicTest", "PrivateTest")  # every split a prepared folder may hold
MANIFEST = "manifest.json"
FORMAT = "ferray.faces/1"


def split_dir(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"split={split}"


def schema(image_size: int, with_split: bool = False) -> pa.Schema:
    fields = [("id", pa.string()), ("label", pa.int64()), ("pixels", pa.binary(image_size * image_size))]
    return pa.schema(fields + ([("split", pa.string())] if with_split else []))


def faces_table(ids, labels, images: np.ndarray, splits=None) -> pa.Table:
    """Build a contract table from (N,) ids, (N,) labels and (N, H, W) uint8 images.

    With `splits`, the table also carries the split column that partitioned writes consume.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    n, h, w = images.shape
    if h != w:
        raise ValueError(f"faces must be square, got {h}x{w}")
    columns = {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "pixels": pa.FixedSizeBinaryArray.from_buffers(pa.binary(h * w), n, [None, pa.py_buffer(images)]),
    }
    if splits is not None:
        columns["split"] = pa.array(splits, pa.string())
    return pa.table(columns, schema=schema(h, with_split=splits is not None))


def pixels_to_images(pixels: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_binary(H*W) column -> (N, H, W) uint8, without a copy for a single chunk."""
    if isinstance(pixels, pa.ChunkedArray):
        pixels = pixels.combine_chunks()
    n = len(pixels)
    side = int(round(pixels.type.byte_width**0.5))
    if n == 0:
        return np.zeros((0, side, side), np.uint8)
    flat = np.frombuffer(pixels.buffers()[1], np.uint8)
    start = pixels.offset * pixels.type.byte_width
    return flat[start : start + n * side * side].reshape(n, side, side)


def decode_faces(table: pa.Table) -> dict:
    """A batch of a prepared split (pyarrow) -> {"image": (B, H, W) uint8, "label": (B,) int64, "key":
    (B,) int64}, the key a hash of the face's id: a Train worker that caches its shard orders it by key,
    so a run's batches do not depend on the order in which Ray Data's read tasks finish. It lives here,
    not in the Train module, because Ray Data runs it in fresh worker processes: importing it from a
    module that imports torch would cost each of them seconds of start-up."""
    keys = id_keys(table.column("id").to_numpy(zero_copy_only=False))
    return {"image": pixels_to_images(table.column("pixels")), "label": table.column("label").to_numpy(), "key": keys}


def id_keys(ids) -> np.ndarray:
    """(N,) int64 keys of face ids: a fixed hash (pandas' hash_array, the same in every process)."""
    from pandas.util import hash_array

    return hash_array(np.asarray(ids, dtype=object)).view("int64")


def read_split(root: str | os.PathLike, split: str, columns=None) -> pa.Table:
    """One split of a prepared dataset as an Arrow table; DataError if it is not there."""
    folder = split_dir(root, split)
    if not folder.is_dir():
        have = [p.name.removeprefix("split=") for p in Path(root).glob("split=*")]
        raise DataError(f"{root}: no split {split!r} (has: {', '.join(sorted(have)) or 'none'})")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no Parquet files")
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def load_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (N,H,W) uint8, labels (N,) int64, ids) of one split, in a stable id order."""
    table = read_split(root, split)
    table = table.sort_by("id")
    images = pixels_to_images(table.column("pixels")).copy()  # writable, owns its memory
    labels = table.column("label").to_numpy().copy()
    return images, labels, table.column("id").to_pylist()


# ---------------------------------------------------------------------------------------- checksum
def row_digests(split: str, table: pa.Table) -> np.ndarray:
    """A 64-bit digest of each row (split, id, label, pixels), as uint64."""
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_pylist()
    images = pixels_to_images(table.column("pixels"))
    out = np.empty(len(ids), np.uint64)
    prefix = split.encode() + b"\0"
    for i, (id_, label) in enumerate(zip(ids, labels)):
        h = hashlib.blake2b(prefix + id_.encode() + b"\0" + bytes([label]), digest_size=8)
        h.update(images[i].tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


class Summary:
    """Counts per split and class, image size and an order-free checksum, accumulated by batch."""

    def __init__(self) -> None:
        self.counts: dict[str, np.ndarray] = {}
        self.digest_sum = 0
        self.image_size: int | None = None

    def add(self, split: str | None, table: pa.Table) -> None:
        """Count `table`, all of `split`, or per row by its split column when split is None."""
        if table.num_rows == 0:
            return
        if split is None:
            splits = table.column("split").to_numpy(zero_copy_only=False)
            for s in np.unique(splits):
                self.add(str(s), table.filter(pa.array(splits == s)))
            return
        size = int(round(table.schema.field("pixels").type.byte_width ** 0.5))
        if self.image_size not in (None, size):
            raise DataError(f"split {split}: {size}x{size} faces beside {self.image_size}x{self.image_size}")
        self.image_size = size
        counts = self.counts.setdefault(split, np.zeros(NUM_CLASSES, np.int64))
        counts += np.bincount(table.column("label").to_numpy(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        # Summing digests (mod 2**64) makes the checksum independent of row and file order,
        # which parallel writers do not keep.
        self.digest_sum = (self.digest_sum + int(row_digests(split, table).sum(dtype=np.uint64))) % 2**64

    def merge(self, other: Summary) -> None:
        for split, counts in other.counts.items():
            self.counts.setdefault(split, np.zeros(NUM_CLASSES, np.int64))
            self.counts[split] += counts
        if other.image_size is not None:
            if self.image_size not in (None, other.image_size):
                raise DataError(
                    f"{other.image_size}x{other.image_size} faces beside {self.image_size}x{self.image_size}"
                )
            self.image_size = other.image_size
        self.digest_sum = (self.digest_sum + other.digest_sum) % 2**64

    def to_dict(self) -> dict:
        return {
            "counts": {s: c.tolist() for s, c in self.counts.items()},
            "digest_sum": self.digest_sum,
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        summary = cls()
        summary.counts = {s: np.asarray(c, np.int64) for s, c in d["counts"].items()}
        summary.digest_sum, summary.image_size = int(d["digest_sum"]), d["image_size"]
        return summary

    @property
    def rows(self) -> int:
        return int(sum(c.sum() for c in self.counts.values()))

    @property
    def checksum(self) -> str:
        return f"blake2b64-sum:{self.digest_sum:016x}"

    def splits(self) -> dict:
        ordered = [s for s in SPLITS if s in self.counts] + sorted(set(self.counts) - set(SPLITS))
        return {
            s: {"rows": int(self.counts[s].sum()), "classes": dict(zip(EMOTIONS, map(int, self.counts[s])))}
            for s in ordered
        }


def summarize(root: str | os.PathLike) -> Summary:
    """Read a prepared folder back file by file (bounded memory) and summarize what is on disk."""
    summary = Summary()
    for folder in sorted(Path(root).glob("split=*")):
        split = folder.name.removeprefix("split=")
        for f in sorted(folder.glob("*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                summary.add(split, pa.Table.from_batches([batch]))
    return summary


def verify(root: str | os.PathLike, manifest: dict) -> tuple[bool, Summary]:
    """(whether the files match the manifest's counts and checksum, what the files hold)."""
    found = summarize(root)
    return found.checksum == manifest["checksum"] and found.splits() == manifest["splits"], found


# ---------------------------------------------------------------------------------------- manifest
def build_manifest(
    root: str | os.PathLike, *, source: dict, skipped: dict | None = None, notes: dict | None = None
) -> dict:
    """A manifest for a folder already written, summarized by reading it back."""
    return build_manifest_from_summary(root, summarize(root), source=source, skipped=skipped, notes=notes)


def build_manifest_from_summary(
    root: str | os.PathLike, summary: Summary, *, source: dict, skipped: dict | None = None, notes: dict | None = None
) -> dict:
    if summary.image_size is None:
        raise DataError(f"{root}: no faces were written")
    files = sorted(p.relative_to(root).as_posix() for p in Path(root).glob("split=*/*.parquet"))
    splits = summary.splits()
    return {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ferray_version": __version__,
        "source": source,
        "labels": list(EMOTIONS),
        "image_size": [summary.image_size, summary.image_size],
        "channels": 1,
        "rows": summary.rows,
        "splits": splits,
        "skipped": skipped or {"total": 0, "by_kind": {}},
        "notes": notes or {},
        "checksum": summary.checksum,
        "files": files,
    }


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    Path(root, MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root, MANIFEST)
    if not path.is_file():
        raise DataError(f"{root}: not a prepared dataset (no {MANIFEST}); run `ferray prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def selection_split(manifest: dict, requested: str = "auto", where: str = "data") -> str:
    """The split every data-driven choice is made on. "auto": Validation where it was carved, else
    PublicTest where PrivateTest remains as the test (FER2013's own protocol)."""
    splits = manifest["splits"]
    if requested != "auto":
        if requested not in splits:
            raise DataError(f"{where}: no {requested!r} split to select on (has: {', '.join(splits)})")
        return requested
    if VALIDATION in splits:
        return VALIDATION
    if "PrivateTest" in splits and "PublicTest" in splits:
        return "PublicTest"
    raise DataError(
        f"{where}: no split to select on that leaves a test untouched (has: {', '.join(splits)}). "
        f"Prepare the data again (`ferray prepare` carves a {VALIDATION} split from Training when "
        "there is no PrivateTest), or name one with data.selection_split"
    )


def untouched_splits(manifest: dict, selection: str, train: str = "Training") -> list[str]:
    """The splits a run may report as tests: every split that neither trained nor selected."""
    return [s for s in manifest["splits"] if s not in (selection, train)]


# ------------------------------------------------------------------------------- atomic outputs
OUTPUT_MARKER = ".ferray-output"  # in every folder atomic_output writes: what --overwrite may replace
# what marks folders written before the marker existed: a prepared dataset, a bundle
LEGACY_MARKERS = (MANIFEST, "bundle.json")


def is_ferray_output(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in (OUTPUT_MARKER, *LEGACY_MARKERS))


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, overwrite: bool = False, kind: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; rename it to `out` only if the block succeeds.

    A crash, an error or Ctrl-C leaves no half-written `out` behind, and an existing `out` is
    only replaced (with --overwrite) once the new one is complete, and only if ferray wrote it
    (its OUTPUT_MARKER, or a manifest or bundle card): `--out ~ --overwrite` must not delete a
    home folder. `kind` (e.g. "prepared data") is recorded in the marker.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not is_ferray_output(out):
        what = "a file" if not out.is_dir() else "a folder ferray did not write"
        raise DataError(
            f"{out} is {what} (no {OUTPUT_MARKER}, {' or '.join(LEGACY_MARKERS)} in it): --overwrite "
            "replaces only ferray's own outputs; choose another --out, or remove it yourself"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "ferray_version": __version__}) + "\n")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
