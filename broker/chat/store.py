"""Conversations and their messages, per user, in their own SQLite file (docs/chat.md).

Every read and write names the user: a conversation of another user is as absent as one
that never existed. Time is an argument (``now``), so the tests move a fake clock. The
file is private (mode 600) like the usage database, and separate from it: it holds what
people wrote, with its own retention (``--chat-retention-days``), while the ledger holds
no content. Calls are synchronous; the portal runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.usage.ledger import prepare_db_file

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")  # 16 random bytes, url-safe base64
MAX_TITLE = 120
UNDO_SECONDS = 10.0  # a deleted conversation comes back within this, then is purged
ROLES = ("user", "assistant")
STATES = ("done", "streaming", "stopped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    deleted REAL
);
CREATE INDEX IF NOT EXISTS conversations_user ON conversations (user_id, updated);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    model TEXT,
    state TEXT NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    estimated INTEGER NOT NULL DEFAULT 0,
    cost REAL,
    currency TEXT,
    error TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation, id);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created);
"""

_MESSAGE_COLUMNS = (
    "id, role, content, model, state, tokens_in, tokens_out, estimated, cost, currency, "
    "error, created"
)


def new_id() -> str:
    return secrets.token_urlsafe(16)


def clean_title(value: str) -> str:
    """One line of at most ``MAX_TITLE`` characters, without control or format characters
    (no newlines, no bidi overrides that would make a title read as another)."""
    kept = "".join(
        " " if c.isspace() else c
        for c in value
        if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf")
    )
    title = " ".join(kept.split())
    return title[:MAX_TITLE].rstrip() or "untitled"


@dataclass(frozen=True, slots=True)
class Summary:
    id: str
    title: str
    model: str
    created: float
    updated: float


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    role: str
    content: str
    model: str | None
    state: str
    tokens_in: int | None
    tokens_out: int | None
    estimated: bool
    cost: float | None
    currency: str | None
    error: str | None
    created: float


@dataclass(frozen=True, slots=True)
class Conversation:
    summary: Summary
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class ReplyEnd:
    """How a reply ended: its state and what it cost (None where unknown)."""

    state: str
    model: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    estimated: bool = False
    cost: float | None = None
    currency: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    conversations: int
    messages: int


class ChatStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        prepare_db_file(self.path)
        with self._tx() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
                self._db.execute("PRAGMA foreign_keys=ON")
            try:
                with self._db:  # commit, or roll back on an error
                    yield self._db
            except sqlite3.Error:
                self._db.close()  # a fresh connection next time
                self._db = None
                raise

    # -- conversations ----------------------------------------------------------------------

    def create(self, user: str, title: str, model: str, now: float) -> Summary:
        summary = Summary(new_id(), clean_title(title), model, now, now)
        with self._tx() as db:
            db.execute(
                "INSERT INTO conversations (id, user_id, title, model, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (summary.id, user, summary.title, model, now, now),
            )
        return summary

    def summaries(
        self, user: str, search: str = "", day: tuple[float, float] | None = None, limit: int = 200
    ) -> list[Summary]:
        """The user's conversations, newest first; ``search`` in the title (case-insensitive,
        literally); ``day`` (start, end) keeps those with a message in that span."""
        sql = "SELECT id, title, model, created, updated FROM conversations c "
        sql += "WHERE user_id = ? AND deleted IS NULL"
        args: list[object] = [user]
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql += " AND title LIKE ? ESCAPE '\\'"
            args.append(f"%{escaped}%")
        if day is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation = c.id"
                " AND m.created >= ? AND m.created < ?)"
            )
            args += [day[0], day[1]]
        sql += " ORDER BY updated DESC LIMIT ?"
        args.append(limit)
        with self._tx() as db:
            return [Summary(*row) for row in db.execute(sql, args)]

    def summary(self, user: str, cid: str) -> Summary | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT id, title, model, created, updated FROM conversations "
                "WHERE id = ? AND user_id = ? AND deleted IS NULL",
                (cid, user),
            ).fetchone()
        return Summary(*row) if row else None

    def get(self, user: str, cid: str) -> Conversation | None:
        summary = self.summary(user, cid)
        if summary is None:
            return None
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation = ? ORDER BY id",
                (cid,),
            ).fetchall()
        return Conversation(summary, [_message(row) for row in rows])

    def rename(self, user: str, cid: str, title: str) -> Summary | None:
        with self._tx() as db:
            changed = db.execute(
                "UPDATE conversations SET title = ? "
                "WHERE id = ? AND user_id = ? AND deleted IS NULL",
                (clean_title(title), cid, user),
            ).rowcount
        return self.summary(user, cid) if changed else None

    def delete(self, user: str, cid: str, now: float) -> bool:
        """Hidden at once; gone for good after ``UNDO_SECONDS`` (``purge``)."""
        with self._tx() as db:
            return bool(
                db.execute(
                    "UPDATE conversations SET deleted = ? "
                    "WHERE id = ? AND user_id = ? AND deleted IS NULL",
                    (now, cid, user),
                ).rowcount
            )

    def restore(self, user: str, cid: str, now: float) -> bool:
        with self._tx() as db:
            return bool(
                db.execute(
                    "UPDATE conversations SET deleted = NULL "
                    "WHERE id = ? AND user_id = ? AND deleted IS NOT NULL AND deleted >= ?",
                    (cid, user, now - UNDO_SECONDS),
                ).rowcount
            )

    def delete_all(self, user: str) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM conversations WHERE user_id = ?", (user,)).rowcount

    def clone(self, user: str, cid: str, upto: int, now: float) -> Summary | None:
        """A new conversation with the messages of ``cid`` up to and including ``upto``."""
        source = self.get(user, cid)
        if source is None or not any(m.id == upto for m in source.messages):
            return None
        title = clean_title("branch of " + source.summary.title)
        copy = self.create(user, title, source.summary.model, now)
        kept = [m for m in source.messages if m.id <= upto]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO messages (conversation, role, content, model, state, tokens_in, "
                "tokens_out, estimated, cost, currency, error, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_copied(copy.id, m) for m in kept],
            )
        return copy

    # -- messages ---------------------------------------------------------------------------

    def add_message(
        self, user: str, cid: str, role: str, content: str, model: str | None, now: float
    ) -> int | None:
        """A message at the end of the conversation: the user's ``done``, a reply
        ``streaming`` until ``finish``. None if the conversation is not the user's."""
        state = "done" if role == "user" else "streaming"
        with self._tx() as db:
            touched = db.execute(
                "UPDATE conversations SET updated = ?, model = COALESCE(?, model) "
                "WHERE id = ? AND user_id = ? AND deleted IS NULL",
                (now, model, cid, user),
            ).rowcount
            if not touched:
                return None
            cursor = db.execute(
                "INSERT INTO messages (conversation, role, content, model, state, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (cid, role, content, model, state, now),
            )
        return cursor.lastrowid

    def append(self, message: int, text: str) -> None:
        """More of a streaming reply (the writer batches: docs/chat.md)."""
        with self._tx() as db:
            db.execute(
                "UPDATE messages SET content = content || ? WHERE id = ? AND state = 'streaming'",
                (text, message),
            )

    def finish(self, message: int, end: ReplyEnd) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE messages SET state = ?, model = COALESCE(?, model), tokens_in = ?, "
                "tokens_out = ?, estimated = ?, cost = ?, currency = ?, error = ? WHERE id = ?",
                (
                    end.state,
                    end.model,
                    end.tokens_in,
                    end.tokens_out,
                    int(end.estimated),
                    end.cost,
                    end.currency,
                    end.error,
                    message,
                ),
            )

    def message(self, message: int) -> Message | None:
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message,)
            ).fetchone()
        return _message(row) if row else None

    # -- housekeeping -----------------------------------------------------------------------

    def recover(self) -> int:
        """At start: replies that were streaming when the broker stopped are ``stopped``."""
        with self._tx() as db:
            return db.execute(
                "UPDATE messages SET state = 'stopped' WHERE state = 'streaming'"
            ).rowcount

    def purge(self, now: float, retention: float | None) -> int:
        """Drop conversations deleted more than ``UNDO_SECONDS`` ago and, with a
        ``retention`` (seconds), those not written to for longer; how many went."""
        with self._tx() as db:
            gone = db.execute(
                "DELETE FROM conversations WHERE deleted IS NOT NULL AND deleted < ?",
                (now - UNDO_SECONDS,),
            ).rowcount
            if retention is not None:
                gone += db.execute(
                    "DELETE FROM conversations WHERE updated < ?", (now - retention,)
                ).rowcount
        return gone

    def counts(self, user: str) -> Counts:
        """What an operator may see of a user's chat: how much, never what."""
        with self._tx() as db:
            row = db.execute(
                "SELECT COUNT(DISTINCT c.id), COUNT(m.id) FROM conversations c "
                "LEFT JOIN messages m ON m.conversation = c.id "
                "WHERE c.user_id = ? AND c.deleted IS NULL",
                (user,),
            ).fetchone()
        return Counts(int(row[0]), int(row[1]))

    def counts_by_user(self) -> dict[str, Counts]:
        """Every user's counts (the operator's users page): numbers only."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT c.user_id, COUNT(DISTINCT c.id), COUNT(m.id) FROM conversations c "
                "LEFT JOIN messages m ON m.conversation = c.id "
                "WHERE c.deleted IS NULL GROUP BY c.user_id"
            ).fetchall()
        return _counted(rows)


def _counted(rows: list[tuple[str, int, int]]) -> dict[str, Counts]:
    return {user: Counts(int(c), int(m)) for user, c, m in rows}


def _copied(conversation: str, m: Message) -> tuple[object, ...]:
    state = "stopped" if m.state == "streaming" else m.state
    return (
        conversation,
        m.role,
        m.content,
        m.model,
        state,
        m.tokens_in,
        m.tokens_out,
        int(m.estimated),
        m.cost,
        m.currency,
        m.error,
        m.created,
    )


def _message(row: tuple[object, ...]) -> Message:
    values = list(row)
    values[7] = bool(values[7])
    return Message(*values)  # type: ignore[arg-type]
