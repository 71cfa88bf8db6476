"""The local ExecuTorch runner, on the real prepared SmolLM2 program.

The `slow` tests need `python manage.py prepare_model` (make test runs it);
without the model they skip with a reason, unless BREEZEWEB_REQUIRE_MODEL=1,
where a missing model fails them instead (the `model_ready` fixture,
tests.support.fixtures). Generations are short and greedy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

import pytest

from runners.base import (
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Notice,
    Runner,
    RunnerError,
    TokenDelta,
)
from runners.executorch import prepare
from runners.executorch.engine_process import SWITCH_INTERVAL_S
from runners.executorch.runner import (
    ExecuTorchRunner,
    PieceDecoder,
    StopScanner,
    forget_engines,
    threads_per_process,
)
from runners.models import RunnerConfig
from tests.support.hermetic import read_only_model_cache

MODELS_DIR = Path(settings.MODELS_DIR)


# Each test starts with the local model's slots free (tests.support.fixtures).
pytestmark = pytest.mark.usefixtures("local_model_idle")


def make_runner(**extra) -> ExecuTorchRunner:
    context = extra.pop("context_tokens", 2048)
    config = RunnerConfig(
        name="local",
        kind="executorch",
        model_id="smollm2",
        temperature=0.0,
        max_tokens=48,
        context_tokens=context,
        extra_params=extra,
    )
    return ExecuTorchRunner.from_config(config)


def ask(question: str, **kwargs) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", question),), **kwargs)


async def collect(runner: ExecuTorchRunner, request: ChatRequest) -> tuple[str, list, Done]:
    text, notices, done = "", [], None
    async for event in runner.stream(request):
        if isinstance(event, TokenDelta):
            assert done is None
            text += event.text
        elif isinstance(event, Notice):
            notices.append(event)
        elif isinstance(event, Done):
            done = event
    assert done is not None, "the stream ended without Done"
    return text, notices, done


# ---- no model needed -------------------------------------------------------------


def test_it_implements_the_runner_protocol():
    runner = make_runner()
    assert isinstance(runner, Runner)
    assert runner.capabilities == {"llm"}
    assert runner.context_tokens <= 2048


def test_slots_share_the_cores_unless_executorch_threads_is_set(settings, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    settings.EXECUTORCH_THREADS = 0
    # One slot: ExecuTorch's default; more: the cores shared out, at least one each.
    assert [threads_per_process(n) for n in (1, 2, 3, 8)] == [0, 4, 2, 1]
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads_per_process(2) == 1
    settings.EXECUTORCH_THREADS = 3
    assert [threads_per_process(n) for n in (1, 2)] == [3, 3]


def test_it_tells_the_user_to_prepare_the_model_when_the_file_is_missing(tmp_path):
    runner = make_runner(
        pte_path=str(tmp_path / "absent.pte"), tokenizer_path=str(tmp_path / "absent.json")
    )

    async def scenario():
        health = await runner.health()
        assert not health.ok
        assert "prepare_model" in health.detail
        with pytest.raises(RunnerError) as caught:
            async for _ in runner.stream(ask("Hi")):
                pass
        return caught.value

    error = asyncio.run(scenario())
    assert error.code == ErrorCode.NOT_LOADED
    assert error.retryable
    assert "The local model is not prepared: run `python manage.py prepare_model`" in str(error)


def test_it_rejects_bad_extra_params_with_a_clear_message():
    with pytest.raises(ImproperlyConfigured, match="parallelism must be an integer from 1 to 8"):
        make_runner(parallelism=0)
    with pytest.raises(ImproperlyConfigured, match="pte_path must be a file path string"):
        make_runner(pte_path=42)


def test_the_stop_scanner_catches_a_stop_string_split_across_pieces():
    scanner = StopScanner(["END"])
    shown = ""
    for piece in ["Hello wor", "ld E", "N", "D and more"]:
        text, stopped = scanner.feed(piece)
        shown += text
        if stopped:
            break
    assert stopped
    assert shown == "Hello world "


def test_the_stop_scanner_strips_the_end_marker_and_keeps_false_starts():
    scanner = StopScanner([])
    first, stopped = scanner.feed("a <|im")
    assert (first, stopped) == ("a ", False)
    second, stopped = scanner.feed("_end|>")
    assert (second, stopped) == ("", True)
    scanner = StopScanner([])
    assert scanner.feed("x <") == ("x ", False)
    assert scanner.feed("b>") == ("<b>", False)


def test_the_piece_decoder_never_splits_a_character_given_real_tokenizer_pieces(model_ready):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODELS_DIR / prepare.TOKENIZER_NAME))
    text = "Café crème ☕ 🎉 日本語!"
    # The byte-level pieces the native runner hands over, one token at a time;
    # several end in the middle of a UTF-8 character.
    pieces = tokenizer.encode(text, add_special_tokens=False).tokens
    assert any(tokenizer.decode([tokenizer.token_to_id(p)]).endswith("\ufffd") for p in pieces)
    decoder = PieceDecoder()
    out = [decoder.feed(piece) for piece in pieces]
    assert "".join(out) + decoder.flush() == text
    assert all("\ufffd" not in piece for piece in out)


def test_the_piece_decoder_drops_a_character_cut_by_max_tokens():
    decoder = PieceDecoder()
    assert decoder.feed("Hi") == "Hi"
    assert decoder.feed("ĠðŁ") == " "  # the first bytes of an emoji
    assert decoder.flush() == ""


def test_a_slot_handed_to_a_request_that_gives_up_goes_back_to_the_pool():
    from runners.executorch.runner import _Slot, _SlotPool

    async def scenario():
        pool = _SlotPool()
        pool.add(_Slot(process=None, info={}))  # the pool never uses its process
        loop = asyncio.get_running_loop()
        slot = pool.acquire_nowait(loop)
        assert isinstance(slot, _Slot)
        waiter = pool.acquire_nowait(loop)
        later = pool.acquire_nowait(loop)
        assert (pool.position(waiter), pool.position(later)) == (1, 2)
        pool.release(slot)  # handed to `waiter`; the hand-over callback is pending
        waiter.future.cancel()
        pool.abandon(waiter)  # gives up before the callback runs
        assert await asyncio.wait_for(later.future, 1) is slot
        pool.release(slot)
        assert pool.busy() == 0 and pool.queued() == 0

    asyncio.run(scenario())


# ---- the real model ----------------------------------------------------------------


@pytest.mark.slow
def test_it_answers_the_capital_of_france_with_paris_and_reports_usage(model_ready):
    runner = make_runner()
    text, notices, done = asyncio.run(collect(runner, ask("What is the capital of France?")))
    assert "Paris" in text
    assert "<|im_end|>" not in text
    assert notices == []
    # The admin's health column names the prepared program.
    health = asyncio.run(runner.health())
    manifest = prepare.read_manifest(MODELS_DIR)
    assert f"{manifest['model']} {manifest['variant']}; loaded" in health.detail
    assert done.finish_reason == "stop"
    assert done.usage.prompt_tokens > 10
    assert 0 < done.usage.completion_tokens < 48
    assert done.timings.time_to_first_token_ms > 0
    assert done.timings.total_ms >= done.timings.time_to_first_token_ms
    assert done.timings.tokens_per_second > 0
    assert done.timings.prefill_tokens_per_second > 0
    # The runner's own tokenizer count matches what was prefilled.
    assert runner.count_tokens("What is the capital of France?") > 5


@pytest.mark.slow
def test_max_tokens_ends_with_finish_reason_length(model_ready):
    runner = make_runner()
    request = ask("Write a long story about a dragon.", max_tokens=5)
    text, _, done = asyncio.run(collect(runner, request))
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 5
    assert text.strip()


@pytest.mark.slow
def test_a_stop_string_split_across_tokens_ends_the_answer_before_it(model_ready):
    runner = make_runner()
    question = "List the first five letters of the alphabet, separated by commas."

    async def scenario():
        full, _, _ = await collect(runner, ask(question))
        # "B, C" spans several tokens (" B", ",", " C").
        cut, _, done = await collect(runner, ask(question, stop=("B, C",)))
        return full, cut, done

    full, cut, done = asyncio.run(scenario())
    assert "B, C" in full, full
    assert done.finish_reason == "stop"
    assert cut == full[: full.index("B, C")]
    assert done.usage.completion_tokens < 48


@pytest.mark.slow
def test_cancelling_stops_generation_quickly_and_the_next_request_is_served(model_ready):
    runner = make_runner()

    async def scenario():
        tokens = 0
        events = []

        async def consume():
            nonlocal tokens
            async for event in runner.stream(
                ask("Write a long story about a dragon.", max_tokens=400)
            ):
                events.append(event)
                if isinstance(event, TokenDelta):
                    tokens += 1

        task = asyncio.create_task(consume())
        while tokens < 3:
            await asyncio.sleep(0.005)
        cancelled_at = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancel_seconds = time.perf_counter() - cancelled_at
        # The native loop notices the stop before its next token and frees
        # the slot (400 tokens would otherwise take seconds).
        pool = runner._engine.pool
        while pool.busy() and time.perf_counter() - cancelled_at < 5:
            await asyncio.sleep(0.002)
        freed_seconds = time.perf_counter() - cancelled_at
        # The runner answers correctly from a clean KV cache.
        text, _, done = await collect(runner, ask("What is the capital of France?"))
        return events, cancel_seconds, freed_seconds, text, done

    events, cancel_seconds, freed_seconds, text, done = asyncio.run(scenario())
    assert not any(isinstance(e, Done) for e in events)  # cancelled streams end without Done
    assert cancel_seconds < 0.2
    assert freed_seconds < 1.0
    assert "Paris" in text
    assert done.finish_reason == "stop"


@pytest.mark.slow
def test_a_dead_engine_process_fails_its_answer_clearly_and_the_next_one_starts_anew(
    model_ready,
):
    """The program runs in a process of its own: killing it (as a crash in
    native code would) ends the answer in flight with an error, not a hang,
    and leaves the web process and the next request unharmed."""
    runner = make_runner()

    async def scenario():
        got = []
        with pytest.raises(RunnerError) as caught:
            async for event in runner.stream(ask("Write a long story about a dragon.")):
                got.append(event)
                if isinstance(event, TokenDelta) and len(got) == 1:
                    os.kill(runner._engine.slots[0].process.pid, signal.SIGKILL)
        first_pid = runner._engine.slots[0].process.pid
        health = await runner.health()
        text, _, done = await collect(runner, ask("What is the capital of France?"))
        second_pid = runner._engine.slots[0].process.pid
        return caught.value, got, health, first_pid, second_pid, text, done

    error, got, health, first_pid, second_pid, text, done = asyncio.run(scenario())
    assert health.ok and health.detail.endswith("ready (loads on first request)")
    assert error.code == ErrorCode.RUNTIME
    assert "process stopped" in str(error)
    assert not any(isinstance(e, Done) for e in got)
    assert second_pid != first_pid
    assert "Paris" in text and done.finish_reason == "stop"


@pytest.mark.slow
def test_a_re_prepared_model_is_served_by_a_new_process_and_the_old_one_finishes_first(
    model_ready, tmp_path
):
    """The model files change under a running answer (prepare_model again):
    the next request gets a new engine process; the old one finishes the
    answer it was giving, then exits."""
    import shutil

    for name in (prepare.PTE_NAME, prepare.TOKENIZER_NAME, prepare.CHAT_TEMPLATE_NAME):
        shutil.copy(MODELS_DIR / name, tmp_path / name)
    files = {"pte_path": str(tmp_path / prepare.PTE_NAME)}
    files["tokenizer_path"] = str(tmp_path / prepare.TOKENIZER_NAME)
    first, second = make_runner(**files), make_runner(**files)

    async def scenario():
        events = []
        async for event in first.stream(ask("Write a long story about a dragon.", max_tokens=40)):
            events.append(event)
            if len(events) == 2:
                old = first._engine.slots[0].process
                # A new file at the same path (a new inode), as prepare_model installs it.
                shutil.copy(MODELS_DIR / prepare.PTE_NAME, tmp_path / "new.pte")
                os.replace(tmp_path / "new.pte", tmp_path / prepare.PTE_NAME)
                text, _, _ = await collect(second, ask("What is the capital of France?"))
        deadline = time.monotonic() + 30
        while old.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return events, old, second._engine.slots[0].process, text

    try:
        events, old, new, text = asyncio.run(scenario())
    finally:
        forget_engines()
    assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens >= 3
    assert "Paris" in text
    assert new.pid != old.pid
    assert not old.alive  # it exited once its answer was done


@pytest.mark.slow
def test_two_concurrent_requests_queue_fairly_and_get_their_own_answers(model_ready):
    # A fresh one-slot engine (configs sharing files share the largest pool).
    forget_engines()
    runner = make_runner()  # parallelism 1: the second request waits its turn

    async def scenario():
        await runner.load()
        return await asyncio.gather(
            collect(runner, ask("What is the capital of France?")),
            collect(runner, ask("What is the capital of Japan?")),
        )

    (france, france_notices, _), (japan, japan_notices, done) = asyncio.run(scenario())
    assert "Paris" in france and "Tokyo" not in france
    assert "Tokyo" in japan and "Paris" not in japan
    assert france_notices == []
    assert [n.code for n in japan_notices] == ["queued"]
    assert japan_notices[0].data == {"position": 1}
    assert done.usage.completion_tokens > 0


@pytest.mark.slow
def test_a_request_cancelled_while_queued_leaves_the_queue(model_ready):
    forget_engines()
    runner = make_runner()

    async def scenario():
        await runner.load()
        first = asyncio.create_task(collect(runner, ask("Tell me about dogs.", max_tokens=60)))
        await asyncio.sleep(0)
        second_notices = []

        async def second():
            async for event in runner.stream(ask("Hi")):
                second_notices.append(event)

        abandoned = asyncio.create_task(second())
        await asyncio.sleep(0)
        third = asyncio.create_task(collect(runner, ask("What is the capital of France?")))
        while not second_notices:
            await asyncio.sleep(0.005)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        return second_notices, await first, await third

    second_notices, (_, _, first_done), (text, notices, done) = asyncio.run(scenario())
    assert [n.data for n in second_notices] == [{"position": 1}]
    assert first_done.finish_reason in {"stop", "length"}
    # The third request moved up to first place once the second left.
    assert [n.data["position"] for n in notices] == [2, 1]
    assert "Paris" in text
    assert done.finish_reason == "stop"


@pytest.mark.slow
def test_two_slots_answer_concurrently_without_mixing_kv_caches(model_ready):
    forget_engines()  # both slots start here (a slot started earlier keeps its threads)
    runner = make_runner(parallelism=2)

    async def scenario():
        return await asyncio.gather(
            collect(runner, ask("What is the capital of France?")),
            collect(runner, ask("What is the capital of Japan?")),
        )

    try:
        (france, france_notices, _), (japan, japan_notices, _) = asyncio.run(scenario())
        processes = [slot.info for slot in runner._engine.slots]
    finally:
        forget_engines()  # later tests expect a one-slot pool
    assert "Paris" in france
    assert "Tokyo" in japan
    assert france_notices == japan_notices == []
    # Each slot is a process of its own (one GIL each), sharing out the cores.
    assert len({info["pid"] for info in processes}) == 2
    assert {info["threads"] for info in processes} == {threads_per_process(2)}


@pytest.mark.slow
def test_a_dead_slot_process_fails_only_its_own_answer(model_ready):
    """Two slots, two processes: killing one mid-answer ends that answer with
    an error; the other answer finishes in full, and the next request is
    served by new processes."""
    forget_engines()
    runner = make_runner(parallelism=2)

    async def answer(question: str, started: asyncio.Event) -> tuple[list, Exception | None]:
        events: list = []
        try:
            async for event in runner.stream(ask(question, max_tokens=64)):
                events.append(event)
                started.set()
        except RunnerError as exc:
            return events, exc
        return events, None

    async def scenario():
        await runner.load()
        engine = runner._engine
        first_started, second_started = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(answer("Write a long story about a dragon.", first_started))
        await first_started.wait()  # the first answer holds a slot...
        second = asyncio.ensure_future(answer("Write a poem about the sea.", second_started))
        await second_started.wait()  # ...and the second the other one
        victim = engine.slots[0].process
        os.kill(victim.pid, signal.SIGKILL)
        results = await asyncio.gather(first, second)
        old_pids = {slot.process.pid for slot in engine.slots}
        text, _, done = await collect(runner, ask("What is the capital of France?"))
        new_pids = {slot.process.pid for slot in runner._engine.slots}
        return results, old_pids, new_pids, text, done

    try:
        results, old_pids, new_pids, text, done = asyncio.run(scenario())
    finally:
        forget_engines()  # later tests expect a one-slot pool
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1 and errors[0].code == ErrorCode.RUNTIME
    assert "process stopped" in str(errors[0])
    finished = [events for events, error in results if error is None]
    assert len(finished) == 1 and isinstance(finished[0][-1], Done)
    assert finished[0][-1].usage.completion_tokens >= 3
    assert len(new_pids) == 2 and not new_pids & old_pids
    assert "Paris" in text and done.finish_reason == "stop"


@pytest.mark.slow
def test_old_turns_are_trimmed_whole_with_a_notice(model_ready):
    runner = make_runner(context_tokens=300)
    filler = "This is an old remark about the weather in the mountains. " * 12
    history = []
    for i in range(4):
        history += [ChatMessage("user", f"{i}: {filler}"), ChatMessage("assistant", "Noted.")]
    request = ChatRequest(
        messages=(
            ChatMessage("system", "You are a helpful assistant."),
            *history,
            ChatMessage("user", "What is the capital of France?"),
        ),
        max_tokens=24,
    )
    text, notices, done = asyncio.run(collect(runner, request))
    assert [n.code for n in notices] == ["trimmed"]
    assert notices[0].data["dropped"] >= 1
    # The notice is the pipeline's (`data.dropped` only); the prompt that was
    # sent fits beside the answer's room.
    assert done.usage.prompt_tokens <= 300 - 24
    assert "Paris" in text


@pytest.mark.slow
def test_a_prompt_longer_than_one_forward_call_is_prefilled_in_chunks(model_ready):
    runner = make_runner()
    filler = "Here is a sentence about nothing in particular. " * 160
    question = f"The secret code word is BANANA. {filler}\nWhat is the secret code word?"
    request = ask(question, max_tokens=16)
    text, notices, done = asyncio.run(collect(runner, request))
    assert notices == []
    # More than the program's 1023-token forward call.
    assert done.usage.prompt_tokens > 1100
    assert "BANANA" in text
    assert done.timings.prefill_tokens_per_second > 0
    # Prefilled in forward calls of at most max_seq_len - 1 tokens.
    assert runner._engine.max_seq_len <= 1000


@pytest.mark.slow
def test_a_last_message_longer_than_the_context_is_refused_clearly(model_ready):
    runner = make_runner(context_tokens=300)
    request = ask("Please read this. " + "word " * 400)

    async def scenario():
        async for _ in runner.stream(request):
            pass

    with pytest.raises(RunnerError) as caught:
        asyncio.run(scenario())
    assert caught.value.code == ErrorCode.INVALID_INPUT
    assert "too long for the local model" in caught.value.message


@pytest.mark.slow
def test_multibyte_characters_arrive_whole(model_ready):
    runner = make_runner()
    request = ask("Repeat exactly, nothing else: café crème ☕ 🎉 日本", max_tokens=24)

    async def scenario():
        pieces = []
        async for event in runner.stream(request):
            if isinstance(event, TokenDelta):
                pieces.append(event.text)
        return pieces

    pieces = asyncio.run(scenario())
    text = "".join(pieces)
    assert "\ufffd" not in text
    assert any(ord(ch) > 127 for ch in text), text
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogates either


# ---- prepare_model --------------------------------------------------------------------


def test_prepare_model_reports_a_missing_weights_package(monkeypatch, tmp_path):
    real_find_spec = prepare.importlib.util.find_spec
    monkeypatch.setattr(
        prepare.importlib.util,
        "find_spec",
        lambda name, *a: None if name == prepare.GGUF_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(prepare.PrepareError, match=r"requirements-model\.txt"):
        prepare.prepare_model(tmp_path / "models", tmp_path / "cache", progress=lambda _: None)


def test_prepare_model_refuses_to_start_without_disk_space_and_keeps_the_old_model(
    monkeypatch, tmp_path
):
    models = tmp_path / "models"
    models.mkdir()
    (models / prepare.PTE_NAME).write_bytes(b"previous program")
    usage = prepare.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda _: usage._replace(free=10_000_000))
    with pytest.raises(prepare.PrepareError, match="Not enough disk space"):
        prepare.prepare_model(models, tmp_path / "cache", progress=lambda _: None)
    assert (models / prepare.PTE_NAME).read_bytes() == b"previous program"


def test_the_command_turns_a_prepare_error_into_a_clear_command_error(monkeypatch, tmp_path):
    from django.core.management import CommandError, call_command

    monkeypatch.setattr(prepare, "executorch_version", _raise_missing_executorch)
    with pytest.raises(CommandError, match="executorch is not installed"):
        call_command("prepare_model", output_dir=str(tmp_path / "models"))


def _raise_missing_executorch() -> str:
    raise prepare.PrepareError("executorch is not installed; install the app's requirements")


def test_a_fresh_checkout_links_the_cached_build_and_a_second_run_is_quick(model_ready, tmp_path):
    from django.core.management import call_command

    manifest = prepare.read_manifest(MODELS_DIR)
    if manifest is None or manifest.get("variant") != prepare.DEFAULT_VARIANT:
        pytest.skip("the prepared model is not the default variant")
    out = tmp_path / "models"
    cache = read_only_model_cache(Path(settings.MODEL_CACHE_DIR))
    first = prepare.prepare_model(out, cache, progress=lambda _: None)
    assert first.action == "linked-from-cache"
    assert (out / prepare.PTE_NAME).stat().st_size == manifest["sizes"][prepare.PTE_NAME]
    started = time.perf_counter()
    second = prepare.prepare_model(out, cache, progress=lambda _: None)
    assert second.action == "up-to-date"
    assert time.perf_counter() - started < 10
    # The command says so too.
    buffer = StringIO()
    call_command("prepare_model", output_dir=str(out), stdout=buffer)
    assert "already up to date" in buffer.getvalue()


# Greedy answers to 8 questions, in a fresh process, with EXECUTORCH_THREADS from the env.
_ANSWER_IN_A_FRESH_PROCESS = """
import asyncio, json, sys
import django
django.setup()
from pathlib import Path
from django.conf import settings
from runners.base import ChatMessage
from runners.executorch import evaluate

