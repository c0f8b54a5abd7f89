"""FER2013 in memory without Ray: every split as numpy arrays, with the same Validation faces that
`ferray prepare` carves (Ray-free; the GPU benches run on machines without Ray).

    splits = load_faces("../shared/data/fer2013")       # a source (folder, CSV, zip) or a prepared folder
    x, y = splits["Training"].images, splits["Training"].labels
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ferray.data.carve import carve_table, resolve_fraction
from ferray.data.contract import MANIFEST, VALIDATION, DataError, load_split, pixels_to_images, read_manifest


@dataclass
class Faces:
    images: np.ndarray  # (N, 48, 48) uint8
    labels: np.ndarray  # (N,) int64
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Faces:
        return Faces(self.images[index], self.labels[index], [self.ids[i] for i in index])


def _decode(unit: dict) -> pa.Table:
    from ferray.data.records import decode_unit

    return decode_unit(unit)[0]


def _from_table(table: pa.Table) -> Faces:
    return Faces(
        pixels_to_images(table.column("pixels")).copy(),
        table.column("label").to_numpy().copy(),
        table.column("id").to_pylist(),
    )


def load_faces(
    path: str | Path, validation: str | float = "auto", seed: int = 0, workers: int | None = None
) -> dict[str, Faces]:
    """{split: Faces}. A prepared folder is read as it is; a source is decoded in `workers` processes
    and Validation carved from Training as `ferray prepare --validation` would (same faces, same order)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return {split: Faces(*load_split(path, split)) for split in read_manifest(path)["splits"]}
    from ferray.data.sources import open_source

    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    units = open_source(path).units
    workers = workers or min(16, os.cpu_count() or 1)
    if workers > 1 and len(units) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            tables = list(pool.map(_decode, units))
    else:
        tables = [_decode(unit) for unit in units]
    table = pa.concat_tables(tables)
    names = np.asarray(table.column("split").to_pylist())
    splits = {str(s): table.filter(pa.array(names == s)).drop_columns(["split"]) for s in np.unique(names)}
    if "Training" in splits:
        fraction = resolve_fraction(validation, set(splits))
        splits["Training"], carved, _ = carve_table(splits["Training"], fraction, seed)
        if carved is not None:
            splits[VALIDATION] = carved
    return {name: _from_table(t) for name, t in splits.items()}


def load_private(path: str | Path) -> Faces:
    """PrivateTest faces from a source that holds them (the full fer2013.csv, or a folder whose files
    are named PrivateTest_*); DataError naming the path when it holds none."""
    splits = load_faces(path, validation="none")
    if "PrivateTest" not in splits:
        raise DataError(
            f"{path}: no PrivateTest faces in it (found: {', '.join(splits) or 'none'}); pass the full "
            "fer2013.csv, or a folder of PrivateTest_<id> images"
        )
    return splits["PrivateTest"]
