"""Every place ferray reaches into Ray's private modules, behind one version check.

Ray's private APIs change between minor releases. ferray uses three, each to work around a cost or
a bug of the public API, and each optional: on a Ray outside the series it was checked against
(TESTED_MINORS, the series pyproject.toml allows), none of them is touched and ferray runs on the
public API alone, a little slower or noisier, saying so once.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys

log = logging.getLogger(__name__)

TESTED_MINORS = range(51, 61)  # Ray 2.51 - 2.60


@functools.lru_cache(maxsize=1)
def supported() -> bool:
    """Whether the installed Ray is of a series these workarounds were checked against."""
    import ray

    try:
        major, minor = (int(part) for part in ray.__version__.split(".")[:2])
    except ValueError:
        return False
    ok = major == 2 and minor in TESTED_MINORS
    if not ok:
        log.warning(
            "ray %s is outside the series ferray was checked against (2.%d-2.%d): its workarounds of Ray "
            "internals are off",
            ray.__version__,
            TESTED_MINORS.start,
            TESTED_MINORS.stop - 1,
        )
    return ok


def quiet_train_context_logger() -> None:
    """Ray Train V2's execution context logs its per-report INFO lines under its file path, not under
    "ray.train": raise that logger's level too."""
    if not supported():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def poll_cluster_size_every(seconds: float) -> None:
    """Ray Data learns the cluster's size from an RPC it polls once a second; until the first answer
    lands, every operator runs one task at a time. A faster poll for short pipelines."""
    if not supported():
        return
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > seconds:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = seconds


def placement_group_by_id(group_id: str):
    """The PlacementGroup handle of a hex id (the public API gives handles only to their creator);
    None where the private constructor is not available."""
    if not supported():
        return None
    try:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup
    except ImportError:
        return None
    return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))


# HAProxy's side listeners (its stats page and Prometheus metrics) are bound to every interface by
# Serve's config template, without authentication; a server of ferray's own binds them to loopback.
HAPROXY_TEMPLATES = "ray.serve._private.haproxy_templates"
HAPROXY_SIDE_BINDS = (
    ("bind *:{{ config.stats_port }}", "bind 127.0.0.1:{{ config.stats_port }}"),
    ("bind :{{ config.metrics_port }}", "bind 127.0.0.1:{{ config.metrics_port }}"),
)
# /readyz answered by HAProxy from its memory while the ingress's last ready answer is fresh (the
# ingress marks it `Cache-Control: max-age=1`; a 503 is never stored): anonymous readiness polling
# went through HTTP parsing and the event loop of the ingress's Python once per GET, and hundreds a
# second took the cores from real predictions (bench/serve_hostile.py).
READY_CACHE = "ferray_ready"
READY_CACHE_SECTION = f"""cache {READY_CACHE}
    total-max-size 1
    max-object-size 16384
    max-age 1
frontend http_frontend
"""
READY_CACHE_RULES = f"""{{{{ healthz_rules|safe }}}}
    # ferray: a fresh ready answer of /readyz from HAProxy's cache
    acl ferray_readyz path_end /readyz
    http-request set-var(txn.ferray_readyz) bool(true) if ferray_readyz METH_GET
    http-request cache-use {READY_CACHE} if {{ var(txn.ferray_readyz) -m bool }}
    http-response cache-store {READY_CACHE} if {{ var(txn.ferray_readyz) -m bool }}
"""
HAPROXY_READY_CACHE = (
    ("frontend http_frontend\n", READY_CACHE_SECTION),
    ("{{ healthz_rules|safe }}\n", READY_CACHE_RULES),
)
# (what a rewrite does, its replacements, what stays as Serve wrote it when the template has changed)
HAPROXY_REWRITES = (
    ("side listeners on loopback", HAPROXY_SIDE_BINDS, "its stats and metrics listeners stay on every interface"),
    ("readiness cache", HAPROXY_READY_CACHE, "every /readyz poll reaches the ingress"),
)


