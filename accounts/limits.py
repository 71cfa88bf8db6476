"""Request-rate and concurrency limits.

- `hit(key, limit, window_s)` / `ahit(...)`: count one request against an exact
  sliding window: it is allowed only when fewer than `limit` requests were
  allowed for `key` in the last `window_s` seconds, so no `window_s` span ever
  admits more than `limit`. A refused request is not counted, and its
  `retry_after` is when the oldest counted request leaves the window.
  With `REDIS_URL` the window is a sorted set per key, checked and updated by
  one Lua script (atomic across every process, timed by the Redis server's
  clock); otherwise the timestamps in this process's memory under a process
  lock, with a token in the local cache (the local-memory cache is per
  process anyway; see `_local_windows`).
- `hit_many([(key, limit, window_s), ...])`: one request counted against
  several windows at once (a user's quotas and their groups'), all or
  nothing: allowed only when every window has room, then counted in every
  one, atomically (one Lua script on Redis, one lock locally).
  `peek([...])` reports the same without counting.
- `reserve(budgets, ...)` / `release(keys, member)`: holds on budgets whose
  use is known only when a turn ends (tokens): a turn is admitted only when
  every budget has room for what it may spend, recorded use plus the holds of
  the turns in flight, and holds that until its own record is saved
  (optimistic against the records, atomic across processes; see below).
- `acquire_slot(key, limit)` -> `SlotLease | None`: at most `limit`
  concurrent holders (the websocket's answers per user, the API's streams per
  key). A lease outlives a crashed process at most `ttl_s`.

Callers pick the key (a user id, an API key's fingerprint) and the limits;
nothing here knows about requests or users.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache as memoize

from django.conf import settings
from django.core.cache import cache

from asgiref.sync import sync_to_async

from core.redis_client import redis_client

__all__ = [
    "RateDecision",
    "Reservation",
    "SlotLease",
    "acquire_slot",
    "ahit",
    "generations",
    "hit",
    "hit_many",
    "peek",
    "release",
    "reserve",
    "reset",
    "reset_holds",
    "reset_slots",
]

SLOT_TTL_SECONDS = 15 * 60
# What a refused concurrent request is told to wait: streams end at their own
# pace, so there is no exact answer; a short wait is an honest hint.
SLOT_RETRY_AFTER_SECONDS = 2
_REDIS_BACKEND = "django.core.cache.backends.redis.RedisCache"


@dataclass(frozen=True)
class RateDecision:
    """Whether one more request is allowed now; if not, after how many whole
    seconds to try again. `remaining` is how many more fit in the window."""

    allowed: bool
    retry_after: int
    limit: int
    remaining: int


def _window_key(key: str, window_s: int) -> str:
    return f"breezeweb:rl:{window_s}:{key}"


# KEYS: the windows' sorted sets; ARGV: a limit and a window in ms per key,
# then a unique member, then 1 to count or 0 to only look. Every window is
# checked first; the request is counted in all of them or in none. Scores are
# the Redis server's time in ms, so processes' clocks never matter. Returns
# {allowed, count_1, wait_ms_1, count_2, wait_ms_2, ...}: each window's count
# before this request, and how long until it has room again (0: it has room).
_SLIDING_WINDOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local out = {1}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local window = tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local count = redis.call('ZCARD', KEYS[i])
  local wait = 0
  if count >= limit then
    out[1] = 0
    wait = window
    if count > 0 then
      local oldest = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
      if oldest[2] then wait = tonumber(oldest[2]) + window - now end
    end
  end
  out[2 * i] = count
  out[2 * i + 1] = wait
end
if out[1] == 1 and ARGV[2 * n + 2] == '1' then
  for i = 1, n do
    redis.call('ZADD', KEYS[i], now, ARGV[2 * n + 1])
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 * i]))
  end
end
return out
"""


def _uses_redis() -> bool:
    return settings.CACHES["default"]["BACKEND"] == _REDIS_BACKEND


@memoize
def _redis_script(location: str):
    return redis_client(location).register_script(_SLIDING_WINDOW_LUA)


def _location() -> str:
    location = settings.CACHES["default"]["LOCATION"]
    return location[0] if isinstance(location, list | tuple) else location


Window = tuple[str, int, int]  # (key, limit, window in seconds)


