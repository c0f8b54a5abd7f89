"""Nothing of a `ferray serve` outlives it (ferray.distributed.leftovers): HAProxy processes left by a
killed server are ended by its watchdog or by the next server, and nothing else is ever signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import alive

from ferray.distributed.leftovers import clean_leftovers, processes_of


def fake_haproxy(where: Path, folder: Path, name: str = "haproxy", **popen) -> subprocess.Popen:
    """A process whose command line reads as HAProxy's as Ray starts it (`.../haproxy -f CONFIG`)."""
    binary = where / name
    if not binary.exists():
        binary.symlink_to(sys.executable)
    config = folder / ("ab" * 28) / "haproxy.cfg"  # Ray's node-id folder, then the config
    return subprocess.Popen([str(binary), "-c", "import time; time.sleep(600)", "-f", str(config)], **popen)


def a_gone_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def wait_gone(pids: set[int], timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def test_the_next_server_ends_what_a_dead_one_left_and_nothing_else(tmp_path):
    bins = tmp_path / "bin"
    bins.mkdir()
    dead = tmp_path / f"fs-{a_gone_pid()}-abc"  # its server is gone
    living = tmp_path / f"fs-{os.getpid()}-def"  # this process's: still serving
    for folder in (dead, living):
        folder.mkdir()
    left = fake_haproxy(bins, dead)
    running = fake_haproxy(bins, living)
    stranger = fake_haproxy(bins, dead, name="not-haproxy")  # names the folder, but is not HAProxy
    try:
        deadline = time.monotonic() + 10  # until their command lines are readable
        while not processes_of(living) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_of(dead) == [left.pid] and processes_of(living) == [running.pid]
        done = clean_leftovers(tmp_path)
        assert len(done) == 1 and str(dead) in done[0] and str(left.pid) in done[0]
        assert left.wait(timeout=10) is not None and not dead.exists()
        assert running.poll() is None and living.exists() and stranger.poll() is None
        assert clean_leftovers(tmp_path) == []  # nothing more to do
    finally:
        for process in (left, running, stranger):
            process.kill()
            process.wait()


def test_a_killed_servers_watchdog_ends_its_haproxy_and_removes_its_folder(tmp_path):
    """The server's whole process group SIGKILLed: HAProxy, in a group of its own as Ray starts it,
    would live on; the watchdog (a session of its own) ends it within seconds."""
    bins = tmp_path / "bin"
    bins.mkdir()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from ferray.distributed.runtime import server_directory; print(server_directory(), flush=True); "
            "import time; time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    folder = Path(server.stdout.readline().strip())
    haproxy = fake_haproxy(bins, folder, start_new_session=True)
    try:
        assert folder.is_dir() and folder.name.startswith(f"fs-{server.pid}-")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert not wait_gone({haproxy.pid}), "HAProxy outlived its server"
        deadline = time.monotonic() + 10
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not folder.exists()
    finally:
        haproxy.kill()
        haproxy.wait()


def test_a_port_held_by_another_program_is_one_line_and_exit_2(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ferray.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        said = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
        assert done.returncode == 2, done.stderr
        assert said[-1].startswith("ferray serve: error: port") and f"port {port} on 127.0.0.1 is in use" in said[-1]
        assert f"pid {os.getpid()}" in said[-1]  # the holder, named
        assert "Traceback" not in done.stderr
        holder.settimeout(0)  # untouched: still listening
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        holder.close()


@pytest.mark.parametrize("folder_name", ["fs-x-abc", "other", "fs-"])
def test_folders_of_other_forms_are_left_alone(tmp_path, folder_name):
    (tmp_path / folder_name).mkdir()
    assert clean_leftovers(tmp_path) == [] and (tmp_path / folder_name).exists()
