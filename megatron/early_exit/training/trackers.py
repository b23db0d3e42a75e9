"""Experiment trackers: TensorBoard (--tensorboard-dir) and Weights & Biases
(--wandb-project), both fed the same scalars under the same names (`train/lm loss`,
`train/early loss [9]`, `validation/...`, timers).

wandb is an optional dependency; WANDB_MODE=offline writes the run under
--wandb-save-dir (default: <--save>/wandb) without network, for `wandb sync` later.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from megatron.early_exit.errors import ConfigError, EarlyExitError

if TYPE_CHECKING:
    from megatron.early_exit.training.run_config import LoggingConfig


class WandbWriter:
    """A wandb run behind TensorBoard's add_scalar: scalars of one step go in one record."""

    def __init__(self, logging: "LoggingConfig", save: Optional[str], flags: Mapping[str, Any]):
        """`flags`: the run's flags, recorded as the wandb run's config."""
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package (pip install wandb)") from None
        save_dir = logging.wandb_save_dir or (os.path.join(save, "wandb") if save else "wandb")
        os.makedirs(save_dir, exist_ok=True)
        config = {k: v for k, v in flags.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        try:
            self._run = wandb.init(
                project=logging.wandb_project,
                group=logging.wandb_group,
                name=logging.wandb_exp_name,
                dir=save_dir,
                config=config,
            )
        except Exception as err:  # no API key, no network, a bad setting: one line, not wandb's traceback
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"--wandb-project {logging.wandb_project}: wandb could not start a run ({first}); "
                "log in (`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline"
            ) from None
        # wandb.init puts its own excepthook first, which prints a traceback for every error;
        # user errors (EarlyExitError) keep their one line.
        self._wandb_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self._pending: Dict[str, float] = {}
        self._step: Optional[int] = None

    def _excepthook(self, exc_type, exc, tb) -> None:
        if issubclass(exc_type, EarlyExitError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
            self._run.finish(exit_code=1)
        else:
            self._wandb_excepthook(exc_type, exc, tb)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._pending[name] = float(value)

    def flush(self) -> None:
        if self._pending:
            self._run.log(self._pending, step=self._step)
            self._pending = {}

    def close(self) -> None:
        self.flush()
        self._run.finish()


class Trackers:
    """Every tracker the flags ask for, as one writer (TensorBoard's interface)."""

    def __init__(self, writers: List):
        self.writers = writers

    def add_scalar(self, name: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(name, value, step)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def build_trackers(
    logging: "LoggingConfig", save: Optional[str], flags: Mapping[str, Any], enabled: bool
) -> Optional[Trackers]:
    """The trackers of this rank (the logging rank only); None when there are none."""
    if not enabled:
        return None
    writers = []
    if logging.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(log_dir=logging.tensorboard_dir))
    if logging.wandb_project:
        writers.append(WandbWriter(logging, save, flags))
    return Trackers(writers) if writers else None
