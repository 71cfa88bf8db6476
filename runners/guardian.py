"""The guardian: admin-managed content rules on input and on streamed output.

Rule kinds (one `GuardianRule` row each):
- `max_length`   input longer than N characters is refused.
- `block_term`   a term (case-insensitive, whole words) refuses input / stops output.
- `block_pattern` a regular expression, likewise.
- `mask_term`    a term in output is replaced by a mask, even split across tokens.
- `mask_pattern` a regular expression in output, likewise.

Output is filtered with a small look-behind buffer: text is held back only as
long as it could still be the start of a match, so streaming stays smooth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from channels.db import database_sync_to_async

from core import generation
from runners.models import GuardianRule

MASK = "[masked]"
# How far back a pattern match may reach across token boundaries. Longer
# matches that straddle a flush point are still caught when they arrive whole
# inside one window; documented in docs/runners.md.
PATTERN_WINDOW = 48


class GuardianBlocked(Exception):
    """Content refused by a rule. `message` is safe to show to the user."""

    def __init__(self, message: str, rule: str, where: str) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.where = where


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    value: str
    applies_to: str
    message: str

    def regex(self) -> re.Pattern[str]:
        if self.kind in {"block_term", "mask_term"}:
            return re.compile(rf"(?<!\w){re.escape(self.value)}(?!\w)", re.IGNORECASE)
        return re.compile(self.value, re.IGNORECASE)

    def user_message(self, where: str) -> str:
        if self.message:
            return self.message
        if where == "input":
            return f"Your message was refused by the content rule {self.name!r}."
        return f"The answer was stopped by the content rule {self.name!r}."


def enabled_rules() -> tuple[Rule, ...]:
    """The enabled rules (memoized per process until any rule changes, in any
    process: an admin's edit applies to the next turn)."""
    return generation.memo("guardian.rules", _read_rules)


def _read_rules() -> tuple[Rule, ...]:
    return tuple(
        Rule(r.name, r.kind, r.value, r.applies_to, r.message)
        for r in GuardianRule.objects.filter(enabled=True)
    )


load_rules = database_sync_to_async(enabled_rules)


def _applies(rule: Rule, where: str) -> bool:
    return rule.applies_to in (where, "both")


def check_input(text: str, rules: tuple[Rule, ...]) -> None:
    """Raise GuardianBlocked when `text` breaks an input rule."""
    for rule in rules:
        if not _applies(rule, "input"):
            continue
        if rule.kind == "max_length":
            limit = int(rule.value)
            if len(text) > limit:
                raise GuardianBlocked(
                    rule.message
                    or f"Your message is {len(text)} characters long; the limit is {limit}.",
                    rule.name,
                    "input",
                )
        elif rule.kind in {"block_term", "block_pattern"} and rule.regex().search(text):
            raise GuardianBlocked(rule.user_message("input"), rule.name, "input")


class OutputFilter:
    """Streaming-safe output rules: `feed(delta)` returns the text that is safe
    to show now; `finish()` returns the rest. Both raise GuardianBlocked when a
    block rule matches (what was already shown stays shown)."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        out = [r for r in rules if _applies(r, "output") and r.kind != "max_length"]
        self._block = [(r, r.regex()) for r in out if r.kind.startswith("block_")]
        self._mask = [(r, r.regex()) for r in out if r.kind.startswith("mask_")]
        hold = 0
        for rule, _ in self._block + self._mask:
            hold = max(hold, len(rule.value) if rule.kind.endswith("_term") else PATTERN_WINDOW)
        self._hold = hold
        self._pending = ""

    @property
    def active(self) -> bool:
        return bool(self._block or self._mask)

    def _apply(self, text: str) -> str:
        for rule, regex in self._block:
            if regex.search(text):
                raise GuardianBlocked(rule.user_message("output"), rule.name, "output")
        for _, regex in self._mask:
            text = regex.sub(MASK, text)
        return text

    def feed(self, delta: str) -> str:
        if not self.active:
            return delta
        self._pending = self._apply(self._pending + delta)
        if len(self._pending) <= self._hold:
            return ""
        cut = len(self._pending) - self._hold
        # Never cut inside a mask we just inserted, nor inside a word that a
        # whole-word rule could still match once the next token arrives.
        while cut > 0 and self._pending[cut - 1].isalnum() and self._pending[cut].isalnum():
            cut -= 1
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return ready

    def finish(self) -> str:
        rest, self._pending = self._apply(self._pending), ""
        return rest
