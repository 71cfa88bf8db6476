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


# KEYS[1]: the window's sorted set; ARGV: limit, window in ms, a unique member.
# Scores are the Redis server's time in ms, so processes' clocks never matter.
_SLIDING_WINDOW_LUA = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, limit - count - 1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return {0, 0, tonumber(oldest[2]) + window - now}
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


def _decision(allowed: bool, remaining: int, wait_s: float, limit: int) -> RateDecision:
    if allowed:
        return RateDecision(True, 0, limit, remaining)
    return RateDecision(False, max(1, math.ceil(wait_s)), limit, 0)


def _hit_redis(key: str, limit: int, window_s: int) -> RateDecision:
    script = _redis_script(_location())
    member = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}"
    allowed, remaining, wait_ms = script(
        keys=[_window_key(key, window_s)], args=[limit, window_s * 1000, member]
    )
    return _decision(bool(allowed), int(remaining), int(wait_ms) / 1000, limit)


_LOCAL_LOCK = threading.Lock()
# The clock of the local limiter (tests replace it to walk through a window).
clock = time.time


def _hit_local(key: str, limit: int, window_s: int) -> RateDecision:
    cache_key = _window_key(key, window_s)
    with _LOCAL_LOCK:
        now = clock()
        stamps = [t for t in cache.get(cache_key) or () if t > now - window_s]
        if len(stamps) < limit:
            stamps.append(now)
            cache.set(cache_key, stamps, timeout=window_s + 1)
            return _decision(True, limit - len(stamps), 0, limit)
        cache.set(cache_key, stamps, timeout=window_s + 1)
        return _decision(False, 0, stamps[len(stamps) - limit] + window_s - now, limit)


def hit(key: str, limit: int, window_s: int = 60) -> RateDecision:
    """Count one request for `key`; at most `limit` in any `window_s` seconds."""
    if _uses_redis():
        return _hit_redis(key, limit, window_s)
    return _hit_local(key, limit, window_s)


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
