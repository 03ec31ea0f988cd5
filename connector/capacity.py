"""How many requests this connector takes at once: given, or asked of the engine.

The broker hands a connector at most its capacity, so the number must match the engine's
real parallelism: too low throttles a batching engine (capacity 4 ran 50 streams to a
vLLM-class upstream at 0.09x direct), too high lets one connector hoard queued work that
another connector could serve.

What the engines say over HTTP (their documentation, 2026-12):

- llama.cpp's ``llama-server``: ``GET /props`` has ``total_slots`` (its ``--parallel``);
  ``GET /slots`` lists one entry per slot (off with ``--no-slots``).
- vLLM: nothing; ``--max-num-seqs`` is not exposed (``/metrics`` shows running and waiting
  requests, ``/v1/models`` the context length, neither the limit).
- Ollama: nothing; ``OLLAMA_NUM_PARALLEL`` is read from the server's environment and not
  reported (``/api/ps`` lists loaded models and their context, not slots).
- LM Studio: nothing; "Max Concurrent Predictions" (default 4) is a model-load setting of
  the app, not in its REST or OpenAI-compatible answers.

Elsewhere the default is 64: engines queue what exceeds their parallelism themselves, so a
capacity above it costs only fairness between connectors, while one below it caps
throughput. 64 is above what one GPU batches usefully for most models, and ``--capacity``
sets the exact number.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from connector.status import CapacityChanged, Emit
from connector.upstream import UpstreamError
from shared.logging import get_logger

log = get_logger("connector.capacity")

DEFAULT_CAPACITY = 64
# Connection pools are sized before the engine is asked: ``auto`` never goes beyond this.
AUTO_MAX = 128
CONFIGURED = "--capacity"
_NO_SLOTS = "default (the engine does not report its slots)"


@dataclass(frozen=True)
class Capacity:
    value: int
    source: str
    detected: bool = True  # False: the engine could not be asked yet (ask again later)


def configured(value: int) -> Capacity:
    return Capacity(value, CONFIGURED)


def initial(setting: int | str) -> Capacity:
    """``--capacity N`` as given; ``auto`` starts undetected (the engine is asked at start)."""
    return configured(setting) if isinstance(setting, int) else undetected()


def pool_size(setting: int | str) -> int:
    """Connections to size the HTTP pools for: the most requests that can run at once."""
    return setting if isinstance(setting, int) else AUTO_MAX


def undetected() -> Capacity:
    return Capacity(DEFAULT_CAPACITY, "default (the local LLM did not answer yet)", detected=False)


def from_engine(props: object, slots: object) -> Capacity:
    """Map what the engine answered (decoded JSON, or None) to a capacity and its source."""
    found: tuple[int, str] | None = None
    if isinstance(props, dict):
        total = props.get("total_slots")
        if isinstance(total, int) and not isinstance(total, bool) and total >= 1:
            found = (total, "llama.cpp /props total_slots")
    if found is None and isinstance(slots, list) and slots:
        found = (len(slots), "llama.cpp /slots")
    if found is None:
        return Capacity(DEFAULT_CAPACITY, _NO_SLOTS)
    value, source = found
    if value > AUTO_MAX:
        return Capacity(AUTO_MAX, f"{source} ({value}), capped at {AUTO_MAX}: give --capacity")
    return Capacity(value, source)


GetJson = Callable[[str], Awaitable[object]]


async def detect(get_json: GetJson) -> Capacity:
    """Ask the engine; ``get_json`` raises ``UpstreamError`` on any failure.

    A server that answers but reports nothing gets the default for good; one that does not
    answer at all (not started yet) gets it until it is asked again.
    """
    answers: dict[str, object] = {}
    reached = False
    for path in ("/props", "/slots"):
        try:
            answers[path] = await get_json(path)
        except UpstreamError as exc:
            reached = reached or exc.answered
            continue
        reached = True
        if from_engine(answers[path], None).source != _NO_SLOTS:
            break
    if not reached:
        return undetected()
    return from_engine(answers.get("/props"), answers.get("/slots"))


class CapacityWatch:
    """The capacity offered to the broker, asked of the engine until it answers.

    ``on_change`` runs when the engine reports a different number: the broker knows only
    what the connector registered with.
    """

    def __init__(
        self, setting: int | str, get_json: GetJson, emit: Emit, on_change: Callable[[], None]
    ) -> None:
        self._get_json = get_json
        self._emit = emit
        self._on_change = on_change
        self.current = initial(setting)
        emit(CapacityChanged(self.current.value, self.current.source))

    async def detect(self) -> None:
        found = await detect(self._get_json)
        if found == self.current:
            return
        changed = found.value != self.current.value
        self.current = found
        self._emit(CapacityChanged(found.value, found.source))
        log.info("capacity", capacity=found.value, source=found.source)
        if changed and found.detected:
            self._on_change()