def rewrite_template(text: str, replacements, unchanged: str) -> tuple[str, bool]:
    """(`text` with each (old, new) of `replacements` made once, True); (`text` as it was, False) and
    a warning saying `unchanged` where an old part is missing or repeated, i.e. Serve's template is
    not the one this was written against. Already rewritten text comes back as it is, True."""
    if all(new in text for _, new in replacements):
        return text, True
    if not all(text.count(old) == 1 for old, _ in replacements):
        log.warning(f"Serve's HAProxy template has changed: {unchanged}")
        return text, False
    for old, new in replacements:
        text = text.replace(old, new)
    return text, True


HAPROXY_FRONTEND_BIND = "    bind {{ config.frontend_host }}:{{ config.frontend_port }}\n"


def client_limit_rewrites(limits, cache: str | None):
    """The replacements that keep limits per client address (ferray.distributed.client_limits): the
    stick table a section of its own (before the metrics listener: the readiness cache's rewrite
    finds its own section before the front as it wrote it), the rules first in the front."""
    from ferray.distributed.client_limits import frontend_rules, table_section

    return (
        ("frontend prometheus\n", table_section(limits) + "frontend prometheus\n"),
        (HAPROXY_FRONTEND_BIND, HAPROXY_FRONTEND_BIND + frontend_rules(limits, cache)),
    )


def rewrite_haproxy_templates(templates, limits=None) -> list[str]:
    """Rewrite a haproxy_templates module's config template (HAPROXY_REWRITES): the stats and
    metrics listeners bind 127.0.0.1, and /readyz is cached; then the limits per client address
    (`limits`, a ClientLimits; None: those this process inherited). The names of the rewrites made."""
    from ferray.distributed import client_limits

    text = getattr(templates, "HAPROXY_CONFIG_TEMPLATE", "")
    made = []
    for name, replacements, unchanged in HAPROXY_REWRITES:
        text, done = rewrite_template(text, replacements, unchanged)
        if done:
            made.append(name)
    limits = client_limits.limits_from_environment() if limits is None else limits
    if f"backend {client_limits.TABLE}\n" in text:  # rewritten before (by this process): kept as it was
        made.append("client limits")
    elif limits.active:
        cache = READY_CACHE if "readiness cache" in made else None
        rewrites = client_limit_rewrites(limits, cache)
        text, done = rewrite_template(text, rewrites, "no limits per client address")
        if done:
            made.append("client limits")
    templates.HAPROXY_CONFIG_TEMPLATE = text
    haproxy = sys.modules.get("ray.serve._private.haproxy")  # a copy taken by `from ... import` already
    if haproxy is not None and hasattr(haproxy, "HAPROXY_CONFIG_TEMPLATE"):
        haproxy.HAPROXY_CONFIG_TEMPLATE = text
    return made


class _RewriteOnImport(importlib.abc.MetaPathFinder):
    """Finds HAPROXY_TEMPLATES as Python would, and rewrites it as soon as it has run (before the
    module that imports its template names can copy them)."""

    def find_spec(self, name, path, target=None):
        if name != HAPROXY_TEMPLATES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            rewrite_haproxy_templates(module)

        spec.loader.exec_module = exec_module
        return spec


def haproxy_config_of_ferray() -> None:
    """Ray's worker_process_setup_hook for a Ray of ferray's own: in whichever worker renders
    HAProxy's config (Serve's proxy actor), its side listeners bind loopback and /readyz is cached
    (HAPROXY_REWRITES). Costs nothing in the workers that never import Serve's HAProxy module."""
    if not supported():
        return
    if HAPROXY_TEMPLATES in sys.modules:
        rewrite_haproxy_templates(sys.modules[HAPROXY_TEMPLATES])
    elif not any(isinstance(finder, _RewriteOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RewriteOnImport())
