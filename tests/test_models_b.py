"""Model B (ResNet50, 1-channel stem, pretrained loading) and the VGG baselines."""

import pytest
import torch
import torchvision

from ferray.config import load_config
from ferray.models import build_model, num_params
from ferray.models.resnet_vgg import PretrainedWeightsError


def test_parameter_counts_and_depths():
    assert num_params(torchvision.models.resnet50()) == 25_557_032
    b = build_model("resnet50_b")
    # less the 1000-way head (2,049,000) and two thirds of conv1 (6,272), plus the 7-way head (14,343)
    assert num_params(b) == 25_557_032 - 2_049_000 - 6_272 + 14_343 == 23_516_103
    assert b.keras_depth() == 50
    for name, conv_base, depth in (("vgg16", 14_714_688, 16), ("vgg19", 20_024_384, 19)):
        model = build_model(name)
        assert num_params(model.features) == conv_base and model.keras_depth() == depth


def test_tiny_vggs_keep_torchvisions_layout_at_an_eighth_of_the_width():
    for name, arch, total in (("vgg16_tiny", "vgg16", 232_879), ("vgg19_tiny", "vgg19", 315_983)):
        tiny, full = build_model(name), getattr(torchvision.models, arch)().features
        assert [type(m) for m in tiny.features] == [type(m) for m in full]
        assert [m.out_channels * 8 for m in tiny.features if isinstance(m, torch.nn.Conv2d)] == [
            m.out_channels for m in full if isinstance(m, torch.nn.Conv2d)
        ]
        assert num_params(tiny) == total and tiny.keras_depth() == build_model(arch).keras_depth()
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("vgg16_tiny", pretrained="imagenet")


@pytest.mark.parametrize(
    "name, size",
    [
        ("resnet50_b", 88),
        ("resnet50_b", 96),
        ("resnet18_b", 88),
        ("vgg16", 44),
        ("vgg19", 48),
        ("vgg16_tiny", 44),
        ("vgg19_tiny", 44),
    ],
)
def test_shapes(name, size):
    model = build_model(name).eval()
    logits, features = model(torch.rand(2, 1, size, size), return_embedding=True)
    assert logits.shape == (2, 7) and features.shape == (2, model.num_features) and torch.isfinite(logits).all()


def test_pretrained_state_dict_loads_like_by_hand_with_the_gray_stem(tmp_path):
    reference = torchvision.models.resnet50()
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    b = build_model("resnet50_b", pretrained=str(tmp_path / "r50.pth")).eval()
    assert b.pretrained
    reference.fc = torch.nn.Identity()
    reference.eval()
    gray = torch.rand(2, 1, 96, 96)
    with torch.no_grad():  # one channel through summed filters == three equal channels through RGB filters
        assert torch.allclose(b.forward_features(gray), reference(gray.expand(-1, 3, -1, -1)), atol=1e-4)


def test_vgg_pretrained_file_is_loaded_into_the_conv_base(tmp_path):
    reference = torchvision.models.vgg16()
    torch.save(reference.state_dict(), tmp_path / "v.pth")
    model = build_model("vgg16", pretrained=str(tmp_path / "v.pth"))
    assert torch.equal(model.features[0].weight, reference.features[0].weight)


def test_offline_imagenet_request_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as err:
        build_model("resnet50_b", pretrained="imagenet")
    message = str(err.value)
    assert "resnet50-0676ba61.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "model.pretrained=none" in message
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        build_model("vgg19", pretrained=str(tmp_path / "missing.pth"))


def test_backbone_gets_a_lower_learning_rate(tmp_path):
    from torchvision.models import resnet18

    from ferray.engine import TensorBatches, build_state, train_one_epoch

    # The fine-tuning recipe needs pretrained weights (config refuses it on random ones): a state
    # dict file of torchvision's layout stands in for ImageNet's, which this machine lacks.
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), weights)
    cfg = load_config(
        None,
        [
            "model.name=resnet18_b",
            f"model.pretrained={weights}",
            "optim.backbone_lr_ratio=0.1",
            "optim.lr=0.01",
            "augment.crop=88",
            "loss.center_lambda=0",
            "train.batch_size=4",
        ],
    )
    state = build_state(cfg, torch.device("cpu"))
    # (backbone, head) x (decayed weights, spared norms and biases)
    assert [g["lr_scale"] for g in state.optimizer.param_groups] == [0.1, 0.1, 1.0, 1.0]
    images = torch.randint(0, 256, (4, 96, 96), dtype=torch.uint8)
    metrics = train_one_epoch(state, TensorBatches(images, torch.tensor([0, 1, 2, 3]), 4), 1)
    lrs = [g["lr"] for g in state.optimizer.param_groups]
    assert lrs[0] == lrs[1] == pytest.approx(0.1 * lrs[2]) and lrs[2] == lrs[3] == metrics["lr"]


def test_bicubic_on_the_fly_input_scale():
    from ferray.augment import eval_views, train_views

    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    cfg = load_config(None, ["augment.crop=88", "data.input_scale=2"])
    assert train_views(faces, cfg.augment, scale=2).shape == (3, 1, 88, 88)
    assert eval_views(faces, 88, tta=True, scale=2).shape == (10, 3, 1, 88, 88)
