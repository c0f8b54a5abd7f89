"""What ASHA saves: the same budget of trials with and without early stopping.

    python -m bench.tune_efficiency [--samples 6] [--epochs 4] [--n 1400]

Runs experiments/debug_tune.yaml (Model A's layout at 1/8 width, lr and center-loss lambda by
Optuna TPE with the same seed) on synthetic faces twice: with ASHA (grace period 1, reduction
factor 2) and with no early stopping. Prints the best PublicTest accuracy each reached, the total
trial-epochs each spent, their wall time, and the saving.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n", type=int, default=1400, help="synthetic faces")
    args = parser.parse_args()

    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.tune import load_search, run_search

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "faces", SynthSpec(n=args.n, seed=0))
        results = {}
        for label, asha in (("ASHA", True), ("no early stopping", False)):
            spec = load_search(
                REPO / "experiments" / "debug_tune.yaml", [f"data.path={tmp / 'faces'}", f"train.epochs={args.epochs}"]
            )
            spec.samples, spec.max_concurrent = args.samples, 2
            spec.name = "asha" if asha else "fifo"
            if not asha:
                spec.asha = None
            results[label] = run_search(spec, tmp / "runs")
    print(f"{args.samples} trials x up to {args.epochs} epochs of debug_a on {args.n:,} synthetic faces, 2 at a time")
    for label, r in results.items():
        print(
            f"  {label:<18} best PublicTest {float(r['best']['eval_acc']):6.2%}   trial-epochs "
            f"{r['trial_epochs']:3d}   "
            f"stopped early {r['stopped_early']}   {r['seconds']:6.0f} s"
        )
    asha, fifo = results["ASHA"], results["no early stopping"]
    print(
        f"ASHA spent {asha['trial_epochs'] / fifo['trial_epochs']:.0%} of the trial-epochs "
        f"({1 - asha['trial_epochs'] / fifo['trial_epochs']:.0%} saved) and {asha['seconds'] / fifo['seconds']:.0%} of "
        f"the time, for a best accuracy {float(asha['best']['eval_acc']) - float(fifo['best']['eval_acc']):+.2%} "
        f"from the full search's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
