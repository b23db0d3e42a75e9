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


# Third-party warnings that say nothing a user can act on: Apex and Transformer Engine are
# optional (and absent on CPU); deprecations inside megatron-core and PyTorch themselves.
HARMLESS_WARNINGS = (
    (UserWarning, r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._all_gather_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\._reduce_scatter_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    # megatron-core's dist_checkpointing load (torch_dist) calls torch's deprecated name.
    (FutureWarning, r"`load_state_dict` is deprecated"),
)
SHOW_WARNINGS_ENV = "EE_SHOW_WARNINGS"


def silence_harmless_warnings() -> None:
    """Hide HARMLESS_WARNINGS, unless EE_SHOW_WARNINGS=1 or Python's -W/PYTHONWARNINGS is set."""
    import os
    import warnings

    if os.environ.get(SHOW_WARNINGS_ENV, "") not in ("", "0") or sys.warnoptions:
        return
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
