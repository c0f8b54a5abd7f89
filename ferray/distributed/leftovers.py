"""Nothing of a `ferray serve` outlives it: the processes Ray's Serve starts outside Ray's own tree.

Serve's high-throughput mode runs HAProxy as a child of a Ray worker. When the server is killed
(SIGKILL of its process group, an out-of-memory kill, a crash), Ray's processes go with their raylet,
but HAProxy is re-parented to init and keeps the port, answering every request with a 500. So:

- each Ray ferray starts keeps HAProxy's files in a private folder /tmp/fs-PID-XXXX (PID: the
  process that started that Ray; runtime.server_directory), and HAProxy's command line names its
  config file there;
- a watchdog in a session of its own (a group kill does not reach it) waits for that process to end,
  however it ends, then ends the HAProxy processes whose command line names the folder, and removes
  the folder;
- where even the watchdog was killed, the next `ferray serve` does the same for every folder whose
  process is gone (`clean_leftovers`). A process is signalled only when its command line is HAProxy's
  and names such a folder: nothing that is not ferray's is ever killed.

    python -m ferray.distributed.leftovers watch PID FOLDER     # what server_directory starts
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER_PREFIX = "fs-"  # fs-PID-random, in /tmp (short: HAProxy limits its socket paths to 97 characters)
WATCH_INTERVAL_S = 0.5


def process_table() -> dict[int, list[str]]:
    """Every process this user can read, as {pid: its command line's words}."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        table[int(entry.name)] = [w.decode(errors="replace") for w in words if w]
    return table


def alive(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie, ended but not yet reaped, has)."""
    if not Path("/proc/self").exists():  # no /proc: existence is all there is to ask
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def owner_pid(folder: Path) -> int | None:
    """The pid in a server folder's name (fs-PID-random), or None for a name of another form."""
    parts = folder.name.split("-")
    if len(parts) >= 3 and parts[0] + "-" == FOLDER_PREFIX and parts[1].isdigit():
        return int(parts[1])
    return None


def processes_of(folder: Path, table: dict[int, list[str]] | None = None) -> list[int]:
    """The HAProxy processes whose command line names a file in `folder`."""
    inside = str(folder).rstrip("/") + "/"
    found = []
    for pid, words in (process_table() if table is None else table).items():
        if words and Path(words[0]).name == "haproxy" and any(word.startswith(inside) for word in words[1:]):
            found.append(pid)
    return found


def end(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL for any still there after `grace_s`."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def clear(folder: Path) -> list[int]:
    """End what runs from `folder`, then remove it; the pids ended."""
    import shutil

    pids = processes_of(folder)
    end(pids)
    shutil.rmtree(folder, ignore_errors=True)
    return pids


def clean_leftovers(base: str | Path = "/tmp") -> list[str]:
    """Every server folder under `base` (this user's) whose process is gone: its HAProxy processes
    ended, the folder removed. What was done, one line each."""
    done = []
    for folder in sorted(Path(base).glob(f"{FOLDER_PREFIX}*")):
        pid = owner_pid(folder)
        try:
            mine = folder.is_dir() and folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid is None or not mine or alive(pid):
            continue
        ended = clear(folder)
        done.append(
            f"{folder}: left by process {pid}, which is gone; "
            + (f"ended HAProxy {', '.join(map(str, ended))}" if ended else "nothing was running from it")
        )
    return done


def listener_of(port: int) -> str | None:
    """Which process listens on TCP `port` on this machine ("pid 123 (python3 -m http.server)"), or
    None where that cannot be read (another user's process, no /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])  # 0A: LISTEN
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid, words in process_table().items() if wanted else ():
        if wanted & open_files(pid):
            return f"pid {pid} ({' '.join(words)[:120]})"
    return None


def open_files(pid: int) -> set[str]:
    """What the descriptors of process `pid` point at ("socket:[inode]" for sockets); empty where
    they cannot be read."""
    links = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return links
    for fd in descriptors:
        try:
            links.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            continue
    return links


def start_watchdog(folder: Path) -> None:
    """A process of its own session that clears `folder` once this process ends, however it ends."""
    import subprocess

    subprocess.Popen(  # noqa: S603 - our own module, our own arguments
        [sys.executable, "-m", "ferray.distributed.leftovers", "watch", str(os.getpid()), str(folder)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def watch(parent: int, folder: Path) -> None:
    while alive(parent) and folder.exists():
        time.sleep(WATCH_INTERVAL_S)
    clear(folder)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "watch":
        sys.exit("usage: python -m ferray.distributed.leftovers watch PID FOLDER")
    watch(int(sys.argv[2]), Path(sys.argv[3]))
