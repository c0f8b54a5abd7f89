"""`ferray sr upscale` throughput: 1 and 2 actors, against a plain single-process loop.

    python -m bench.upscale_scaling [--n 4000] [--channels 32] [--blocks 4] [--batch-size 128]

The same generator (a checkpoint written by this script; throughput does not depend on the
weights) upscales the same prepared synthetic faces 48 -> 96: through the Ray Data actor pool with
1 actor and with 2 actors (one CPU thread each), and through `upscale_local`, the plain loop, with
one thread. Each is run on n and on 2n faces: the marginal rate n / (t(2n) - t(n)) is the
steady-state throughput, without the fixed costs (the pool's actors starting and importing torch,
about 10 s here); the end-to-end rate on 2n faces is printed too. Ray's own start-up is excluded.
Targets: 2 actors >= 1.7x one actor; 1 actor >= the plain loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_generator(path: Path, channels: int, blocks: int) -> None:
    from ferray.config import load_config
    from ferray.sr import engine as sr_engine

    cfg = load_config(
        None,
        [
            f"sr.generator_channels={channels}",
            f"sr.generator_blocks={blocks}",
            "sr.discriminator_channels=8",
            "sr.content=mse",
        ],
    )
    sr_engine.save_sr_checkpoint(path, sr_engine.build_sr_state(cfg, torch.device("cpu")), {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="synthetic faces (n, then 2n)")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.runtime import connect
    from ferray.distributed.upscale import upscale
    from ferray.sr.inference import upscale_local

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in (args.n, 2 * args.n):
            synthesize(tmp / f"faces{n}", SynthSpec(n=n, seed=0))
        write_generator(tmp / "g.pt", args.channels, args.blocks)
        torch.set_num_threads(1)
        runs = {}

        def plain(n):
            upscale_local(tmp / f"faces{n}", tmp / f"local{n}", "srgan", str(tmp / "g.pt"), args.batch_size)

        def pool(actors):
            def run(n):
                manifest = upscale(
                    tmp / f"faces{n}",
                    tmp / f"ray{actors}-{n}",
                    "srgan",
                    str(tmp / "g.pt"),
                    actors=actors,
                    batch_size=args.batch_size,
                )
                assert manifest["rows"] == n

            return run

        runs["plain loop (1 process)"] = plain
        connect(progress=False)
        upscale(tmp / f"faces{args.n}", tmp / "warm", "bicubic", actors=2)  # Ray start-up
        runs["ray, 1 actor"], runs["ray, 2 actors"] = pool(1), pool(2)
        timings = {}
        for name, run in runs.items():
            timings[name] = []
            for n in (args.n, 2 * args.n):
                t0 = time.perf_counter()
                run(n)
                timings[name].append(time.perf_counter() - t0)
    print(
        f"generator {args.channels} ch x {args.blocks} blocks, {args.n:,} and {2 * args.n:,} faces 48 -> 96, "
        f"batch {args.batch_size}, 1 thread per worker"
    )
    marginal = {}
    for name, (t1, t2) in timings.items():
        marginal[name] = args.n / max(t2 - t1, 1e-9)
        print(
            f"  {name:<24} {t1:7.1f} s / {t2:7.1f} s   steady {marginal[name]:7.1f} img/s   "
            f"end-to-end {2 * args.n / t2:7.1f} img/s"
        )
    one, two, loop = marginal["ray, 1 actor"], marginal["ray, 2 actors"], marginal["plain loop (1 process)"]
    print(
        f"2 actors / 1 actor = {two / one:.2f}x (target >= 1.7x); 1 actor / plain loop = {one / loop:.2f}x "
        f"(target >= 1.0x)  [steady state]"
    )
    end = {name: 2 * args.n / t[1] for name, t in timings.items()}
    print(
        f"end-to-end on {2 * args.n:,} faces: 2 actors / 1 actor = {end['ray, 2 actors'] / end['ray, 1 actor']:.2f}x; "
        f"1 actor / plain loop = {end['ray, 1 actor'] / end['plain loop (1 process)']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
