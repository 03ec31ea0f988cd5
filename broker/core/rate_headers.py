"""Rate-limit headers from a limiter's ``RateInfo``: OpenAI's and Anthropic's forms.

No clock: Anthropic's reset headers are times, computed from the ``now`` passed in.
"""

from __future__ import annotations

from datetime import UTC, datetime

from broker.core.limits import RateInfo

__all__ = ["anthropic_rate_headers", "go_duration", "rate_headers", "rfc3339"]


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it (Go's style): ``12ms``, ``1s``, ``6m0s``."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return f"{text}{secs}s"


def rate_headers(info: RateInfo) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` set for the dimensions that are limited."""
    headers: dict[str, str] = {}
    if info.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(info.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(info.remaining_requests)
        headers["x-ratelimit-reset-requests"] = go_duration(info.reset_requests or 0.0)
    if info.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(info.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(info.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = go_duration(info.reset_tokens or 0.0)
    return headers


def rfc3339(at: float) -> str:
    """A wall-clock time as Anthropic's reset headers write it: ``2026-01-01T00:01:00Z``."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def anthropic_rate_headers(info: RateInfo, now: float) -> dict[str, str]:
    """Anthropic's ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``.

    The reset is when the budget is whole again, as an RFC 3339 time; the broker's token
    limit counts input and output together, so only the combined ``tokens`` set is sent.
    """
    headers: dict[str, str] = {}
    if info.limit_requests is not None:
        headers["anthropic-ratelimit-requests-limit"] = str(info.limit_requests)
        headers["anthropic-ratelimit-requests-remaining"] = str(info.remaining_requests)
        reset = rfc3339(now + (info.reset_requests or 0.0))
        headers["anthropic-ratelimit-requests-reset"] = reset
    if info.limit_tokens is not None:
        headers["anthropic-ratelimit-tokens-limit"] = str(info.limit_tokens)
        headers["anthropic-ratelimit-tokens-remaining"] = str(info.remaining_tokens)
        headers["anthropic-ratelimit-tokens-reset"] = rfc3339(now + (info.reset_tokens or 0.0))
    return headers
