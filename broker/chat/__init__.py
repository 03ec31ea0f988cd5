"""The portal's team chat: conversations kept by the broker per user (docs/chat.md).

``store`` (SQLite, time as an argument), ``replies`` (the broker writes a reply through
its own API relay, in process, saving it as it arrives), ``sse`` (reading that stream),
``export`` (OpenAI messages JSON and Markdown), ``retention`` (the periodic purge).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.chat.replies import Replies
from broker.chat.store import ChatStore


@dataclass(frozen=True, slots=True)
class Chat:
    store: ChatStore
    replies: Replies


__all__ = ["Chat", "ChatStore", "Replies"]
