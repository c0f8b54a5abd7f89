"""Selection never touches a test split: with a test split's labels shuffled, every choice made from
data stays the same (the kept checkpoint, the fusion weight, the SR generator, Tune's best trial),
while the test figures change (so the shuffle was real)."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ferray.data.carve import carve_and_shuffle
from ferray.data.contract import faces_table, load_split, read_split, split_dir
from ferray.data.synth import SynthSpec, synthesize
from ferray.tasks import SR


def shuffle_labels(root, split: str, seed: int = 0) -> None:
    table = read_split(root, split)
    labels = np.random.default_rng(seed).permutation(table.column("label").to_numpy())
    images = load_split(root, split)[0]  # sorted by id, as the table is below
    table = table.sort_by("id")
    for f in split_dir(root, split).glob("*.parquet"):
        f.unlink()
    pq.write_table(
        faces_table(table.column("id").to_pylist(), labels, images), split_dir(root, split) / "part-0.parquet"
    )


@pytest.fixture(scope="module")
def twin_data(tmp_path_factory):
    """(data, the same data with PublicTest's labels shuffled): no PrivateTest, so Validation selects."""
    root = tmp_path_factory.mktemp("protocol")
    data = root / "data"
    synthesize(data, SynthSpec(n=700, seed=4))
    shutil.rmtree(split_dir(data, "PrivateTest"))
    carve_and_shuffle(data, 0.15, seed=0)
    rigged = root / "rigged"
    shutil.copytree(data, rigged)
    shuffle_labels(rigged, "PublicTest")
    from ferray.data.contract import build_manifest, read_manifest, write_manifest

    for folder in (data, rigged):  # manifests that describe what is on disk
        write_manifest(folder, build_manifest(folder, source=read_manifest(folder)["source"]))
    assert not np.array_equal(load_split(data, "PublicTest")[1], load_split(rigged, "PublicTest")[1])
    return data, rigged


@pytest.mark.slow  # six short trainings, Ray-free
def test_the_core_loop_and_the_fusion_ignore_the_test_split(twin_data, tmp_path):
    from ferray.bundle import build_bundle
    from ferray.config import load_config
    from ferray.data.contract import read_manifest, selection_split
    from ferray.data.memory import load_faces
    from ferray.local import train_local

    kept, cards = [], []
    for name, data in zip(("data", "rigged"), twin_data):
        assert selection_split(read_manifest(data)) == "Validation"
        splits = load_faces(data)
        for member in ("a", "b"):
            cfg = load_config(
                None,
                [
                    "model.name=xception_a_tiny",
                    "train.epochs=3",
                    "train.batch_size=32",
                    "optim.lr=0.003",
                    f"train.seed={ord(member)}",
                    "data.selection_split=Validation",
                    f"data.path={data}",
                ],
            )
            state, run = train_local(
                cfg,
                splits["Training"],
                splits["Validation"],
                torch.device("cpu"),
                tmp_path / name / member,
            )
            kept.append((name, member, run.best["epoch"], {k: v.clone() for k, v in state.core.state_dict().items()}))
        cards.append(
            build_bundle(
                {"a": tmp_path / name / "a" / "best.pt", "b": tmp_path / name / "b" / "best.pt"},
                None,
                data,
                tmp_path / name / "bundle",
                tta=False,
            )
        )
    for (_, member, epoch, weights), (_, member2, epoch2, weights2) in zip(kept[:2], kept[2:]):
        assert member == member2 and epoch == epoch2 and all(torch.equal(weights[k], weights2[k]) for k in weights)
    plain, rigged = cards
    assert plain.selection_split == rigged.selection_split == "Validation"
    # the SR generator kept: same epoch, same selection-split PSNR, whatever the test labels say
    sr = []
    for name, data in zip(("data", "rigged"), twin_data):
        splits = load_faces(data)
        cfg = load_config(
            None,
            [
                "train.epochs=2",
                "sr.pretrain_epochs=1",
                "sr.content=mse",
                "sr.generator_channels=8",
                "sr.generator_blocks=1",
                "sr.discriminator_channels=8",
                "train.batch_size=32",
                "data.selection_split=Validation",
            ],
        )
        state, run = train_local(
            cfg,
            splits["Training"],
            splits["Validation"],
            torch.device("cpu"),
            tmp_path / name / "sr",
            task=SR,
        )
        sr.append((run.best["epoch"], run.best["eval_psnr"]))
    assert sr[0] == sr[1] and sr[0][0] == 2
    assert plain.fusion == rigged.fusion and plain.accuracy == rigged.accuracy
    assert plain.evaluations["PublicTest"] != rigged.evaluations["PublicTest"]  # the test did see the shuffle


@pytest.mark.slow
def test_train_and_tune_ignore_the_test_split(ray_session, twin_data, tmp_path):
    """`ferray train` on the plain data and a Tune trial on the rigged data keep the same checkpoint
    and score, so Tune's choice (a max over such scores) cannot depend on a test split either (the
    core test above trains on both datasets; here the Ray layer must not add a path to the tests)."""
    import yaml

    from ferray.config import load_config
    from ferray.distributed.train import run_training
    from ferray.distributed.tune import load_search, run_search
    from ferray.engine import load_checkpoint

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    quiet = {}
    data, rigged = twin_data
    common = ["scaling.workers=1", "scaling.cpus_per_worker=1", "train.batch_size=32", "train.epochs=1"]
    plain = run_training(
        load_config(experiments / "debug_a.yaml", [f"data.path={data}", *common]), tmp_path / "data", **quiet
    )
    assert plain.selection_split == "Validation"

    search = tmp_path / "s.yaml"
    search.write_text(
        yaml.safe_dump(
            {
                "experiment": str(experiments / "debug_a.yaml"),
                "set": ["train.epochs=1"],
                "search": {
                    "samples": 1,
                    "max_concurrent": 1,
                    "seed": 0,
                    "asha": "off",
                    "space": {"optim.lr": {"distribution": "choice", "choices": [0.003]}},
                },
            }
        )
    )  # debug_a's
    tuned = run_search(load_search(search, [f"data.path={rigged}", *common]), tmp_path / "tune", **quiet)
    assert tuned["selection_split"] == "Validation"
    assert tuned["best"]["eval_acc"] == pytest.approx(plain.best_value, abs=1e-9)
    weights = [load_checkpoint(path)["model"] for path in (plain.best_checkpoint, tuned["best_checkpoint"])]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
