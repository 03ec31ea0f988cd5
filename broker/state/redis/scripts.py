"""The Lua scripts that change the shared relay state, each one atomic in Redis.

Every change that touches more than one key runs as one script, so no broker ever sees a
request half-moved (dequeued but not leased, leased but not in its session's set). Time is
an argument (``now``, wall-clock seconds), never Redis ``TIME``: the tests pass it, and the
brokers' clocks only need to agree to within a lease. The key layout is documented in
docs/scale-out.md; ``ARGV[1]`` is always the key prefix.

The sweeper (``SWEEP``) is safe to run on every broker at once: each due entry is removed
from its sorted set by the same script that acts on it, and scripts run one at a time, so
an expired lease is redispatched exactly once however many brokers sweep.
"""

from __future__ import annotations

import json

from broker.core import Failure, failures
from broker.core.relay import MAX_REFUSALS


def lua_string(text: str) -> str:
    """``text`` as a Lua string literal (ASCII only: JSON's escapes are Lua's too)."""
    if not text.isascii():
        raise ValueError(f"not ASCII: {text!r}")
    return json.dumps(text)


def lua_failure(failure: Failure) -> str:
    """A Lua function of ``reason`` returning the failure's {status, code, message}."""
    head, _, tail = failure.message.partition("{reason}")
    message = lua_string(head)
    if _:
        message += " .. reason .. " + lua_string(tail)
    return (
        f"function(reason) return {{status = {failure.status}, "
        f"code = {lua_string(failure.code)}, message = {message}}} end"
    )


def rules() -> str:
    """The relay's rules as Lua: the failure table, the drop reasons, the refusal cap."""
    lines = ["local F = {}"]
    lines += [f"F.{name} = {lua_failure(f)}" for name, f in failures.FAILURES.items()]
    lines.append("local REASON = {}")
    lines += [f"REASON.{k} = {lua_string(v)}" for k, v in failures.DROP_REASONS.items()]
    lines.append(f"local MAX_REFUSALS = {MAX_REFUSALS}")
    return "\n".join(lines) + "\n"


