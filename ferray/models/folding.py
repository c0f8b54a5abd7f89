"""Batch norms folded into the convolutions before them, for inference (Ray-free).

In eval mode a BatchNorm2d is a fixed per-channel scale and shift, so it can live in the weights and
bias of the convolution that feeds it: the same function with one pass over the activations fewer.
Model A has 24 batch norms: a sizeable share of a one-face forward on a CPU.
Training keeps the batch norms; only loaded, frozen models are folded.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _conv_slot(parent: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """(owner, attribute) of the convolution whose output the child `name` of `parent` returns: the
    child itself, or a separable convolution's pointwise part; None for anything else."""
    child = parent._modules[name]
    if isinstance(child, nn.Conv2d):
        return parent, name
    if isinstance(getattr(child, "pointwise", None), nn.Conv2d):
        return child, "pointwise"
    return None


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (producer, batch norm) children of `module`: neighbours in a Sequential, or
    torchvision's convN/bnN attributes (ResNet blocks and stems)."""
    names = list(module._modules)
    if isinstance(module, nn.Sequential):
        return list(zip(names, names[1:]))
    return [
        (f"conv{name[2:]}", name) for name in names if name.startswith("bn") and f"conv{name[2:]}" in module._modules
    ]


def fold_batch_norms(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a convolution into it; the batch norm
    becomes an identity. The model must be in eval mode (folding uses the running statistics).
    Returns how many were folded."""
    if model.training:
        raise ValueError("fold_batch_norms: put the model in eval mode first (folding uses the running statistics)")
    folded = 0
    for module in list(model.modules()):
        for producer_name, bn_name in _pairs(module):
            bn, slot = module._modules[bn_name], _conv_slot(module, producer_name)
            if slot is None or not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
                continue
            owner, attribute = slot
            setattr(owner, attribute, fuse_conv_bn_eval(getattr(owner, attribute), bn))
            module._modules[bn_name] = nn.Identity()
            folded += 1
    return folded
