"""The limits' edges on the API path: demand estimate, headers, 429s, settle amounts,
subjects per user and key, and the overrides in the users file and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from broker.accounts.keys import UserKey, hash_secret
from broker.accounts.users import KeyActionRefused, UsersStore, parse_users
from broker.api.limit_gate import (
    LimitGate,
    Reach,
    actual_tokens,
    go_duration,
    rate_headers,
    refusal_error,
)
from broker.cli import main as broker_cli
from broker.core.demand import Demand, ask_of, estimate
from broker.core.limits import LimitOverrides, Limits, RateInfo, Reason, Refusal
from broker.core.response import Outcome
from broker.state.memory.limits import MemoryLimitState

pytestmark = pytest.mark.usefixtures("clean_env")


# -- the demand estimate -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path", "expected"),
    [
        # 8 bytes of text -> 2 tokens, + 4 for the one message; no max_tokens: the default
        ({"messages": [{"role": "user", "content": "12345678"}]}, "/v1/chat/completions", (6, 100)),
        # 9 bytes round up to 3; two messages
        (
            {
                "messages": [
                    {"role": "system", "content": "abcd"},
                    {"role": "user", "content": "12345"},
                ],
                "max_tokens": 7,
            },
            "/v1/chat/completions",
            (3 + 8, 7),
        ),
        # max_completion_tokens wins over the deprecated max_tokens
        (
            {"messages": [], "max_completion_tokens": 50, "max_tokens": 9},
            "/v1/chat/completions",
            (0, 50),
        ),
        # content parts: only text counts (an image's base64 would overstate a hundredfold)
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "abcdefgh"},
                            {"type": "image_url", "image_url": {"url": "data:" + "A" * 4000}},
                        ],
                    }
                ],
                "max_tokens": 0,
            },
            "/v1/chat/completions",
            (2 + 4, 0),
        ),
        # multi-byte text counts its UTF-8 bytes
        ({"prompt": "héllo", "max_tokens": 1}, "/v1/completions", (2, 1)),
        ({"prompt": ["abcd", "abcd"], "max_tokens": True}, "/v1/completions", (2, 100)),
        # embeddings: no completion
        ({"input": ["abcd", "efgh"]}, "/v1/embeddings", (2, 0)),
    ],
)
def test_demand_estimate(body: dict, path: str, expected: tuple[int, int]) -> None:
    assert estimate(body, path, 100) == Demand(*expected)


# -- headers and 429s ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0004, "0s"),
        (0.012, "12ms"),
        (0.9994, "999ms"),
        (1.0, "1s"),
        (8.64, "8.64s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (90.5, "1m30.5s"),
        (3600.0, "1h0m0s"),
        (3661.25, "1h1m1.25s"),
    ],
)
def test_reset_durations_are_written_like_openai(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_rate_headers_only_for_limited_dimensions() -> None:
    info = RateInfo(limit_requests=60, remaining_requests=59, reset_requests=1.0)
    assert rate_headers(info) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
    }
    assert rate_headers(RateInfo()) == {}


def _refusal(reason: Reason, wait: float, subject: str = "gitlab-7") -> Refusal:
    info = RateInfo(60, 0, 1.0, 1000, 10, 0.012)
    return Refusal(reason, subject, 1000, 990, 250, wait, info)


def test_a_token_refusal_is_openais_429() -> None:
    exc = refusal_error(_refusal(Reason.TPM, 0.3), Demand(50, 200), "rid-1")
    body = json.loads(exc.envelope())["error"]
    assert exc.status == 429
    assert body["type"] == "tokens" and body["code"] == "rate_limit_exceeded"
    assert "tokens per minute (TPM) on user gitlab-7: Limit 1000, Used 990" in body["message"]
    assert "prompt ~50 + up to 200 completion" in body["message"]
    assert "try again in 300ms" in body["message"]
    assert exc.headers["Retry-After"] == "1" and exc.headers["retry-after-ms"] == "300"
    assert exc.headers["x-ratelimit-remaining-tokens"] == "10"
    assert exc.headers["x-ratelimit-reset-tokens"] == "12ms"
    assert exc.headers["x-request-id"] == "rid-1"
    assert "x-should-retry" not in exc.headers


def test_a_used_up_quota_says_do_not_retry() -> None:
    exc = refusal_error(_refusal(Reason.MONTHLY, 7200.0, "gitlab-7/laptop"), Demand(1, 1), "r")
    body = json.loads(exc.envelope())["error"]
    assert body["type"] == "insufficient_quota" and body["code"] == "insufficient_quota"
    assert "monthly token quota of key 'laptop'" in body["message"]
    assert "resets in 2h0m0s" in body["message"]
    assert exc.headers["x-should-retry"] == "false" and exc.headers["Retry-After"] == "7200"


def test_concurrency_and_rpm_refusals_are_requests() -> None:
    for reason in (Reason.CONCURRENCY, Reason.RPM):
        body = json.loads(refusal_error(_refusal(reason, 1.0), Demand(0, 0), "r").envelope())
        assert body["error"]["type"] == "requests"
        assert body["error"]["code"] == "rate_limit_exceeded"


# -- what a request is settled with ----------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "reach", "expected"),
    [
        (None, Reach.NOWHERE, 0),  # refused before the queue
        (Outcome(status=499, cancelled=True), Reach.NOWHERE, 0),  # cancelled while queued
        (Outcome(status=502, error="connector_lost"), Reach.CONNECTOR, 100),  # prompt only
        (Outcome(status=499, cancelled=True), Reach.CONNECTOR, 100),
        (Outcome(status=200, tokens_in=12, tokens_out=30), Reach.UPSTREAM, 42),  # its usage
        (Outcome(status=200), Reach.UPSTREAM, 300),  # unknown: the estimate stays
        (Outcome(status=200, tokens_in=12), Reach.UPSTREAM, 12 + 200),
        (Outcome(status=400, error="upstream_status"), Reach.UPSTREAM, 0),  # it refused
        (Outcome(status=499, cancelled=True, error="client_disconnected"), Reach.UPSTREAM, 300),
    ],
)
def test_settle_amounts(outcome: Outcome | None, reach: Reach, expected: int) -> None:
    assert actual_tokens(Demand(100, 200), outcome, reach) == expected


# -- subjects --------------------------------------------------------------------------------


class _Metrics:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def rate_limited(self, reason: str) -> None:
        self.reasons.append(reason)


def gate(defaults: Limits) -> LimitGate:
    return LimitGate(MemoryLimitState(), defaults, 100, _Metrics(), clock=lambda: 1e9)  # type: ignore[arg-type]


def test_subjects_are_the_user_and_a_key_with_its_own_limits() -> None:
    plain = UserKey(id="u-1", name="u-1")
    assert gate(Limits()).subjects(plain) == ((), ())
    assert gate(Limits(rpm=5)).subjects(plain) == (("u-1",), (Limits(rpm=5),))
    lifted = UserKey(id="gitlab-7", name="ci", limits=LimitOverrides(rpm="unlimited"))
    assert gate(Limits(rpm=5)).subjects(lifted) == ((), ())
    keyed = UserKey(id="gitlab-7", name="ci", key_limits=LimitOverrides(concurrency=1, tpm=9))
    assert gate(Limits(rpm=5)).subjects(keyed) == (
        ("gitlab-7", "gitlab-7/ci"),
        (Limits(rpm=5), Limits(tpm=9, concurrency=1)),
    )


async def test_admit_skips_everything_without_limits() -> None:
    ticket = await gate(Limits()).admit(UserKey("u", "u"), ask_of({}), "/v1/chat/completions", "r")
    assert ticket is None


async def test_admit_refuses_and_counts_the_reason() -> None:
    g = gate(Limits(concurrency=1))
    body = ask_of({"messages": [{"role": "user", "content": "hi"}]})
    ticket = await g.admit(UserKey("u", "u"), body, "/v1/chat/completions", "r")
    assert ticket is not None and ticket.demand == Demand(0, 0)  # no token limit: no estimate
    with pytest.raises(Exception, match="concurrent") as caught:
        await g.admit(UserKey("u", "u"), body, "/v1/chat/completions", "r")
    assert getattr(caught.value, "status", None) == 429
    assert g.metrics.reasons == ["concurrency"]  # type: ignore[attr-defined]
    await g.settle(ticket, None, Reach.NOWHERE)
    await g.settle(ticket, None, Reach.NOWHERE)
    assert await g.admit(UserKey("u", "u"), body, "/v1/chat/completions", "r") is not None


# -- overrides in the users file and the CLI -------------------------------------------------


def store(tmp_path: Path) -> UsersStore:
    return UsersStore(tmp_path / "users.yaml", clock=lambda: 1_800_000_000.0)


def test_users_file_limits_reach_the_keys(tmp_path: Path) -> None:
    users = store(tmp_path)
    first = users.login(7, "alice", "Alice").first_key
    assert first is not None
    laptop = users.create_key(7, "laptop")
    assert users.lookup(hash_secret(first)).limits is None  # type: ignore[union-attr]
    users.set_limits("alice", {"rpm": 60, "daily_tokens": "unlimited"})
    users.set_limits("alice", {"tpm": 5000})  # merged with what is there
    users.set_limits("alice", {"concurrency": 1}, key="laptop")
    found = users.lookup(hash_secret(laptop))
    assert found is not None
    assert found.limits == LimitOverrides(rpm=60, tpm=5000, daily_tokens="unlimited")
    assert found.key_limits == LimitOverrides(concurrency=1)
    assert users.lookup(hash_secret(first)).key_limits is None  # type: ignore[union-attr]
    # The file holds them; a reload by another process reads the same.
    data = yaml.safe_load(users.path.read_text())["users"][0]
    assert data["limits"]["rpm"] == 60 and data["limits"]["daily_tokens"] == "unlimited"
    assert parse_users(users.path.read_text(), users.path).users[0].keys[1].limits is not None
    users.set_limits("alice", {"rpm": None, "tpm": None, "daily_tokens": None})
    assert users.lookup(hash_secret(first)).limits is None  # type: ignore[union-attr]
    users.set_limits("alice", {}, key="laptop", replace=True)
    assert users.lookup(hash_secret(laptop)).key_limits is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rpm": 0}, "at least 1"),
        ({"rpm": "lots"}, "at least 1"),
        ({"speed": 3}, "unknown limit 'speed'"),
    ],
)
def test_bad_limits_are_refused(tmp_path: Path, values: dict, message: str) -> None:
    users = store(tmp_path)
    users.login(7, "alice", "Alice")
    with pytest.raises(KeyActionRefused, match=message):
        users.set_limits("alice", values)


def test_a_misspelled_limit_in_the_file_is_an_error(tmp_path: Path) -> None:
    text = "users:\n- gitlab_id: 1\n  username: a\n  limits: {rmp: 5}\n"
    with pytest.raises(Exception, match="rmp"):
        parse_users(text, tmp_path / "users.yaml")


def test_users_limits_cli(tmp_path: Path) -> None:
    users = store(tmp_path)
    users.login(7, "alice", "Alice")
    users.create_key(7, "laptop")
    base = ["--data-dir", str(tmp_path), "--users-file", str(users.path), "users", "limits"]
    run = CliRunner().invoke

    shown = run(broker_cli.main, [*base, "alice"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "alice: defaults" in shown.output and "key laptop" in shown.output
    set_ = run(
        broker_cli.main,
        [*base, "alice", "--rpm", "60", "--tpm", "10000", "--daily-tokens", "unlimited"],
        catch_exceptions=False,
    )
    assert set_.exit_code == 0, set_.output
    assert "alice: rpm=60 tpm=10000 daily-tokens=unlimited" in set_.output
    key = run(broker_cli.main, [*base, "alice", "--key", "laptop", "--concurrency", "2"])
    assert "key laptop" in key.output and "concurrency=2" in key.output
    back = run(broker_cli.main, [*base, "alice", "--tpm", "default"])
    assert "alice: rpm=60 daily-tokens=unlimited" in back.output
    listed = run(broker_cli.main, [*base[:-1], "list"], catch_exceptions=False)
    assert "LIMITS" in listed.output and "rpm=60 daily-tokens=unlimited" in listed.output
    cleared = run(broker_cli.main, [*base, "alice", "--clear"])
    assert "alice: defaults" in cleared.output and "concurrency=2" in cleared.output
    bad = run(broker_cli.main, [*base, "alice", "--rpm", "0"])
    assert bad.exit_code == 2 and "not a number" in bad.output
    missing = run(broker_cli.main, [*base, "nobody", "--rpm", "5"])
    assert missing.exit_code == 1 and "no user 'nobody'" in missing.stderr
