"""The chat store with a fake clock and no sockets: ownership, undo, retention, clone."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.chat.retention import DAY, sweep
from broker.chat.store import ID_PATTERN, UNDO_SECONDS, ChatStore, ReplyEnd, clean_title

T0 = 1_800_000_000.0
ALICE, BOB = "gitlab-1", "gitlab-2"


@pytest.fixture
def store(tmp_path: Path) -> ChatStore:
    s = ChatStore(tmp_path / "chat.sqlite3")
    s.open()
    return s


def talk(store: ChatStore, cid: str, now: float, question: str = "q") -> int:
    assert store.add_message(ALICE, cid, "user", question, "m1", now) is not None
    reply = store.add_message(ALICE, cid, "assistant", "", "m1", now)
    assert reply is not None
    return reply


def test_conversations_are_listed_newest_first_and_searched_literally(store: ChatStore) -> None:
    a = store.create(ALICE, "100% sure_thing", "m1", T0)
    b = store.create(ALICE, "another", "m1", T0 + 1)
    store.create(BOB, "100% bob's", "m1", T0 + 2)
    assert ID_PATTERN.fullmatch(a.id) and a.id != b.id
    assert [s.id for s in store.summaries(ALICE)] == [b.id, a.id]
    talk(store, a.id, T0 + 5)  # writing to it brings it to the top
    assert [s.id for s in store.summaries(ALICE)] == [a.id, b.id]
    assert [s.id for s in store.summaries(ALICE, "0% s")] == [a.id]
    assert store.summaries(ALICE, "%") == [store.summaries(ALICE)[0]]
    assert store.summaries(ALICE, "_") == [store.summaries(ALICE)[0]]
    assert [s.id for s in store.summaries(ALICE, day=(T0 + 4, T0 + 6))] == [a.id]
    assert store.summaries(ALICE, day=(T0 + 10, T0 + 20)) == []


def test_another_users_conversation_is_never_touched(store: ChatStore) -> None:
    mine = store.create(ALICE, "mine", "m1", T0)
    reply = talk(store, mine.id, T0)
    assert store.get(BOB, mine.id) is None
    assert store.summary(BOB, mine.id) is None
    assert store.rename(BOB, mine.id, "x") is None
    assert store.delete(BOB, mine.id, T0) is False
    assert store.clone(BOB, mine.id, reply, T0) is None
    assert store.add_message(BOB, mine.id, "user", "hi", "m1", T0) is None
    assert store.delete_all(BOB) == 0
    found = store.get(ALICE, mine.id)
    assert found is not None and found.summary.title == "mine" and len(found.messages) == 2


def test_a_reply_is_appended_in_pieces_and_finished_with_its_usage(store: ChatStore) -> None:
    cid = store.create(ALICE, "t", "m1", T0).id
    reply = talk(store, cid, T0)
    store.append(reply, "hel")
    store.append(reply, "lo")
    store.finish(reply, ReplyEnd("done", "m2", 3, 2, False, 0.5, "EUR"))
    store.append(reply, " more")  # a finished reply takes nothing more
    got = store.message(reply)
    assert got is not None
    assert (got.content, got.state, got.model, got.tokens_in, got.tokens_out) == (
        "hello",
        "done",
        "m2",
        3,
        2,
    )
    assert (got.cost, got.currency, got.estimated) == (0.5, "EUR", False)


def test_a_restart_leaves_what_was_streaming_stopped(store: ChatStore) -> None:
    cid = store.create(ALICE, "t", "m1", T0).id
    reply = talk(store, cid, T0)
    store.append(reply, "partial")
    assert store.recover() == 1
    got = store.message(reply)
    assert got is not None and (got.content, got.state) == ("partial", "stopped")


def test_delete_can_be_undone_only_within_the_window_then_is_purged(store: ChatStore) -> None:
    cid = store.create(ALICE, "t", "m1", T0).id
    talk(store, cid, T0)
    assert store.delete(ALICE, cid, T0 + 100)
    assert store.get(ALICE, cid) is None and store.summaries(ALICE) == []
    assert store.restore(ALICE, cid, T0 + 100 + UNDO_SECONDS - 1)
    assert store.get(ALICE, cid) is not None
    assert store.delete(ALICE, cid, T0 + 200)
    assert not store.restore(ALICE, cid, T0 + 200 + UNDO_SECONDS + 1)
    assert sweep(store, T0 + 200 + UNDO_SECONDS - 1, None) == 0  # still undoable
    assert sweep(store, T0 + 200 + UNDO_SECONDS + 1, None) == 1
    assert store.counts(ALICE).messages == 0


def test_retention_deletes_what_was_not_written_to_for_that_long(store: ChatStore) -> None:
    old = store.create(ALICE, "old", "m1", T0).id
    fresh = store.create(ALICE, "fresh", "m1", T0).id
    talk(store, fresh, T0 + 2.5 * DAY)
    assert sweep(store, T0 + 100 * DAY, None) == 0  # no setting: kept
    assert sweep(store, T0 + 2 * DAY, 3.0) == 0
    assert sweep(store, T0 + 3 * DAY + 1, 3.0) == 1
    assert [s.id for s in store.summaries(ALICE)] == [fresh]
    assert store.get(ALICE, old) is None
    assert sweep(store, T0 + 5.5 * DAY + 1, 3.0) == 1
    assert store.counts(ALICE).conversations == 0


def test_clone_copies_up_to_the_message_and_settles_a_streaming_one(store: ChatStore) -> None:
    cid = store.create(ALICE, "talk", "m1", T0).id
    first = talk(store, cid, T0, "one")
    store.append(first, "answer one")
    store.finish(first, ReplyEnd("done", "m1", 1, 2))
    second = talk(store, cid, T0 + 1, "two")
    copy = store.clone(ALICE, cid, first, T0 + 2)
    assert copy is not None and copy.title == "branch of talk"
    got = store.get(ALICE, copy.id)
    assert got is not None
    assert [(m.role, m.content) for m in got.messages] == [
        ("user", "one"),
        ("assistant", "answer one"),
    ]
    assert store.clone(ALICE, cid, 10**9, T0) is None  # not a message of that conversation
    whole = store.clone(ALICE, cid, second, T0 + 3)
    assert whole is not None
    last = store.get(ALICE, whole.id)
    assert last is not None and last.messages[-1].state == "stopped"


def test_delete_all_and_counts(store: ChatStore) -> None:
    for n in range(3):
        talk(store, store.create(ALICE, f"c{n}", "m1", T0).id, T0)
    store.create(BOB, "b", "m1", T0)
    assert (store.counts(ALICE).conversations, store.counts(ALICE).messages) == (3, 6)
    assert store.delete_all(ALICE) == 3
    assert store.counts(ALICE).conversations == 0
    assert store.counts(BOB).conversations == 1


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("  hello\n\tworld  ", "hello world"),
        ("\u202egnp.exe\u200b", "gnp.exe"),
        ("<b>x</b>", "<b>x</b>"),  # text, shown with textContent
        ("\x00\x1b[31m", "[31m"),
        ("", "untitled"),
        ("x" * 500, "x" * 120),
    ],
)
def test_titles_are_one_clean_line(given: str, kept: str) -> None:
    assert clean_title(given) == kept
