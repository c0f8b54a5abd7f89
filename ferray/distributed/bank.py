"""`ferray distill bank`: the teacher bank of a split with Ray Data.

read_parquet (the split) -> map_batches over an actor pool of ferray.distill.bank.TeacherAnswers (the
teacher bundle loaded once per actor) -> each face's fused probabilities on every view -> in the
split's id order -> DATA/teacher_banks/NAME (ferray.distill.bank). A face's views are drawn from a
hash of its id, so neither the pool's batching nor its order changes a bank."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ferray.config import AugmentConfig
from ferray.distill.bank import TeacherAnswers, bank_manifest, save_bank, teacher_identity
from ferray.logs import FaceProgress

log = logging.getLogger(__name__)
DEFAULT_VIEWS = 26  # the ten TTA views and 16 augmented ones
BLOCK_FACES = 512  # faces per block of the pipeline: a progress step


def make_bank(
    bundle: str | None,
    data: str | Path,
    split: str = "Training",
    views: int = DEFAULT_VIEWS,
    seed: int = 0,
    augment: AugmentConfig | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    batch_size: int = 128,
    name: str | None = None,
) -> Path:
    """Compute and save the bank; its folder."""
    import pyarrow as pa
    import ray
    import ray.data

    from ferray.bundle.load import read_bundle_card, resolve_bundle
    from ferray.data.contract import DataError, read_manifest, split_dir
    from ferray.distributed.runtime import connect
    from ferray.errors import UsageError

    if views < 1 or actors < 1 or batch_size < 1:
        raise UsageError("--views, --actors and --batch-size must be at least 1")
    augment = augment or AugmentConfig()
    folder = resolve_bundle(bundle)
    card = read_bundle_card(folder)
    manifest = read_manifest(data)
    teacher = teacher_identity(folder)
    out = Path(data) / "teacher_banks" / (name or f"{teacher['name']}-{split}-{views}v-s{seed}")
    connect()
    if split not in manifest["splits"]:
        raise DataError(f"{data}: no split {split!r} (has: {', '.join(manifest['splits'])})")
    expected = manifest["splits"][split]["rows"]
    members = ", ".join(card.members)
    log.info(f"distill bank: {split} of {data} through {folder.name} ({members}), {views} views, seed {seed}")
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(str(split_dir(data, split).absolute()), file_extensions=["parquet"])
    # blocks of about BLOCK_FACES: each answered block is a progress step (and a face's views
    # being drawn from its id, neither the blocks nor their order change the bank)
    ds = ds.repartition(max(2 * actors, -(-expected // BLOCK_FACES))).map_batches(
        TeacherAnswers,
        fn_constructor_kwargs={
            "bundle": str(folder.absolute()),
            "views": views,
            "seed": seed,
            "augment": asdict(augment),
            "threads": max(1, int(cpus_per_actor)),
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )
    progress = FaceProgress("distill bank", expected, views)
    tables = []
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # a block at a time, as answered
        tables.append(table)
        progress.update(table.num_rows)
    answered = pa.concat_tables(tables).sort_by("id")  # load_split's order
    if answered.num_rows != expected:
        raise RuntimeError(f"internal: {answered.num_rows} faces answered of the {expected} in {split}")
    probs = np.stack([np.frombuffer(row, np.float16) for row in answered.column("probs").to_pylist()])
    probs = probs.reshape(answered.num_rows, views, -1)
    save_bank(out, probs, bank_manifest(split, manifest["checksum"], teacher, seed, views, augment))
    log.info(f"distill bank: {answered.num_rows:,} faces x {views} views in {time.perf_counter() - t0:.0f} s -> {out}")
    return out
