"""The local runner: an ExecuTorch program run by a decode loop of our own.

One `_Engine` per model file pair and web process (module-level cache,
shared by every `RunnerConfig` pointing at the same files) holds the
tokenizer, the chat template and a pool of slots; each slot is an engine
process of its own (engine_process.py) that loads the program, so two slots
decode side by side instead of taking turns on one GIL. Each slot owns one
KV cache (the program's mutable buffers), so one slot serves one generation
at a time; requests beyond the pool wait in a FIFO queue and are told their
position.

A generation runs in its slot's engine process: prefill (chunks of at most
`PREFILL_CHUNK_TOKENS`), then one `forward` call per token, each token chosen
from the program's logits by `sampling.Sampler` (temperature, top_k, top_p,
repetition / frequency / presence penalties, seed, logit bias). Each slot
remembers the tokens its KV cache holds, so a prompt that extends them (the
next turn of the same conversation) prefills only its new tokens. Token ids
come back over a socket; the engine's reader thread passes them to the
request's event loop with `call_soon_threadsafe`, and the async side turns
them into text and `TokenDelta`s, holding back any tail that could be the
start of a stop string or of the end marker, so neither ever leaks into the
answer. Cancelling sends a cancel the engine process checks before every
token; the slot returns to the pool when that process says the generation
stopped, so the cancelled stream can return at once.

If an engine process dies (a crash in native code, a kill), its answer in
flight ends with a RUNTIME error and the next request loads the model anew
(the engine's other processes finish their answers, then exit).
The engine uses only thread-safe state (locks, not asyncio primitives): it
outlives any one event loop (tests run each in a fresh loop).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from runners.base import (
    Capability,
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Event,
    Health,
    Notice,
    NoticeCode,
    RunnerError,
    Timings,
    TokenDelta,
    Usage,
)
from runners.executorch import evaluate, prepare
from runners.executorch.engine_process import EngineProcess, EngineStopped, common_prefix
from runners.executorch.evaluate import Evaluation
from runners.executorch.sampling import (
    BOUNDS,
    SamplingParams,
    check_value,
    logit_bias_ids,
)
from runners.prompt import drop_oldest, trimmed_notice

log = logging.getLogger(__name__)

NOT_PREPARED = "The local model is not prepared: run `python manage.py prepare_model`"
# Text the model uses to end (or wrongly begin) a turn; never part of an answer.
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
MAX_PARALLELISM = 8
# Tokens per forward call while prefilling. export_llama bounds a forward call
# at max_seq_length - 1 (1023) tokens (and records 1024 as get_max_seq_len).
PREFILL_CHUNK_TOKENS = 1000
# Sampling defaults for small models when neither the request nor the
# runner's extra_params set them (temperature is the config's own field):
# like llama.cpp / Ollama (top_k 40, repeat penalty 1.1 over the last 64
# tokens), top_p 0.9.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "top_k": 40,
    "top_p": 0.9,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "penalty_window": 64,
    "seed": None,
    "logit_bias": {},
}
# How often a queued request re-checks (and re-announces) its position.
_QUEUE_POLL_SECONDS = 0.05

# Used when a custom tokenizer comes without any chat template: ChatML, the
# format SmolLM2 (and the prepared model's own template) uses.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---- files and the loaded model ------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """The files one runner serves from."""

    pte: Path
    tokenizer: Path
    chat_template: Path | None

    def missing(self) -> list[Path]:
        return [p for p in (self.pte, self.tokenizer) if not p.is_file()]

    def key(self) -> tuple:
        """Identity of the files on disk: a re-prepared model (new inode,
        size or mtime) gets a fresh engine instead of the stale one."""
        parts: list[Any] = []
        for path in (self.pte, self.tokenizer):
            st = path.stat()
            parts.append((str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(parts)


def _load_chat_template(files: ModelFiles) -> str:
    """The model's own template: chat_template.jinja next to the tokenizer
    (what `prepare_model` writes), else tokenizer_config.json's, else ChatML."""
    candidates = [files.chat_template] if files.chat_template else []
    candidates.append(files.tokenizer.with_name(prepare.CHAT_TEMPLATE_NAME))
    for candidate in candidates:
        if candidate and candidate.is_file():
            return candidate.read_text()
    config_path = files.tokenizer.with_name(prepare.TOKENIZER_CONFIG_NAME)
    with contextlib.suppress(OSError, ValueError):
        template = json.loads(config_path.read_text()).get("chat_template")
        if isinstance(template, str) and template:
            return template
    log.warning("No chat template next to %s; using ChatML", files.tokenizer)
    return _CHATML_TEMPLATE


