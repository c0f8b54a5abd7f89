"""`ferray prepare` through Ray Data, on sources the tests generate."""

import csv
import re
import zipfile

import numpy as np
import pytest

from ferray.data.contract import DataError, load_split, read_manifest, summarize
from ferray.data.synth import write_csv, write_folder, write_zip
from ferray.distributed.prepare import prepare

pytestmark = pytest.mark.slow


def source_index(face_id: str) -> int:
    """Index of the generated face behind a prepared id (csv row k -> k-1; file <Usage>_<i>.png -> i)."""
    if ".csv:" in face_id:
        return int(face_id.rsplit(":", 1)[1]) - 1
    return int(re.search(r"_(\d+)\.png$", face_id).group(1))


@pytest.fixture(scope="module")
def small_faces(synth_faces):
    return tuple(a[:42] for a in synth_faces)


@pytest.mark.parametrize("form", ["csv", "icml", "folder", "zip", "csv-zip"])
def test_every_source_form_prepares_to_the_same_faces(ray_session, tmp_path, small_faces, form):
    images, labels, splits = small_faces
    if form in ("csv", "icml"):
        source = tmp_path / "fer2013.csv"
        write_csv(source, images, labels, splits, "fer2013" if form == "csv" else "icml")
    elif form == "folder":
        source = tmp_path / "faces"
        write_folder(source, images, labels, splits)
    elif form == "zip":
        source = tmp_path / "faces.zip"
        write_zip(source, images, labels, splits)
    else:
        write_csv(tmp_path / "fer2013.csv", images, labels, splits)
        source = tmp_path / "kaggle.zip"
        with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(tmp_path / "fer2013.csv", "fer2013.csv")
    manifest = prepare(source, tmp_path / "out")
    assert read_manifest(tmp_path / "out") == manifest
    assert manifest["rows"] == 42 and manifest["skipped"]["total"] == 0
    for split in ("Training", "PublicTest", "PrivateTest"):
        expected = np.bincount(labels[splits == split], minlength=7).tolist()
        assert list(manifest["splits"][split]["classes"].values()) == expected
        got, got_labels, ids = load_split(tmp_path / "out", split)
        index = np.array([source_index(i) for i in ids])
        assert np.array_equal(got, images[index]) and np.array_equal(got_labels, labels[index])
    assert summarize(tmp_path / "out").checksum == manifest["checksum"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left


def bad_csv(path, images, labels, splits):
    write_csv(path, images, labels, splits)
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    lines[3] = f"{fields[0]},{fields[1]} 7,{fields[2]}"  # row 3: one pixel too many
    lines[6] = "8," + lines[6].split(",", 1)[1]  # row 6: label 8
    lines[9] = lines[9].rsplit(",", 1)[0] + ",Validation"  # row 9: unknown Usage
    lines[12] = lines[12].replace(" ", " 3x ", 1)  # row 12: not an integer
    path.write_text("\n".join(lines) + "\n")
    return {"wrong_pixel_count": 1, "bad_label": 1, "unknown_usage": 1, "non_integer_pixel": 1}


def test_bad_csv_records_error_or_skip(ray_session, tmp_path, small_faces):
    expected = bad_csv(tmp_path / "bad.csv", *small_faces)
    with pytest.raises(DataError, match=r"bad\.csv row 3 \(line 4\).*wrong_pixel_count"):
        prepare(tmp_path / "bad.csv", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]  # nothing half-written

    manifest = prepare(tmp_path / "bad.csv", tmp_path / "out", on_bad="skip")
    assert manifest["skipped"]["by_kind"] == expected and manifest["skipped"]["total"] == 4
    assert manifest["rows"] == 42 - 4
    with open(tmp_path / "out" / "rejected.csv") as f:
        rejected = list(csv.DictReader(f))
    assert [r["where"] for r in rejected] == [f"bad.csv row {r} (line {r + 1})" for r in (3, 6, 9, 12)]


def test_bad_images_error_skip_and_resize(ray_session, tmp_path, small_faces):
    images, labels, splits = small_faces
    root = tmp_path / "faces"
    write_folder(root, images, labels, splits)
    first = sorted(root.glob("train/*/*.png"))
    first[0].write_bytes(b"not a png")  # unreadable
    from PIL import Image

    Image.fromarray(np.zeros((60, 60), np.uint8)).save(first[1])  # 60x60
    (root / "train" / "happpy").mkdir()
    Image.fromarray(images[0]).save(root / "train" / "happpy" / "Training_999.png")  # unknown emotion

    with pytest.raises(DataError, match="bad record") as err:
        prepare(root, tmp_path / "out")
    assert "faces/train/" in str(err.value)
    assert not (tmp_path / "out").exists()

    skipped = prepare(root, tmp_path / "out", on_bad="skip")
    assert skipped["skipped"]["by_kind"] == {"unreadable_image": 1, "bad_image_size": 1, "unknown_emotion": 1}
    assert skipped["rows"] == 42 - 2

    resized = prepare(root, tmp_path / "out", on_bad="skip", resize=True, overwrite=True)
    assert resized["skipped"]["by_kind"] == {"unreadable_image": 1, "unknown_emotion": 1}
    assert resized["notes"]["resized_to_48x48"] == 1 and resized["rows"] == 42 - 1


def test_existing_output_is_refused_without_overwrite(ray_session, tmp_path, small_faces):
    write_csv(tmp_path / "f.csv", *small_faces)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="already exists"):
        prepare(tmp_path / "f.csv", tmp_path / "out")


EXPECTED_FER2013 = {
    "Training": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "PublicTest": [467, 56, 496, 895, 653, 415, 607],
}


def test_real_fer2013_image_folder(ray_session, tmp_path, shared_fer2013):
    manifest = prepare(shared_fer2013, tmp_path / "fer")
    splits = manifest["splits"]
    # no PrivateTest here, so prepare carves a Validation split (10%, class-stratified) from Training
    assert splits["Training"]["rows"] + splits["Validation"]["rows"] == 28_709
    assert splits["Validation"]["rows"] == pytest.approx(2_871, abs=7)
    assert splits["PublicTest"]["rows"] == 3_589
    carved = [t + v for t, v in zip(splits["Training"]["classes"].values(), splits["Validation"]["classes"].values())]
    assert carved == EXPECTED_FER2013["Training"]
    assert list(splits["PublicTest"]["classes"].values()) == EXPECTED_FER2013["PublicTest"]
    assert manifest["skipped"]["total"] == 0
