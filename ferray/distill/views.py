"""The views a teacher answers and a student learns from, each one a function of (seed, face, view)
alone: the same view whatever batch, order, process or machine draws it, so the teacher's
probabilities can be stored once (ferray.distill.bank) and the student shown exactly what the
teacher saw.

A view is an affine map in normalized coordinates (theta, as F.affine_grid takes it) and a
brightness/contrast change. Normalized coordinates make a view resolution-free: the same theta
crops a 44x44 view of the 48x48 face and an 88x88 view of the SR generator's 96x96 face, which is
how Model A and Model B see one view. Views 0-9 are the ten TTA crops (four corners and the centre,
then mirrored: ferray.augment.eval_views); views from 10 on are drawn as training augments them
(ferray.augment.random_affine's ranges), from a counter-based hash rather than a random stream."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ferray.augment import standardize, to_input
from ferray.config import AugmentConfig

TTA_VIEWS = 10
VIEW_DRAWS = 9  # numbers drawn per view: rotation, zoom, flip, offset (2), shift (2), contrast, brightness
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, faces: np.ndarray, views: np.ndarray, draws: int) -> np.ndarray:
    """(N, draws) numbers uniform in [0, 1), one row per (face, view) pair, from the pair alone."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.asarray(faces, np.uint64))
        key = _mix(key ^ (np.asarray(views, np.uint64) * np.uint64(0xD1B54A32D192ED03)))
        counters = key[:, None] + np.arange(1, draws + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    return (_mix(counters & _MASK) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def tta_thetas(views: np.ndarray, crop: int, size: int) -> torch.Tensor:
    """The affine maps of TTA views 0-9: eval_views' crops (corners, centre, then mirrored)."""
    edge, centre = size - crop, (size - crop) // 2
    corners = np.array([(0, 0), (0, edge), (edge, 0), (edge, edge), (centre, centre)], np.float64)
    rows, cols = corners[views % 5].T
    flip = np.where(views >= 5, -1.0, 1.0)
    theta = np.zeros((len(views), 2, 3))
    theta[:, 0, 0], theta[:, 1, 1] = crop / size * flip, crop / size
    theta[:, 0, 2] = (2 * cols + crop) / size - 1  # a crop's centre in normalized units (the side is 2)
    theta[:, 1, 2] = (2 * rows + crop) / size - 1
    return torch.from_numpy(theta).float()


def augmented_thetas(u: np.ndarray, cfg: AugmentConfig, crop: int, size: int) -> torch.Tensor:
    """Training's augmentation (random_affine's ranges) from draws u[:, 0:6]."""
    signed = u * 2 - 1
    angle = signed[:, 0] * np.radians(cfg.rotation)
    zoom = 1 + signed[:, 1] * cfg.scale
    flip = np.where(u[:, 2] < 0.5, -1.0, 1.0) if cfg.flip else np.ones(len(u))
    ratio = crop / size
    cos, sin = np.cos(angle) * ratio / zoom, np.sin(angle) * ratio / zoom
    theta = np.zeros((len(u), 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    # the crop window's corner anywhere in [0, size - crop], continuous (training draws whole pixels)
    # so that the view is the same at every resolution
    offset = u[:, 3:5] * (size - crop)
    theta[:, :, 2] = (2 * offset + crop) / size - 1 + signed[:, 5:7] * 2 * cfg.shift
    return torch.from_numpy(theta).float()


def view_params(
    seed: int, faces: np.ndarray, views: np.ndarray, cfg: AugmentConfig, crop: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta (N, 2, 3), gain (N,), bias (N,)) of view views[i] of face faces[i]. `crop` of `size`
    fixes the ratio only (44 of 48 and 88 of 96 give the same thetas). A face is named by any
    integer key (ferray.distill.bank.face_keys: a hash of its id)."""
    faces, views = np.asarray(faces).astype(np.uint64), np.asarray(views, np.int64)
    return params_of(uniforms(seed, faces, views, VIEW_DRAWS), views, cfg, crop, size)


def params_of(u: np.ndarray, views: np.ndarray, cfg: AugmentConfig, crop: int, size: int):
    """(theta, gain, bias) of views numbered `views` from their draws u (N, VIEW_DRAWS)."""
    theta = augmented_thetas(u, cfg, crop, size)
    tta = views < TTA_VIEWS
    if tta.any():
        theta[torch.from_numpy(tta)] = tta_thetas(views[tta], crop, size)
    gain = np.where(tta, 1.0, 1 + (u[:, 7] * 2 - 1) * cfg.contrast)
    bias = np.where(tta, 0.0, (u[:, 8] * 2 - 1) * cfg.brightness)
    return theta, torch.from_numpy(gain).float(), torch.from_numpy(bias).float()


def render(
    images: torch.Tensor, theta: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, crop: int, scale: int = 1
) -> torch.Tensor:
    """uint8 faces (N, H, W) -> the standardized views (N, 1, crop, crop) the parameters describe."""
    x = to_input(images, scale)
    theta, gain, bias = (t.to(x.device) for t in (theta, gain, bias))
    grid = F.affine_grid(theta, (x.shape[0], 1, crop, crop), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    photometric = (gain != 1) | (bias != 0)
    if photometric.any():
        mean = x.mean(dim=(2, 3), keepdim=True)
        changed = ((x - mean) * gain[:, None, None, None] + mean + bias[:, None, None, None]).clamp(0, 1)
        x = torch.where(photometric[:, None, None, None], changed, x)
    return standardize(x)