def _model_context_tokens(files: ModelFiles) -> int | None:
    manifest = prepare.read_manifest(files.pte.parent)
    if manifest and isinstance(manifest.get("context_tokens"), int):
        return manifest["context_tokens"]
    return None


class _Slot:
    """One engine process (one loaded program, one KV cache) and the tokens
    its cache holds, positions 0..len(cached)-1: the engine process's own
    list, copied back after each generation. `info`: what the process said
    when it loaded (its threads, switch interval and pid)."""

    def __init__(self, process: EngineProcess, info: dict[str, Any]) -> None:
        self.process = process
        self.info = info
        self.cached: list[int] = []


def threads_per_process(slots: int) -> int:
    """ExecuTorch threads for each of an engine's `slots` processes:
    EXECUTORCH_THREADS when set; else, with one slot, ExecuTorch's default
    (0), and with more, the cores shared out so that busy slots do not
    oversubscribe them (measured on 2 cores: two answers at once, a process
    each, got 76 tok/s in all with two threads per process, 136 with one;
    docs/benchmarks.md)."""
    if settings.EXECUTORCH_THREADS or slots == 1:
        return settings.EXECUTORCH_THREADS
    return max(1, (os.cpu_count() or 1) // slots)


class _Waiter:
    """A request queued for a slot; woken from whichever thread frees one.

    `slot` and `abandoned` change only under the pool's lock, so a slot handed
    to a request that is being cancelled is passed on exactly once, even if
    the request's loop closes before the hand-over callback runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[_Slot] = loop.create_future()
        self.slot: _Slot | None = None
        self.abandoned = False


class _SlotPool:
    """A fair (FIFO) pool of slots, usable from any thread and any loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: deque[_Slot] = deque()
        self._waiters: deque[_Waiter] = deque()
        self.size = 0

    def add(self, slot: _Slot) -> None:
        with self._lock:
            self.size += 1
        self.release(slot)

    def acquire_nowait(
        self, loop: asyncio.AbstractEventLoop, prefer: Any = None
    ) -> _Slot | _Waiter:
        """A free slot (the one `prefer(slot)` scores highest, e.g. the one
        whose KV cache shares the longest prefix with the prompt), or a place
        in the queue."""
        with self._lock:
            # A free slot goes to a newcomer only when nobody is queued.
            if self._free and not self._waiters:
                if prefer is not None and len(self._free) > 1:
                    best = max(self._free, key=prefer)
                    self._free.remove(best)
                    return best
                return self._free.popleft()
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
            return waiter

    def position(self, waiter: _Waiter) -> int:
        """1-based place in the queue (0 once it left the queue)."""
        with self._lock:
            try:
                return self._waiters.index(waiter) + 1
            except ValueError:
                return 0

    def abandon(self, waiter: _Waiter) -> None:
        """The waiter gave up (cancelled) before using a slot: leave the
        queue, and pass on a slot it may already have been handed."""
        with self._lock:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            waiter.abandoned = True
            slot, waiter.slot = waiter.slot, None
        if slot is not None:
            self.release(slot)

    def release(self, slot: _Slot) -> None:
        """Give `slot` to the longest-waiting live request, else mark it free."""
        while True:
            with self._lock:
                if not self._waiters:
                    self._free.append(slot)
                    return
                waiter = self._waiters.popleft()
                waiter.slot = slot
            try:
                waiter.loop.call_soon_threadsafe(self._hand_over, waiter)
                return
            except RuntimeError:
                # That request's loop is closed: nobody there will take it.
                with self._lock:
                    waiter.slot = None

    def _hand_over(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.abandoned or waiter.slot is None:
                return  # abandon() already passed the slot on
            if not waiter.future.done():
                waiter.future.set_result(waiter.slot)
                return
            slot, waiter.slot = waiter.slot, None
        self.release(slot)

    def queued(self) -> int:
        with self._lock:
            return len(self._waiters)

    def busy(self) -> int:
        with self._lock:
            return self.size - len(self._free)


async def _acquire(engine: _Engine, loop: asyncio.AbstractEventLoop) -> _Slot:
    """A slot of `engine`, waiting in the queue if need be (no notices)."""
    acquired = engine.pool.acquire_nowait(loop)
    if not isinstance(acquired, _Waiter):
        return acquired
    try:
        return await acquired.future
    except BaseException:
        engine.pool.abandon(acquired)
        raise


class _Engine:
    """A loaded model: tokenizer, chat template, and a pool of slots, each
    an engine process holding the program."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files
        self.pool = _SlotPool()
        self._grow_lock = threading.Lock()
        self.tokenizer = _load_tokenizer(files.tokenizer)
        self.byte_level = _is_byte_level(files.tokenizer)
        self.chat_template = _load_chat_template(files)
        self._template = _compile_template(self.chat_template)
        self.model_context_tokens = _model_context_tokens(files)
        self.slots: list[_Slot] = []
        self.retired = False
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.max_seq_len = PREFILL_CHUNK_TOKENS
        self.eos_ids: frozenset[int] = frozenset()
        self._pieces: list[str] = []
        self.last_reused_tokens = 0  # prompt tokens the last generation reused

    @property
    def stopped(self) -> bool:
        """One of its processes is gone (crashed, killed), or it is finishing
        for a newer engine: the next request loads the model anew."""
        return self.retired or any(not slot.process.alive for slot in self.slots)

    def ensure_slots(self, count: int) -> None:
        """Grow the pool to `count` slots, starting an engine process for
        each new one; they load side by side (blocking: call in a thread).
        Raises EngineStopped."""
        with self._grow_lock:
            if len(self.slots) >= count:
                return
            threads = threads_per_process(count)
            new: list[EngineProcess] = []
            try:
                new.extend(EngineProcess() for _ in range(count - len(self.slots)))
                loads = [process.call("load", str(self.files.pte), threads) for process in new]
                answers = [load.result() for load in loads]
            except BaseException:
                for process in new:
                    process.close()
                raise
            if not self.slots:
                self._read_metadata(answers[0]["metadata"])
            for process, loaded in zip(new, answers, strict=True):
                info = {k: loaded[k] for k in ("threads", "switch_interval", "pid")}
                slot = _Slot(process, info)
                self.slots.append(slot)
                self.pool.add(slot)

    def retire(self) -> None:
        """A newer engine replaces this one: its processes finish the answers
        in flight, then exit."""
        self.retired = True
        for slot in self.slots:
            slot.process.retire()

    def close(self) -> None:
        """Stop its processes now (what runs ends with an error)."""
        self.retired = True
        for slot in self.slots:
            slot.process.close()

    def _read_metadata(self, meta: dict[str, Any]) -> None:
        self.vocab_size = int(meta.get("get_vocab_size", self.vocab_size))
        # One forward call takes at most max_seq_len - 1 tokens (export_llama).
        self.max_seq_len = min(PREFILL_CHUNK_TOKENS, int(meta.get("get_max_seq_len", 1024)) - 1)
        eos = set(meta.get("get_eos_ids", ()))
        for marker in END_MARKERS:
            token = self.tokenizer.token_to_id(marker)
            if token is not None:
                eos.add(token)
        self.eos_ids = frozenset(eos)
        self._pieces = [self.tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)]

    def piece(self, token: int) -> str:
        """A token's text as the vocabulary spells it (byte-level alphabet)."""
        if 0 <= token < len(self._pieces):
            return self._pieces[token]
        return ""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token="",
            eos_token="<|im_end|>",  # noqa: S106 (a marker, not a secret)
        )


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _compile_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same sandbox transformers uses to render chat templates.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(source)


def _is_byte_level(path: Path) -> bool:
    """Whether the tokenizer spells tokens in GPT-2's byte-level alphabet
    (then `PieceDecoder` turns pieces back into bytes)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        for part in (data.get("decoder") or {}, data.get("pre_tokenizer") or {}):
            if part.get("type") == "ByteLevel":
                return True
            for inner in part.get("decoders", ()) + part.get("pretokenizers", ()):
                if inner.get("type") == "ByteLevel":
                    return True
    return False


_engines: dict[tuple, _Engine] = {}
_engines_lock = threading.Lock()


def _engine_for(files: ModelFiles, slots: int) -> _Engine:
    """The process-wide engine for these files with at least `slots` runners
    (blocking: loads weights on first use)."""
    missing = files.missing()
    if missing:
        raise RunnerError(
            ErrorCode.NOT_LOADED,
            f"{NOT_PREPARED} (missing {', '.join(p.name for p in missing)} in {missing[0].parent})",
            retryable=True,
        )
    key = files.key()
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None or engine.stopped:
            try:
                engine = _Engine(files)
            except Exception as exc:
                raise RunnerError(
                    ErrorCode.NOT_LOADED,
                    f"The local model's tokenizer or chat template could not be read "
                    f"({files.tokenizer.name}): {exc}",
                    retryable=False,
                ) from exc
            # A re-prepared model replaces the old one (same paths, new files);
            # its process finishes the answers in flight, then exits.
            paths = tuple(part[0] for part in key)
            for stale in [k for k in _engines if tuple(part[0] for part in k) == paths]:
                _engines.pop(stale).retire()
            _engines[key] = engine
    try:
        engine.ensure_slots(slots)
    except Exception as exc:
        raise RunnerError(
            ErrorCode.NOT_LOADED,
            f"The local model {files.pte.name} could not be loaded: {exc}. "
            "Re-run `python manage.py prepare_model` (or fix the runner's pte_path).",
            retryable=False,
        ) from exc
    return engine


def _loaded_engine(files: ModelFiles, slots: int) -> _Engine | None:
    """The engine for these files if it is loaded with enough slots (cheap)."""
    try:
        key = files.key()
    except OSError:
        return None
    with _engines_lock:
        engine = _engines.get(key)
    if engine is None or engine.stopped or engine.pool.size < slots:
        return None
    return engine


def forget_engines() -> None:
    """Drop every loaded model and stop its process (tests)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


# ---- streaming helpers ---------------------------------------------------------------


class StopScanner:
    """Turns streamed text pieces into safe-to-show text.

    Holds back the longest tail that might still grow into a stop string or an
    end marker, so a stop string split across tokens is still caught and never
    shown. `feed` returns (text to emit, stopped)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s) + END_MARKERS
        self._pending = ""
        self.stopped_by: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        self._pending += piece
        cut = None
        for stop in self._stops:
            index = self._pending.find(stop)
            if index != -1 and (cut is None or index < cut[0]):
                cut = (index, stop)
        if cut is not None:
            emit = self._pending[: cut[0]]
            self._pending = ""
            self.stopped_by = cut[1]
            return emit, True
        hold = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        emit = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return emit, False

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop."""
        rest, self._pending = self._pending, ""
        return rest


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that
    stands for each byte in a byte-level BPE vocabulary -> that byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF = _byte_level_table()


class PieceDecoder:
    """Turns token pieces into text, never splitting a character.

    A byte-level BPE token can end inside a multi-byte UTF-8 character
    (emoji, accents, CJK). Pieces are the vocabulary's spelling in the
    byte-level alphabet (all valid UTF-8); this class maps them back to bytes
    and decodes them incrementally, holding an incomplete character until its
    last byte.
    With `byte_level=False` (a tokenizer that is not byte-level) pieces are
    passed through as they are."""

    def __init__(self, byte_level: bool = True) -> None:
        self._byte_level = byte_level
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: str) -> str:
        if not self._byte_level:
            return piece
        # Special tokens (<|im_end|>) are plain ASCII, which maps to itself.
        raw = b"".join(bytes([_BYTE_OF[ch]]) if ch in _BYTE_OF else ch.encode() for ch in piece)
        return self._decoder.decode(raw)

    def flush(self) -> str:
        """End of generation: an incomplete trailing character (cut by
        max_tokens) is dropped rather than shown as U+FFFD."""
        self._decoder.reset()
        return ""


