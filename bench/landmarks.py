"""Where FER2013's faces have their landmarks: the template a detected face is aligned to.

    python -m bench.landmarks --data data/fer2013 [--split Training] [--faces 400] [--seed 0]

Each of `--faces` random faces of the split (Training: the test splits stay untouched) is enlarged
4x and padded with its own edges (MTCNN needs the face smaller than the image), searched upright by
ferray's MTCNN, and its five landmarks (eyes, nose, mouth corners) mapped back to 48x48 pixels.
Prints how many were found, their mean (ferray.faces.FER_LANDMARKS holds it), median and spread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SCALE, PAD = 4, 48  # enlarged to 192x192, then 48 px of edge on each side


def landmarks_of(face: np.ndarray):
    """The five landmarks of a 48x48 face in its own pixels, or None where MTCNN finds no face."""
    import cv2

    from ferray import mtcnn

    big = cv2.resize(face, (48 * SCALE, 48 * SCALE), interpolation=cv2.INTER_CUBIC)
    big = cv2.copyMakeBorder(big, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE)
    found = mtcnn.detect(big, min_face=60, turns=(0.0,))
    return (found[0].landmarks - PAD) / SCALE if found else None


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
    found = [points for points in map(landmarks_of, images[chosen]) if points is not None]
    seconds = time.perf_counter() - t0
    points = np.array(found)
    print(f"{len(found)} of {len(chosen)} {args.split} faces found ({seconds / len(chosen) * 1000:.0f} ms each)")
    names = ("left eye", "right eye", "nose", "left mouth", "right mouth")
    for name, mean, median, spread in zip(names, points.mean(0), np.median(points, 0), points.std(0)):
        print(
            f"{name:12s} mean ({mean[0]:5.2f}, {mean[1]:5.2f})  median ({median[0]:5.2f}, {median[1]:5.2f})  "
            f"sd ({spread[0]:.2f}, {spread[1]:.2f})"
        )
    print("FER_LANDMARKS = np.array(" + str(np.round(points.mean(0), 2).tolist()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
