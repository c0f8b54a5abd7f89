"""The default model's cost on the CPU: one face, one face with ten-crop TTA, and a batch of 256,
each in fp32, on the fast path and in int8, in one run.

    python -m bench.cpu_infer [--bundle default] [--threads 2] [--repeats 30]

Times ferray's own inference (Ensemble.probs_a: preprocessing, the views, the model, softmax) on
random 48x48 faces, after warm-up: the median of --repeats calls for the single faces, the best
of 5 batches for the throughput. fp32: the model as trained, NCHW, without autocast; fast path: as
ferray serves it by default (batch norms folded into the convolutions, channels_last, a frozen bf16
copy where the CPU has native bf16: ferray.device); int8: as `--int8` / `model_a.int8` serve it,
where the bundle is calibrated (`ferray quantize`) and torchao is installed (its batch shapes are
compiled first; that time is printed, not counted). Targets on 2 threads: one face <= 5 ms (center
crop) and <= 20 ms (TTA); a batch of 256 >= 800 faces/s.

Last, the ceiling this CPU puts on each path: the model's FLOPs per crop (counted by torch) against
the machine's matrix-multiply rate in that path's precision, measured in the same run (the best a
dense kernel gets here), so a target above a ceiling is seen to need other arithmetic, not a faster kernel.

For a bundle with Model B (an ensemble), the same three figures for the whole ensemble on the
fast path (A, the SR generator's frozen fp32 copy, B, the fusion: Ensemble.predict), and for A alone (`members a`, the
rows above): targets one face with the served views <= 60 ms, a batch of 256 >= 100 faces/s; and
the SR generator's own cost, eager against the frozen copy ferray runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# issue 15's targets on 2 threads (Model A), issue 26's for an ensemble bundle
TARGET_ONE_MS, TARGET_TTA_MS, TARGET_FACES_PER_S = 5, 20, 800
TARGET_ENSEMBLE_SERVED_MS, TARGET_ENSEMBLE_FACES_PER_S = 60, 100


def timings(ensemble, repeats: int, forward=None) -> dict:
    """Median ms of one face (center crop, then ten-crop TTA) and the best faces/s of a batch of 256
    (center crop) through `forward` (default: the ensemble's first member alone, Model A in a paper bundle)."""
    forward = forward or (lambda faces: ensemble.probs(ensemble.names()[0], faces))
    one = torch.randint(0, 256, (1, 48, 48), dtype=torch.uint8)
    batch = torch.randint(0, 256, (256, 48, 48), dtype=torch.uint8)
    result = {}
    for tta in (False, True):
        ensemble.tta = tta
        for _ in range(3):
            forward(one)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward(one)
            times.append(time.perf_counter() - t0)
        result["tta_ms" if tta else "center_ms"] = 1000 * statistics.median(times)
    ensemble.tta = False
    forward(batch)
    best = min(_timed(forward, batch) for _ in range(5))
    result["batch_faces_per_s"] = len(batch) / best
    return result


def member_and_set_rows(bundle: str, repeats: int) -> None:
    """Each member alone (an SR member with the generator's upscaling), then each named set fused,
    on the fast path: the cost per face a user trades against accuracy with --members."""
    from ferray.bundle import answering_members, load_bundle, read_bundle_card

    card = read_bundle_card(bundle)
    if len(card.members) < 2:
        return
    served = "tta_ms" if card.tta else "center_ms"
    views = "ten-crop TTA" if card.tta else "center crop"
    rows = [(f"member {name}", (name,), True) for name in card.names()]
    rows += [(f"set {name}", answering_members(card, name), True) for name in card.sets]
    if card.tta and card.center_only:  # the baseline of the choice, in the same run
        rows.append(("set all, ten crops each", answering_members(card, "all"), False))
    for label, names, as_served in rows:
        ensemble, _ = load_bundle(bundle, "cpu", members=names)
        if not as_served:
            ensemble.center_only = frozenset()
        for member in ensemble.members.values():
            member.model = member.model.to(memory_format=torch.channels_last)
        r = timings(ensemble, repeats, forward=ensemble.predict)
        target = f" (target <= {TARGET_ENSEMBLE_SERVED_MS})" if names == card.names() and as_served else ""
        center = sorted(ensemble.center_only & set(names)) if card.tta else []
        served_as = f" (served: the center crop for {'+'.join(center)})" if center else ""
        print(
            f" {label:<16} ({'+'.join(names)}): one face {r['center_ms']:6.2f} ms, {views} {r[served]:6.2f} ms"
            f"{target}{served_as}, batch of 256 {r['batch_faces_per_s']:7.0f} faces/s",
            flush=True,
        )


def model_flops(model, crop: int) -> float:
    """Floating-point operations of one forward of one crop (a multiply-add counts two)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, crop, crop).to(memory_format=torch.channels_last))
    return float(counter.get_total_flops())


# the int8 x int8 -> int32 dot products torch._int_mm and the int8 path are built on
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def matmul_flops_per_s(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The CPU's rate on a large matrix multiply in `dtype` (best of `repeats`): a ceiling no conv net
    in that precision beats (bf16 where the fast path computes in bf16: the CPU's bf16 dot-product units;
    int8: int8 x int8 -> int32, the VNNI units the int8 path uses)."""
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (size, size), dtype=torch.int8) for _ in range(2))
        multiply = lambda x: torch._int_mm(x, b)  # noqa: E731
    else:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        multiply = lambda x: x @ b  # noqa: E731
    multiply(a)
    best = min(_timed(multiply, a) for _ in range(repeats))
    return 2 * size**3 / best


