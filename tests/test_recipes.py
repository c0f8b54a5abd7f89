"""The recipes: fine-tuning never on random weights, the scratch fallback, the SR generator kept,
compilation that falls back to eager (Ray-free)."""

from pathlib import Path

import pytest
import torch
from support import ferray_messages

from ferray.config import ConfigError, load_config, load_runnable_config
from ferray.models import build_model, num_params
from ferray.tasks import SR

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture()
def no_weights(tmp_path):
    """A torch hub folder with no cached weights in it."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(previous)


def test_the_fine_tuning_recipe_refuses_random_weights():
    with pytest.raises(ConfigError, match="fine-tuning recipe"):
        load_config(EXPERIMENTS / "model_b.yaml", ["model.pretrained=none"])
    assert load_config(EXPERIMENTS / "model_b.yaml", ["model.pretrained=none", "optim.backbone_lr_ratio=1"])


def test_missing_weights_switch_to_the_scratch_recipe(no_weights):
    with ferray_messages() as said:
        cfg = load_runnable_config(EXPERIMENTS / "model_b.yaml", ["data.path=/data/sr", "train.epochs=3"])
    assert cfg.name == "model_b_scratch" and cfg.model.name == "resnet50_b_scratch" and cfg.model.pretrained == "none"
    assert cfg.optim.backbone_lr_ratio == 1.0 and (cfg.data.path, cfg.train.epochs) == ("/data/sr", 3)
    assert "not on this machine" in said[0] and "model_b_scratch.yaml" in said[0]


def test_missing_weights_without_a_scratch_recipe_name_the_file(no_weights):
    with pytest.raises(
        ConfigError, match="model_b_bicubic.yaml: model.pretrained=imagenet: resnet50's ImageNet weights"
    ):
        load_runnable_config(EXPERIMENTS / "model_b_bicubic.yaml")
    with pytest.raises(ConfigError, match="model.name: .*unknown model 'resnet51'"):
        load_runnable_config(EXPERIMENTS / "model_b.yaml", ["model.name=resnet51"])


def test_the_scratch_model_has_a_stem_for_small_faces():
    model = build_model("resnet50_b_scratch").eval()
    # resnet50_b less its 7x7 one-channel stem (3,136), plus a 3x3 one (576)
    assert num_params(model) == 23_516_103 - 3_136 + 576 == 23_513_543
    stem = model.backbone.conv1
    assert (
        stem.kernel_size == (3, 3) and stem.stride == (2, 2) and isinstance(model.backbone.maxpool, torch.nn.Identity)
    )
    logits = model(torch.rand(2, 1, 88, 88))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("resnet50_b_scratch", pretrained=__file__)


def test_the_kept_generator_is_the_adversarial_one(tmp_path, synth_faces):
    """PSNR favors the pixel-MSE pre-training; the run must keep the adversarial generator."""
    from ferray.data.memory import Faces
    from ferray.local import train_local
    from ferray.sr.engine import sr_choice

    assert sr_choice(2, adversarial=True) > sr_choice(9, adversarial=False) and sr_choice(3, True) > sr_choice(2, True)
    images, labels, _ = synth_faces
    faces = Faces(images[:64], labels[:64], [str(i) for i in range(64)])
    cfg = load_config(
        EXPERIMENTS / "debug_srgan.yaml",
        [
            "sr.generator_channels=8",
            "sr.generator_blocks=1",
            "sr.discriminator_channels=8",
            "sr.pretrain_epochs=2",
            "train.epochs=3",
            "sr.content=mse",
        ],
    )
    state, run = train_local(cfg, faces, faces, torch.device("cpu"), tmp_path / "sr", task=SR)
    rows = state.history
    assert [r["phase"] for r in rows] == ["pretrain", "pretrain", "adversarial"] or rows[-1]["sr_choice"] > 10**6
    assert run.best["epoch"] == 3
    assert torch.load(tmp_path / "sr" / "best.pt", weights_only=True)["epoch"] == 3


def test_compilation_falls_back_to_eager(monkeypatch):
    from ferray import engine

    def broken_compile(model, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = build_model("xception_a_tiny").eval()
    wrapped = engine.compiled(model)
    x = torch.rand(2, 1, 44, 44)
    assert torch.equal(wrapped(x), model(x)) and "no C++ compiler" in wrapped.fallback
    assert engine.unwrap(wrapped) is model  # checkpoints and evaluation see the bare model


def test_the_cpu_model_b_is_resnet18_with_a_one_channel_imagenet_stem():
    import torchvision

    model = build_model("resnet18_b")
    # torchvision's ResNet18 (11,689,512) less its 1000-way head (513,000) and two thirds of its
    # 7x7 RGB stem (6,272), plus the 7-way head (3,591)
    assert num_params(torchvision.models.resnet18()) == 11_689_512
    assert num_params(model) == 11_689_512 - 513_000 - 6_272 + 3_591 == 11_173_831
    assert model.keras_depth() == 18 and model.backbone.conv1.kernel_size == (7, 7)


def test_the_cpu_srgan_recipe_trains_both_phases(tmp_path, synth_faces):
    from ferray.data.memory import Faces
    from ferray.local import train_local
    from ferray.sr.engine import generator_spec

    images, labels, _ = synth_faces
    faces = Faces(images[:64], labels[:64], [str(i) for i in range(64)])
    cfg = load_config(EXPERIMENTS / "srgan_cpu.yaml", ["sr.pretrain_epochs=1", "train.epochs=2"])
    assert (cfg.sr.generator_channels, cfg.sr.generator_blocks, cfg.sr.content) == (16, 4, "mse")
    state, run = train_local(cfg, faces, faces, torch.device("cpu"), tmp_path / "sr", task=SR)
    assert [r["phase"] for r in state.history] == ["pretrain", "adversarial"]
    assert all(torch.isfinite(torch.tensor(r["eval_psnr"])) for r in state.history)
    assert generator_spec(cfg).channels == 16 and run.best["epoch"] == 2


def test_the_cpu_model_b_recipe_trains_on_upscaled_faces(tmp_path, synth_faces):
    from ferray.data.memory import Faces
    from ferray.local import train_local
    from ferray.tasks import CLASSIFIER

    images, labels, _ = synth_faces
    upscaled = torch.nn.functional.interpolate(
        torch.from_numpy(images[:64]).float().unsqueeze(1), scale_factor=2, mode="bicubic"
    )
    upscaled = upscaled.clamp(0, 255).round().to(torch.uint8).squeeze(1).numpy()  # (64, 96, 96), as `sr upscale` writes
    faces = Faces(upscaled, labels[:64], [str(i) for i in range(64)])
    cfg = load_config(EXPERIMENTS / "model_b_cpu.yaml", ["train.epochs=1", "train.compile=false"])
    assert (cfg.model.name, cfg.optim.name, cfg.loss.center_lambda, cfg.augment.crop) == ("resnet18_b", "sgd", 0.0, 88)
    state, run = train_local(cfg, faces, faces, torch.device("cpu"), tmp_path / "b", task=CLASSIFIER)
    row = state.history[-1]
    assert row["epoch"] == 1 and 0.0 <= row["eval_acc"] <= 1.0 and row["eval_weights"] in ("ema", "raw")
    assert run.best["epoch"] == 1
    kept = torch.load(tmp_path / "b" / "best.fp16.pt", weights_only=True)  # the run's weights worth keeping
    assert kept["kind"] == "classifier" and kept["epoch"] == 1
    assert {v.dtype for v in kept["model"].values() if v.is_floating_point()} == {torch.float16}
