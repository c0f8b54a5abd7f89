"""Synthetic FER-like faces: the embedded default data of `ferray demo` and of the tests (Ray-free).

Each face is drawn analytically at 2x resolution and averaged down to 48x48 grayscale. The label
sets the expression: mouth curve and opening, brow height and slant, eye opening (plus a lip
asymmetry and nose wrinkles for disgust). Every expression parameter is drawn around its class
mean with enough spread that neighbouring classes overlap, and faces vary in pose, scale,
lighting, skin and background tone, noise, and occluders (a hand or hair patch, dark glasses),
so a model has to learn the expression rather than a template.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferray.data.contract import EMOTIONS, FER_SIZE, NUM_CLASSES, USAGES, faces_table

SUPERSAMPLE = 2

# Class means of the expression parameters, in FER label order:
#   curve: mouth corners up (+) or down (-); open: mouth opening; width: mouth half-width;
#   eye: eye opening (1 = neutral); brow: brow lift; slant: inner brow end up (+) or down (-);
#   asym: one-sided lip raise; wrinkle: nose wrinkle strength.
EXPRESSIONS = {
    #            curve  open  width  eye   brow   slant  asym  wrinkle
    "angry": (-0.03, 0.02, 0.26, 0.60, -0.07, -0.10, 0.00, 0.2),
    "disgust": (-0.05, 0.03, 0.28, 0.55, -0.04, -0.05, 0.09, 1.0),
    "fear": (-0.03, 0.08, 0.34, 1.35, 0.07, 0.07, 0.00, 0.0),
    "happy": (0.10, 0.05, 0.36, 0.80, 0.00, 0.00, 0.00, 0.0),
    "sad": (-0.09, 0.00, 0.28, 0.75, 0.01, 0.09, 0.00, 0.0),
    "surprise": (0.00, 0.15, 0.20, 1.45, 0.11, 0.03, 0.00, 0.0),
    "neutral": (0.00, 0.00, 0.29, 1.00, 0.00, 0.00, 0.00, 0.0),
}
# Spread of each parameter around its class mean: about half the gap between close classes.
PARAM_SPREAD = np.array([0.035, 0.03, 0.04, 0.22, 0.035, 0.04, 0.035, 0.35], np.float32)

# FER2013's Training label frequencies, for --balance fer.
FER_FREQUENCIES = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965], np.float64)
SPLIT_FRACTIONS = {"Training": 0.8, "PublicTest": 0.1, "PrivateTest": 0.1}


@dataclass(frozen=True)
class SynthSpec:
    n: int = 2000
    seed: int = 0
    balance: str = "uniform"  # "uniform" | "fer"
    difficulty: float = 1.0  # scales the parameter spread and the nuisances


def make_labels(n: int, balance: str, rng: np.random.Generator) -> np.ndarray:
    """Labels with exact class proportions (uniform: counts differ by at most 1), shuffled."""
    if balance == "uniform":
        weights = np.ones(NUM_CLASSES)
    elif balance == "fer":
        weights = FER_FREQUENCIES
    else:
        raise ValueError(f"balance must be 'uniform' or 'fer', not {balance!r}")
    quota = np.floor(weights / weights.sum() * n).astype(int)
    quota[np.argsort(-(weights / weights.sum() * n - quota))[: n - quota.sum()]] += 1
    labels = np.repeat(np.arange(NUM_CLASSES), quota)
    return rng.permutation(labels)


def make_splits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stratified Training/PublicTest/PrivateTest assignment, spread over the whole index range."""
    splits = np.empty(len(labels), object)
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(len(idx) * SPLIT_FRACTIONS["Training"]))
        n_public = int(round(len(idx) * SPLIT_FRACTIONS["PublicTest"]))
        splits[idx[:n_train]] = "Training"
        splits[idx[n_train : n_train + n_public]] = "PublicTest"
        splits[idx[n_train + n_public :]] = "PrivateTest"
    return splits


def generate(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (n,48,48) uint8, labels (n,), splits (n,) of str); the same for the same spec."""
    rng = np.random.default_rng(spec.seed)
    labels = make_labels(spec.n, spec.balance, rng)
    splits = make_splits(labels, rng)
    images = np.empty((spec.n, FER_SIZE, FER_SIZE), np.uint8)
    batch = 256
    seeds = np.random.SeedSequence(spec.seed).spawn((spec.n + batch - 1) // batch)
    for b, seq in enumerate(seeds):
        sl = slice(b * batch, min(spec.n, (b + 1) * batch))
        images[sl] = render(labels[sl], np.random.default_rng(seq), spec.difficulty)
    return images, labels, splits


def expression_params(labels: np.ndarray, rng: np.random.Generator, difficulty: float) -> np.ndarray:
    means = np.array([EXPRESSIONS[e] for e in EMOTIONS], np.float32)[labels]  # (B, 8)
    noise = rng.standard_normal(means.shape).astype(np.float32) * PARAM_SPREAD * difficulty
    params = means + noise
    params[:, 1] = np.clip(params[:, 1], 0, None)  # opening
    params[:, 2] = np.clip(params[:, 2], 0.14, None)  # width
    params[:, 3] = np.clip(params[:, 3], 0.15, None)  # eye
    params[:, 7] = np.clip(params[:, 7], 0, None)  # wrinkle
    return params


def _segment_distance(u, v, x0, y0, x1, y1):
    """Distance from points (u, v) to the segments (x0,y0)-(x1,y1), broadcast over the batch."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return np.hypot(u - x0 - t * dx, v - y0 - t * dy)


