"""The engine without Ray: learning, checkpoints, schedules."""

import math

import pytest
import torch

from ferray import engine
from ferray.config import OptimConfig, load_config
from ferray.errors import CheckpointError
from ferray.sittings import planned_epochs


def tiny_config(*extra):
    return load_config(
        None,
        [
            "model.name=xception_a_tiny",
            "train.epochs=4",
            "train.batch_size=32",
            "optim.lr=0.003",
            "loss.center_lambda=0.001",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def synth_tensors(synth_faces):
    images, labels, splits = synth_faces
    train = splits == "Training"
    return (
        torch.from_numpy(images[train]),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[~train]),
        torch.from_numpy(labels[~train]),
    )


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "optim.name=sgd",
            "optim.lr=0.05",
            "loss.label_smoothing=0.1",
            "augment.erase_prob=0.3",
            "model.dropout=0.1",
            "optim.grad_clip=5.0",
        ],
    ],
)
def test_loss_goes_down_in_a_few_steps(synth_tensors, extra):
    x, y, _, _ = synth_tensors
    cfg = tiny_config(*extra)
    state = engine.build_state(cfg, torch.device("cpu"))
    batch = engine.TensorBatches(x[:32], y[:32], 32)
    losses = [engine.train_one_epoch(state, batch, 1)["train_loss"] for _ in range(15)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert all(math.isfinite(v) for v in losses)


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path, synth_tensors):
    x, y, xt, yt = synth_tensors
    cfg = tiny_config()
    state = engine.build_state(cfg, torch.device("cpu"))
    train_metrics = engine.train_one_epoch(state, engine.TensorBatches(x, y, 32), 3)
    eval_metrics = engine.evaluate(
        state.model, engine.TensorBatches(xt, yt, 64, shuffle=False, drop_last=False), 44, False, torch.device("cpu")
    )
    row = engine.end_epoch(state, train_metrics, eval_metrics)
    path = engine.save_checkpoint(tmp_path / "c.pt", state, row)
    payload = torch.load(path, weights_only=True)  # plain types and tensors only
    assert payload["config"]["model"]["name"] == "xception_a_tiny" and payload["epoch"] == 1

    model, cfg2, _ = engine.model_from_checkpoint(path)
    assert cfg2 == cfg
    state.model.eval()
    with torch.no_grad():
        probe = torch.randn(2, 1, 44, 44)
        assert torch.allclose(model(probe), state.model(probe), atol=1e-6)

    resumed = engine.build_state(cfg, torch.device("cpu"))
    engine.restore_state(resumed, engine.load_checkpoint(path))
    assert resumed.epoch == 1 and torch.equal(resumed.loss_fn.center.centers, state.loss_fn.center.centers)
    assert resumed.history == state.history

    # A resume plans from its own config: more epochs extend the run (the checkpoint planned 4)...
    longer = engine.build_state(tiny_config("train.epochs=6"), torch.device("cpu"))
    engine.restore_state(longer, engine.load_checkpoint(path))
    assert longer.schedule.epochs == 6
    # ...and a time budget re-plans from the epoch times recorded so far (one epoch of 60 s here).
    state.history[-1]["epoch_seconds"] = 60.0
    path = engine.save_checkpoint(tmp_path / "c.pt", state, row)
    budgeted = engine.build_state(tiny_config("train.epochs=10", "train.budget_minutes=3"), torch.device("cpu"))
    engine.restore_state(budgeted, engine.load_checkpoint(path))
    assert budgeted.schedule.epochs == 3


def test_evaluate_reports_accuracy_per_class_and_confusion(synth_tensors):
    _, _, xt, yt = synth_tensors
    model = engine.build_state(tiny_config(), torch.device("cpu")).model
    result = engine.evaluate(
        model, engine.TensorBatches(xt, yt, 16, shuffle=False, drop_last=False), 44, True, torch.device("cpu")
    )
    assert result["samples"] == len(yt) and 0 <= result["accuracy"] <= 1
    assert sum(map(sum, result["confusion"])) == len(yt) and set(result["per_class"]) >= {"happy", "neutral"}


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        engine.load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ferray checkpoint"):
        engine.load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        engine.load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize(
    "schedule, checks",
    [
        ("none", [(0, 1.0), (50, 1.0)]),
        ("cosine", [(0, 1.0), (50, 0.5), (100, 0.0)]),
        ("step", [(0, 1.0), (30, 0.1), (60, 0.01)]),
    ],
)
def test_lr_schedules(schedule, checks):
    sched = engine.LRSchedule(OptimConfig(schedule=schedule, step_epochs=[30, 60]), epochs=100)
    for epoch, factor in checks:
        assert sched.factor(epoch) == pytest.approx(factor, abs=1e-6)


def test_warmup_and_plateau():
    sched = engine.LRSchedule(OptimConfig(schedule="plateau", warmup_epochs=2, patience=1, gamma=0.5), 10)
    assert sched.factor(1) == pytest.approx(0.5)
    for acc in (0.5, 0.4, 0.4):  # best, then two epochs without improvement > patience 1
        sched.on_eval(acc)
    assert sched.factor(5) == pytest.approx(0.5)


