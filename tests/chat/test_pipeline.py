"""Prompt fitting: history and RAG context within the chosen runner's budget."""

from __future__ import annotations

import pytest

from chat.pipeline import SYSTEM_PROMPT, fit_to_budget
from runners.base import ChatMessage, ChatRequest, ErrorCode, RunnerError
from runners.models import RunnerConfig
from runners.registry import runner_class


def _runner(context_tokens: int):
    config = RunnerConfig(
        name="small",
        kind="llamastack",
        endpoint="http://127.0.0.1:9",
        model_id="m",
        context_tokens=context_tokens,
    )
    return runner_class("llamastack").from_config(config)


def _conversation(turns: int, words: int = 40) -> tuple[ChatMessage, ...]:
    out = []
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        out.append(ChatMessage(role, f"turn {i} " + "lorem " * words))
    return (*out, ChatMessage("user", "the latest question"))


def test_everything_is_kept_when_it_fits():
    request = ChatRequest(messages=_conversation(4, words=5), max_tokens=64)
    fitted, notices = fit_to_budget(request, _runner(4096))
    assert notices == []
    assert fitted.messages[0].role == "system" and SYSTEM_PROMPT in fitted.messages[0].content
    assert [m.content for m in fitted.messages[1:]] == [m.content for m in request.messages]


def test_the_oldest_turns_are_left_out_whole_and_the_user_is_told():
    request = ChatRequest(messages=_conversation(20), max_tokens=128)
    runner = _runner(1024)
    fitted, notices = fit_to_budget(request, runner)
    kept = fitted.messages[1:]
    assert kept[-1].content == "the latest question"
    assert len(kept) < len(request.messages)
    # Kept turns are the most recent ones, unchanged (never cut mid-message).
    assert [m.content for m in kept] == [m.content for m in request.messages[-len(kept) :]]
    assert notices and notices[0].code == "trimmed"
    assert notices[0].data["dropped"] == len(request.messages) - len(kept)
    total = sum(runner.count_tokens(m.content) + 8 for m in fitted.messages)
    assert total <= runner.context_tokens - 128


def test_a_last_message_too_long_on_its_own_is_refused_clearly():
    request = ChatRequest(messages=(ChatMessage("user", "word " * 5000),), max_tokens=128)
    with pytest.raises(RunnerError) as info:
        fit_to_budget(request, _runner(1024))
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert "too long" in info.value.message and "small" in info.value.message


def test_retrieved_context_goes_before_the_question_and_is_dropped_before_the_question():
    request = ChatRequest(messages=(ChatMessage("user", "what ships in March?"),), max_tokens=64)
    context = "[1] plan.md, p. 2: The falcon project ships in March."
    fitted, _ = fit_to_budget(request, _runner(4096), context)
    grounded = fitted.messages[-1].content
    assert grounded.index(context) < grounded.index("Question: what ships in March?")
    assert context not in fitted.messages[0].content
    huge = "[1] big.md: " + "filler " * 8000
    fitted, _ = fit_to_budget(request, _runner(1024), huge)
    assert "filler" not in fitted.messages[0].content
    assert fitted.messages[-1].content == "what ships in March?"


def test_a_callers_system_message_is_kept_ahead_of_ours():
    request = ChatRequest(
        messages=(ChatMessage("system", "Answer in French."), ChatMessage("user", "hello")),
        max_tokens=32,
    )
    fitted, _ = fit_to_budget(request, _runner(2048))
    assert [m.role for m in fitted.messages] == ["system", "user"]
    assert fitted.messages[0].content.startswith("Answer in French.")
