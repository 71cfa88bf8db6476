"""Usage accounting: every turn's run records name its user and API key, and
the totals (the user's page, GET /api/usage, the admin dashboard and its CSV)
are the sums of those records, computed in SQL."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

from django.contrib.auth.models import Group
from django.test import Client

import pytest
from asgiref.sync import sync_to_async

from accounts import usage
from accounts.models import ApiKey
from runners.models import RunRecord
from tests.support.clients import call, connect
from tests.support.scripted_server import Reply

NOW = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)


def record(user, runner="local", prompt=10, completion=5, *, when=None, fallback=False, key=None):
    row = RunRecord.objects.create(
        runner_name=runner,
        status="ok",
        prompt_tokens=prompt,
        completion_tokens=completion,
        fallback=fallback,
        user=user,
        api_key=key,
    )
    if when is not None:  # auto_now_add on create
        RunRecord.objects.filter(pk=row.pk).update(created_at=when)
    return row


def sums(rows) -> dict:
    return {
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "total_tokens": sum(r.prompt_tokens + r.completion_tokens for r in rows),
        "turns": sum(1 for r in rows if not r.fallback),
    }


# ---- the records of real turns -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
@pytest.mark.usefixtures("fresh_process_state", "no_detached_answers")
async def test_each_turn_records_its_user_key_and_tokens(user, scripted_runner, scripted_server):
    key, raw = await sync_to_async(ApiKey.issue)(user, "scripts")
    scripted_server.script(Reply("from the api"))
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    answer = await call("POST", "/v1/chat/completions", key=raw, body=body)
    assert answer.status_code == 200, answer.text

    ws = await connect(user)
    scripted_server.script(Reply("from the browser"))
    await ws.send_json_to({"type": "message", "request_id": "r1", "text": "hello"})
    while True:
        frame = await ws.receive_json_from(timeout=10)
        if frame["type"] == "done":
            break
    await ws.disconnect()

    rows = await sync_to_async(list)(RunRecord.objects.order_by("pk"))
    assert [(r.source, r.user_id, r.api_key_id) for r in rows] == [
        ("api", user.pk, key.pk),
        ("chat", user.pk, None),
    ]
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in rows)
    assert answer.json()["usage"]["completion_tokens"] == rows[0].completion_tokens

    summary = await sync_to_async(usage.user_summary)(user)
    assert summary["today"] == summary["month"] == sums(rows)
    by_key = {k["api_key"]: k["turns"] for k in summary["by_api_key"]}
    assert by_key == {f"scripts ({key.prefix}…)": 1, None: 1}
    listed = await call("GET", "/api/usage", key=raw)
    assert listed.status_code == 200
    assert listed.json()["month"] == sums(rows) and listed.json()["quotas"] == []


# ---- the sums ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.scaleout
def test_periods_runners_and_fallbacks_sum_exactly(user, other_user):
    today = [
        record(user, "local", 100, 20, when=NOW),
        record(user, "remote", 7, 0, when=NOW),  # a failed first attempt...
        record(user, "local", 7, 30, when=NOW, fallback=True),  # ...its fallback: one turn
    ]
    earlier = [record(user, "remote", 50, 50, when=NOW - timedelta(days=3))]
    record(user, "local", 999, 999, when=NOW - timedelta(days=31))  # last month
    record(other_user, "local", 1000, 1000, when=NOW)  # someone else
    summary = usage.user_summary(user, now=NOW)
    assert summary["today"] == sums(today)
    assert summary["today"]["turns"] == 2
    assert summary["month"] == sums(today + earlier)
    assert summary["by_runner"] == [
        {"runner": "local", **sums(today[0::2])},
        {"runner": "remote", **sums([today[1], earlier[0]])},
    ]


@pytest.mark.django_db
def test_the_dashboard_sums_per_user_and_per_group_per_day(user, other_user, django_user_model):
    team = Group.objects.create(name="team")
    user.groups.add(team)
    other_user.groups.add(team)
    a = [
        record(user, "local", 10, 1, when=NOW),
        record(user, "local", 20, 2, when=NOW - timedelta(days=1)),
    ]
    b = [record(other_user, "remote", 30, 3, when=NOW)]
    rows = usage.over_time(NOW - timedelta(days=7), NOW + timedelta(hours=1), "user")
    assert {(r.day.isoformat(), r.who, r.runner, r.totals.total_tokens) for r in rows} == {
        ("2026-11-30", "alice", "local", 11),
        ("2026-11-29", "alice", "local", 22),
        ("2026-11-30", "bob", "remote", 33),
    }
    by_group = usage.over_time(NOW - timedelta(days=7), NOW + timedelta(hours=1), "group")
    total = sum(r.totals.total_tokens for r in by_group)
    assert {r.who for r in by_group} == {"team"}
    assert total == sum(r.prompt_tokens + r.completion_tokens for r in a + b)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("zone", "when", "day"),
    [
        # No daylight saving: one UTC offset over the window (SQLite: date() in SQL).
        ("Asia/Taipei", datetime(2026, 11, 29, 16, 30, tzinfo=UTC), "2026-11-30"),
        ("America/Los_Angeles", datetime(2026, 11, 30, 7, 30, tzinfo=UTC), "2026-11-29"),
        # A window across a daylight-saving change (the zone's own conversion).
        ("Europe/Berlin", datetime(2026, 10, 24, 22, 30, tzinfo=UTC), "2026-10-25"),
    ],
)
def test_the_dashboard_days_are_local_calendar_days(user, settings, zone, when, day):
    from django.utils import timezone as django_timezone

    settings.TIME_ZONE = zone
    record(user, "local", 10, 1, when=when)
    with django_timezone.override(zone):
        rows = usage.over_time(NOW - timedelta(days=60), NOW + timedelta(hours=1), "user")
    assert [(r.day.isoformat(), r.totals.total_tokens) for r in rows] == [(day, 11)]


@pytest.mark.django_db
def test_the_dashboard_page_and_csv_are_for_staff_and_escape_formulas(
    user, admin_user, django_user_model
):
    sneaky = django_user_model.objects.create_user("=HYPERLINK(1)", password="x-password-123")
    record(user, "local", 10, 5)
    record(sneaky, "local", 1, 1)
    staff = Client()
    staff.force_login(admin_user)
    page = staff.get("/admin/usage/?days=7&by=user")
    assert page.status_code == 200
    assert b'data-who="alice"' in page.content
    exported = staff.get("/admin/usage/?days=7&by=user&format=csv")
    assert exported["Content-Type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(exported.content.decode())))
    assert lines[0][:3] == ["day", "user", "runner"]
    assert [line[1:] for line in lines if line[1] == "alice"] == [
        ["alice", "local", "1", "10", "5", "15"]
    ]
    assert any(line[1] == "'=HYPERLINK(1)" for line in lines[1:])
    assert staff.get("/admin/usage/?days=0").status_code == 400
    assert staff.get("/admin/usage/?days=abc").status_code == 400

    member = Client()
    member.force_login(user)
    assert member.get("/admin/usage/").status_code == 302  # to the admin's login
    assert Client().get("/admin/usage/?format=csv").status_code == 302


@pytest.mark.django_db
def test_the_usage_page_shows_today_this_month_and_runners(user):
    record(user, "local", 40, 2)
    browser = Client()
    browser.force_login(user)
    page = browser.get("/settings/usage/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-period="today"' in html and 'data-runner="local"' in html
    assert "<td>42</td>" in html
    assert Client().get("/settings/usage/").status_code == 302