# Helpers shared by every script (Lua has no includes: they are prepended).
_COMMON = r"""
local P = ARGV[1]
local MAXLEN = 100000

local function lane_key(model, user) return P .. 'ql:' .. model .. '\n' .. user end

local function req(rid)
  local v = redis.call('HMGET', P .. 'r:' .. rid,
    'model', 'user', 'state', 'sid', 'home', 'disp', 'via', 'qdl', 'seq', 'conn', 'lat')
  if not v[1] then return nil end
  return {model = v[1], user = v[2], state = v[3], sid = v[4] or '', home = v[5] or '',
          disp = tonumber(v[6]) or 0, via = v[7] or '', qdl = tonumber(v[8]) or 0,
          seq = tonumber(v[9]) or 0, conn = v[10] or '', lat = v[11] or '0'}
end

local function dequeue(rid, r)
  local lk = lane_key(r.model, r.user)
  if redis.call('LREM', lk, 1, rid) > 0 then
    redis.call('HINCRBY', P .. 'qlen', r.model, -1)
    if redis.call('LLEN', lk) == 0 then redis.call('LREM', P .. 'qr:' .. r.model, 0, r.user) end
  end
end

-- Remove a request from everything; its upload (wherever it runs) learns it ended.
local function forget(rid, r)
  if r.state == 'q' then dequeue(rid, r) end
  if r.sid ~= '' and redis.call('SREM', P .. 'sa:' .. r.sid, rid) > 0 then
    redis.call('PUBLISH', P .. 'w:s:' .. r.sid, '')
  end
  if r.via ~= '' then redis.call('SREM', P .. 'bu:' .. r.via, rid) end
  redis.call('ZREM', P .. 'lx', rid)
  redis.call('DEL', P .. 'r:' .. rid)
  redis.call('SREM', P .. 'reqs', rid)
  redis.call('PUBLISH', P .. 'w:e', rid)
end

local function to_home(rid, r, kind, value)
  if r.home ~= '' then
    redis.call('XADD', P .. 'i:' .. r.home, 'MAXLEN', '~', MAXLEN, '*', 'r', rid, kind, value)
  end
end

-- ``failure``: an entry of F (the table rendered from broker.core.failures).
local function fail(rid, r, failure, reason)
  to_home(rid, r, '0f', cjson.encode(failure(reason or '')))
  forget(rid, r)
end

-- A leased request goes back to the front of its user's line, and that user is next.
local function requeue(rid, r, now, lease, maxr)
  if r.disp > maxr then
    fail(rid, r, F.unanswered)
    return
  end
  if r.sid ~= '' then redis.call('SREM', P .. 'sa:' .. r.sid, rid) end
  redis.call('ZREM', P .. 'lx', rid)
  local qdl = math.max(r.qdl, now + lease)
  redis.call('HSET', P .. 'r:' .. rid, 'state', 'q', 'sid', '', 'qdl', tostring(qdl))
  redis.call('LPUSH', lane_key(r.model, r.user), rid)
  local ring = P .. 'qr:' .. r.model
  redis.call('LREM', ring, 0, r.user)
  redis.call('LPUSH', ring, r.user)
  redis.call('HINCRBY', P .. 'qlen', r.model, 1)
  redis.call('INCR', P .. 'redisp')
  to_home(rid, r, '0q', tostring(qdl))
  redis.call('PUBLISH', P .. 'w:m:' .. r.model, '')
end

-- Known models: a sorted set, score +inf while a session serves the model, else the time
-- the last one stopped (SUBMIT answers 503 within the grace, SWEEP forgets it after).
local function serve_models(sid, models)
  for _, m in ipairs(models) do
    redis.call('SADD', P .. 'm:' .. m, sid)
    redis.call('ZADD', P .. 'kz', 'inf', m)
  end
end

local function unserve_models(sid, sk, now)
  for _, m in ipairs(cjson.decode(redis.call('HGET', sk, 'models'))) do
    redis.call('SREM', P .. 'm:' .. m, sid)
    if redis.call('SCARD', P .. 'm:' .. m) == 0 then redis.call('ZADD', P .. 'kz', now, m) end
  end
end

local function drop_session(sid, reason, now, lease, maxr)
  local sk = P .. 's:' .. sid
  local owner = redis.call('HGET', sk, 'owner')
  redis.call('ZREM', P .. 'sx', sid)
  if not owner then return 0 end
  local name = redis.call('HGET', sk, 'name')
  unserve_models(sid, sk, now)
  redis.call('SREM', P .. 'o:' .. owner, sid)
  local nk = owner .. '\n' .. name
  if redis.call('HGET', P .. 'names', nk) == sid then redis.call('HDEL', P .. 'names', nk) end
  for _, rid in ipairs(redis.call('SMEMBERS', P .. 'sa:' .. sid)) do
    local r = req(rid)
    if r then
      if r.state == 'l' then
        requeue(rid, r, now, lease, maxr)
      else
        fail(rid, r, F.connector_gone, reason)
      end
    end
  end
  redis.call('DEL', sk, P .. 'sa:' .. sid, P .. 'sc:' .. sid)
  redis.call('PUBLISH', P .. 'w:s:' .. sid, 'x')
  return 1
end
"""

