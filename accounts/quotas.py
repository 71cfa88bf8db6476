"""Quotas: budgets of tokens or messages per day or month, per user or per
group (its members together), on every runner or on one (`Quota`,
docs/teams.md). Checked before a turn starts, by both interfaces:

- **Messages on every runner** are counted by the exact limiter
  (`accounts.limits.hit_many`: one Redis Lua script with `REDIS_URL`, so the
  boundary holds across processes): a turn is admitted only when every one
  of the user's message budgets has room, and then counted in all of them.
  A calendar period is one limiter key (the period's first day is in it),
  with a window longer than the period, so nothing leaves it early.
- **Tokens, and messages on one runner** are held, then recorded: once the
  router has chosen a runner and fitted the prompt, `reserve` holds an upper
  bound of what the answer may spend (the prompt's tokens + its
  `max_tokens`, lowered to what is left; one message on a per-runner message
  budget) in every budget it counts in, admitted only when recorded use
  (RunRecords, summed in SQL) plus every hold in flight leaves room
  (`accounts.limits.reserve`: atomic across processes with `REDIS_URL`).
  The router gives the hold back once the attempt's record is saved, so the
  record takes its place: concurrent turns never spend past a budget.
  Before that, `charge` refuses a turn whose token budgets are already
  spent, and `within_budget` leaves out of the router's candidates a runner
  whose budget is spent (`auto` picks another; a turn pinned to it is
  refused).

Over budget raises `QuotaExceeded`: the `quota_exceeded` error (429 over
HTTP, an `error` frame on the websocket) saying what is left and when it
starts over.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import Count, F, Q, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts import limits, usage
from accounts.models import Quota
from core import generation
from runners.base import NotAdmitted
from runners.models import RunRecord

# Limiter windows: longer than any day (daylight saving) or month, so a
# period's count never expires before the period ends.
_WINDOW_S = {Quota.Period.DAY: 25 * 3600, Quota.Period.MONTH: 32 * 86400}
# How long a turn's hold outlives a process that died holding it.
HOLD_TTL_S = 3600
# Reads of the records a reservation retries when turns end meanwhile.
_RESERVE_ATTEMPTS = 100


@dataclass(frozen=True)
class QuotaStatus:
    """Where one budget stands for one user."""

    quota_id: int
    metric: str  # tokens | messages
    period: str  # day | month
    scope: str  # user | group
    group: str | None
    runner: str | None
    limit: int
    used: int
    resets_at: datetime

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def reset_in(self, now: datetime | None = None) -> int:
        """Whole seconds until the period starts over."""
        return max(1, math.ceil((self.resets_at - (now or timezone.now())).total_seconds()))

    @property
    def label(self) -> str:
        metric = _("tokens") if self.metric == Quota.Metric.TOKENS else _("messages")
        period = _("today") if self.period == Quota.Period.DAY else _("this month")
        whose = _("group %(name)s") % {"name": self.group} if self.group else _("your")
        text = f"{whose} {metric} {period}"
        if self.runner:
            text += " " + _("on %(runner)s") % {"runner": self.runner}
        return text

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "period": self.period,
            "scope": self.scope,
            "group": self.group,
            "runner": self.runner,
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resets_at": self.resets_at.isoformat(),
            "reset_in_s": self.reset_in(),
        }


class QuotaExceeded(NotAdmitted):
    """A turn refused because a budget is spent."""

    code = "quota_exceeded"

    def __init__(self, status: QuotaStatus) -> None:
        self.status = status
        self.retry_after = status.reset_in()
        self.message = _(
            "Quota reached: %(label)s (%(used)s of %(limit)s used, %(remaining)s left). "
            "It starts over at %(when)s UTC, in %(seconds)s s."
        ) % {
            "label": status.label,
            "used": status.used,
            "limit": status.limit,
            "remaining": status.remaining,
            "when": status.resets_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            "seconds": self.retry_after,
        }
        super().__init__(self.message)

    def details(self) -> dict:
        return {"quota": self.status.as_dict()}


def _period(period: str, now: datetime) -> tuple[datetime, datetime]:
    if period == Quota.Period.DAY:
        return usage.start_of_day(now), usage.next_day(now)
    return usage.start_of_month(now), usage.next_month(now)


def quotas_of(user) -> list[Quota]:
    """Every quota that holds `user`: their own and their groups' (memoized
    per process until a quota or a group membership changes, in any process;
    the Quota objects are shared: read them, never change them)."""

    def read() -> list[Quota]:
        mine = Q(user=user) | Q(group__in=user.groups.values("pk"))
        return list(Quota.objects.filter(mine).select_related("group", "runner").order_by("pk"))

    return generation.memo(("quotas", user.pk), read)


def _records(quota: Quota, user, since: datetime):
    rows = RunRecord.objects.filter(created_at__gte=since)
    rows = rows.filter(user__groups=quota.group_id) if quota.group_id else rows.filter(user=user)
    if quota.runner_id:
        rows = rows.filter(runner_id=quota.runner_id)
    return rows


def _recorded(quota: Quota, user, since: datetime) -> int:
    """Tokens, or answered turns, recorded for this quota since `since` (SQL)."""
    rows = _records(quota, user, since)
    if quota.metric == Quota.Metric.TOKENS:
        total = Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), Value(0))
        return rows.aggregate(n=total)["n"]
    answered = ~Q(status=RunRecord.Status.FAILED)
    return rows.aggregate(n=Count("pk", filter=answered))["n"]


def _counted_by_limiter(quota: Quota) -> bool:
    return quota.metric == Quota.Metric.MESSAGES and not quota.runner_id


def _window(quota: Quota, start: datetime) -> limits.Window:
    return (f"quota:{quota.pk}:{start:%Y%m%d}", quota.limit, _WINDOW_S[quota.period])


def _status(quota: Quota, used: int, resets_at: datetime) -> QuotaStatus:
    return QuotaStatus(
        quota_id=quota.pk,
        metric=quota.metric,
        period=quota.period,
        scope="group" if quota.group_id else "user",
        group=quota.group.name if quota.group_id else None,
        runner=quota.runner.name if quota.runner_id else None,
        limit=quota.limit,
        used=used,
        resets_at=resets_at,
    )


def status(user, now: datetime | None = None) -> list[QuotaStatus]:
    """Every budget of `user` as it stands (nothing counted)."""
    now = now or timezone.now()
    out, counted = [], []
    for quota in quotas_of(user):
        start, end = _period(quota.period, now)
        if _counted_by_limiter(quota):
            counted.append((quota, start, end))
        else:
            out.append(_status(quota, _recorded(quota, user, start), end))
    decisions = limits.peek([_window(q, start) for q, start, _end in counted])
    for (quota, _start, end), decision in zip(counted, decisions, strict=True):
        out.append(_status(quota, quota.limit - decision.remaining, end))
    return sorted(out, key=lambda s: s.quota_id)


def charge(user, now: datetime | None = None) -> list[QuotaStatus]:
    """Admit one turn of `user` against their budgets on every runner, or
    raise QuotaExceeded (nothing counted then). The turn counts against every
    message budget at once (atomically, across processes). Returns the
    budgets as they stand after it: the API's X-RateLimit-* headers."""
    now = now or timezone.now()
    checked, counted = [], []
    for quota in quotas_of(user):
        if quota.runner_id:
            continue  # per-runner budgets: `within_budget`, once candidates are known
        start, end = _period(quota.period, now)
        if _counted_by_limiter(quota):
            counted.append((quota, start, end))
            continue
        state = _status(quota, _recorded(quota, user, start), end)
        if state.spent:
            raise QuotaExceeded(state)
        checked.append(state)
    decisions = limits.hit_many([_window(q, start) for q, start, _end in counted])
    states = [
        _status(quota, quota.limit - d.remaining, end)
        for (quota, _start, end), d in zip(counted, decisions, strict=True)
    ]
    for state, decision in zip(states, decisions, strict=True):
        if not decision.allowed:
            raise QuotaExceeded(state)
    return checked + states