@dataclass
class _Generation:
    """One request's generation: the engine process's answers (on its reader
    thread) become items of the request's queue (on its event loop)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    engine: _Engine
    slot: _Slot
    cancelled: threading.Event = field(default_factory=threading.Event)
    request_id: int = 0
    started_at: float = 0.0
    prefilled_at: float = 0.0
    ended_at: float = 0.0
    prefilled_tokens: int = 0  # prompt tokens actually computed (not reused)
    reused_tokens: int = 0  # prompt tokens whose KV cache was reused
    generated: int = 0
    _pending: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, prompt: list[int], params: SamplingParams, max_new: int, reuse: bool) -> None:
        """Hand the generation to the engine process. The slot goes back to
        the pool when it ends, whatever ends it (raises EngineStopped, with
        the slot released, if the process is gone)."""
        engine = self.engine
        try:
            self.request_id = self.slot.process.start(
                "generate",
                self._answer,
                prompt,
                params,
                engine.vocab_size,
                max_new,
                reuse,
                engine.eos_ids,
                engine.max_seq_len,
            )
        except BaseException:
            self.slot.cached.clear()
            engine.pool.release(self.slot)
            raise
        if self.cancelled.is_set():
            self.slot.process.cancel(self.request_id)

    def cancel(self) -> None:
        """Stop before the next token (the slot is released when the engine
        process says it stopped)."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self.request_id:
            self.slot.process.cancel(self.request_id)

    def _answer(self, message: tuple) -> None:
        """On the engine process's reader thread: one of its answers."""
        kind = message[0]
        if kind == "tokens":
            self.generated += len(message[2])
            self.put(*(("token", token) for token in message[2]))
        elif kind == "prefilled":
            _, _, self.started_at, self.prefilled_at, reused, self.prefilled_tokens = message
            self.reused_tokens = self.engine.last_reused_tokens = reused
        elif kind == "end":
            _, _, self.ended_at, self.generated, cached = message
            self.slot.cached = list(cached)
            self.engine.pool.release(self.slot)
            self.put(("end", None))
        else:  # "error"
            self.ended_at = time.perf_counter()
            self.slot.cached = []  # its content is unknown now
            self.engine.pool.release(self.slot)
            self.put(("error", message[2]))

    def put(self, *items: tuple) -> None:
        """`items` (one message of the engine process) for the consumer, on
        the loop. The engine process batches tokens (engine_process.SEND_INTERVAL_S),
        so this wakes the loop about as rarely."""
        with self._lock:
            self._pending.extend(items)
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            # The consumer's loop is gone: nobody listens, stop generating.
            self.cancel()

    def _deliver(self) -> None:
        """On the loop: every pending item into the queue, in order."""
        with self._lock:
            items, self._pending = self._pending, []
        for item in items:
            self.queue.put_nowait(item)


