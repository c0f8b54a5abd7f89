"""PSNR and SSIM of images in [0, 1] (per image, then averaged), as SR papers report them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB on the 0..255 scale of images given in [0, 1]."""
    mse = (pred.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03)."""
    pred = pred.clamp(0, 1).float()
    target = target.float()
    window = _gaussian(device=pred.device)
    mu_x, mu_y = F.conv2d(pred, window), F.conv2d(target, window)
    sxx = F.conv2d(pred * pred, window) - mu_x**2
    syy = F.conv2d(target * target, window) - mu_y**2
    sxy = F.conv2d(pred * target, window) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return value.flatten(1).mean(1)
