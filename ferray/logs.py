"""How ferray talks while it works: the library logs through `logging.getLogger(__name__)` under the
"ferray" logger; whoever runs it decides where that goes and how much of it.

    ferray.logs.configure(verbosity)     # the CLI: -q warnings only, -v debug; messages on stderr
    with ferray.logs.quiet(): ...        # a step whose own progress its caller summarizes itself

Without configure() (a library user, a test) Python's defaults apply: warnings and errors only,
unless the application sets up logging itself. Per-epoch progress lines of a training worker and
Ray's progress bars are printed where they happen, as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

ROOT = "ferray"
_HANDLER_NAME = "ferray-cli"


def configure(verbosity: int = 0, stream=None) -> None:
    """Messages of every ferray logger on `stream` (stderr), as bare lines: INFO and up by default,
    WARNING and up with verbosity < 0 (-q), DEBUG with verbosity > 0 (-v). Idempotent."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    if any(getattr(h, "name", None) == _HANDLER_NAME for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.name = _HANDLER_NAME
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes, not to the stream of the moment it was
    made (a test runner, or a process that redirects its stderr, swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def time_left(seconds: float) -> str:
    """ "7 min" from 90 s up, else "45 s": how progress lines say what is left."""
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class FaceProgress:
    """A line at most every `every_s` seconds (and at the end) while faces are answered: how far, how
    fast, how long is left ("distill bank: 5,120/25,837 faces (20%), 61 views/s, ~57 min left"); each
    face answered in `views` views (the rate counts views), logged under the "ferray" logger."""

    def __init__(self, what: str, faces: int, views: int = 1, every_s: float = 60.0, clock=time.perf_counter):
        self.what, self.faces, self.views, self.every_s, self.clock = what, faces, views, every_s, clock
        self.done, self.start = 0, clock()
        self.last = self.start

    def update(self, faces: int) -> str | None:
        """After `faces` more faces; the line it logged, if any."""
        self.done += faces
        now = self.clock()
        if now - self.last < self.every_s and self.done < self.faces:
            return None
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.faces - self.done) / max(rate, 1e-9)
        line = (
            f"{self.what}: {self.done:,}/{self.faces:,} faces ({self.done / max(self.faces, 1):.0%}), "
            f"{rate * self.views:,.0f} {'views' if self.views > 1 else 'faces'}/s, ~{time_left(left)} left"
        )
        logging.getLogger(ROOT).info(line)
        return line


@contextlib.contextmanager
def quiet(name: str = ROOT) -> Iterator[None]:
    """Only warnings and errors from `name` (and below it) inside the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)
