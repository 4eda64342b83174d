"""Exception types. Every error attnscope raises on bad input is an :class:`AttnscopeError`.

Subclasses also derive from the matching built-in, so ``except ValueError`` or
``except FileNotFoundError`` in user code keeps working.
"""

from __future__ import annotations

__all__ = [
    "AttnscopeError",
    "ShapeError",
    "InputError",
    "ConfigError",
    "ArchiveError",
    "ArchiveNotFoundError",
    "ArchiveCorruptError",
    "ArchiveLockedError",
    "StaleTableError",
    "MissingExtraError",
    "SelectionError",
    "ValidationError",
    "CaptureError",
]


class AttnscopeError(Exception):
    """Base class of every error raised by attnscope on bad input or bad data."""

    def _render_traceback_(self) -> list[str]:
        """How IPython and Jupyter show it: one line, as the CLI prints it, not a traceback
        through attnscope's internals (``%debug`` still reaches the frames)."""
        return [f"{type(self).__name__}: {self}"]


class InputError(AttnscopeError, TypeError):
    """An argument has the wrong type (e.g. a list where a tensor was expected)."""


class ShapeError(AttnscopeError, ValueError):
    """An array or tensor has the wrong shape; the message says expected vs got."""


class ConfigError(AttnscopeError, ValueError):
    """A configuration value is out of range or inconsistent."""


class SelectionError(AttnscopeError, IndexError):
    """A layer, head, kind, sample or token selection does not exist."""


class ValidationError(AttnscopeError, ValueError):
    """Attention data failed validation (NaN/Inf, negative, rows not summing to 1)."""


class CaptureError(AttnscopeError, RuntimeError):
    """Attention weights cannot be captured from a model as configured."""


class ArchiveError(AttnscopeError):
    """Base class of archive problems."""


class ArchiveNotFoundError(ArchiveError, FileNotFoundError):
    """The archive path does not exist."""


class ArchiveCorruptError(ArchiveError, ValueError):
    """The archive exists but is not a valid attnscope archive (foreign, truncated, edited)."""


class ArchiveLockedError(ArchiveError, PermissionError):
    """Another writer holds the archive; ``whole``: it holds the whole archive (a
    creating or single-process writer), not a sample range."""

    whole: bool = False


class StaleTableError(ArchiveError, ValueError):
    """A table was computed from a different archive (or an older state of it)."""


class MissingExtraError(AttnscopeError, ImportError):
    """A feature needs an optional dependency that is not installed (names the extra)."""
