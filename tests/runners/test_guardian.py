"""Guardian rules on input and on streamed output."""

from __future__ import annotations

import pytest

from runners.guardian import MASK, GuardianBlocked, OutputFilter, Rule, check_input, load_rules
from runners.models import GuardianRule


def rule(kind, value, applies_to="both", message="", name="r"):
    return Rule(name, kind, value, applies_to, message)


def stream_through(filter_: OutputFilter, pieces: list[str]) -> str:
    shown = "".join(filter_.feed(p) for p in pieces)
    return shown + filter_.finish()


def test_it_refuses_input_over_the_maximum_length_with_the_numbers():
    with pytest.raises(GuardianBlocked) as info:
        check_input("x" * 11, (rule("max_length", "10"),))
    assert "11 characters" in info.value.message and "10" in info.value.message


def test_it_refuses_a_blocked_term_with_the_rules_message_case_insensitively():
    rules = (rule("block_term", "project falcon", message="Falcon is confidential."),)
    with pytest.raises(GuardianBlocked) as info:
        check_input("Tell me about PROJECT Falcon please", rules)
    assert info.value.message == "Falcon is confidential."
    check_input("falconry is a hobby", rules)  # whole words only


def test_it_refuses_input_matching_a_pattern():
    with pytest.raises(GuardianBlocked):
        check_input("my card is 4111-1111-1111-1111", (rule("block_pattern", r"\d{4}(-\d{4}){3}"),))


def test_output_only_rules_do_not_touch_input():
    text = "the secret word"
    with pytest.raises(GuardianBlocked):  # the same rule on input refuses it
        check_input(text, (rule("block_term", "secret", applies_to="input"),))
    assert check_input(text, (rule("block_term", "secret", applies_to="output"),)) is None


def test_it_masks_a_term_split_across_streamed_tokens():
    f = OutputFilter((rule("mask_term", "hunter2"),))
    pieces = ["The pass", "word is hun", "ter", "2, keep it", " safe."]
    assert stream_through(f, pieces) == f"The password is {MASK}, keep it safe."


def test_it_masks_a_pattern_split_across_tokens():
    f = OutputFilter((rule("mask_pattern", r"\b\d{3}-\d{2}-\d{4}\b"),))
    pieces = ["SSN: 12", "3-4", "5-67", "89 end"]
    assert stream_through(f, pieces) == f"SSN: {MASK} end"


def test_it_keeps_streaming_smooth_by_holding_back_only_a_little():
    f = OutputFilter((rule("mask_term", "zebra"),))
    shown = [f.feed(w + " ") for w in ["one", "two", "three", "four", "five", "six", "seven"]]
    assert "".join(shown).startswith("one two three four five")
    assert len("".join(shown)) >= len("one two three four five six seven ") - len("zebra") - 6


def test_a_block_rule_stops_the_output_even_when_split():
    f = OutputFilter((rule("block_term", "launch codes"),))
    f.feed("here are the laun")
    with pytest.raises(GuardianBlocked) as info:
        f.feed("ch codes: 0000")
    assert info.value.where == "output"


def test_with_no_output_rules_text_passes_through_at_once():
    f = OutputFilter((rule("max_length", "5"),))
    assert f.feed("hello world") == "hello world"


@pytest.mark.django_db(transaction=True)
@pytest.mark.scaleout
async def test_only_enabled_rules_are_loaded():
    from asgiref.sync import sync_to_async

    await sync_to_async(GuardianRule.objects.create)(
        name="on", kind="block_term", value="x", enabled=True
    )
    await sync_to_async(GuardianRule.objects.create)(
        name="off", kind="block_term", value="y", enabled=False
    )
    assert [r.name for r in await load_rules()] == ["on"]


@pytest.mark.django_db
def test_an_invalid_pattern_is_a_clear_form_error():
    from django.core.exceptions import ValidationError

    bad = GuardianRule(name="bad", kind="block_pattern", value="([a-z")
    with pytest.raises(ValidationError) as info:
        bad.full_clean()
    assert "Not a valid regular expression" in str(info.value)
