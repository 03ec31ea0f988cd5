"""``RelayState`` in Redis: several brokers behind a load balancer share one relay state.

Redis holds the data (sessions, per-model queues, leases, cancels, counters); every change
is one Lua script (``scripts.py``). This process keeps only what is about its own
connections: the API users' requests it holds ("home" requests: their response channels
and deadlines), the uploads it carries, the polls it holds. Wake-ups cross brokers over
pub/sub; one psubscribe per broker, made before any poll checks Redis, so a change that
lands between the check and the wait is never missed (GitLab Workhorse's key watcher).
Response frames cross brokers in the home broker's inbox stream (``inbox.py``); when the
connector's upload lands on the home broker itself they go straight to the channel.

Redis errors enter in one place, ``_run``, and become ``StateUnavailable`` (503 with
``Retry-After``); when Redis goes, the requests this broker holds end with that error, and
redis-py reconnects by itself when it is back. docs/scale-out.md has the key layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from broker.core import (
    LeaseError,
    Pending,
    Registration,
    RelayCore,
    Seen,
    Session,
    SessionReplaced,
    State,
    StateUnavailable,
    Timings,
    TooManySessions,
    UnknownSession,
)
from broker.core.aliases import fold_routes
from broker.core.failures import STATE_UNAVAILABLE, refusal
from broker.core.relay import new_session_id
from broker.core.timers import Deadlines, Kind, Throttle
from broker.state.channel import ResponseChannel
from broker.state.redis import inbox, scripts
from broker.state.redis.home import Drop, Later, Where, judge, queue_verdict
from broker.state.redis.local import Home, LocalState, PollWaiter, apply_meta
from broker.state.redis.records import session_record, session_view
from broker.state.relay import (
    Clock,
    FrameSink,
    RelayView,
    SessionView,
    Superseded,
    Waiting,
    log_slots_busy,
)
from shared.logging import get_logger
from shared.protocol import (
    CancelItem,
    Replaced,
    RequestItem,
    WorkItem,
)

log = get_logger("broker.state.redis")

DRAIN_POLL_HOLD = 1.0
HEARTBEAT_EVERY = 1.0
ALIVE_FOR = 6.0  # a broker silent this long is gone: the uploads it carried fail
SWEEP_LIMIT = 256
INBOX_BLOCK_MS = 1000
UNAVAILABLE = STATE_UNAVAILABLE.message

UpstreamKey = Callable[[str], str | None]


class RedisRelayState:
    def __init__(
        self,
        timings: Timings,
        redis: Redis,
        *,
        prefix: str = "remotellm:",
        upstream_key: UpstreamKey = lambda _: None,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.timings = timings
        self.redis = redis
        self.prefix = prefix
        self.clock = clock
        self.wall = wall
        self.broker_id = "b" + secrets.token_hex(6)
        self._upstream_key = upstream_key
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(scripts.COMMON + body) for name, body in scripts.ALL.items()
        }
        self._local = LocalState()
        self._deadlines = Deadlines()
        self._rearm = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._inbox_down = False  # the inbox reader's last read failed
        self._inbox_last: bytes | str = "0-0"
        self._inbox_reads = 0
        self._slots_noticed = Throttle(timings.slots_notice_every)
        # Models this broker saw served (wall time): if Redis loses its data, they answer
        # 503 (retry) rather than 404 (gone) while their connectors register again.
        self._recent_models: dict[str, float] = {}

    # -- the one place Redis errors enter ------------------------------------------------

    async def _run(self, name: str, *args: object) -> Any:
        try:
            argv: list[Any] = [self.prefix, *args]
            return await self._scripts[name](args=argv)
        except RedisError as exc:
            log.warning(
                "relay_state_error", step=name, error_type=type(exc).__name__, error=str(exc)
            )
            raise StateUnavailable(UNAVAILABLE) from exc

    async def _quietly(self, name: str, *args: object) -> None:
        """For clean-up paths: the state is unreachable anyway, so log and go on."""
        try:
            await self._run(name, *args)
        except StateUnavailable:
            log.warning("relay_state_cleanup_skipped", step=name)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    async def start(self) -> None:
        with contextlib.suppress(RedisError):
            await self._heartbeat()
        spawn = asyncio.get_running_loop().create_task
        self._tasks = [
            spawn(self._guard("relay_state_listener", self._listen)),
            spawn(self._guard("relay_state_inbox", self._read_inbox)),
            spawn(self._guard("relay_state_sweeper", self._sweep_loop)),
            spawn(self._guard("relay_state_timers", self._timer_loop)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with contextlib.suppress(RedisError):
            # A clean stop: nothing of ours is left for the others to sweep.
            await self.redis.zrem(self.prefix + "b", self.broker_id)
            await self.redis.delete(self._inbox(self.broker_id))
        await self.redis.aclose()

    def begin_drain(self) -> None:
        self._draining = True
        for waiters in self._local.waiters.values():
            for waiter in waiters:
                waiter.wake()

    async def wait_idle(self, timeout: float) -> bool:
        deadline = self.clock() + timeout
        while self.local_in_flight():
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def local_in_flight(self) -> int:
        return len(self._local.homes) + len(self._local.uploads)

    async def ready(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except (RedisError, TimeoutError):
            return False
        return not self._inbox_down

    # -- sessions -------------------------------------------------------------------------

    async def register(self, reg: Registration) -> tuple[Session, Replaced]:
        t = self.timings
        sid = new_session_id()
        now = self.wall()
        replaced = await self._run(
            "register",
            sid,
            reg.owner,
            reg.name,
            reg.instance_id,
            json.dumps(sorted(reg.models)),
            reg.capacity,
            reg.capacity_source,
            reg.version,
            reg.upload_mode.value,
            repr(now),
            t.session_ttl,
            t.lease,
            t.max_redispatch,
            t.max_sessions_per_identity,
            reg.engine,
        )
        if replaced == b"too_many":
            raise TooManySessions(t.max_sessions_per_identity)
        return reg.session(sid, now), Replaced(replaced.decode())

    async def session(self, owner: str, session_id: str) -> Session:
        p = self.prefix
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(p + "s:" + session_id)
                pipe.get(p + "rep:" + session_id)
                raw, replaced_by = await pipe.execute()
        except RedisError as exc:
            raise StateUnavailable(UNAVAILABLE) from exc
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if fields.get("owner") == owner:
            return session_record(session_id, fields)
        if replaced_by is not None and replaced_by.decode() == owner:
            raise SessionReplaced(session_id)
        raise UnknownSession(session_id)

    async def update_models(self, owner: str, session_id: str, models: list[str]) -> None:
        done = await self._run(
            "update_models", session_id, owner, json.dumps(sorted(models)), repr(self.wall())
        )
        if not done:
            raise UnknownSession(session_id)

    async def deregister(self, owner: str, session_id: str) -> None:
        t = self.timings
        done = await self._run(
            "deregister", session_id, owner, repr(self.wall()), t.lease, t.max_redispatch
        )
        if not done:
            await self.session(owner, session_id)  # the right 404 (replaced or unknown)

    # -- polls ----------------------------------------------------------------------------

    async def poll(
        self,
        owner: str,
        session_id: str,
        hold: float,
        abort: asyncio.Future[object] | None = None,
    ) -> list[WorkItem]:
        """Hold a long-poll until there is work for the session or ``hold`` passes."""
        token = secrets.token_hex(8)
        t = self.timings
        now = self.wall()
        alive_until = now + hold + t.session_ttl
        models = await self._run(
            "poll_start", session_id, owner, repr(now), repr(alive_until), token
        )
        if not models:
            await self.session(owner, session_id)  # the right 404: replaced or unknown
            raise UnknownSession(session_id)
        waiter = PollWaiter(token, frozenset(json.loads(models)))
        waiters = self._local.waiters.setdefault(session_id, [])
        waiters.append(waiter)
        try:
            deadline = self.clock() + hold
            while True:
                if self._draining:
                    deadline = min(deadline, self.clock() + DRAIN_POLL_HOLD)
                future = waiter.arm()  # before the check: a wake in between is kept
                items = await self._take(owner, session_id)
                if items:
                    return items
                if waiter.superseded:
                    raise Superseded(session_id)
                remaining = deadline - self.clock()
                if remaining <= 0 or waiter.gone:
                    return []
                await _wait(future, abort, remaining)
                if waiter.gone or (abort is not None and abort.done()):
                    return []
                if waiter.superseded:
                    raise Superseded(session_id)
        finally:
            waiters.remove(waiter)
            if not waiters:
                self._local.waiters.pop(session_id, None)
            await self._quietly("poll_end", session_id, repr(self.wall()), t.session_ttl)

    async def _take(self, owner: str, session_id: str) -> list[WorkItem]:
        answer = await self._run(
            "take",
            session_id,
            repr(self.wall()),
            self.timings.lease,
            "1" if self._draining else "0",
        )
        if len(answer) > 2:
            # Redis no longer knows the session (it restarted, or failed over): end the
            # held poll now, so the connector registers again instead of waiting it out.
            await self.session(owner, session_id)  # the right 404: replaced or unknown
            raise UnknownSession(session_id)
        cancels, handed = answer
        items: list[WorkItem] = [CancelItem(request_id=rid.decode()) for rid in cancels]
        if handed:
            key = self._upstream_key(owner)
            for _rid, raw, attempt in handed:
                item = RequestItem.model_validate_json(raw)
                items.append(
                    item.model_copy(update={"attempt": int(attempt), "upstream_api_key": key})
                )
        return items

    # -- requests -------------------------------------------------------------------------

    async def submit(
        self, item: RequestItem, user: str | None = None
    ) -> tuple[Pending, ResponseChannel]:
        if self._draining:
            raise refusal("draining")
        t = self.timings
        mono, now = self.clock(), self.wall()
        rid = item.request_id
        pending = Pending(
            item=item,
            created=mono,
            queue_deadline=mono + t.queue_wait,
            total_deadline=mono + t.total_timeout,
            seq=0,
            user=user,
            last_activity=mono,
        )
        if rid in self._local.homes:
            raise refusal("dup")
        home = Home(pending, ResponseChannel())
        self._local.homes[rid] = home  # before Redis: its frames may come back at once
        try:
            answer = await self._run(
                "submit",
                rid,
                item.model,
                user or "",
                item.model_dump_json(),
                repr(now),
                t.queue_max,
                t.queue_wait,
                t.total_timeout,
                self.broker_id,
                repr(now + ALIVE_FOR),
                t.model_grace,
            )
        except StateUnavailable:
            self._local.homes.pop(rid, None)
            raise
        verdict = answer[0].decode()
        if verdict == "unknown" and self._served_lately(item.model, now):
            verdict = "noconn"  # Redis forgot it (restart, failover): its connectors return
        if verdict not in ("ok", "busy"):
            self._local.homes.pop(rid, None)
            raise refusal(verdict, item.model)
        self._recent_models[item.model] = now
        if verdict == "busy":
            self._slots_busy(item.model, int(answer[1]), answer[2], now)
        for when, kind in (
            (pending.queue_deadline, Kind.QUEUE),
            (mono + t.first_byte_timeout, Kind.FIRST_BYTE),
            (mono + t.idle_timeout, Kind.IDLE),
            (pending.total_deadline, Kind.TOTAL),
        ):
            self._add_deadline(when, kind, rid)
        return pending, home.channel

    def _served_lately(self, model: str, now: float) -> bool:
        seen = self._recent_models.get(model)
        if seen is not None and now - seen <= self.timings.model_grace:
            return True
        self._recent_models.pop(model, None)
        return False

    async def ack(self, session_id: str, request_id: str) -> tuple[Pending, FrameSink]:
        answer = await self._run("ack", session_id, request_id, repr(self.wall()), self.broker_id)
        if answer is None:
            raise LeaseError(request_id)
        home_id, raw, attempt, connector, leased_at = (
            answer[0].decode(),
            answer[1],
            int(answer[2]),
            answer[3].decode(),
            float(answer[4]),
        )
        self._local.uploads.add(request_id)
        self._local.ended.discard(request_id)
        meta = inbox.Meta(connector, attempt, leased_at)
        home = self._local.homes.get(request_id) if home_id == self.broker_id else None
        if home is not None:
            apply_meta(home.pending, meta, self.clock, self.wall)
            RelayCore.mirror_state(home.pending, State.ACTIVE, session_id)
            return home.pending, home.channel
        pending = Pending(
            item=RequestItem.model_validate_json(raw),
            created=self.clock(),
            queue_deadline=0.0,
            total_deadline=0.0,
            seq=0,
            state=State.ACTIVE,
            session_id=session_id,
            connector=connector,
            dispatches=attempt,
        )
        return pending, inbox.RemoteSink(self.redis, self._inbox(home_id), request_id, meta)

    def hand_over(self, request_id: str) -> bool:
        # The next upload may land on another broker: nothing of it stays counted here (a
        # request whose API user is here stays counted by its home entry).
        local = self._local
        local.uploads.discard(request_id)
        local.ended.discard(request_id)
        return True

    async def cancel(self, request_id: str) -> None:
        home = self._local.homes.get(request_id)
        if home is not None:
            RelayCore.mirror_cancel(home.pending)
        if request_id in self._local.uploads:
            self._local.ended.add(request_id)
        await self._quietly("cancel", request_id)

    async def refuse(self, session_id: str, request_id: str) -> None:
        await self._quietly("refuse", session_id, request_id)

    def session_alive(self, session_id: str) -> bool:
        return session_id not in self._local.dropped_sessions

    async def finish(self, request_id: str) -> None:
        local = self._local
        held = local.homes.pop(request_id, None) is not None
        if request_id in local.uploads:
            local.uploads.discard(request_id)
            held = True
        local.ended.discard(request_id)
        # Neither held here: it was finished here already (the upload and the API side
        # both finish), or whoever ended it (a deadline, the sweeper) removed it from Redis.
        if held:
            await self._quietly("finish", request_id)

    def progress(self, pending: Pending, event: Seen, now: float, nbytes: int = 0) -> None:
        # Only this process's record changes: only a leased request is ever redispatched,
        # and a leased one has sent nothing, so the shared state need not know.
        RelayCore.progress(pending, event, now, nbytes)

    def is_cancelled(self, request_id: str) -> bool:
        local = self._local
        return request_id in local.ended or (
            request_id not in local.uploads and request_id not in local.homes
        )

    # -- views ----------------------------------------------------------------------------

    async def view(self) -> RelayView:
        p = self.prefix
        try:
            members: Any = await self.redis.zrange(p + "sx", 0, -1)
            sids = [s.decode() for s in members]
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.hgetall(p + "s:" + sid)
                    pipe.scard(p + "sa:" + sid)
                pipe.hgetall(p + "qlen")
                pipe.scard(p + "reqs")
                pipe.get(p + "redisp")
                pipe.hgetall(p + "slotw")
                pipe.zrangebyscore(p + "kz", self.wall() - self.timings.model_grace, "+inf")
                answers = await pipe.execute()
        except RedisError as exc:
            raise StateUnavailable(UNAVAILABLE) from exc
        sessions: dict[str, SessionView] = {}
        live: dict[str, list[str]] = {}
        for i, sid in enumerate(sids):
            fields = {k.decode(): v.decode() for k, v in answers[2 * i].items()}
            if "owner" not in fields:
                continue
            view = session_view(sid, fields, int(answers[2 * i + 1]), self.wall())
            sessions[sid] = view
            for model in view.models:
                live.setdefault(model, []).append(view.name)
        qlen, reqs, redisp, slotw, known = answers[2 * len(sids) :]
        self._remember_models(live.keys() | {m.decode() for m in known})
        return RelayView(
            sessions=sessions,
            live_models={m: sorted(names) for m, names in live.items()},
            queue_depth=fold_routes({k.decode(): int(v) for k, v in qlen.items() if int(v) > 0}),
            in_flight=int(reqs),
            redispatched=int(redisp or 0),
            slot_waits=fold_routes({k.decode(): int(v) for k, v in slotw.items()}),
            known_models=frozenset(m.decode() for m in known) | live.keys(),
            draining=self._draining,
        )

    def _remember_models(self, models: set[str]) -> None:
        now = self.wall()
        grace = self.timings.model_grace
        for name in [m for m, seen in self._recent_models.items() if now - seen > grace]:
            del self._recent_models[name]  # bounded by the models Redis knew in the grace
        self._recent_models.update(dict.fromkeys(models, now))

    async def waiting(self) -> dict[str, list[Waiting]]:
        """Every queue in serving order (for the admin page: a few round trips per model)."""
        p = self.prefix
        now = self.wall()
        try:
            depth: Any = await self.redis.hgetall(p + "qlen")
            found: dict[str, list[Waiting]] = {}
            for raw_model, n in depth.items():
                if int(n) <= 0:
                    continue
                model = raw_model.decode()
                ring: Any = await self.redis.lrange(p + "qr:" + model, 0, -1)
                users = [u.decode() for u in ring]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for user in users:
                        pipe.lrange(p + "ql:" + model + "\n" + user, 0, -1)
                    lanes: Any = await pipe.execute()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for lane in lanes:
                        for rid in lane:
                            pipe.hget(p + "r:" + rid.decode(), "created")
                    created: Any = await pipe.execute()
                ages = iter(created)
                per_user = [
                    [Waiting(user or None, now - float(next(ages) or now)) for _ in lane]
                    for user, lane in zip(users, lanes, strict=True)
                ]
                # Round-robin between users, FIFO within each: the order TAKE serves them.
                order = [
                    lane[depth_i]
                    for depth_i in range(max((len(x) for x in per_user), default=0))
                    for lane in per_user
                    if depth_i < len(lane)
                ]
                found[model] = order
        except RedisError as exc:
            raise StateUnavailable(UNAVAILABLE) from exc
        return found

    # -- background: wake-ups -------------------------------------------------------------

    async def _listen(self) -> None:
        """One psubscribe for every wake-up; polls re-check after each (re)subscribe."""
        pattern = self.prefix + "w:*"
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(pattern)
                self._local.wake_all()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        name = message["channel"][len(self.prefix) + 2 :].decode()
                        self._local.on_wake(name, message["data"])
            except RedisError as exc:
                log.warning("relay_state_listener_lost", error=str(exc))
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(RedisError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- background: response frames from other brokers -----------------------------------

    def _inbox(self, broker_id: str) -> str:
        return self.prefix + "i:" + broker_id

    async def _read_inbox(self) -> None:
        while True:
            try:
                await self._read_inbox_once(INBOX_BLOCK_MS)
                self._inbox_down = False
            except RedisError as exc:
                if not self._inbox_down or self._local.homes:
                    log.warning("relay_state_unreachable", error=str(exc))
                self._inbox_down = True
                self._local.fail_homes(STATE_UNAVAILABLE)
                await asyncio.sleep(0.25)

    async def _read_inbox_once(self, block_ms: int | None) -> None:
        """Apply the inbox entries that arrived (waiting up to ``block_ms`` for one)."""
        key = self._inbox(self.broker_id)
        answer: Any = await self.redis.xread({key: self._inbox_last}, count=512, block=block_ms)
        for _stream, entries in answer:
            for entry_id, fields in entries:
                self._inbox_last = entry_id
                requeued = self._local.apply(fields, self.clock, self.wall)
                if requeued is not None:
                    self._add_deadline(requeued, Kind.QUEUE, fields[b"r"].decode())
        self._inbox_reads += 1
        if answer and self._inbox_reads % 64 == 0:
            with contextlib.suppress(RedisError):
                await self.redis.xtrim(key, minid=self._inbox_last)
                await self.redis.expire(key, 3600)

    # -- background: sweeper and heartbeat ------------------------------------------------

    async def _heartbeat(self) -> None:
        """Say this broker is alive, and learn the models served within the grace: a broker
        that has not yet relayed or shown one (just started) must still answer 503, not
        404, for it if Redis then loses its data (``_served_lately``)."""
        p, now = self.prefix, self.wall()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(p + "b", {self.broker_id: now + ALIVE_FOR})
            pipe.zrangebyscore(p + "kz", now - self.timings.model_grace, "+inf")
            _, known = await pipe.execute()
        self._remember_models({m.decode() for m in known})

    async def _sweep_loop(self) -> None:
        """Every broker sweeps; the script makes each due entry count once (scripts.py)."""
        beat_at = 0.0
        while True:
            pause = HEARTBEAT_EVERY
            try:
                if self.clock() >= beat_at:
                    await self._heartbeat()
                    beat_at = self.clock() + HEARTBEAT_EVERY
                now = self.wall()
                due = await self._sweep(now)
                if due >= 0:
                    pause = min(pause, max(0.02, due - now))
            except (RedisError, StateUnavailable):
                pass  # the inbox reader reports it; try again in a moment
            await asyncio.sleep(pause)

    async def _sweep(self, now: float) -> float:
        """One sweep of the shared state at ``now``; when the next entry is due (-1: none)."""
        t = self.timings
        _, nxt = await self._run(
            "sweep", repr(now), t.lease, t.max_redispatch, SWEEP_LIMIT, t.model_grace
        )
        return float(nxt)

    async def run_due(self) -> None:
        """Do at once what the background tasks do over time: heartbeat, sweep, read the
        inbox, act on this broker's due deadlines (for tests that drive a fake clock)."""
        await self._heartbeat()
        await self._sweep(self.wall())
        await self._read_inbox_once(None)
        await self._expire_due()

    # -- background: the deadlines of this broker's requests ------------------------------

    def _add_deadline(self, when: float, kind: Kind, rid: str) -> None:
        nearest = self._deadlines.next()
        self._deadlines.add(when, kind, rid)
        if nearest is None or when < nearest:
            self._rearm.set()

    async def _timer_loop(self) -> None:
        while True:
            nearest = self._deadlines.next()
            timeout = None if nearest is None else max(0.0, nearest - self.clock())
            self._rearm.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rearm.wait(), timeout)
            await self._expire_due()

    async def _expire_due(self) -> None:
        for _when, kind, rid in list(self._deadlines.due(self.clock())):
            if rid in self._local.homes:
                try:
                    await self._due(kind, rid)
                except (RedisError, StateUnavailable):
                    self._add_deadline(self.clock() + 1.0, kind, rid)
        self._deadlines.sweep(len(self._local.homes), self._still_home)

    def _still_home(self, _when: float, _kind: Kind, rid: str) -> bool:
        return rid in self._local.homes

    async def _due(self, kind: Kind, rid: str) -> None:
        home = self._local.homes[rid]
        pending = home.pending
        now = self.clock()
        if kind is Kind.QUEUE:
            answer = await self._run("expire_queued", rid, repr(self.wall()))
            verdict = queue_verdict([a.decode() for a in answer], self.wall())
        else:
            found: Any = await self.redis.hmget(self.prefix + "r:" + rid, ["state", "lat"])
            state, leased_at = found
            where = Where(
                state.decode() if state is not None else None,
                self.wall() - float(leased_at) if leased_at is not None else 0.0,
            )
            quiet = now - pending.last_activity
            verdict = judge(kind, where, pending.head_seen, quiet, self.timings)
        if isinstance(verdict, Drop):
            return
        if isinstance(verdict, Later):
            self._add_deadline(now + verdict.delay, kind, rid)
            return
        if kind is not Kind.QUEUE:
            await self._run("finish", rid)
        if self._local.homes.pop(rid, None) is not None:
            home.channel.fail(verdict)

    def _slots_busy(self, model: str, waiting: int, caps: list[bytes], now: float) -> None:
        if not self._slots_noticed.allow(model, now):
            return
        capacities = {caps[i].decode(): int(caps[i + 1]) for i in range(0, len(caps), 2)}
        log_slots_busy(model, capacities, waiting)

    async def _guard(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A background loop that logs and restarts instead of dying silently."""
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay_state_task_failed", task=name)
                await asyncio.sleep(1.0)


async def _wait(
    future: asyncio.Future[None], abort: asyncio.Future[object] | None, timeout: float
) -> None:
    waits: list[asyncio.Future[Any]] = [future] if abort is None else [future, abort]
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
