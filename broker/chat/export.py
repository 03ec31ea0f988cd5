"""A conversation as a file: OpenAI's messages format (JSON) or Markdown. Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from broker.chat.store import Conversation, Message, Summary


def as_openai(found: Conversation) -> dict[str, object]:
    """``{"model", "messages": [{"role", "content"}]}``: paste-ready for the API, plus the
    title and, per message, what the broker knows (model, tokens, cost, state) under
    ``remotellm`` (clients ignore fields they do not know)."""
    return {
        "title": found.summary.title,
        "model": found.summary.model,
        "messages": [
            {"role": m.role, "content": m.content, "remotellm": _meta(m)} for m in found.messages
        ],
    }


def _meta(m: Message) -> dict[str, object]:
    meta: dict[str, object] = {"created": _when(m.created), "state": m.state}
    if m.role == "assistant":
        meta |= {"model": m.model, "tokens_in": m.tokens_in, "tokens_out": m.tokens_out}
        if m.cost is not None:
            meta |= {"cost": m.cost, "currency": m.currency}
    return meta


def as_markdown(found: Conversation) -> str:
    """The title as a heading, each message under its role; the model's text as it came
    (Markdown already), the user's too."""
    out = [f"# {_one_line(found.summary.title)}", ""]
    for m in found.messages:
        head = f"## {m.role}"
        if m.role == "assistant" and m.model:
            head += f" ({_one_line(m.model)})"
        if m.state in ("stopped", "failed"):
            head += f" [{m.state}]"
        out += [head, "", m.content.rstrip(), ""]
    return "\n".join(out)


def filename(summary: Summary, extension: str) -> str:
    """A safe download name from the title: letters, digits, dash; never a path."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", summary.title).strip("-")[:60] or "conversation"
    return f"{stem}.{extension}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
