"""Where and in which precision the core computes (Ray-free).

bf16 autocast pays off on CUDA and on CPUs that do bf16 in hardware (AVX512-BF16, AMX), where it
nearly doubles Model A's training rate (bench/cpu_train.py). On CPUs without it (AVX2-only machines,
most laptops) oneDNN emulates bf16 and is slower than fp32, so there the fast path is fp32.
`train.amp: false` forces fp32 everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


# glibc mallopt parameters (malloc.h) and the values ferray sets on CPU: see keep_cpu_buffers.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30


def default_device() -> torch.device:
    """CUDA where this process may use a GPU, else the CPU. A Ray task, actor or Serve replica may use
    one only if Ray assigned it one: Ray no longer hides the GPUs from a process that reserved none,
    and a replica or upscaling actor of `num_gpus=0` on a GPU node would take a GPU that another
    process reserved."""
    if not torch.cuda.is_available() or in_ray_worker_without_gpu():
        return torch.device("cpu")
    return torch.device("cuda")


def in_ray_worker_without_gpu() -> bool:
    """Whether this process is a Ray worker (not a driver) that Ray assigned no GPU. Ray is looked up
    only where it is loaded already: the core never imports it."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.worker.mode != ray._private.worker.WORKER_MODE:
        return False  # a driver (the CLI, a notebook) sees the machine's GPUs
    return not context.get_accelerator_ids().get("GPU")


def flags_in(cpuinfo: str) -> set[str]:
    """The instruction-set flags a /proc/cpuinfo text lists (its first CPU's)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[-1].split())
    return set()


def flags_have_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text lists a native bf16 instruction set."""
    return bool(flags_in(cpuinfo) & BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags; empty where there is no /proc/cpuinfo to read (macOS, Windows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return frozenset()
    return frozenset(flags_in(cpuinfo.read_text(errors="replace")))


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Native bf16 on this CPU. FERRAY_CPU_BF16=0/1 overrides the detection (where no flags can be
    read, fp32 is never wrong)."""
    forced = os.environ.get("FERRAY_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def use_bf16(device: torch.device | str, requested: bool = True) -> bool:
    """bf16 autocast for this device: asked for, and fast there."""
    device = torch.device(device)
    if not requested:
        return False
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


# bf16 tensor cores arrived with Ampere (compute capability 8.0). Older GPUs (T4 7.5, V100 7.0) run
# bf16 autocast by emulation, slower than fp32, though torch.cuda.is_bf16_supported() says yes.
NATIVE_BF16_CAPABILITY = (8, 0)


def cuda_has_native_bf16(device: torch.device | str = "cuda") -> bool:
    """Whether this GPU computes bf16 in hardware (compute capability >= 8.0)."""
    return torch.cuda.get_device_capability(torch.device(device)) >= NATIVE_BF16_CAPABILITY


def fast_cuda_math(device: torch.device | str) -> None:
    """cuDNN's autotuner and TF32 matmuls and convolutions, on a CUDA device (a no-op elsewhere).
    Every path that computes on a GPU sets these (Ray workers, Serve replicas, upscaling actors,
    bench/gpu_*): ferray's batch shapes are fixed, so autotuning pays after the first batches."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@functools.lru_cache(maxsize=1)
def keep_cpu_buffers() -> bool:
    """Let glibc keep freed activation buffers for reuse instead of returning them to the kernel.

    By default glibc serves every block over a (dynamic) threshold with a fresh mmap and unmaps it
    on free, and trims the heap top after frees: a CPU forward allocates and frees the same
    activation sizes every call, so each call page-faults its buffers in again: a large forward then
    spends more time in the kernel than computing. With these settings (and forwards in slices of 32
    crops) the buffers are reused. A process-wide setting, made once, on first CPU use (never at import);
    glibc only (elsewhere, and with FERRAY_CPU_MALLOC=0, a no-op). Returns whether it was applied."""
    if os.environ.get("FERRAY_CPU_MALLOC") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def cpu_worker_env(gpus_per_worker: float) -> dict:
    """Environment variables for the process of a CPU training worker: glibc's malloc kept to one
    arena (MALLOC_ARENA_MAX=1), where `keep_cpu_buffers` applies.

    Ray Train runs the training loop in a thread of its worker, and glibc gives each thread its own
    arena, whose heaps return freed activation buffers to the kernel whatever the thresholds say,
    and the loop runs well below its rate outside Ray (docs/benchmarks.md). Read by glibc when the
    process starts, so it goes into the worker's runtime_env, not mallopt. None for GPU workers
    (their hot loop is on the device), with FERRAY_CPU_MALLOC=0, or where the user set
    MALLOC_ARENA_MAX."""
    if gpus_per_worker or os.environ.get("FERRAY_CPU_MALLOC") == "0" or "MALLOC_ARENA_MAX" in os.environ:
        return {}
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {}
    return {"MALLOC_ARENA_MAX": "1"}


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on `device` when enabled, else a no-op context."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def precision_name(device: torch.device | str, bf16: bool) -> str:
    """How a run computes, for its card: on a GPU without bf16 hardware it says why fp32."""
    device = torch.device(device)
    name = f"{'bf16 autocast' if bf16 else 'fp32'} on {device.type}"
    if device.type == "cuda" and not bf16 and torch.cuda.is_available() and not cuda_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        name += f" (compute capability {major}.{minor}: bf16 would be emulated)"
    return name


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts(device: torch.device | str, bf16: bool, precision: str | None = None) -> dict:
    """What a result needs to say about where it was measured; `precision` names how training
    computed (ferray.precision.Precision.name), else bf16 autocast or fp32 from `bf16`."""
    device = torch.device(device)
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "native_bf16_cpu": cpu_has_native_bf16(),
        "accelerator": accelerator,
        "precision": precision or precision_name(device, bf16),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.platform(terse=True),
    }


def training_machine_facts(state) -> dict:
    """machine_facts for a training state (a classifier's names its Precision; the SRGAN's trains in
    fp32)."""
    precision = getattr(state, "precision", None)
    return machine_facts(state.device, bool(getattr(state, "use_amp", False)), getattr(precision, "name", None))


def code_version() -> str | None:
    """The git commit of the ferray source in use (+dirty when it has uncommitted changes); None
    outside a git checkout (an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "ferray"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it; None where there is no nvidia-smi."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def gpu_problem(driver: str | None = None) -> str | None:
    """Why torch cannot compute on this machine's GPU, in a sentence a node's setup log can show;
    None where it can. Without this check a node whose driver is too old for torch's CUDA trains on
    its CPU, quietly and many times slower."""
    if torch.cuda.is_available():
        return None
    driver = driver or driver_version()
    where = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver (nvidia-smi not found)"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use this machine's GPU: {where}. "
        "A driver new enough for that CUDA is needed (cluster.yaml: the ImageId of each node type)"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m ferray.device --require-gpu`: exit 1 with the reason where torch cannot use the GPU
    (cluster.yaml runs it on every node that has one)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ferray.device", description=main.__doc__)
    parser.add_argument("--require-gpu", action="store_true", help="fail unless torch can compute on a GPU here")
    args = parser.parse_args(argv)
    problem = gpu_problem() if args.require_gpu else None
    if problem:
        print(problem, file=sys.stderr)
        return 1
    device = default_device()
    for key, value in machine_facts(device, use_bf16(device)).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
