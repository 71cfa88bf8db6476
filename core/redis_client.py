"""One Redis client (one connection pool) per Redis location, for every part
of the project that talks to Redis itself rather than through Django's cache
or the channel layer: the limiters' scripts (accounts.limits) and the
generation stamp (core.generation)."""

from __future__ import annotations

from functools import cache


@cache
def redis_client(location: str):
    import redis

    return redis.Redis.from_url(location)
