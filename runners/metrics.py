"""Prometheus metrics for runner attempts (exposed at /metrics).

Labels are runner names and outcomes only: never prompts, users or keys.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "breezeweb_runner_requests_total",
    "Runner attempts by runner and outcome.",
    ["runner", "status", "error_code"],
)
FALLBACKS = Counter(
    "breezeweb_runner_fallbacks_total",
    "Attempts that failed before the first token and passed the request on.",
    ["runner"],
)
LATENCY = Histogram(
    "breezeweb_runner_duration_seconds",
    "Total time of a runner attempt.",
    ["runner"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
TTFT = Histogram(
    "breezeweb_runner_time_to_first_token_seconds",
    "Time to the first token.",
    ["runner"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
TOKENS = Histogram(
    "breezeweb_runner_completion_tokens",
    "Completion tokens per attempt.",
    ["runner"],
    buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)


def observe_attempt(
    runner: str,
    status: str,
    error_code: str = "",
    *,
    total_s: float | None = None,
    ttft_s: float | None = None,
    completion_tokens: int | None = None,
    fell_back: bool = False,
) -> None:
    REQUESTS.labels(runner, status, error_code or "").inc()
    if fell_back:
        FALLBACKS.labels(runner).inc()
    if total_s is not None:
        LATENCY.labels(runner).observe(total_s)
    if ttft_s is not None:
        TTFT.labels(runner).observe(ttft_s)
    if completion_tokens:
        TOKENS.labels(runner).observe(completion_tokens)
