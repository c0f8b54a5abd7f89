"""SRGAN networks (Ledig et al., CVPR 2017) for a 2x factor on grayscale faces (plain PyTorch).

Generator (SRResNet): 9x9 conv + PReLU -> B residual blocks (conv-BN-PReLU-conv-BN, + skip) ->
conv-BN + the long skip -> one pixel-shuffle x2 stage (conv to 4C, PixelShuffle(2), PReLU) ->
9x9 conv to 1 channel. With `bicubic_skip` (ours, on by default) the network predicts the residual
over the bicubic upscale of its input, which on 24x24 faces trains in minutes instead of hours.

Discriminator: the paper's strided conv stack (64 -> 512 channels, LeakyReLU 0.2, batch norm),
adaptive average pooling (the HR faces are only 48x48), dense 1024, LeakyReLU, dense 1 (a logit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GeneratorSpec:
    channels: int = 64
    blocks: int = 16
    bicubic_skip: bool = True


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """(B, 1, H, W) in [0, 1] -> (B, 1, 2H, 2W) in [0, 1]."""

    scale = 2

    def __init__(self, spec: GeneratorSpec = GeneratorSpec()):
        super().__init__()
        c = spec.channels
        self.spec = spec
        self.head = nn.Sequential(nn.Conv2d(1, c, 9, padding=4), nn.PReLU(c))
        self.blocks = nn.Sequential(*[ResidualBlock(c) for _ in range(spec.blocks)])
        self.fuse = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.upsample = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(c))
        self.tail = nn.Conv2d(c, 1, 9, padding=4)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        head = self.head(lr)  # (B, C, H, W)
        x = self.fuse(self.blocks(head)) + head  # the long skip
        out = self.tail(self.upsample(x))  # (B, 1, 2H, 2W)
        if self.spec.bicubic_skip:
            out = out + bicubic(lr, self.scale)
        return out


class Discriminator(nn.Module):
    """(B, 1, H, W) faces -> (B,) logits of "real"."""

    def __init__(self, channels: int = 64):
        super().__init__()
        layers, cin = [nn.Conv2d(1, channels, 3, padding=1), nn.LeakyReLU(0.2)], channels
        for cout, stride in [
            (channels, 2),
            (2 * channels, 1),
            (2 * channels, 2),
            (4 * channels, 1),
            (4 * channels, 2),
            (8 * channels, 1),
            (8 * channels, 2),
        ]:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 1)
        )

    def forward(self, x):
        return self.head(self.features(x)).squeeze(1)


def bicubic(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bicubic resize (antialiased when shrinking); the LR faces and the baseline both come from it."""
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False, antialias=scale < 1)


def as_unit(faces: torch.Tensor) -> torch.Tensor:
    """uint8 faces (N, H, W) -> float (N, 1, H, W) in [0, 1]: what the generator takes."""
    return faces.float().unsqueeze(1) / 255.0


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """float (N, 1, H, W) in [0, 1] -> uint8 (N, H, W), clamped and rounded: the upscaled faces as
    `sr upscale` writes them and Model B is trained on them."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)


def generated_faces(generator, faces: torch.Tensor) -> torch.Tensor:
    """uint8 faces (N, H, W) -> the generator's uint8 (N, 2H, 2W)."""
    return as_pixels(generator(as_unit(faces)))


def make_lr(hr: torch.Tensor) -> torch.Tensor:
    """The training input: a 48x48 face's bicubic 24x24 downscale."""
    return bicubic(hr, 0.5).clamp(0, 1)
