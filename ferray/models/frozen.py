"""A trained network in the form CPU inference runs it: traced and frozen, channels_last (Ray-free).

Where the CPU has native bf16 (ferray.device.use_bf16), inference forwards a copy of each loaded
(batch-norm-folded) classifier whose weights are bf16 constants of a frozen TorchScript graph. On
one face most of the eager forward went to aten::mkldnn_convolution re-ordering every
convolution's weights into oneDNN's layout on every call, and to autocast re-casting them to bf16
(torch.profiler); freezing does both once, when the model is loaded, and lets oneDNN keep
prepacked weights. The SR generator forwards a frozen fp32 channels_last copy on every CPU: its
NCHW forward (a 9x9 convolution from one channel in, another to one channel out at 96x96) took
2.3x as long. Same answers as the eager forward, up to rounding (tests/test_ensemble.py);
bench/cpu_infer.py measures the classifier's speed against the model as trained.

TorchScript is deprecated upstream in favour of torch.compile, which compiles each batch shape for
far longer than a one-shot `ferray predict` runs: so tracing that fails (or a
torch without torch.jit) falls back to the copy run eagerly, and `how` says why.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn


class FrozenModule(nn.Module):
    """`graph(x)` with x cast to the graph's dtype and memory format; what it returns is in that
    dtype (a classifier's callers take .float() before the softmax)."""

    def __init__(self, graph, dtype: torch.dtype, how: str):
        super().__init__()
        self.graph, self.dtype, self.how = graph, dtype, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x.to(self.dtype).contiguous(memory_format=torch.channels_last))


def freeze_for_cpu(model: nn.Module, size: int, dtype: torch.dtype = torch.bfloat16) -> FrozenModule:
    """A frozen `dtype` copy of an eval-mode network that takes (N, 1, size, size) images (a
    classifier's crops, the SR generator's faces); the model itself is not touched. Falls back to
    the eager copy where tracing fails."""
    if model.training:
        raise ValueError("freeze_for_cpu: put the model in eval mode first")
    inference_copy = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last)
    example = torch.zeros(2, 1, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    precision = str(dtype).removeprefix("torch.")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": see the module note
            graph = torch.jit.freeze(torch.jit.trace(inference_copy, example))
            graph(example)  # the first call runs TorchScript's optimization passes: pay them at load time
        return FrozenModule(graph, dtype, f"{precision}, frozen TorchScript")
    except Exception as error:  # noqa: BLE001 - any failure means the eager copy, which is always right
        return FrozenModule(inference_copy, dtype, f"{precision}, eager ({type(error).__name__}: {str(error)[:200]})")
