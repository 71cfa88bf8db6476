"""Per-runner figures over a time window, computed from `RunRecord` rows.

For the admin dashboard. Computed in Python over the window's rows (a few
numeric columns each), which stays cheap for the volumes one BreezeWeb
instance records in a day; percentiles use linear interpolation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from runners.models import RunnerConfig, RunRecord


@dataclass(frozen=True)
class RunnerStats:
    """One runner's figures over one window. Latency percentiles and tokens/s
    are over successful attempts; TTFT over attempts that produced a token."""

    runner: str
    requests: int
    ok: int
    failed: int
    stopped: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p50_ttft_ms: float | None
    mean_tokens_per_second: float | None
    as_fallback: int
    failed_before_first_token: int


# What the figures are computed from: one row per run, only these columns.
RECORD_FIELDS = (
    "runner_name",
    "status",
    "fallback",
    "total_ms",
    "time_to_first_token_ms",
    "tokens_per_second",
)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of `values`, linearly interpolated; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def runner_stats(since: datetime, until: datetime | None = None) -> list[RunnerStats]:
    """Figures for every configured runner (even idle ones) and every runner
    name found in the window, ordered like the router: priority, then name."""
    rows = RunRecord.objects.filter(created_at__gte=since)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    by_runner: dict[str, list[tuple]] = defaultdict(list)
    for row in rows.values_list(*RECORD_FIELDS).iterator(chunk_size=2000):
        by_runner[row[0]].append(row[1:])
    names = list(RunnerConfig.objects.order_by("-priority", "name").values_list("name", flat=True))
    names += sorted(set(by_runner) - set(names))
    return [_summarise(name, by_runner.get(name, [])) for name in names]


def _summarise(name: str, rows: list[tuple]) -> RunnerStats:
    ok = [r for r in rows if r[0] == RunRecord.Status.OK]
    failed = [r for r in rows if r[0] == RunRecord.Status.FAILED]
    speeds = [r[4] for r in ok if r[4] is not None]
    return RunnerStats(
        runner=name,
        requests=len(rows),
        ok=len(ok),
        failed=len(failed),
        stopped=sum(1 for r in rows if r[0] == RunRecord.Status.STOPPED),
        error_rate=len(failed) / len(rows) if rows else None,
        p50_ms=percentile([r[2] for r in ok if r[2] is not None], 50),
        p95_ms=percentile([r[2] for r in ok if r[2] is not None], 95),
        p50_ttft_ms=percentile([r[3] for r in rows if r[3] is not None], 50),
        mean_tokens_per_second=sum(speeds) / len(speeds) if speeds else None,
        as_fallback=sum(1 for r in rows if r[1]),
        failed_before_first_token=sum(1 for r in failed if r[3] is None),
    )
