"""User-facing errors, printed as one line instead of a traceback."""

from __future__ import annotations

import sys


class EarlyExitError(Exception):
    """An error caused by the user's input (flags, files, platform), not by a bug."""


class ConfigError(EarlyExitError, ValueError):
    """Inconsistent or invalid settings; the message names the flag and the value."""


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, EarlyExitError):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    else:
        _default(exc_type, exc, tb)


def install_excepthook() -> None:
    """An uncaught EarlyExitError ends a script with `error: <message>` (exit status 1)."""
    sys.excepthook = _excepthook