# ---- the runner ----------------------------------------------------------------------


def _positive_int(extra: dict, name: str, default: int, maximum: int) -> int:
    value = extra.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ImproperlyConfigured(
            f"extra_params.{name} must be an integer from 1 to {maximum}, got {value!r}"
        )
    return value


def _path_param(extra: dict, name: str, default: Path | None) -> Path | None:
    value = extra.get(name)
    if value in (None, ""):
        return default
    if not isinstance(value, str):
        raise ImproperlyConfigured(f"extra_params.{name} must be a file path string")
    return Path(value).expanduser()


def _sampling_problem(name: str, value: Any) -> str | None:
    if name == "seed" and value is None:
        return None
    problem = check_value(name, value)
    return f"extra_params.{problem}" if problem else None


def _sampling_params(extra: dict) -> dict[str, Any]:
    """The sampling defaults set in extra_params (validated)."""
    params: dict[str, Any] = {}
    for name in SAMPLING_DEFAULTS:
        if name not in extra:
            continue
        problem = _sampling_problem(name, extra[name])
        if problem:
            raise ImproperlyConfigured(problem)
        params[name] = extra[name]
    return params


def _flag(extra: dict, name: str, default: bool) -> bool:
    value = extra.get(name, default)
    if not isinstance(value, bool):
        raise ImproperlyConfigured(f"extra_params.{name} must be true or false")
    return value