def _decisions(windows: Sequence[Window], counted: bool, found: list) -> list[RateDecision]:
    """Each window's decision from its count before the request and its wait:
    allowed when it had room; `remaining` after the request when `counted`."""
    out = []
    for (_, limit, _), (count, wait_s) in zip(windows, found, strict=True):
        if count < limit:
            out.append(RateDecision(True, 0, limit, max(0, limit - count - int(counted))))
        else:
            out.append(RateDecision(False, max(1, math.ceil(wait_s)), limit, 0))
    return out


def _hit_redis(windows: Sequence[Window], count: bool) -> tuple[bool, list]:
    script = _redis_script(_location())
    member = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}"
    args: list = []
    for _, limit, window_s in windows:
        args += [limit, window_s * 1000]
    reply = script(
        keys=[_window_key(key, window_s) for key, _, window_s in windows],
        args=[*args, member, 1 if count else 0],
    )
    found = [(int(reply[i]), int(reply[i + 1]) / 1000) for i in range(1, len(reply), 2)]
    return bool(reply[0]), found


_LOCAL_LOCK = threading.Lock()
# The clock of the local limiter (tests replace it to walk through a window).
clock = time.time
# The local windows' timestamps, in this process's memory: the local-memory
# cache is per process too, and it pickles what it stores, so a window kept
# there cost a copy of every timestamp per request (a budget of thousands per
# minute or month made each request pay for thousands). The cache holds a
# token per window instead: a window whose token is gone (`cache.clear()`,
# `reset`, culled) starts empty, as a window kept in the cache would.
_local_windows: dict[str, tuple[str, int, deque[float]]] = {}
# Past this many windows, the empty ones are dropped (idle users' and keys').
_LOCAL_SWEEP_AT = 10_000


def _expire(stamps: deque[float], window_s: int, now: float) -> deque[float]:
    while stamps and stamps[0] <= now - window_s:
        stamps.popleft()
    return stamps


def _local_window(key: str, window_s: int, now: float) -> deque[float]:
    """The timestamps of `key`'s window still inside it (under _LOCAL_LOCK)."""
    name = _window_key(key, window_s)
    token = cache.get(name)
    entry = _local_windows.get(name)
    if token is None or entry is None or entry[0] != token:
        if len(_local_windows) >= _LOCAL_SWEEP_AT:
            for other, (_, span, stamps) in list(_local_windows.items()):
                if not _expire(stamps, span, now):
                    del _local_windows[other]
        token = uuid.uuid4().hex
        cache.set(name, token, timeout=None)
        entry = _local_windows[name] = (token, window_s, deque())
    return _expire(entry[2], window_s, now)


def _hit_local(windows: Sequence[Window], count: bool) -> tuple[bool, list]:
    with _LOCAL_LOCK:
        now = clock()
        stamps, found = [], []
        for key, limit, window_s in windows:
            kept = _local_window(key, window_s, now)
            stamps.append(kept)
            wait = 0.0
            if len(kept) >= limit:
                wait = kept[len(kept) - limit] + window_s - now if kept and limit > 0 else window_s
            found.append((len(kept), wait))
        allowed = all(
            len(kept) < limit for kept, (_, limit, _) in zip(stamps, windows, strict=True)
        )
        if allowed and count:
            for kept in stamps:
                kept.append(now)
        return allowed, found


def hit_many(windows: Sequence[Window]) -> list[RateDecision]:
    """Count one request against every window, or against none: it is allowed
    only when each has room. One decision per window, in order; the request
    was counted when all of them are `allowed` (`remaining` is then after
    it), otherwise the full ones carry `retry_after`."""
    if not windows:
        return []
    allowed, found = (_hit_redis if _uses_redis() else _hit_local)(windows, True)
    return _decisions(windows, allowed, found)


def peek(windows: Sequence[Window]) -> list[RateDecision]:
    """What `hit_many` would decide now, counting nothing (`remaining`
    before a request)."""
    if not windows:
        return []
    _, found = (_hit_redis if _uses_redis() else _hit_local)(windows, False)
    return _decisions(windows, False, found)


def hit(key: str, limit: int, window_s: int = 60) -> RateDecision:
    """Count one request for `key`; at most `limit` in any `window_s` seconds."""
    return hit_many([(key, limit, window_s)])[0]


async def ahit(key: str, limit: int, window_s: int = 60) -> RateDecision:
    """`hit` for async callers (one thread hop; the cache is never the ORM's thread)."""
    return await sync_to_async(hit, thread_sensitive=False)(key, limit, window_s)


