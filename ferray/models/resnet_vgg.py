"""Model B (an ImageNet ResNet50 on the 2x super-resolved faces) and the paper's VGG baselines.

Model B: torchvision's ResNet50 with a 7-way head. Grayscale goes in through a 1-channel stem made
from the pretrained RGB filters: a gray face fed as three equal channels gives conv1 the sum of its
three filters' responses, so summing the filters over the input channels computes exactly the
same stem on one channel, with a third of the stem's input. 23,516,103 parameters (torchvision's
25,557,032 less the 1000-way head and two thirds of conv1, plus the 7-way head); depth 50 (49
convolutions + 1 fully connected layer). Trained on 96x96 faces with 88x88 crops.

VGG16 / VGG19: torchvision's conv bases (14,714,688 and 20,024,384 parameters: the paper's Table 1
figures; kept exactly, so gray is fed as three equal channels), on 48x48 faces with 44x44 crops
(1x1x512 after the five pools), and a small head: 512 -> 256 -> 7 (dropout before the last layer
from model.dropout). Depth 16 and 19 as their names count (weight layers; our head has 2 fully
connected layers, the original 3).

Model B from scratch (`resnet50_b_scratch`): without ImageNet weights the 7x7/2 stem and max pool,
made to cut 224-pixel photos down fast, throw away most of an 88-pixel face in two steps; this
variant has a 3x3/2 stem and no max pool (layer1 sees 44x44 instead of 22x22; 23,513,543
parameters). experiments/model_b_scratch.yaml trains it with its own recipe.

Pretrained weights (`pretrained`): "none"; "imagenet" from torchvision's cache under TORCH_HOME
(`ferray` never downloads: clusters and CI machines are often offline, and the error says which
file to put where); or the path of a state dict file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ferray.errors import PretrainedWeightsError
from ferray.labels import NUM_CLASSES
from ferray.models.registry import register_model

IMAGENET_FILES = {
    "resnet50": "resnet50-0676ba61.pth",  # torchvision ResNet50_Weights.IMAGENET1K_V1
    "resnet18": "resnet18-f37072fd.pth",  # ResNet18_Weights.IMAGENET1K_V1
    "vgg16": "vgg16-397923af.pth",  # VGG16_Weights.IMAGENET1K_V1
    "vgg19": "vgg19-dcbb9e9d.pth",  # VGG19_Weights.IMAGENET1K_V1
}


# The torchvision architecture whose ImageNet weights each registered model with pretrained weights
# starts from.
PRETRAINED_ARCH = {"resnet50_b": "resnet50", "resnet18_b": "resnet18", "vgg16": "vgg16", "vgg19": "vgg19"}


def pretrained_state_dict(arch: str, pretrained: str) -> dict | None:
    """The state dict that `pretrained` names for torchvision architecture `arch`, or None for "none"."""
    if pretrained in ("none", "", None):
        return None
    return torch.load(weights_file(arch, pretrained), map_location="cpu", weights_only=True)


def weights_file(arch: str, pretrained: str) -> Path:
    """The file `pretrained` ("imagenet" or a path) names for torchvision architecture `arch`."""
    if pretrained == "imagenet":
        path = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[arch]
        if not path.is_file():
            raise PretrainedWeightsError(
                f"model.pretrained=imagenet: {arch}'s ImageNet weights are not on this machine. Put "
                f"torchvision's {IMAGENET_FILES[arch]} at {path} (e.g. on a machine with internet: "
                f"python -c \"import torchvision; torchvision.models.{arch}(weights='IMAGENET1K_V1')\" and copy "
                f"~/.cache/torch/hub/checkpoints/{IMAGENET_FILES[arch]}), or set model.pretrained to that file's "
                f"path, or use model.pretrained=none to train from scratch"
            )
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsError(f"model.pretrained={pretrained}: no such file")
    return path.resolve()


def pretrained_file(model_name: str, pretrained: str) -> Path:
    """The weights file a registered model's `pretrained` names (its torchvision architecture's)."""
    arch = PRETRAINED_ARCH.get(model_name)
    if arch is None:
        raise PretrainedWeightsError(f"model.pretrained={pretrained}: {model_name} has no pretrained weights")
    return weights_file(arch, pretrained)


def pretrained_available(model_name: str, pretrained: str) -> bool:
    """Whether the weights `pretrained` names for a registered model are on this machine."""
    from ferray.models.registry import build_model

    if pretrained in ("none", "", None):
        return True
    try:
        build_model(model_name, pretrained=pretrained)
    except PretrainedWeightsError:
        return False
    return True


def gray_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of an RGB conv whose filters are the sums over the input channels."""
    stem = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        stem.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            stem.bias.copy_(conv.bias)
    return stem


