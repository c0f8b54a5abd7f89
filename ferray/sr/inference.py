"""Upscaling faces 48 -> 96 with the SR generator or bicubic (Ray-free).

`Upscaler` is a callable over contract tables: it loads the generator once in __init__ and runs it
under torch.inference_mode, so Ray Data can use it as the class of an actor pool (ferray.distributed.upscale)
and `upscale_local` as a plain loop (the baseline of bench/upscale_scaling.py, and the Ray-free
path of the GPU benches). Both write the same contract at 96x96.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ferray.data.contract import (
    FER_SIZE,
    DataError,
    atomic_output,
    build_manifest,
    faces_table,
    pixels_to_images,
    read_manifest,
    schema,
    split_dir,
    write_manifest,
)
from ferray.device import default_device, fast_cuda_math
from ferray.models.frozen import freeze_for_cpu
from ferray.sr.nets import as_pixels, as_unit, bicubic, generated_faces

METHODS = ("srgan", "bicubic")
# The generator always runs on chunks of a fixed number of faces (the last one padded): convolution
# libraries pick algorithms by batch size, and a fixed size keeps every face's result bit-identical
# (on one kind of device) however Ray Data or a plain loop happens to batch the rows. A GPU needs
# large chunks to be busy; a CPU is as fast on small ones and pads less.
CHUNKS = {"cpu": 16, "cuda": 256}  # 256: the batch size of `ferray sr upscale`


def chunk_size(device: torch.device) -> int:
    return CHUNKS.get(device.type, CHUNKS["cpu"])


class Upscaler:
    """Contract table at 48x48 (with or without a split column) -> the same rows at 96x96."""

    def __init__(
        self,
        method: str = "srgan",
        checkpoint: str | None = None,
        device: str | None = None,
        threads: int | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device) if device else default_device()
        self.chunk = chunk_size(self.device)
        fast_cuda_math(self.device)
        self.method, self.generator = method, None
        if method == "srgan":
            if checkpoint is None:
                raise ValueError("method srgan needs a generator checkpoint")
            from ferray.sr.engine import generator_from_checkpoint

            self.generator, _, _ = generator_from_checkpoint(checkpoint, self.device)
            if self.device.type == "cpu":  # the frozen channels_last copy served faces go through too
                self.generator = freeze_for_cpu(self.generator, FER_SIZE, torch.float32)

    @torch.inference_mode()
    def upscale(self, faces: np.ndarray) -> np.ndarray:
        """(B, 48, 48) uint8 -> (B, 96, 96) uint8."""
        n = len(faces)
        x = torch.from_numpy(np.ascontiguousarray(faces)).to(self.device)
        if self.generator is None:
            return as_pixels(bicubic(as_unit(x), 2)).cpu().numpy()
        pad = (-n) % self.chunk
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
        return torch.cat([generated_faces(self.generator, chunk) for chunk in x.split(self.chunk)])[:n].cpu().numpy()

    def __call__(self, table: pa.Table) -> pa.Table:
        faces = pixels_to_images(table.column("pixels"))
        if faces.shape[1:] != (FER_SIZE, FER_SIZE):
            raise DataError(f"upscaling expects {FER_SIZE}x{FER_SIZE} faces, got {faces.shape[1]}x{faces.shape[2]}")
        splits = table.column("split").to_pylist() if "split" in table.column_names else None
        return faces_table(
            table.column("id").to_pylist(), table.column("label").to_numpy(), self.upscale(faces), splits=splits
        )


def check_input(data: str | Path) -> dict:
    manifest = read_manifest(data)
    if manifest["image_size"] != [FER_SIZE, FER_SIZE]:
        size = "x".join(map(str, manifest["image_size"]))
        raise DataError(f"{data}: {size} faces; upscaling takes the prepared {FER_SIZE}x{FER_SIZE} data")
    return manifest


def upscaled_source(data: str | Path, method: str, checkpoint: str | None, manifest: dict) -> dict:
    """What the output manifest records about where its faces came from."""
    return {
        "kind": "upscaled",
        "from": str(Path(data).absolute()),
        "from_checksum": manifest["checksum"],
        "method": method,
        "scale": 2,
        "generator_checkpoint": str(Path(checkpoint).absolute()) if checkpoint else None,
    }


def upscale_local(
    data: str | Path,
    out: str | Path,
    method: str = "srgan",
    checkpoint: str | None = None,
    batch_size: int = 256,
    overwrite: bool = False,
    threads: int | None = 1,
) -> dict:
    """The single-process loop: every split, batch by batch, into a 96x96 prepared dataset.

    One CPU thread by default, like each actor of `ferray sr upscale` (and bit-identical to it)."""
    manifest = check_input(data)
    previous_threads = torch.get_num_threads()
    upscaler = Upscaler(method, checkpoint, threads=threads)
    try:
        return _write_upscaled(data, out, manifest, upscaler, method, checkpoint, batch_size, overwrite)
    finally:
        torch.set_num_threads(previous_threads)


def _write_upscaled(data, out, manifest, upscaler, method, checkpoint, batch_size, overwrite) -> dict:
    with atomic_output(out, overwrite=overwrite, kind="upscaled data") as tmp:
        for split in manifest["splits"]:
            folder = split_dir(data, split)
            (tmp / folder.name).mkdir()
            for part, path in enumerate(sorted(folder.glob("*.parquet"))):
                with pq.ParquetWriter(tmp / folder.name / f"part-{part:05d}.parquet", schema(2 * FER_SIZE)) as writer:
                    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                        writer.write_table(upscaler(pa.Table.from_batches([batch])))
        result = build_manifest(tmp, source=upscaled_source(data, method, checkpoint, manifest))
        write_manifest(tmp, result)
    return result
