"""The composition root: builds every store, picks the memory or Redis state, builds the
apps (the public one with the API, relay and portal; the health one) and starts every
background loop. Nothing else in the broker constructs a store or starts a loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from broker.accounts.enrollment import EnrollmentStore
from broker.accounts.keys import KeyStore
from broker.accounts.users import UsersStore
from broker.admin import admin_api_blueprint
from broker.admin.operations import build_operations, end_sessions
from broker.api.models import create_api_blueprint
from broker.api.ollama import OllamaApi
from broker.api.relay import ApiRelay
from broker.asgi import BrokerASGI
from broker.broker_state import BrokerState
from broker.chat import Chat, ChatStore, Replies
from broker.chat.retention import keep_tidy
from broker.core import StateUnavailable, Timings
from broker.core.aliases import NO_ALIASES
from broker.core.errors import BrokerError
from broker.errors import error_response
from broker.metrics import BrokerMetrics
from broker.portal import PortalContext, install_portal
from broker.portal.oauth import GitLabOAuth
from broker.portal.security import add_security_headers
from broker.portal.session import Cookies, load_session_secret
from broker.relay.app import RelayApp
from broker.settings import BrokerSettings
from broker.state.limits import LimitState
from broker.state.memory.limits import MemoryLimitState
from broker.state.memory.portal_sessions import SessionStore
from broker.state.memory.relay import MemoryRelayState
from broker.state.portal_sessions import Sessions
from broker.state.relay import RelayState, RelayView
from broker.usage.ledger import UsageRecorder
from broker.usage.models_file import ModelsFileWatch
from shared.hoptrace import HopTrace
from shared.logging import get_logger
from shared.templates import render

# redis-py, the Redis state, httpx and authlib (GitLab) load only when the settings use them:
# a broker without --redis-url or a GitLab application never imports them (a test checks).
if TYPE_CHECKING:
    from redis.asyncio import Redis

    from broker.accounts.revocations import RevocationBoard
    from broker.portal.oidc import OidcLogin

log = get_logger("broker.composition")

FLUSH_EVERY = 15.0  # seconds between writes of the users' last-used times


def timings_from(settings: BrokerSettings) -> Timings:
    return Timings(
        lease=settings.lease,
        session_ttl=settings.session_ttl,
        queue_wait=settings.queue_wait,
        queue_max=settings.queue_max,
        first_byte_timeout=settings.first_byte_timeout,
        idle_timeout=settings.idle_timeout,
        total_timeout=settings.total_timeout,
        max_redispatch=settings.max_redispatch,
        max_sessions_per_identity=settings.max_sessions_per_identity,
        model_grace=settings.model_grace,
    )


def _redis_client(settings: BrokerSettings) -> Redis:
    """At --redis-url, or the master the sentinels name (their failovers followed)."""
    from broker.state.redis import connect, connect_sentinel

    if settings.redis_sentinel_master:
        return connect_sentinel(
            settings.redis_sentinels, settings.redis_sentinel_master, settings.redis_url
        )
    assert settings.redis_url is not None  # redis_configured
    return connect(settings.redis_url)


def _shared_state(
    settings: BrokerSettings, keys: KeyStore
) -> tuple[RelayState, LimitState, RevocationBoard | None]:
    """The relay state, the limit counters and the revocation board: in this process, or
    in Redis (one client, one pool for all three) when brokers share it."""
    if not settings.redis_configured:
        return MemoryRelayState(timings_from(settings)), MemoryLimitState(), None
    from broker.accounts.revocations import RevocationBoard
    from broker.state.redis import RedisRelayState
    from broker.state.redis.limits import RedisLimitState

    redis = _redis_client(settings)
    hub = RedisRelayState(
        timings_from(settings), redis, prefix=settings.redis_prefix, upstream_key=keys.upstream_key
    )
    # A reservation outlives any request (--total-timeout) only if its broker died.
    limiter = RedisLimitState(
        redis, prefix=settings.redis_prefix, lease=settings.total_timeout + 60.0
    )
    revocations = RevocationBoard(redis, settings.redis_prefix, settings.revocation_max_age)
    keys.attach_revocations(revocations)
    return hub, limiter, revocations


def build_users(
    settings: BrokerSettings, keys: KeyStore, revocations: RevocationBoard | None
) -> UsersStore:
    """The users file: its keys authenticate the API, with or without the portal."""
    users = UsersStore(settings.users_path, max_key_lifetime=settings.max_key_lifetime)
    keys.attach_users(users.lookup)
    if revocations is not None:
        users.watch(revocations.note)
    return users


def build_state(settings: BrokerSettings, keys: KeyStore | None = None) -> BrokerState:
    if keys is None:
        keys = KeyStore(
            static_user_keys=settings.user_api_keys,
            static_connector_tokens=settings.connector_tokens,
            connector_config=settings.connector_config,
            data_dir=settings.data_dir,
        )
    hub, limiter, revocations = _shared_state(settings, keys)
    usage = UsageRecorder(settings.usage_path) if settings.record_usage else None
    # Approved connectors keep working with enrollment turned off later: always loaded.
    enrollment = EnrollmentStore(settings.enrolled_path)
    keys.attach_connectors(enrollment.lookup, enrollment.upstream_key)
    models_file = ModelsFileWatch(settings.models_file) if settings.models_file else None
    users = build_users(settings, keys, revocations)
    catalog = models_file.catalog if models_file is not None else None
    return BrokerState(
        settings=settings,
        relay=hub,
        keys=keys,
        metrics=BrokerMetrics(),
        users=users,
        usage=usage,
        enrollment=enrollment,
        prices=catalog.prices if catalog is not None else None,
        aliases=catalog.aliases if catalog is not None else NO_ALIASES,
        models_file=models_file,
        limiter=limiter,
        revocations=revocations,
        trace=HopTrace("broker") if settings.trace_hops else None,
        operations=build_operations(
            users, enrollment, settings.usage_path, settings.admin_tokens_path
        ),
    )


def portal_sessions(state: BrokerState) -> Sessions:
    """Portal sessions in memory; in Redis, sharing the relay state's connection, when
    brokers share state (a login on one broker is valid on all)."""
    settings = state.settings
    if settings.redis_configured:
        from broker.state.redis import RedisRelayState
        from broker.state.redis.portal_sessions import RedisSessions

        if isinstance(state.relay, RedisRelayState):
            return RedisSessions(
                state.relay.redis,
                settings.redis_prefix,
                settings.session_lifetime,
                settings.session_idle,
            )
    return SessionStore(settings.session_lifetime, settings.session_idle)


def _gitlab(settings: BrokerSettings) -> GitLabOAuth | None:
    if not settings.gitlab_client_id:
        return None
    import httpx

    return GitLabOAuth(
        base_url=settings.gitlab_url,
        client_id=settings.gitlab_client_id,
        client_secret=settings.gitlab_client_secret,
        redirect_uri=settings.advertised_url + "/portal/callback",
        allowed_groups=settings.gitlab_allowed_groups,
        http=httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0)),
    )


def _oidc(settings: BrokerSettings) -> dict[str, OidcLogin]:
    if not settings.oidc_providers:
        return {}
    import httpx

    from broker.portal.oidc import OidcLogin

    http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))
    for provider in settings.oidc_providers:
        if not provider.allowed_groups:
            log.warning("portal_open_to_any_oidc_user", provider=provider.name)
    return {
        p.name: OidcLogin(
            p, redirect_uri=f"{settings.advertised_url}/portal/callback/{p.name}", http=http
        )
        for p in settings.oidc_providers
    }


def build_portal(state: BrokerState) -> PortalContext:
    """What the portal's routes use: the users store, cookies, GitLab, the session store."""
    settings = state.settings
    # Nothing to sign with the portal off: do not leave a secret file in the data dir then.
    secret = (
        load_session_secret(settings.session_secret, settings.data_dir)
        if settings.portal_enabled
        else secrets.token_urlsafe(32)
    )
    secure = settings.advertised_url.startswith("https://")
    oauth = _gitlab(settings)
    if settings.admins:
        log.warning(
            "admin_by_username",
            usernames=settings.admins,
            todo="GitLab users can change their username: name admins with --admin-id "
            "(the numeric id; the login log line of each admin names it)",
        )
    if oauth is not None and not oauth.allowed_groups:
        log.warning("portal_open_to_any_gitlab_user", gitlab_url=settings.gitlab_url)
    return PortalContext(
        state=state,
        users=state.users,
        cookies=Cookies(secret, settings.session_lifetime, secure),
        oauth=oauth,
        sessions=portal_sessions(state),
        oidc=_oidc(settings),
    )


