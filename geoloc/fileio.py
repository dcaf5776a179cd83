"""Crash-safe file writing, bounded reading and hashing shared by the bundle, the caches and the checkpoints.

Writing: every write goes to a temporary file in the same folder, is fsynced, given the mode the
user's umask allows (``0o666 & ~umask``) and renamed over the target, so a reader (or a process
restarted after SIGKILL) sees the old file or the new one, never half of one. A write that fails
because the disk is full, the file system is read-only or permission is denied raises one
:class:`OutputError` line naming the path; the temporary file is removed.

Reading: :func:`open_regular` / :func:`read_bounded` open only regular files (a FIFO, a device
such as ``/dev/zero``, a socket or a directory is refused without blocking) and never read more
than a stated number of bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from geoloc import errors as _errors
from geoloc.errors import GeolocError

if hasattr(_errors, "OutputError"):  # pragma: no cover - once errors.py defines it, use that one
    OutputError = _errors.OutputError  # type: ignore[misc]
else:

    class OutputError(GeolocError):  # type: ignore[no-redef]
        """An output path cannot be written: no space, read-only file system, permission, or it is
        not a place geoloc may write (an existing file, a folder geoloc did not create)."""

        exit_code = 5


if hasattr(_errors, "InputFileError"):  # pragma: no cover
    InputFileError = _errors.InputFileError  # type: ignore[misc]
else:

    class InputFileError(GeolocError):  # type: ignore[no-redef]
        """A file to read is not a regular file (FIFO, device, directory) or is larger than allowed."""

        exit_code = 3


_NOSPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READONLY_ERRNOS = {errno.EROFS}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
_LOW_SPACE_BYTES = 1 << 20
"""A writer failing with no errno (torch.save, faiss) while less than this is free: the disk is full."""


def one_line(text: object) -> str:
    """:func:`geoloc.errors.one_line` of ``str(text)`` (any object: a path, an errno string)."""
    return _errors.one_line(str(text))


# -- umask and modes ------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # not thread-safe, only where /proc is missing
    os.umask(old)
    return old


def apply_umask(path: Path, *, folder: bool = False) -> None:
    """Give ``path`` the mode a freshly created file (``0o666``) or folder (``0o777``) gets under the umask.

    Libraries that write through ``mkstemp`` (safetensors, ...) leave ``0o600``: a bundle built by
    one user could then not be read by another even where the umask says it should.
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


# -- errors ---------------------------------------------------------------------------------------

def _free_bytes(path: Path) -> int | None:
    p = Path(path)
    for cand in (p, *p.parents):
        try:
            st = os.statvfs(cand)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def write_failure(err: BaseException, path: Path) -> OutputError | None:
    """The one-line :class:`OutputError` for a failed write of ``path``, or None when ``err`` is not one.

    Recognises ``OSError`` errnos (ENOSPC, EDQUOT, EROFS, EACCES, EPERM), the same failures
    reported as text by Rust/C++ writers (safetensors' ``os error 28``, faiss's
    ``No space left on device``), and writers that give no reason at all (``torch.save``'s
    ``RuntimeError``) while the file system holds less than 1 MiB free.
    """
    text = str(err)
    code = err.errno if isinstance(err, OSError) else None
    low = text.lower()
    if code in _NOSPACE_ERRNOS or "no space left" in low or "os error 28" in low or "storagefull" in low \
            or "disk quota" in low:
        kind = "nospace"
    elif code in _READONLY_ERRNOS or "read-only file system" in low or "os error 30" in low:
        kind = "readonly"
    elif code in _PERMISSION_ERRNOS or "permission denied" in low or "os error 13" in low:
        kind = "permission"
    elif isinstance(err, (RuntimeError, OSError)) or type(err).__name__ == "SafetensorError":
        free = _free_bytes(Path(path).parent)
        if free is None or free >= _LOW_SPACE_BYTES:
            return None
        kind = "nospace"
    else:
        return None
    where = one_line(path)
    if kind == "nospace":
        return OutputError(f"no space left on device while writing {where}; free space or choose another --out")
    if kind == "readonly":
        return OutputError(f"{where}: the file system is read-only; choose another --out on a writable disk")
    return OutputError(f"{where}: permission denied; choose a folder you can write to (or fix its permissions)")


