"""Early-exit large language models on megatron-core.

Importing this package checks the megatron-core version and, on a machine
without CUDA, installs the CPU platform adapter (see `platform.py`).
"""

from megatron.early_exit import errors as _errors
from megatron.early_exit import platform as _platform

_errors.install_excepthook()
_platform.apply()

__version__ = "0.1.0"
