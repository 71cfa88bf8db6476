"""Request-rate and concurrency limits.

- `hit(key, limit, window_s)` / `ahit(...)`: count one request against an exact
  sliding window: it is allowed only when fewer than `limit` requests were
  allowed for `key` in the last `window_s` seconds, so no `window_s` span ever
  admits more than `limit`. A refused request is not counted, and its
  `retry_after` is when the oldest counted request leaves the window.
  With `REDIS_URL` the window is a sorted set per key, checked and updated by
  one Lua script (atomic across every process, timed by the Redis server's
  clock); otherwise a list of timestamps in the local cache under a process
  lock (the local-memory cache is per process anyway).
- `hit_many([(key, limit, window_s), ...])`: one request counted against
  several windows at once (a user's quotas and their groups'), all or
  nothing: allowed only when every window has room, then counted in every
  one, atomically (one Lua script on Redis, one lock locally).
  `peek([...])` reports the same without counting.
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
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache as memoize

from django.conf import settings
from django.core.cache import cache

from asgiref.sync import sync_to_async

__all__ = [
    "RateDecision",
    "SlotLease",
    "acquire_slot",
    "ahit",
    "hit",
    "hit_many",
    "peek",
    "reset",
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
    import redis

    client = redis.Redis.from_url(location)
    return client.register_script(_SLIDING_WINDOW_LUA)


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


def _hit_local(windows: Sequence[Window], count: bool) -> tuple[bool, list]:
    with _LOCAL_LOCK:
        now = clock()
        stamps, found = [], []
        for key, limit, window_s in windows:
            kept = [t for t in cache.get(_window_key(key, window_s)) or () if t > now - window_s]
            stamps.append(kept)
            wait = 0.0
            if len(kept) >= limit:
                wait = kept[len(kept) - limit] + window_s - now if kept and limit > 0 else window_s
            found.append((len(kept), wait))
        allowed = all(
            len(kept) < limit for kept, (_, limit, _) in zip(stamps, windows, strict=True)
        )
        for kept, (key, _, window_s) in zip(stamps, windows, strict=True):
            if allowed and count:
                kept.append(now)
            cache.set(_window_key(key, window_s), kept, timeout=window_s + 1)
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
        _redis_script(_location()).registered_client.delete(_window_key(key, window_s))
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
