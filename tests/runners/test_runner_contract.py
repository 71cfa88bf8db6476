"""The contract every runner kind in RUNNER_KINDS must honour (like datasette's
"every hook has a test"). Each kind has a harness that builds a real runner of
that kind (the local kind on the prepared SmolLM2 program, the Llama Stack
kind over HTTP against the scripted OpenAI-compatible server); the cases below
know nothing about kinds. Adding a kind without a harness fails here."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from runners.base import (
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Runner,
    RunnerError,
    TokenDelta,
)
from runners.models import RunnerConfig
from runners.registry import RUNNER_KINDS, runner_class
from tests.support.fixtures import require_local_model
from tests.support.scripted_server import Reply

QUESTION = "What is the capital of France?"


class ExecuTorchHarness:
    """The local kind on the prepared model (greedy, so answers repeat)."""

    kind = "executorch"
    marks = (pytest.mark.slow,)

    def __init__(self, server) -> None:
        require_local_model()

    def config(self, **fields) -> RunnerConfig:
        fields = {"temperature": 0.0, "max_tokens": 64, "context_tokens": 1024, **fields}
        return RunnerConfig(name="contract-local", kind=self.kind, **fields)

    def answers_paris(self) -> None:
        """The model knows this one."""

    def answers_at_length(self) -> None:
        """Asked for a long story, it writes one."""

    def broken(self, tmp_path) -> tuple[RunnerConfig, ErrorCode]:
        config = self.config(extra_params={"pte_path": str(tmp_path / "missing.pte")})
        return config, ErrorCode.NOT_LOADED


class LlamaStackHarness:
    """The remote kind against the scripted OpenAI-compatible server, which
    honours `stop` and `max_tokens` as a real one does."""

    kind = "llamastack"
    marks = ()

    def __init__(self, server) -> None:
        self.server = server
        self.answers_paris()

    def config(self, **fields) -> RunnerConfig:
        fields = {
            "endpoint": self.server.url,
            "model_id": "scripted-model",
            "temperature": 0.0,
            "max_tokens": 64,
            "timeout_seconds": 10,
            **fields,
        }
        return RunnerConfig(name="contract-remote", kind=self.kind, **fields)

    def answers_paris(self) -> None:
        self.server.default_reply = Reply(text="The capital of France is Paris.", token_delay=0.01)

    def answers_at_length(self) -> None:
        self.server.default_reply = Reply(text=" ".join(["word"] * 400), token_delay=0.02)

    def broken(self, tmp_path) -> tuple[RunnerConfig, ErrorCode]:
        self.server.script(Reply(status=503))
        self.server.script(Reply(status=503))
        return self.config(), ErrorCode.UNAVAILABLE


HARNESSES = {harness.kind: harness for harness in (ExecuTorchHarness, LlamaStackHarness)}


def test_every_registered_kind_has_a_contract_harness():
    assert sorted(RUNNER_KINDS) == sorted(HARNESSES)


@pytest.fixture(
    params=[pytest.param(kind, marks=harness.marks) for kind, harness in HARNESSES.items()]
)
def harness(request, scripted_server):
    return HARNESSES[request.param](scripted_server)


@pytest.fixture
async def runner(harness):
    built = runner_class(harness.kind).from_config(harness.config())
    yield built
    await built.close()


def _ask(text: str = QUESTION, **kw) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", text),), temperature=0.0, **kw)


async def _answer(runner: Runner, request: ChatRequest) -> tuple[list[str], Done]:
    pieces, done = [], None
    async for event in runner.stream(request):
        if isinstance(event, TokenDelta):
            pieces.append(event.text)
        elif isinstance(event, Done):
            done = event
    assert done is not None, "a stream ends with Done"
    return pieces, done


def test_the_kind_declares_its_construction_locality_and_validation(harness):
    cls = runner_class(harness.kind)
    assert isinstance(cls.local, bool)
    assert cls.validate_config(harness.config()) == {}
    runner = cls.from_config(harness.config())
    assert runner.name and runner.model_id and runner.context_tokens > 0
    assert isinstance(runner, Runner)


async def test_it_streams_text_and_ends_with_done_and_usage(runner):
    await runner.load()
    pieces, done = await _answer(runner, _ask(max_tokens=24))
    assert "Paris" in "".join(pieces)
    assert len(pieces) > 1  # streamed, not one finished blob
    assert done.finish_reason in {"stop", "length"}
    assert done.usage.completion_tokens > 0
    assert done.timings.time_to_first_token_ms is not None


async def test_a_stop_string_ends_the_answer_before_it(runner):
    pieces, done = await _answer(runner, _ask(max_tokens=24, stop=("Paris",)))
    assert "Paris" not in "".join(pieces)
    assert done.finish_reason == "stop"


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(runner):
    _, done = await _answer(runner, _ask(max_tokens=3))
    assert done.finish_reason == "length"
    assert 0 < done.usage.completion_tokens <= 3


async def test_it_stops_promptly_when_cancelled_and_serves_the_next_request(harness, runner):
    harness.answers_at_length()
    await runner.load()
    seen: list[str] = []

    async def consume():
        async for event in runner.stream(
            _ask("Write a very long story about a dragon.", max_tokens=400)
        ):
            if isinstance(event, TokenDelta):
                seen.append(event.text)

    task = asyncio.create_task(consume())
    while len(seen) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.time() - started < 1.0
    assert len(seen) < 100
    harness.answers_paris()
    pieces, _ = await _answer(runner, _ask(max_tokens=24))
    assert "Paris" in "".join(pieces)


def _png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_an_image_sent_to_a_text_only_runner_is_the_callers_mistake(runner):
    request = ChatRequest(
        messages=(ChatMessage("user", "What is in this picture?", images=(_png_data_url(),)),),
    )
    with pytest.raises(RunnerError) as info:
        await _answer(runner, request)
    assert info.value.code == ErrorCode.INVALID_INPUT
    assert info.value.retryable is False
    assert "image" in info.value.message


async def test_it_reports_health(runner):
    health = await runner.health()
    assert health.ok, health.detail


async def test_it_maps_failures_to_typed_errors(harness, tmp_path):
    config, expected = harness.broken(tmp_path)
    runner = runner_class(harness.kind).from_config(config)
    with pytest.raises(RunnerError) as info:
        await runner.load()
        await _answer(runner, _ask())
    assert info.value.code == expected
    assert info.value.retryable is True
    assert info.value.message  # a sentence for the user
    await runner.close()


async def test_close_is_idempotent(harness):
    runner = runner_class(harness.kind).from_config(harness.config())
    await runner.load()
    await runner.close()
    await runner.close()


def test_counting_tokens_is_positive_and_monotonic(runner):
    short, long = runner.count_tokens("hello"), runner.count_tokens("hello " * 50)
    assert 0 < short < long