def within_budget(
    user, candidates: list, now: datetime | None = None, budgets: list[Quota] | None = None
) -> list:
    """The runner configs among `candidates` whose per-runner budgets for
    `user` are not spent. Raises QuotaExceeded when that leaves none.
    `user=None` (a trusted caller, like the router's) has no budgets.
    `budgets`: the user's quotas when the caller read them already."""
    if user is None:
        return candidates
    now = now or timezone.now()
    spent: dict[int, QuotaStatus] = {}
    for quota in quotas_of(user) if budgets is None else budgets:
        if not quota.runner_id or quota.runner_id in spent:
            continue
        start, end = _period(quota.period, now)
        state = _status(quota, _recorded(quota, user, start), end)
        if state.spent:
            spent[quota.runner_id] = state
    kept = [c for c in candidates if c.pk not in spent]
    if candidates and not kept:
        raise QuotaExceeded(spent[candidates[0].pk])
    return kept


@dataclass
class Hold:
    """One attempt's hold on its budgets (`reserve`). `max_tokens`: the
    answer's cap when a token budget lowered it to what is left."""

    keys: tuple[str, ...] = ()
    member: str = ""
    max_tokens: int | None = None
    released: bool = False

    def release(self) -> None:
        """Give the hold back: call once the attempt's record is saved."""
        if not self.released and self.keys:
            limits.release(self.keys, self.member, HOLD_TTL_S)
        self.released = True


