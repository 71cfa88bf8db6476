"""KV-cache reuse across turns in the local runner (issue 17): a prompt that
extends what a slot's cache holds prefills only its new tokens; an edited,
trimmed or other conversation prefills from where it differs; a seeded
request is prefilled in full. Speed is measured in bench/executorch_runner.py
(`--only multiturn`), not here."""

from __future__ import annotations

import asyncio

import pytest

from runners.base import ChatMessage, ChatRequest
from runners.executorch.runner import common_prefix, forget_engines
from tests.runners.test_executorch_runner import collect, make_runner
from tests.support.fixtures import require_local_model

# Each test starts with the local model's slots free (tests.support.fixtures).
pytestmark = pytest.mark.usefixtures("local_model_idle")


@pytest.fixture
def model_ready():
    require_local_model()
    forget_engines()  # a fresh slot: nothing cached from other tests
    yield
    forget_engines()


def test_common_prefix():
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix(list(range(1000)), [*range(700), -1]) == 700


def _turns(*texts: str) -> tuple[ChatMessage, ...]:
    roles = ("user", "assistant")
    return tuple(ChatMessage(roles[i % 2], t) for i, t in enumerate(texts))


def _ask(runner, messages, **kwargs):
    request = ChatRequest(messages=messages, max_tokens=24, **kwargs)
    text, _, done = asyncio.run(collect(runner, request))
    return text, done, runner._engine.last_reused_tokens


@pytest.mark.slow
def test_a_follow_up_turn_prefills_only_its_new_tokens(model_ready):
    runner = make_runner(repetition_penalty=1.0)
    first = _turns("What is the capital of France?")
    answer, done1, reused = _ask(runner, first)
    assert reused == 0
    follow_up = (
        *_turns("What is the capital of France?", answer),
        ChatMessage("user", "And of Japan?"),
    )
    text, done2, reused = _ask(runner, follow_up)
    # Everything of turn one (prompt and answer) came from the cache.
    assert reused >= done1.usage.prompt_tokens + done1.usage.completion_tokens - 2
    assert reused < done2.usage.prompt_tokens
    assert "Tokyo" in text
    # The same answer as a full prefill (greedy).
    fresh = make_runner(repetition_penalty=1.0, reuse_kv_cache=False)
    same, _, reused = _ask(fresh, follow_up)
    assert reused == 0
    assert same == text


@pytest.mark.slow
def test_an_edited_or_other_conversation_is_prefilled_from_where_it_differs(model_ready):
    runner = make_runner(repetition_penalty=1.0)
    history = _turns("What is the capital of France?", "Paris.", "And of Italy?")
    _, done, _ = _ask(runner, history)
    # An earlier message edited: only the part before the edit is reused.
    edited = _turns("What is the capital of Spain?", "Paris.", "And of Italy?")
    _text, _, reused_edit = _ask(runner, edited)
    engine = runner._engine
    before, after = (engine.encode(engine.render(m)) for m in (history, edited))
    assert reused_edit == common_prefix(before, after)
    assert 0 < reused_edit < done.usage.prompt_tokens - 10
    # Another conversation entirely: at most the chat template's opening is shared.
    other = _turns("Write a haiku about snow.")
    _, _, reused_other = _ask(runner, other)
    assert reused_other <= reused_edit


@pytest.mark.slow
def test_a_seeded_request_is_always_prefilled_in_full(model_ready):
    runner = make_runner()
    question = _turns("Name a colour.")
    _ask(runner, question, temperature=0.8, seed=3)
    text, _, reused = _ask(runner, question, temperature=0.8, seed=3)
    assert reused == 0
    again, _, _ = _ask(runner, question, temperature=0.8, seed=3)
    assert again == text
