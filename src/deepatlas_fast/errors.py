"""The package's own exception and warning types. Imports nothing of the package, so every layer
may raise them.

``DeepAtlasError`` and its subclasses are raised for what a user gave (config, data, models,
options) and carry a message meant for that user: the command line prints them as one line.
It is a ``ValueError``, so ``except ValueError`` catches them; ``ConfigKeyError`` is also a
``KeyError`` and ``MissingDependencyError`` also an ``ImportError``."""
from __future__ import annotations


class DeepAtlasError(ValueError):
    """Invalid input from the user: the message says what is wrong and, where it can, what to do."""

    __str__ = BaseException.__str__  # the message as given, also in the KeyError subclass


class ConfigError(DeepAtlasError):
    """A config file, key, value or ``key=value`` override that cannot be used."""


class ConfigKeyError(ConfigError, KeyError):
    """A config key that does not exist."""


class DataError(DeepAtlasError):
    """An image, label map, datalist, checkpoint or exported model that cannot be used."""


class MissingDependencyError(DeepAtlasError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class DeepAtlasWarning(UserWarning):
    """Something the user should know that does not stop the work: a damaged checkpoint skipped,
    a figure not written, an execution provider not used, an image at another voxel size."""
