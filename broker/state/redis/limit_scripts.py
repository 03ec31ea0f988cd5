"""The limit counters of ``broker.core.limits`` as two atomic Lua scripts.

The same arithmetic as ``LimitBook`` (tests/unit/broker/state/redis/test_limits.py replays random
sequences through both and compares every answer): per-minute meters that drain at
``limit / 60`` per second, in-flight counts, and daily and monthly quotas. Calendar periods
are computed by the caller from ``now`` and passed in; Lua only compares them. Numbers
that are not integers go back as strings (Redis truncates a Lua number to an integer).

One hash per subject, ``P lim:<subject>``: ``rl``/``ra`` request meter level and time,
``tl``/``ta`` token meter, ``inf`` in flight, ``dp``/``du``/``dh`` and ``mp``/``mu``/``mh``
day and month period, used, held; ``refusals``, ``lr`` (last refused), ``lreason``; and
the subject's current limits (``rpm``, ``tpm``, ``conc``, ``daily``, ``monthly``; -1 is
unlimited). ``P lims`` is the set of subjects; ``P res:<id>`` holds an open reservation's
holds (what settling releases) and ``P resz`` orders open reservations by their lease's end:
a broker killed with requests in flight never settles them, so each reserve first releases
up to ``RECLAIM`` reservations whose lease ended (``settle`` with no tokens used), and a
crashed broker's requests stop counting against their users' limits.
"""

from __future__ import annotations

COMMON = r"""
local P = ARGV[1]
local EPS = 1e-3
local MINUTE = 60.0

local function num(v) return tonumber(v) or 0 end
local function f(x) return string.format('%.17g', x) end

local function current(level, at, limit, now)
  return math.max(0, level - math.max(0, now - at) * limit / MINUTE)
end

local function amount(demand, limit)
  if limit < 0 then return 0 end
  return math.min(demand, limit)
end

local function load(subject)
  local k = P .. 'lim:' .. subject
  local v = redis.call('HMGET', k,
    'rl', 'ra', 'tl', 'ta', 'inf', 'dp', 'du', 'dh', 'mp', 'mu', 'mh')
  return {k = k, rl = num(v[1]), ra = num(v[2]), tl = num(v[3]), ta = num(v[4]), inf = num(v[5]),
          dp = tonumber(v[6]) or -1, du = num(v[7]), dh = num(v[8]),
          mp = tonumber(v[9]) or -1, mu = num(v[10]), mh = num(v[11])}
end

local function roll(c, dayp, monthp)
  if c.dp ~= dayp then c.dp, c.du, c.dh = dayp, 0, 0 end
  if c.mp ~= monthp then c.mp, c.mu, c.mh = monthp, 0, 0 end
end

local function save(c)
  redis.call('HSET', c.k, 'rl', f(c.rl), 'ra', f(c.ra), 'tl', f(c.tl),
    'ta', f(c.ta), 'inf', c.inf, 'dp', c.dp, 'du', c.du, 'dh', c.dh,
    'mp', c.mp, 'mu', c.mu, 'mh', c.mh)
end

local function remaining(level, at, limit, now)
  local l = current(level, at, limit, now)
  return math.max(0, math.floor(limit - l + EPS)), l * MINUTE / limit
end

-- Give back one reservation's holds: h is the settle layout from index b0 (8 per hold).
local function release(h, b0, n, actual, now, dayp, monthp)
  for i = 0, n - 1 do
    local b = b0 + i * 8
    local c = load(h[b])
    if redis.call('EXISTS', c.k) == 1 then
      c.inf = math.max(0, c.inf - 1)
      local tpm = tonumber(h[b + 1])
      if tpm >= 0 then
        c.tl = math.max(0, current(c.tl, c.ta, tpm, now) + actual - tonumber(h[b + 3]))
        c.ta = math.max(c.ta, now)
      end
      if h[b + 2] == '1' then
        roll(c, dayp, monthp)
        if tonumber(h[b + 5]) == c.dp then c.dh = math.max(0, c.dh - tonumber(h[b + 4])) end
        c.du = c.du + actual
        if tonumber(h[b + 7]) == c.mp then c.mh = math.max(0, c.mh - tonumber(h[b + 6])) end
        c.mu = c.mu + actual
      end
      save(c)
    end
  end
end

-- Release up to `most` reservations whose lease ended before `now` (their broker died).
local function reclaim(now, dayp, monthp, most)
  local gone = redis.call('ZRANGEBYSCORE', P .. 'resz', '-inf', f(now), 'LIMIT', 0, most)
  for _, rid in ipairs(gone) do
    redis.call('ZREM', P .. 'resz', rid)
    local rec = redis.call('GET', P .. 'res:' .. rid)
    if rec then
      redis.call('DEL', P .. 'res:' .. rid)
      local h = {}
      for part in string.gmatch(rec, '[^\n]+') do h[#h + 1] = part end
      release(h, 1, #h / 8, 0, now, dayp, monthp)
    end
  end
  return #gone
end

-- The x-ratelimit values: per dimension, the subject with the least remaining.
local function info(cs, now)
  local rq, tk = nil, nil
  for _, c in ipairs(cs) do
    if c.rpm >= 0 then
      local rem, reset = remaining(c.rl, c.ra, c.rpm, now)
      if rq == nil or rem < rq[2] then rq = {c.rpm, rem, reset} end
    end
    if c.tpm >= 0 then
      local rem, reset = remaining(c.tl, c.ta, c.tpm, now)
      if tk == nil or rem < tk[2] then tk = {c.tpm, rem, reset} end
    end
  end
  local out = {}
  local dims = {rq, tk}
  for i = 1, 2 do  -- not ipairs: it stops at the first nil
    local d = dims[i]
    if d then
      out[#out + 1] = tostring(d[1]); out[#out + 1] = tostring(d[2]); out[#out + 1] = f(d[3])
    else
      out[#out + 1] = ''; out[#out + 1] = ''; out[#out + 1] = ''
    end
  end
  return out
end
"""

