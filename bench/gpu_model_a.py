"""Model A on FER2013 on one GPU, Ray-free, inside a fixed time budget. One command, from the repo root:

    python -m bench.gpu_model_a [--minutes 8] [--data DIR] [--private fer2013.csv] [--out gpu-model-a]
    python -m bench.gpu_model_a --smoke        # a CPU check of every path: a subset, a tiny model, ~1 min

Reads FER2013 with ferray's Ray-free readers (Validation carved from Training as `ferray prepare`
carves it when there is no PrivateTest), keeps every face on the GPU as uint8, augments there, and
trains experiments/model_a_gpu.yaml through the core loop (ferray.fit): bf16 autocast,
channels_last, torch.compile (CUDA graphs: at batch 64 the step is launch bound; eager if compiling
fails, said in the output and the JSON). --minutes is the training time: the epochs that fit, the
cosine schedule planned over them. The best epoch is chosen on the selection split; then every test
split (PublicTest, and PrivateTest from --private) is evaluated with and without ten-crop TTA.
OUT/result.json is rewritten after every epoch and every evaluation: a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import REPO, add_common_args, device_and_flags, load_data, overrides

SMOKE = ["model.name=xception_a_tiny", "train.batch_size=32", "train.compile=false"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "gpu-model-a", minutes=8.0)
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "model_a_gpu.yaml")
    args = parser.parse_args()

    from ferray.config import load_runnable_config
    from ferray.local import evaluate_tests, train_local

    device, name = device_and_flags()
    out = args.out.absolute()
    splits, tests = load_data(args, out)
    selection = splits["selection"]
    cfg = load_runnable_config(
        args.experiment, [f"data.path={splits['data']}", f"data.selection_split={selection}", *overrides(args, SMOKE)]
    )
    print(
        f"data: {', '.join(f'{len(f):,} {s}' for s, f in splits.items() if s not in ('data', 'selection'))} faces "
        f"from {splits['data']}; selecting on {selection}, testing on {', '.join(tests)}; device {name}; "
        f"{cfg.model.name}, up to {cfg.train.epochs} epochs in {args.minutes:g} min",
        flush=True,
    )
    state, run = train_local(
        cfg,
        splits["Training"],
        splits[selection],
        device,
        out,
        facts={
            "made_by": " ".join(["python -m bench.gpu_model_a", *sys.argv[1:]]),
            "smoke": args.smoke,
            "test_splits": list(tests),
        },
    )
    results = evaluate_tests(state, run, tests, device)
    summary = run.write_result(state, tests=results)
    print(
        f"done: {summary.epochs} epochs in {summary.train_seconds / 60:.1f} min (compile {summary.facts['compile']}); "
        f"best epoch {summary.best_epoch}, {selection} (selection) {summary.best_value:.2%}; "
        + "; ".join(f"{s} {r['center']['accuracy']:.2%}, TTA {r['tta']['accuracy']:.2%}" for s, r in results.items())
        + f"; {out / 'result.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
