"""Benchmark `ferray prepare` against the loader most FER2013 repositories use, in one run.

    python -m bench.prepare [--fer2013 ../shared/data/fer2013] [--work .cache/bench]

Both sources come from the shared FER2013 image folder: the folder itself, and a Kaggle-style
fer2013.csv that this script writes from it once (cached under --work, never in git).

Baselines, as most FER repositories load FER2013:
  CSV:    pandas.read_csv, then a per-row numpy parse  np.array(row.split(), dtype=uint8)  stacked
          into one array (and, for context, the fastest per-row variant, np.fromstring(row, sep=' ')).
  folder: PIL.Image.open per file, converted to a numpy array.
ferray: `ferray prepare` (Ray Data, parallel units, Parquet + manifest). Ray's start-up (ray.init
and the first tasks that start and import the worker processes) is timed and reported apart.
Each ferray prepare runs RUNS times (a 2-core VM's timings wander by tens of percent): the ratio
uses the median, and the first run is printed too.
Peak memory is the peak resident memory of this process and every process under it (Ray's
workers included), sampled every 100 ms (a /proc scan costs a few ms of CPU; sampling
more often would slow the measured work on a 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RUNS = 3


# ------------------------------------------------------------------------------------ memory
def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


class PeakMemory:
    """Samples the process tree's RSS in a thread; `with PeakMemory() as m: ...; m.peak`."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.base = _tree_rss(os.getpid())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss(os.getpid()))


def timed(fn, *args, **kwargs):
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return result, seconds, mem.peak


# ------------------------------------------------------------------------------------ sources
def write_fer2013_csv(folder: Path, path: Path) -> int:
    """A Kaggle-style fer2013.csv with the folder's faces (Ray-free, via ferray's own decoder)."""
    from ferray.data.contract import pixels_to_images
    from ferray.data.records import decode_unit
    from ferray.data.sources import open_source
    from ferray.data.synth import write_csv

    images, labels, splits = [], [], []
    for unit in open_source(folder).units:
        table, _ = decode_unit(unit)
        images.append(pixels_to_images(table.column("pixels")))
        labels.append(table.column("label").to_numpy())
        splits += table.column("split").to_pylist()
    tmp = path.with_suffix(".tmp")
    write_csv(tmp, np.concatenate(images), np.concatenate(labels), np.array(splits))
    tmp.rename(path)
    return len(splits)


# ---------------------------------------------------------------------------------- baselines
def baseline_csv(path: Path) -> np.ndarray:
    import pandas as pd

    frame = pd.read_csv(path)
    pixels = np.stack([np.array(row.split(), dtype=np.uint8) for row in frame["pixels"]])
    return pixels.reshape(-1, 48, 48)


def baseline_csv_fromstring(path: Path) -> np.ndarray:
    import pandas as pd

    frame = pd.read_csv(path)
    pixels = np.stack([np.fromstring(row, dtype=np.uint8, sep=" ") for row in frame["pixels"]])
    return pixels.reshape(-1, 48, 48)


def baseline_folder(root: Path) -> np.ndarray:
    from PIL import Image

    faces = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            faces.append(np.asarray(Image.open(os.path.join(dirpath, name)).convert("L")))
    return np.stack(faces)


# -------------------------------------------------------------------------------------- ferray
def start_ray(scratch: Path) -> None:
    """ray.init, then a few tiny prepares so that every worker process exists and has imported ferray."""
    from ferray.data.synth import SynthSpec, synthesize
    from ferray.distributed.prepare import prepare
    from ferray.distributed.runtime import connect

    info = connect(progress=False)
    synthesize(scratch / "warm", SynthSpec(n=70), fmt="folder")
    from ferray.data import sources

    per_unit, sources.IMAGES_PER_UNIT = sources.IMAGES_PER_UNIT, 70 // int(info.cpus) + 1
    try:  # as many units as CPUs, so that each worker process starts once here
        prepare(scratch / "warm", scratch / "warm-out")
    finally:
        sources.IMAGES_PER_UNIT = per_unit
    _wait_for_settled_processes()


def _process_count() -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    count += f.read(8).startswith(b"ray::")
            except OSError:
                pass
    return count


