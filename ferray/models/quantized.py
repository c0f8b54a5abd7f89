"""A trained classifier in int8 for CPU throughput: static post-training quantization (Ray-free).

The bf16 path (ferray.models.frozen) is already close to what a CPU's bf16 matrix units allow for
large batches; int8 doubles the arithmetic per instruction (AVX512-VNNI). Here a model is exported
(torch.export), its convolutions quantized by torchao's PT2E flow with the X86 inductor quantizer
(int8 weights per output channel, uint8 activations per tensor), and inductor compiles the result,
fusing each PReLU with the quantization of its output: eager int8 kernels (FX quantization) spend a
large part of the batch in an unfused quantized::prelu.

Activation ranges come from calibration on real faces (`calibrate`, run by `ferray quantize`); only
the ranges are stored in a bundle (`model_a.int8.json`, a few kB): the int8 weights are made again
from the bundle's weights on load, so a bundle never holds two copies of a member.

The compiled graph is specialized to one batch shape (inductor's dynamic-shape int8 convolutions
gave wrong answers on torch 2.14: a stride mix-up after the first convolution), so batches are
padded up to one of BUCKETS: a face, its ten TTA views, or a CPU slice of 32. Each bucket compiles
on first use (seconds on a small CPU); `warm_up` pays that up front. Padding rows never change the
answers of the real ones (static quantization: no statistic depends on the batch).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

from ferray.errors import CheckpointError, FerrayError

INT8_FORMAT = "ferray.int8/1"
BUCKETS = (1, 10, 32)  # crops per forward: one face, one face's ten TTA views, a CPU slice (augment.CPU_SLICE_PIXELS)
INSTALL_HINT = "int8 inference needs torchao: pip install 'ferray[int8]'"


class Int8Unavailable(FerrayError):
    """int8 inference asked for where it cannot run (no torchao, or no calibration)."""


def _torchao():
    """torchao's PT2E entry points, imported on first use (never at ferray's import)."""
    # torch logs a deprecation warning about one of torchao's pytree registrations at import: noise to a user
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e import FixedQParamsObserver, ObserverBase
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as error:
        raise Int8Unavailable(f"{INSTALL_HINT} ({error})") from None
    finally:
        pytree_log.setLevel(level)
    return x86, FixedQParamsObserver, ObserverBase, prepare_pt2e, convert_pt2e


class _Logits(nn.Module):
    """The classifier's logits alone (its forward's return_embedding branch does not export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _prepared(model: nn.Module, crop: int):
    """The model exported for (N, 1, crop, crop) crops with observers in place (prepare_pt2e)."""
    x86, _, _, prepare_pt2e, _ = _torchao()
    if model.training:
        raise ValueError("int8: put the model in eval mode first")
    example = torch.zeros(2, 1, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(_Logits(model), (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        # "The input of maxpool2d is not quantized": true (PReLU, before each pool, stays fp32 to be fused
        # with its convolution's output by inductor), and no mistake of the user's
        warnings.filterwarnings("ignore", message="The input of maxpool2d is not quantized")
        return prepare_pt2e(exported, quantizer)


def activation_observers(prepared) -> list[tuple[str, str, object]]:
    """(module name, name of the node it observes, observer) of every activation observer, in graph
    order; weight observers (on constants) are left out: they are recomputed from the weights."""
    _, _, observer_base, _, _ = _torchao()
    found = []
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = getattr(prepared, node.target)
        source = node.args[0] if node.args else None
        if isinstance(module, observer_base) and getattr(source, "op", None) != "get_attr":
            found.append((node.target, source.name, module))
    return found


@torch.no_grad()
def calibrate(model: nn.Module, crop: int, crops: torch.Tensor, slice_size: int = BUCKETS[-1]) -> dict:
    """Activation ranges of `model` on standardized (N, 1, crop, crop) `crops` (the views inference
    gives it, of faces it will see): what `quantize_for_cpu` needs, as JSON-ready data."""
    if crops.dim() != 4 or tuple(crops.shape[1:]) != (1, crop, crop) or len(crops) == 0:
        raise ValueError(f"calibrate: want (N, 1, {crop}, {crop}) crops, got {tuple(crops.shape)}")
    prepared = _prepared(model, crop)
    for part in crops.float().split(slice_size):
        prepared(part)
    observers = []
    for name, source, observer in activation_observers(prepared):
        scale, zero_point = observer.calculate_qparams()
        observers.append({"observer": name, "input": source, "scale": float(scale), "zero_point": int(zero_point)})
    import torchao

    return {
        "format": INT8_FORMAT,
        "crop": crop,
        "calibration_crops": len(crops),
        "observers": observers,
        "made_with": {"torch": torch.__version__, "torchao": torchao.__version__},
    }


def quantize_for_cpu(
    model: nn.Module, qparams: dict, where: str = "int8 calibration", compile: bool = True
) -> QuantizedClassifier:
    """An int8 copy of an eval-mode classifier with the activation ranges of `calibrate`; the model
    itself is not touched. `compile` False: the quantized graph run eagerly (quantize/dequantize
    around fp32 kernels: the same arithmetic, slowly; for checks)."""
    _, fixed_qparams, _, _, convert_pt2e = _torchao()
    crop, stored = _checked(qparams, where)
    prepared = _prepared(model, crop)
    found = activation_observers(prepared)
    if [(n, _point(s)) for n, s, _ in found] != [(o["observer"], _point(o["input"])) for o in stored]:
        raise CheckpointError(
            f"{where}: its {len(stored)} activation ranges do not match this model's {len(found)} quantization points "
            f"(made with torch {qparams.get('made_with', {}).get('torch')}, this is {torch.__version__}): "
            "calibrate again with `ferray quantize`"
        )
    for (name, _, observer), entry in zip(found, stored):
        setattr(
            prepared,
            name,
            fixed_qparams(
                entry["scale"],
                entry["zero_point"],
                dtype=observer.dtype,
                qscheme=observer.qscheme,
                quant_min=observer.quant_min,
                quant_max=observer.quant_max,
            ),
        )
    with torch.no_grad():
        prepared(torch.zeros(1, 1, crop, crop))  # the weight observers see the weights
    return QuantizedClassifier(convert_pt2e(prepared), crop, compile)


def _point(node_name: str) -> str:
    """A quantization point's name with the dropout kind left out: element-wise (`dropout`) and
    channel-wise (`feature_dropout`) dropout are the same identity at inference, so ranges calibrated
    before the head's dropout became channel-wise still fit the model."""
    return node_name.replace("feature_dropout", "dropout")


def _checked(qparams: dict, where: str) -> tuple[int, list[dict]]:
    """(crop, observers) of stored ranges, or a CheckpointError naming what is wrong."""
    if not isinstance(qparams, dict) or qparams.get("format") != INT8_FORMAT:
        found = qparams.get("format") if isinstance(qparams, dict) else type(qparams).__name__
        raise CheckpointError(f"{where}: format {found!r}, expected {INT8_FORMAT!r}")
    try:
        crop, stored = int(qparams["crop"]), list(qparams["observers"])
        for index, entry in enumerate(stored):
            missing = {"observer", "input", "scale", "zero_point"} - set(entry)
            if missing:
                raise ValueError(f"observers[{index}] has no {', '.join(sorted(missing))}")
            if not (float(entry["scale"]) > 0 and 0 <= int(entry["zero_point"]) <= 255):
                raise ValueError(f"observers[{index}]: scale {entry['scale']}, zero point {entry['zero_point']}")
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: malformed ({type(error).__name__}: {error})") from None
    return crop, stored


class QuantizedClassifier(nn.Module):
    """Logits (N, 7) in fp32 of (N, 1, crop, crop) crops, forwarded in pieces of at most BUCKETS[-1]
    crops, each padded up to the smallest bucket that holds it."""

    def __init__(self, graph: nn.Module, crop: int, compile: bool = True):
        super().__init__()
        self.crop = crop
        self.how = "int8, compiled by inductor" if compile else "int8, eager (quantize/dequantize in fp32)"
        self.compiled = compile
        self.graph = torch.compile(graph, dynamic=False) if compile else graph

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._bucketed(part) for part in x.float().split(BUCKETS[-1])])

    def _bucketed(self, part: torch.Tensor) -> torch.Tensor:
        n = len(part)
        size = next(b for b in BUCKETS if b >= n)
        if size > n:
            part = torch.cat([part, part.new_zeros(size - n, *part.shape[1:])])
        # canonical strides: a compiled graph is guarded on them, and a (N, 1, H, W) view can have
        # several that are all "contiguous" (seen: a center crop would compile a fourth graph)
        part = part.clone(memory_format=torch.contiguous_format)
        if not self.compiled:
            return self.graph(part)[:n]
        from torch._inductor import config

        # freezing: the int8 weights become constants, prepacked for oneDNN once, when a bucket compiles
        # (it must be on when inductor runs; passed as torch.compile's options it is not, on torch 2.14)
        with config.patch(freezing=True):
            return self.graph(part)[:n]

    def warm_up(self) -> None:
        """Compile every bucket now, not in the first request of its size."""
        for size in BUCKETS:
            self(torch.zeros(size, 1, self.crop, self.crop))
