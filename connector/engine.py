"""What the local LLM is: Ollama, or only known to speak the OpenAI API.

Asked at each registration (the LLM behind ``--llm-url`` may have been swapped): Ollama
answers ``GET /api/version`` with ``{"version": "0.6.2"}`` and ``GET /api/tags`` with
``{"models": [...]}`` (docs/clients.md). Both must answer so for the kind to be
``ollama``; the broker then relays Ollama's native API to this connector.
"""

from __future__ import annotations

import re

from connector.upstream import Upstream, UpstreamError
from shared.logging import get_logger
from shared.paths import OLLAMA_ENGINE

log = get_logger("connector.engine")

DETECT_TIMEOUT = 3.0
_VERSION = re.compile(r"[A-Za-z0-9._+-]{1,40}")


async def detect_engine(upstream: Upstream) -> str:
    """``ollama/<version>`` when the LLM answers as Ollama does, else ``""``."""
    try:
        version = await upstream.get_json("/api/version", DETECT_TIMEOUT)
        tags = await upstream.get_json("/api/tags", DETECT_TIMEOUT)
    except UpstreamError:
        return ""
    number = version.get("version") if isinstance(version, dict) else None
    listed = isinstance(tags, dict) and isinstance(tags.get("models"), list)
    if not isinstance(number, str) or not listed:
        return ""
    engine = f"{OLLAMA_ENGINE}/{number}" if _VERSION.fullmatch(number) else OLLAMA_ENGINE
    log.info("engine_detected", engine=engine)
    return engine