def _soft(inside_distance, edge):
    """Anti-aliased coverage from a signed distance (positive inside)."""
    return np.clip(0.5 + inside_distance / edge, 0, 1)


def render(labels: np.ndarray, rng: np.random.Generator, difficulty: float = 1.0) -> np.ndarray:
    """Draw one face per label -> (B, 48, 48) uint8."""
    b = len(labels)
    s = FER_SIZE * SUPERSAMPLE
    p = expression_params(labels, rng, difficulty)
    col = lambda k: p[:, k, None, None]  # noqa: E731  (B,1,1) views of a parameter
    rnd = lambda lo, hi: rng.uniform(lo, hi, (b, 1, 1)).astype(np.float32)  # noqa: E731

    # Pose: canvas coordinates (x, y) in [-1, 1] -> face coordinates (u, v).
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
    y, x = np.meshgrid(grid, grid, indexing="ij")  # (S, S)
    angle = rnd(-0.3, 0.3) * difficulty
    scale = rnd(0.82, 1.08)
    cx, cy = rnd(-0.08, 0.08) * difficulty, rnd(-0.06, 0.1) * difficulty
    xs, ys = (x - cx) / scale, (y - cy) / scale
    u = np.cos(angle) * xs + np.sin(angle) * ys  # (B, S, S)
    v = -np.sin(angle) * xs + np.cos(angle) * ys
    edge = 2.5 / s / scale

    # Background with a gradient, then the face oval with its own tone.
    bg = rnd(0.05, 0.9) + rnd(-0.25, 0.25) * x + rnd(-0.25, 0.25) * y
    skin = rnd(0.45, 0.85)
    face = _soft(1 - np.sqrt((u / 0.68) ** 2 + (v / 0.88) ** 2), edge * 1.5)
    img = bg * (1 - face) + skin * face
    hair = (rng.random((b, 1, 1)) < 0.6) * _soft(-(v + 0.62 + rnd(-0.08, 0.08)), edge * 3) * face
    img = img * (1 - hair) + rnd(0.05, 0.35) * hair

    # Eyes: dark ellipses whose height is the eye opening; irises in the middle.
    eye_y = -0.16
    for side in (-1, 1):
        ex = side * 0.29
        height = 0.065 * col(3)
        ellipse = 1 - np.sqrt(((u - ex) / 0.12) ** 2 + ((v - eye_y) / height) ** 2)
        img = img * (1 - 0.75 * _soft(ellipse * height, edge))
        iris = 1 - np.hypot(u - ex, v - eye_y) / np.minimum(0.05, height)
        img = img * (1 - 0.6 * _soft(iris * 0.05, edge))
        # Brows: a thick segment, lifted by `brow`, inner end moved by `slant`.
        inner, outer = side * 0.1, side * 0.45
        y_inner = eye_y - 0.17 - col(4) - col(5)
        y_outer = eye_y - 0.17 - col(4) + 0.02
        dist = _segment_distance(u, v, inner, y_inner, outer, y_outer)
        img = img * (1 - 0.7 * _soft(0.035 - dist, edge))

    # Nose: a soft shadow line; wrinkles across the bridge for disgust.
    nose = _segment_distance(u, v, 0.0, -0.05, 0.03, 0.2)
    img = img * (1 - 0.25 * _soft(0.03 - nose, edge))
    for k, wy in enumerate((-0.02, 0.04)):
        wrinkle = _segment_distance(u, v, -0.1, wy - 0.01 * k, 0.1, wy + 0.01 * k)
        img = img * (1 - 0.25 * np.clip(col(7), 0, 1.5) * _soft(0.015 - wrinkle, edge))

    # Mouth: centre line y(u) bends up at the corners by `curve`, tilts by `asym`; opens by `open`.
    mouth_y, half = 0.45, col(2)
    t = np.clip(u / half, -1, 1)
    centre = mouth_y - col(0) * t**2 - col(6) * t
    gap = col(1) * (1 - t**2)
    inside_x = _soft((half - np.abs(u)) * 1.0, edge)
    lips = _soft(0.028 - np.abs(np.abs(v - centre) - gap), edge) * inside_x
    opening = _soft(gap - np.abs(v - centre), edge) * inside_x
    img = img * (1 - 0.55 * lips)
    img = img * (1 - 0.8 * opening)

    img = _occlude(img, u, v, rng, difficulty, edge)
    # Lighting from one side, sensor noise, downsample to 48x48.
    img = img * (1 + rnd(-0.35, 0.35) * difficulty * x)
    img = img.reshape(b, FER_SIZE, SUPERSAMPLE, FER_SIZE, SUPERSAMPLE).mean(axis=(2, 4))
    img = img + rng.standard_normal(img.shape).astype(np.float32) * rnd(0.01, 0.06) * difficulty
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _occlude(img, u, v, rng, difficulty, edge):
    """A hand or hair patch over part of the face (30%), or dark glasses (12%), scaled by difficulty."""
    b = img.shape[0]
    kind = rng.random(b)
    patch_p, glasses_p = 0.3 * difficulty, 0.12 * difficulty
    # A rectangle of random size and place, in face coordinates.
    px, py = rng.uniform(-0.7, 0.7, (b, 1, 1)), rng.uniform(-0.7, 0.7, (b, 1, 1))
    pw, ph = rng.uniform(0.15, 0.4, (b, 1, 1)), rng.uniform(0.15, 0.4, (b, 1, 1))
    rect = np.minimum(pw - np.abs(u - px), ph - np.abs(v - py))
    patch = (kind < patch_p)[:, None, None] * _soft(rect, edge)
    img = img * (1 - patch) + rng.uniform(0.1, 0.9, (b, 1, 1)) * patch
    lens = np.minimum(0.16 - np.abs(np.abs(u) - 0.29), 0.09 - np.abs(v + 0.16))
    glasses = ((kind >= patch_p) & (kind < patch_p + glasses_p))[:, None, None] * _soft(lens, edge)
    return img * (1 - 0.85 * glasses)


