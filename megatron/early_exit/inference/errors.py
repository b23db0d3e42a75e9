"""Errors of the inference API: bad requests, named by the setting and the value."""

from megatron.early_exit.errors import ConfigError


class InferenceConfigError(ConfigError):
    """A generation request or model that the decoder cannot serve as asked."""
