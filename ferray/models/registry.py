"""A registry of model builders by name, with the facts `ferray models` prints (Ray-free)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    input_size: int  # the training crop, pixels per side
    in_channels: int
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, input_size: int, in_channels: int = 1, description: str = ""):
    """Decorator: register `builder(num_classes=7, **options) -> nn.Module` under `name`."""

    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(
            name, builder, input_size, in_channels, description or (builder.__doc__ or "").strip().split("\n")[0]
        )
        return builder

    return wrap


def _load_builtin_models() -> None:
    # Importing the model modules registers their builders (no weights are loaded).
    from ferray.models import resnet_vgg, xception  # noqa: F401


def model_entry(name: str) -> ModelEntry:
    _load_builtin_models()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_model(name: str, **options) -> nn.Module:
    return model_entry(name).builder(**options)


def list_models() -> list[ModelEntry]:
    _load_builtin_models()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def keras_params(model: nn.Module) -> int:
    """Parameters as a Keras summary totals them: weights plus batch-norm moving mean and variance
    (non-trainable in Keras, buffers in PyTorch). The paper's 2,720,439 is such a total."""
    moving = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return num_params(model) + moving


def models_table() -> str:
    """Every registered model with its parameter counts, depth and input (what `ferray models` prints)."""
    rows = [("model", "params", "keras params", "depth", "input", "description")]
    for entry in list_models():
        model = build_model(entry.name)
        depth = getattr(model, "keras_depth", lambda: None)()
        rows.append(
            (
                entry.name,
                f"{num_params(model):,}",
                f"{keras_params(model):,}",
                str(depth or "-"),
                f"{entry.in_channels}x{entry.input_size}x{entry.input_size}",
                entry.description,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[5]
        for r in rows
    )
