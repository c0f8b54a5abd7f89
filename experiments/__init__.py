"""The recipes (one YAML per experiment), installed as the data package `ferray.experiments` so that a
wheel carries them; `ferray.resources.recipes_dir()` finds them in a checkout and in an install."""
