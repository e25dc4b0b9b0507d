"""The errors flexkd raises for what a user can fix: a config, a model, a selection or a store that
does not fit. The CLI prints any :class:`FlexKDError` as one line and exits 2; every other exception
is a bug and keeps its traceback.

Each class also derives from the built-in error that code caught before the hierarchy existed
(``ValueError``, ``FloatingPointError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FlexKDError(Exception):
    """Base class of the errors a user can act on; the message names the field or object at fault."""


class ConfigError(FlexKDError, ValueError):
    """A configuration that cannot be used; the message names the field."""


class UnsupportedModelError(FlexKDError, ValueError):
    """A model whose layers flexkd cannot address (unknown family, missing stack or head)."""


class SelectionMismatchError(FlexKDError, ValueError):
    """A ``DimensionSelection`` that does not belong to this teacher, student or layer pairing."""


class StoreMismatchError(FlexKDError, ValueError):
    """Stored teacher outputs written for another teacher, other rows, layers or logit setting."""


class NonFiniteLossError(FlexKDError, FloatingPointError):
    """A loss term became NaN or infinite; the message names the term, the step and the layer pair."""


class RunFolderLockedError(FlexKDError, RuntimeError):
    """Another process is writing the run folder; the message names the folder and the holder."""


class UnreadableFileError(FlexKDError, ValueError):
    """A file flexkd needs cannot be read or parsed (truncated, corrupt, not what it should be);
    the message names its path. ``path`` holds it."""

    def __init__(self, path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class DamagedCheckpointError(UnreadableFileError):
    """A checkpoint that is incomplete or whose files do not match its manifest."""


class ResumeMismatchError(FlexKDError, ValueError):
    """Resuming a run folder with a config whose result-changing fields differ from its recorded one,
    or a folder with no intact checkpoint left to resume from."""


__all__ = [
    "ConfigError",
    "DamagedCheckpointError",
    "FlexKDError",
    "NonFiniteLossError",
    "ResumeMismatchError",
    "RunFolderLockedError",
    "SelectionMismatchError",
    "StoreMismatchError",
    "UnreadableFileError",
    "UnsupportedModelError",
]
