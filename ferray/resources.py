"""Where the files that ship inside the package are, in a checkout (an editable install maps the
top-level experiments/ and serve/ folders into the package) and in an installed wheel alike."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def recipes_dir() -> Path:
    """The experiments/ recipes (installed as the data package ferray.experiments)."""
    return Path(str(resources.files("ferray.experiments")))


def recipe(name: str) -> Path:
    """One recipe by file name, e.g. recipe("debug_a.yaml")."""
    return recipes_dir() / name


def serve_app_dir() -> Path:
    """The Serve application's folder (serve/ in a checkout, installed as ferray.serve_app)."""
    return Path(str(resources.files("ferray.serve_app")))
