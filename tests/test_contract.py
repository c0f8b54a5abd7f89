import json

import numpy as np
import pytest
import torch

from ferray.data import contract as C


def test_faces_table_round_trips_pixels_to_tensor(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 48, 48), dtype=np.uint8)
    table = C.faces_table([f"f{i}" for i in range(5)], [0, 1, 2, 3, 6], images)
    assert table.schema.field("pixels").type.byte_width == 48 * 48
    back = C.pixels_to_images(table.column("pixels"))
    assert back.shape == (5, 48, 48) and np.array_equal(back, images)
    # through Parquet and into a tensor
    (tmp_path / "split=Training").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "split=Training" / "p.parquet")
    loaded, labels, ids = C.load_split(tmp_path, "Training")
    tensor = torch.from_numpy(loaded)
    assert tensor.dtype == torch.uint8 and torch.equal(tensor, torch.from_numpy(images))
    assert labels.tolist() == [0, 1, 2, 3, 6] and ids == [f"f{i}" for i in range(5)]


def test_pixels_to_images_honours_slices():
    images = (
        np.arange(4 * 4, dtype=np.uint8).reshape(1, 4, 4).repeat(3, 0) + np.arange(3, dtype=np.uint8)[:, None, None]
    )
    col = C.faces_table(["a", "b", "c"], [0, 0, 0], images).column("pixels").combine_chunks()
    assert np.array_equal(C.pixels_to_images(col.slice(1, 2)), images[1:])


def test_checksum_ignores_row_order_but_not_content():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 48, 48), dtype=np.uint8)
    ids, labels = [f"x{i}" for i in range(6)], [0, 1, 2, 3, 4, 5]
    a, b, c = C.Summary(), C.Summary(), C.Summary()
    a.add("Training", C.faces_table(ids, labels, images))
    b.add("Training", C.faces_table(ids[::-1], labels[::-1], images[::-1]))
    changed = images.copy()
    changed[2, 10, 10] ^= 1
    c.add("Training", C.faces_table(ids, labels, changed))
    assert a.checksum == b.checksum != c.checksum
    moved = C.Summary()
    moved.add("PublicTest", C.faces_table(ids, labels, images))
    assert moved.checksum != a.checksum  # the split is part of each row's digest


def test_summary_merge_equals_one_pass():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 48, 48), dtype=np.uint8)
    table = C.faces_table(
        [str(i) for i in range(8)], [i % 7 for i in range(8)], images, splits=["Training"] * 5 + ["PublicTest"] * 3
    )
    whole = C.Summary()
    whole.add(None, table)
    parts = C.Summary()
    for lo, hi in ((0, 3), (3, 8)):
        piece = C.Summary()
        piece.add(None, table.slice(lo, hi - lo))
        parts.merge(C.Summary.from_dict(json.loads(json.dumps(piece.to_dict()))))
    assert parts.checksum == whole.checksum and parts.splits() == whole.splits()
    assert whole.splits()["Training"]["rows"] == 5 and whole.rows == 8


def test_atomic_output_leaves_nothing_on_error_and_refuses_existing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with C.atomic_output(out) as tmp:
            (tmp / "half.parquet").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with C.atomic_output(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(C.DataError, match="already exists"):
        with C.atomic_output(out):
            pass
    with C.atomic_output(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [C.OUTPUT_MARKER, "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_only_what_ferray_wrote(tmp_path):
    """`--out ~ --overwrite` must not delete a home folder: a folder without ferray's marker (or a
    manifest or bundle card, from before the marker) is refused, and nothing in it is touched."""
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    with pytest.raises(C.DataError, match="a folder ferray did not write.*remove it yourself"):
        with C.atomic_output(home, overwrite=True):
            pass
    assert (home / "notes.txt").read_text() == "mine" and (home / "photos").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.DataError, match="is a file"):
        with C.atomic_output(tmp_path / "file", overwrite=True):
            pass
    legacy = tmp_path / "older-dataset"
    legacy.mkdir()
    (legacy / C.MANIFEST).write_text("{}")
    with C.atomic_output(legacy, overwrite=True, kind="prepared data") as tmp:
        (tmp / "new").write_text("1")
    assert json.loads((legacy / C.OUTPUT_MARKER).read_text())["kind"] == "prepared data"
    assert not (legacy / C.MANIFEST).exists()  # replaced as a whole


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(C.DataError, match="no manifest.json"):
        C.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(C.DataError, match="not valid JSON"):
        C.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(C.DataError, match="format 'other'"):
        C.read_manifest(tmp_path)


def test_read_split_names_missing_split(tmp_path):
    (tmp_path / "split=Training").mkdir()
    with pytest.raises(C.DataError, match="no split 'PublicTest'.*Training"):
        C.read_split(tmp_path, "PublicTest")
