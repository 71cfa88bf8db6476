"""Request-rate and concurrency limits on the Django cache.

With the default local-memory cache the limits hold per process; with
`REDIS_URL` they hold across every Daphne process, since cache increments are
atomic there. Callers pick the key (an API key's fingerprint, a user id) and
the limits; nothing here knows about requests or users.

- `hit(key, limit, window_s)` / `ahit(...)`: count one request against a
  sliding window of `window_s` seconds (two fixed-window counters, the older
  one weighted by how much of it still overlaps the window). A refused request
  is not counted, so a client that waits `retry_after` seconds gets through.
- `acquire_slot(key, limit)` -> `SlotLease | None`, and `concurrency_slot(...)`
  as an async context manager raising `LimitExceeded`: at most `limit`
  concurrent holders. A lease outlives a crashed process at most `ttl_s`.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from django.core.cache import cache

from asgiref.sync import sync_to_async

__all__ = [
    "LimitExceeded",
    "RateDecision",
    "SlotLease",
    "acquire_slot",
    "ahit",
    "concurrency_slot",
    "hit",
]

SLOT_TTL_SECONDS = 15 * 60
# What a refused concurrent request is told to wait: streams end at their own
# pace, so there is no exact answer; a short wait is an honest hint.
SLOT_RETRY_AFTER_SECONDS = 2


@dataclass(frozen=True)
class RateDecision:
    """Whether one more request is allowed now; if not, after how many whole
    seconds to try again. `remaining` is how many more fit in the window."""

    allowed: bool
    retry_after: int
    limit: int
    remaining: int


class LimitExceeded(Exception):
    """A limit refused the caller; `retry_after` is in whole seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def _window(key: str, window_s: int, now: float) -> tuple[str, str, float]:
    index = int(now // window_s)
    elapsed = (now - index * window_s) / window_s
    return f"rl:{window_s}:{key}:{index}", f"rl:{window_s}:{key}:{index - 1}", elapsed


def _decide(
    current: int, previous: int, elapsed: float, limit: int, window_s: int
) -> RateDecision | None:
    """The refusal for a counted request, or None when it is allowed."""
    estimate = previous * (1.0 - elapsed) + current
    if estimate <= limit:
        return None
    # Earliest time the estimate, without this request, drops below the limit.
    before = current - 1
    if before >= limit or previous == 0:
        wait = (1.0 - elapsed) * window_s
    else:
        # previous * (1 - e') + before < limit, e' = elapsed + wait / window_s
        needed = 1.0 - (limit - before) / previous
        wait = max(needed - elapsed, 0.0) * window_s
    return RateDecision(False, max(1, math.ceil(wait)), limit, 0)


def hit(key: str, limit: int, window_s: int = 60) -> RateDecision:
    """Count one request for `key`; at most `limit` per sliding `window_s`."""
    now = time.time()
    current_key, previous_key, elapsed = _window(key, window_s, now)
    cache.add(current_key, 0, timeout=window_s * 2 + 1)
    try:
        current = cache.incr(current_key)
    except ValueError:  # expired between add and incr
        cache.set(current_key, 1, timeout=window_s * 2 + 1)
        current = 1
    previous = int(cache.get(previous_key) or 0)
    refused = _decide(current, previous, elapsed, limit, window_s)
    if refused is not None:
        with suppress(ValueError):
            cache.decr(current_key)
        return refused
    remaining = max(0, math.floor(limit - (previous * (1.0 - elapsed) + current)))
    return RateDecision(True, 0, limit, remaining)


async def ahit(key: str, limit: int, window_s: int = 60) -> RateDecision:
    """`hit` for async callers. One thread hop for the whole decision: Django's
    cache backends implement their async methods as a thread hop per call."""
    return await sync_to_async(hit)(key, limit, window_s)


@dataclass
class SlotLease:
    """One held concurrency slot. `release()` is idempotent."""

    key: str
    released: bool = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await sync_to_async(_give_back)(self.key)


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
    if await sync_to_async(_take)(cache_key, limit, ttl_s):
        return SlotLease(cache_key)
    return None


@asynccontextmanager
async def concurrency_slot(
    key: str, limit: int, *, ttl_s: int = SLOT_TTL_SECONDS
) -> AsyncIterator[SlotLease]:
    """Hold one of `limit` slots for `key` for the block; raises LimitExceeded."""
    lease = await acquire_slot(key, limit, ttl_s=ttl_s)
    if lease is None:
        raise LimitExceeded(
            f"At most {limit} concurrent requests are allowed.", SLOT_RETRY_AFTER_SECONDS
        )
    try:
        yield lease
    finally:
        await lease.release()