def reserve(
    user,
    runner_id: int,
    prompt_tokens: Callable[[], int],
    max_tokens: int,
    now: datetime | None = None,
    budgets: list[Quota] | None = None,
) -> Hold:
    """Hold what an answer of runner `runner_id` may spend in every budget of
    `user` it counts in: its tokens budgets (all runners' and this one's) and
    this runner's message budgets; the all-runner message budgets were
    counted by `charge`. Tokens: `prompt_tokens()` + `max_tokens`, lowered to
    what every token budget has left, at least the prompt and one token of
    answer (`Hold.max_tokens` is then the answer's cap). Raises QuotaExceeded
    when a budget has no room; nothing is held then. `budgets`: the user's
    quotas when the caller read them already (this turn's)."""
    now = now or timezone.now()
    held = [
        (quota, *_period(quota.period, now))
        for quota in (quotas_of(user) if budgets is None else budgets)
        if quota.runner_id in (None, runner_id) and not _counted_by_limiter(quota)
    ]
    if not held:
        return Hold()
    tokens = any(q.metric == Quota.Metric.TOKENS for q, _start, _end in held)
    prompt = prompt_tokens() if tokens else 0
    keys = tuple(_window(quota, start)[0] for quota, start, _end in held)
    member = uuid.uuid4().hex
    for _attempt in range(_RESERVE_ATTEMPTS):
        gens = limits.generations(keys)
        budgets = [
            (key, _recorded(quota, user, start), quota.limit, quota.metric == Quota.Metric.TOKENS)
            for key, (quota, start, _end) in zip(keys, held, strict=True)
        ]
        found = limits.reserve(
            budgets,
            member,
            need=prompt + 1,
            want=prompt + max_tokens,
            generations=gens,
            ttl_s=HOLD_TTL_S,
        )
        if found.outcome == "ok":
            return Hold(keys, member, found.grant - prompt if tokens else None)
        if found.outcome == "full":
            quota, _start, end = held[found.index]
            raise QuotaExceeded(_status(quota, found.used, end))
        time.sleep(0.001)  # stale: a turn ended meanwhile; read the records again
    quota, start, end = held[0]
    raise QuotaExceeded(_status(quota, _recorded(quota, user, start), end))


def headers(states: list[QuotaStatus]) -> dict[str, str]:
    """`X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens}`: the tightest
    budget of each kind (fewest left), `Reset` in seconds."""
    out: dict[str, str] = {}
    for metric, name in ((Quota.Metric.MESSAGES, "Requests"), (Quota.Metric.TOKENS, "Tokens")):
        mine = [s for s in states if s.metric == metric and not s.runner]
        if not mine:
            continue
        tightest = min(mine, key=lambda s: (s.remaining, s.resets_at))
        out[f"X-RateLimit-Limit-{name}"] = str(tightest.limit)
        out[f"X-RateLimit-Remaining-{name}"] = str(tightest.remaining)
        out[f"X-RateLimit-Reset-{name}"] = str(tightest.reset_in())
    return out


def reset(quota: Quota, now: datetime | None = None) -> None:
    """Forget the current period's message count and holds of `quota`
    (tests, or an admin giving someone a fresh start)."""
    start, _end = _period(quota.period, now or timezone.now())
    key, _limit, window_s = _window(quota, start)
    limits.reset(key, window_s)
    limits.reset_holds(key)
