"""Recognize a FER2013 source and cut it into work units (Ray-free).

The forms users have:
  - Kaggle's fer2013.csv                 columns emotion, pixels, Usage
  - icml_face_data.csv                   columns emotion, " Usage", " pixels" (spaces in the header)
  - an image folder                      ROOT/{train,test}/<emotion>/<Usage>_<id>.jpg
  - a .zip of that folder, or of one of the CSVs (read in place; a CSV is extracted to a scratch dir)

A unit is a byte range of a CSV (cut at line ends, so no row is split) or a list of image files.
Units, not Ray's own readers, carry the rows in: that is what lets one big CSV be read in parallel
and lets every error name its row number.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ferray.data.contract import OUTPUT_MARKER, DataError
from ferray.data.records import EMOTION_ALIASES, IMAGE_SUFFIXES, SPLIT_FOLDERS

CSV_COLUMNS = {"emotion": "emotion", "pixels": "pixels", "usage": "usage"}
CSV_CHUNK_BYTES = 16 << 20
IMAGES_PER_UNIT = 1000


@dataclass
class Source:
    path: Path
    kind: str  # "fer2013.csv" | "icml_face_data.csv" | "image-folder" | "image-zip" | "csv-zip"
    units: list[dict]
    ignored: list[str] = field(default_factory=list)  # files that are not faces (README, .DS_Store)

    def describe(self) -> dict:
        size = self.path.stat().st_size if self.path.is_file() else None
        return {
            "path": str(self.path),
            "kind": self.kind,
            "bytes": size,
            "units": len(self.units),
            "ignored_files": len(self.ignored),
        }


def open_source(path: str | os.PathLike, scratch: str | os.PathLike | None = None) -> Source:
    """Recognize `path` and plan its units. `scratch` receives a CSV extracted from a zip."""
    path = Path(path).absolute()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _image_folder(path)
    if zipfile.is_zipfile(path):
        return _zip(path, scratch)
    if path.suffix.lower() == ".csv":
        return _csv(path, path.name)
    raise DataError(
        f"{path}: not a FER2013 source; expected fer2013.csv, icml_face_data.csv, an image "
        "folder with train/ and test/, or a .zip of one of these"
    )


# -------------------------------------------------------------------------------------------- CSV
def _csv(path: Path, display: str, kind_prefix: str = "") -> Source:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    with open(path, "rb") as f:
        header_line = f.readline()
        header_end = f.tell()
    columns = parse_header(header_line, path)
    kind = "icml_face_data.csv" if columns.index("usage") < columns.index("pixels") else "fer2013.csv"
    units = csv_units(path, header_end, columns, display)
    if not units:
        raise DataError(f"{path}: has a header but no rows")
    return Source(path, kind_prefix + kind, units)


def parse_header(line: bytes, path: Path) -> list[str]:
    names = [c.strip().strip('"').strip().lower() for c in line.decode("utf-8", "replace").strip().split(",")]
    missing = [c for c in CSV_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{path}: header has columns {names}; missing {', '.join(missing)} "
            "(expected emotion, pixels, Usage in any order)"
        )
    extra = [c for c in names if c not in CSV_COLUMNS]
    if extra:
        raise DataError(f"{path}: unexpected columns {extra} (expected emotion, pixels, Usage)")
    return names


def csv_units(
    path: Path, header_end: int, columns: list[str], display: str, chunk_bytes: int = CSV_CHUNK_BYTES
) -> list[dict]:
    """Cut the file into ~chunk_bytes ranges at line ends and number each range's first row.

    Counting lines means one sequential pass over the file (memchr speed); it lets every unit name
    its rows exactly, also when a bad row makes a unit fall back to the row-by-row parser.
    """
    size = path.stat().st_size
    units, start, first_row = [], header_end, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(start)
            block = f.read(chunk_bytes)
            end = start + len(block)
            if end < size:
                tail = f.readline()  # finish the line the block cut
                block += tail
                end += len(tail)
            lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            units.append(
                {
                    "kind": "csv",
                    "path": str(path),
                    "start": start,
                    "end": end,
                    "first_row": first_row,
                    "columns": columns,
                    "display": display,
                }
            )
            first_row += lines
            start = end
    return units


# ----------------------------------------------------------------------------------------- images
def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def find_image_root(names: list[str]) -> str:
    """The prefix above the split folders (train/, test/), given the image paths in a tree."""
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) >= 3 and parts[-3].lower() in SPLIT_FOLDERS:
            return "/".join(parts[:-3]) + ("/" if len(parts) > 3 else "")
        if len(parts) >= 3 and PurePosixPath(parts[-1]).stem.split("_", 1)[0] in (
            "Training",
            "PublicTest",
            "PrivateTest",
        ):
            return "/".join(parts[:-3]) + ("/" if len(parts) > 3 else "")
    return ""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _image_units(root: Path, members: list[str], archive: bool, display: str) -> list[dict]:
    prefix = find_image_root(members)
    members = sorted(members)
    return [
        {
            "kind": "images",
            "root": str(root),
            "archive": archive,
            "members": chunk,
            "prefix": prefix,
            "display": display,
        }
        for chunk in _chunks(members, IMAGES_PER_UNIT)
    ]


def _image_folder(path: Path) -> Source:
    images, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/")
            if rel == OUTPUT_MARKER:  # `ferray synth --format folder` marks its output; not a stray file
                continue
            is_image = name.lower().endswith(IMAGE_SUFFIXES) and not _is_junk(rel)
            (images if is_image else ignored).append(rel)
    if not images:
        csvs = sorted(p.name for p in path.glob("*.csv"))
        hint = f"; it holds {', '.join(csvs)}: pass that file instead" if csvs else ""
        raise DataError(f"{path}: no images found (expected train/<emotion>/*.jpg and test/<emotion>/*.jpg){hint}")
    _check_emotion_folders(images, path)
    return Source(path, "image-folder", _image_units(path, images, False, path.name), ignored)


def _check_emotion_folders(images: list[str], path: Path) -> None:
    """A typo'd emotion folder is caught per file later; say early when none is an emotion at all."""
    folders = {PurePosixPath(n).parts[-2].lower() for n in images if len(PurePosixPath(n).parts) >= 2}
    if folders and not folders & set(EMOTION_ALIASES):
        raise DataError(
            f"{path}: image folders {sorted(folders)[:8]} are not emotions; expected "
            "<train|test>/<emotion>/<file> with emotions angry, disgust, fear, happy, sad, "
            "surprise, neutral"
        )


def _zip(path: Path, scratch: str | os.PathLike | None) -> Source:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: unreadable zip ({e})") from None
    names = [i.filename for i in infos]
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not _is_junk(n)]
    csvs = [n for n in names if n.lower().endswith(".csv") and not _is_junk(n)]
    if images:
        ignored = [n for n in names if n not in set(images)]
        _check_emotion_folders(images, path)
        return Source(path, "image-zip", _image_units(path, images, True, path.name), ignored)
    if len(csvs) == 1:
        if scratch is None:
            raise DataError(f"{path}: holds {csvs[0]}; a scratch folder is needed to extract it")
        target = Path(scratch) / PurePosixPath(csvs[0]).name
        with zipfile.ZipFile(path) as zf, zf.open(csvs[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        source = _csv(target, f"{path.name}/{csvs[0]}", kind_prefix="zip:")
        source.path = path
        source.ignored = [n for n in names if n != csvs[0]]
        return source
    if len(csvs) > 1:
        raise DataError(f"{path}: holds several CSVs {csvs}; unpack it and pass the one to prepare")
    raise DataError(f"{path}: zip holds no images and no CSV (first entries: {names[:5]})")
