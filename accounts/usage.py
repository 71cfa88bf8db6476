"""Usage accounting: prompt and completion tokens, and turns, per user, group,
runner and API key, summed in SQL from `runners.RunRecord` (one row per
attempt of a runner, written by the router with the turn's user and key).

- Tokens are the sum over every attempt, failed fallbacks included (a runner
  that failed after reading the prompt still spent it).
- A turn is counted once: by its first attempt (`fallback=False`).
- A group's usage is its *current* members' usage: a user in two groups
  counts in both; someone who leaves a group takes their history along.
- Periods are calendar days and months in settings.TIME_ZONE.

Everything here is one `GROUP BY` query, so it stays fast at millions of
records (the `(user, created_at)` index serves the per-user periods).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta

from django.db import connection
from django.db.models import CharField, Count, F, Func, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from runners.models import RunRecord

TOTALS = {
    "prompt_tokens": Coalesce(Sum("prompt_tokens"), Value(0)),
    "completion_tokens": Coalesce(Sum("completion_tokens"), Value(0)),
    "turns": Count("pk", filter=Q(fallback=False)),
}
# How far back the admin dashboard may look, in days.
MAX_DASHBOARD_DAYS = 366


@dataclass(frozen=True)
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    turns: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """The counts and their `total_tokens`."""
        return {**asdict(self), "total_tokens": self.total_tokens}


def start_of_day(now: datetime | None = None) -> datetime:
    local = timezone.localtime(now or timezone.now())
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def start_of_month(now: datetime | None = None) -> datetime:
    return start_of_day(now).replace(day=1)


def next_day(now: datetime | None = None) -> datetime:
    """When today's budget starts over (tomorrow's local midnight)."""
    return _midnight(start_of_day(now) + timedelta(days=1, hours=2))


def next_month(now: datetime | None = None) -> datetime:
    """When this month's budget starts over (the 1st of next month)."""
    first = start_of_month(now)
    return _midnight((first + timedelta(days=32)).replace(day=1))


def _midnight(moment: datetime) -> datetime:
    # Re-localised, so a daylight-saving change between the two dates is right.
    naive = moment.replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
    return timezone.make_aware(naive)


def records_of(user) -> QuerySet[RunRecord]:
    return RunRecord.objects.filter(user=user)


def totals(records: QuerySet[RunRecord]) -> Totals:
    """The records' tokens and turns, in one aggregate query."""
    return Totals(**records.aggregate(**TOTALS))


def user_summary(user, now: datetime | None = None) -> dict:
    """The usage page and GET /api/usage: today, this month, and this month
    by runner and by API key (the browser's session is key `None`)."""
    now = now or timezone.now()
    mine = records_of(user)
    month = mine.filter(created_at__gte=start_of_month(now))
    by_runner = month.values("runner_name").annotate(**TOTALS).order_by("runner_name")
    by_key = (
        month.values("api_key_id", "api_key__name", "api_key__prefix")
        .annotate(**TOTALS)
        .order_by("api_key__name", "api_key_id")
    )
    return {
        "today": totals(mine.filter(created_at__gte=start_of_day(now))).as_dict(),
        "month": totals(month).as_dict(),
        "by_runner": [{"runner": r["runner_name"], **_totals_of(r)} for r in by_runner],
        "by_api_key": [{"api_key": _key_label(r), **_totals_of(r)} for r in by_key],
    }


def _totals_of(row: dict) -> dict[str, int]:
    return Totals(row["prompt_tokens"], row["completion_tokens"], row["turns"]).as_dict()


def _key_label(row: dict) -> str | None:
    """ "name (prefix…)" of a key, or None for turns from the browser's session."""
    if row["api_key_id"] is None:
        return None
    return f"{row['api_key__name']} ({row['api_key__prefix']}…)"


# ---- the admin dashboard ----------------------------------------------------------------


@dataclass(frozen=True)
class UsageRow:
    day: object  # a date
    who: str  # a username or a group name
    runner: str
    totals: Totals


def _local_day(since: datetime, until: datetime):
    """`created_at`'s calendar day in TIME_ZONE, as SQL. On SQLite, Django's
    TruncDate with a time zone calls a Python function for every row (4.4 s
    over the 500,000 records of 30 days, slower than adding them up in
    Python; docs/benchmarks.md): when the zone's UTC offset is the same on
    every day of the window (no daylight-saving change in it), SQLite's own
    `date(created_at, '+N seconds')` does it in C. A `YYYY-MM-DD` text then."""
    tz = timezone.get_current_timezone()
    if connection.vendor == "sqlite":
        days = max(1, (until - since).days + 2)
        offsets = {(since + timedelta(days=d)).astimezone(tz).utcoffset() for d in range(days)}
        offsets.add(until.astimezone(tz).utcoffset())
        if len(offsets) == 1:
            seconds = int(offsets.pop().total_seconds())
            return Func(
                F("created_at"),
                Value(f"{seconds:+d} seconds"),
                function="date",
                output_field=CharField(),
            )
    return TruncDate("created_at", tzinfo=tz)


def over_time(since: datetime, until: datetime, by: str = "user") -> list[UsageRow]:
    """Tokens and turns per day, per user (`by="user"`) or per group
    (`by="group"`, current members), and per runner: one GROUP BY query.
    Records without a user (the admin's test prompt) are left out."""
    who = {"user": "user__username", "group": "user__groups__name"}[by]
    rows = (
        RunRecord.objects.filter(created_at__gte=since, created_at__lt=until)
        .exclude(**{f"{who}__isnull": True})
        .annotate(day=_local_day(since, until))
        .values("day", who, "runner_name")
        .annotate(**TOTALS)
        .order_by("day", who, "runner_name")
    )
    return [
        UsageRow(
            date.fromisoformat(r["day"]) if isinstance(r["day"], str) else r["day"],
            r[who],
            r["runner_name"],
            Totals(r["prompt_tokens"], r["completion_tokens"], r["turns"]),
        )
        for r in rows
    ]


def as_csv(rows: list[UsageRow], by: str) -> str:
    """The dashboard's rows as CSV (one header line, then one line per row)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["day", by, "runner", "turns", "prompt_tokens", "completion_tokens", "total_tokens"]
    )
    for row in rows:
        t = row.totals
        writer.writerow(
            [
                row.day.isoformat(),
                _cell(row.who),
                _cell(row.runner),
                t.turns,
                t.prompt_tokens,
                t.completion_tokens,
                t.total_tokens,
            ]
        )
    return out.getvalue()


def _cell(text: str) -> str:
    """Text a spreadsheet would run as a formula, made inert with a leading quote."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