# ------------------------------------------------------------------------------------------ writers
def ids_for(n: int) -> list[str]:
    return [f"synth-{i:06d}" for i in range(n)]


def write_parquet_dataset(out: Path, images, labels, splits) -> None:
    """Write the prepared-data contract directly (no Ray): split=<S>/part-0.parquet."""
    import pyarrow.parquet as pq

    ids = np.array(ids_for(len(labels)))
    for split in USAGES:
        mask = splits == split
        if mask.any():
            (out / f"split={split}").mkdir(parents=True)
            pq.write_table(
                faces_table(ids[mask].tolist(), labels[mask], images[mask]), out / f"split={split}" / "part-0.parquet"
            )


def write_csv(path: Path, images, labels, splits, layout: str = "fer2013") -> None:
    """Kaggle fer2013.csv (emotion,pixels,Usage) or icml_face_data.csv (emotion, Usage, pixels)."""
    with open(path, "w") as f:
        f.write("emotion,pixels,Usage\n" if layout == "fer2013" else "emotion, Usage, pixels\n")
        for img, label, split in zip(images, labels, splits):
            pixels = " ".join(map(str, img.ravel().tolist()))
            f.write(f"{label},{pixels},{split}\n" if layout == "fer2013" else f"{label},{split},{pixels}\n")


def _image_paths(labels, splits) -> list[str]:
    folder = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
    return [f"{folder[s]}/{EMOTIONS[label]}/{s}_{i}.png" for i, (label, s) in enumerate(zip(labels, splits))]


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, images, labels, splits) -> None:
    for rel, img in zip(_image_paths(labels, splits), images):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(img))


def write_zip(path: Path, images, labels, splits, top: str = "fer2013") -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for rel, img in zip(_image_paths(labels, splits), images):
            zf.writestr(f"{top}/{rel}", _png(img))


FORMATS = ("parquet", "csv", "icml-csv", "folder", "zip")


def synthesize(out: str | os.PathLike, spec: SynthSpec, fmt: str = "parquet", overwrite: bool = False) -> dict:
    """Write a synthetic dataset to `out` in `fmt`; returns a description (the manifest for parquet)."""
    from ferray.data.contract import atomic_output, build_manifest, write_manifest

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    images, labels, splits = generate(spec)
    source = {
        "kind": "synthetic",
        "n": spec.n,
        "seed": spec.seed,
        "balance": spec.balance,
        "difficulty": spec.difficulty,
    }
    with atomic_output(out, overwrite=overwrite, kind="synthetic faces") as tmp:
        if fmt == "parquet":
            write_parquet_dataset(tmp, images, labels, splits)
            manifest = build_manifest(tmp, source=source)
            write_manifest(tmp, manifest)
        elif fmt in ("csv", "icml-csv"):
            name = "fer2013.csv" if fmt == "csv" else "icml_face_data.csv"
            write_csv(tmp / name, images, labels, splits, "fer2013" if fmt == "csv" else "icml")
        elif fmt == "folder":
            write_folder(tmp, images, labels, splits)
        else:
            write_zip(tmp / "fer2013.zip", images, labels, splits)
    counts = {s: int((splits == s).sum()) for s in USAGES}
    return manifest if fmt == "parquet" else {"source": source, "format": fmt, "splits": counts}