# ARGV: P, sid, owner, name, instance, models (JSON), capacity, capacity source, version,
# upload mode, now, ttl, lease, max redispatch, max sessions per identity, engine.
# Returns the Replaced value, or 'too_many' (the identity holds its cap of sessions).
REGISTER = r"""
local sid, owner, name, instance = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local models = ARGV[6]
local now, ttl = tonumber(ARGV[11]), tonumber(ARGV[12])
local lease, maxr = tonumber(ARGV[13]), tonumber(ARGV[14])
local replaced = 'none'
local nk = owner .. '\n' .. name
local old = redis.call('HGET', P .. 'names', nk)
if old and redis.call('EXISTS', P .. 's:' .. old) == 0 then old = nil end
if not old and redis.call('SCARD', P .. 'o:' .. owner) >= tonumber(ARGV[15]) then
  return 'too_many'
end
if old then
  local polling = tonumber(redis.call('HGET', P .. 's:' .. old, 'polling')) or 0
  local inst = redis.call('HGET', P .. 's:' .. old, 'instance')
  if polling > 0 and inst ~= instance then replaced = 'live' else replaced = 'restart' end
  drop_session(old, REASON.registered_again, now, lease, maxr)
  redis.call('SET', P .. 'rep:' .. old, owner, 'EX', 3600)
end
redis.call('HSET', P .. 's:' .. sid, 'owner', owner, 'name', name, 'instance', instance,
  'models', models, 'capacity', ARGV[7], 'csrc', ARGV[8], 'version', ARGV[9], 'mode', ARGV[10],
  'created', ARGV[11], 'last_seen', ARGV[11], 'polling', 0, 'served', 0, 'eng', ARGV[16])
redis.call('ZADD', P .. 'sx', now + ttl, sid)
redis.call('HSET', P .. 'names', nk, sid)
redis.call('SADD', P .. 'o:' .. owner, sid)
serve_models(sid, cjson.decode(models))
for _, m in ipairs(cjson.decode(models)) do redis.call('PUBLISH', P .. 'w:m:' .. m, '') end
return replaced
"""

# ARGV: P, sid, owner, models (JSON), now.  Returns 1, or 0 for someone else's/no session.
UPDATE_MODELS = r"""
local sid, owner = ARGV[2], ARGV[3]
local sk = P .. 's:' .. sid
if redis.call('HGET', sk, 'owner') ~= owner then return 0 end
unserve_models(sid, sk, tonumber(ARGV[5]))
redis.call('HSET', sk, 'models', ARGV[4], 'last_seen', ARGV[5])
serve_models(sid, cjson.decode(ARGV[4]))
redis.call('PUBLISH', P .. 'w:s:' .. sid, 'u:' .. ARGV[4])
return 1
"""

# ARGV: P, sid, owner, now, lease, max redispatch.
DEREGISTER = r"""
local sid, owner = ARGV[2], ARGV[3]
if redis.call('HGET', P .. 's:' .. sid, 'owner') ~= owner then return 0 end
return drop_session(sid, REASON.stopped, tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]))
"""

# ARGV: P, sid, owner, now, alive until, poll token.  A newer poll supersedes older ones.
# Returns the session's models (JSON), or 0 for someone else's or no session.
POLL_START = r"""
local sid, owner = ARGV[2], ARGV[3]
local sk = P .. 's:' .. sid
if redis.call('HGET', sk, 'owner') ~= owner then return 0 end
redis.call('HINCRBY', sk, 'polling', 1)
redis.call('HSET', sk, 'last_seen', ARGV[4])
redis.call('ZADD', P .. 'sx', tonumber(ARGV[5]), sid)
redis.call('PUBLISH', P .. 'w:s:' .. sid, 'p:' .. ARGV[6])
return redis.call('HGET', sk, 'models')
"""

# ARGV: P, sid, now, ttl.  The TTL runs from the end of the last poll.
POLL_END = r"""
local sk = P .. 's:' .. ARGV[2]
if redis.call('EXISTS', sk) == 0 then return 0 end
local n = redis.call('HINCRBY', sk, 'polling', -1)
if n < 0 then redis.call('HSET', sk, 'polling', 0) end
redis.call('HSET', sk, 'last_seen', ARGV[3])
if n <= 0 then redis.call('ZADD', P .. 'sx', tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[2]) end
return 1
"""

