"""How a training step computes: bf16 autocast where the hardware has bf16 (CPUs with AVX512-BF16
or AMX, GPUs of compute capability >= 8.0), fp16 autocast with a gradient scaler on GPUs that have
fp16 tensor cores but emulate bf16 (V100 7.0, T4 7.5), fp32 everywhere else.

fp16's range is narrow (largest 65504, smallest normal 6e-5): small gradients underflow to zero, so
the loss is multiplied by a scale before the backward and the gradients divided by it before the
step; a step whose gradients overflowed is skipped and the scale halved (torch.amp.GradScaler).
bf16 has fp32's range and needs none of that."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ferray.device import use_bf16

# fp16 tensor cores arrived with Volta (compute capability 7.0); below it fp16 is no faster than fp32
FP16_TENSOR_CORES = (7, 0)


def autocast_dtype(device: torch.device | str, requested: bool = True) -> torch.dtype | None:
    """The dtype a training step autocasts to on `device` (None: fp32), where `requested` (train.amp)."""
    device = torch.device(device)
    if not requested:
        return None
    if use_bf16(device):
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP16_TENSOR_CORES:
        return torch.float16
    return None


@dataclass
class Precision:
    """A training step's arithmetic: the autocast dtype and, for fp16, the gradient scaler."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def for_device(cls, device: torch.device | str, requested: bool = True) -> Precision:
        device = torch.device(device)
        return cls.of(device, autocast_dtype(device, requested))

    @classmethod
    def of(cls, device: torch.device | str, dtype: torch.dtype | None) -> Precision:
        device_type = torch.device(device).type
        scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
        return cls(device_type, dtype, scaler)

    @property
    def name(self) -> str:
        """For the run's card (machine.json's "precision")."""
        if self.dtype is None:
            return f"fp32 on {self.device_type}"
        kind = "bf16 autocast" if self.dtype == torch.bfloat16 else "fp16 autocast with a gradient scaler"
        return f"{kind} on {self.device_type}"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients in their true units (before clipping them by norm)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer's step; False where fp16 gradients overflowed and the step was skipped."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale falls only after a skipped step

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
