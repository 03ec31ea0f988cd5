"""Durable, private file writes: every store's one way to replace a file.

``write_atomic`` writes a temp file in the target's directory, fsyncs it, renames it over
the target and fsyncs the directory. A crash at any point leaves either the old file or
the new one, never an empty or half-written file (a rename without the first fsync can
be persisted before the data, so a crash would leave an empty file that the next write
then takes as "no users"). Files are mode 600, directories we create mode 700.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` mode 700 if missing (parents as the umask says).

    An existing directory keeps its mode: it may be ``/etc/remotellm`` or a mounted volume,
    and widening or narrowing it is the operator's decision.
    """
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Make an existing file ours-only (mode 600); a missing file is left missing."""
    with contextlib.suppress(FileNotFoundError):
        path.chmod(FILE_MODE)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a crash (the directory entry)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data``: temp file, write, fsync, rename, fsync the directory."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


Stamp = tuple[int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """What changes when the file is replaced or edited; None when there is no file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
