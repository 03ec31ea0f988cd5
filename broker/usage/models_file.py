"""The models file, re-read when it changes (``--models-file``: prices and aliases).

A broken edit is logged once per version and the last good content keeps serving, like
the keys and users files; the broker refuses to start only when the file is broken then.
"""

from __future__ import annotations

from pathlib import Path

from broker.usage.prices import ModelsCatalog, PricesFileError, load_models_file
from shared.files import Stamp, file_stamp
from shared.logging import get_logger

log = get_logger("broker.usage.models_file")


class ModelsFileWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = file_stamp(path)
        self._bad: Stamp | None = None
        self.catalog = load_models_file(path)  # PricesFileError: the broker does not start
        self.error: str | None = None

    def reload(self) -> ModelsCatalog | None:
        """The new content when the file changed and parses; None otherwise."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp or (stamp is not None and stamp == self._bad):
            return None
        try:
            catalog = load_models_file(self.path)
        except PricesFileError as exc:
            if stamp != self._bad or (stamp is None and self.error is None):
                log.error("models_file_broken", error=str(exc), hint="the last good one serves")
            self._bad, self.error = stamp, str(exc)
            return None
        self._stamp, self._bad, self.error, self.catalog = stamp, None, None, catalog
        log.info(
            "models_file_reloaded",
            path=str(self.path),
            priced=len(catalog.prices.prices) if catalog.prices else 0,
            aliases=len(catalog.aliases),
        )
        return catalog
