"""Training in sittings: a budget planned once (a fake clock), warm restarts from half-precision weights."""

from types import SimpleNamespace

import pytest
import torch

from ferray import engine
from ferray.config import load_config
from ferray.errors import CheckpointError
from ferray.fit import LocalRun, fit
from ferray.runs import WEIGHTS_FILE, RunFolder
from ferray.sittings import BudgetPlan, warm_start
from ferray.tasks import CLASSIFIER


def tiny(*extra):
    base = [
        "model.name=xception_a_tiny",
        "train.batch_size=16",
        "train.progress_seconds=0",
        "optim.schedule=cosine",
        "optim.lr=0.003",
        "data.selection_split=PublicTest",
    ]
    return load_config(None, [*base, *extra])


class FakeClock:
    """A clock that moves only when told: each training step 'takes' `step_s` seconds."""

    def __init__(self, step_s: float):
        self.now, self.step_s = 0.0, step_s

    def tick(self, *_) -> None:
        self.now += self.step_s

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def faces(tiny_faces):
    return tiny_faces


def _fit(cfg, faces, clock=None, run_dir=None, state=None):
    x, y, xt, yt = faces
    state = state or CLASSIFIER.build(cfg, torch.device("cpu"))
    lrs = []
    state.optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    train = engine.TensorBatches(x, y, cfg.train.batch_size, seed=cfg.train.seed)
    val = engine.TensorBatches(xt, yt, 32, shuffle=False, drop_last=False)
    run = LocalRun(run_dir, CLASSIFIER, cfg) if run_dir else None
    extra = {}
    if clock is not None:
        state.optimizer.register_step_pre_hook(clock.tick)
        extra = {"clock": clock}
    rows = fit(
        CLASSIFIER,
        state,
        train.epoch,
        lambda s: CLASSIFIER.evaluate(s, val),
        len(train),
        on_epoch=run.on_epoch if run else None,
        eval_images=len(yt),
        **extra,
    )
    return state, rows, lrs


