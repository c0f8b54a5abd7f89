"""Guided back-propagation (Springenberg et al. 2015) for any ferray classifier (Ray-free).

The gradient of one class score with respect to the input face, where every activation lets
through only positive gradient: at an activation y = f(x), the backward pass gives
f'(x) * max(dL/dy, 0) instead of f'(x) * dL/dy. For ReLU this is the paper's rule (positive input
and positive gradient); for Model A's PReLU it keeps the learned negative slope as f'. The map
therefore shows the pixels whose brightening raises the class score through features that are
themselves evidence for the class.

The model is never modified: `guided_copy` deep-copies it and swaps each activation module for a
guided wrapper. `ferray explain CKPT IMAGE` draws the map of one face; the report draws a grid.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ferray.augment import standardize, to_input
from ferray.device import default_device
from ferray.labels import EMOTIONS, FER_SIZE

log = logging.getLogger(__name__)

ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU)


class _GuidedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation):
        ctx.save_for_backward(x)
        ctx.activation = activation
        return activation(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.activation(x), x, grad_output.clamp(min=0))
        return grad, None


class GuidedActivation(nn.Module):
    """An activation whose backward pass lets only positive gradient through."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        if hasattr(activation, "inplace"):
            activation.inplace = False  # the backward pass recomputes f(x) from x
        self.activation = activation

    def forward(self, x):
        return _GuidedFunction.apply(x, self.activation)


def guided_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every activation module made guided."""
    guided = copy.deepcopy(model).eval()
    for parent in list(guided.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ACTIVATIONS):
                setattr(parent, name, GuidedActivation(child))
    return guided


def guided_backprop(
    model: nn.Module, inputs: torch.Tensor, target: int | torch.Tensor | None = None, guided: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, logits): d score_target / d input through guided activations, shape of `inputs`.

    `inputs` are the model's inputs as it takes them (standardized crops); `target` is a class
    index for all, one per input, or None for each input's predicted class. Pass `guided` (from
    `guided_copy`) to reuse one copy over many calls.
    """
    guided = guided if guided is not None else guided_copy(model)
    x = inputs.detach().clone().requires_grad_(True)
    logits = guided(x)
    if target is None:
        target = logits.argmax(1)
    target = (
        torch.as_tensor(target, device=logits.device).expand(len(x))
        if torch.as_tensor(target).dim() == 0
        else torch.as_tensor(target, device=logits.device)
    )
    score = logits.gather(1, target.long().view(-1, 1)).sum()
    (maps,) = torch.autograd.grad(score, x)
    return maps.detach(), logits.detach()


def center_view(faces: torch.Tensor, crop: int, scale: int = 1) -> torch.Tensor:
    """uint8 faces (B, H, W) -> the standardized center crop the model evaluates."""
    x = to_input(faces, scale)
    top = (x.shape[-2] - crop) // 2
    left = (x.shape[-1] - crop) // 2
    return standardize(x[..., top : top + crop, left : left + crop])


def explain_faces(
    model: nn.Module, faces: np.ndarray, crop: int, scale: int = 1, target=None, device: str | torch.device = "cpu"
) -> dict:
    """Guided-backprop maps of uint8 faces (B, H, W): the crops, maps, probabilities and classes."""
    model = model.to(device).eval()
    x = center_view(torch.from_numpy(np.ascontiguousarray(faces)).to(device), crop, scale)
    maps, logits = guided_backprop(model, x, target)
    probs = logits.float().softmax(1)
    classes = probs.argmax(1) if target is None else torch.as_tensor(target).expand(len(x))
    return {
        "crops": x[:, 0].cpu().numpy(),
        "maps": maps[:, 0].cpu().numpy(),
        "probs": probs.cpu().numpy(),
        "classes": classes.cpu().numpy(),
    }


