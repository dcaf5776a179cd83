"""User-facing errors and the exit codes of the ``geoloc`` command.

Every failure a user can cause (a bad file, a wrong flag, a damaged bundle) is raised as a
:class:`GeolocError` subclass whose message is one line: what was wrong, which file or setting,
what to do. The CLI prints ``error: <message>`` on stderr and exits with the class's
``exit_code``; nothing else reaches the user as a traceback.

Exit codes (the one table; the CLI and the README follow it)::

    0    success
    1    an unexpected internal error (a bug: the traceback is printed; please report it)
    2    usage or setup: bad flag, bad config value or file, missing package (faiss)
         ConfigError, DependencyError, click usage errors
    3    bad or damaged input: dataset, image, bundle, backbone weights
         DatasetError, ImageError, BundleError, BackboneError, InputFileError
    4    partial success: the command finished but some inputs were skipped (unreadable
         query images in ``query`` or ``eval``); the answered ones are printed and written
    5    output cannot be written: not writable, read-only file system, no space, a folder
         where a file is expected (or the reverse)              OutputError
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_PARTIAL = 4
EXIT_OUTPUT = 5
EXIT_INTERRUPTED = 130


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``), so that a
    message quoting a path or value stays on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class GeolocError(Exception):
    """Base class of every error meant for the user. ``str(err)`` is the one-line message."""

    exit_code = EXIT_USAGE


class ConfigError(GeolocError):
    """A config file, a ``--set key=value`` override or a flag is invalid."""

    exit_code = EXIT_USAGE


class DependencyError(GeolocError, ImportError):
    """A required package (faiss) is missing or broken; the message says what to install."""

    exit_code = EXIT_USAGE


def require_faiss() -> None:
    """Raise :class:`DependencyError` (one line naming the extra to install) when faiss is missing or broken."""
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if isinstance(e, DependencyError):
            raise
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "faiss"
        what = "is not installed" if missing else f"cannot be imported ({one_line(str(e))[:160]})"
        raise DependencyError(f"the faiss module {what}; install it with pip install -e \".[cpu]\" "
                              "(or \".[gpu]\" with CUDA) in the checkout, or pip install \"geoloc[cpu]\"") from None


class DatasetError(GeolocError):
    """A dataset (folder, CSV, file name, EXIF) cannot be read or holds an invalid label."""

    exit_code = EXIT_INPUT


class ImageError(GeolocError):
    """One image cannot be decoded (empty, truncated, unsupported, too large...)."""

    exit_code = EXIT_INPUT

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputFileError(GeolocError):
    """A file to read is not a regular file (FIFO, device, folder) or is larger than allowed."""

    exit_code = EXIT_INPUT


class BundleError(GeolocError):
    """An index bundle is missing, damaged, from another version, or built differently."""

    exit_code = EXIT_INPUT


class BackboneError(GeolocError):
    """A backbone cannot be created or its weights cannot be found."""

    exit_code = EXIT_INPUT


class OutputError(GeolocError):
    """An output path cannot be written (not writable, read-only, no space, wrong kind)."""

    exit_code = EXIT_OUTPUT