def build_chat(state: BrokerState, api: ApiRelay) -> Chat | None:
    """The portal's chat (docs/chat.md): its store, and replies written through ``api``,
    the same relay that serves POST /v1/* (limits, ledger, metrics). Off with the portal."""
    if not state.settings.portal_enabled:
        return None
    store = ChatStore(state.settings.chat_path)
    return Chat(store, Replies(store, api, lambda: state.prices))


def create_app(settings: BrokerSettings, state: BrokerState | None = None) -> Quart:
    """The public app: OpenAI API under /v1, the connector relay under /relay/v1, the
    portal under /portal/."""
    if state is None:
        state = build_state(settings)
    app = Quart("remotellm-broker")
    # Long generations and uploads must never be cut by a framework default (60 s).
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None
    # Bodies are bounded per route (API: max_request_body; uploads: per frame and response).
    app.config["MAX_CONTENT_LENGTH"] = None
    app.extensions["remotellm"] = state
    app.register_blueprint(create_api_blueprint(state))
    app.register_blueprint(admin_api_blueprint())
    portal = build_portal(state)
    api = ApiRelay(state)
    portal.chat = build_chat(state, api)
    install_portal(app, portal)
    # /relay/v1/*, POST /v1/* and /api/* are plain ASGI in front of Quart
    # (docs/architecture.md).
    app.asgi_app = BrokerASGI(  # type: ignore[method-assign]
        app.asgi_app, RelayApp(state), api, OllamaApi(state)
    )
    _add_lifecycle(app, state, portal)
    _add_index_and_errors(app, state)
    return app