def explain_image(
    checkpoint: str | Path,
    image: str | Path,
    out: str | Path | None = None,
    target: str | None = None,
    detect: bool = False,
) -> dict:
    """`ferray explain`: the guided-backprop map of the face in an image file, as a PNG and JSON."""
    import json

    from ferray.engine import model_from_checkpoint
    from ferray.faces import InputError, decode_image, faces_in_image
    from ferray.figures import plot_explanations

    image = Path(image)
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    if target is not None and target not in EMOTIONS:
        raise InputError(f"--target {target!r}: not one of {', '.join(EMOTIONS)}")
    device = default_device()
    model, cfg, _ = model_from_checkpoint(checkpoint, device)
    gray = decode_image(image.read_bytes(), name=str(image))
    faces = faces_in_image(gray, detect=detect, name=str(image))
    # A model trained on 96x96 (SR) faces gets the face upscaled 2x by bicubic here: the map shows
    # what the classifier looks at, not what the SR generator adds.
    size = 2 * FER_SIZE if cfg.data.input_scale == 1 and cfg.augment.crop > FER_SIZE else FER_SIZE
    pixels = np.stack([_resize(face.pixels, size) for face in faces])
    result = explain_faces(
        model,
        pixels,
        cfg.augment.crop,
        cfg.data.input_scale,
        None if target is None else EMOTIONS.index(target),
        device,
    )
    out = Path(out) if out is not None else image.with_name(f"{image.stem}-explain.png")
    rows = [
        {"crop": c, "map": m, "probs": p, "label": None}
        for c, m, p in zip(result["crops"], result["maps"], result["probs"])
    ]
    plot_explanations(rows, out, f"{cfg.model.name}: guided backprop of {image.name}")
    answer = {
        "image": str(image),
        "checkpoint": str(checkpoint),
        "figure": str(out),
        "faces": [
            {
                "box": list(face.box) if face.box else None,
                "predicted": EMOTIONS[int(np.argmax(p))],
                "explained": EMOTIONS[int(c)],
                "probabilities": {n: round(float(v), 4) for n, v in zip(EMOTIONS, p)},
            }
            for face, p, c in zip(faces, result["probs"], result["classes"])
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(answer, indent=2) + "\n")
    for face in answer["faces"]:
        log.info(
            f"{image.name}: predicted {face['predicted']} ({face['probabilities'][face['predicted']]:.0%}); "
            f"map of {face['explained']}"
        )
    log.info(f"wrote {out}")
    return answer


def _resize(face: np.ndarray, size: int) -> np.ndarray:
    if face.shape == (size, size):
        return face
    import torch.nn.functional as F

    x = torch.from_numpy(face).float()[None, None]
    return (
        F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        .clamp(0, 255)
        .round()
        .byte()[0, 0]
        .numpy()
    )


def pick_per_class(labels: np.ndarray, per_class: int) -> dict[int, np.ndarray]:
    """The first `per_class` indices of each class present (deterministic: the split's order)."""
    return {c: np.flatnonzero(labels == c)[:per_class] for c in range(len(EMOTIONS)) if (labels == c).any()}


def explain_split(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "PublicTest",
    per_class: int = 2,
    out: str | Path | None = None,
) -> dict:
    """Guided-backprop maps of `per_class` faces of each class of a split, as one grid (Figure 4)."""
    from ferray.data.contract import load_split
    from ferray.engine import model_from_checkpoint

    device = default_device()
    model, cfg, _ = model_from_checkpoint(checkpoint, device)
    images, labels, _ = load_split(data, split)
    out = Path(out) if out is not None else Path(checkpoint).parent / f"guided-{split}.png"
    result = explain_grid(
        model,
        cfg,
        images,
        labels,
        per_class,
        out,
        f"{cfg.model.name}: guided backprop on {split} (map of the predicted class)",
        device,
    )
    log.info(
        f"explain: guided-backprop maps of {len(result['faces'])} {split} faces ({per_class} per class); wrote {out}"
    )
    return {**result, "split": split, "checkpoint": str(checkpoint)}


def explain_grid(
    model: nn.Module,
    cfg,
    images: np.ndarray,
    labels: np.ndarray,
    per_class: int,
    out: Path,
    title: str,
    device: torch.device,
) -> dict:
    """The grid of `explain_split` from faces in memory (the Ray-free GPU bench calls it directly)."""
    from ferray.figures import plot_guided_grid

    picked = pick_per_class(labels, per_class)
    index = np.concatenate(list(picked.values()))
    result = explain_faces(model, images[index], cfg.augment.crop, cfg.data.input_scale, device=device)
    rows = [{"crop": c, "map": m, "probs": p} for c, m, p in zip(result["crops"], result["maps"], result["probs"])]
    columns, faces, start = {}, [], 0
    for label, chosen in picked.items():
        columns[label], start = rows[start : start + len(chosen)], start + len(chosen)
        faces += [
            {"index": int(i), "label": EMOTIONS[label], "predicted": EMOTIONS[int(row["probs"].argmax())]}
            for i, row in zip(chosen, columns[label])
        ]
    plot_guided_grid(columns, out, title)
    return {"figure": str(out), "faces": faces}
