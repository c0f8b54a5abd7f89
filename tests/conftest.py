"""Shared fixtures: one Ray per test session, small synthetic data made by the project itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_FER2013 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once, sized for a 2-core machine: 4 logical CPUs, a small object store.

    With the dashboard, unlike Ray's testing advice: Ray Train V2 polls the State API it serves.
    """
    import ray

    from ferray.distributed.runtime import HAPROXY_HOOK, configure_train_env, connect, own_ray_environment

    os.environ.pop("RAY_ADDRESS", None)
    configure_train_env(single_machine=True)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    # the limits per client address below the default, so that the flood test reaches them in a
    # few seconds on a slow machine (the tests' own traffic stays far under it)
    os.environ.setdefault("FERRAY_CLIENT_REQUESTS_PER_S", "50")
    if not ray.is_initialized():
        with own_ray_environment():  # Serve's mode and HAProxy's config, as `ferray serve` runs them
            ray.init(
                address="local",
                num_cpus=4,
                object_store_memory=300 << 20,
                include_dashboard=True,
                logging_level="ERROR",
                runtime_env={"worker_process_setup_hook": HAPROXY_HOOK},
            )
    connect(progress=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_faces():
    """(images, labels, splits) of 140 synthetic faces, 20 per class."""
    from ferray.data.synth import SynthSpec, generate

    return generate(SynthSpec(n=140, seed=7))


@pytest.fixture(scope="session")
def tiny_faces(synth_faces):
    """(train images, train labels, held-out images, held-out labels) as tensors: 96 Training faces
    and 64 of the other splits, for runs of the tiny model through the Ray-free loop."""
    import torch

    images, labels, splits = synth_faces
    train = splits == "Training"
    return (
        torch.from_numpy(images[train][:96]),
        torch.from_numpy(labels[train][:96]),
        torch.from_numpy(images[~train][:64]),
        torch.from_numpy(labels[~train][:64]),
    )


@pytest.fixture(scope="session")
def shared_fer2013():
    if not SHARED_FER2013.is_dir():
        pytest.skip(f"FER2013 not present at {SHARED_FER2013}")
    return SHARED_FER2013


@pytest.fixture(scope="session")
def prepared_synth(tmp_path_factory):
    """A prepared (Parquet + manifest) synthetic dataset of 210 faces."""
    from ferray.data.synth import SynthSpec, synthesize

    out = tmp_path_factory.mktemp("prepared") / "data"
    synthesize(out, SynthSpec(n=210, seed=3))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, prepared_synth):
    """A serving bundle of three tiny untrained members (a and c on the 48x48 faces, b behind the SR
    generator; bundle/../members holds their checkpoints), its fusion fitted on the synthetic PublicTest."""
    from ferray.testing import untrained_bundle

    return untrained_bundle(tmp_path_factory.mktemp("bundle"), prepared_synth, model_c="xception_a_tiny")


def pytest_collection_modifyitems(config, items):
    """Tiers: a test that uses Ray (the ray_session fixture) is marked `ray`, so `-m "not ray and not slow"`
    is the fast Ray-free tier."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