def _add_lifecycle(app: Quart, state: BrokerState, portal: PortalContext) -> None:
    """Start the state and every background loop before serving; stop them after."""
    loops: list[asyncio.Task[None]] = []

    def spawn(name: str, loop: Coroutine[Any, Any, None]) -> None:
        loops.append(asyncio.create_task(loop, name=name))

    @app.before_serving
    async def start() -> None:
        state.started = time.time()
        await state.relay.start()
        if state.usage is not None:
            await state.usage.start()
        spawn("reload-keys", _reload_keys(state))
        spawn("reload-users", _maintain_users(state.users, state.settings.users_reload_interval))
        if state.models_file is not None:
            spawn("reload-models-file", _reload_models_file(state, state.models_file))
        if state.revocations is not None:
            await state.revocations.sync()  # before the first request: else it answers 503
            spawn("sync-revocations", _sync_revocations(state))
        if portal.chat is not None:
            await asyncio.to_thread(portal.chat.store.open)
            await asyncio.to_thread(portal.chat.store.recover)  # cut off by a restart
            spawn(
                "chat-retention", keep_tidy(portal.chat.store, state.settings.chat_retention_days)
            )

    @app.after_serving
    async def stop() -> None:
        for task in loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(state.users.flush_last_used)
        if portal.chat is not None:
            await portal.chat.replies.close()  # saved as stopped
            portal.chat.store.close()
        if portal.oauth is not None:
            await portal.oauth.http.aclose()
        for oidc in portal.oidc.values():
            await oidc.http.aclose()  # one client for all: closing twice is harmless
        await state.relay.stop()
        if state.usage is not None:
            await state.usage.stop()


