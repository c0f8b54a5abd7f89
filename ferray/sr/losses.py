"""SRGAN losses: content (VGG19 features, Model A features, or pixels) + 1e-3 x adversarial.

The content network must be fixed and pretrained. This machine and many clusters have no internet,
so `resolve_content` picks what is actually there and says so: VGG19's ImageNet weights from
torchvision's cache (or a file named in the config), else the features of a Model A checkpoint
trained on faces by this project, else pixel MSE. The run records the choice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferray.augment import standardize
from ferray.config import SRConfig
from ferray.errors import ContentError

VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's VGG19_Weights.IMAGENET1K_V1
VGG_LAYERS = {"vgg22": 9, "vgg54": 36}  # features[:n] ends after relu2_2 / relu5_4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vgg19_weights_path(cfg: SRConfig) -> Path | None:
    if cfg.content_weights:
        return Path(cfg.content_weights) if Path(cfg.content_weights).is_file() else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
    return cached if cached.is_file() else None


def resolve_content(cfg: SRConfig) -> str:
    """The content loss this run will use: vgg19, model_a or mse (see the module docstring)."""
    if cfg.content == "vgg19":
        if vgg19_weights_path(cfg) is None:
            where = cfg.content_weights or str(Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE)
            raise ContentError(
                f"sr.content=vgg19 needs VGG19's ImageNet weights at {where} (download "
                "torchvision's vgg19-dcbb9e9d.pth there, or set sr.content_weights)"
            )
        return "vgg19"
    if cfg.content == "model_a":
        if not cfg.content_checkpoint or not Path(cfg.content_checkpoint).is_file():
            raise ContentError(
                f"sr.content=model_a needs sr.content_checkpoint: a Model A checkpoint file "
                f"(got {cfg.content_checkpoint!r})"
            )
        return "model_a"
    if cfg.content == "mse":
        return "mse"
    if vgg19_weights_path(cfg) is not None:
        return "vgg19"
    if cfg.content_checkpoint and Path(cfg.content_checkpoint).is_file():
        return "model_a"
    return "mse"


class ContentLoss(nn.Module):
    """MSE between features of SR and HR faces under a fixed network (or between pixels)."""

    def __init__(self, cfg: SRConfig, kind: str | None = None):
        super().__init__()
        self.kind = kind or resolve_content(cfg)
        self.features = None
        if self.kind == "vgg19":
            from torchvision.models import vgg19

            net = vgg19()
            net.load_state_dict(torch.load(vgg19_weights_path(cfg), map_location="cpu", weights_only=True))
            self.features = net.features[: VGG_LAYERS[cfg.content_layer]]
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None])
            self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None])
        elif self.kind == "model_a":
            from ferray.engine import model_from_checkpoint

            model, _, _ = model_from_checkpoint(cfg.content_checkpoint)
            self.features = model.entry  # entry-flow features: textures and parts, 6x6x256
        if self.features is not None:
            self.features.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # the feature network stays in eval mode (fixed BN statistics)
        super().train(mode)
        if self.features is not None:
            self.features.eval()
        return self

    def _embed(self, x):
        if self.kind == "vgg19":
            return self.features((x.repeat(1, 3, 1, 1) - self.mean) / self.std)
        return self.features(standardize(x))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return F.mse_loss(sr, hr)
        return F.mse_loss(self._embed(sr), self._embed(hr).detach())


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def perceptual_loss(content: torch.Tensor, fake_logits: torch.Tensor, adversarial_weight: float) -> torch.Tensor:
    """The generator's SRGAN loss: content + weight * (-log D(G(lr)))."""
    return content + adversarial_weight * adversarial_loss(fake_logits, real=True)
