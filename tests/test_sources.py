"""Recognizing sources and cutting them into units, without Ray."""

import zipfile

import numpy as np
import pytest

from ferray.data import records as R
from ferray.data.contract import DataError
from ferray.data.sources import csv_units, open_source
from ferray.data.synth import write_csv, write_folder


def test_kaggle_and_icml_headers(tmp_path, synth_faces):
    images, labels, splits = (a[:10] for a in synth_faces)
    write_csv(tmp_path / "fer2013.csv", images, labels, splits, "fer2013")
    write_csv(tmp_path / "icml_face_data.csv", images, labels, splits, "icml")
    assert (tmp_path / "icml_face_data.csv").read_text().startswith("emotion, Usage, pixels\n")
    kaggle, icml = open_source(tmp_path / "fer2013.csv"), open_source(tmp_path / "icml_face_data.csv")
    assert (kaggle.kind, icml.kind) == ("fer2013.csv", "icml_face_data.csv")
    assert icml.units[0]["columns"] == ["emotion", "usage", "pixels"]
    a, _ = R.decode_unit(kaggle.units[0])
    b, _ = R.decode_unit(icml.units[0])
    assert a.column("pixels").equals(b.column("pixels")) and a.num_rows == 10


def test_csv_units_number_rows_across_chunks(tmp_path, synth_faces):
    images, labels, splits = (a[:25] for a in synth_faces)
    path = tmp_path / "fer2013.csv"
    write_csv(path, images, labels, splits)
    header_end = path.read_bytes().index(b"\n") + 1
    units = csv_units(path, header_end, ["emotion", "pixels", "usage"], "fer2013.csv", chunk_bytes=30_000)
    assert len(units) > 3
    assert units[0]["first_row"] == 1 and units[-1]["end"] == path.stat().st_size
    ids = []
    for u in units:
        table, _ = R.decode_unit(u)
        ids += table.column("id").to_pylist()
    assert ids == [f"fer2013.csv:{i}" for i in range(1, 26)]


@pytest.mark.parametrize(
    "header, message",
    [
        ("emotion,pixels", "missing usage"),
        ("label,pixels,Usage", "missing emotion"),
        ("emotion,pixels,Usage,extra", "unexpected columns"),
    ],
)
def test_bad_headers_name_the_file_and_column(tmp_path, header, message):
    path = tmp_path / "x.csv"
    path.write_text(header + "\n0,1 2,Training\n")
    with pytest.raises(DataError, match=message) as err:
        open_source(path)
    assert str(path) in str(err.value)


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        open_source(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("emotion,pixels,Usage\n")
    with pytest.raises(DataError, match="no rows"):
        open_source(tmp_path / "header.csv")
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "nope.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_source(tmp_path / "folder")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a FER2013 source"):
        open_source(tmp_path / "x.txt")


def test_image_folder_plan_ignores_non_images_and_checks_emotions(tmp_path, synth_faces):
    images, labels, splits = (a[:14] for a in synth_faces)
    write_folder(tmp_path / "fer", images, labels, splits)
    (tmp_path / "fer" / "README.txt").write_text("about")
    src = open_source(tmp_path / "fer")
    assert src.kind == "image-folder" and src.ignored == ["README.txt"]
    assert sum(len(u["members"]) for u in src.units) == 14
    bad = tmp_path / "bad" / "train" / "cats"
    bad.mkdir(parents=True)
    (bad / "1.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not emotions"):
        open_source(tmp_path / "bad")


def test_zip_of_a_csv_is_extracted_to_scratch(tmp_path, synth_faces):
    images, labels, splits = (a[:5] for a in synth_faces)
    write_csv(tmp_path / "fer2013.csv", images, labels, splits)
    with zipfile.ZipFile(tmp_path / "k.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(tmp_path / "fer2013.csv", "fer2013/fer2013.csv")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = open_source(tmp_path / "k.zip", scratch)
    assert src.kind == "zip:fer2013.csv" and (scratch / "fer2013.csv").exists()
    table, _ = R.decode_unit(src.units[0])
    assert table.column("id").to_pylist()[0] == "k.zip/fer2013/fer2013.csv:1"
    assert np.array_equal(table.column("label").to_numpy(), labels)


def test_unreadable_zip(tmp_path):
    (tmp_path / "z.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError):
        open_source(tmp_path / "z.zip")
