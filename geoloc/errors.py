"""User-facing errors.

Every failure a user can cause (a bad file, a wrong flag, a damaged bundle) is raised as a
:class:`GeolocError` subclass whose message is one line: what was wrong, which file, what to
do. The CLI prints that line to stderr and exits with ``exit_code``; nothing else reaches the
user as a traceback.
"""

from __future__ import annotations


class GeolocError(Exception):
    """Base class of every error meant for the user. ``str(err)`` is the one-line message."""

    exit_code = 2


class ConfigError(GeolocError):
    """A config file, a ``--set key=value`` override or a flag is invalid."""


class DatasetError(GeolocError):
    """A dataset (folder, CSV, file name, EXIF) cannot be read or holds an invalid label."""


class ImageError(GeolocError):
    """One image cannot be decoded (empty, truncated, unsupported, too large...)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class BundleError(GeolocError):
    """An index bundle is missing, damaged, from another version, or built differently."""


class BackboneError(GeolocError):
    """A backbone cannot be created or its weights cannot be found."""
