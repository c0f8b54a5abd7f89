"""Batched, on-device augmentation and the evaluation views (Ray-free).

Training: each face in a batch gets its own random flip, rotation, shift and zoom and a random
crop, all composed into one affine map per face and applied with a single grid_sample on the
device the batch is on (the GPU when there is one), then optional brightness/contrast jitter and
random erasing. Integer crop offsets with no rotation or zoom reproduce the pixels exactly.

Evaluation: the center crop, or ten crops (4 corners + center, each mirrored) whose softmax
outputs are averaged (TTA). Training, evaluation and serving all go through `to_input` and these
views, so serving never drifts from training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ferray.config import AugmentConfig
from ferray.device import autocast, keep_cpu_buffers

# On the CPU a forward goes in slices of at most this many input pixels (32 crops of 44x44): each
# slice's activations then stay under glibc's 32 MB mmap ceiling and its buffers are reused from
# slice to slice (ferray.device.keep_cpu_buffers), where one large forward would page-fault its
# activations in every call; the GPU takes the whole batch at once.
CPU_SLICE_PIXELS = 32 * 44 * 44

# FER2013 Training pixel statistics (0..1 scale), used to standardize every input.
MEAN, STD = 0.5077, 0.2550


def to_input(images: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """uint8 faces (B, H, W) or (B, 1, H, W) -> float (B, 1, sH, sW) in [0, 1]; scale > 1 is bicubic."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W) faces, got {tuple(images.shape)}")
    x = images.float() / 255.0
    if scale != 1:
        x = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
    return x


def standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def random_affine(batch: int, size: int, crop: int, cfg: AugmentConfig, device) -> torch.Tensor:
    """(B, 2, 3) maps from crop coordinates to image coordinates (normalized, align_corners=False)."""
    u = lambda: torch.rand(batch, device=device) * 2 - 1  # noqa: E731  uniform in [-1, 1]
    angle = u() * math.radians(cfg.rotation)
    zoom = 1 + u() * cfg.scale
    flip = (
        torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(batch, device=device)
    )
    ratio = crop / size
    cos, sin = torch.cos(angle) * ratio / zoom, torch.sin(angle) * ratio / zoom
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    # A random crop window, then a shift, both in normalized image units (the side is 2).
    window = size - crop
    offset = torch.randint(0, window + 1, (batch, 2), device=device).float()
    theta[:, :, 2] = (2 * offset + crop) / size - 1 + torch.stack([u(), u()], 1) * 2 * cfg.shift
    return theta


def train_views(images: torch.Tensor, cfg: AugmentConfig, scale: int = 1) -> torch.Tensor:
    """uint8 faces -> standardized, augmented (B, 1, crop, crop) float on the same device."""
    x = to_input(images, scale)
    batch, size = x.shape[0], x.shape[-1]
    theta = random_affine(batch, size, cfg.crop, cfg, x.device)
    grid = F.affine_grid(theta, (batch, 1, cfg.crop, cfg.crop), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.brightness or cfg.contrast:
        mean = x.mean(dim=(2, 3), keepdim=True)
        gain = 1 + (torch.rand(batch, 1, 1, 1, device=x.device) * 2 - 1) * cfg.contrast
        bias = (torch.rand(batch, 1, 1, 1, device=x.device) * 2 - 1) * cfg.brightness
        x = ((x - mean) * gain + mean + bias).clamp(0, 1)
    if cfg.erase_prob:
        x = random_erase(x, cfg.erase_prob)
    return standardize(x)


def random_erase(x: torch.Tensor, prob: float, max_area: float = 0.25) -> torch.Tensor:
    """Blank a random rectangle (up to max_area of the face) with noise, per face with `prob`."""
    batch, _, h, w = x.shape
    area = torch.rand(batch, device=x.device) * max_area * h * w
    aspect = torch.exp((torch.rand(batch, device=x.device) - 0.5) * math.log(3))
    eh = (area * aspect).sqrt().clamp(1, h)
    ew = (area / aspect).sqrt().clamp(1, w)
    top = torch.rand(batch, device=x.device) * (h - eh)
    left = torch.rand(batch, device=x.device) * (w - ew)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + eh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + ew)[:, None, None])
    )
    chosen = (torch.rand(batch, device=x.device) < prob)[:, None, None]
    mask = (inside & chosen).unsqueeze(1)
    return torch.where(mask, torch.rand_like(x), x)


def eval_views(images: torch.Tensor, crop: int, tta: bool, scale: int = 1) -> torch.Tensor:
    """uint8 faces -> standardized views: (B, 1, crop, crop) center crops, or with TTA
    (10, B, 1, crop, crop): the 4 corners and the center, then the same 5 mirrored."""
    x = standardize(to_input(images, scale))
    size = x.shape[-1]
    if crop > size:
        raise ValueError(f"crop {crop} is larger than the {size}x{size} faces")
    c = (size - crop) // 2
    if not tta:
        return x[..., c : c + crop, c : c + crop]
    e = size - crop
    corners = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
    views = [x[..., i : i + crop, j : j + crop] for i, j in corners]
    views += [v.flip(-1) for v in views]
    return torch.stack(views)  # (10, B, 1, crop, crop)


@torch.no_grad()
def predict_proba(
    model, images: torch.Tensor, crop: int, tta: bool, amp: bool = False, scale: int = 1, channels_last: bool = False
) -> torch.Tensor:
    """Class probabilities (B, C) of uint8 faces; with TTA the mean softmax over the ten views.
    `amp`: bf16 autocast (the caller decides where it pays off: ferray.device.use_bf16)."""
    views = eval_views(images, crop, tta, scale)
    if not tta:
        views = views[None]
    n, b = views.shape[:2]
    flat = views.reshape(n * b, *views.shape[2:])
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    with autocast(flat.device, amp):
        logits = torch.cat([model(part) for part in forward_slices(flat)])
    return logits.float().softmax(-1).reshape(n, b, -1).mean(0)


def forward_slices(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parts of an inference batch to forward one by one: all of it on an accelerator, slices of
    CPU_SLICE_PIXELS on the CPU (where the allocator is set to reuse their buffers)."""
    if batch.device.type != "cpu":
        return (batch,)
    keep_cpu_buffers()
    per_slice = max(1, CPU_SLICE_PIXELS // (batch.shape[-1] * batch.shape[-2]))
    return batch.split(per_slice)
