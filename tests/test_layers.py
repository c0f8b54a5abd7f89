"""The layers: every module outside ferray/distributed/ (the Ray layer) runs where Ray is not
installed (the GPU machines have only PyTorch), and the library never imports its CLI."""

import subprocess
import sys
import textwrap
from pathlib import Path

FERRAY = Path(__file__).resolve().parents[1] / "ferray"
RAY_LAYER = ("ferray.distributed", "ferray.serve_app")


def core_modules() -> list[str]:
    names = []
    for path in sorted(FERRAY.rglob("*.py")):
        parts = path.relative_to(FERRAY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(RAY_LAYER) and "experiments" not in parts:
            names.append(name)
    return names


def test_every_core_module_imports_without_ray():
    modules = core_modules()
    assert "ferray.fit" in modules and "ferray.engine" in modules and len(modules) > 30
    script = textwrap.dedent(f"""
        import importlib, sys

        class NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError(f"ray is not installed here (imported: {{name}})")
                return None

        sys.meta_path.insert(0, NoRay())
        for name in {modules!r}:
            importlib.import_module(name)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_the_library_never_imports_the_cli():
    """The command line's modules (cli*.py: ferray/cli.py, its shared flags and its command groups, a
    stage's own cli.py) may import each other; nothing else imports them."""
    offenders = [
        str(p.relative_to(FERRAY.parent))
        for p in FERRAY.rglob("*.py")
        if not p.name.startswith("cli") and "ferray.cli" in p.read_text()
    ]
    assert offenders == []


def test_the_package_list_names_every_package_and_maps_serve_and_experiments():
    """pyproject lists the packages by hand (serve/ and experiments/ live at the top level and install
    inside ferray): a new subpackage of ferray/ must be listed too, or a wheel would lack it."""
    import tomllib

    setup = tomllib.loads((FERRAY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(FERRAY.parent).parts) for p in FERRAY.rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"ferray.serve_app", "ferray.experiments"}
    assert setup["package-dir"] == {"ferray.serve_app": "serve", "ferray.experiments": "experiments"}
    assert not (FERRAY / "serve_app").exists() and not (FERRAY / "experiments").exists()  # no links into the checkout


def test_ray_internals_are_touched_only_on_a_tested_ray(monkeypatch, caplog):
    import ray

    from ferray.distributed import ray_internals

    ray_internals.supported.cache_clear()
    monkeypatch.setattr(ray, "__version__", "2.99.0")
    try:
        assert not ray_internals.supported()
        assert "outside the series" in caplog.text
        assert ray_internals.placement_group_by_id("00" * 18) is None
        ray_internals.poll_cluster_size_every(0.2)  # a no-op, not an error
    finally:
        ray_internals.supported.cache_clear()
    monkeypatch.setattr(ray, "__version__", "2.60.0")
    assert ray_internals.supported()
    ray_internals.supported.cache_clear()


def test_haproxys_config_of_ferray_is_rewritten_when_serve_imports_its_template(caplog):
    """The worker hook of ferray's own Ray, in a fresh interpreter as a Ray worker runs it: Serve's
    HAProxy config then binds its stats page and metrics to 127.0.0.1, the front is unchanged, and
    GETs of /readyz go through a cache; a template this was not written for is left as it is."""
    import subprocess
    import sys
    import types

    from ferray.distributed import client_limits, ray_internals

    check = (
        "from ferray.distributed.ray_internals import haproxy_config_of_ferray as hook\n"
        "hook()\n"
        "from ray.serve._private import haproxy\n"
        "print(haproxy.HAPROXY_CONFIG_TEMPLATE)\n"
    )
    template = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    binds = [line.strip() for line in template.splitlines() if line.strip().startswith("bind")]
    assert "bind 127.0.0.1:{{ config.stats_port }}" in binds and "bind 127.0.0.1:{{ config.metrics_port }}" in binds
    assert not [b for b in binds if b.startswith(("bind *:", "bind :{{"))], binds
    assert "bind {{ config.frontend_host }}:{{ config.frontend_port }}" in binds  # the front: where the user said
    cache = f"\ncache {ray_internals.READY_CACHE}\n"  # the section (a filter names it too)
    front = template.index("frontend http_frontend")
    assert template.count(cache) == 1 and template.index(cache) < front  # a section of its own, before the front
    rules = template[front:].split("\nbackend ")[0]
    assert f"http-request cache-use {ray_internals.READY_CACHE}" in rules
    assert f"http-response cache-store {ray_internals.READY_CACHE}" in rules
    # the limits per client address: kept before anything else of the front answers (the cache too),
    # the cache declared as a filter beside the bandwidth one (HAProxy refuses the config otherwise)
    assert template.index(f"backend {client_limits.TABLE}") < front
    assert rules.index("http-request track-sc2 src") < rules.index("http-request tarpit") < rules.index("cache-use")
    assert f"filter cache {ray_internals.READY_CACHE}" in rules and "filter bwlim-in" in rules
    again = types.SimpleNamespace(HAPROXY_CONFIG_TEMPLATE=template)
    made = ["side listeners on loopback", "readiness cache", "client limits"]
    assert ray_internals.rewrite_haproxy_templates(again, client_limits.limits_from_environment()) == made
    assert again.HAPROXY_CONFIG_TEMPLATE == template  # rewriting twice changes nothing
    other = types.SimpleNamespace(HAPROXY_CONFIG_TEMPLATE=template)  # other limits: the first ones stay
    assert "client limits" in ray_internals.rewrite_haproxy_templates(other, client_limits.ClientLimits(7, 1))
    assert other.HAPROXY_CONFIG_TEMPLATE == template
    changed = types.SimpleNamespace(HAPROXY_CONFIG_TEMPLATE="listen stats\n  bind 0.0.0.0:{{ config.stats_port }}\n")
    with caplog.at_level("WARNING"):
        assert ray_internals.rewrite_haproxy_templates(changed) == []
    assert "stay on every interface" in caplog.text and "every /readyz poll reaches the ingress" in caplog.text
    assert "no limits per client address" in caplog.text
    assert changed.HAPROXY_CONFIG_TEMPLATE == "listen stats\n  bind 0.0.0.0:{{ config.stats_port }}\n"


def test_dependency_floors_leave_out_releases_with_known_security_fixes_missing():
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = {
        Requirement(d).name: Requirement(d).specifier
        for d in tomllib.loads((FERRAY.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    for name, unsafe in (
        ("torch", "2.5.1"),
        ("pillow", "10.2.0"),
        ("pyarrow", "14.0.0"),
        ("python-multipart", "0.0.17"),
        ("ray", "2.58.0"),  # token authentication is on by default for new local clusters from 2.59
    ):
        assert not deps[name].contains(Version(unsafe)), name
    assert deps["ray"].contains(Version("2.60.0")) and not deps["ray"].contains(Version("2.61.0"))
