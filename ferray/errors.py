"""One error hierarchy (Ray-free): every mistake ferray can name is a FerrayError, which the CLI
catches once and prints as `ferray COMMAND: error: ...`; anything else is a bug and keeps its
traceback. Each subclass also derives from the builtin it refines, so `except ValueError` still works.
"""

from __future__ import annotations


class FerrayError(Exception):
    """A mistake in what was asked or given; the message names the file, row, field or request."""

    exit_status = 1  # of the `ferray` command it ends


class PortInUse(FerrayError, OSError):
    """A port a server was asked to listen on is held by another process (named where it can be read)."""

    exit_status = 2


class ConfigError(FerrayError, ValueError):
    """A config, search file, plan or flag that cannot be used (names the file or override and the key);
    also a request the cluster can never hold (too few CPUs or GPUs), wherever it is found."""


class DataError(FerrayError):
    """A dataset or source that cannot be used as given; the message names the path."""


class CheckpointError(FerrayError, ValueError):
    """A checkpoint or bundle that cannot be loaded or used where it was given."""


class ContentError(FerrayError, ValueError):
    """An SR content loss whose network is not available."""


class PretrainedWeightsError(FerrayError, FileNotFoundError):
    """Pretrained weights a config names that are not on this machine (the message says where to put them)."""


class InputError(FerrayError, ValueError):
    """A client's input that cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class LimitExceeded(InputError):
    """A request over one of the served limits: 413, and a body that names the limit and the value."""

    def __init__(self, message: str, limit: str, value: int, allowed: int):
        super().__init__(f"{message} ({limit})", status=413)
        self.limit, self.value, self.allowed = limit, value, allowed

    def body(self) -> dict:
        return {"error": str(self), "limit": self.limit, "value": self.value, "allowed": self.allowed}


class UsageError(FerrayError):
    """A command-line flag combination that cannot work."""
