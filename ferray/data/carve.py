"""The selection split and the training order of a prepared dataset (Ray-free).

FER2013's own protocol selects on PublicTest and tests on PrivateTest. Where PrivateTest is absent
(the common image-folder download), selecting on PublicTest would leave no untouched test, so
`ferray prepare` carves a Validation split out of Training instead: per class, the faces with the
smallest seeded digest of (id, label, pixels). The choice depends on the faces alone, never on file
or row order, so the same data gives the same Validation faces on every run, worker and machine.

Training is also rewritten in a seeded random order, in files of at most ROWS_PER_FILE rows: image
folders come out in class order, and both the streaming loader's local shuffle buffer and Ray
Train's per-worker shards (contiguous blocks) would otherwise see one or two classes at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ferray.data.contract import NUM_CLASSES, VALIDATION, DataError, read_split, row_digests, split_dir

TRAINING = "Training"
DEFAULT_FRACTION = 0.1
ROWS_PER_FILE = 4096


def resolve_fraction(validation: str | float | None, splits: set[str]) -> float:
    """The fraction of Training to carve: "auto" carves DEFAULT_FRACTION only without PrivateTest."""
    if validation in (None, "none", 0, 0.0):
        return 0.0
    if validation == "auto":
        return 0.0 if "PrivateTest" in splits else DEFAULT_FRACTION
    try:
        fraction = float(validation)
    except (TypeError, ValueError):
        raise DataError(f"--validation {validation!r}: expected auto, none or a fraction such as 0.1") from None
    if not 0 < fraction < 1:
        raise DataError(f"--validation {validation!r}: the fraction must be between 0 and 1")
    return fraction


def stratified_pick(labels: np.ndarray, keys: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask: in each class, the round(fraction * n) rows with the smallest keys (at least one
    per class that has two or more rows, so every class is represented in the selection split)."""
    chosen = np.zeros(len(labels), bool)
    for label in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            continue
        n = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
        chosen[rows[np.argsort(keys[rows], kind="stable")[:n]]] = True
    return chosen


def seeded_order(table: pa.Table, seed: int, salt: str) -> np.ndarray:
    """A permutation of the table's rows that depends only on the rows' content and the seed."""
    return np.argsort(row_digests(f"{salt}:{seed}", table), kind="stable")


def write_split(root: Path, split: str, table: pa.Table) -> None:
    folder = split_dir(root, split)
    for old in folder.glob("*.parquet"):
        old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
        pq.write_table(table.slice(start, ROWS_PER_FILE), folder / f"part-{part:05d}.parquet")


def carve_table(table: pa.Table, fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table | None, dict]:
    """(Training in a seeded order, Validation or None, what to record) from a Training table with
    id, label and pixels: the same faces whoever calls it (`ferray prepare`, the Ray-free benches)."""
    record = {"training_order": f"shuffled (seed {seed})"}
    validation = None
    if fraction > 0:
        picked = stratified_pick(table.column("label").to_numpy(), row_digests(f"carve:{seed}", table), fraction)
        validation = table.filter(pa.array(picked))
        table = table.filter(pa.array(~picked))
        validation = validation.take(seeded_order(validation, seed, "order"))
        record[VALIDATION.lower()] = {
            "carved_from": TRAINING,
            "fraction": fraction,
            "seed": seed,
            "stratified": True,
            "rows": validation.num_rows,
        }
    return table.take(seeded_order(table, seed, "order")), validation, record


def carve_and_shuffle(root: str | Path, fraction: float, seed: int = 0) -> dict:
    """Move a stratified `fraction` of Training into Validation (if fraction > 0) and rewrite Training
    in a seeded order. Returns what to record in the manifest."""
    root = Path(root)
    if split_dir(root, VALIDATION).exists():
        raise DataError(f"{root}: already has a {VALIDATION} split")
    training, validation, record = carve_table(
        read_split(root, TRAINING, columns=["id", "label", "pixels"]), fraction, seed
    )
    if validation is not None:
        write_split(root, VALIDATION, validation)
    write_split(root, TRAINING, training)
    return record
