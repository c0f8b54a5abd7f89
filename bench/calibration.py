"""Which calibration of a bundle's probabilities holds on the untouched test split.

    python -m bench.calibration [--bundle default] [--data data/fer2013] [--cache DIR] [--resamples 1000]

Computes the members' probabilities (the card's views: ten-crop TTA where the card says so) on the
selection split and every untouched split once (cached in --cache, outside the checkout: they are
derived from FER2013), then fits on the selection split and scores on each split:
  none           w * P_A + (1 - w) * P_B as fitted, no temperature
  fused T        then one temperature of the fused output (what `ferray ensemble` ships)
  member T       a temperature per member first, the weight refitted on the calibrated members
  member + fused both
The calibration error (ECE, 15 bins) of each, its 95% bootstrap interval, and the bootstrap interval
of its difference from "none" on the same resampled faces, so that a rise or fall can be told from
the noise of a few thousand faces. Log-loss (NLL) is printed too: the temperatures minimise it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from ferray.bundle.fusion import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    fit_weights,
    fuse,
    score,
)


def member_probs(bundle: str, data: Path, split: str, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P_A, P_B, labels) of `split`, from the cache when this bundle and split were seen before."""
    from ferray.bundle.load import load_bundle, read_bundle_card, resolve_bundle
    from ferray.data.contract import load_split

    folder = resolve_bundle(bundle)
    card = read_bundle_card(folder)
    files = [folder / card.members[name].checkpoint for name in ("a", "b")]
    key = hashlib.blake2b(b"".join(path.read_bytes() for path in files), digest_size=8).hexdigest()
    path = cache / f"{key}-{split}.npz"
    faces, labels, _ = load_split(data, split)
    if path.exists():
        saved = np.load(path)
        return saved["pa"], saved["pb"], labels
    ensemble, _ = load_bundle(folder, members=("a", "b"))
    print(f"members on {len(labels):,} {split} faces (TTA {ensemble.tta}) ...", flush=True)
    with torch.inference_mode():
        probs = ensemble.member_probs(torch.from_numpy(faces))
    pa, pb = probs["a"].float().numpy(), probs["b"].float().numpy()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, pa=pa, pb=pb)
    return pa, pb, labels


def schemes(pa: np.ndarray, pb: np.ndarray, labels: np.ndarray) -> dict:
    """Each scheme as a function of (P_A, P_B), every parameter fitted on (pa, pb, labels)."""

    def mix(a, b, weights):
        return fuse({"a": a, "b": b}, weights)

    weights = fit_weights({"a": pa, "b": pb}, labels)
    t_fused = fit_temperature(mix(pa, pb, weights), labels)
    t_a, t_b = fit_temperature(pa, labels), fit_temperature(pb, labels)
    weights_m = fit_weights({"a": calibrate(pa, t_a), "b": calibrate(pb, t_b)}, labels)
    t_both = fit_temperature(mix(calibrate(pa, t_a), calibrate(pb, t_b), weights_m), labels)
    print(
        f"fitted: w {weights}, T fused {t_fused:.3f}; T_A {t_a:.3f}, T_B {t_b:.3f}, w {weights_m}, then T {t_both:.3f}"
    )
    return {
        "none": lambda a, b: mix(a, b, weights),
        "fused T": lambda a, b: calibrate(mix(a, b, weights), t_fused),
        "member T": lambda a, b: mix(calibrate(a, t_a), calibrate(b, t_b), weights_m),
        "member + fused": lambda a, b: calibrate(mix(calibrate(a, t_a), calibrate(b, t_b), weights_m), t_both),
    }


def bootstrap(probs: dict, labels: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """Per scheme: resampled ECEs and their differences from "none" (the same faces each time)."""
    rng = np.random.default_rng(seed)
    eces = {name: [] for name in probs}
    for _ in range(resamples):
        pick = rng.integers(0, len(labels), len(labels))
        for name, p in probs.items():
            eces[name].append(expected_calibration_error(p[pick], labels[pick]))
    return {name: np.array(values) for name, values in eces.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="default", help="a bundle folder with A and B (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=Path("data/fer2013"), help="a prepared FER2013 (ferray prepare)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ferray" / "calibration")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    from ferray.bundle.load import read_bundle_card, resolve_bundle
    from ferray.data.contract import read_manifest, untouched_splits

    card = read_bundle_card(resolve_bundle(args.bundle))
    if set(card.members) < {"a", "b"}:
        print(f"{args.bundle}: compares the schemes of members a and b; this bundle lacks one", file=sys.stderr)
        return 2
    selection = card.selection_split
    tests = untouched_splits(read_manifest(args.data), selection)
    pa, pb, labels = member_probs(args.bundle, args.data, selection, args.cache)
    fitted = schemes(pa, pb, labels)
    for split in [selection, *tests]:
        ta, tb, y = (pa, pb, labels) if split == selection else member_probs(args.bundle, args.data, split, args.cache)
        probs = {name: f(ta, tb) for name, f in fitted.items()}
        resampled = bootstrap(probs, y, args.resamples)
        role = "selection: fitted here" if split == selection else "untouched test"
        print(f"\n{split} ({len(y):,} faces, {role}); ECE 95% intervals from {args.resamples} bootstrap resamples")
        print(f"  {'scheme':<15} {'accuracy':>8} {'NLL':>7} {'ECE':>7} {'ECE interval':>17} {'minus none':>19}")
        for name, p in probs.items():
            accuracy, nll = score(p, y)
            low, high = np.percentile(resampled[name], [2.5, 97.5])
            d_low, d_high = np.percentile(resampled[name] - resampled["none"], [2.5, 97.5])
            print(
                f"  {name:<15} {accuracy:8.2%} {nll:7.4f} {expected_calibration_error(p, y):7.4f} "
                f"  [{low:.4f}, {high:.4f}]  [{d_low:+.4f}, {d_high:+.4f}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
