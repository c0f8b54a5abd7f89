"""Center loss against a case computed by hand."""

import pytest
import torch

from ferray.losses import CenterLoss, JointLoss


def test_center_loss_value_by_hand():
    loss = CenterLoss(num_classes=2, feature_dim=2, reduction="sum", features="raw")
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    # 1/2 * (|(1,2)|^2 + |(0,-1)|^2 + |(2,0)|^2) = 1/2 * (5 + 1 + 4) = 5
    assert loss(x, y).item() == pytest.approx(5.0)
    loss.reduction = "mean"
    assert loss(x, y).item() == pytest.approx(5.0 / 3)


def test_center_update_by_hand():
    loss = CenterLoss(num_classes=3, feature_dim=2, alpha=0.5, features="raw")
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    x = torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    loss.update_centers(x, y)
    # class 0: delta = (c - x) / (1 + 1) = (-1, -2) / 2 -> c = 0 - 0.5 * (-0.5, -1) = (0.25, 0.5)
    # class 1: delta = ((1,1)-(1,0) + (1,1)-(3,1)) / 3 = (-2, 1) / 3 -> c = (1,1) - 0.5 * (-2/3, 1/3)
    # class 2: no samples, unchanged
    expected = torch.tensor([[0.25, 0.5], [1 + 1 / 3, 1 - 1 / 6], [5.0, 5.0]])
    assert torch.allclose(loss.centers, expected)


def test_center_loss_gradient_pulls_features_to_their_center():
    loss = CenterLoss(num_classes=2, feature_dim=2, features="raw")
    x = torch.tensor([[2.0, 0.0]], requires_grad=True)
    loss(x, torch.tensor([0])).backward()
    assert torch.allclose(x.grad, torch.tensor([[2.0, 0.0]]))  # d/dx 1/2 |x - 0|^2 = x
    assert loss.centers.grad is None  # centers move by their own rule, not by the optimizer


def test_joint_loss_combines_parts_with_lambda():
    joint = JointLoss(num_classes=3, feature_dim=2, center_lambda=0.1, center_alpha=0.5)
    logits, features, labels = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    total, parts = joint(logits, features, labels)
    assert total.item() == pytest.approx(parts["ce"].item() + 0.1 * parts["center"].item(), rel=1e-5)
    off = JointLoss(3, 2, center_lambda=0.0, center_alpha=0.5)
    assert off(logits, features, labels)[0].item() == pytest.approx(parts["ce"].item(), rel=1e-5)
    with pytest.raises(ValueError):
        CenterLoss(3, 2, reduction="max")
    with pytest.raises(ValueError, match="features"):
        CenterLoss(3, 2, features="whitened")


def test_normalized_center_term_cannot_be_cancelled_by_rescaling_the_features():
    """The failures it fixes: the raw term falls 100x when batch norm shrinks the features 10x; a
    plainly normalised term falls when the features are scaled up and pulled toward one common
    direction (the angles shrink, the logits stay). Centered and normalised, the term is the same
    for any scale and any common shift, and so is where the centers move."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8) + 2.0, torch.arange(16) % 4
    raw, normalized = CenterLoss(4, 8, features="raw"), CenterLoss(4, 8, features="normalized")
    for loss in (raw, normalized):
        loss.update_centers(x, y)
    assert raw(x * 0.1, y).item() < raw(x, y).item() / 5
    common = torch.randn(8) * 100.0  # a large shared direction: what collapses a plain L2-normalised term
    for scale, shift in ((1e-3, 0.0), (0.1, 0.0), (10.0, 0.0), (1e3, 0.0), (1.0, 1.0), (30.0, 1.0)):
        moved = x * scale + shift * common
        assert normalized(moved, y).item() == pytest.approx(normalized(x, y).item(), rel=1e-3), (scale, shift)
    plain = torch.nn.functional.normalize(x * 30.0 + common, dim=1)  # what the first attempt measured
    assert 0.5 * (plain - plain.mean(0)).pow(2).sum(1).mean() < normalized(x, y).item() / 5
    centered = CenterLoss(4, 8, features="normalized")
    centered.update_centers(x * 1e3 + common, y)
    assert torch.allclose(centered.centers, normalized.centers, atol=1e-4)
    assert 0 < normalized(x, y).item() <= 2.0  # 1/2 |a - b|^2 of unit-ball vectors: a known range for lambda


def test_a_center_share_keeps_the_term_at_that_share_whatever_its_scale():
    """The normalised term's scale drifts during training; with center_share lambda follows it."""
    torch.manual_seed(0)
    joint = JointLoss(7, 8, center_lambda=100.0, center_alpha=0.5, center_share=0.05)
    shares = []
    for step in range(400):
        spread = 1.0 if step < 200 else 0.1  # the embeddings gather 10x closer round their centers
        labels = torch.arange(32) % 7
        base = torch.eye(8)[labels] * 5
        features = base + spread * torch.randn(32, 8)
        total, parts = joint(torch.randn(32, 7), features, labels)
        joint.after_step(features, labels)
        shares.append((parts["lambda"] * parts["center"] / parts["ce"]).item())
        assert total.item() == pytest.approx((parts["ce"] + parts["lambda"] * parts["center"]).item(), rel=1e-5)
    assert sum(shares[150:200]) / 50 == pytest.approx(0.05, rel=0.25)
    assert sum(shares[350:]) / 50 == pytest.approx(0.05, rel=0.25)  # re-balanced after the 10x drop
    fixed = JointLoss(7, 8, center_lambda=0.3, center_alpha=0.5)
    assert fixed(torch.randn(4, 7), torch.randn(4, 8), torch.arange(4))[1]["lambda"].item() == pytest.approx(0.3)
    capped = JointLoss(7, 8, center_lambda=1e-3, center_alpha=0.5, center_share=0.5)
    assert capped(torch.randn(4, 7), torch.randn(4, 8), torch.arange(4))[1]["lambda"].item() == pytest.approx(1e-3)
