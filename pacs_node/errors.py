"""Exceptions that name the thing that went wrong and why (never a patient name or ID)."""

from __future__ import annotations


class PacsNodeError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PacsNodeError):
    """A config key is missing, has the wrong type or an impossible value."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason}")
        self.key = key
        self.reason = reason


class InvalidInstance(PacsNodeError):
    """A received dataset cannot be stored (missing or malformed identifying attributes)."""


class UnsupportedInput(PacsNodeError):
    """A series does not meet what a pipeline declares it needs."""


class SeriesLoadError(PacsNodeError):
    """The pixel data of a series could not be turned into a Volume."""


class EncodeError(PacsNodeError):
    """A pipeline output could not be encoded as a valid DICOM object."""
