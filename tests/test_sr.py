"""SRGAN: networks, losses, quality metrics, training steps, content-loss choice, upscaling."""

import math

import numpy as np
import pytest
import torch

from ferray.config import SRConfig, load_config
from ferray.data.contract import DataError, read_manifest
from ferray.data.synth import SynthSpec, synthesize
from ferray.engine import CheckpointError, TensorBatches, build_state, save_checkpoint
from ferray.sr import engine as sr_engine
from ferray.sr.inference import upscale_local
from ferray.sr.losses import ContentError, ContentLoss, adversarial_loss, perceptual_loss, resolve_content
from ferray.sr.nets import Discriminator, Generator, GeneratorSpec, make_lr
from ferray.sr.quality import psnr, ssim


@pytest.mark.parametrize("bicubic_skip", [True, False])
def test_generator_doubles_the_size(bicubic_skip):
    g = Generator(GeneratorSpec(channels=8, blocks=2, bicubic_skip=bicubic_skip)).eval()
    assert g(torch.rand(3, 1, 24, 24)).shape == (3, 1, 48, 48)
    assert g(torch.rand(2, 1, 48, 48)).shape == (2, 1, 96, 96)


def test_discriminator_gives_one_logit_per_face():
    d = Discriminator(channels=8)
    assert d(torch.rand(5, 1, 48, 48)).shape == (5,) and d(torch.rand(2, 1, 96, 96)).shape == (2,)


def test_loss_terms_on_a_toy_case():
    zero = torch.zeros(4)
    assert adversarial_loss(zero, True).item() == pytest.approx(math.log(2))
    assert adversarial_loss(torch.full((4,), 20.0), True).item() == pytest.approx(0, abs=1e-6)
    content = torch.tensor(0.5)
    assert perceptual_loss(content, zero, 1e-3).item() == pytest.approx(0.5 + 1e-3 * math.log(2))
    mse = ContentLoss(SRConfig(content="mse"))
    a, b = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)
    assert mse(a, b).item() == pytest.approx(0.01)
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 on a 0..1 scale
    faces = torch.rand(2, 1, 48, 48)
    assert torch.allclose(ssim(faces, faces), torch.ones(2), atol=1e-5) and (ssim(faces, 1 - faces) < 0.5).all()


def test_lr_inputs_are_bicubic_halves():
    hr = torch.rand(2, 1, 48, 48)
    assert make_lr(hr).shape == (2, 1, 24, 24)


def sr_config(*extra):
    return load_config(
        None,
        [
            "sr.generator_channels=8",
            "sr.generator_blocks=2",
            "sr.discriminator_channels=8",
            "sr.pretrain_epochs=1",
            "train.epochs=2",
            "train.batch_size=16",
            "sr.lr_g=0.003",
            "sr.content=mse",
            *extra,
        ],
    )


def test_a_few_steps_reduce_the_content_loss(synth_faces):
    images, labels, _ = synth_faces
    state = sr_engine.build_sr_state(sr_config(), torch.device("cpu"))
    batches = TensorBatches(torch.from_numpy(images[:64]), torch.from_numpy(labels[:64]), 16)
    losses = [sr_engine.train_sr_epoch(state, batches)["train_pixel_mse"] for _ in range(6)]
    assert losses[-1] < losses[0] * 0.7, losses
    state.epoch = 1  # the adversarial phase runs too, and updates the discriminator
    row = sr_engine.train_sr_epoch(state, batches)
    assert row["phase"] == "adversarial" and row["train_d_loss"] > 0


def test_sr_training_prints_progress_within_the_epoch(synth_faces, capsys):
    images, labels, _ = synth_faces
    state = sr_engine.build_sr_state(sr_config("train.progress_seconds=1e-9"), torch.device("cpu"))
    sr_engine.train_sr_epoch(state, TensorBatches(torch.from_numpy(images[:32]), torch.from_numpy(labels[:32]), 16), 2)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in printed] == ["epoch 1/2: step 1/2 (50%)", "epoch 1/2: step 2/2 (100%)"]


def test_content_loss_choice_is_what_exists(tmp_path):
    assert resolve_content(SRConfig(content="auto")) == "mse"  # nothing cached on this machine
    with pytest.raises(ContentError, match="vgg19-dcbb9e9d.pth"):
        resolve_content(SRConfig(content="vgg19"))
    with pytest.raises(ContentError, match="content_checkpoint"):
        resolve_content(SRConfig(content="model_a"))
    # a Model A checkpoint of this project: auto picks it, and its features drive the loss
    state = build_state(load_config(None, ["model.name=xception_a_tiny"]), torch.device("cpu"))
    save_checkpoint(tmp_path / "a.pt", state, {"eval_acc": 0.5})
    cfg = SRConfig(content="auto", content_checkpoint=str(tmp_path / "a.pt"))
    assert resolve_content(cfg) == "model_a"
    loss = ContentLoss(cfg)
    sr = torch.rand(2, 1, 48, 48, requires_grad=True)
    value = loss(sr, torch.rand(2, 1, 48, 48))
    value.backward()
    assert value.item() > 0 and sr.grad is not None
    assert all(not p.requires_grad for p in loss.parameters())  # the feature network stays fixed
    # VGG19 from a local weights file (no internet needed): the same as loading it by hand
    from torchvision.models import vgg19

    torch.save(vgg19().state_dict(), tmp_path / "vgg19.pth")
    cfg = SRConfig(content="vgg19", content_weights=str(tmp_path / "vgg19.pth"), content_layer="vgg22")
    assert resolve_content(cfg) == "vgg19" and ContentLoss(cfg)(sr, sr.detach()).item() == pytest.approx(0)


