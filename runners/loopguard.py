"""The loop guard: ends an answer that has started repeating itself.

Small models, greedy or not, sometimes fall into a cycle ("or light-towered,
or light-towered, ...") and repeat it until `max_tokens`. The router feeds
every runner's text through a `LoopGuard` (all kinds pass there); when the
tail of the answer is one unit repeated, the router stops the runner and ends
the answer with `finish_reason="loop"` and a `loop` notice.

What counts as a loop: the answer ends with a unit of `1..max_period`
characters repeated back to back (exactly) at least `min_repeats` times and
over at least `min_chars` characters. Legitimate repetition is not exact and
back to back for that long: list items and table rows differ in their text,
code lines differ in names and numbers, and a short repetition a user asked
for ("say hello 5 times") stays under `min_chars`. A unit made only of
whitespace or of one repeated character (indentation, `-----` rules, table
separators) never counts.

Configurable per runner in `RunnerConfig.extra_params["loop_guard"]`:
`false` turns it off; an object overrides any of `min_repeats`, `min_chars`,
`max_period`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runners.base import Notice, NoticeCode


@dataclass(frozen=True)
class LoopSettings:
    enabled: bool = True
    min_repeats: int = 4
    min_chars: int = 200
    max_period: int = 400


LIMITS = {"min_repeats": (2, 1000), "min_chars": (8, 100_000), "max_period": (1, 10_000)}


def settings_problem(value: Any) -> str | None:
    """What is wrong with an extra_params `loop_guard` value, or None."""
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, dict):
        return 'loop_guard must be true, false or an object such as {"min_repeats": 4}'
    for key, number in value.items():
        if key == "enabled":
            if not isinstance(number, bool):
                return "loop_guard.enabled must be true or false"
            continue
        if key not in LIMITS:
            return f"loop_guard has no setting {key!r} (known: enabled, {', '.join(LIMITS)})"
        low, high = LIMITS[key]
        if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
            return f"loop_guard.{key} must be a whole number from {low} to {high}"
    return None


def loop_settings(extra: Any) -> LoopSettings:
    """The guard's settings from a config's extra_params (invalid values,
    which the admin refuses, fall back to the defaults)."""
    value = extra.get("loop_guard") if isinstance(extra, dict) else None
    if value is None or settings_problem(value):
        return LoopSettings()
    if isinstance(value, bool):
        return LoopSettings(enabled=value)
    return LoopSettings(**value)


class LoopGuard:
    """Watches an answer's text as it grows. `feed(text)` returns the
    repeating unit once the answer is looping, else None."""

    # Re-check only after this many new characters (the check is ~O(max_period
    # * window) character comparisons, done in C by str slicing).
    CHECK_EVERY = 8
    CODE_FACTOR = 4

    def __init__(self, settings: LoopSettings | None = None) -> None:
        self.settings = settings or LoopSettings()
        self._text = ""
        self._unchecked = 0
        self.unit: str | None = None

    def feed(self, text: str) -> str | None:
        if not self.settings.enabled or self.unit is not None:
            return self.unit
        self._text += text
        self._unchecked += len(text)
        if self._unchecked < self.CHECK_EVERY:
            return None
        self._unchecked = 0
        unit = find_cycle(self._text, self.settings)
        if unit is not None and self._text.count("```") % 2:
            # In a code block: only a much longer repetition is a loop.
            unit = find_cycle(self._text, self.settings, self.CODE_FACTOR)
        self.unit = unit
        return self.unit


def find_cycle(text: str, settings: LoopSettings, factor: int = 1) -> str | None:
    """The unit `text` ends with, repeated per `settings` (its minimum
    length times `factor`), or None: the shortest period `p` (1..max_period)
    whose window, `max(min_chars, min_repeats * p)` characters, is the unit
    repeated (`tail[p:] == tail[:-p]`), skipping whitespace-only and
    single-character units.

    The answer's last `probe` characters must then stand again `p` characters
    earlier, so the periods worth comparing are where they stand again: one
    `rfind` each (in C), a handful in ordinary text, instead of slicing and
    comparing the window for every period (this runs on every runner's token
    stream, every CHECK_EVERY characters)."""
    n = len(text)
    min_chars = settings.min_chars * factor
    if n < min_chars:
        return None
    repeats = settings.min_repeats
    top = min(settings.max_period, n // repeats)
    # Every window is at least `probe` characters longer than its period
    # (window - p >= max(min_chars - p, (repeats - 1) * p)), so a period's
    # window always covers the probe and its copy.
    probe_length = max(1, min(32, min_chars * (repeats - 1) // repeats))
    probe = text[n - probe_length :]
    start = max(0, n - probe_length - top)
    end = n - 1  # the copy ends at least one character before the end
    while True:
        at = text.rfind(probe, start, end)
        if at < 0:
            return None
        period = n - probe_length - at
        end = at + probe_length - 1
        window = max(min_chars, repeats * period)
        if window > n:
            return None
        tail = text[n - window :]
        if tail[period:] != tail[:-period]:
            continue
        unit = tail[-period:]
        if not unit.strip() or len(set(unit)) == 1:
            continue
        return unit


def loop_notice(unit: str) -> Notice:
    shown = unit.strip()
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return Notice(
        code=NoticeCode.LOOP,
        message="The answer started repeating itself, so it was stopped there.",
        data={"unit": shown},
    )
