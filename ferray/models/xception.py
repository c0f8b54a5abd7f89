"""Model A: the paper's lightweight Xception-style CNN of depthwise separable convolutions.

Layout (the paper's Section 3 as we read it; the widths are ours, chosen to meet its parameter
count with Xception's numbers, since the paper does not list them):

    input 1 x 44 x 44 (a random crop of a 48 x 48 face; 48 x 48 works too)
    entry flow   conv 3x3 32 -> conv 3x3 64           (the 5x5 stem replaced by two 3x3)
                 block 128: sep, sep, max-pool                          -> 22x22 (24x24 on 48)
                 block 256: sep, sep, max-pool, + separable shortcut    -> 11x11 (12x12)
                 block 256: sep, sep, max-pool, + separable shortcut    -> 6x6   (6x6)
    middle flow  4 modules of 3 separable convs at 256, identity residual  6x6x256
    exit flow    sep 768 -> sep 1536 -> [channel dropout] -> conv 3x3 to 7 classes -> global average pool
    softmax over the 7 classes (applied by the loss and at inference)

Every convolution is followed by batch norm and PReLU (per-channel slopes), except the final one
whose 7 maps are pooled into the class scores. The paper's "dropout before the final layer" drops
whole channels of the 6x6x1536 map (Dropout2d): an element-wise mask there is filled in by the
neighbouring positions of the same channel and barely regularises. 3 regular convolutions and 22 depthwise separable
ones (6 + 2 shortcuts in the entry flow, 12 in the middle, 2 in the exit). Max-pooling is 3x3,
stride 2, padding 1 (Keras "same"), so 44x44 crops also end at 6x6.

Counting rules, documented and tested:
  * parameters as the paper's Keras summary totals them: weights plus batch-norm moving mean and
    variance (`keras_params`): 2,716,359 (paper: 2,720,439, -0.15%); 2,701,831 PyTorch parameters;
  * depth as Keras lists layers: the input, every convolution (a separable convolution is one
    layer), batch norm, PReLU, pooling (max and global average), residual addition, dropout, and
    the final softmax (`keras_depth`): 83 (paper: 83). A dropout rate > 0 adds one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ferray.labels import NUM_CLASSES
from ferray.models.registry import register_model


# ------------------------------------------------------------------------------------------ blocks
class SeparableConv2d(nn.Module):
    """Depthwise k x k (one filter per channel) then pointwise 1x1; Keras' SeparableConv2D."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class ConvBNAct(nn.Sequential):
    """A convolution (regular or separable), batch norm and PReLU."""

    def __init__(self, cin: int, cout: int, separable: bool):
        conv = SeparableConv2d(cin, cout) if separable else nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout), nn.PReLU(cout))


class EntryBlock(nn.Module):
    """sep -> sep -> max-pool, plus a strided separable shortcut when `shortcut`."""

    def __init__(self, cin: int, cout: int, shortcut: bool):
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(cin, cout, True), ConvBNAct(cout, cout, True), nn.MaxPool2d(3, stride=2, padding=1)
        )
        self.shortcut = (
            nn.Sequential(SeparableConv2d(cin, cout, 3, stride=2), nn.BatchNorm2d(cout)) if shortcut else None
        )

    def forward(self, x):
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class MiddleModule(nn.Module):
    """`convs` separable convolutions at constant width with an identity residual."""

    def __init__(self, channels: int, convs: int):
        super().__init__()
        self.body = nn.Sequential(*[ConvBNAct(channels, channels, True) for _ in range(convs)])

    def forward(self, x):
        return x + self.body(x)


# ------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class XceptionSpec:
    """A variant written as data: the flows and their widths."""

    stem: tuple[int, ...] = (32, 64)  # regular 3x3 convolutions
    entry: tuple[tuple[int, bool], ...] = ((128, False), (256, True), (256, True))  # (width, shortcut)
    middle_width: int = 256
    middle_modules: int = 4
    middle_convs: int = 3
    exit: tuple[int, ...] = (768, 1536)  # separable convolutions
    head_kernel: int = 3


# "channel": whole maps of the last feature map (Dropout2d); "element": single values (Dropout), as
# the first shipped Model A was trained. Neither holds parameters, so weights move between them.
DROPOUT_KINDS = {"channel": nn.Dropout2d, "element": nn.Dropout}