def ceiling(flops_per_crop: float, flops_per_s: float, precision: str = "fp32") -> str:
    need = {
        f"one face in {TARGET_ONE_MS} ms": flops_per_crop / (TARGET_ONE_MS / 1e3),
        f"ten crops in {TARGET_TTA_MS} ms": 10 * flops_per_crop / (TARGET_TTA_MS / 1e3),
        f"{TARGET_FACES_PER_S} faces/s": TARGET_FACES_PER_S * flops_per_crop,
    }
    return (
        f"ceiling: the model is {flops_per_crop / 1e6:.0f} MFLOPs per crop; this CPU multiplies {precision} "
        "matrices at "
        f"{flops_per_s / 1e9:.0f} GFLOP/s, so at best {flops_per_s / flops_per_crop:.0f} faces/s, one face "
        f"{1e3 * flops_per_crop / flops_per_s:.1f} ms, ten crops {1e4 * flops_per_crop / flops_per_s:.1f} ms; "
        "the targets need " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in need.items())
    )


def _timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="default", help="a bundle folder, or default (the model that ships)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import ferray.device as device
    from ferray.bundle import load_bundle, read_bundle_card

    torch.set_num_threads(args.threads)
    first = read_bundle_card(args.bundle).names()[0]  # the fast set's member: Model A in a paper bundle
    ensemble, card = load_bundle(args.bundle, "cpu", members=(first,))
    as_trained, _ = load_bundle(args.bundle, "cpu", members=(first,), fold=False)
    fast_bf16 = device.use_bf16("cpu")
    print(
        f"cpu: {device.cpu_model()}, {args.threads} threads; member {first}: {card.members[first].model} "
        f"({card.members[first].parameters:,} parameters) from {args.bundle}; fast path: channels_last"
        f"{' + bf16' if fast_bf16 else ' (no native bf16 here: fp32)'} + batch norms folded",
        flush=True,
    )
    rows = {}
    for name, variant, channels_last, bf16 in (
        ("fp32", as_trained, False, False),
        ("fast path", ensemble, True, fast_bf16),
    ):
        variant.members[first].model = variant.members[first].model.to(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        variant.bf16 = bf16
        rows[name] = timings(variant, args.repeats)
        _print_row(name, rows[name])
    int8 = int8_variant(args.bundle, first)
    if int8 is not None:
        rows["int8"] = timings(int8, args.repeats)
        _print_row("int8", rows["int8"])
    for name in [n for n in ("fast path", "int8") if n in rows]:
        print(
            f"{name} / fp32: batch {rows[name]['batch_faces_per_s'] / rows['fp32']['batch_faces_per_s']:.2f}x, "
            f"one face {rows['fp32']['center_ms'] / rows[name]['center_ms']:.2f}x"
        )
    flops = model_flops(ensemble.members[first].model, ensemble.members[first].cfg.augment.crop)
    precision = torch.bfloat16 if fast_bf16 else torch.float32
    print("fast path " + ceiling(flops, matmul_flops_per_s(dtype=precision), "bf16" if fast_bf16 else "fp32"))
    if int8 is not None and device.cpu_flags() & INT8_DOT_FLAGS:
        print("int8 " + ceiling(flops, matmul_flops_per_s(dtype=torch.int8), "int8"))
    elif int8 is not None:
        # torch._int_mm then runs a reference loop far slower than the int8 model's own kernels (oneDNN
        # widens u8 x s8 products on AVX2), so it bounds nothing
        print("int8 ceiling: not measured: this CPU has no int8 dot-product instructions (VNNI, AMX)")
    member_and_set_rows(args.bundle, args.repeats)
    generator_row(args.bundle, args.repeats)


def generator_row(bundle: str, repeats: int, faces: int = 16) -> None:
    """The SR generator, where the bundle has one: eager NCHW (the module as trained) against its
    frozen fp32 channels_last copy (what serving and `sr upscale` run), timed in turn."""
    from ferray.bundle import load_bundle

    ensemble, _ = load_bundle(bundle, "cpu")
    if ensemble.generator is None:
        return
    eager, _ = load_bundle(bundle, "cpu")
    eager.freeze = False
    batch = torch.randint(0, 256, (faces, 48, 48), dtype=torch.uint8)
    times = {"eager": [], "frozen": []}
    for variant in (eager, ensemble):
        variant.upscale(batch)
    for _ in range(repeats):
        for name, variant in (("eager", eager), ("frozen", ensemble)):
            times[name].append(_timed(variant.upscale, batch))
    eager_ms, frozen_ms = (1000 * statistics.median(times[name]) / faces for name in ("eager", "frozen"))
    print(
        f"SR generator ({faces} faces a call): eager NCHW {eager_ms:.2f} ms a face, frozen fp32 channels_last "
        f"{frozen_ms:.2f} ms a face ({eager_ms / frozen_ms:.2f}x)",
        flush=True,
    )


def int8_variant(bundle: str, member: str):
    """The bundle's `member` in int8 (ferray quantize), compiled for every batch shape it uses; None
    (and why, printed) where the member is not calibrated or torchao is missing."""
    from ferray.bundle import load_bundle
    from ferray.errors import FerrayError

    try:
        ensemble, _ = load_bundle(bundle, "cpu", members=(member,), int8=True)
    except FerrayError as error:
        print(f"     int8: not measured: {error}", flush=True)
        return None
    started = time.perf_counter()
    try:
        ensemble.warm_up(member)
    except FerrayError as error:
        print(f"     int8: not measured: {error}", flush=True)
        return None
    print(
        f"     int8: compiled its batch shapes in {time.perf_counter() - started:.0f} s "
        f"({ensemble.runner(member)[0].how})",
        flush=True,
    )
    return ensemble


def _print_row(name: str, r: dict) -> None:
    print(
        f"{name:>9}: one face {r['center_ms']:6.2f} ms (target <= {TARGET_ONE_MS}), ten-crop TTA "
        f"{r['tta_ms']:6.2f} ms (target <= {TARGET_TTA_MS}), batch of 256 {r['batch_faces_per_s']:7.0f} faces/s "
        f"(target >= {TARGET_FACES_PER_S})",
        flush=True,
    )


if __name__ == "__main__":
    main()
