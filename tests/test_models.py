"""Model A and the registry: shapes, gradients, documented parameter count and depth."""

import pytest
import torch

from ferray.models import build_model, keras_params, list_models, model_entry, num_params
from ferray.models.registry import models_table
from ferray.models.xception import keras_depth

PAPER_PARAMS, PAPER_DEPTH = 2_720_439, 83


def test_model_a_matches_the_papers_parameter_count_and_depth():
    model = build_model("xception_a")
    assert abs(keras_params(model) - PAPER_PARAMS) / PAPER_PARAMS < 0.01
    assert keras_params(model) == 2_716_359 and num_params(model) == 2_701_831  # the documented figures
    assert keras_depth(model) == PAPER_DEPTH
    assert keras_depth(build_model("xception_a", dropout=0.3)) == PAPER_DEPTH + 1  # dropout is a layer


def test_model_a_has_3_regular_and_22_separable_convolutions():
    from ferray.models.xception import SeparableConv2d

    model = build_model("xception_a")
    separable = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    inside = {id(m.depthwise) for m in separable} | {id(m.pointwise) for m in separable}
    regular = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in inside]
    assert (len(regular), len(separable)) == (3, 22)


@pytest.mark.parametrize("name", ["xception_a", "xception_a_tiny"])
@pytest.mark.parametrize("size", [48, 44])
def test_shapes_and_finite_outputs(name, size):
    model = build_model(name).eval()
    x = torch.randn(3, 1, size, size)
    features = model.forward_features(x)
    assert features.shape[2:] == (6, 6)  # 48 -> 24 -> 12 -> 6 and 44 -> 22 -> 11 -> 6
    logits, embedding = model(x, return_embedding=True)
    assert logits.shape == (3, 7) and embedding.shape == (3, model.num_features)
    assert torch.isfinite(logits).all()


def test_every_parameter_gets_a_gradient():
    model = build_model("xception_a_tiny", dropout=0.2).train()
    logits, embedding = model(torch.randn(4, 1, 44, 44), return_embedding=True)
    (logits.logsumexp(1).mean() + embedding.pow(2).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_registry_lists_and_refuses_unknown_names():
    names = [e.name for e in list_models()]
    assert {"xception_a", "xception_a_tiny"} <= set(names)
    assert model_entry("xception_a").input_size == 44
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        build_model("nope")


def test_models_table_shows_counts_and_depth():
    table = models_table()
    assert "xception_a" in table and "2,716,359" in table and " 83 " in table


@pytest.mark.parametrize("name", ["xception_a_tiny", "resnet18_b", "resnet50_b_scratch"])
def test_folding_batch_norms_removes_them_and_keeps_the_answers(name):
    from ferray.models.folding import fold_batch_norms

    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    size = model_entry(name).input_size
    with torch.no_grad():
        model(torch.randn(16, 1, size, size) * 2 + 1)  # running statistics away from their (0, 1) start
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(build_model(name, num_classes=7))
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        before = model(x)
        batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert fold_batch_norms(model) == batch_norms > 0
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert torch.allclose(model(x), before, atol=1e-4, rtol=1e-4)


def test_model_as_dropout_kind_is_a_setting_and_holds_no_weights():
    element = build_model("xception_a_tiny", dropout=0.2, dropout_kind="element")
    channel = build_model("xception_a_tiny", dropout=0.2)
    assert type(element.dropout) is torch.nn.Dropout and type(channel.dropout) is torch.nn.Dropout2d
    assert element.state_dict().keys() == channel.state_dict().keys()  # weights move between the kinds
    with pytest.raises(ValueError, match="unknown dropout kind 'pixel'"):
        build_model("xception_a_tiny", dropout=0.2, dropout_kind="pixel")


def test_the_resnet18_member_on_48x48_faces_has_its_documented_size_and_shapes():
    model = build_model("resnet18_48").eval()
    assert num_params(model) == 11_171_271 and model_entry("resnet18_48").input_size == 44
    assert model.backbone.conv1.stride == (1, 1) and model.backbone.conv1.in_channels == 1
    for size in (44, 48):
        logits, embedding = model(torch.randn(2, 1, size, size), return_embedding=True)
        assert logits.shape == (2, 7) and embedding.shape == (2, 512)
    with pytest.raises(ValueError, match="from-scratch variant"):
        build_model("resnet18_48", pretrained="imagenet")


def test_the_vgg_member_has_its_documented_size_and_a_pooled_head():
    model = build_model("vgg_gap", dropout=0.3).eval()
    assert num_params(model) == 3_951_559 and model.keras_depth() == 10 and model.num_features == 384
    for size in (44, 48):
        logits, embedding = model(torch.randn(2, 1, size, size), return_embedding=True)
        assert logits.shape == (2, 7) and embedding.shape == (2, 384)
    with pytest.raises(ValueError, match="trained from scratch"):
        build_model("vgg_gap", pretrained="imagenet")


@pytest.mark.parametrize("recipe", ["model_a_light.yaml", "resnet18_48_cpu.yaml", "vgg_gap_cpu.yaml"])
def test_the_member_recipes_build_their_models(recipe):
    from pathlib import Path

    from ferray.config import load_config
    from ferray.engine import build_state

    cfg = load_config(Path(__file__).parents[1] / "experiments" / recipe, ["train.compile=false"])
    assert cfg.train.budget_minutes > 0 and cfg.data.selection_split == "auto"
    state = build_state(cfg, torch.device("cpu"))
    assert not state.schedule.planned  # the budget plans the schedule's length once the run starts
    if recipe == "model_a_light.yaml":
        assert type(state.core.dropout) is torch.nn.Dropout and cfg.loss.center_lambda == 0
