"""One operator-editable YAML file, parsed and kept current: the base of every account store.

- Reads: the last good parse stays in memory and the file is re-read when its stamp
  (mtime, size, inode) changes. A broken file is logged once (``<name>_file_invalid``),
  the last good content keeps serving, and the broken stamp is never taken as current.
- Writes: under a thread lock and an ``flock`` on a sidecar lock file (``.<name>.lock``),
  the file is re-read if it changed, the change applied to a copy, and the copy written
  with ``shared.files.write_atomic`` (durable, mode 600) only if it differs. A file left
  broken by the operator refuses every change (``FileBroken``) until it parses again: no
  write ever replaces an edit the broker could not read.
"""

from __future__ import annotations

import copy
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from shared.errors import ConfigError
from shared.files import Stamp, file_stamp, private_dir, write_atomic
from shared.logging import get_logger

log = get_logger("broker.accounts")

T = TypeVar("T")
R = TypeVar("R")
_MISSING: Stamp = (-1, -1, -1)  # the stamp of "no file" where a file is required


class FileBroken(ConfigError):
    """The file on disk does not parse: changes wait until the operator fixes it."""


def write_yaml_atomic(path: Path, data: Any) -> None:
    """Write an operator-editable YAML file durably (``shared.files.write_atomic``, mode 600)."""
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))


class YamlFileStore(Generic[T]):
    """A YAML file's parsed content ``T``; thread-safe; see the module docstring.

    ``parse`` turns the file's text into ``T`` or raises ``ConfigError`` saying where;
    ``empty`` is the content of a missing file; ``dump`` turns ``T`` back into plain data
    (None: the broker never writes this file); ``installed`` hears of every new content
    (and whether a file was there); ``required``: a missing file is an error, not empty.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        parse: Callable[[str, Path], T],
        empty: Callable[[], T],
        dump: Callable[[T], Any] | None = None,
        installed: Callable[[T, bool], None] | None = None,
        required: bool = False,
    ) -> None:
        self.path = path
        self.name = name
        self._parse, self._dump, self._empty = parse, dump, empty
        self._installed, self._required = installed, required
        self._lock_path = path.with_name(f".{path.name}.lock")
        self._lock = threading.Lock()
        self._doc: T = empty()
        self._stamp: Stamp | None = None
        self._bad_stamp: Stamp | None = None
        self._loaded = False
        self.error: str | None = None

    @property
    def doc(self) -> T:
        """The last good content (never a broken file's)."""
        return self._doc

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold off reloads and writes in this process (to read or hook in consistently)."""
        with self._lock:
            yield

    # -- reading ----------------------------------------------------------------------------

    def load(self) -> None:
        """The first read, at start: a broken file raises instead of serving nothing."""
        with self._lock:
            stamp = file_stamp(self.path)
            if stamp is None and self._required:
                raise ConfigError(f"{self.path} does not exist")
            doc = self._read() if stamp is not None else self._empty()
            self._install(doc, stamp)

    def reload(self) -> bool:
        """Re-read the file if it changed; True when new content was installed."""
        # Under the writers' lock: a reload that saw "no file yet" just before a write
        # must not install that emptiness after the write.
        with self._lock:
            stamp = file_stamp(self.path)
            seen = _MISSING if stamp is None and self._required else stamp
            if self._loaded and (stamp == self._stamp or seen == self._bad_stamp):
                return False
            if stamp is None and not self._required:
                self._install(self._empty(), None)
                return True
            try:
                doc = self._read() if stamp is not None else self._no_file()
            except ConfigError as exc:
                # Logged once per broken version; the good stamp stays, so a write re-reads
                # the file (and refuses) instead of overwriting the operator's edit.
                self.error, self._bad_stamp = str(exc), seen
                log.error(f"{self.name}_file_invalid", path=str(self.path), error=str(exc))
                return False
            self._install(doc, stamp)
            log.info(f"{self.name}_file_loaded", path=str(self.path))
            return True

    def _no_file(self) -> T:
        raise ConfigError(f"{self.path} does not exist")

    def _read(self) -> T:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc
        return self._parse(text, self.path)

    def _install(self, doc: T, stamp: Stamp | None) -> None:
        if self._installed is not None:
            self._installed(doc, stamp is not None)
        self._doc, self._stamp, self._bad_stamp = doc, stamp, None
        self._loaded, self.error = True, None

    # -- writing ----------------------------------------------------------------------------

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        private_dir(self.path.parent)
        with self._lock, open(self._lock_path, "a") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _current(self) -> T:
        stamp = file_stamp(self.path)
        if stamp is None:
            return self._empty()
        if stamp == self._stamp:
            return self._doc
        try:
            return self._read()  # an edit made meanwhile (operator, CLI): apply on top of it
        except ConfigError as exc:
            raise FileBroken(
                f"{exc}. Nothing was changed: fix the file first (the broker keeps "
                "serving its last good content meanwhile)."
            ) from exc

    def mutate(self, change: Callable[[T], R]) -> R:
        """Apply ``change`` to a copy of the current content and write it if it changed."""
        dump = self._dump
        if dump is None:
            raise TypeError(f"{self.path} is the operator's: the broker never writes it")
        with self._file_lock():
            current = self._current()
            doc = copy.deepcopy(current)
            result = change(doc)
            if doc != current:  # nothing changed: the file is not written
                write_yaml_atomic(self.path, dump(doc))
            self._install(doc, file_stamp(self.path))
            return result