@contextlib.contextmanager
def translate_write_errors(path: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (disk full, read-only, permission) into one :class:`OutputError` line.

    Wrap writers that raise their own exception types::

        with translate_write_errors(folder / "optimizer.pt"):
            torch.save(state, folder / "optimizer.pt")

    Anything else propagates unchanged.
    """
    try:
        yield
    except GeolocError:
        raise
    except Exception as err:  # noqa: BLE001 - classified below, re-raised when not a write failure
        mapped = write_failure(err, path)
        if mapped is None:
            raise
        raise mapped from None


# -- writing --------------------------------------------------------------------------------------

def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, umask mode, rename, fsync the folder).

    Raises:
        OutputError: one line naming ``path`` when the disk is full, the file system is
            read-only or permission is denied; nothing is left under ``path`` or beside it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with translate_write_errors(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            apply_umask(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_file(path: Path, *, flag: str = "--out") -> None:
    """Check, before any work, that a result file can be written at ``path`` (one line if not).

    Refuses a folder, a FIFO or socket in the way, a missing ancestor that is a file, and a
    place that cannot be written (read-only file system, permission). A missing parent folder
    is fine when it can be created. Writes nothing but a probe file that it removes.

    Raises:
        OutputError: naming ``path`` and ``flag``.
    """
    import tempfile

    path = Path(path)
    where = one_line(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as err:
        raise OutputError(f"{where}: cannot be examined ({one_line(err.strerror or err)}); choose another {flag}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{where}: is a folder; {flag} needs a file name")
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise OutputError(f"{where}: is {_kind(st.st_mode)}; {flag} needs a regular file")
    anc = path.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{one_line(anc)}: is not a folder, so {where} cannot be written; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".geoloc-probe-")
    except OSError as err:
        raise (write_failure(err, path) or OutputError(
            f"{where}: cannot write in {one_line(anc)} ({one_line(err.strerror or err)}); choose another {flag}")) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False).encode("utf-8"))


# -- bounded reading ------------------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, *, max_bytes: int | None = None, dir_fd: int | None = None,
                 follow_symlinks: bool = True, error: type[GeolocError] = InputFileError) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (at most ``max_bytes`` long).

    The file is opened non-blocking first, so a FIFO never blocks, then checked with ``fstat``
    on the open descriptor (no race between the check and the open). ``dir_fd`` resolves a
    relative ``path`` inside an already opened folder.

    Raises:
        ``error`` (default :class:`InputFileError`): one line naming the path when it is missing,
            unreadable, not a regular file (directory, FIFO, device, socket; a symbolic link when
            ``follow_symlinks`` is false) or larger than ``max_bytes``.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    where = one_line(path)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise error(f"{where}: file not found") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise error(f"{where}: is a symbolic link, expected a regular file") from None
        if err.errno == errno.EISDIR:
            raise error(f"{where}: is a directory, expected a regular file") from None
        raise error(f"{where}: cannot be opened ({one_line(err.strerror or err)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where}: is {_kind(st.st_mode)}, expected a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{where}: is {st.st_size} bytes, more than the {max_bytes} expected; "
                        "it is not the file geoloc wrote (replace it)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, *, max_bytes: int, dir_fd: int | None = None, follow_symlinks: bool = True,
                 error: type[GeolocError] = InputFileError) -> bytes:
    """The bytes of regular file ``path``, refusing more than ``max_bytes`` (even if it grows while read)."""
    with open_regular(path, max_bytes=max_bytes, dir_fd=dir_fd, follow_symlinks=follow_symlinks, error=error) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{one_line(path)}: more than {max_bytes} bytes; it is not the file geoloc wrote (replace it)")
    return data


def sha256_fileobj(fh: BinaryIO, *, chunk: int = 1 << 22, limit: int | None = None) -> str:
    """sha256 of what remains in ``fh`` (at most ``limit`` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    while True:
        n = chunk if left is None else min(chunk, left)
        if n <= 0:
            break
        block = fh.read(n)
        if not block:
            break
        h.update(block)
        if left is not None:
            left -= len(block)
    return h.hexdigest()


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    """sha256 of a regular file (a FIFO or device raises :class:`InputFileError` instead of hanging)."""
    with open_regular(path) as fh:
        return sha256_fileobj(fh, chunk=chunk)


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()