# ARGV: P, sid, now, lease, draining ('1'/'0').  Returns {cancels, {{rid, item, attempt}}}:
# every pending cancel, then up to the free capacity, the oldest head across the session's
# models, each model's queue FIFO per user and round-robin between users.
TAKE = r"""
local sid, now, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local sk = P .. 's:' .. sid
if redis.call('EXISTS', sk) == 0 then return {{}, {}, 1} end  -- gone: end the poll
redis.call('HSET', sk, 'last_seen', ARGV[3])
local cx = redis.call('LRANGE', P .. 'sc:' .. sid, 0, -1)
redis.call('DEL', P .. 'sc:' .. sid)
local out = {}
if ARGV[5] == '1' then return {cx, out} end
local free = tonumber(redis.call('HGET', sk, 'capacity')) - redis.call('SCARD', P .. 'sa:' .. sid)
if free <= 0 then return {cx, out} end
local models = cjson.decode(redis.call('HGET', sk, 'models'))
local name = redis.call('HGET', sk, 'name')
local alive = {}
while free > 0 do
  local best, bestseq, bestmodel, bestuser = nil, nil, nil, nil
  for _, m in ipairs(models) do
    local u = redis.call('LINDEX', P .. 'qr:' .. m, 0)
    if u then
      local rid = redis.call('LINDEX', lane_key(m, u), 0)
      if rid then
        local seq = tonumber(redis.call('HGET', P .. 'r:' .. rid, 'seq')) or 0
        if best == nil or seq < bestseq then best, bestseq, bestmodel, bestuser = rid, seq, m, u end
      else
        redis.call('LREM', P .. 'qr:' .. m, 0, u)
      end
    end
  end
  if best == nil then break end
  local lk = lane_key(bestmodel, bestuser)
  local ring = P .. 'qr:' .. bestmodel
  redis.call('LPOP', lk)
  if redis.call('LLEN', lk) == 0 then
    redis.call('LREM', ring, 0, bestuser)
  else
    redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  end
  redis.call('HINCRBY', P .. 'qlen', bestmodel, -1)
  local r = req(best)
  if r then
    local up = alive[r.home]
    if up == nil then
      up = tonumber(redis.call('ZSCORE', P .. 'b', r.home)) or 0
      alive[r.home] = up
    end
    if up < now then
      r.state = 'gone'  -- dequeued above; its API user's broker is gone: nobody would read it
      forget(best, r)
    else
      local rk = P .. 'r:' .. best
      local disp = redis.call('HINCRBY', rk, 'disp', 1)
      redis.call('HSET', rk, 'state', 'l', 'sid', sid, 'conn', name, 'lat', ARGV[3])
      redis.call('ZADD', P .. 'lx', now + lease, best)
      redis.call('SADD', P .. 'sa:' .. sid, best)
      redis.call('HINCRBY', sk, 'served', 1)
      out[#out + 1] = {best, redis.call('HGET', rk, 'item'), disp}
      free = free - 1
    end
  end
end
return {cx, out}
"""

