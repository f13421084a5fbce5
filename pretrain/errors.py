"""Typed errors. Each message says which setting or file is wrong and what to do."""


class PretrainError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PretrainError, ValueError):
    """A configuration value is invalid; the message names the setting and the fix."""


class DataError(PretrainError):
    """A dataset, manifest or shard is missing, corrupt or inconsistent."""


class CheckpointError(PretrainError):
    """A checkpoint is missing, incomplete or does not match the run."""


class EnvironmentSetupError(PretrainError, RuntimeError):
    """The process environment (devices, launcher variables) cannot run the requested layout."""