def test_the_budget_plan_counts_the_steps_and_evaluations_that_fit():
    clock = FakeClock(1.0)
    clock.now = 20.0  # start-up before the first step
    plan = BudgetPlan(
        budget_s=1000, most=50, steps_per_epoch=100, eval_images=640, batch_size=64, plan_after=40, skip=8, clock=clock
    )
    clock.now += 30.0  # the first steps compile: slow, and not counted
    for step in range(1, 40):
        clock.tick()
        assert plan.after_step(step) is None
    clock.tick()
    epochs = plan.after_step(40)
    # 1 s a step (steps 9-40); an evaluation of 640 faces at 3x the training pace ~ 3.3 s. At step 40, 70 s
    # have passed: the first epoch needs 60 steps + its evaluation more, then whole epochs of ~103.3 s.
    assert epochs == 1 + int((1000 - 70 - (60 + 640 / 64 / 3)) // (100 + 640 / 64 / 3)) == 9
    assert plan.details["step_seconds"] == 1.0 and plan.details["measured_steps"] == 32
    clock.tick()
    assert plan.after_step(41) is None and plan.epochs == 9  # planned once
    assert "9 epoch(s) planned" in plan.describe()
    for budget_s, expected in ((10, 1), (1e9, 50)):  # at least one epoch; at most train.epochs
        clock = FakeClock(1.0)
        plan = BudgetPlan(budget_s, 50, 100, 0, 64, plan_after=40, clock=clock)
        clock.now += 40
        assert plan.plan(40) == expected


def test_a_budgeted_runs_rate_at_every_step_is_its_plan(faces):
    # 6 steps an epoch of 2 s each (evaluations take no time on this clock); the plan is made at the
    # first epoch's last step: 60 s hold the first epoch (12 s) and 3 more of 12 s + ~1.3 s of evaluation.
    cfg = tiny("train.epochs=40", "train.budget_minutes=1", "optim.warmup_epochs=1")
    state, rows, lrs = _fit(cfg, faces, clock=FakeClock(2.0))
    planned = rows[0]["budget_plan"]["planned_epochs"]
    assert planned == 4 and state.epoch == planned == len(rows) and rows[-1]["planned_epochs"] == planned
    assert all(row["planned_epochs"] == planned for row in rows)  # never re-planned
    expected = engine.LRSchedule(cfg.optim, planned)
    steps = 6
    assert len(lrs) == planned * steps
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(cfg.optim.lr * expected.factor(i / steps), rel=1e-9, abs=1e-12), i
    assert lrs[-1] < 0.05 * cfg.optim.lr  # the cosine reaches its floor at the budget's end


def test_a_budgeted_run_planned_after_its_warm_up_holds_the_peak_until_the_plan(faces):
    cfg = tiny("train.epochs=40", "train.budget_minutes=1", "optim.warmup_epochs=0")
    _, rows, lrs = _fit(cfg, faces, clock=FakeClock(2.0))
    assert lrs[:6] == [cfg.optim.lr] * 6  # the first epoch, before the plan: the peak
    planned = engine.LRSchedule(cfg.optim, rows[0]["planned_epochs"])
    assert lrs[6] == pytest.approx(cfg.optim.lr * planned.factor(1.0))


def test_a_warm_restart_starts_at_the_saved_half_precision_weights_and_names_its_chain(tmp_path, faces):
    first_cfg = tiny("train.epochs=1", "model.dropout=0.2", "model.dropout_kind=element")
    first, _, _ = _fit(first_cfg, faces, run_dir=tmp_path / "first")
    RunFolder(tmp_path / "first").write_weights()
    weights = tmp_path / "first" / WEIGHTS_FILE
    assert next(iter(engine.load_checkpoint(weights)["model"].values())).dtype == torch.float16

    cfg = tiny("train.epochs=1", f"train.init={weights}", "model.dropout_kind=element")
    second = CLASSIFIER.build(cfg, torch.device("cpu"))
    batch = faces[2][:8].float()[:, None, 2:46, 2:46] / 255
    with torch.no_grad():
        expected = first.core.eval()(batch)
        started = second.core.eval()(batch)
    assert torch.allclose(started, expected, atol=2e-2), (started - expected).abs().max()
    fresh = CLASSIFIER.build(tiny("train.epochs=1"), torch.device("cpu")).core.eval()
    assert not torch.allclose(fresh(batch), expected)
    assert [link["name"] for link in second.lineage] == [first_cfg.name]
    assert second.lineage[0]["epochs"] == 1 and second.lineage[0]["checksum"].startswith("blake2b64:")

    # The chain goes on: a run started from the second's weights names both.
    second_state, _, _ = _fit(cfg, faces, run_dir=tmp_path / "second", state=second)
    RunFolder(tmp_path / "second").write_weights()
    _, chain = warm_start(tmp_path / "second" / WEIGHTS_FILE, "xception_a_tiny")
    assert len(chain) == 2 and chain[0] == second.lineage[0]


def test_a_students_sitting_names_its_teacher_bank_in_the_chain(tmp_path):
    """A link of the chain that was taught by a teacher bank says which (the model card shows it)."""
    from ferray.report.model_card import _run_lines

    payload = engine.checkpoint_payload(
        CLASSIFIER.build(tiny("train.epochs=1"), torch.device("cpu")), {"eval_acc": 0.5}
    )
    for bank, expected in (("data/teacher_banks/default-Training-12v-s0", "default-Training-12v-s0"), ("", None)):
        payload["config"]["distill"]["bank"] = bank  # as a student's checkpoint records it
        torch.save(payload, tmp_path / "student.pt")
        _, chain = warm_start(tmp_path / "student.pt", "xception_a_tiny")
        assert chain[-1].get("distilled") == expected
    payload["config"]["distill"] |= {"online": True, "teacher": "bundles/ensemble7"}  # taught as it trained
    torch.save(payload, tmp_path / "student.pt")
    assert warm_start(tmp_path / "student.pt", "xception_a_tiny")[1][-1]["distilled"] == "ensemble7 (online)"
    member = SimpleNamespace(run={"name": "next", "continues": [{**chain[-1], "distilled": "t-Training-12v-s0"}]})
    assert "distilled from `t-Training-12v-s0`" in "\n".join(_run_lines(member))


def test_a_mismatched_warm_restart_is_refused_naming_the_layer(tmp_path, faces):
    cfg = tiny("train.epochs=1")
    state = CLASSIFIER.build(cfg, torch.device("cpu"))
    payload = engine.checkpoint_payload(state, {"eval_acc": 0.5})
    payload["model"]["classifier.weight"] = payload["model"]["classifier.weight"][:5]
    torch.save(payload, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"layer classifier.weight is \(5,"):
        CLASSIFIER.build(tiny("train.epochs=1", f"train.init={tmp_path / 'cut.pt'}"), torch.device("cpu"))
    del payload["model"]["classifier.weight"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no weights for layer classifier.weight"):
        CLASSIFIER.build(tiny("train.epochs=1", f"train.init={tmp_path / 'missing.pt'}"), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="a xception_a_tiny checkpoint; this run trains resnet18_48"):
        warm_start(tmp_path / "missing.pt", "resnet18_48")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        warm_start(tmp_path / "nope.pt", "xception_a_tiny")


def test_the_ray_free_runner_records_the_chain_a_warm_restart_continues(tmp_path, faces):
    from ferray.runs import read_record

    first_cfg = tiny("train.epochs=1")
    _fit(first_cfg, faces, run_dir=tmp_path / "first")
    RunFolder(tmp_path / "first").write_weights()
    cfg = tiny("train.epochs=1", f"train.init={tmp_path / 'first' / WEIGHTS_FILE}")
    _fit(cfg, faces, run_dir=tmp_path / "second")
    record = read_record(tmp_path / "second")
    assert [link["name"] for link in record.continues] == [first_cfg.name] and record.continues[0]["epochs"] == 1
    assert read_record(tmp_path / "first").continues == []
