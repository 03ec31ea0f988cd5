"""Run an entry point's event loop: uvloop where available, else asyncio's own.

uvloop makes each event-loop wake cheaper (the relay's cost is mostly wakes: one per paced
token on each side) and cuts the memory of held TLS connections (measured: asyncio's own TLS ~256 KiB per
connection, uvloop's 62 KiB; docs/performance.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("REMOTELLM_EVENT_LOOP") == "asyncio":  # for profilers and debugging
        return None
    try:
        import uvloop
    except ImportError:  # Windows, or a platform without wheels
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