# ------------------------------------------------------------------------------------------- model B
# The stem's stride where it is not ImageNet's 7x7/2 + max pool: "small" (3x3/2, no max pool) for
# 88-pixel faces trained from scratch; "face48" (3x3/1, then the max pool) for the native 44-pixel
# crops, whose layer1 then sees 22x22, as Model B's does on its 88-pixel SR faces.
STEMS = {"imagenet": 2, "small": 2, "face48": 1}


class _PooledClassifier(nn.Module):
    """forward / forward_head / embed for a backbone whose forward_features gives pooled features
    and whose head is dropout + self.fc (the engine's center loss acts on those features)."""

    def embed(self, features):
        return features

    def forward_head(self, features):
        return self.fc(self.dropout(features))

    def forward(self, x, return_embedding: bool = False):
        features = self.forward_features(x)
        logits = self.forward_head(features)
        return (logits, features) if return_embedding else logits


class ResNetGray(_PooledClassifier):
    DEPTH = {"resnet50": 50, "resnet18": 18}

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = NUM_CLASSES,
        pretrained: str = "none",
        dropout: float = 0.0,
        stem: str = "imagenet",
    ):
        super().__init__()
        import torchvision.models as tvm

        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; known: {', '.join(STEMS)}")
        if stem != "imagenet" and pretrained not in ("none", "", None):
            raise ValueError(f"the {stem!r} stem has no pretrained weights: it is a from-scratch variant")
        net = getattr(tvm, arch)()
        state = pretrained_state_dict(arch, pretrained)
        if state is not None:
            net.load_state_dict(state)
        self.arch, self.pretrained = arch, state is not None
        if stem == "imagenet":
            net.conv1 = gray_stem(net.conv1)
        else:
            stride = STEMS[stem]
            net.conv1 = nn.Conv2d(1, net.conv1.out_channels, 3, stride=stride, padding=1, bias=False)
            if stride == 2:
                net.maxpool = nn.Identity()  # 88 -> (B, 64, 44, 44)
            # stride 1 keeps the max pool: 44 -> (B, 64, 44, 44) -> (B, 64, 22, 22), B's layer1 size
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return self.backbone(x)  # (B, 2048): the pooled features (512 for resnet18)

    def head_parameters(self):
        return list(self.fc.parameters())

    def keras_depth(self) -> int:
        return self.DEPTH[self.arch]


# ------------------------------------------------------------------------------------------- VGG
VGG_CONVS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}  # 3x3 convs per block, then a 2x2 max pool
VGG_WIDTHS = (64, 128, 256, 512, 512)


