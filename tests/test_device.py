"""Precision and device choice: bf16 only where it is fast (Ray-free)."""

import pytest
import torch

from ferray import device


def test_bf16_flags_are_read_from_cpuinfo():
    assert device.flags_have_bf16("processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert device.flags_have_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not device.flags_have_bf16("flags\t\t: fpu sse avx2 fma avx512f\n")  # AVX-512 without bf16
    assert not device.flags_have_bf16("no flags line here\n")
    assert device.flags_in("processor: 0\nflags : fpu avx2 avx_vnni\nflags : other\n") == {"fpu", "avx2", "avx_vnni"}


@pytest.mark.parametrize("native", [True, False])
def test_cpu_uses_bf16_only_when_native_and_asked(monkeypatch, native):
    monkeypatch.setenv("FERRAY_CPU_BF16", "1" if native else "0")
    device.cpu_has_native_bf16.cache_clear()
    try:
        assert device.use_bf16("cpu") is native
        assert device.use_bf16("cpu", requested=False) is False  # train.amp: false forces fp32
    finally:
        device.cpu_has_native_bf16.cache_clear()


def test_autocast_switches_matmul_precision():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with device.autocast("cpu", True):
        assert (x @ w).dtype == torch.bfloat16
    with device.autocast("cpu", False):
        assert (x @ w).dtype == torch.float32


def test_cpu_buffer_setting_is_applied_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    device.keep_cpu_buffers.cache_clear()
    monkeypatch.setenv("FERRAY_CPU_MALLOC", "0")
    assert device.keep_cpu_buffers() is False
    device.keep_cpu_buffers.cache_clear()
    monkeypatch.delenv("FERRAY_CPU_MALLOC")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert device.keep_cpu_buffers() is glibc
    device.keep_cpu_buffers.cache_clear()


def test_the_cpu_bench_counts_a_convolution_as_two_flops_per_multiply_add():
    from bench.cpu_infer import ceiling, model_flops

    conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    assert model_flops(conv, 44) == 2 * 8 * 9 * 44 * 44
    # A machine at 1 GFLOP/s and a 1 MFLOP model: 1000 faces/s, 1 ms per face, the 800 faces/s target 0.8 GFLOP/s.
    text = ceiling(1e6, 1e9)
    assert "at best 1000 faces/s, one face 1.0 ms, ten crops 10.0 ms" in text and "800 faces/s 1 GFLOP/s" in text


def test_cpu_training_workers_keep_glibc_to_one_arena(monkeypatch):
    """Ray Train's loop runs in a thread; its own glibc arena gave up freed buffers (76 against 91 img/s)."""
    import platform

    from ferray.device import cpu_worker_env

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("FERRAY_CPU_MALLOC", raising=False)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert cpu_worker_env(0) == ({"MALLOC_ARENA_MAX": "1"} if glibc else {})
    assert cpu_worker_env(1) == {}  # a GPU worker's hot loop is on the device
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cpu_worker_env(0) == {}  # the user's own setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("FERRAY_CPU_MALLOC", "0")
    assert cpu_worker_env(0) == {}


def test_a_process_without_ray_uses_a_gpu_where_there_is_one(monkeypatch):
    from ferray.device import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device().type == "cuda"  # no Ray here (or a driver): the machine's GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device().type == "cpu"


def test_a_ray_actor_that_reserved_no_gpu_computes_on_the_cpu(ray_session):
    """Ray leaves the GPUs visible to a `num_gpus=0` actor: with CUDA faked available there, ferray
    still picks the CPU, as it must for Serve replicas and upscaling actors that reserved none."""
    import ray

    @ray.remote(num_gpus=0, num_cpus=0.1)
    class Probe:
        def device(self) -> str:
            import torch

            from ferray.device import default_device

            torch.cuda.is_available = lambda: True  # this actor's process only
            return default_device().type

    probe = Probe.remote()
    try:
        assert ray.get(probe.device.remote()) == "cpu"
    finally:
        ray.kill(probe)


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpus_use_bf16_only_with_bf16_hardware(monkeypatch, capability, native):
    # torch.cuda.is_bf16_supported() says yes on a T4 or V100 (emulated, slower than fp32).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.use_bf16("cuda") is native
    name = device.precision_name("cuda", device.use_bf16("cuda"))
    if native:
        assert name == "bf16 autocast on cuda"
    else:
        assert name == f"fp32 on cuda (compute capability {capability[0]}.{capability[1]}: bf16 would be emulated)"


def test_fast_cuda_math_is_set_on_a_gpu_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    device.fast_cuda_math("cpu")
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    device.fast_cuda_math("cuda")  # no GPU is needed to set the flags
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32


def test_the_gpu_benches_name_the_packages_they_lack(monkeypatch):
    import importlib.util

    from bench import common

    real = importlib.util.find_spec
    lacking = ("pyarrow", "yaml")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in lacking else real(name))
    with pytest.raises(SystemExit, match=r"need pyarrow, pyyaml beside PyTorch: pip install pyarrow pyyaml"):
        common.device_and_flags()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert common.device_and_flags()[0].type in ("cpu", "cuda")