def _add_index_and_errors(app: Quart, state: BrokerState) -> None:
    @app.get("/")
    async def index() -> Response:
        """A landing page for people who open the broker's URL in a browser."""
        models = sorted((await state.relay.view()).live_models)
        page = render("index.html.j2", base_url=state.settings.advertised_url, models=models)
        return add_security_headers(Response(page, content_type="text/html; charset=utf-8"))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(
            status, "http_error"
        )
        return error_response(BrokerError(status, exc.description or exc.name, code))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        if not isinstance(exc, BrokerError):  # StateUnavailable: 503, Retry-After
            log.exception("unhandled_error", error_type=type(exc).__name__)
        return error_response(exc)


async def _reload_keys(state: BrokerState) -> None:
    while True:
        await asyncio.sleep(2.0)
        state.keys.reload()
        if state.enrollment is not None and state.enrollment.reload():
            # An operator's edit may have revoked a connector: its sessions end too.
            for identity in state.enrollment.closed_ids():
                await end_sessions(state, identity)


async def _reload_models_file(state: BrokerState, watch: ModelsFileWatch) -> None:
    """Prices and aliases follow the models file's edits (the last good one on a bad edit)."""
    while True:
        await asyncio.sleep(2.0)
        catalog = await asyncio.to_thread(watch.reload)
        if catalog is not None:
            state.prices, state.aliases = catalog.prices, catalog.aliases


async def _maintain_users(users: UsersStore, interval: float) -> None:
    """Reload the users file when it changes; write last-used times in batches."""
    since_flush = 0.0
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(users.reload)
        since_flush += interval
        if since_flush >= FLUSH_EVERY:
            since_flush = 0.0
            await asyncio.to_thread(users.flush_last_used)


async def _sync_revocations(state: BrokerState) -> None:
    board = state.revocations
    assert board is not None
    while True:
        await asyncio.sleep(state.settings.users_reload_interval)
        await board.sync()


def create_health_app(state: BrokerState) -> Quart:
    """Liveness and readiness for load balancers and service managers (health port)."""
    app = Quart("remotellm-broker-health")

    @app.get("/health")
    async def health() -> Response:
        try:
            d = await state.relay.view()
        except StateUnavailable as exc:
            return error_response(exc)
        body = _health_body(state, d)
        return Response(json.dumps(body), content_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            view = await state.relay.view()
        except StateUnavailable as exc:
            return error_response(exc)
        return Response(
            state.metrics.render(view, frozenset(state.aliases.aliases)),
            content_type=CONTENT_TYPE_LATEST,
        )

    @app.get("/ready")
    async def ready() -> Response:
        hub = state.relay
        reachable = await hub.ready()
        ok = state.started > 0 and not hub.draining and reachable
        body: dict[str, object] = {"ready": ok}
        if not reachable:
            body["reason"] = "the shared relay state (Redis) cannot be reached"
        else:
            try:
                body["connectors"] = len((await hub.view()).sessions)
            except StateUnavailable:
                body |= {"ready": False, "reason": "the shared relay state went away"}
                ok = False
        status = 200 if ok else 503
        return Response(json.dumps(body), status=status, content_type="application/json")

    return app


def _health_body(state: BrokerState, d: RelayView) -> dict[str, object]:
    sessions = [
        {
            "name": s.name,
            "identity": s.owner,
            "models": sorted(s.models),
            "capacity": s.capacity,
            "capacity_source": s.capacity_source,
            "active": s.active,
            "upload_mode": s.upload_mode.value,
            "version": s.version,
            "served": s.served,
        }
        for s in d.sessions.values()
    ]
    return {
        "status": "draining" if state.relay.draining else "ok",
        "uptime_s": round(time.time() - state.started, 1) if state.started else 0.0,
        "connectors": sessions,
        "models": sorted(d.live_models),
        "in_flight": d.in_flight,
        "queued": d.queue_depth,
        "redispatched": d.redispatched,
        "waited_for_slots": d.slot_waits,
    }