def _wait_for_settled_processes(quiet_s: float = 2.0, limit_s: float = 30.0) -> None:
    """Ray keeps starting worker processes (and Data's helper actors) for a few seconds after the
    first pipeline; each start costs a core-second here. Start-up ends when their count is stable."""
    t0, last, since = time.perf_counter(), _process_count(), time.perf_counter()
    while time.perf_counter() - since < quiet_s and time.perf_counter() - t0 < limit_s:
        time.sleep(0.25)
        now = _process_count()
        if now != last:
            last, since = now, time.perf_counter()


def ferray_prepare(source: Path, out: Path) -> dict:
    from ferray.distributed.prepare import prepare

    return prepare(source, out, overwrite=True)


def report(name: str, rows: int, seconds: float, peak: int, note: str = "") -> str:
    return f"  {name:<44} {seconds:8.2f} s {rows / seconds:10,.0f} rows/s   peak {peak / 2**30:5.2f} GiB{note}"


def repeated(fn, *args):
    """RUNS timed calls -> (last result, median seconds, first seconds, max peak)."""
    runs = [timed(fn, *args) for _ in range(RUNS)]
    seconds = sorted(r[1] for r in runs)
    return runs[-1][0], seconds[len(seconds) // 2], runs[0][1], max(r[2] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fer2013", type=Path, default=REPO.parent / "shared" / "data" / "fer2013")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--skip-folder", action="store_true", help="only the CSV comparison")
    args = parser.parse_args()
    if not args.fer2013.is_dir():
        print(f"FER2013 image folder not found at {args.fer2013}; pass --fer2013", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    csv_path = args.work / "fer2013.csv"
    if not csv_path.exists():
        print(f"writing {csv_path} from {args.fer2013} (once) ...", flush=True)
        write_fer2013_csv(args.fer2013, csv_path)
    print(f"machine: {os.cpu_count()} CPUs; CSV {csv_path.stat().st_size / 2**20:.0f} MiB", flush=True)

    lines = []
    faces, t_base, m_base = timed(baseline_csv, csv_path)
    rows = len(faces)
    lines.append(report("baseline CSV: pandas + per-row np.array(split)", rows, t_base, m_base))
    _, t_fast, m_fast = timed(baseline_csv_fromstring, csv_path)
    lines.append(report("  (context) pandas + per-row np.fromstring", rows, t_fast, m_fast))

    scratch = Path(tempfile.mkdtemp(prefix="ferray-bench-", dir=args.work))
    try:
        _, t_start, _ = timed(start_ray, scratch)
        manifest, t_csv, first_csv, m_csv = repeated(ferray_prepare, csv_path, scratch / "csv-out")
        assert manifest["rows"] == rows, (manifest["rows"], rows)
        lines.append(
            report(f"ferray prepare, CSV (median of {RUNS})", rows, t_csv, m_csv, f"   (first run {first_csv:.2f} s)")
        )
        ratio_csv = t_base / t_csv
        if not args.skip_folder:
            folder_faces, t_bf, m_bf = timed(baseline_folder, args.fer2013)
            lines.append(report("baseline folder: PIL per image", len(folder_faces), t_bf, m_bf))
            manifest, t_fold, first_fold, m_fold = repeated(ferray_prepare, args.fer2013, scratch / "folder-out")
            lines.append(
                report(
                    f"ferray prepare, folder (median of {RUNS})",
                    manifest["rows"],
                    t_fold,
                    m_fold,
                    f"   (first run {first_fold:.2f} s)",
                )
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\n".join(lines))
    print(f"  Ray start-up (ray.init + first tasks), excluded above: {t_start:.2f} s")
    from ferray.data.records import pixel_parser

    print(
        f"CSV: ferray / baseline rows/s = {ratio_csv:.2f}x (target >= 5x; first run {t_base / first_csv:.2f}x); "
        f"vs the np.fromstring variant {t_fast / t_csv:.2f}x; with start-up {t_base / (t_csv + t_start):.2f}x "
        f"[pixel parser: {pixel_parser()}]"
    )
    if not args.skip_folder:
        print(f"folder: ferray / baseline rows/s = {t_bf / t_fold:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
