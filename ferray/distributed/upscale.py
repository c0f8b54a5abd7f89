"""`ferray sr upscale`: a prepared 48x48 dataset -> the same faces at 96x96, with Ray Data.

read_parquet (all splits, the split from the folder names) -> map_batches over an actor pool of
ferray.sr.inference.Upscaler (the generator loaded once per actor, one GPU per actor where there
are GPUs) -> write_parquet partitioned by split, into a temporary folder renamed when complete.
The manifest, read back from the written files, records the method and the generator checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ferray.data.contract import DataError, atomic_output, build_manifest, write_manifest
from ferray.errors import UsageError
from ferray.sr.inference import METHODS, Upscaler, check_input, upscaled_source

log = logging.getLogger(__name__)


def upscale(
    data: str | Path,
    out: str | Path,
    method: str = "srgan",
    checkpoint: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    batch_size: int = 256,
    overwrite: bool = False,
    cpus_per_actor: float = 1.0,
) -> dict:
    import ray
    import ray.data

    from ferray.distributed.cluster import check_shared_paths, require
    from ferray.distributed.runtime import connect

    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "srgan" and checkpoint is None:
        raise UsageError("--checkpoint is required with --method srgan (or use --method bicubic)")
    if actors < 1 or batch_size < 1:
        raise UsageError("--actors and --batch-size must be at least 1")
    manifest = check_input(data)
    if checkpoint is not None:  # fail here, not inside an actor, if it is not an SR generator
        from ferray.sr.engine import generator_from_checkpoint

        generator_from_checkpoint(checkpoint)
        checkpoint = str(Path(checkpoint).absolute())  # the actors' working directory is not this one
    connect()
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    shared = {"data": data, "output folder": Path(out).absolute().parent}
    check_shared_paths({**shared, **({"checkpoint": checkpoint} if checkpoint else {})})
    require("GPU", actors, gpus_per_actor, "actors")
    log.info(
        f"upscale: {manifest['rows']:,} faces 48 -> 96 by {method} with {actors} actor(s)"
        f"{f' x {gpus_per_actor:g} GPU' if gpus_per_actor else ' on CPU'}, batches of {batch_size}"
    )
    t0 = time.perf_counter()
    with atomic_output(out, overwrite=overwrite, kind="upscaled data") as tmp:
        # hive partitioning gives the split column back from split=X. Every actor needs blocks of
        # its own: a small dataset of a few files is cut into more (a big one has enough files).
        ds = ray.data.read_parquet(str(Path(data).absolute()), file_extensions=["parquet"])
        if len(manifest["files"]) < 4 * actors:
            ds = ds.repartition(4 * actors)
        ds = ds.map_batches(
            Upscaler,
            fn_constructor_kwargs={
                "method": method,
                "checkpoint": checkpoint,
                "threads": None if gpus_per_actor else max(1, int(cpus_per_actor)),
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor or None,
            num_cpus=0 if gpus_per_actor else cpus_per_actor,
        )
        ds.write_parquet(str(tmp), partition_cols=["split"])
        result = build_manifest(tmp, source=upscaled_source(data, method, checkpoint, manifest))
        if result["rows"] != manifest["rows"]:
            raise DataError(f"internal: {result['rows']} rows written for {manifest['rows']} read; output discarded")
        result["seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, result)
    return result
