"""How FER2013 frames its faces against MTCNN's box: the square a detected face is cropped to.

    python -m bench.landmarks --data data/fer2013 [--split Training] [--faces 400] [--seed 0]

Each of `--faces` random faces of the split (Training: the test splits stay untouched) is enlarged
4x and padded with its own edges (MTCNN needs the face smaller than the image), searched upright by
ferray's MTCNN; its box and five landmarks (eyes, nose, mouth corners) mapped back to 48x48 pixels.
Prints how many were found; the 48x48 square's side in box sides and its centre's offset from the
box's, in box sides (medians: ferray.faces.FER_BOX_SIDE and FER_BOX_OFFSET hold them), with their
spread; and the landmarks' mean, median and spread (how much FER2013's own framing varies).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SCALE, PAD = 4, 48  # enlarged to 192x192, then 48 px of edge on each side


def found_in(face: np.ndarray):
    """MTCNN's detection of a 48x48 face with its box and landmarks in the face's own pixels, or
    None where it finds no face."""
    import cv2

    from ferray import mtcnn

    big = cv2.resize(face, (48 * SCALE, 48 * SCALE), interpolation=cv2.INTER_CUBIC)
    big = cv2.copyMakeBorder(big, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE)
    found = mtcnn.detect(big, min_face=60, turns=(0.0,))
    if not found:
        return None
    x, y, w, h = found[0].box
    box = ((x - PAD) / SCALE, (y - PAD) / SCALE, w / SCALE, h / SCALE)
    return mtcnn.Detection(box, found[0].score, (found[0].landmarks - PAD) / SCALE)


def square_in_box_units(box) -> tuple[float, float, float]:
    """The 48x48 square against a box (x, y, w, h): its side in box sides, and its centre's offset
    from the box's (x, y) in box sides."""
    x, y, w, h = box
    side = max(w, h)
    return 48 / side, (24 - (x + w / 2)) / side, (24 - (y + h / 2)) / side


def main() -> int:
    import cv2

    from ferray.data.contract import load_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared FER2013 folder")
    parser.add_argument("--split", default="Training")
    parser.add_argument("--faces", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    images, _, _ = load_split(args.data, args.split)
    chosen = np.random.default_rng(args.seed).choice(len(images), min(args.faces, len(images)), replace=False)
    t0 = time.perf_counter()
    found = [detection for detection in map(found_in, images[chosen]) if detection is not None]
    seconds = time.perf_counter() - t0
    print(f"{len(found)} of {len(chosen)} {args.split} faces found ({seconds / len(chosen) * 1000:.0f} ms each)")
    framing = np.array([square_in_box_units(d.box) for d in found])
    side, dx, dy = np.median(framing, 0)
    low, high = np.percentile(framing[:, 0], [25, 75])
    print(f"the square: {side:.3f} box sides (middle half {low:.3f}-{high:.3f}), centre offset ({dx:+.3f}, {dy:+.3f})")
    print(f"FER_BOX_SIDE = {side:.3f}\nFER_BOX_OFFSET = ({dx:.3f}, {dy:.3f})")
    points = np.array([d.landmarks for d in found])
    names = ("left eye", "right eye", "nose", "left mouth", "right mouth")
    for name, mean, median, spread in zip(names, points.mean(0), np.median(points, 0), points.std(0)):
        print(
            f"{name:12s} mean ({mean[0]:5.2f}, {mean[1]:5.2f})  median ({median[0]:5.2f}, {median[1]:5.2f})  "
            f"sd ({spread[0]:.2f}, {spread[1]:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
