"""Safe file access for the data readers: regular files only, bounded reads, one-line messages.

A FIFO, a device or a directory that happens to be named ``*.jpg`` or ``*.csv`` must never
block a read or stream without end, so every file is opened non-blocking and checked with
``fstat`` before a byte is read. Paths from the user's disk may hold newlines or terminal
escapes; :func:`one_line` keeps every message on one line.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from geoloc.errors import DatasetError, one_line
from geoloc.fileio import open_regular as _open_regular

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
"""File suffixes (case-insensitive) listed as images in a folder; other files are ignored."""

MAX_LINE_CHARS = 65_536
"""Longest accepted line in a text file (CSV row, file-list entry); longer is an error, not a read without end."""

F = TypeVar("F", bound=Callable)


def one_line_errors(fn: F) -> F:
    """Decorator for the package's public entry points: a :class:`DatasetError` leaves on one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DatasetError as err:
            msg = str(err)
            if msg.isprintable():
                raise
            raise DatasetError(one_line(msg)) from None

    return wrapper  # type: ignore[return-value]


def is_regular(path: str | os.PathLike) -> bool:
    """True when ``path`` (links followed) is a regular file; False when absent or anything else."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike, *, what: str) -> io.BufferedReader:
    """Open ``path`` for binary reading, refusing anything but a regular file without blocking
    (:func:`geoloc.fileio.open_regular`: a non-blocking open, then ``fstat`` on the descriptor).

    Raises:
        DatasetError: absent, unreadable, or not a regular file; ``what`` names the role
            (``"image"``, ``"CSV file"``...).
    """
    try:
        return _open_regular(Path(path), error=DatasetError)
    except DatasetError as err:
        raise DatasetError(f"{err} ({what}; only regular files are read)") from None


def read_text_lines(path: Path, *, what: str) -> io.TextIOWrapper:
    """A regular text file opened for reading as UTF-8 (BOM dropped, newlines kept for ``csv``)."""
    return io.TextIOWrapper(open_regular(path, what=what), encoding="utf-8-sig", newline="")
