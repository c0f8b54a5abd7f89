"""The second-generation recipe's terms (issue 24): decoupled weight decay that spares norms and
slopes, an EMA that ships when it is selected, and a resume that replays nothing."""

import pytest
import torch

from ferray import engine
from ferray.config import load_config
from ferray.fit import BEST_FILE, LATEST_FILE, LocalRun, fit
from ferray.tasks import get_task


def tiny_config(*extra):
    return load_config(
        None,
        [
            "model.name=xception_a_tiny",
            "train.epochs=3",
            "train.batch_size=16",
            "optim.lr=0.003",
            "optim.schedule=cosine",
            "optim.warmup_epochs=0.5",
            "optim.weight_decay=0.05",
            "train.ema_decay=0.9",
            "model.dropout=0.2",
            "augment.erase_prob=0.5",
            "loss.label_smoothing=0.1",
            "loss.center_lambda=10",
            "loss.center_share=0.05",
            "train.progress_seconds=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def faces(tiny_faces):
    return tiny_faces


@pytest.mark.parametrize("optimizer", ["adamax", "adam", "adamw", "sgd"])
def test_weight_decay_spares_batch_norm_prelu_and_biases(optimizer):
    state = engine.build_state(tiny_config(f"optim.name={optimizer}"), torch.device("cpu"))
    names = {id(p): n for n, p in state.core.named_parameters()}
    decayed = {names[id(p)] for g in state.optimizer.param_groups if g["decoupled_wd"] > 0 for p in g["params"]}
    spared = {names[id(p)] for g in state.optimizer.param_groups if g["decoupled_wd"] == 0 for p in g["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    modules = dict(state.core.named_modules())
    for name in names.values():
        owner = modules[name.rsplit(".", 1)[0]]
        if isinstance(owner, (torch.nn.BatchNorm2d, torch.nn.PReLU)) or name.endswith(".bias"):
            assert name in spared, name
        else:
            assert isinstance(owner, torch.nn.Conv2d) and name in decayed, name
    assert all(g["weight_decay"] == 0 for g in state.optimizer.param_groups)  # none of it coupled
    # One step with zero gradients: decayed weights shrink by exactly lr * wd, the rest do not move.
    for g in state.optimizer.param_groups:
        g["lr"] = 0.01
    before = {n: p.detach().clone() for n, p in state.core.named_parameters()}
    for p in state.core.parameters():
        p.grad = torch.zeros_like(p)
    engine.apply_weight_decay(state.optimizer)
    for n, p in state.core.named_parameters():
        expected = before[n] * (1 - 0.01 * 0.05) if n in decayed else before[n]
        assert torch.allclose(p, expected, rtol=0, atol=1e-7), n


def _recorded(batches, log):
    for images, labels in batches:
        log.append(("batch", labels.tolist(), int(images.long().sum())))
        yield images, labels


def _run(cfg, faces, run_dir, log, stop_after=None, resume_from=None):
    """fit() on the tiny faces, recording every batch and every step's learning rate; stops after
    `stop_after` epochs as a killed run would (its checkpoints written), or resumes a checkpoint."""
    x, y, xt, yt = faces
    task = get_task("classifier")
    state = task.build(cfg, torch.device("cpu"))
    if resume_from is not None:
        task.restore(state, engine.load_checkpoint(resume_from))
    state.optimizer.register_step_pre_hook(lambda opt, *_: log.append(("lr", [g["lr"] for g in opt.param_groups])))
    train = engine.TensorBatches(x, y, cfg.train.batch_size, seed=cfg.train.seed)
    val = engine.TensorBatches(xt, yt, 64, shuffle=False, drop_last=False)
    run = LocalRun(run_dir, task, cfg)

    class Stop(Exception):
        pass

    def on_epoch(state, row):
        run.on_epoch(state, row)
        if stop_after is not None and state.epoch == stop_after:
            raise Stop

    try:
        fit(
            task,
            state,
            lambda epoch: _recorded(train.epoch(epoch), log),
            lambda s: task.evaluate(s, val),
            len(train),
            on_epoch=on_epoch,
        )
    except Stop:
        pass
    return state


def test_a_resumed_run_sees_the_batches_and_schedule_of_an_uninterrupted_one(tmp_path, faces):
    cfg = tiny_config()
    whole, first, second = [], [], []
    uninterrupted = _run(cfg, faces, tmp_path / "whole", whole)
    _run(cfg, faces, tmp_path / "split", first, stop_after=1)
    resumed = _run(cfg, faces, tmp_path / "resumed", second, resume_from=tmp_path / "split" / LATEST_FILE)
    assert resumed.epoch == uninterrupted.epoch == 3
    assert first + second == whole  # batch for batch, step for step (6 steps an epoch)
    assert len([e for e in whole if e[0] == "batch"]) == 3 * 6
    assert resumed.schedule.epochs == 3
    for name, value in uninterrupted.core.state_dict().items():
        assert torch.allclose(resumed.core.state_dict()[name].float(), value.float(), atol=1e-5), name
    for name, value in uninterrupted.ema.module.state_dict().items():
        assert torch.allclose(resumed.ema.module.state_dict()[name].float(), value.float(), atol=1e-5), name
    # A budgeted run's plan is the checkpoint's on resume too, unless the config asks for another.
    assert engine.resumed_plan(cfg, engine.load_checkpoint(tmp_path / "split" / LATEST_FILE)) == 3
    longer = tiny_config("train.epochs=5")
    assert engine.resumed_plan(longer, engine.load_checkpoint(tmp_path / "split" / LATEST_FILE)) == 5


def test_every_epoch_order_is_a_function_of_seed_rank_and_epoch(faces):
    x, y, _, _ = faces
    a = engine.TensorBatches(x, y, 16, seed=3)
    first = [labels.tolist() for _, labels in a]  # plain iteration is epoch 0, then 1
    second = [labels.tolist() for _, labels in a]
    assert first != second
    assert [labels.tolist() for _, labels in engine.TensorBatches(x, y, 16, seed=3).epoch(1)] == second
    other_rank = engine.TensorBatches(x, y, 16, seed=3, rank=1).epoch(0)
    assert [labels.tolist() for _, labels in other_rank] != first


def test_the_ema_weights_are_what_the_checkpoint_and_bundle_hold_when_selected(tmp_path, faces):
    from ferray.bundle import slim_checkpoint

    x, y, xt, yt = faces
    state = engine.build_state(tiny_config(), torch.device("cpu"))
    train_metrics = engine.train_one_epoch(state, engine.TensorBatches(x, y, 16), 6)
    evaluation = engine.evaluate_state(state, engine.TensorBatches(xt, yt, 64, shuffle=False, drop_last=False))
    assert {"raw_accuracy", "ema_accuracy", "ema_selected"} <= set(evaluation)
    raw = {k: v.clone() for k, v in state.core.state_dict().items()}
    ema = {k: v.clone() for k, v in state.ema.module.state_dict().items()}
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    for selected in (True, False):
        row = engine.end_epoch(state, train_metrics, {**evaluation, "ema_selected": float(selected)})
        assert row["eval_weights"] == ("ema" if selected else "raw")
        path = engine.save_checkpoint(tmp_path / f"{selected}.pt", state, row)
        payload = engine.load_checkpoint(path)
        shipped = ema if selected else raw
        assert payload["weights"] == row["eval_weights"]
        assert all(torch.equal(payload["model"][k], shipped[k]) for k in shipped)
        assert all(torch.equal(payload["train_model"][k], raw[k]) for k in raw)  # what --resume continues
        model, _, _ = engine.model_from_checkpoint(path)
        assert all(torch.equal(model.state_dict()[k], shipped[k]) for k in shipped)
        bundle_member = slim_checkpoint(payload)
        assert bundle_member["weights"] == row["eval_weights"] and "train_model" not in bundle_member
        assert all(
            torch.equal(bundle_member["model"][k], shipped[k].half() if shipped[k].is_floating_point() else shipped[k])
            for k in shipped
        )


def test_the_ema_follows_the_weights_with_a_warmed_up_decay():
    from ferray.ema import WeightEMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.99)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first step mostly copies
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    before = ema.module[0].weight.clone()
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, before + 0.9 * (model[0].weight - before))
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        WeightEMA(model, decay=1.0)


def test_best_checkpoint_is_the_selected_weights_of_the_best_epoch(tmp_path, faces):
    log = []
    state = _run(tiny_config(), faces, tmp_path / "run", log)
    best = engine.load_checkpoint(tmp_path / "run" / BEST_FILE)
    rows = state.history
    top = max(rows, key=lambda r: r["eval_acc"])
    assert best["epoch"] == top["epoch"] and best["weights"] == top["eval_weights"]
    assert top["eval_acc"] == max(top["eval_raw_acc"], top["eval_ema_acc"])