# ARGV: P, reservation id, now, demand, day period, month period, day end, month end,
# subjects, then per subject: name, rpm, tpm, concurrency, daily, monthly (-1: unlimited),
# then the lease in seconds and how many ended leases to reclaim first.
# Returns {'ok', info x6, per subject: tokens, day hold, day period, month hold, month
# period} or {'no', reason, subject, limit, used, requested, retry after, info x6}.
RESERVE = r"""
local rid, now, demand = ARGV[2], tonumber(ARGV[3]), math.max(0, tonumber(ARGV[4]))
local dayp, monthp = tonumber(ARGV[5]), tonumber(ARGV[6])
local dayend, monthend = tonumber(ARGV[7]), tonumber(ARGV[8])
local n = tonumber(ARGV[9])
local lease, most = tonumber(ARGV[10 + n * 6]), tonumber(ARGV[11 + n * 6])
reclaim(now, dayp, monthp, most)
local cs = {}
for i = 0, n - 1 do
  local b = 10 + i * 6
  local c = load(ARGV[b])
  c.name = ARGV[b]
  c.rpm, c.tpm, c.conc = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  c.daily, c.monthly = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  c.quota = c.daily >= 0 or c.monthly >= 0
  if c.quota then roll(c, dayp, monthp) end
  redis.call('SADD', P .. 'lims', c.name)
  redis.call('HSET', c.k, 'rpm', c.rpm, 'tpm', c.tpm, 'conc', c.conc, 'daily', c.daily,
    'monthly', c.monthly)
  cs[#cs + 1] = c
end

local function check(c)
  if c.quota then
    for _, q in ipairs({{'monthly', c.monthly, c.mu + c.mh, monthend},
                        {'daily', c.daily, c.du + c.dh, dayend}}) do
      local reason, limit, used, ends = q[1], q[2], q[3], q[4]
      if limit >= 0 and used + amount(demand, limit) > limit then
        return {reason, limit, used, demand, ends - now, false}
      end
    end
  end
  if c.conc >= 0 and c.inf + 1 > c.conc then
    return {'concurrency', c.conc, c.inf, 1, 1.0, true}
  end
  if c.rpm >= 0 then
    local over = current(c.rl, c.ra, c.rpm, now) + 1 - c.rpm
    if over > EPS then
      local used = math.ceil(current(c.rl, c.ra, c.rpm, now) - EPS)
      return {'rpm', c.rpm, used, 1, over * MINUTE / c.rpm, true}
    end
  end
  if c.tpm >= 0 then
    local over = current(c.tl, c.ta, c.tpm, now) + amount(demand, c.tpm) - c.tpm
    if over > EPS then
      local used = math.ceil(current(c.tl, c.ta, c.tpm, now) - EPS)
      return {'tpm', c.tpm, used, demand, over * MINUTE / c.tpm, true}
    end
  end
  return nil
end

local worst, worstc = nil, nil
for _, c in ipairs(cs) do
  local r = check(c)
  if r then
    r[5] = math.max(0, r[5])
    if worst == nil or ((not r[6]) and worst[6]) or (r[6] == worst[6] and r[5] > worst[5]) then
      worst, worstc = r, c
    end
  end
end
for _, c in ipairs(cs) do if c.quota then save(c) end end
if worst then
  redis.call('HINCRBY', worstc.k, 'refusals', 1)
  redis.call('HSET', worstc.k, 'lr', f(now), 'lreason', worst[1])
  local out = {'no', worst[1], worstc.name, worst[2], worst[3], worst[4], f(worst[5])}
  for _, v in ipairs(info(cs, now)) do out[#out + 1] = v end
  return out
end
local holds, record = {}, {}
for _, c in ipairs(cs) do
  c.inf = c.inf + 1
  if c.rpm >= 0 then
    c.rl = math.max(0, current(c.rl, c.ra, c.rpm, now) + 1); c.ra = math.max(c.ra, now)
  end
  local taken = amount(demand, c.tpm)
  if c.tpm >= 0 then
    c.tl = math.max(0, current(c.tl, c.ta, c.tpm, now) + taken); c.ta = math.max(c.ta, now)
  end
  local dh, mh, dp, mp = 0, 0, -1, -1
  if c.quota then
    dh, mh = amount(demand, c.daily), amount(demand, c.monthly)
    c.dh, c.mh = c.dh + dh, c.mh + mh
    dp, mp = c.dp, c.mp
  end
  save(c)
  for _, v in ipairs({taken, dh, dp, mh, mp}) do holds[#holds + 1] = v end
  for _, v in ipairs({c.name, c.tpm, c.quota and '1' or '0', taken, dh, dp, mh, mp}) do
    record[#record + 1] = tostring(v)
  end
end
redis.call('SET', P .. 'res:' .. rid, table.concat(record, '\n'), 'EX', math.ceil(lease) + 86400)
redis.call('ZADD', P .. 'resz', f(now + lease), rid)
local out = {'ok'}
for _, v in ipairs(info(cs, now)) do out[#out + 1] = v end
for _, v in ipairs(holds) do out[#out + 1] = v end
return out
"""

# ARGV: P, reservation id, now, actual, day period, month period, holds, then per hold:
# subject, tpm (-1 unlimited), has quota (0/1), tokens, day hold, day period, month hold,
# month period.  Returns 1, or 0 when it was settled already.
SETTLE = r"""
local rid, now, actual = ARGV[2], tonumber(ARGV[3]), math.max(0, tonumber(ARGV[4]))
local dayp, monthp = tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('DEL', P .. 'res:' .. rid) == 0 then return 0 end
redis.call('ZREM', P .. 'resz', rid)
release(ARGV, 8, tonumber(ARGV[7]), actual, now, dayp, monthp)
return 1
"""