class ExecuTorchRunner:
    """The `executorch` runner kind (see the module docstring for the design).

    extra_params: `pte_path`, `tokenizer_path`, `chat_template_path` (default:
    the model `prepare_model` put in MODELS_DIR), `parallelism` (slots, each
    with its own KV cache; default 1), `context_tokens` (the program's
    KV-cache size when it has no manifest), `reuse_kv_cache` (default true),
    and the sampling defaults (`SAMPLING_DEFAULTS`: top_k, top_p,
    repetition_penalty, frequency_penalty, presence_penalty, penalty_window,
    seed, logit_bias) used when a request sets none."""

    kind = "executorch"
    local = True

    def __init__(
        self,
        *,
        name: str,
        model_id: str,
        files: ModelFiles,
        parallelism: int = 1,
        temperature: float = 0.7,
        max_tokens: int = 512,
        context_tokens: int = prepare.MAX_CONTEXT_TOKENS,
        sampling: dict[str, Any] | None = None,
        reuse_kv_cache: bool = True,
    ) -> None:
        self.name = name
        self.model_id = model_id or prepare.MODEL_LABEL
        self.capabilities = frozenset({Capability.LLM})
        self.files = files
        self.parallelism = parallelism
        self.temperature = temperature
        self.max_tokens = max_tokens
        model_context = _model_context_tokens(files) or prepare.MAX_CONTEXT_TOKENS
        self.context_tokens = min(context_tokens, model_context)
        self.sampling = {**SAMPLING_DEFAULTS, **(sampling or {})}
        self.reuse_kv_cache = reuse_kv_cache
        self._engine: _Engine | None = None
        self._load_lock = threading.Lock()

    @classmethod
    def validate_config(cls, config: Any) -> dict[str, str]:
        """Nothing is required (the model `prepare_model` built is the
        default); the sampling defaults in extra_params must be valid; agents
        stay off (this runner does not parse tool calls out of its model's text,
        so the router must never send it an agent turn: docs/agents.md)."""
        extra = config.extra_params if isinstance(config.extra_params, dict) else {}
        problems = [
            problem
            for name in SAMPLING_DEFAULTS
            if name in extra and (problem := _sampling_problem(name, extra[name]))
        ]
        found = {"extra_params": "; ".join(problems)} if problems else {}
        if getattr(config, "enable_agents", False):
            found["enable_agents"] = (
                "The local runner cannot call tools: leave agents off (use a Llama Stack "
                "runner whose model calls tools)."
            )
        return found

    @classmethod
    def from_config(cls, config: Any) -> ExecuTorchRunner:
        """Build from a `RunnerConfig` (its extra_params are described above)."""
        extra = config.extra_params or {}
        if not isinstance(extra, dict):
            raise ImproperlyConfigured("extra_params must be a JSON object")
        models_dir = Path(settings.MODELS_DIR)
        pte = _path_param(extra, "pte_path", models_dir / prepare.PTE_NAME)
        tokenizer = _path_param(extra, "tokenizer_path", models_dir / prepare.TOKENIZER_NAME)
        template = _path_param(extra, "chat_template_path", None)
        assert pte is not None and tokenizer is not None
        files = ModelFiles(pte=pte, tokenizer=tokenizer, chat_template=template)
        context = config.context_tokens
        if "context_tokens" in extra:
            context = min(context, _positive_int(extra, "context_tokens", context, 1_048_576))
        return cls(
            name=config.name,
            model_id=config.model_id,
            files=files,
            parallelism=_positive_int(extra, "parallelism", 1, MAX_PARALLELISM),
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            context_tokens=context,
            sampling=_sampling_params(extra),
            reuse_kv_cache=_flag(extra, "reuse_kv_cache", True),
        )

    # -- lifecycle -----------------------------------------------------------------

    async def load(self) -> None:
        """Load the program and tokenizer (in a thread; once per process)."""
        if self._engine is not None and not self._engine.stopped:
            return
        self._engine = None
        # Already loaded by another config or request: take it without a
        # thread hop, so concurrent first requests still queue in arrival order.
        engine = _loaded_engine(self.files, self.parallelism)
        if engine is not None:
            self._engine = engine
            return
        await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> _Engine:
        with self._load_lock:
            if self._engine is None or self._engine.stopped:
                self._engine = _engine_for(self.files, self.parallelism)
            return self._engine

    async def health(self) -> Health:
        """Cheap: the files exist (and, once loaded, the pool's state)."""
        missing = self.files.missing()
        if missing:
            return Health(ok=False, detail=f"{NOT_PREPARED} (missing {missing[0]})")
        engine = self._engine
        if engine is None or engine.stopped:
            # Perhaps loaded at server start (preload) by another instance.
            with _engines_lock:
                engine = _engines.get(self.files.key())
        if engine is None or engine.stopped:
            # Never loaded, or its engine process stopped (a crash, a kill):
            # the next request starts one.
            return Health(
                ok=True,
                detail=f"{self.program_label()}ready (loads on first request)",
                models=(self.model_id,),
            )
        pool = engine.pool
        return Health(
            ok=True,
            detail=f"{self.program_label()}loaded; {pool.busy()}/{pool.size} busy, "
            f"{pool.queued()} queued",
            models=(self.model_id,),
        )

    def program_label(self) -> str:
        """Which prepared program this runner serves (model and variant, from
        its manifest), for the admin's health column: "" when unknown."""
        manifest = prepare.read_manifest(self.files.pte.parent) or {}
        if not manifest.get("variant"):
            return ""
        return f"{manifest.get('model', 'model')} {manifest['variant']}; "

    def evaluation(self) -> Evaluation | None:
        """What `manage.py evaluate_model` measured of this runner's program on
        this machine (speed, answer agreement with fp32), if it has been."""
        return evaluate.stored(Path(settings.MODEL_CACHE_DIR), self.files.pte.parent)

    async def close(self) -> None:
        """Nothing to release per config: the loaded model is shared by the
        process (other configs may point at the same files)."""
        self._engine = None

    def count_tokens(self, text: str) -> int:
        """Exact count with the model's tokenizer (loaded on first use)."""
        engine = self._engine
        if engine is not None:
            return engine.count_tokens(text)
        try:
            return len(_cached_tokenizer(self.files.tokenizer).encode(text).ids)
        except Exception:
            return max(1, len(text) // 3)

    # -- prompts -----------------------------------------------------------------

    def _fit_prompt(
        self, engine: _Engine, messages: Sequence[ChatMessage], max_new_tokens: int
    ) -> tuple[str, int, int]:
        """(prompt, prompt tokens, dropped turns): the oldest non-system turns
        are dropped whole until the prompt leaves room for the answer."""
        if not messages:
            raise RunnerError(ErrorCode.INVALID_INPUT, "The conversation is empty.")
        budget = self.context_tokens - max_new_tokens
        rendered: dict[int, tuple[str, int]] = {}

        def fits(kept: list[ChatMessage]) -> bool:
            prompt = engine.render(kept)
            rendered[len(kept)] = (prompt, engine.count_tokens(prompt))
            return rendered[len(kept)][1] <= budget

        # The one trimmer (runners.prompt), on the rendered prompt's exact tokens.
        fitted = drop_oldest(messages, fits)
        if fitted is None:
            tokens = min(count for _, count in rendered.values())
            raise RunnerError(
                ErrorCode.INVALID_INPUT,
                f"The message is too long for the local model: it needs {tokens} tokens "
                f"but only {budget} fit (context {self.context_tokens}, "
                f"{max_new_tokens} kept for the answer). Shorten it or use a runner "
                "with a larger context.",
            )
        kept, dropped = fitted
        prompt, tokens = rendered[len(kept)]
        return prompt, tokens, dropped

    # -- measuring -------------------------------------------------------------

    async def greedy_steps(
        self, messages: Sequence[ChatMessage], along: Sequence[int] | None = None, max_new: int = 0
    ) -> list[int]:
        """For measuring the program (runners/executorch/evaluate.py): its
        top-1 token at each step of an answer to `messages`, read from the
        raw logits (no sampling adjustment), the prompt fitted and prefilled
        in full as `stream` does. Without `along` it follows its own choices
        (its greedy answer's tokens, until an end token or `max_new`); with
        `along` each step is fed along's token whatever it chose (teacher
        forcing), so a step that differs does not change the steps after it."""
        await self.load()
        engine = self._engine
        assert engine is not None
        steps = len(along) if along is not None else max_new
        prompt, _, _ = self._fit_prompt(engine, messages, steps)
        prompt_ids = engine.encode(prompt)
        slot = await _acquire(engine, asyncio.get_running_loop())
        slot.cached.clear()  # overwritten from position 0
        try:
            future = slot.process.call(
                "greedy", prompt_ids, along, steps, engine.eos_ids, engine.max_seq_len
            )
            return await asyncio.wrap_future(future)
        except EngineStopped as exc:
            raise RunnerError(ErrorCode.RUNTIME, f"The local model failed: {exc}") from exc
        finally:
            engine.pool.release(slot)

    # -- streaming -------------------------------------------------------------

    def sampling_params(self, request: ChatRequest, temperature: float) -> SamplingParams:
        """The request's sampling parameters over this runner's defaults;
        RunnerError(INVALID_INPUT) for a value out of range."""
        values: dict[str, Any] = dict(self.sampling)
        for name in ("top_p", "top_k", "repetition_penalty", "frequency_penalty"):
            if getattr(request, name) is not None:
                values[name] = getattr(request, name)
        for name in ("presence_penalty", "seed", "logit_bias"):
            if getattr(request, name) is not None:
                values[name] = getattr(request, name)
        values["temperature"] = temperature
        for name, value in values.items():
            if name == "seed" and value is None:
                continue
            if name in BOUNDS or name == "logit_bias":
                problem = check_value(name, value)
                if problem:
                    raise RunnerError(ErrorCode.INVALID_INPUT, problem)
        values["logit_bias"] = logit_bias_ids(values["logit_bias"])
        values["top_k"] = int(values["top_k"])
        values["penalty_window"] = int(values["penalty_window"])
        values["seed"] = None if values["seed"] is None else int(values["seed"])
        return SamplingParams(**values)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        """Answer `request`; see the module docstring. Cancelling the consumer
        (or `aclose()`) stops the generation within about one token; no
        `Done` is produced then."""
        started = time.perf_counter()
        if request.has_images:
            raise RunnerError(
                ErrorCode.INVALID_INPUT, "The local model reads text only; remove the image."
            )
        temperature = self.temperature if request.temperature is None else request.temperature
        if not 0.0 <= temperature <= 2.0:
            raise RunnerError(ErrorCode.INVALID_INPUT, "temperature must be between 0 and 2")
        params = self.sampling_params(request, float(temperature))
        max_tokens = self.max_tokens if request.max_tokens is None else request.max_tokens
        if max_tokens < 1:
            raise RunnerError(ErrorCode.INVALID_INPUT, "max_tokens must be at least 1")
        # Keep at least half of the context for the prompt.
        max_new = min(max_tokens, self.context_tokens // 2)

        await self.load()
        engine = self._engine
        assert engine is not None
        prompt, prompt_tokens, dropped = self._fit_prompt(engine, request.messages, max_new)
        if dropped:
            yield trimmed_notice(dropped, "the local model", self.context_tokens)
        # Whatever room the prompt leaves (never more than asked for).
        max_new = min(max_tokens, self.context_tokens - prompt_tokens)
        prompt_ids = engine.encode(prompt)

        loop = asyncio.get_running_loop()
        # A seeded request is always prefilled in full: a prefix reused from
        # the KV cache gives logits that differ in the last bits (other
        # kernels), which could change a draw, and a seed promises the same
        # answer every time.
        reuse = self.reuse_kv_cache and params.seed is None
        acquired = engine.pool.acquire_nowait(
            loop, prefer=(lambda slot: common_prefix(slot.cached, prompt_ids)) if reuse else None
        )
        if isinstance(acquired, _Waiter):
            waiter = acquired
            try:
                last_position = -1
                while True:
                    position = engine.pool.position(waiter)
                    if position and position != last_position:
                        last_position = position
                        yield Notice(
                            code=NoticeCode.QUEUED,
                            message=f"Waiting for the local model: position {position} in "
                            "the queue.",
                            data={"position": position},
                        )
                    done, _ = await asyncio.wait({waiter.future}, timeout=_QUEUE_POLL_SECONDS)
                    if done:
                        slot = waiter.future.result()
                        break
            except BaseException:
                waiter.future.cancel()
                engine.pool.abandon(waiter)
                raise
        else:
            slot = acquired

        # From here until the generation starts nothing may raise or await:
        # the generation is what returns the slot to the pool.
        gen = _Generation(loop=loop, queue=asyncio.Queue(), engine=engine, slot=slot)
        try:
            gen.start(prompt_ids, params, max_new, reuse)
        except EngineStopped as exc:
            raise RunnerError(ErrorCode.RUNTIME, f"The local model failed: {exc}") from exc
        scanner = StopScanner(request.stop)
        decoder = PieceDecoder(engine.byte_level)
        eos = engine.eos_ids
        tokens = 0
        first_token_at: float | None = None
        finish = "length"
        completed = False
        try:
            while True:
                kind, payload = await gen.queue.get()
                if kind == "token":
                    tokens += 1
                    if payload in eos:
                        text, stopped = scanner.feed(decoder.flush())[0] + scanner.flush(), True
                    else:
                        text, stopped = scanner.feed(decoder.feed(engine.piece(payload)))
                    if text:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield TokenDelta(text)
                    if stopped:
                        finish = "stop"
                        gen.cancel()
                        break
                elif kind == "end":
                    tail = scanner.feed(decoder.flush())[0] + scanner.flush()
                    if tail:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield TokenDelta(tail)
                    finish = "length" if tokens >= max_new else "stop"
                    break
                else:  # "error"
                    raise RunnerError(
                        ErrorCode.RUNTIME, f"The local model failed while generating: {payload}"
                    )
            completed = True
        finally:
            if not completed:
                # Cancelled, or the consumer stopped iterating: the engine
                # process stops before its next token and the slot is freed.
                gen.cancel()
        finished = time.perf_counter()
        yield Done(
            finish_reason=finish,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens),
            timings=_timings(gen, started, first_token_at, finished),
            model_id=self.model_id,
        )


def _timings(
    gen: _Generation, started: float, first_token_at: float | None, finished: float
) -> Timings:
    """TTFT and total from the moment `stream()` was called (they include
    queueing and prompt formatting: what the user waits for); prefill and
    decode rates from the worker's own clock (prefill counts only the tokens
    actually computed, not those reused from the KV cache)."""
    prefill = decode = None
    if gen.prefilled_at > gen.started_at > 0 and gen.prefilled_tokens:
        prefill = gen.prefilled_tokens / (gen.prefilled_at - gen.started_at)
    # The first token comes from the prefill; each later one is a forward call.
    ended = gen.ended_at or finished
    if gen.generated > 1 and ended > gen.prefilled_at > 0:
        decode = (gen.generated - 1) / (ended - gen.prefilled_at)
    return Timings(
        time_to_first_token_ms=None
        if first_token_at is None
        else round((first_token_at - started) * 1000, 1),
        total_ms=round((finished - started) * 1000, 1),
        tokens_per_second=None if decode is None else round(decode, 1),
        prefill_tokens_per_second=None if prefill is None else round(prefill, 1),
    )


_tokenizers: dict[str, Any] = {}


def _cached_tokenizer(path: Path) -> Any:
    key = str(path)
    if key not in _tokenizers:
        _tokenizers[key] = _load_tokenizer(path)
    return _tokenizers[key]
