"""With sentinels, --redis-url gives only the credentials, db and TLS."""

from __future__ import annotations

from broker.state.redis.connection import sentinel_address, url_credentials


def test_the_url_gives_credentials_db_and_tls_only() -> None:
    assert url_credentials(None) == {}
    assert url_credentials("redis://unused") == {"ssl": False}
    assert url_credentials("rediss://app:p%40ss@ignored:1234/3") == {
        "ssl": True,
        "password": "p@ss",
        "username": "app",
        "db": 3,
    }


def test_sentinel_addresses() -> None:
    assert sentinel_address("10.0.0.1:26379") == ("10.0.0.1", 26379)
    assert sentinel_address("[::1]:26380") == ("::1", 26380)