async def main():
    runner = evaluate.measuring_runner(Path(settings.MODELS_DIR))
    paths = [
        await runner.greedy_steps((ChatMessage("user", q),), max_new=48)
        for q in evaluate.QUESTIONS[:8]
    ]
    info = runner._engine.slots[0].info  # the engine process's own
    print(json.dumps({**info, "paths": paths, "web_switch": sys.getswitchinterval()}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_one_executorch_thread_makes_the_answers_repeat_exactly(model_ready, tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "breezeweb.settings",
        "DATA_DIR": str(tmp_path),
        "MODELS_DIR": str(MODELS_DIR),
        "EXECUTORCH_THREADS": "1",
    }
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _ANSWER_IN_A_FRESH_PROCESS],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["threads"] == runs[1]["threads"] == 1  # the default would be one per core
    # The program runs in a process of its own, which hands its GIL over every
    # millisecond (Python's default is 5 ms), so a cancel is read at once; the
    # web process keeps Python's default.
    assert runs[0]["switch_interval"] == SWITCH_INTERVAL_S < runs[0]["web_switch"]
    assert runs[0]["pid"] != runs[1]["pid"]
    assert all(runs[0]["paths"])
    assert runs[0]["paths"] == runs[1]["paths"]


def test_the_engine_process_refuses_a_bad_program_and_outlives_a_failing_handler(tmp_path, caplog):
    """No model needed: a file that is not a program is refused with an error
    (the process stays up), and a handler that raises is logged without
    stopping the answers to the other requests."""
    from runners.executorch.engine_process import EngineProcess, EngineStopped

    bad = tmp_path / "model.pte"
    bad.write_bytes(b"not an ExecuTorch program")
    process = EngineProcess()
    try:

        def broken(message: tuple) -> None:
            raise RuntimeError("a bug in one request's handler")

        process.start("load", broken, str(bad), 1)
        with pytest.raises(EngineStopped):
            process.call("load", str(bad), 1).result(timeout=120)
        deadline = time.monotonic() + 30  # the two loads may end in either order
        while "handling the engine process's 'error' failed" not in caplog.text:
            assert time.monotonic() < deadline, "the failing handler was never logged"
            time.sleep(0.05)
        assert process.alive
    finally:
        process.close()
    assert not process.alive
    with pytest.raises(EngineStopped, match="process stopped"):
        process.call("load", str(bad), 1)


def test_the_engine_process_sends_the_first_tokens_at_once_then_in_batches(model_ready):
    """One message per token woke the web process's reader thread ~180 times a
    second (docs/benchmarks.md): after FIRST_TOKENS_AT_ONCE single tokens the
    engine sends what SEND_INTERVAL_S made in one message; every token arrives,
    in order, before the end."""
    from django.conf import settings

    from runners.executorch.engine_process import FIRST_TOKENS_AT_ONCE, EngineProcess
    from runners.executorch.sampling import SamplingParams

    process = EngineProcess()
    messages: list[tuple] = []
    ended = threading.Event()

    def handler(message: tuple) -> None:
        messages.append(message)
        if message[0] in ("end", "error"):
            ended.set()

    try:
        process.call("load", str(settings.MODELS_DIR / "model.pte"), 0).result(timeout=120)
        # A prompt of plain token ids and no end token: it runs to max_new.
        process.start(
            "generate",
            handler,
            list(range(100, 140)),
            SamplingParams(),
            49152,
            64,
            False,
            frozenset(),
            1024,
        )
        assert ended.wait(120), messages
    finally:
        process.close()
    kinds = [m[0] for m in messages]
    assert kinds[0] == "prefilled" and kinds[-1] == "end" and set(kinds[1:-1]) == {"tokens"}
    batches = [m[2] for m in messages[1:-1]]
    assert [len(b) for b in batches[:FIRST_TOKENS_AT_ONCE]] == [1] * FIRST_TOKENS_AT_ONCE
    tokens = [t for b in batches for t in b]
    assert len(tokens) == messages[-1][3] == 64
    assert len(batches) < len(tokens)  # batched after the first few
    # The KV cache holds the prompt and every token fed back (the last one is not).
    assert messages[-1][4] == [*range(100, 140), *tokens[:-1]]
