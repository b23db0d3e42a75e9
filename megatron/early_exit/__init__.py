"""Early-exit large language models on megatron-core.

Importing this package checks the megatron-core version and, on a machine
without CUDA, installs the CPU platform adapter (see `platform.py`). Known-harmless
third-party warnings are hidden (`errors.HARMLESS_WARNINGS`; EE_SHOW_WARNINGS=1 shows them).
"""

from megatron.early_exit import errors as _errors

_errors.install_excepthook()
_errors.silence_harmless_warnings()  # before megatron-core is imported

from megatron.early_exit import platform as _platform  # noqa: E402

_platform.apply()

__version__ = "0.1.0"
