"""Usage accounting and quota sums over a million run records: SQL vs Python.

One command: `.venv/bin/python bench/usage_aggregation.py [--rows 1000000]
[--repeat 5] [--database-url postgres://...]`

Seeds `--rows` RunRecords (bulk insert: one executemany per 50,000 rows)
over the 60 days before the 28th of this month: 200 users in 10 groups (each user in one or two), 4
runners, a tenth of the turns with an API key, a twentieth fallbacks. SQLite
in a fresh DATA_DIR by default; `--database-url` seeds a PostgreSQL database
instead (its run records are deleted first: use a scratch database).

Then, each timed `--repeat` times (median), in the same run:

  user summary   accounts.usage.user_summary (the usage page, GET /api/usage)
  over_time      the admin dashboard, last 30 days, per user and per group
  quota sums     accounts.quotas._recorded: a user's tokens today, a group's
                 tokens this month (what `charge`, `within_budget` and
                 `reserve` read before a turn)
  runner_stats   the runner dashboard, last 24 hours (Python over its rows)

and the baseline for each: the same figures computed in Python over the same
rows fetched from the database (`values_list`), the naive way. Printed:
milliseconds each, and python / SQL. Every SQL figure is checked against its
Python twin.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from datetime import timedelta

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--rows", type=int, default=1_000_000)
parser.add_argument("--repeat", type=int, default=5)
parser.add_argument("--database-url", default="", help="a scratch PostgreSQL database")
args = parser.parse_args()

from _common import setup_django  # noqa: E402

setup_django("usage", database_url=args.database_url)

from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from accounts import quotas, usage  # noqa: E402
from accounts.models import ApiKey, Quota  # noqa: E402
from runners.models import RunnerConfig, RunRecord  # noqa: E402
from runners.stats import RECORD_FIELDS, runner_stats  # noqa: E402

USERS, GROUPS, DAYS = 200, 10, 60
# "Now" for the whole run: the 28th of this month at noon, so "this month"
# holds 28 days of records whatever day the benchmark runs.
REF = usage.start_of_month() + timedelta(days=27, hours=12)
RUNNERS = ["local", "remote", "vision", "spare"]
COLUMNS = (
    "runner_id, runner_name, model_id, capability, status, error_code, error, fallback, "
    "prompt_tokens, completion_tokens, time_to_first_token_ms, total_ms, tokens_per_second, "
    "source, user_id, api_key_id, created_at"
)


def seed(rows: int) -> None:
    call_command("migrate", verbosity=0)
    RunRecord.objects.all().delete()
    users = list(User.objects.filter(username__startswith="bench-"))
    if len(users) < USERS:
        User.objects.filter(username__startswith="bench-").delete()
        User.objects.bulk_create(User(username=f"bench-{i}") for i in range(USERS))
        users = list(User.objects.filter(username__startswith="bench-").order_by("pk"))
        groups = [Group.objects.get_or_create(name=f"bench-group-{g}")[0] for g in range(GROUPS)]
        through = User.groups.through
        links = [through(user_id=u.pk, group_id=groups[i % GROUPS].pk) for i, u in enumerate(users)]
        links += [
            through(user_id=u.pk, group_id=groups[(i * 7 + 3) % GROUPS].pk)
            for i, u in enumerate(users)
            if i % 3 == 0 and (i * 7 + 3) % GROUPS != i % GROUPS
        ]
        through.objects.bulk_create(links)
    configs = {
        name: RunnerConfig.objects.get_or_create(
            name=name, defaults={"kind": "llamastack", "model_id": "m"}
        )[0].pk
        for name in RUNNERS
    }
    keys = {u.pk: ApiKey.issue(u, "bench")[0].pk for u in users[:40]}
    rng = random.Random(19)
    now = REF
    span = DAYS * 86400
    placeholders = ", ".join(["%s"] * 17)
    sql = f"INSERT INTO runners_runrecord ({COLUMNS}) VALUES ({placeholders})"
    started = time.perf_counter()
    batch: list[tuple] = []
    with connection.cursor() as cursor:
        for i in range(rows):
            user = users[rng.randrange(USERS)].pk
            runner = RUNNERS[rng.randrange(len(RUNNERS))]
            failed = rng.random() < 0.03
            batch.append(
                (
                    configs[runner],
                    runner,
                    "m",
                    "llm",
                    "failed" if failed else "ok",
                    "runtime" if failed else "",
                    "",
                    rng.random() < 0.05,
                    rng.randrange(20, 2000),
                    0 if failed else rng.randrange(1, 800),
                    None if failed else rng.uniform(50, 900),
                    rng.uniform(100, 20000),
                    None if failed else rng.uniform(5, 60),
                    "api" if user in keys else "chat",
                    user,
                    keys.get(user) if rng.random() < 0.5 else None,
                    now - timedelta(seconds=rng.uniform(0, span)),
                )
            )
            if len(batch) == 50_000 or i == rows - 1:
                with transaction.atomic():
                    cursor.executemany(sql, batch)
                batch.clear()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE runners_runrecord")
    else:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    print(f"seeded {rows:,} run records in {time.perf_counter() - started:.1f} s")


def timed(fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


# ---- the naive baselines: fetch the rows, add them up in Python ----------------------------


def _add(into: dict, prompt: int, completion: int, fallback: bool) -> None:
    into["prompt_tokens"] += prompt
    into["completion_tokens"] += completion
    into["turns"] += 0 if fallback else 1


def _empty() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "turns": 0}


def python_summary(user) -> dict:
    today, month = usage.start_of_day(REF), usage.start_of_month(REF)
    out = {"today": _empty(), "month": _empty(), "by_runner": defaultdict(_empty)}
    by_key: dict = defaultdict(_empty)
    rows = RunRecord.objects.filter(user=user).values_list(
        "created_at", "runner_name", "api_key_id", "prompt_tokens", "completion_tokens", "fallback"
    )
    for created, runner, key, prompt, completion, fallback in rows.iterator(chunk_size=5000):
        if created < month:
            continue
        _add(out["month"], prompt, completion, fallback)
        _add(out["by_runner"][runner], prompt, completion, fallback)
        _add(by_key[key], prompt, completion, fallback)
        if created >= today:
            _add(out["today"], prompt, completion, fallback)
    out["by_api_key"] = by_key
    return out


def python_over_time(since, until, by: str) -> dict:
    tz = timezone.get_current_timezone()
    names = dict(User.objects.values_list("pk", "username"))
    member_of: dict[int, list[str]] = defaultdict(list)
    for user_id, name in User.groups.through.objects.values_list("user_id", "group__name"):
        member_of[user_id].append(name)
    out: dict = defaultdict(_empty)
    rows = RunRecord.objects.filter(created_at__gte=since, created_at__lt=until, user__isnull=False)
    fields = ("created_at", "user_id", "runner_name", "prompt_tokens", "completion_tokens")
    for created, user_id, runner, prompt, completion, fallback in rows.values_list(
        *fields, "fallback"
    ).iterator(chunk_size=5000):
        day = created.astimezone(tz).date()
        whos = [names[user_id]] if by == "user" else member_of.get(user_id, [])
        for who in whos:
            _add(out[(day, who, runner)], prompt, completion, fallback)
    return out


def python_recorded(quota: Quota, user, since) -> int:
    rows = RunRecord.objects.filter(created_at__gte=since)
    rows = rows.filter(user__groups=quota.group_id) if quota.group_id else rows.filter(user=user)
    return sum(p + c for p, c in rows.values_list("prompt_tokens", "completion_tokens").iterator())


def fetch_only(since) -> int:
    rows = RunRecord.objects.filter(created_at__gte=since).values_list(*RECORD_FIELDS)
    return sum(1 for _ in rows.iterator(chunk_size=2000))


# ---- the run -------------------------------------------------------------------------------


def main() -> None:
    seed(args.rows)
    user = User.objects.filter(username__startswith="bench-").order_by("pk").first()
    group = user.groups.order_by("pk").first()
    now = REF
    since = usage.start_of_day(now) - timedelta(days=29)
    until = usage.start_of_day(now) + timedelta(days=1)
    mine = Quota(user=user, metric="tokens", period="day", limit=1)
    theirs = Quota(group=group, metric="tokens", period="month", limit=1)
    results = []

    def compare(name, sql_fn, python_fn, check) -> None:
        sql_ms, sql_out = timed(sql_fn)
        py_ms, py_out = timed(python_fn)
        assert check(sql_out, py_out), name
        results.append((name, sql_ms, py_ms))
        print(f"{name:34s} SQL {sql_ms:9.1f} ms   Python {py_ms:9.1f} ms   {py_ms / sql_ms:6.1f}x")
        sys.stdout.flush()

    def same_summary(sql, py) -> bool:
        runners = {r["runner"]: r["turns"] for r in sql["by_runner"]}
        return (
            sql["month"]["prompt_tokens"] == py["month"]["prompt_tokens"]
            and sql["today"]["turns"] == py["today"]["turns"]
            and runners == {k: v["turns"] for k, v in py["by_runner"].items()}
        )

    def same_rows(sql, py) -> bool:
        got = {(r.day, r.who, r.runner): r.totals.total_tokens for r in sql}
        want = {k: v["prompt_tokens"] + v["completion_tokens"] for k, v in py.items()}
        return got == want

    print(
        f"{RunRecord.objects.count():,} run records, {connection.vendor}; "
        f"user {user.username}: {RunRecord.objects.filter(user=user).count():,} records"
    )
    compare(
        "user summary (usage page)",
        lambda: usage.user_summary(user, now),
        lambda: python_summary(user),
        same_summary,
    )
    for by in ("user", "group"):
        compare(
            f"admin over_time, 30 days, per {by}",
            lambda by=by: usage.over_time(since, until, by),
            lambda by=by: python_over_time(since, until, by),
            same_rows,
        )
    compare(
        "quota sum: user's tokens today",
        lambda: quotas._recorded(mine, user, usage.start_of_day(now)),
        lambda: python_recorded(mine, user, usage.start_of_day(now)),
        lambda a, b: a == b,
    )
    compare(
        "quota sum: group's tokens, month",
        lambda: quotas._recorded(theirs, user, usage.start_of_month(now)),
        lambda: python_recorded(theirs, user, usage.start_of_month(now)),
        lambda a, b: a == b,
    )
    day_ago = now - timedelta(days=1)
    stats_ms, _ = timed(lambda: runner_stats(day_ago))
    fetch_ms, count = timed(lambda: fetch_only(day_ago))
    print(
        f"{'runner_stats, last 24 h':34s} {stats_ms:9.1f} ms vs fetching its {count:,} rows "
        f"{fetch_ms:9.1f} ms: {stats_ms / fetch_ms:.2f}x"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
