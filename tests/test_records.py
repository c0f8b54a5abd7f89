"""Record decoding and validation, without Ray."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from ferray.data import records as R
from ferray.data.sources import open_source


def pixel_string(img: np.ndarray) -> str:
    return " ".join(map(str, img.ravel().tolist()))


def _c_parser(raw, starts, ends, n_pixels):
    from ferray.data import _pixels

    out = np.empty((len(starts), n_pixels), np.uint8)
    return out if _pixels.parse_fields(raw, starts, ends, n_pixels, out) else None


def _has_c_parser():
    try:
        from ferray.data import _pixels  # noqa: F401
    except ImportError:
        return False
    return True


# Both fast parsers: numpy (always there) and the optional C extension (where it was built).
FAST_PARSERS = [
    pytest.param(R.parse_pixel_fields, id="numpy"),
    pytest.param(_c_parser, id="c", marks=pytest.mark.skipif(not _has_c_parser(), reason="C extension not built")),
]


@pytest.fixture(params=FAST_PARSERS)
def fast_parser(request):
    return request.param


def parse_rows(rows: list[str], parser=R.parse_pixel_fields):
    """Run a fast parser on pixel strings laid out one per line."""
    raw = np.frombuffer(("\n".join(rows) + "\n").encode(), np.uint8)
    ends = np.flatnonzero(raw == 10)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return parser(raw, starts, ends, 2304)


def test_fast_pixel_parser_matches_reference_on_edge_values(fast_parser):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 2304), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    images[2, ::2] = 7  # one-digit tokens beside three-digit ones
    fast = parse_rows([pixel_string(i) for i in images], fast_parser)
    assert fast is not None and np.array_equal(fast, images)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s + " 1",  # one value too many
        lambda s: s.rsplit(" ", 1)[0],  # one too few
        lambda s: s.replace(" ", "  ", 1),  # double space
        lambda s: " " + s,  # leading space
        lambda s: s + " ",  # trailing space
        lambda s: s.replace("12", "1x", 1) if "12" in s else "x" + s,  # not a digit
        lambda s: "256" + s[s.index(" ") :],  # out of range
        lambda s: "1000" + s[s.index(" ") :],  # four digits
        lambda s: "-1" + s[s.index(" ") :],  # negative
    ],
)
def test_fast_pixel_parser_refuses_anything_unclean(mutate, fast_parser):
    rng = np.random.default_rng(1)
    rows = [pixel_string(rng.integers(0, 256, 2304)) for _ in range(3)]
    rows[1] = mutate(rows[1])
    assert parse_rows(rows, fast_parser) is None


def test_fast_parser_not_fooled_by_compensating_rows(fast_parser):
    rng = np.random.default_rng(2)
    values = rng.integers(0, 256, 2 * 2304)
    rows = [" ".join(map(str, values[:2303])), " ".join(map(str, values[2303:]))]  # 2303 + 2305
    assert parse_rows(rows, fast_parser) is None


COLUMNS = ["emotion", "pixels", "usage"]
GOOD = pixel_string(np.full(2304, 9, np.uint8))


@pytest.mark.parametrize(
    "fields, kind",
    [
        (["1", GOOD], "malformed_row"),
        (["7", GOOD, "Training"], "bad_label"),
        (["x", GOOD, "Training"], "bad_label"),
        (["1", GOOD, "Validation"], "unknown_usage"),
        (["1", GOOD + " 3", "Training"], "wrong_pixel_count"),
        (["1", GOOD.replace("9", "9.5", 1), "Training"], "non_integer_pixel"),
        (["1", GOOD.replace("9", "300", 1), "Training"], "pixel_out_of_range"),
    ],
)
def test_reference_row_parser_names_row_and_kind(fields, kind):
    with pytest.raises(R.BadRecord) as err:
        R.parse_csv_row(fields, COLUMNS, 41, "fer2013.csv")
    assert err.value.kind == kind
    assert "fer2013.csv row 41 (line 42)" in str(err.value)


def test_reference_row_parser_accepts_a_good_row():
    label, split, pixels = R.parse_csv_row([" 3", GOOD, " PublicTest"], COLUMNS, 1, "f.csv")
    assert (label, split, pixels.shape, int(pixels[0])) == (3, "PublicTest", (2304,), 9)


def write_csv(path, rows, header="emotion,pixels,Usage"):
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_csv_unit_skip_mode_keeps_good_rows_and_reports_each_bad_one(tmp_path):
    rows = [
        ["0", GOOD, "Training"],
        ["9", GOOD, "Training"],
        ["2", GOOD, "PublicTest"],
        ["3", GOOD + " 1", "Training"],
        ["4", GOOD, "PrivateTest"],
    ]
    src = open_source(write_csv(tmp_path / "f.csv", rows))
    table, report = R.decode_unit(src.units[0], on_bad="skip")
    assert table.column("id").to_pylist() == ["f.csv:1", "f.csv:3", "f.csv:5"]
    assert table.column("split").to_pylist() == ["Training", "PublicTest", "PrivateTest"]
    assert [(r["kind"], r["where"]) for r in report.rejected] == [
        ("bad_label", "f.csv row 2 (line 3)"),
        ("wrong_pixel_count", "f.csv row 4 (line 5)"),
    ]
    with pytest.raises(R.BadRecord, match="row 2"):
        R.decode_unit(src.units[0], on_bad="error")


def test_fast_and_reference_paths_give_identical_tables(tmp_path, synth_faces):
    images, labels, splits = synth_faces
    rows = [[str(label), pixel_string(i), s] for i, label, s in zip(images[:20], labels[:20], splits[:20])]
    clean = open_source(write_csv(tmp_path / "a.csv", rows)).units[0]
    fast, _ = R.decode_unit(clean)
    rows_blank = rows[:10] + [[""]] + rows[10:]  # a blank line forces the row-by-row path
    path = tmp_path / "b.csv"
    path.write_text("emotion,pixels,Usage\n" + "".join(",".join(r) + "\n" for r in rows_blank))
    slow, _ = R.decode_unit(open_source(path).units[0])
    assert fast.column("pixels").equals(slow.column("pixels"))
    assert fast.column("label").to_pylist() == labels[:20].tolist() == slow.column("label").to_pylist()
    assert slow.column("id").to_pylist()[10] == "b.csv:12"  # numbering skips the blank line's row


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "rel, expected",
    [
        ("train/happy/Training_12.jpg", (3, "Training")),
        ("test/sad/PrivateTest_99.jpg", (4, "PrivateTest")),
        ("test/Surprise/img_1.jpg", (5, "PublicTest")),  # no Usage prefix: the folder decides
        ("x/train/anger/5.png", (0, "Training")),
    ],
)
def test_label_and_split_from_path(rel, expected):
    assert R.label_and_split(rel, rel) == expected


@pytest.mark.parametrize(
    "rel, kind",
    [
        ("train/happpy/Training_1.jpg", "unknown_emotion"),
        ("validation/happy/img_1.jpg", "unknown_split"),
        ("happy/Training_1.jpg", "unknown_split"),
    ],
)
def test_label_and_split_errors(rel, kind):
    with pytest.raises(R.BadRecord) as err:
        R.label_and_split(rel, "root/" + rel)
    assert err.value.kind == kind and "root/" + rel in str(err.value)


def test_decode_image_sizes_modes_and_garbage():
    face = np.arange(48 * 48, dtype=np.uint32).reshape(48, 48).astype(np.uint8)
    img, resized = R.decode_image(png(face), "f.png", resize=False)
    assert np.array_equal(img, face) and not resized
    rgb = np.stack([face] * 3, -1)
    img, _ = R.decode_image(png(rgb), "c.png", resize=False)
    assert np.array_equal(img, face)  # equal channels -> the same gray
    big = np.zeros((96, 64), np.uint8)
    with pytest.raises(R.BadRecord, match="64x96, expected 48x48") as err:
        R.decode_image(png(big), "big.png", resize=False)
    assert err.value.kind == "bad_image_size"
    img, resized = R.decode_image(png(big), "big.png", resize=True)
    assert img.shape == (48, 48) and resized
    with pytest.raises(R.BadRecord) as err:
        R.decode_image(b"not an image", "junk.jpg", resize=False)
    assert err.value.kind == "unreadable_image"


def test_image_zip_unit_reads_members_in_place(tmp_path):
    face = np.full((48, 48), 200, np.uint8)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("fer/train/fear/Training_1.png", png(face))
        zf.writestr("fer/test/fear/PublicTest_2.png", png(face))
        zf.writestr("__MACOSX/fer/._x.png", b"junk")
    src = open_source(tmp_path / "a.zip")
    assert src.kind == "image-zip" and src.ignored == ["__MACOSX/fer/._x.png"]
    table, report = R.decode_unit(src.units[0])
    assert sorted(table.column("id").to_pylist()) == ["test/fear/PublicTest_2.png", "train/fear/Training_1.png"]
    assert table.column("label").to_pylist() == [2, 2]


@pytest.mark.parametrize("layout", ["kaggle", "icml", "crlf", "quoted"])
def test_fast_chunk_path_handles_common_layouts_like_the_reference(tmp_path, synth_faces, layout):
    images, labels, splits = (a[:12] for a in synth_faces)
    columns = ["emotion", "usage", "pixels"] if layout == "icml" else ["emotion", "pixels", "usage"]
    lines = []
    for img, label, split in zip(images, labels, splits):
        px = pixel_string(img)
        px = f'"{px}"' if layout == "quoted" else px
        fields = {"emotion": str(label), "usage": split, "pixels": px}
        lines.append(",".join(fields[c] for c in columns))
    newline = "\r\n" if layout == "crlf" else "\n"
    data = (newline.join(lines) + newline).encode()
    unit = {"kind": "csv", "columns": columns, "first_row": 1, "display": "f.csv"}
    fast = R._fast_csv_chunk(data, unit)
    assert fast is not None, "the fast path should accept this layout"
    ids, got_labels, got_splits, got_images = fast
    assert np.array_equal(got_images.reshape(-1, 48, 48), images)
    assert list(got_labels) == labels.tolist() and got_splits == splits.tolist()
    assert ids[0] == "f.csv:1"
    for i, fields in enumerate(__import__("csv").reader(io.StringIO(data.decode()))):
        label, split, pixels = R.parse_csv_row(fields, columns, i + 1, "f.csv")
        assert (label, split) == (labels[i], splits[i]) and np.array_equal(pixels, images[i].ravel())
