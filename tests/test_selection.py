"""The selection split: Validation carved from Training, the training order, and which split selects."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from ferray.data.carve import ROWS_PER_FILE, carve_and_shuffle, resolve_fraction, stratified_pick
from ferray.data.contract import (
    NUM_CLASSES,
    DataError,
    load_split,
    read_split,
    selection_split,
    split_dir,
    summarize,
    untouched_splits,
)
from ferray.data.synth import SynthSpec, synthesize


def manifest_with(*splits):
    return {"splits": {s: {"rows": 10} for s in splits}}


def test_selection_follows_the_protocol():
    assert selection_split(manifest_with("Training", "PublicTest", "PrivateTest")) == "PublicTest"
    assert selection_split(manifest_with("Training", "Validation", "PublicTest")) == "Validation"
    assert selection_split(manifest_with("Training", "Validation", "PublicTest", "PrivateTest")) == "Validation"
    with pytest.raises(DataError, match="leaves a test untouched"):
        selection_split(manifest_with("Training", "PublicTest"), where="data/x")
    with pytest.raises(DataError, match="no 'Validation' split"):
        selection_split(manifest_with("Training", "PublicTest"), "Validation")
    assert selection_split(manifest_with("Training", "PublicTest"), "PublicTest") == "PublicTest"  # asked for by name


def test_a_selection_split_is_never_a_test():
    manifest = manifest_with("Training", "Validation", "PublicTest", "PrivateTest")
    assert untouched_splits(manifest, "Validation") == ["PublicTest", "PrivateTest"]
    assert untouched_splits(manifest_with("Training", "PublicTest", "PrivateTest"), "PublicTest") == ["PrivateTest"]


def test_fraction_resolution():
    assert resolve_fraction("auto", {"Training", "PublicTest"}) == 0.1
    assert resolve_fraction("auto", {"Training", "PublicTest", "PrivateTest"}) == 0.0
    assert resolve_fraction("none", {"Training"}) == 0.0
    assert resolve_fraction("0.2", {"Training"}) == 0.2
    for bad in ("1.5", "ten", "-0.1"):
        with pytest.raises(DataError, match="--validation"):
            resolve_fraction(bad, set())


def test_stratified_pick_takes_the_fraction_of_every_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(NUM_CLASSES), [400, 40, 410, 720, 480, 320, 500])
    picked = stratified_pick(labels, rng.integers(0, 2**63, len(labels), dtype=np.uint64), 0.1)
    per_class = np.bincount(labels[picked], minlength=NUM_CLASSES)
    assert per_class.tolist() == [40, 4, 41, 72, 48, 32, 50]


@pytest.fixture()
def no_private(tmp_path):
    """A prepared synthetic dataset without PrivateTest (like the image-folder download)."""
    out = tmp_path / "data"
    synthesize(out, SynthSpec(n=700, seed=5))
    shutil.rmtree(split_dir(out, "PrivateTest"))
    return out


def test_carve_is_stratified_disjoint_and_independent_of_row_order(no_private, tmp_path):
    before_images, before_labels, before_ids = load_split(no_private, "Training")
    copy = tmp_path / "copy"
    shutil.copytree(no_private, copy)
    # The same faces in another file order must give the same Validation faces.
    table = read_split(copy, "Training")
    for f in split_dir(copy, "Training").glob("*.parquet"):
        f.unlink()
    pq.write_table(
        table.take(np.random.default_rng(1).permutation(table.num_rows)), split_dir(copy, "Training") / "part-0.parquet"
    )

    record = carve_and_shuffle(no_private, 0.1, seed=0)
    carve_and_shuffle(copy, 0.1, seed=0)
    val_ids = set(load_split(no_private, "Validation")[2])
    assert val_ids == set(load_split(copy, "Validation")[2])
    train_ids = set(load_split(no_private, "Training")[2])
    assert not val_ids & train_ids and val_ids | train_ids == set(before_ids)
    counts = np.bincount(load_split(no_private, "Validation")[1], minlength=NUM_CLASSES)
    expected = [round(0.1 * n) for n in np.bincount(before_labels, minlength=NUM_CLASSES)]
    assert counts.tolist() == expected
    assert record["validation"]["rows"] == len(val_ids)
    # Another seed carves other faces.
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    shutil.rmtree(split_dir(other, "Validation"))
    for f in split_dir(other, "Training").glob("*.parquet"):
        f.unlink()
    pq.write_table(table, split_dir(other, "Training") / "part-0.parquet")
    carve_and_shuffle(other, 0.1, seed=1)
    assert set(load_split(other, "Validation")[2]) != val_ids


def test_training_is_written_in_a_class_mixed_order(tmp_path):
    out = tmp_path / "data"
    synthesize(out, SynthSpec(n=2800, seed=2))
    # Sort Training by class first, as an image folder comes out.
    table = read_split(out, "Training").sort_by("label")
    for f in split_dir(out, "Training").glob("*.parquet"):
        f.unlink()
    pq.write_table(table, split_dir(out, "Training") / "part-0.parquet")
    carve_and_shuffle(out, 0.0, seed=0)
    files = sorted(split_dir(out, "Training").glob("*.parquet"))
    labels = np.concatenate([pq.read_table(f, columns=["label"]).column("label").to_numpy() for f in files])
    assert len(labels) == table.num_rows and not split_dir(out, "Validation").exists()
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    # Two halves of the file order (what two Train workers' shards get) and each 256-row window
    # (what a streaming shuffle buffer sees) hold about the global mix.
    for part in np.array_split(labels, 2):
        assert np.abs(np.bincount(part, minlength=NUM_CLASSES) / len(part) - overall).max() < 0.03
    windows = [labels[i : i + 256] for i in range(0, len(labels) - 256, 256)]
    assert all(len(np.unique(w)) == NUM_CLASSES for w in windows)
    assert all(pq.read_metadata(f).num_rows <= ROWS_PER_FILE for f in files)


def test_checksum_counts_the_carved_split(no_private):
    before = summarize(no_private)
    carve_and_shuffle(no_private, 0.1)
    after = summarize(no_private)
    assert after.rows == before.rows and set(after.counts) == {"Training", "Validation", "PublicTest"}
    assert after.checksum != before.checksum  # the split of each face is part of the data
