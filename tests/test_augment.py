"""Batched augmentation and evaluation views."""

import torch

from ferray import augment
from ferray.config import AugmentConfig

STILL = AugmentConfig(crop=44, flip=False, rotation=0.0, shift=0.0, scale=0.0)


def faces(n=6, size=48, seed=0):
    return torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_train_views_shape_device_and_randomness():
    images = faces()
    a = augment.train_views(images, AugmentConfig())
    b = augment.train_views(images, AugmentConfig())
    assert a.shape == (6, 1, 44, 44) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert not torch.equal(a, b)  # random across calls


def test_crop_without_other_changes_copies_pixels_exactly():
    torch.manual_seed(3)
    images = faces(8)
    out = augment.train_views(images, STILL)
    x = augment.standardize(images.float() / 255)
    for k in range(8):  # each output is one of the 25 integer-offset 44x44 windows of its face
        windows = [x[k, i : i + 44, j : j + 44] for i in range(5) for j in range(5)]
        assert any(torch.allclose(out[k, 0], w, atol=1e-5) for w in windows)


def test_flip_only_mirrors():
    cfg = AugmentConfig(crop=48, flip=True, rotation=0.0, shift=0.0, scale=0.0)
    images = faces(32)
    torch.manual_seed(0)
    out = augment.train_views(images, cfg)[:, 0]
    x = augment.standardize(images.float() / 255)
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_jitter_and_erasing_run_and_stay_finite():
    cfg = AugmentConfig(brightness=0.2, contrast=0.3, erase_prob=1.0)
    out = augment.train_views(faces(), cfg)
    assert out.shape == (6, 1, 44, 44) and torch.isfinite(out).all()


def test_ten_crop_views_are_corners_center_and_mirrors():
    images = faces(2)
    views = augment.eval_views(images, 44, tta=True)
    x = augment.standardize(images.float() / 255)[:, None]
    assert views.shape == (10, 2, 1, 44, 44)
    assert torch.equal(views[0], x[..., :44, :44]) and torch.equal(views[3], x[..., 4:, 4:])
    assert torch.equal(views[4], x[..., 2:46, 2:46])
    assert torch.equal(views[5], views[0].flip(-1))
    assert augment.eval_views(images, 44, tta=False).shape == (2, 1, 44, 44)


def test_predict_proba_averages_softmax_over_views():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(44 * 44, 7))
    images = faces(3)
    probs = augment.predict_proba(model, images, 44, tta=True)
    assert probs.shape == (3, 7) and torch.allclose(probs.sum(1), torch.ones(3))
    views = augment.eval_views(images, 44, tta=True)
    manual = torch.stack([model(v).softmax(-1) for v in views]).mean(0)
    assert torch.allclose(probs, manual, atol=1e-6)


def test_cpu_inference_goes_in_slices_that_give_the_whole_batch_answer():
    calls = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(44 * 44, 7)

        def forward(self, x):
            calls.append(len(x))
            return self.linear(torch.nn.functional.adaptive_avg_pool2d(x, 44).flatten(1))

    model = Recording()
    images = faces(40)
    probs = augment.predict_proba(model, images, 44, tta=True)  # 400 crops
    assert sum(calls) == 400 and max(calls) == augment.CPU_SLICE_PIXELS // (44 * 44) < 400
    views = augment.eval_views(images, 44, tta=True)
    whole = model.linear(views.flatten(2)).softmax(-1).mean(0)
    assert torch.allclose(probs, whole, atol=1e-6)
    calls.clear()
    augment.predict_proba(model, faces(40, size=96), 88, tta=False, scale=1)  # bigger crops, smaller slices
    assert max(calls) == augment.CPU_SLICE_PIXELS // (88 * 88) and sum(calls) == 40
