"""Checkpoint errors, and how a failure deep in dist_checkpointing becomes one line."""

from __future__ import annotations

from megatron.early_exit.errors import EarlyExitError


class CheckpointError(EarlyExitError):
    """A checkpoint that is missing, incomplete, or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names a function or class no checkpoint holds (it could run code)."""

    def __init__(self, source: str, name: str):
        super().__init__(
            f"checkpoint file {source}: refuses to load {name} (a checkpoint never holds it; it could run code)"
        )
        self.source, self.name = source, name

    def __reduce__(self):  # torch DCP gathers failures across ranks
        return type(self), (self.source, self.name)


def cause_of_kind(err: BaseException, kind, depth: int = 8):
    """The first exception of `kind` behind `err` (its chain of causes, and the
    per-rank failures torch's CheckpointException holds); None if there is none."""
    for _ in range(depth):
        if err is None or isinstance(err, kind):
            return err
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                found = cause_of_kind(failure[0] if isinstance(failure, tuple) else failure, kind, depth - 1)
                if found is not None:
                    return found
        err = err.__cause__  # what raised it (`raise ... from`), not what was being handled
    return None


def one_line(err: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an error; for torch's CheckpointException, of the first
    rank's underlying error (its own text is a multi-rank traceback)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        err = cause[0] if isinstance(cause, tuple) else cause
    first = str(err).splitlines()[0] if str(err) else ""
    if len(first) > limit:
        first = first[:limit] + " ..."
    return f"{type(err).__name__}: {first}"
