"""The loop guard (runners.loopguard): an answer that repeats itself is ended
with finish_reason "loop" and a notice, on every runner kind (the router is
where every kind passes); legitimate repetition (lists, code, tables, a short
repetition asked for) is never cut."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from hypothesis import given, settings
from hypothesis import strategies as st

from runners import registry
from runners.base import ChatMessage, ChatRequest, Done, Notice, TokenDelta
from runners.loopguard import LoopGuard, LoopSettings, find_cycle, loop_settings
from runners.models import RunnerConfig, RunRecord
from runners.router import circuits, route
from tests.runners.test_runner_contract import HARNESSES
from tests.support.scripted_server import Reply

LOOP = "The lighthouse was built by Margaret Ostrow, or light-towered, " + (
    "or light-towered, " * 60
)


def guarded(text: str, settings: LoopSettings | None = None, piece: int = 3) -> str | None:
    """Feed `text` in small pieces, as a stream arrives; the unit if it loops."""
    guard = LoopGuard(settings)
    for i in range(0, len(text), piece):
        if guard.feed(text[i : i + piece]):
            return guard.unit
    return None


# ---- the detector ----------------------------------------------------------------------


def test_the_readme_loop_is_caught_soon_after_it_starts():
    guard = LoopGuard()
    fed = ""
    for i in range(0, len(LOOP), 3):
        fed += LOOP[i : i + 3]
        if guard.feed(LOOP[i : i + 3]):
            break
    assert guard.unit is not None
    assert guard.unit.strip() in {"or light-towered,", "light-towered, or"} or (
        "light-towered" in guard.unit
    )
    # Caught within about min_chars of repetition, not at max_tokens.
    assert len(fed) < 64 + 200 + 40


def test_a_repeated_sentence_is_a_loop():
    sentence = "The answer is in the documents you uploaded earlier today. "
    assert guarded("Let me see. " + sentence * 6) is not None


@pytest.mark.parametrize(
    "text",
    [
        # A numbered list of similar items.
        "".join(f"{i}. Buy {item} at the market.\n" for i, item in enumerate(["milk"] * 40, 1)),
        # A markdown table: separator and similar rows.
        "| name | city | year |\n|------|------|------|\n"
        + "".join(f"| Ana {i} | Oslo | {1990 + i} |\n" for i in range(30)),
        # Code: similar lines with different names and numbers.
        "```python\n" + "".join(f"    total_{i} = values[{i}] * 2\n" for i in range(30)) + "```\n",
        # Data in a code block: a matrix of zeros.
        "```python\ngrid = [\n" + "    [0, 0, 0, 0, 0, 0, 0, 0],\n" * 16 + "]\n```\n",
        # A short repetition a user asked for.
        "Sure: " + "hello " * 20,
        # Rules and indentation: one repeated character.
        "Title\n" + "=" * 300 + "\n" + " " * 200 + "end",
        # Prose with no repetition at all.
        "Ilse Varga designed the bridge in 1921; it opened two years later. " * 1
        + "It spans the Lenna river and carries trams.",
    ],
)
def test_legitimate_repetition_is_never_cut(text):
    assert guarded(text) is None
    assert find_cycle(text, LoopSettings()) is None or "```" in text


def naive_cycle(text: str, s: LoopSettings, factor: int = 1) -> str | None:
    """The definition of a loop, checked period by period (find_cycle's spec)."""
    n, min_chars = len(text), s.min_chars * factor
    if n < min_chars:
        return None
    for period in range(1, min(s.max_period, n // s.min_repeats) + 1):
        window = max(min_chars, s.min_repeats * period)
        if window > n:
            break
        tail = text[-window:]
        unit = tail[-period:]
        if tail[period:] == tail[:-period] and unit.strip() and len(set(unit)) > 1:
            return unit
    return None


@settings(max_examples=400, deadline=None)
@given(
    prefix=st.text(alphabet="ab c\n", max_size=60),
    unit=st.text(alphabet="ab c\n", min_size=1, max_size=12),
    repeats=st.integers(0, 40),
    suffix=st.text(alphabet="ab c", max_size=6),
    min_repeats=st.integers(2, 6),
    min_chars=st.integers(8, 60),
    max_period=st.integers(1, 30),
    factor=st.sampled_from([1, 4]),
)
def test_find_cycle_finds_what_the_definition_finds(
    prefix, unit, repeats, suffix, min_repeats, min_chars, max_period, factor
):
    """The fast search (candidate periods from where the answer's end stands
    again) answers exactly as comparing every period would."""
    text = prefix + unit * repeats + suffix
    s = LoopSettings(min_repeats=min_repeats, min_chars=min_chars, max_period=max_period)
    assert find_cycle(text, s, factor) == naive_cycle(text, s, factor)


def test_settings_come_from_extra_params_and_can_turn_it_off():
    assert loop_settings({}) == LoopSettings()
    assert loop_settings({"loop_guard": False}).enabled is False
    assert loop_settings({"loop_guard": {"min_repeats": 8}}).min_repeats == 8
    assert guarded(LOOP, LoopSettings(enabled=False)) is None
    # Stricter: a repetition needs to be longer before it counts.
    assert guarded("Hi. " + "or light-towered, " * 12, LoopSettings(min_chars=400)) is None
    assert guarded("Hi. " + "or light-towered, " * 12) is not None


@pytest.mark.django_db
def test_the_admin_refuses_a_bad_loop_guard_setting():
    from django.core.exceptions import ValidationError

    config = RunnerConfig(name="x", kind="executorch", extra_params={"loop_guard": {"min": 1}})
    with pytest.raises(ValidationError, match="loop_guard has no setting 'min'"):
        config.full_clean()
    config.extra_params = {"loop_guard": {"min_repeats": 1}}
    with pytest.raises(ValidationError, match="min_repeats must be a whole number from 2"):
        config.full_clean()


# ---- every kind, through the router ----------------------------------------------------


class LoopingHarnesses:
    """How to make each kind loop for real."""

    @staticmethod
    def executorch(harness) -> dict:
        # Force one token: the real model then writes " la la la ...".
        from django.conf import settings

        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(settings.MODELS_DIR / "tokenizer.json"))
        (token,) = tokenizer.encode(" la", add_special_tokens=False).ids
        return {"logit_bias": {str(token): 100}, "repetition_penalty": 1.0}

    @staticmethod
    def llamastack(harness) -> dict:
        harness.server.default_reply = Reply(text=LOOP, token_delay=0.002)
        return {"retries": 0}


@pytest.fixture(
    params=[pytest.param(kind, marks=harness.marks) for kind, harness in HARNESSES.items()]
)
def harness(request, scripted_server):
    circuits.reset()
    registry.forget_all()
    yield HARNESSES[request.param](scripted_server)
    registry.forget_all()


@database_sync_to_async
def _save(config: RunnerConfig) -> RunnerConfig:
    config.save()
    return config


async def _route(request: ChatRequest, config: RunnerConfig):
    text, notices, done = "", [], None
    async for event in route(request, candidates=[config]):
        if isinstance(event, TokenDelta):
            text += event.text
        elif isinstance(event, Notice):
            notices.append(event)
        elif isinstance(event, Done):
            done = event
    return text, notices, done


@pytest.mark.django_db(transaction=True)
async def test_every_kind_stops_a_looping_answer_with_a_notice(harness):
    extra = getattr(LoopingHarnesses, harness.kind)(harness)
    config = await _save(harness.config(extra_params=extra, max_tokens=400))
    request = ChatRequest(messages=(ChatMessage("user", "Sing."),), temperature=0.0)
    text, notices, done = await _route(request, config)
    assert done.finish_reason == "loop"
    assert [n.code for n in notices] == ["loop"]
    assert "repeating" in notices[0].message
    assert 0 < done.usage.completion_tokens < 200  # not run to max_tokens
    assert len(text) < 800
    assert await database_sync_to_async(RunRecord.objects.filter(status="ok").count)() == 1

    # Turned off for this runner: the same answer runs to its end.
    config.extra_params = {**extra, "loop_guard": False}
    config.max_tokens = 150 if harness.kind == "executorch" else 400
    config = await _save(config)
    registry.forget_all()
    text, notices, done = await _route(request, config)
    assert done.finish_reason in {"length", "stop"}
    # (A "queued" notice is possible: the stopped generation may still be
    # freeing the local model's slot.)
    assert "loop" not in [n.code for n in notices]
