import numpy as np
import pytest

from ferray.data.contract import NUM_CLASSES, load_split, read_manifest, summarize
from ferray.data.synth import SynthSpec, generate, make_labels, synthesize


def test_same_seed_same_faces_other_seed_other_faces():
    a = generate(SynthSpec(n=30, seed=5))
    b = generate(SynthSpec(n=30, seed=5))
    c = generate(SynthSpec(n=30, seed=6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("n", [7, 100, 701])
def test_uniform_labels_are_balanced_within_one(n):
    counts = np.bincount(make_labels(n, "uniform", np.random.default_rng(0)), minlength=NUM_CLASSES)
    assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_fer_balance_follows_fer2013_frequencies():
    counts = np.bincount(make_labels(10_000, "fer", np.random.default_rng(0)), minlength=NUM_CLASSES)
    assert counts.argmax() == 3 and counts.argmin() == 1  # happy most, disgust least


def test_splits_are_stratified(synth_faces):
    _, labels, splits = synth_faces
    for split, share in (("Training", 16), ("PublicTest", 2), ("PrivateTest", 2)):
        assert np.bincount(labels[splits == split], minlength=7).tolist() == [share] * 7


def test_faces_are_varied_and_learnable_but_not_trivially():
    images, labels, splits = generate(SynthSpec(n=700, seed=1))
    assert images.dtype == np.uint8 and images.shape == (700, 48, 48)
    assert images.std() > 30 and len(np.unique(images.reshape(700, -1), axis=0)) == 700
    x = images.reshape(700, -1).astype(np.float32) / 255
    train, test = splits == "Training", splits != "Training"
    # a linear classifier (ridge regression on pixels) beats chance (1/7) but is far from solving it
    targets = np.eye(NUM_CLASSES)[labels[train]]
    weights = np.linalg.solve(x[train].T @ x[train] + 10 * np.eye(x.shape[1]), x[train].T @ targets)
    accuracy = (np.argmax(x[test] @ weights, 1) == labels[test]).mean()
    assert 0.25 < accuracy < 0.8, accuracy


def test_parquet_format_writes_the_contract(tmp_path):
    manifest = synthesize(tmp_path / "d", SynthSpec(n=70, seed=2))
    assert read_manifest(tmp_path / "d") == manifest
    assert manifest["rows"] == 70 and manifest["image_size"] == [48, 48]
    assert summarize(tmp_path / "d").checksum == manifest["checksum"]
    images, labels, _ = load_split(tmp_path / "d", "PublicTest")
    assert images.shape == (7, 48, 48) and sorted(labels.tolist()) == list(range(7))