# ARGV: P, rid, model, user, item, now, queue max, queue wait, total timeout, home broker,
# home alive until, model grace.
# Returns {'ok'} | {'busy', waiting, {name, capacity, ...}} | {'unknown'} | {'noconn'} |
# {'full'} | {'dup'} (that request ID is in flight).
SUBMIT = r"""
local rid, model, user = ARGV[2], ARGV[3], ARGV[4]
local now = tonumber(ARGV[6])
if redis.call('SCARD', P .. 'm:' .. model) == 0 then
  local stopped = tonumber(redis.call('ZSCORE', P .. 'kz', model))
  if stopped and stopped + tonumber(ARGV[12]) > now then return {'noconn'} end
  return {'unknown'}
end
local qlen = tonumber(redis.call('HGET', P .. 'qlen', model)) or 0
if qlen >= tonumber(ARGV[7]) then return {'full'} end
if redis.call('EXISTS', P .. 'r:' .. rid) == 1 then return {'dup'} end
local seq = redis.call('INCR', P .. 'seq')
local rk = P .. 'r:' .. rid
redis.call('HSET', rk, 'item', ARGV[5], 'model', model, 'user', user, 'state', 'q',
  'home', ARGV[10], 'seq', seq, 'qdl', tostring(now + tonumber(ARGV[8])), 'disp', 0,
  'created', ARGV[6])
-- Only a safety net: every request ends through FINISH or the sweeper well before this.
redis.call('EXPIRE', rk, math.ceil(tonumber(ARGV[9]) + 300))
redis.call('SADD', P .. 'reqs', rid)
-- The home broker is alive now (its heartbeat may not be back yet after a Redis restart).
redis.call('ZADD', P .. 'b', 'GT', tonumber(ARGV[11]), ARGV[10])
if redis.call('RPUSH', lane_key(model, user), rid) == 1 then
  redis.call('RPUSH', P .. 'qr:' .. model, user)
end
redis.call('HINCRBY', P .. 'qlen', model, 1)
redis.call('PUBLISH', P .. 'w:m:' .. model, '')
local caps, free = {}, false
for _, s in ipairs(redis.call('SMEMBERS', P .. 'm:' .. model)) do
  local v = redis.call('HMGET', P .. 's:' .. s, 'capacity', 'name')
  local cap = tonumber(v[1]) or 0
  if cap - redis.call('SCARD', P .. 'sa:' .. s) > 0 then free = true end
  caps[#caps + 1] = v[2] or s
  caps[#caps + 1] = cap
end
if free then return {'ok'} end
redis.call('HINCRBY', P .. 'slotw', model, 1)
return {'busy', qlen + 1, caps}
"""

# ARGV: P, sid, rid, now, via broker.  Returns nil (not leased to this session) or
# {home, item, attempt, connector name, leased at}.
ACK = r"""
local sid, rid = ARGV[2], ARGV[3]
local r = req(rid)
if not r or r.sid ~= sid or (r.state ~= 'l' and r.state ~= 'a') then return false end
local rk = P .. 'r:' .. rid
if redis.call('HGET', rk, 'cx') == '1' then return false end
if r.state == 'l' then
  redis.call('HSET', rk, 'state', 'a', 'via', ARGV[5])
  redis.call('ZREM', P .. 'lx', rid)
  redis.call('SADD', P .. 'bu:' .. ARGV[5], rid)
else
  -- Acknowledged again by another broker: its upload moved there (a rotation hand-over).
  -- The new carrier is the one whose death fails the request, not the old one.
  local via = redis.call('HGET', rk, 'via')
  if via and via ~= ARGV[5] then
    redis.call('SREM', P .. 'bu:' .. via, rid)
    redis.call('HSET', rk, 'via', ARGV[5])
    redis.call('SADD', P .. 'bu:' .. ARGV[5], rid)
  end
end
return {r.home, redis.call('HGET', rk, 'item'), r.disp, r.conn, r.lat}
"""

# ARGV: P, rid.  The API user went away: stop the work wherever it is.
CANCEL = r"""
local rid = ARGV[2]
local r = req(rid)
if not r then return 0 end
redis.call('HSET', P .. 'r:' .. rid, 'cx', '1')
if r.state == 'q' then forget(rid, r) return 1 end
if r.sid ~= '' then
  redis.call('RPUSH', P .. 'sc:' .. r.sid, rid)
  redis.call('PUBLISH', P .. 'w:s:' .. r.sid, '')
end
if r.state == 'l' then forget(rid, r) else redis.call('PUBLISH', P .. 'w:e', rid) end
return 1
"""

