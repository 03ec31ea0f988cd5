"""Broker settings: declared once; CLI flags, env variables, YAML keys and docs derive from it."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from broker.core.limits import Limits
from broker.oidc_providers import OidcProvider, load_providers
from shared.paths import route_pattern
from shared.settings import FileAwareSettings, split_list

SECONDS = 1.0
HOURS = 3600 * SECONDS
MIB = 1024 * 1024


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "remotellm" / "broker"


class BrokerSettings(FileAwareSettings):
    model_config = SettingsConfigDict(env_prefix="REMOTELLM_BROKER_", extra="ignore")

    host: str = Field("0.0.0.0", description="Address the API and the relay listen on.")
    port: int = Field(8443, ge=0, le=65535, description="Port for the API and the relay.")
    backlog: int = Field(
        2048,
        ge=1,
        le=65535,
        description="Listen backlog of the API/relay port: connections the kernel queues "
        "before the broker accepts them (Hypercorn's 100 resets a burst of new clients; "
        "Linux caps it at net.core.somaxconn).",
    )
    server: Literal["hypercorn", "uvicorn"] = Field(
        "hypercorn",
        description="HTTP server of both ports: hypercorn (HTTP/1.1 and HTTP/2 over TLS) or "
        "uvicorn (HTTP/1.1 only, parsed in C by httptools: about a third less broker CPU "
        "per request; docs/performance.md).",
    )
    health_host: str = Field("127.0.0.1", description="Address of the health server.")
    health_port: int = Field(
        8080, ge=0, le=65535, description="Port serving /health and /ready (0 turns it off)."
    )
    public_url: str | None = Field(
        None,
        description="The broker's URL as connectors and API users reach it (shown in the "
        "start-up banner; default: derived from host and port).",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where generated keys (hashed) are kept across restarts.",
        json_schema_extra={"doc_default": "~/.local/share/remotellm/broker"},
    )
    user_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Static API key accepted from API users (repeatable; env: comma-separated).",
        json_schema_extra={"flag": "--user-api-key"},
    )
    connector_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Static token accepted from connectors (repeatable; env: comma-separated).",
        json_schema_extra={"flag": "--connector-token"},
    )
    connector_config: Path | None = Field(
        None,
        description="YAML file `connectors: [{token, llm_api_key?, name?, id?}]`, reloaded on "
        "change.",
    )
    record_usage: bool = Field(
        True,
        description="Record every request (user, model, connector, status, tokens, timings) "
        "in SQLite.",
    )
    usage_db: Path | None = Field(
        None,
        description="SQLite file for usage records.",
        json_schema_extra={"doc_default": "<data-dir>/usage.sqlite3"},
    )
    chat_retention_days: float | None = Field(
        None,
        gt=0,
        description="Delete portal chat conversations not written to for this many days "
        "(checked every minute; default: keep them until their user deletes them; "
        "docs/chat.md).",
    )
    ask_stream_usage: bool = Field(
        True,
        description="Ask the LLM for a usage chunk on streams whose client did not "
        "(stream_options.include_usage) and remove it from the answer, so stream tokens are "
        "exact; turn off for an LLM server that refuses the option.",
    )
    models_file: Path | None = Field(
        None,
        description="YAML file of token prices per model (`currency`, `models: {<model>: "
        "{input_per_million, output_per_million}}`): adds cost columns wherever usage is "
        "shown (docs/usage.md); and model aliases with fallback (`aliases: {<name>: "
        "[<model> or {model, connector}, ...]}`, docs/aliases.md). Re-read on change.",
    )
    generate_credentials: bool = Field(
        True,
        description="With no key or token configured, create a user key and a connector token "
        "in the data dir and print them once (otherwise refuse to start).",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Reverse proxy address or CIDR whose X-Forwarded-For is believed for the "
        "client address in the logs (repeatable; env: comma-separated).",
    )
    extra_api_routes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Another POST route under /v1/ to relay besides the OpenAI-compatible "
        "ones (chat/completions, completions, embeddings, responses, ...), e.g. "
        "'tokenize' or 'rerank/*' ('*': one path segment). Repeatable; env: comma-separated.",
        json_schema_extra={"flag": "--extra-api-route"},
    )
    # -- key portal (broker/portal/) ------------------------------------------------------
    gitlab_url: str = Field(
        "https://gitlab.com",
        description="GitLab instance the key portal logs users in with (OAuth 2).",
    )
    gitlab_client_id: str | None = Field(
        None,
        description="Application ID of the GitLab OAuth application; the key portal at "
        "/portal/ is on when this is set.",
    )
    gitlab_client_secret: str | None = Field(
        None, description="Secret of the GitLab OAuth application."
    )
    gitlab_allowed_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="GitLab group (full path) whose members may log in to the portal; checked "
        "at login and again every --group-check-interval (repeatable; env: comma-separated). "
        "A portal needs this or --gitlab-allow-any-user.",
        json_schema_extra={"flag": "--gitlab-allowed-group"},
    )
    gitlab_allow_any_user: bool = Field(
        False,
        description="Let every account of the GitLab instance log in to the portal and get a "
        "key (on gitlab.com: anyone); without it a portal with no --gitlab-allowed-group "
        "refuses to start.",
    )
    oidc_providers_file: Path | None = Field(
        None,
        description="YAML file of OpenID Connect providers the key portal also logs users "
        "in with, one login button each (`providers: [{name, issuer, client_id, "
        "client_secret_file or client_secret_env, label, scopes, groups_claim, "
        "allowed_groups, allow_any_user}]`, docs/portal.md); read at start.",
    )
    group_check_interval: float = Field(
        1 * HOURS,
        ge=1 * SECONDS,
        le=1 * HOURS,
        description="Seconds between checks that a logged-in portal user is still in an "
        "allowed group (with their GitLab token); a user who left is logged out.",
    )
    session_secret: str | None = Field(
        None,
        description="Key that signs portal session cookies (generated into the data dir when "
        "not given; brokers sharing --redis-url need the same one). Sessions live in the "
        "broker's memory (a restart logs everyone out), or in Redis with --redis-url.",
        json_schema_extra={"doc_default": "<data-dir>/session_secret"},
    )
    session_lifetime: float = Field(12 * HOURS, gt=0, description="Seconds a portal login lasts.")
    session_idle: float = Field(
        8 * HOURS,
        gt=0,
        description="Seconds a portal login lasts without a request before it ends.",
    )
    portal_max_form: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest portal form body in bytes (a page with status 413 above).",
    )
    users_file: Path | None = Field(
        None,
        description="YAML file of portal users and their keys (hashes only), reloaded on "
        "change; `remotellm-broker users` edits it too.",
        json_schema_extra={"doc_default": "<data-dir>/users.yaml"},
    )
    max_key_lifetime: float | None = Field(
        None,
        gt=0,
        description="Longest a key may live, in seconds (e.g. 7776000 for 90 days): the "
        "portal's users must give every key they create, scope or regenerate an expiry "
        "within it (default: keys may never expire). Operators may set any expiry.",
    )
    users_reload_interval: float = Field(
        1 * SECONDS,
        gt=0,
        le=60,
        description="Seconds between checks of the users file for changes (and, with "
        "--redis-url, of the brokers' shared revocations).",
    )
    admin_ids: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Numeric GitLab user ID who may use the operator's pages at /portal/admin "
        "(repeatable; env: comma-separated; GitLab shows it on the user's profile, and the "
        "portal's 403 page and its login log lines name it).",
        json_schema_extra={"flag": "--admin-id"},
    )
    admins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="GitLab username who may use the operator's pages (repeatable; env: "
        "comma-separated). Deprecated: users can rename themselves, so it logs a warning; "
        "use --admin-id.",
        json_schema_extra={"flag": "--admin"},
    )
    allow_enrollment: bool = Field(
        False,
        description="Let connectors without a token ask to join; the request waits on "
        "/portal/admin until an admin approves it (docs/enrollment.md).",
    )
    header_timeout: float = Field(
        30 * SECONDS,
        gt=0,
        le=3600 * SECONDS,
        description="Seconds a connection (either port) may stay open without sending a complete "
        "request head, new or kept alive between requests; also how long a portal form body "
        "and a health request may take. Keep a reverse proxy's idle upstream connections "
        "shorter than this.",
    )
    certfile: Path | None = Field(None, description="TLS certificate (PEM) to serve HTTPS.")
    keyfile: Path | None = Field(None, description="TLS private key (PEM).")
    log_level: str = Field("info", description="debug, info, warning or error.")
    trace_hops: bool = Field(
        False,
        description="Log one hop_trace line (info level) per relayed request with the time "
        "each hop was reached (docs/performance.md, remotellm-bench local --trace); for "
        "diagnosing latency, off in production.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console, or auto (console on a TTY, else JSON)."
    )
    poll_wait: float = Field(
        25 * SECONDS, gt=0, description="Seconds a long-poll is held when there is no work."
    )
    lease: float = Field(
        15 * SECONDS,
        gt=0,
        description="Seconds a connector has to start answering a request it was handed before "
        "the request goes to another connector.",
    )
    max_redispatch: int = Field(
        2, ge=0, description="How often a request whose lease expired is handed out again."
    )
    session_ttl: float = Field(
        60 * SECONDS, gt=0, description="Seconds a connector session lives without a poll."
    )
    heartbeat: float = Field(
        15 * SECONDS,
        gt=0,
        description="Seconds of silence after which heartbeats are sent (uploads and SSE).",
    )
    stream_commit_after: float = Field(
        10 * SECONDS,
        ge=0,
        description="Seconds a streaming request waits for the upstream head before the broker "
        "answers 200 text/event-stream and keeps it alive with SSE comments.",
    )
    queue_max: int = Field(256, ge=1, description="Requests that may wait per model.")
    max_sessions_per_identity: int = Field(
        32,
        ge=1,
        description="Live sessions one connector token (or enrolled connector) may hold: a "
        "registration past it is refused with 429.",
    )
    max_models_per_session: int = Field(
        256,
        ge=1,
        le=1000,
        description="Models one connector session may serve: a registration or models update "
        "naming more is refused with 400.",
    )
    model_grace: float = Field(
        3600 * SECONDS,
        ge=0,
        description="Seconds a model no live session serves is still known (API requests get "
        "503, so clients retry); then it is forgotten (404) with its metrics series.",
    )
    queue_wait: float = Field(
        60 * SECONDS, gt=0, description="Seconds a request may wait for a free connector."
    )
    first_byte_timeout: float = Field(
        600 * SECONDS,
        gt=0,
        description="Seconds from hand-out to the upstream's response head.",
    )
    idle_timeout: float = Field(
        300 * SECONDS, gt=0, description="Seconds without any upload frame before a request fails."
    )
    total_timeout: float = Field(
        3600 * SECONDS, gt=0, description="Seconds a relayed request may take in all."
    )
    max_request_body: int = Field(
        8 * MIB, ge=1024, description="Largest API request body in bytes (413 above)."
    )
    max_json_depth: int = Field(
        128,
        ge=8,
        description="Deepest nesting of arrays and objects in an API request body (400 above).",
    )
    max_json_elements: int = Field(
        1_000_000,
        ge=1000,
        description="Most JSON values in an API request body (400 above): bounds the "
        "memory of parsing it, which is many times the body's bytes for small values.",
    )
    max_response_body: int = Field(
        256 * MIB, ge=1024, description="Largest relayed response in bytes."
    )
    max_part_bytes: int = Field(
        64 * 1024, ge=1024, description="Parts mode: bytes per part the connector aims for."
    )
    drain_timeout: float = Field(
        30 * SECONDS, ge=0, description="Seconds to let in-flight streams finish on SIGTERM."
    )
    # -- limits per user (docs/limits.md); overrides per user and key in the users file ---
    rpm_limit: int | None = Field(
        None,
        ge=1,
        description="Requests per minute each user may send (unset: unlimited).",
    )
    tpm_limit: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute each user may use, reserved before a request is "
        "queued (prompt estimate + max_tokens) and corrected to the real usage after it "
        "(unset: unlimited).",
    )
    concurrency_limit: int | None = Field(
        32,
        ge=1,
        description="Requests each user may have in flight at once, queued ones included "
        "(each holds its body in memory); raise it for users who need more, or per user "
        "and key in the users file.",
    )
    daily_token_quota: int | None = Field(
        None,
        ge=1,
        description="Tokens each user may use per UTC calendar day (unset: unlimited).",
    )
    monthly_token_quota: int | None = Field(
        None,
        ge=1,
        description="Tokens each user may use per UTC calendar month (unset: unlimited).",
    )
    default_max_tokens: int = Field(
        1024,
        ge=1,
        description="Completion tokens a request that names no max_tokens is assumed to "
        "use when token limits reserve its worst case.",
    )
    mux_upload: bool = Field(
        True,
        description="Offer connectors the multiplexed upload (one long-lived POST carries "
        "every response; older connectors keep per-request uploads).",
    )
    mux_buffer_limit: int = Field(
        1 * MIB,
        ge=64 * 1024,
        description="Multiplexed upload: bytes of one response held for an API client that "
        "reads slower than the LLM writes (beyond its socket buffers); over it the request "
        "fails with client_too_slow and its connector stops generating.",
    )
    parts_buffer_limit: int = Field(
        4 * MIB,
        ge=64 * 1024,
        description="Parts upload: bytes of one response's parts that arrived ahead of "
        "their turn the broker holds; over it the request fails with bad_upload.",
    )
    # -- several brokers (docs/scale-out.md) ----------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis holding the relay state several brokers share, e.g. "
        "redis://redis:6379/0 (a password in it is a secret; unset: in this process).",
    )
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="A Redis Sentinel (host:port) that names the current Redis master, so "
        "the brokers follow a failover without a restart (repeatable; env: comma-separated; "
        "needs --redis-sentinel-master; --redis-url then only gives the password and db).",
        json_schema_extra={"flag": "--redis-sentinel"},
    )
    redis_sentinel_master: str | None = Field(
        None,
        description="With --redis-sentinel: the name the sentinels monitor the master under.",
    )
    redis_prefix: str = Field(
        "remotellm:",
        description="Prefix of every Redis key and channel (one per deployment sharing a Redis).",
    )
    revocation_max_age: float = Field(
        10 * SECONDS,
        gt=0,
        description="With Redis: seconds the brokers' shared key revocations and user "
        "blocks may go unread before this broker answers API requests with 503.",
    )

    @field_validator(
        "user_api_keys",
        "connector_tokens",
        "trusted_proxies",
        "extra_api_routes",
        "gitlab_allowed_groups",
        "redis_sentinels",
        "admins",
        "admin_ids",
        mode="before",
    )
    @classmethod
    def _split(cls, value: object) -> object:
        return split_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR") from exc
        return value

    @field_validator("extra_api_routes")
    @classmethod
    def _routes(cls, value: list[str]) -> list[str]:
        return [route_pattern(route) for route in value]

    @model_validator(mode="after")
    def _tls_pair(self) -> BrokerSettings:
        # One without the other would serve plain HTTP while the banner says https.
        if (self.certfile is None) != (self.keyfile is None):
            given, missing = (
                ("--certfile", "--keyfile") if self.keyfile is None else ("--keyfile", "--certfile")
            )
            raise ValueError(
                f"{given} needs {missing} too (REMOTELLM_BROKER_CERTFILE and "
                "REMOTELLM_BROKER_KEYFILE): give both to serve HTTPS, or neither for HTTP"
            )
        for flag, path in (("--certfile", self.certfile), ("--keyfile", self.keyfile)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
        return self

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: list[str]) -> list[str]:
        for address in value:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--redis-sentinel {address!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _sentinel_master(self) -> BrokerSettings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError(
                "--redis-sentinel (REMOTELLM_BROKER_REDIS_SENTINELS) and "
                "--redis-sentinel-master (REMOTELLM_BROKER_REDIS_SENTINEL_MASTER) go "
                "together: the sentinels' addresses and the master name they monitor"
            )
        return self

    @property
    def redis_configured(self) -> bool:
        """Brokers share their state in Redis (--redis-url or --redis-sentinel)."""
        return bool(self.redis_url or self.redis_sentinels)

    _oidc: tuple[OidcProvider, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _oidc_providers(self) -> BrokerSettings:
        if self.oidc_providers_file is not None:
            self._oidc = load_providers(self.oidc_providers_file)
        return self

    @property
    def oidc_providers(self) -> tuple[OidcProvider, ...]:
        """The providers of --oidc-providers-file, secrets read (validated at load)."""
        return self._oidc

    @model_validator(mode="after")
    def _portal_audience(self) -> BrokerSettings:
        if (
            self.gitlab_client_id
            and not self.gitlab_allowed_groups
            and not (self.gitlab_allow_any_user)
        ):
            raise ValueError(
                "the key portal (--gitlab-client-id) would give an API key to every account "
                f"of {self.gitlab_url}: name who may log in with --gitlab-allowed-group "
                "(REMOTELLM_BROKER_GITLAB_ALLOWED_GROUPS), or say that anyone may with "
                "--gitlab-allow-any-user (REMOTELLM_BROKER_GITLAB_ALLOW_ANY_USER=true)"
            )
        return self

    @property
    def default_limits(self) -> Limits:
        return Limits(
            rpm=self.rpm_limit,
            tpm=self.tpm_limit,
            concurrency=self.concurrency_limit,
            daily_tokens=self.daily_token_quota,
            monthly_tokens=self.monthly_token_quota,
        )

    @property
    def usage_path(self) -> Path:
        return self.usage_db or self.data_dir / "usage.sqlite3"

    @property
    def chat_path(self) -> Path:
        return self.data_dir / "chat.sqlite3"

    @property
    def enrolled_path(self) -> Path:
        return self.data_dir / "enrolled_connectors.yaml"

    @property
    def admin_tokens_path(self) -> Path:
        return self.data_dir / "admin_tokens.yaml"

    @property
    def users_path(self) -> Path:
        return self.users_file or self.data_dir / "users.yaml"

    @property
    def portal_enabled(self) -> bool:
        return bool(self.gitlab_client_id or self._oidc)

    @property
    def serves_tls(self) -> bool:
        """HTTPS on the API/relay port: the validator above makes it both files or none."""
        return self.certfile is not None and self.keyfile is not None

    @property
    def advertised_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.serves_tls else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{scheme}://{host}:{self.port}"