class XceptionA(nn.Module):
    def __init__(
        self,
        spec: XceptionSpec = XceptionSpec(),
        num_classes: int = NUM_CLASSES,
        in_channels: int = 1,
        dropout: float = 0.0,
        dropout_kind: str = "channel",
    ):
        super().__init__()
        if dropout_kind not in DROPOUT_KINDS:
            raise ValueError(f"unknown dropout kind {dropout_kind!r}; known: {', '.join(DROPOUT_KINDS)}")
        self.spec = spec
        layers, width = [], in_channels
        for w in spec.stem:
            layers.append(ConvBNAct(width, w, separable=False))
            width = w
        for w, shortcut in spec.entry:
            layers.append(EntryBlock(width, w, shortcut))
            width = w
        self.entry = nn.Sequential(*layers)
        self.middle = nn.Sequential(
            *[MiddleModule(spec.middle_width, spec.middle_convs) for _ in range(spec.middle_modules)]
        )
        width = spec.middle_width if spec.middle_modules else width
        exit_layers = []
        for w in spec.exit:
            exit_layers.append(ConvBNAct(width, w, separable=True))
            width = w
        self.exit = nn.Sequential(*exit_layers)
        self.num_features = width
        self.dropout = DROPOUT_KINDS[dropout_kind](dropout) if dropout > 0 else None
        self.classifier = nn.Conv2d(width, num_classes, spec.head_kernel, padding=spec.head_kernel // 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)  # (B, 256, 6, 6)
        x = self.middle(x)  # (B, 256, 6, 6)
        return self.exit(x)  # (B, 1536, 6, 6)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The feature vector before the classifier (center loss acts on it): (B, 1536)."""
        return features.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            features = self.dropout(features)
        return self.classifier(features).mean(dim=(2, 3))  # (B, 7) logits

    def keras_depth(self) -> int:
        return keras_depth(self)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        features = self.forward_features(x)
        logits = self.forward_head(features)
        return (logits, self.embed(features)) if return_embedding else logits


def keras_depth(model: XceptionA) -> int:
    """Layers as a Keras summary lists them (see the module docstring for the rule)."""
    counted = (nn.Conv2d, SeparableConv2d, nn.BatchNorm2d, nn.PReLU, nn.MaxPool2d, nn.Dropout, nn.Dropout2d)
    layers = 0
    for module in model.modules():
        if isinstance(module, counted) and not _inside_separable(model, module):
            layers += 1
        if isinstance(module, MiddleModule) or (isinstance(module, EntryBlock) and module.shortcut is not None):
            layers += 1  # the residual Add
    return 1 + layers + 1 + 1  # + the input, the global average pool and the softmax


def _inside_separable(model: nn.Module, target: nn.Module) -> bool:
    return any(
        target is m.depthwise or target is m.pointwise for m in model.modules() if isinstance(m, SeparableConv2d)
    )


# ----------------------------------------------------------------------------------------- builders
@register_model(
    "xception_a", input_size=44, description="Model A: the paper's Xception-style CNN (2.72M params, depth 83)"
)
def xception_a(num_classes: int = NUM_CLASSES, dropout: float = 0.0, dropout_kind: str = "channel", **_) -> XceptionA:
    """Model A as in the paper: 2,716,359 parameters (Keras count), depth 83."""
    return XceptionA(XceptionSpec(), num_classes, dropout=dropout, dropout_kind=dropout_kind)


@register_model(
    "xception_a_tiny", input_size=44, description="Model A's layout at 1/8 width, for debug runs on a laptop"
)
def xception_a_tiny(
    num_classes: int = NUM_CLASSES, dropout: float = 0.0, dropout_kind: str = "channel", **_
) -> XceptionA:
    """The same flows at a fraction of the width (and two middle modules): seconds per epoch on a CPU."""
    spec = XceptionSpec(
        stem=(8, 16), entry=((32, False), (48, True), (64, True)), middle_width=64, middle_modules=2, exit=(96, 192)
    )
    return XceptionA(spec, num_classes, dropout=dropout, dropout_kind=dropout_kind)
