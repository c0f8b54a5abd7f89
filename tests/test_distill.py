"""Distillation's parts: views drawn from (seed, face, view) alone, the teacher bank, the student's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferray.augment import eval_views
from ferray.config import AugmentConfig
from ferray.distill.bank import BankMismatch, bank_manifest, load_bank, save_bank, teacher_identity, teacher_probs
from ferray.distill.loss import distillation_loss
from ferray.distill.views import TTA_VIEWS, render, view_params

AUGMENT = AugmentConfig(rotation=10, shift=0.1, scale=0.1, brightness=0.1, contrast=0.2)


def test_a_view_depends_on_its_seed_face_and_view_alone():
    faces, views = np.array([3, 7, 9, 3, 500]), np.array([12, 12, 40, 13, 2])
    theta, gain, bias = view_params(5, faces, views, AUGMENT, 44, 48)
    order = np.array([4, 2, 0, 3, 1])  # the same pairs in another batch, in another order
    again = view_params(5, faces[order], views[order], AUGMENT, 44, 48)
    assert torch.equal(again[0], theta[order]) and torch.equal(again[1], gain[order])
    assert not torch.equal(theta[0], theta[3]) and not torch.equal(theta[0], theta[1])  # other view, other face
    assert not torch.equal(view_params(6, faces, views, AUGMENT, 44, 48)[0], theta)  # another seed
    assert torch.allclose(view_params(5, faces, views, AUGMENT, 88, 96)[0], theta)  # B's 88 of 96: the same views


def test_augmented_views_stay_in_trainings_ranges():
    n = 4000
    theta, gain, bias = view_params(0, np.arange(n), np.full(n, 17), AUGMENT, 44, 48)
    scale = torch.linalg.det(theta[:, :, :2]).abs().sqrt() * 48 / 44  # 1 / zoom
    assert scale.min() > 1 / 1.1 - 1e-4 and scale.max() < 1 / 0.9 + 1e-4
    assert scale.std() > 0.04  # spread over the range, not stuck
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0].abs(), theta[:, 1, 1]))
    assert angle.max() <= 10 + 1e-3 and angle.max() > 9
    assert (theta[:, 0, 0] < 0).float().mean() == pytest.approx(0.5, abs=0.05)  # half mirrored
    assert gain.min() >= 0.8 and gain.max() <= 1.2 and bias.abs().max() <= 0.1


def test_the_first_ten_views_are_the_tta_crops(synth_faces):
    images = torch.from_numpy(synth_faces[0][:6])
    crops = eval_views(images, 44, True)  # (10, 6, 1, 44, 44)
    for view in range(TTA_VIEWS):
        params = view_params(0, np.arange(6), np.full(6, view), AUGMENT, 44, 48)
        assert torch.allclose(render(images, *params, 44), crops[view], atol=1e-4), view


@pytest.fixture(scope="module")
def teacher(tiny_bundle):
    from ferray.bundle.load import load_bundle

    ensemble, _ = load_bundle(tiny_bundle, device="cpu")
    return ensemble


def test_the_bank_is_the_same_from_the_same_seed_and_refused_for_another_teacher_or_data(
    teacher, tiny_bundle, synth_faces, tmp_path
):
    faces, ids = torch.from_numpy(synth_faces[0][:8]), np.arange(8)
    probs = teacher_probs(teacher, faces, ids, 12, seed=1, augment=AUGMENT)
    assert probs.shape == (8, 12, 7) and torch.allclose(probs.sum(-1), torch.ones(8, 12), atol=1e-4)
    assert torch.equal(teacher_probs(teacher, faces, ids, 12, seed=1, augment=AUGMENT), probs)
    assert (probs[:, 10] - probs[:, 11]).abs().max() > 0  # two augmented views (an untrained teacher differs little)
    # a chunk of the same faces gets the same answers: nothing depends on the batch
    assert torch.allclose(teacher_probs(teacher, faces[5:], ids[5:], 12, 1, AUGMENT), probs[5:], atol=1e-5)

    me = teacher_identity(tiny_bundle)
    manifest = bank_manifest("Training", "blake2b64-sum:aaaa", me, 1, 12, AUGMENT)
    folder = save_bank(tmp_path / "bank", probs.numpy(), manifest)
    assert np.allclose(load_bank(folder, manifest), probs.numpy(), atol=1e-3)
    other_data = manifest | {"data_checksum": "blake2b64-sum:bbbb"}
    named = "data_checksum: the bank's 'blake2b64-sum:aaaa', expected 'blake2b64-sum:bbbb'"
    with pytest.raises(BankMismatch, match=named):
        load_bank(folder, other_data)
    other_teacher = manifest | {"teacher": {"name": "bundle", "digest": "blake2b64:0"}}
    with pytest.raises(BankMismatch, match=f"teacher: the bank's .*{me['digest']}.*expected .*blake2b64:0"):
        load_bank(folder, other_teacher)


def test_the_loss_pulls_the_student_toward_the_teacher(synth_faces):
    from ferray.models import build_model

    torch.manual_seed(0)
    student = build_model("xception_a_tiny", num_classes=7)
    images = torch.from_numpy(synth_faces[0][:32])
    x = render(images, *view_params(0, np.arange(32), np.full(32, 4), AUGMENT, 44, 48), 44)
    teacher = torch.distributions.Dirichlet(torch.full((7,), 0.5)).sample((32,))
    labels = teacher.argmax(-1)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    kls = []
    for _ in range(30):
        loss, parts = distillation_loss(student(x), teacher, labels, temperature=2.0, label_share=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kls.append(parts["kl"].item())
    assert kls[-1] < 0.5 * kls[0], kls


@pytest.mark.slow
def test_the_bank_made_by_ray_data_is_the_teachers_answers_in_the_splits_order(
    ray_session, teacher, tiny_bundle, prepared_synth
):
    import json

    from ferray.data.contract import load_split
    from ferray.distill.bank import face_keys
    from ferray.distributed.bank import make_bank

    folder = make_bank(str(tiny_bundle), prepared_synth, "PublicTest", views=11, seed=3, batch_size=16)
    manifest = json.loads((folder / "manifest.json").read_text())
    data_manifest = json.loads((prepared_synth / "manifest.json").read_text())
    assert manifest["data_checksum"] == data_manifest["checksum"] and manifest["views"] == 11
    assert manifest["teacher"] == teacher_identity(tiny_bundle)
    bank = load_bank(folder, manifest)
    images, _, ids = load_split(prepared_synth, "PublicTest")
    direct = teacher_probs(teacher, torch.from_numpy(images), face_keys(ids), 11, 3, AugmentConfig())
    assert bank.shape == tuple(direct.shape) and np.allclose(bank, direct.numpy(), atol=2e-3)


# ------------------------------------------------------------------------------------------ student
def _student_cfg(data, bank, *sets):
    from ferray.config import load_config

    return load_config(
        None,
        [
            "model.name=xception_a_tiny",
            f"data.path={data}",
            *([f"distill.bank={bank}"] if bank else []),
            "train.batch_size=32",
            "train.amp=false",
            "train.channels_last=false",
            "loss.center_lambda=0",
            *sets,
        ],
    )


def _fake_bank(data, folder, views=12, seed=4, shift=1, checksum=None):
    """A bank on the Training split whose teacher answers (label + shift) mod 7 on every view, a
    little softened: a teacher that disagrees with the labels, so what the student learns shows."""
    from ferray.data.contract import load_split, read_manifest

    _, labels, _ = load_split(data, "Training")
    probs = np.full((len(labels), views, 7), 0.02, np.float32)
    probs[np.arange(len(labels)), :, (labels + shift) % 7] = 0.88
    identity = {"name": "fake", "digest": "blake2b64:fake"}
    manifest = bank_manifest("Training", checksum or read_manifest(data)["checksum"], identity, seed, views, AUGMENT)
    return save_bank(folder, probs, manifest)


def test_a_student_sees_the_banks_own_views_and_their_answers(prepared_synth, tmp_path):
    from ferray.data.contract import load_split
    from ferray.distill.bank import face_keys
    from ferray.distill.student import load_teacher
    from ferray.distributed.train import read_in_key_order

    folder = _fake_bank(prepared_synth, tmp_path / "bank")
    cfg = _student_cfg(prepared_synth, folder)
    teacher = load_teacher(cfg, torch.device("cpu"))
    images, labels, keys = read_in_key_order(cfg, torch.device("cpu"))
    x, answers = teacher.lesson(images[:20], keys[:20], seed=9, crop=44)
    _, split_labels, ids = load_split(prepared_synth, "Training")
    rows = teacher.rows(keys[:20])
    assert [ids[r] for r in rows] and np.array_equal(split_labels[rows], labels[:20].numpy())  # the right faces
    views = teacher.pick_views(rows, 9)
    expected = render(images[:20], *view_params(4, face_keys([ids[r] for r in rows]), views, AUGMENT, 44, 48), 44)
    assert torch.allclose(x, expected) and torch.equal(answers.argmax(-1), (labels[:20] + 1) % 7)
    assert len(set(teacher.pick_views(np.arange(len(ids)), 9))) == 12  # every view is drawn
    assert not np.array_equal(teacher.pick_views(rows, 10), views)  # another epoch, other views


def test_a_student_learns_its_teachers_answers_not_only_the_labels(prepared_synth, tmp_path):
    from ferray import engine
    from ferray.distributed.train import read_in_key_order

    folder = _fake_bank(prepared_synth, tmp_path / "bank")
    cfg = _student_cfg(prepared_synth, folder, "distill.label_share=0", "optim.lr=0.01")
    state = engine.build_state(cfg, torch.device("cpu"))
    images, labels, keys = read_in_key_order(cfg, torch.device("cpu"))
    batches = engine.TensorBatches(images, labels, 32, keys=keys)
    rows = [engine.train_one_epoch(state, batches.epoch(e), len(batches)) for e in range(8)]
    assert rows[-1]["train_kl"] < 0.6 * rows[0]["train_kl"], [r["train_kl"] for r in rows]
    state.model.eval()
    with torch.no_grad():
        answers = state.model(engine.train_views(images, AugmentConfig(rotation=0, shift=0, scale=0, flip=False), 1))
    agree = (answers.argmax(-1) == (labels + 1) % 7).float().mean().item()
    with_labels = (answers.argmax(-1) == labels).float().mean().item()
    # the teacher's answer, which is never the label (chance: 1/7), over the labels' (label_share 0)
    assert agree > 0.3 and agree > 2 * with_labels, (agree, with_labels)


def test_a_bank_of_other_data_or_for_a_stream_is_refused_naming_it(prepared_synth, tmp_path):
    from ferray import engine
    from ferray.config import ConfigError

    folder = _fake_bank(prepared_synth, tmp_path / "bank", checksum="blake2b64-sum:other")
    named = r"data_checksum: the bank's 'blake2b64-sum:other', expected 'blake2b64-sum:"
    with pytest.raises(BankMismatch, match=named):
        engine.build_state(_student_cfg(prepared_synth, folder), torch.device("cpu"))
    with pytest.raises(BankMismatch, match="no readable teacher bank manifest"):
        engine.build_state(_student_cfg(prepared_synth, tmp_path / "absent"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="distill.bank needs train.loader: cache"):
        _student_cfg(prepared_synth, folder, "train.loader=stream")


def test_the_banks_progress_says_how_far_how_fast_and_how_long_is_left():
    from ferray.logs import FaceProgress

    now = [0.0]
    progress = FaceProgress("distill bank", 1000, 12, every_s=60, clock=lambda: now[0])
    now[0] = 30.0
    assert progress.update(100) is None  # under a minute since the start
    now[0] = 120.0
    line = progress.update(300)  # 400 faces in 120 s: 40 views/s, 600 faces left: 180 s
    assert line == "distill bank: 400/1,000 faces (40%), 40 views/s, ~3 min left"
    now[0] = 130.0
    assert progress.update(600).startswith("distill bank: 1,000/1,000 faces (100%)")  # the last one always


# ------------------------------------------------------------------------------------ online teacher
def test_an_online_teacher_answers_the_students_own_views_new_ones_each_epoch(tiny_bundle, synth_faces):
    """distill.online: the teacher bundle answers the very views the student is shown, drawn as
    training augments them; the same epoch draws the same views again (a resumed epoch), another
    epoch others."""
    from ferray.bundle.load import load_bundle
    from ferray.distill.student import OnlineTeacher

    ensemble, _ = load_bundle(tiny_bundle, device="cpu", members="a")  # one member, so its answer shows
    images = torch.from_numpy(synth_faces[0][:8])
    x, probs = OnlineTeacher(ensemble, AUGMENT).lesson(images, None, seed=3, crop=44)
    assert x.shape == (8, 1, 44, 44) and probs.shape == (8, 7)
    assert torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-4)
    member = ensemble.members["a"]
    assert member.cfg.augment.crop == 44 and member.input == "face"  # it sees the student's view as is
    runner, _ = ensemble.runner("a")
    with torch.no_grad():
        own = ensemble.fuse({"a": runner(x).float().softmax(-1)})
    assert torch.allclose(probs, own, atol=1e-5)
    again = OnlineTeacher(ensemble, AUGMENT)
    assert torch.equal(again.lesson(images, None, seed=3, crop=44)[0], x)  # the epoch's stream, drawn again
    assert not torch.equal(again.lesson(images, None, seed=3, crop=44)[0], x)  # the next batch: new views
    assert not torch.equal(OnlineTeacher(ensemble, AUGMENT).lesson(images, None, seed=4, crop=44)[0], x)
    whole, _ = load_bundle(tiny_bundle, device="cpu")  # a member behind the SR generator answers too
    x, probs = OnlineTeacher(whole, AUGMENT).lesson(images, None, seed=3, crop=44)
    assert probs.shape == (8, 7) and torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-4)


def test_a_student_trains_with_an_online_teacher_and_a_bank_and_online_are_refused_together(
    prepared_synth, tiny_bundle, tmp_path
):
    from ferray import engine
    from ferray.distill.student import OnlineTeacher
    from ferray.errors import ConfigError

    cfg = _student_cfg(prepared_synth, "", "distill.online=true", f"distill.teacher={tiny_bundle}", "distill.bank=")
    state = engine.build_state(cfg, torch.device("cpu"))
    assert isinstance(state.teacher, OnlineTeacher)
    images, labels = torch.from_numpy(np.zeros((64, 48, 48), np.uint8)), torch.zeros(64, dtype=torch.long)
    row = engine.train_one_epoch(state, engine.TensorBatches(images, labels, 32).epoch(0), 2)
    assert row["train_kl"] > 0 and np.isfinite(row["train_loss"])  # the KL to the teacher is in the loss
    with pytest.raises(ConfigError, match="distill.bank and distill.online: choose one teacher"):
        _student_cfg(prepared_synth, tmp_path / "bank", "distill.online=true")
