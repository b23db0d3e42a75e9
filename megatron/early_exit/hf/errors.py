"""The one error the converters raise for bad input (printed as one line by the tools)."""

from megatron.early_exit.errors import ConfigError


class ConversionError(ConfigError):
    """A checkpoint that cannot be converted: unsupported architecture, missing files,
    missing or mis-shaped tensors. The message names the file, tensor or setting."""
