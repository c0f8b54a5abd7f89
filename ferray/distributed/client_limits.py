"""Limits per client address, kept by the HAProxy in front of a `ferray serve` of ferray's own Ray.

Everything the ingress bounds (bodies held, decode slots, the models' queue) is shared by all
clients, so one client sending hundreds of readiness polls or large bodies a second took the cores
from everyone else's predictions: accepting a connection and its bytes costs CPU before any bound of
the ingress can refuse it (bench/serve_hostile.py). HAProxy counts each address's requests and
upload bytes in a stick table:
- more than `requests_per_s` requests a second from one address (averaged over 10 s): each further
  request is held for TARPIT_S, then answered with a JSON 429 and Retry-After. The hold is what
  makes a flood cheap: a client that waits for its answers (most do) slows to its connections
  divided by the hold.
- request bodies from one address share `upload_mb_per_s` of bandwidth: a large upload is forwarded
  slower, not refused, so a client sending many large bodies at once gets them answered (413, 415 or
  a prediction) at the rate the limit allows, and nothing is cut off mid-body.
0 turns a limit off. Clients behind one address (a NAT, a proxy) share its limits; many addresses
attacking together need limits in front of the server (a load balancer's), which is also where they
belong on a cluster (cluster.yaml's nodes run Ray's own HAProxy configuration).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ferray.errors import ConfigError

log = logging.getLogger(__name__)

# set by `ferray serve --client-requests-per-s / --client-upload-mb-per-s` before its Ray starts;
# Ray's processes (the one rendering HAProxy's configuration) inherit them
REQUESTS_VARIABLE = "FERRAY_CLIENT_REQUESTS_PER_S"
UPLOAD_VARIABLE = "FERRAY_CLIENT_UPLOAD_MB_PER_S"
# a busy client is not throttled: 4x what the bench's speed bundle answers 8 clients on 2 cores with
# native bf16 (at 50, bench/serve_hostile's good clients from one address reached the limit); a
# flood of readiness polls (800 a second there) is held to a quarter
DEFAULT_REQUESTS_PER_S = 200.0
DEFAULT_UPLOAD_MB_PER_S = 8.0  # a 10 MB photo (max_body_bytes) in about a second
RATE_WINDOW_S = 10  # requests are counted over this window: short bursts above the rate pass
TARPIT_S = 2
TABLE = "ferray_clients"  # each address's request rate (the frontend tracks it)
# each address's upload bytes, for the bandwidth filter alone: in the tracked table above HAProxy
# counted every finished upload's bytes again, and N uploads at once got a Nth of the limit together
UPLOAD_TABLE = "ferray_uploads"
UPLOAD_FILTER = "ferray_upload"


@dataclass(frozen=True)
class ClientLimits:
    requests_per_s: float = DEFAULT_REQUESTS_PER_S
    upload_mb_per_s: float = DEFAULT_UPLOAD_MB_PER_S

    @property
    def active(self) -> bool:
        return self.requests_per_s > 0 or self.upload_mb_per_s > 0


def check_limit(value: float, name: str) -> float:
    """A limit as a float >= 0, or ConfigError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} is {value!r}; give a number >= 0 (0: no limit)") from None
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"{name} is {value!r}; give a number >= 0 (0: no limit)")
    return number


def limits_from_environment(environ=os.environ) -> ClientLimits:
    """The limits this process inherited (the defaults where unset); a bad value is named in a warning
    and its default used: the process rendering HAProxy's config has no one to answer to."""
    values = []
    for variable, default in ((REQUESTS_VARIABLE, DEFAULT_REQUESTS_PER_S), (UPLOAD_VARIABLE, DEFAULT_UPLOAD_MB_PER_S)):
        raw = environ.get(variable)
        try:
            values.append(default if raw is None else check_limit(raw, variable))
        except ConfigError as error:
            log.warning(f"{error}; using {default}")
            values.append(default)
    return ClientLimits(*values)


def export_limits(requests_per_s: float | None, upload_mb_per_s: float | None) -> None:
    """`ferray serve`'s flags into the environment its Ray inherits (None: leave what is set);
    ConfigError naming a bad flag (or variable) before anything starts."""
    for value, variable, flag in (
        (requests_per_s, REQUESTS_VARIABLE, "--client-requests-per-s"),
        (upload_mb_per_s, UPLOAD_VARIABLE, "--client-upload-mb-per-s"),
    ):
        if value is not None:
            os.environ[variable] = repr(check_limit(value, flag))
        elif variable in os.environ:
            check_limit(os.environ[variable], variable)


def table_section(limits: ClientLimits) -> str:
    """HAProxy's stick tables of client addresses (backend sections of their own); "" without limits."""
    if not limits.active:
        return ""
    expire = f"type ipv6 size 100k expire {RATE_WINDOW_S * 3}s"
    section = f"backend {TABLE}\n    stick-table {expire} store http_req_rate({RATE_WINDOW_S}s)\n"
    if limits.upload_mb_per_s > 0:
        section += f"backend {UPLOAD_TABLE}\n    stick-table {expire} store bytes_in_rate(1s)\n"
    return section


def frontend_rules(limits: ClientLimits, cache: str | None) -> str:
    """The frontend's lines that keep the limits, first among its rules (a request over its rate is
    held before the readiness cache or the ingress sees it). `cache`: the cache the frontend uses,
    which HAProxy needs declared as a filter once another filter is."""
    if not limits.active:
        return ""
    lines = ["    # ferray: limits per client address (ferray.distributed.client_limits)"]
    if limits.upload_mb_per_s > 0:
        if cache:
            lines.append(f"    filter cache {cache}")
        bytes_per_s = max(1, round(limits.upload_mb_per_s * 1_000_000))
        lines.append(f"    filter bwlim-in {UPLOAD_FILTER} limit {bytes_per_s} key src table {UPLOAD_TABLE}")
    lines.append(f"    http-request track-sc2 src table {TABLE}")
    if limits.requests_per_s > 0:
        most = max(1, round(limits.requests_per_s * RATE_WINDOW_S))
        message = (
            f'{{\\"error\\": \\"more than {limits.requests_per_s:g} requests a second from %[src]; '
            f'retry after {RATE_WINDOW_S} s\\", \\"limit_requests_per_s\\": {limits.requests_per_s:g}}}'
        )
        lines += [
            f"    timeout tarpit {TARPIT_S}s",
            f"    http-request tarpit deny_status 429 content-type application/json "
            f'lf-string "{message}" hdr Retry-After {RATE_WINDOW_S} '
            f"if {{ sc2_http_req_rate({TABLE}) gt {most} }}",
        ]
    if limits.upload_mb_per_s > 0:
        lines.append(f"    http-request set-bandwidth-limit {UPLOAD_FILTER} if METH_POST")
    return "\n".join(lines) + "\n"
