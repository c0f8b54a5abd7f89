"""`ferray prepare`: any FER2013 source -> the Parquet contract, with Ray Data.

Pipeline: the source's work units -> map_batches(decode + validate, one unit per task, in
parallel) -> write_parquet partitioned by split, into a temporary folder renamed at the end.
Each task also leaves a small JSON report beside the data (counts, checksum part, rejected
records), named by its unit, so a retried task replaces its own report instead of counting twice;
the manifest is built from those and checked against the row counts of the files actually written.
(Reports travel through the output folder rather than an actor: starting an actor process costs
more than the whole of a small prepare, and the output folder has to be shared storage anyway.)
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ferray.data.carve import carve_and_shuffle, resolve_fraction
from ferray.data.contract import (
    DataError,
    Summary,
    atomic_output,
    build_manifest_from_summary,
    summarize,
    write_manifest,
)
from ferray.data.records import BAD_KINDS, BadRecord, decode_unit
from ferray.data.sources import open_source

log = logging.getLogger(__name__)

REJECTED_FILE = "rejected.csv"
REPORTS_DIR = "_unit_reports"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: a report is whole or absent


def decode_batch(batch: dict, on_bad: str, resize: bool, reports: str) -> pa.Table:
    """map_batches function: one unit in, its faces out (one table with a split column)."""
    index = int(batch["index"][0])
    unit = json.loads(batch["unit"][0])
    try:
        table, report = decode_unit(unit, on_bad=on_bad, resize=resize)
    except BadRecord as bad:
        # Ray rewraps task errors and drops the original object: leave it where the driver looks.
        _write_json(Path(reports) / f"{index:06d}.failed.json", bad.as_dict())
        raise
    summary = Summary()
    summary.add(None, table)
    _write_json(
        Path(reports) / f"{index:06d}.json",
        {"summary": summary.to_dict(), "rejected": report.rejected, "resized": report.resized},
    )
    return table


def _read_reports(folder: Path, pattern: str) -> dict[int, dict]:
    return {int(p.name.split(".")[0]): json.loads(p.read_text()) for p in sorted(folder.glob(pattern))}


def prepare(
    source: str | Path,
    out: str | Path,
    *,
    on_bad: str = "error",
    resize: bool = False,
    overwrite: bool = False,
    validation: str | float = "auto",
    seed: int = 0,
) -> dict:
    """Prepare `source` into `out`; returns the manifest. Raises DataError on bad input.

    `validation`: the fraction of Training carved into a Validation split ("auto": 10% when the
    source has no PrivateTest, so that PublicTest stays an untouched test; "none": never)."""
    import ray

    from ferray.distributed.runtime import connect

    if on_bad not in ("error", "skip"):
        raise DataError(f"--on-bad-record must be 'error' or 'skip', not {on_bad!r}")
    resolve_fraction(validation, set())  # a bad fraction fails before any work
    t0 = time.perf_counter()
    with atomic_output(out, overwrite=overwrite, kind="prepared data") as tmp:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        src = open_source(source, scratch)
        log.info(
            f"source: {src.path} ({src.kind}, {len(src.units)} parts"
            + (f", {len(src.ignored)} non-image files ignored" if src.ignored else "")
            + ")"
        )
        info = connect()
        log.info(f"ray: {info.mode} ({info.cpus:g} CPUs)")
        reports = tmp / REPORTS_DIR
        reports.mkdir()
        items = [{"index": i, "unit": json.dumps(u)} for i, u in enumerate(src.units)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            decode_batch,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"on_bad": on_bad, "resize": resize, "reports": str(reports)},
        )
        try:
            ds.write_parquet(str(tmp), partition_cols=["split"])
        except Exception:
            failures = _read_reports(reports, "*.failed.json")
            if not failures:
                raise
            bad = failures[min(failures)]
            raise DataError(
                f"bad record: {bad['where']}: {bad['detail']} [{bad['kind']}]\n(pass "
                "--on-bad-record skip to skip such records; each is then listed in rejected.csv "
                "and counted in the manifest)"
            ) from None
        entries = _read_reports(reports, "[0-9]*[0-9].json")
        shutil.rmtree(scratch)
        shutil.rmtree(reports)
        manifest = _manifest(tmp, src, entries, validation, seed)
        if "validation" in manifest["notes"]:
            carved = manifest["notes"]["validation"]
            log.info(
                f"validation: {carved['rows']:,} faces ({carved['fraction']:.0%} of Training per class, seed {seed}) "
                "carved as the selection split; PublicTest stays a test"
            )
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)  # inside: the folder appears complete, manifest and all, or not at all
    return manifest


def _manifest(folder: Path, src, entries: dict, validation: str | float, seed: int) -> dict:
    if len(entries) != len(src.units):
        raise DataError(f"internal: {len(entries)} of {len(src.units)} parts reported; output discarded")
    summary = Summary()
    rejected, resized = [], 0
    for index in sorted(entries):
        summary.merge(Summary.from_dict(entries[index]["summary"]))
        rejected += entries[index]["rejected"]
        resized += entries[index]["resized"]
    written = sum(pq.read_metadata(f).num_rows for f in folder.glob("split=*/*.parquet"))
    if written != summary.rows:
        raise DataError(f"internal: {written} rows written but {summary.rows} decoded; output discarded")
    if summary.rows == 0:
        raise DataError(f"{src.path}: no usable faces ({len(rejected)} rejected)")
    by_kind = {k: n for k in BAD_KINDS if (n := sum(r["kind"] == k for r in rejected))}
    skipped = {"total": len(rejected), "by_kind": by_kind}
    if rejected:
        skipped["records_file"] = REJECTED_FILE
        with open(folder / REJECTED_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["kind", "where", "detail"])
            writer.writeheader()
            writer.writerows(rejected)
    notes = {"resized_to_48x48": resized} if resized else {}
    if src.ignored:
        notes["ignored_files"] = {"count": len(src.ignored), "examples": src.ignored[:10]}
    if "Training" in summary.counts:
        notes.update(carve_and_shuffle(folder, resolve_fraction(validation, set(summary.counts)), seed))
        summary = summarize(folder)  # the split names enter the checksum: count what is on disk now
    return build_manifest_from_summary(folder, summary, source=src.describe(), skipped=skipped, notes=notes)
