"""Helpers shared by test modules (imported as `support`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import io
import uuid
from pathlib import Path

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request; a part with no filename is a plain field."""
    boundary = uuid.uuid4().hex
    chunks = []
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if filename:
            head += "Content-Type: application/octet-stream\r\n"
        chunks += [head.encode() + b"\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def descendants(pid: int) -> set[int]:
    """PIDs of every process below `pid` (Linux /proc)."""
    import os

    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids that still exist and are not zombies."""
    from ferray.distributed.leftovers import alive as running

    return {pid for pid in pids if running(pid)}


@contextlib.contextmanager
def ferray_messages():
    """The messages ferray's loggers emit inside the block (INFO and up), as a list of lines."""
    import logging

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("ferray"), Collect()
    before = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def fresh_venv(venv: Path) -> Path:
    """A new virtualenv at VENV that sees the packages of the interpreter running the tests (torch,
    Ray), but not ferray: `--system-site-packages` alone would show it the base interpreter's, which
    lack them when the tests run in a virtualenv, so a .pth file names this interpreter's folders (as
    plain paths: their own .pth files, this checkout's editable install among them, stay out)."""
    import site
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    ours = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    inner = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(inner) / "_ferray_test_outer_site.pth").write_text("\n".join(ours) + "\n")
    return venv


def checkpoints_written(run_dir: Path) -> int:
    """How many epoch checkpoints Ray Train has recorded for the run folder RUN_DIR so far."""
    import json

    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def listening_addresses(pid: int) -> set[str]:
    """The "address:port" of every TCP socket process `pid` listens on (Linux /proc; IPv4 only)."""
    import socket
    import struct

    from ferray.distributed.leftovers import open_files

    mine = open_files(pid)
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[3] == "0A" and f"socket:[{fields[9]}]" in mine:  # 0A: LISTEN
            address, port = fields[1].split(":")
            found.add(f"{socket.inet_ntoa(struct.pack('<I', int(address, 16)))}:{int(port, 16)}")
    return found