def reset(key: str, window_s: int = 60) -> None:
    """Forget `key`'s window (tests, or an admin unblocking someone)."""
    if _uses_redis():
        redis_client(_location()).delete(_window_key(key, window_s))
    else:
        cache.delete(_window_key(key, window_s))


@dataclass
class SlotLease:
    """One held concurrency slot. `release()` is idempotent."""

    key: str
    released: bool = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        # Not thread_sensitive: cache trips must not queue behind the ORM's thread.
        await sync_to_async(_give_back, thread_sensitive=False)(self.key)


def _slot_key(key: str) -> str:
    return f"slots:{key}"


def _give_back(cache_key: str) -> None:
    try:
        left = cache.decr(cache_key)
    except ValueError:  # the counter expired meanwhile: nothing to give back
        return
    if left < 0:
        cache.set(cache_key, 0, timeout=SLOT_TTL_SECONDS)


def _take(cache_key: str, limit: int, ttl_s: int) -> bool:
    cache.add(cache_key, 0, timeout=ttl_s)
    try:
        taken = cache.incr(cache_key)
    except ValueError:
        cache.set(cache_key, 1, timeout=ttl_s)
        taken = 1
    if taken > limit:
        _give_back(cache_key)
        return False
    return True


async def acquire_slot(key: str, limit: int, *, ttl_s: int = SLOT_TTL_SECONDS) -> SlotLease | None:
    """Take one of `limit` concurrent slots for `key`, or None when all are taken."""
    cache_key = _slot_key(key)
    if await sync_to_async(_take, thread_sensitive=False)(cache_key, limit, ttl_s):
        return SlotLease(cache_key)
    return None


def reset_slots(key: str) -> None:
    """Forget every slot held for `key` (tests, or an admin unblocking someone)."""
    cache.delete(_slot_key(key))


# ---- holds: budgets whose use is known only afterwards ---------------------------------
#
# A budget's use is what its owner recorded (a sum the caller reads, e.g. in
# SQL) plus what the turns in flight hold. `reserve` admits a turn only when
# every budget has room for it, and holds its amount until `release`,
# atomically across processes (one Lua script with Redis, one lock locally).
# The records and the holds are two stores, so `reserve` is optimistic: the
# caller reads the budgets' generations, then their recorded use, then
# reserves with those generations. A turn ends by saving its record, then
# `release` (which bumps the generations): a reserve whose generations moved
# meanwhile may have read the records before that save and the holds after
# it, so it is refused as `stale` and the caller reads again. A hold whose
# process died expires after `ttl_s`.

Budget = tuple[str, int, int, bool]  # (key, recorded use, limit, shares the token grant)


@dataclass(frozen=True)
class Reservation:
    """`outcome`: ok (held), full (budget `index` has no room; `used` is
    its recorded + held use) or stale (read again). `grant`: the amount
    held in the token budgets (between `need` and `want`)."""

    outcome: str
    grant: int = 0
    index: int = -1
    used: int = 0


def _hold_keys(key: str) -> tuple[str, str]:
    return f"breezeweb:hold:{key}", f"breezeweb:hold-gen:{key}"


# KEYS: per budget its holds (a hash member -> "amount:deadline_ms") and its
# generation. ARGV: member, need, want, ttl in ms, then per budget: recorded,
# limit, 1 when it takes the token grant (else it takes 1), the generation
# read. Returns {outcome (1 ok, 0 full, -1 stale), grant, index, used}.
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, need, want, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 2
local grant = want
for i = 1, n do
  local a = 4 + (i - 1) * 4
  if tonumber(redis.call('GET', KEYS[2 * i]) or '0') ~= tonumber(ARGV[a + 4]) then
    return {-1, 0, i - 1, 0}
  end
  local held = 0
  local all = redis.call('HGETALL', KEYS[2 * i - 1])
  for j = 1, #all, 2 do
    local amount, deadline = string.match(all[j + 1], '(%d+):(%d+)')
    if tonumber(deadline) < now then
      redis.call('HDEL', KEYS[2 * i - 1], all[j])
    else
      held = held + tonumber(amount)
    end
  end
  local used = tonumber(ARGV[a + 1]) + held
  local room = tonumber(ARGV[a + 2]) - used
  if ARGV[a + 3] == '1' then
    if room < need then return {0, 0, i - 1, used} end
    if room < grant then grant = room end
  elseif room < 1 then
    return {0, 0, i - 1, used}
  end
