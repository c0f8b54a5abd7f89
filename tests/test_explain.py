"""Guided back-propagation: exact maps of hand-built nets, and the real models and CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ferray.explain import explain_faces, guided_backprop, guided_copy
from ferray.figures import map_to_image

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "debug_a.yaml"


def tiny_net(activation: nn.Module) -> nn.Module:
    """score_0 = mean(f(2x)), score_1 = -mean(f(2x)) over a 4x4 face."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return nn.Sequential(conv, activation, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


FACE = torch.tensor([[3.0, -1.0, 0.5, -2.0]] * 4).view(1, 1, 4, 4)
POSITIVE = (FACE > 0).float()


def test_relu_map_is_the_positive_mask_scaled_by_the_weights():
    maps, logits = guided_backprop(tiny_net(nn.ReLU()), FACE, target=0)
    assert maps.shape == FACE.shape
    torch.testing.assert_close(maps, POSITIVE * 2 / 16)
    assert logits.argmax(1).item() == 0


def test_negative_gradient_is_blocked_where_plain_backprop_passes_it():
    net = tiny_net(nn.ReLU())
    maps, _ = guided_backprop(net, FACE, target=1)
    assert torch.count_nonzero(maps) == 0
    x = FACE.clone().requires_grad_(True)
    net(x)[0, 1].backward()
    torch.testing.assert_close(x.grad, -POSITIVE * 2 / 16)  # the plain gradient is not zero


def test_prelu_keeps_its_negative_slope():
    maps, _ = guided_backprop(tiny_net(nn.PReLU(init=0.25)), FACE, target=0)
    torch.testing.assert_close(maps, torch.where(FACE > 0, 1.0, 0.25) * 2 / 16)


def test_the_map_follows_the_input():
    net = tiny_net(nn.ReLU(inplace=True))
    flipped = -FACE
    maps, _ = guided_backprop(net, torch.cat([FACE, flipped]), target=0)
    torch.testing.assert_close(maps[1], (flipped > 0).float()[0] * 2 / 16)
    assert not torch.equal(maps[0], maps[1])


def test_predicted_class_is_the_default_target_per_input():
    net = tiny_net(nn.ReLU())
    maps, logits = guided_backprop(net, torch.cat([FACE, torch.zeros_like(FACE) - 1]))
    assert logits[0].argmax() == 0
    torch.testing.assert_close(maps[0], POSITIVE[0] * 2 / 16)


def test_the_model_itself_is_left_untouched():
    net = tiny_net(nn.ReLU(inplace=True))
    guided = guided_copy(net)
    assert isinstance(net[1], nn.ReLU) and net[1].inplace
    assert not isinstance(guided[1], nn.ReLU)
    x = FACE.clone().requires_grad_(True)
    net(x)[0, 1].backward()
    assert torch.count_nonzero(x.grad) > 0  # the original still back-propagates plainly


@pytest.mark.parametrize("name", ["xception_a_tiny", "vgg16_tiny", "resnet18_b"])
def test_registered_models_give_maps_of_the_input_shape(name):
    from ferray.models import build_model, model_entry

    torch.manual_seed(0)
    model = build_model(name).eval()
    crop = model_entry(name).input_size
    size = 48 if crop < 48 else 96
    faces = np.random.default_rng(0).integers(0, 256, (2, size, size), dtype=np.uint8)
    result = explain_faces(model, faces, crop)
    assert result["maps"].shape == (2, crop, crop)
    assert np.abs(result["maps"]).sum() > 0
    assert not np.allclose(result["maps"][0], result["maps"][1])  # different faces, different maps
    assert np.allclose(result["probs"].sum(1), 1, atol=1e-4)
    shown = map_to_image(result["maps"][0])
    assert shown.min() >= 0 and shown.max() <= 1


def test_explain_command_writes_a_figure_and_json(tmp_path, tiny_bundle):
    from PIL import Image

    from ferray.cli import main

    face = np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)
    image = tmp_path / "face.png"
    Image.fromarray(face).save(image)
    out = tmp_path / "map.png"
    assert main(["explain", str(tiny_bundle / "model_a.pt"), str(image), "--out", str(out), "--target", "happy"]) == 0
    answer = json.loads(out.with_suffix(".json").read_text())
    assert answer["faces"][0]["explained"] == "happy"
    assert Image.open(out).size[0] > 100


def test_explain_command_names_bad_inputs(tmp_path, tiny_bundle, capsys):
    from ferray.cli import main

    assert main(["explain", str(tiny_bundle / "model_a.pt"), str(tmp_path / "missing.png")]) == 1
    assert "missing.png: no such image file" in capsys.readouterr().err
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    assert main(["explain", str(tiny_bundle / "model_a.pt"), str(image)]) == 1
    assert "x.png" in capsys.readouterr().err


def test_training_crops_are_windows_of_the_face_without_other_augmentation():
    from ferray.config import AugmentConfig
    from ferray.figures import training_crops

    face = np.random.default_rng(2).integers(0, 256, (48, 48), dtype=np.uint8)
    plain = AugmentConfig(crop=44, flip=False, rotation=0, shift=0, scale=0)
    crops = training_crops(face, plain, count=6, seed=1)
    assert crops.shape == (6, 44, 44)
    windows = {(i, j): face[i : i + 44, j : j + 44] / 255.0 for i in range(5) for j in range(5)}
    for crop in crops:  # each view is one of the 25 possible 44x44 windows, pixel for pixel
        assert any(np.allclose(crop, w, atol=1e-4) for w in windows.values())
    jittered = training_crops(face, AugmentConfig(crop=44), count=6, seed=1)
    assert not np.allclose(jittered[0], jittered[1])


def test_crops_command(tmp_path, prepared_synth, capsys):
    from PIL import Image

    from ferray.cli import main

    out = tmp_path / "crops.png"
    assert (
        main(
            [
                "crops",
                "--experiment",
                str(EXPERIMENT),
                "--data",
                str(prepared_synth),
                "--out",
                str(out),
                "--count",
                "4",
                "--set",
                "augment.rotation=30",
            ]
        )
        == 0
    )
    assert Image.open(out).size[0] > 100
    assert main(["crops", "--experiment", str(EXPERIMENT), "--data", str(prepared_synth), "--index", "100000"]) == 1
    assert "--index must be in 0..167" in capsys.readouterr().err
