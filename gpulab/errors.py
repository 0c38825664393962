"""Errors shared by every gpulab part."""


class ConfigError(Exception):
    """The platform's configuration is wrong; the message names the setting and the problem."""
