"""The torchrun launcher a worker process runs under: what happens when it dies, and how long
it lets workers finish when it is signalled.

kill -9 of torchrun leaves its workers running, reparented, training on and holding --save;
`watch_launcher` ends a worker within about a second of its launcher's death (a daemon
thread comparing the parent PID: a parent-death signal would fire when the launcher's
thread that started the worker exits, not the launcher). SIGTERM to torchrun makes it pass
SIGTERM on to its workers, wait its shutdown timeout (torchrun --shutdown-timeout, else
TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30 s), then kill them (`shutdown_grace_seconds`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import List, Optional, Tuple

DEFAULT_SHUTDOWN_TIMEOUT = 30  # torchrun's own default, in seconds


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(interval: float = 1.0) -> bool:
    """Under torchrun, exit this process (status 1, one line) once its launcher is gone;
    whether a watch was started. The kernel then releases the --save lock (flock)."""
    if not under_torchrun():
        return False
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval)
        print(
            f"error: the torchrun launcher (PID {launcher}) is gone; this worker (PID {os.getpid()}) exits",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)  # at once: the other ranks may be waiting in a collective that will never finish

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return True


def shutdown_grace_seconds(launcher_argv: Optional[List[str]] = None) -> Tuple[float, str]:
    """(seconds torchrun waits for its workers after passing a signal on, where that comes from)."""
    if launcher_argv is None:
        launcher_argv = _launcher_argv()
    for i, arg in enumerate(launcher_argv):
        for flag in ("--shutdown-timeout", "--shutdown_timeout"):
            if arg == flag and i + 1 < len(launcher_argv):
                return float(launcher_argv[i + 1]), f"torchrun {flag}"
            if arg.startswith(flag + "="):
                return float(arg.split("=", 1)[1]), f"torchrun {flag}"
    if os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        return float(os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
    return float(DEFAULT_SHUTDOWN_TIMEOUT), "torchrun's default"


def _launcher_argv() -> List[str]:
    try:
        import psutil

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # noqa: BLE001 -- no process table to read: the environment and the default decide
        return []


def signal_handling_note() -> str:
    """What a run with --exit-signal-handler under torchrun says at start."""
    grace, source = shutdown_grace_seconds()
    return (
        f" --exit-signal-handler: on SIGTERM every rank finishes its iteration, saves and exits 0; torchrun, when "
        f"signalled too, kills the workers {grace:g} s later ({source}): a save must fit in that time (raise it "
        f"with torchrun --shutdown-timeout SECONDS; docs/training.md)"
    )