def vgg_features(arch: str, divisor: int) -> nn.Sequential:
    """VGG's conv base with every width divided by `divisor` (torchvision's layer order and names)."""
    layers, cin = [], 3
    for convs, width in zip(VGG_CONVS[arch], VGG_WIDTHS):
        for _ in range(convs):
            layers += [nn.Conv2d(cin, width // divisor, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width // divisor
        layers.append(nn.MaxPool2d(2, 2))
    for layer in layers:  # torchvision's VGG initialization: without it 13+ plain convs barely train
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class VGGGray(_PooledClassifier):
    def __init__(
        self,
        arch: str,
        num_classes: int = NUM_CLASSES,
        pretrained: str = "none",
        dropout: float = 0.0,
        width_divisor: int = 1,
    ):
        super().__init__()
        if width_divisor == 1:
            import torchvision.models as tvm

            net = getattr(tvm, arch)()
            state = pretrained_state_dict(arch, pretrained)
            if state is not None:
                net.load_state_dict(state)
            self.features = net.features  # the conv base, exactly torchvision's
        else:
            if pretrained != "none":
                raise ValueError(f"{arch} at 1/{width_divisor} width has no pretrained weights")
            state, self.features = None, vgg_features(arch, width_divisor)
        self.pretrained = state is not None
        self.arch = arch
        self.num_features = 256 // width_divisor
        self.neck = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(512 // width_divisor, self.num_features),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return self.neck(self.features(x.expand(-1, 3, -1, -1)))  # (B, 256)

    def head_parameters(self):
        return list(self.neck.parameters()) + list(self.fc.parameters())

    def keras_depth(self) -> int:
        return {"vgg16": 16, "vgg19": 19}[self.arch]


# ------------------------------------------------------------------------------ VGG with a pooled head
# (width, 3x3 convs) per stage, a 2x2 max pool after each but the last: 44 -> 22 -> 11 -> 5
VGG_GAP_STAGES = ((64, 2), (128, 2), (256, 3), (384, 2))


class VGGPooled(_PooledClassifier):
    """A VGG-style member trained from scratch on the 44x44 crops: 3x3 convolutions with batch norm
    and ReLU in four stages, then global average pooling, dropout and one linear layer (no fully
    connected neck: the pooled head is what the best published single network trained from scratch
    on FER2013 uses, and it keeps the parameters in the convolutions)."""

    def __init__(self, stages=VGG_GAP_STAGES, num_classes: int = NUM_CLASSES, dropout: float = 0.0):
        super().__init__()
        layers, cin = [], 1
        for index, (width, convs) in enumerate(stages):
            for _ in range(convs):
                conv = nn.Conv2d(cin, width, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            if index < len(stages) - 1:
                layers.append(nn.MaxPool2d(2, 2))
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.depth = sum(convs for _, convs in stages) + 1
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.pool(self.features(x)).flatten(1)  # (B, 384)

    def head_parameters(self):
        return list(self.fc.parameters())

    def keras_depth(self) -> int:
        return self.depth


# ----------------------------------------------------------------------------------------- builders
@register_model("resnet50_b", input_size=88, description="Model B: ImageNet ResNet50 on 2x SR faces (1-channel stem)")
def resnet50_b(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> ResNetGray:
    """Model B; `pretrained`: none | imagenet | a state-dict path."""
    return ResNetGray("resnet50", num_classes, pretrained, dropout)


@register_model(
    "resnet50_b_scratch",
    input_size=88,
    description="Model B from scratch: ResNet50 with a 3x3/2 stem for small faces, no max pool",
)
def resnet50_b_scratch(
    num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_
) -> ResNetGray:
    """Model B when no ImageNet weights are available (experiments/model_b_scratch.yaml)."""
    return ResNetGray("resnet50", num_classes, pretrained, dropout, stem="small")


@register_model(
    "resnet18_b",
    input_size=88,
    description="Model B's CPU-sized stand-in: ResNet18 (ImageNet stem, 1 channel) on 2x SR faces",
)
def resnet18_b(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> ResNetGray:
    """Model B where ResNet50 does not fit (experiments/model_b_cpu.yaml, the debug runs)."""
    return ResNetGray("resnet18", num_classes, pretrained, dropout)


@register_model(
    "resnet18_48",
    input_size=44,
    description="ResNet18 on the native 48x48 face (3x3/1 stem, then the max pool): no SR generator to serve",
)
def resnet18_48(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> ResNetGray:
    """A member that reads the same 44x44 crops as Model A at about Model B's cost (layer1 at 22x22)."""
    return ResNetGray("resnet18", num_classes, pretrained, dropout, stem="face48")


@register_model(
    "vgg_gap",
    input_size=44,
    description="a VGG-style member: 9 3x3 convs with batch norm in 4 stages, global average pooling (from scratch)",
)
def vgg_gap(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> VGGPooled:
    """An ensemble member unlike Model A (dense convolutions, no residuals), trained from scratch."""
    if pretrained not in ("none", "", None):
        raise ValueError("vgg_gap has no pretrained weights: it is trained from scratch")
    return VGGPooled(VGG_GAP_STAGES, num_classes, dropout)


@register_model("vgg16", input_size=44, description="the paper's VGG16 baseline: torchvision conv base + small head")
def vgg16(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> VGGGray:
    return VGGGray("vgg16", num_classes, pretrained, dropout)


@register_model("vgg19", input_size=44, description="the paper's VGG19 baseline: torchvision conv base + small head")
def vgg19(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> VGGGray:
    return VGGGray("vgg19", num_classes, pretrained, dropout)


@register_model("vgg16_tiny", input_size=44, description="VGG16's layout at 1/8 width, for debug runs on a laptop")
def vgg16_tiny(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> VGGGray:
    return VGGGray("vgg16", num_classes, pretrained, dropout, width_divisor=8)


@register_model("vgg19_tiny", input_size=44, description="VGG19's layout at 1/8 width, for debug runs on a laptop")
def vgg19_tiny(num_classes: int = NUM_CLASSES, pretrained: str = "none", dropout: float = 0.0, **_) -> VGGGray:
    return VGGGray("vgg19", num_classes, pretrained, dropout, width_divisor=8)