def test_each_rank_draws_its_own_stream_reproducibly(synth_tensors):
    """DDP ranks must not draw the same augmentations and dropout masks; the same rank and epoch
    must draw the same ones again (a resumed run repeats an uninterrupted one)."""
    x, y, _, _ = synth_tensors
    cfg = tiny_config("model.dropout=0.5")
    batch = [(x[:32], y[:32])]

    def first_step_loss(rank: int, epoch: int) -> float:
        state = engine.build_state(cfg, torch.device("cpu"), rank=rank)
        state.epoch = epoch
        return engine.train_one_epoch(state, batch, 1)["train_loss"]

    assert first_step_loss(0, 0) == first_step_loss(0, 0)
    assert first_step_loss(0, 0) != first_step_loss(1, 0)
    assert first_step_loss(0, 0) != first_step_loss(0, 1)
    # ... while every rank starts from the same weights.
    a, b = (engine.build_state(cfg, torch.device("cpu"), rank=r).core.state_dict() for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    seeds = {engine.epoch_seed(0, rank, epoch) for rank in range(8) for epoch in range(300)}
    assert len(seeds) == 8 * 300


def test_a_changed_budget_on_resume_plans_from_the_epochs_timed():
    assert planned_epochs([], 600, 40) == 40  # nothing measured yet
    assert planned_epochs([100.0], 600, 40) == 6  # 500 s left at 100 s an epoch
    assert planned_epochs([130.0, 100.0, 100.0], 600, 40) == 5  # the first epoch's warm-up is not typical
    assert planned_epochs([100.0, 200.0, 200.0], 600, 40) == 3  # a slower machine shortens the run
    assert planned_epochs([10.0], 600, 8) == 8  # never more than train.epochs
    assert planned_epochs([100.0, 100.0], 0, 40) == 40  # no budget
    # The schedule spans the plan and resumes with it.
    sched = engine.LRSchedule(OptimConfig(schedule="cosine"), epochs=40)
    sched.epochs = 6
    restored = engine.LRSchedule(OptimConfig(schedule="cosine"), epochs=40)
    restored.load_state_dict(sched.state_dict())
    assert restored.epochs == 6 and restored.factor(6.0) == pytest.approx(0.0, abs=1e-9)


def test_center_share_is_reported(synth_tensors):
    x, y, _, _ = synth_tensors
    state = engine.build_state(tiny_config("loss.center_lambda=0.1"), torch.device("cpu"))
    row = engine.train_one_epoch(state, [(x[:32], y[:32])], 1)
    assert row["train_center_share"] == pytest.approx(0.1 * row["train_center"] / row["train_ce"])


def test_a_long_epoch_says_how_far_it_is_and_how_long_is_left():
    now, lines = [0.0], []
    progress = engine.EpochProgress(17, 25, 400, every_s=60, echo=lines.append, clock=lambda: now[0])
    for step in range(1, 401):
        now[0] = step * 2.0  # 2 s a step of 64 faces: 32 img/s
        progress.update(step, step * 64)
    assert len(lines) == 13  # one a minute of the 800 s
    assert lines[0] == "epoch 17/25: step 30/400 (8%), 32 img/s, ~12 min left"
    assert lines[-1].startswith("epoch 17/25: step 390/400 (98%)") and lines[-1].endswith("~20 s left")
    quiet = engine.EpochProgress(1, 2, 10, every_s=60, rank=1, echo=lines.append, clock=lambda: now[0] + 1e6)
    quiet.update(5, 320)  # other ranks stay quiet, as does every_s 0
    engine.EpochProgress(1, 2, 10, every_s=0, echo=lines.append, clock=lambda: now[0] + 1e6).update(5, 320)
    assert len(lines) == 13


def test_training_prints_progress_within_the_epoch(synth_tensors, capsys):
    x, y, _, _ = synth_tensors
    state = engine.build_state(tiny_config("train.progress_seconds=1e-9"), torch.device("cpu"))
    engine.train_one_epoch(state, engine.TensorBatches(x[:96], y[:96], 32), 3)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in printed] == [f"epoch 1/4: step {i}/3 ({i / 3:.0%})" for i in (1, 2, 3)]


class _FailsBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward compile failed (a stand-in)")


def test_a_compile_failure_in_the_backward_turns_training_eager(synth_tensors, capsys):
    x, y, _, _ = synth_tensors
    state = engine.build_state(tiny_config("train.compile=true"), torch.device("cpu"))
    assert isinstance(state.model, engine.compiled)
    eager = state.model.module

    class CompiledForward(torch.nn.Module):  # what a compiled graph whose backward cannot compile does
        def forward(self, *args, **kwargs):
            logits, features = eager(*args, **kwargs)
            return _FailsBackward.apply(logits), features

    state.model._compiled = CompiledForward()
    row = engine.train_one_epoch(state, engine.TensorBatches(x[:64], y[:64], 32), 2)
    assert row["train_images"] == 64 and math.isfinite(row["train_loss"])
    assert state.model.fallback.startswith("RuntimeError: backward compile failed")
    assert "training continues in eager mode" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="eager fails too"):  # an error of eager's own is not retried
        state.model.module.register_forward_hook(lambda *a: _raise(RuntimeError("eager fails too")))
        engine.train_one_epoch(state, engine.TensorBatches(x[:32], y[:32], 32), 1)


def _raise(error):
    raise error
