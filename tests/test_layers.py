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
    offenders = [
        str(p.relative_to(FERRAY.parent))
        for p in FERRAY.rglob("*.py")
        if p.name != "cli.py" and "ferray.cli" in p.read_text()
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