# ARGV: P, sid, rid.  Frames came for a request the session no longer holds: its next poll
# carries a cancel for it (once).
REFUSE = r"""
local sid, rid = ARGV[2], ARGV[3]
if redis.call('EXISTS', P .. 's:' .. sid) == 0 then return 0 end
-- Bounded (as the in-memory core's MAX_REFUSALS): made-up request IDs earn no more.
if redis.call('LLEN', P .. 'sc:' .. sid) >= MAX_REFUSALS then return 0 end
if redis.call('LPOS', P .. 'sc:' .. sid, rid) then return 0 end
redis.call('RPUSH', P .. 'sc:' .. sid, rid)
redis.call('PUBLISH', P .. 'w:s:' .. sid, '')
return 1
"""

# ARGV: P, rid.  The request is over (answered, failed or cancelled): free its slot.
FINISH = r"""
local r = req(ARGV[2])
if not r then return 0 end
forget(ARGV[2], r)
return 1
"""

# ARGV: P, rid, now.  The home broker's queue-wait check: fails the request only if it is
# still queued and its (possibly moved) queue deadline passed.  Returns {'failed'},
# {'gone'}, {state} or {'q', queue deadline}.
EXPIRE_QUEUED = r"""
local r = req(ARGV[2])
if not r then return {'gone'} end
if r.state ~= 'q' then return {r.state} end
if r.qdl <= tonumber(ARGV[3]) then
  forget(ARGV[2], r)
  return {'failed'}
end
return {'q', tostring(r.qdl)}
"""

# ARGV: P, now, lease, max redispatch, limit, model grace.
# Returns {handled, next due or -1}.
SWEEP = r"""
local now, lease, maxr = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, grace = tonumber(ARGV[5]), tonumber(ARGV[6])
local n = 0
-- Models no session served for the grace: forget them and what is keyed by them.
local forget = redis.call('ZRANGEBYSCORE', P .. 'kz', '-inf', now - grace, 'LIMIT', 0, limit)
for _, m in ipairs(forget) do
  redis.call('ZREM', P .. 'kz', m)
  redis.call('HDEL', P .. 'slotw', m)
  if (tonumber(redis.call('HGET', P .. 'qlen', m)) or 0) <= 0 then
    redis.call('HDEL', P .. 'qlen', m)
  end
end
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'lx', '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', P .. 'lx', rid)
  local r = req(rid)
  if r and r.state == 'l' then
    if r.sid ~= '' then
      redis.call('SREM', P .. 'sa:' .. r.sid, rid)
      redis.call('RPUSH', P .. 'sc:' .. r.sid, rid)
      redis.call('PUBLISH', P .. 'w:s:' .. r.sid, '')
    end
    requeue(rid, r, now, lease, maxr)
    n = n + 1
  end
end
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'sx', '-inf', now, 'LIMIT', 0, limit)) do
  n = n + drop_session(sid, REASON.expired, now, lease, maxr)
end
for _, b in ipairs(redis.call('ZRANGEBYSCORE', P .. 'b', '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', P .. 'b', b)
  for _, rid in ipairs(redis.call('SMEMBERS', P .. 'bu:' .. b)) do
    local r = req(rid)
    if r and r.state == 'a' and r.via == b then
      fail(rid, r, F.upload_broker_gone)
      n = n + 1
    end
  end
  redis.call('DEL', P .. 'bu:' .. b, P .. 'i:' .. b)
end
local nxt = -1
for _, z in ipairs({'lx', 'sx', 'b'}) do
  local e = redis.call('ZRANGE', P .. z, 0, 0, 'WITHSCORES')
  if e[2] then
    local v = tonumber(e[2])
    if nxt < 0 or v < nxt then nxt = v end
  end
end
return {n, tostring(nxt)}
"""

COMMON = rules() + _COMMON

ALL = {
    "register": REGISTER,
    "update_models": UPDATE_MODELS,
    "deregister": DEREGISTER,
    "poll_start": POLL_START,
    "poll_end": POLL_END,
    "take": TAKE,
    "submit": SUBMIT,
    "ack": ACK,
    "cancel": CANCEL,
    "refuse": REFUSE,
    "finish": FINISH,
    "expire_queued": EXPIRE_QUEUED,
    "sweep": SWEEP,
}