@pytest.fixture(scope="module")
def sr_checkpoint(tmp_path_factory, synth_faces):
    folder = tmp_path_factory.mktemp("sr")
    cfg = sr_config()
    state = sr_engine.build_sr_state(cfg, torch.device("cpu"))
    images, labels, _ = synth_faces
    sr_engine.train_sr_epoch(state, TensorBatches(torch.from_numpy(images[:32]), torch.from_numpy(labels[:32]), 16))
    return sr_engine.save_sr_checkpoint(folder / "g.pt", state, {"eval_psnr": 25.0})


def test_upscale_local_writes_the_contract_at_96(tmp_path, sr_checkpoint):
    synthesize(tmp_path / "d", SynthSpec(n=35, seed=4))
    manifest = upscale_local(tmp_path / "d", tmp_path / "up", "srgan", str(sr_checkpoint), batch_size=8)
    source = read_manifest(tmp_path / "d")
    assert manifest["image_size"] == [96, 96] and manifest["splits"] == source["splits"]
    assert manifest["source"]["generator_checkpoint"].endswith("g.pt")
    with pytest.raises(DataError, match="already exists"):
        upscale_local(tmp_path / "d", tmp_path / "up", "bicubic")
    with pytest.raises(DataError, match="96x96 faces; upscaling takes the prepared 48x48"):
        upscale_local(tmp_path / "up", tmp_path / "up2", "bicubic")


def test_a_classifier_checkpoint_is_not_a_generator(tmp_path):
    state = build_state(load_config(None, ["model.name=xception_a_tiny"]), torch.device("cpu"))
    save_checkpoint(tmp_path / "a.pt", state, {})
    with pytest.raises(CheckpointError, match="a classifier checkpoint, expected a sr one"):
        sr_engine.generator_from_checkpoint(tmp_path / "a.pt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["srgan", "bicubic"])
def test_two_actors_match_the_single_process_loop(ray_session, tmp_path, sr_checkpoint, method):
    from ferray.distributed.upscale import upscale

    synthesize(tmp_path / "d", SynthSpec(n=140, seed=5))
    checkpoint = str(sr_checkpoint) if method == "srgan" else None
    local = upscale_local(tmp_path / "d", tmp_path / "local", method, checkpoint, batch_size=64)
    ray_out = upscale(tmp_path / "d", tmp_path / "ray", method, checkpoint, actors=2, batch_size=16)
    assert ray_out["rows"] == local["rows"] == 140 and ray_out["splits"] == local["splits"]
    assert ray_out["checksum"] == local["checksum"]  # ids, labels, splits and every pixel, in any order
    from ferray.data.contract import load_split

    a, la, ia = load_split(tmp_path / "local", "Training")
    b, lb, ib = load_split(tmp_path / "ray", "Training")
    assert ia == ib and np.array_equal(la, lb) and np.array_equal(a, b)


def test_the_generator_step_leaves_the_discriminator_out_of_its_backward(synth_faces):
    # Under DDP each gradient the discriminator accumulates is an all-reduce: its own step needs one
    # per step, and the generator's step none.
    images, labels, _ = synth_faces
    state = sr_engine.build_sr_state(sr_config(), torch.device("cpu"))
    state.epoch = 1  # adversarial
    accumulated = []
    for p in state.discriminator.parameters():
        p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    steps = 2
    batches = TensorBatches(torch.from_numpy(images[: 16 * steps]), torch.from_numpy(labels[: 16 * steps]), 16)
    sr_engine.train_sr_epoch(state, batches)
    assert len(accumulated) == steps * len(list(state.discriminator.parameters()))
    assert all(p.requires_grad for p in state.discriminator.parameters())


def test_the_driver_decides_the_files_every_worker_reads(tmp_path, monkeypatch):
    # `auto` decided on each node would give ranks on nodes with and without VGG19's weights
    # different losses; ImageNet weights looked up in each node's own cache may be absent there.
    from ferray.distributed.train import pin_outside_files
    from ferray.tasks import CLASSIFIER, get_task

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))  # torch's cache, empty
    cfg = sr_config("sr.content=auto")
    assert pin_outside_files(cfg, get_task("sr")) == {} and cfg.sr.content == "mse"
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "vgg19-dcbb9e9d.pth").write_bytes(b"weights")
    cfg = sr_config("sr.content=auto")
    files = pin_outside_files(cfg, get_task("sr"))
    assert cfg.sr.content == "vgg19" and files == {"sr.content_weights": str(hub / "vgg19-dcbb9e9d.pth")}
    assert cfg.sr.content_weights == str(hub / "vgg19-dcbb9e9d.pth")
    (hub / "resnet18-f37072fd.pth").write_bytes(b"weights")
    cfg = load_config(None, ["model.name=resnet18_b", "model.pretrained=imagenet"])
    assert pin_outside_files(cfg, CLASSIFIER) == {"model.pretrained": str(hub / "resnet18-f37072fd.pth")}
    assert cfg.model.pretrained == str(hub / "resnet18-f37072fd.pth")