end
for i = 1, n do
  local amount = 1
  if ARGV[4 + (i - 1) * 4 + 3] == '1' then amount = grant end
  redis.call('HSET', KEYS[2 * i - 1], member, amount .. ':' .. (now + ttl))
  redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
end
return {1, grant, -1, 0}
"""

# KEYS: per budget its holds and its generation; ARGV: member, ttl in ms.
_RELEASE_LUA = """
for i = 1, #KEYS / 2 do
  redis.call('HDEL', KEYS[2 * i - 1], ARGV[1])
  redis.call('INCR', KEYS[2 * i])
  redis.call('PEXPIRE', KEYS[2 * i], tonumber(ARGV[2]))
end
return 1
"""


@memoize
def _hold_scripts(location: str):
    client = redis_client(location)
    return client.register_script(_RESERVE_LUA), client.register_script(_RELEASE_LUA)


def generations(keys: Sequence[str]) -> list[int]:
    """Each budget's generation: read before its recorded use, passed to `reserve`."""
    if not keys:
        return []
    names = [_hold_keys(key)[1] for key in keys]
    if _uses_redis():
        found = redis_client(_location()).mget(names)
    else:
        with _LOCAL_LOCK:
            found = [cache.get(name) for name in names]
    return [int(value or 0) for value in found]


def _reserve_local(budgets, member, need, want, gens, ttl_s) -> Reservation:
    with _LOCAL_LOCK:
        now = clock()
        grant, holds = want, []
        for i, ((key, recorded, limit, tokens), gen) in enumerate(zip(budgets, gens, strict=True)):
            held_key, gen_key = _hold_keys(key)
            if int(cache.get(gen_key) or 0) != gen:
                return Reservation("stale", index=i)
            held = {m: v for m, v in (cache.get(held_key) or {}).items() if v[1] >= now}
            holds.append(held)
            used = recorded + sum(amount for amount, _ in held.values())
            room = limit - used
            if room < (need if tokens else 1):
                return Reservation("full", index=i, used=used)
            if tokens:
                grant = min(grant, room)
        for (key, _, _, tokens), held in zip(budgets, holds, strict=True):
            held[member] = (grant if tokens else 1, now + ttl_s)
            cache.set(_hold_keys(key)[0], held, timeout=ttl_s)
        return Reservation("ok", grant=grant)


def reserve(
    budgets: Sequence[Budget],
    member: str,
    *,
    need: int,
    want: int,
    generations: Sequence[int],
    ttl_s: int,
) -> Reservation:
    """Hold room for one turn in every budget, or in none: 1 in each budget
    without the token flag; in the token budgets one grant, as much of `want`
    as all of them have room for and at least `need`."""
    if _uses_redis():
        args: list = [member, need, want, ttl_s * 1000]
        keys: list[str] = []
        for (key, recorded, limit, tokens), gen in zip(budgets, generations, strict=True):
            keys += _hold_keys(key)
            args += [recorded, limit, 1 if tokens else 0, gen]
        outcome, grant, index, used = (int(v) for v in _hold_scripts(_location())[0](keys, args))
        name = {1: "ok", 0: "full", -1: "stale"}[outcome]
        return Reservation(name, grant=grant, index=index, used=used)
    return _reserve_local(budgets, member, need, want, generations, ttl_s)


def release(keys: Sequence[str], member: str, ttl_s: int) -> None:
    """Give back `member`'s hold in each budget (its record is saved by now)."""
    if not keys:
        return
    if _uses_redis():
        names = [name for key in keys for name in _hold_keys(key)]
        _hold_scripts(_location())[1](names, [member, ttl_s * 1000])
        return
    with _LOCAL_LOCK:
        for key in keys:
            held_key, gen_key = _hold_keys(key)
            held = cache.get(held_key) or {}
            held.pop(member, None)
            cache.set(held_key, held, timeout=ttl_s)
            cache.set(gen_key, int(cache.get(gen_key) or 0) + 1, timeout=ttl_s)


def reset_holds(key: str) -> None:
    """Forget every hold on `key` (tests, or an admin)."""
    names = _hold_keys(key)
    if _uses_redis():
        redis_client(_location()).delete(*names)
    else:
        cache.delete_many(list(names))
