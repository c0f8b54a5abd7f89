"""How training computes: bf16 where the hardware has it, fp16 with a gradient scaler on GPUs with
fp16 tensor cores only (V100, T4), fp32 elsewhere; the scaler's step on the CPU (autocast to fp16
runs there too, so the arithmetic is tested without a GPU)."""

import math

import pytest
import torch
from test_engine import tiny_config

from ferray import device, engine
from ferray.precision import Precision, autocast_dtype


@pytest.mark.parametrize(
    ("capability", "dtype"),
    [
        ((6, 1), None),  # Pascal: no tensor cores
        ((7, 0), torch.float16),  # V100
        ((7, 5), torch.float16),  # T4
        ((8, 0), torch.bfloat16),  # A100
        ((9, 0), torch.bfloat16),  # H100
    ],
)
def test_gpus_train_in_bf16_with_bf16_hardware_and_in_fp16_with_fp16_tensor_cores(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert autocast_dtype("cuda") == dtype
    assert autocast_dtype("cuda", requested=False) is None  # train.amp=false: fp32 everywhere


def test_the_cpu_trains_in_bf16_only_with_native_bf16(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("cpu") is None
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("cpu") == torch.bfloat16


def test_the_run_card_names_the_precision():
    assert Precision.of("cpu", None).name == "fp32 on cpu"
    assert Precision.of("cpu", torch.bfloat16).name == "bf16 autocast on cpu"
    fp16 = Precision.of("cpu", torch.float16)
    assert fp16.name == "fp16 autocast with a gradient scaler on cpu" and fp16.scaler is not None
    assert device.machine_facts("cpu", False, fp16.name)["precision"] == fp16.name


@pytest.fixture(scope="module")
def synth_tensors(synth_faces):
    images, labels, _ = synth_faces
    return torch.from_numpy(images[:32]), torch.from_numpy(labels[:32])


def fp16_state():
    state = engine.build_state(tiny_config("optim.weight_decay=0.05", "optim.grad_clip=5.0"), torch.device("cpu"))
    state.precision = Precision.of("cpu", torch.float16)
    return state


def test_fp16_with_a_gradient_scaler_trains(synth_tensors):
    x, y = synth_tensors
    state = fp16_state()
    batch = engine.TensorBatches(x, y, 32)
    losses = [engine.train_one_epoch(state, batch, 1)["train_loss"] for _ in range(15)]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_an_overflowed_fp16_step_is_skipped_with_its_decay_and_the_scale_halves(synth_tensors):
    x, y = synth_tensors
    state = fp16_state()
    state.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # any gradient overflows
    before = [p.detach().clone() for p in state.core.parameters()]
    engine.train_one_epoch(state, engine.TensorBatches(x, y, 32), 1)
    assert all(torch.equal(a, p) for a, p in zip(before, state.core.parameters(), strict=True))
    assert state.precision.scaler.get_scale() == 2.0**119


def test_the_scale_is_kept_in_the_checkpoint_and_restored(tmp_path, synth_tensors):
    x, y = synth_tensors
    state = fp16_state()
    state.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    batches = engine.TensorBatches(x, y, 32)
    trained = engine.train_one_epoch(state, batches, 1)
    row = engine.end_epoch(state, trained, engine.evaluate(state.model, batches, 44, False, torch.device("cpu")))
    payload = torch.load(engine.save_checkpoint(tmp_path / "c.pt", state, row), weights_only=True)
    resumed = fp16_state()
    engine.restore_state(resumed, payload)
    assert resumed.precision.scaler.get_scale() == 2.0**119
