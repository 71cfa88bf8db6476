"""What every turn reads and an admin rarely changes (the guardian rules, the
runner configs and who may use them, the quotas), kept in memory per process
and read again from the database once any of it changed, in any process.

- **The stamp**: a token rewritten whenever a watched model changes
  (`watch()`: post_save, post_delete, m2m_changed). It lives in a file in
  DATA_DIR, which every process of the machine reads (the web processes and
  `manage.py` commands alike), or, with REDIS_URL, in a Redis key, which every
  machine reads. Reading it is a small file read or one GET.
- **The memo**: `memo(key, load)` returns the value loaded under the current
  stamp, loading it (`load()`, a database read) when the stamp moved since.
- **One read per trip**: inside `with one_stamp():` the stamp is read once
  and every memo of the block uses it (a turn's checks read five memos in
  one trip to the database thread: one file read or one Redis GET, not five),
  and the block sees one version of everything.
- **No stale read survives a change**: a change bumps the stamp at once and
  again when its transaction commits; the memo reads the stamp *before*
  loading, so a load that ran before the commit is stored under the stamp
  the commit replaces, and the next call loads again.
- Bulk changes, which send no signals, bump too when the model's manager is
  a `WatchedQuerySet` (`update()`, `bulk_create()`, `bulk_update()`); raw SQL
  calls `bump()` itself.

Django-only where it must be (settings, signals); no app is imported.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

from core.redis_client import redis_client

_REDIS_KEY = "breezeweb:config-generation"
_FILE = "config-generation"
# Values kept per stamp at most (per-user entries: one per active user); past it
# the memo starts over rather than grow.
MAX_ENTRIES = 10_000

_lock = threading.Lock()
_memo: dict[Any, Any] = {}
_memo_stamp: str | None = None
_MISSING = object()
# The stamp read on entering `one_stamp()`, for the block's memos (None: outside one).
_pinned: ContextVar[str | None] = ContextVar("core.generation.pinned", default=None)


def _path() -> Path:
    return Path(settings.DATA_DIR) / _FILE


def stamp() -> str:
    """The current token ("" before the first change is ever recorded)."""
    if settings.REDIS_URL:
        value = redis_client(settings.REDIS_URL).get(_REDIS_KEY)
        return value.decode() if value else ""
    try:
        return _path().read_text()
    except FileNotFoundError:
        return ""


def _write() -> None:
    token = uuid.uuid4().hex
    if settings.REDIS_URL:
        redis_client(settings.REDIS_URL).set(_REDIS_KEY, token)
        return
    path = _path()
    temporary = path.with_name(f".{_FILE}.{token}")
    temporary.write_text(token)
    os.replace(temporary, path)  # atomic: a reader sees the old token or the new one


def bump() -> None:
    """Record a change: now (this process and any that reads the stamp next)
    and again when the current transaction commits (see the module doc)."""
    _write()
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(_write)


@contextmanager
def one_stamp() -> Iterator[None]:
    """Read the stamp once for the whole block (see the module doc); a block
    inside another uses the outer one's."""
    if _pinned.get() is not None:
        yield
        return
    token = _pinned.set(stamp())
    try:
        yield
    finally:
        _pinned.reset(token)


def memo[T](key: Any, load: Callable[[], T]) -> T:
    """`load()`'s value for `key` under the current stamp (loaded at most once
    per stamp and process, unless two threads miss at once); inside
    `one_stamp()`, under the stamp read on entering it."""
    global _memo_stamp
    current = _pinned.get()
    if current is None:
        current = stamp()
    with _lock:
        if current != _memo_stamp:
            _memo.clear()
            _memo_stamp = current
        value = _memo.get(key, _MISSING)
    if value is not _MISSING:
        return value
    value = load()
    with _lock:
        if _memo_stamp == current:
            if len(_memo) >= MAX_ENTRIES:
                _memo.clear()
            _memo[key] = value
    return value


def forget() -> None:
    """Drop every memoized value (tests: a flushed database sends no signal)."""
    global _memo_stamp
    with _lock:
        _memo.clear()
        _memo_stamp = None


def _changed(sender: Any, **kwargs: Any) -> None:
    bump()


def watch(*models: Any) -> None:
    """Bump the stamp whenever one of `models` (or a many-to-many table among
    them) is saved, deleted or has its relations changed."""
    for model in models:
        uid = f"core.generation:{model._meta.label}"
        post_save.connect(_changed, sender=model, dispatch_uid=uid + ":save", weak=False)
        post_delete.connect(_changed, sender=model, dispatch_uid=uid + ":delete", weak=False)
        m2m_changed.connect(_changed, sender=model, dispatch_uid=uid + ":m2m", weak=False)


class WatchedQuerySet(models.QuerySet):
    """A watched model's queryset: the bulk writes, which send no signals,
    bump the stamp too."""

    def update(self, **kwargs: Any) -> int:
        count = super().update(**kwargs)
        bump()
        return count

    def bulk_create(self, *args: Any, **kwargs: Any) -> list:
        created = super().bulk_create(*args, **kwargs)
        bump()
        return created

    def bulk_update(self, *args: Any, **kwargs: Any) -> int:
        count = super().bulk_update(*args, **kwargs)
        bump()
        return count
