"""The local runner: an ExecuTorch program run by ExecuTorch's `TextLLMRunner`.

One `_Engine` per model file pair and process (module-level cache, shared by
every `RunnerConfig` pointing at the same files) holds the tokenizer, the chat
template and a pool of `TextLLMRunner` instances ("slots"). Each slot owns one
KV cache, so one slot serves one generation at a time; requests beyond the
pool wait in a FIFO queue and are told their position.

A generation runs `TextLLMRunner.generate` in a worker thread. Its token
callback hands each text piece to the request's event loop with
`call_soon_threadsafe`; the async side turns pieces into `TokenDelta`s,
holding back any tail that could be the start of a stop string or of the end
marker, so neither ever leaks into the answer. Cancelling calls the runner's
`stop()`, which the C++ loop checks before every token; the worker thread
resets the KV cache and returns the slot to the pool on its own, so the
cancelled stream can return at once.

The engine uses only thread-safe state (locks, not asyncio primitives): it
outlives any one event loop (tests run each in a fresh loop).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import json
import logging
import os
import tempfile
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
    RunnerError,
    Timings,
    TokenDelta,
    Usage,
)
from runners.executorch import prepare
from runners.prompt import drop_oldest, trimmed_notice

log = logging.getLogger(__name__)

NOT_PREPARED = "The local model is not prepared: run `python manage.py prepare_model`"
# Text the model uses to end (or wrongly begin) a turn; never part of an answer.
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
MAX_PARALLELISM = 8
# Tokens per native call. export_llama bounds a forward call at
# max_seq_length - 1 (1023) tokens but tells TextLLMRunner 1024, so the native
# runner's own chunking fails on any prompt of 1024+ tokens ("Attempted to
# resize a bounded tensor ... 1023 ... to 1024"); we prefill in smaller chunks.
PREFILL_CHUNK_TOKENS = 1000
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
    """One `TextLLMRunner` (one KV cache)."""

    def __init__(self, index: int, native: Any) -> None:
        self.index = index
        self.native = native


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

    def acquire_nowait(self, loop: asyncio.AbstractEventLoop) -> _Slot | _Waiter:
        with self._lock:
            # A free slot goes to a newcomer only when nobody is queued.
            if self._free and not self._waiters:
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


class _Engine:
    """A loaded model: tokenizer, chat template and a pool of native runners."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files
        self.pool = _SlotPool()
        self._grow_lock = threading.Lock()
        self.tokenizer = _load_tokenizer(files.tokenizer)
        self.native_tokenizer, self.byte_level = _runner_tokenizer(files.tokenizer)
        self.chat_template = _load_chat_template(files)
        self._template = _compile_template(self.chat_template)
        self.model_context_tokens = _model_context_tokens(files)
        self.load_seconds = 0.0

    def ensure_slots(self, count: int) -> None:
        """Grow the pool to `count` native runners (blocking: call in a thread)."""
        with self._grow_lock:
            while self.pool.size < count:
                started = time.monotonic()
                native = _new_native_runner(self.files.pte, self.native_tokenizer)
                self.load_seconds += time.monotonic() - started
                self.pool.add(_Slot(self.pool.size, native))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def split_prompt(self, prompt: str, limit: int = PREFILL_CHUNK_TOKENS) -> list[str]:
        """`prompt` cut into pieces of at most `limit` tokens. Cuts fall just
        before a token that starts a word, a line or a special token, where
        byte-level BPE splits anyway, so each piece tokenizes exactly as its
        part of the whole did."""
        encoding = self.tokenizer.encode(prompt, add_special_tokens=False)
        tokens, offsets = encoding.tokens, encoding.offsets
        chunks: list[str] = []
        first_token = first_char = 0
        while len(tokens) - first_token > limit:
            cut = first_token + limit
            for i in range(first_token + limit, first_token + limit // 2, -1):
                if tokens[i].startswith(("Ġ", "Ċ", "<|")):
                    cut = i
                    break
            chunks.append(prompt[first_char : offsets[cut][0]])
            first_token, first_char = cut, offsets[cut][0]
        chunks.append(prompt[first_char:])
        return chunks

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


_native_ops_lock = threading.Lock()
_native_ops_loaded = False


def _runner_tokenizer(path: Path) -> tuple[Path, bool]:
    """(tokenizer file for the native runner, whether pieces are byte-level).

    For a byte-level BPE tokenizer, a copy without its decoder (see
    `PieceDecoder` for why), kept in the model cache under its content hash."""
    content = path.read_bytes()
    data = json.loads(content)
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return path, False
    data["decoder"] = None
    digest = hashlib.sha256(content).hexdigest()[:24]
    for directory in (Path(settings.MODEL_CACHE_DIR) / "runtime", Path(tempfile.gettempdir())):
        target = directory / f"tokenizer-bytes-{digest}.json"
        if target.is_file():
            return target, True
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, target)
            return target, True
        except OSError:
            continue
    raise OSError("no writable directory for the runner's tokenizer copy")


def _new_native_runner(pte: Path, tokenizer: Path) -> Any:
    global _native_ops_loaded
    with _native_ops_lock:
        if not _native_ops_loaded:
            # Register the custom SDPA and quantized-embedding kernels the
            # exported program calls; without them loading fails with
            # "Missing operator llama::custom_sdpa.out" / "embedding_byte".
            import executorch.extension.llm.custom_ops.custom_ops
            import executorch.kernels.quantized  # noqa: F401 (registers kernels)

            _native_ops_loaded = True
    from executorch.extension.llm.runner import TextLLMRunner

    return TextLLMRunner(str(pte), str(tokenizer))


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
        if engine is None:
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
            # generations still running keep their own reference.
            paths = tuple(part[0] for part in key)
            for stale in [k for k in _engines if tuple(part[0] for part in k) == paths]:
                del _engines[stale]
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
    return engine if engine is not None and engine.pool.size >= slots else None


def forget_engines() -> None:
    """Drop every loaded model (tests)."""
    with _engines_lock:
        _engines.clear()


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
    """Turns the native runner's token pieces into text, never splitting a
    character.

    Why: ExecuTorch's binding hands each token's text to Python as `str`, and
    a byte-level BPE token can end inside a multi-byte UTF-8 character
    (emoji, accents, CJK); with the tokenizer's own decoder such a piece makes
    the binding raise UnicodeDecodeError and abort the generation. So the
    native runner gets a copy of tokenizer.json without its decoder (see
    `_runner_tokenizer`): pieces then arrive in the byte-level alphabet (all
    valid UTF-8), and this class maps them back to bytes and decodes them
    incrementally, holding an incomplete character until its last byte.
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
    """State shared by the worker thread and the async consumer of one request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    native: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    first_piece_at: float = 0.0

    def put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            # The consumer's loop is gone: nobody listens, stop generating.
            self.cancelled.set()
            self.native.stop()

    def on_token(self, piece: Any) -> None:
        if not self.first_piece_at:
            self.first_piece_at = time.perf_counter()
        if self.cancelled.is_set():
            self.native.stop()
            return
        self.put(("token", piece))

    def on_stats(self, stats: Any) -> None:
        self.put(("stats", _stats_dict(stats)))


def _stats_dict(stats: Any) -> dict[str, float]:
    names = (
        "num_prompt_tokens",
        "num_generated_tokens",
        "inference_start_ms",
        "prompt_eval_end_ms",
        "first_token_ms",
        "inference_end_ms",
    )
    return {name: float(getattr(stats, name, 0) or 0) for name in names}


def _run_generation(
    pool: _SlotPool, slot: _Slot, gen: _Generation, chunks: list[str], config: Any
) -> None:
    """Worker thread body: prefill all chunks but the last, generate from the
    last, then reset the KV cache and free the slot."""
    gen.started_at = time.perf_counter()
    try:
        for chunk in chunks[:-1]:
            if gen.cancelled.is_set():
                break
            slot.native.prefill(chunk, config)
        else:
            slot.native.generate(chunks[-1], config, gen.on_token, gen.on_stats)
        gen.put(("end", None))
    except BaseException as exc:
        gen.put(("error", exc))
    finally:
        try:
            slot.native.reset()
        except Exception:
            log.exception("Resetting the local model's KV cache failed")
        pool.release(slot)


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


class ExecuTorchRunner:
    """The `executorch` runner kind (see the module docstring for the design).

    extra_params: `pte_path`, `tokenizer_path`, `chat_template_path` (default:
    the model `prepare_model` put in MODELS_DIR), `parallelism` (native runner
    instances, each with its own KV cache; default 1), `context_tokens` (the
    program's KV-cache size when it has no manifest)."""

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
        self._engine: _Engine | None = None
        self._load_lock = threading.Lock()

    @classmethod
    def validate_config(cls, config: Any) -> dict[str, str]:
        """Nothing is required: the model `prepare_model` built is the default."""
        return {}

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
        )

    # -- lifecycle -----------------------------------------------------------------

    async def load(self) -> None:
        """Load the program and tokenizer (in a thread; once per process)."""
        if self._engine is not None:
            return
        # Already loaded by another config or request: take it without a
        # thread hop, so concurrent first requests still queue in arrival order.
        engine = _loaded_engine(self.files, self.parallelism)
        if engine is not None:
            self._engine = engine
            return
        await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> _Engine:
        with self._load_lock:
            if self._engine is None:
                self._engine = _engine_for(self.files, self.parallelism)
            return self._engine

    async def health(self) -> Health:
        """Cheap: the files exist (and, once loaded, the pool's state)."""
        missing = self.files.missing()
        if missing:
            return Health(ok=False, detail=f"{NOT_PREPARED} (missing {missing[0]})")
        engine = self._engine
        if engine is None:
            # Perhaps loaded at server start (preload) by another instance.
            with _engines_lock:
                engine = _engines.get(self.files.key())
            if engine is None:
                return Health(
                    ok=True, detail="ready (loads on first request)", models=(self.model_id,)
                )
        pool = engine.pool
        return Health(
            ok=True,
            detail=f"loaded; {pool.busy()}/{pool.size} busy, {pool.queued()} queued",
            models=(self.model_id,),
        )

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

    # -- streaming -------------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        """Answer `request`; see the module docstring. Cancelling the consumer
        (or `aclose()`) stops the native generation within about one token;
        no `Done` is produced then."""
        started = time.perf_counter()
        if request.has_images:
            raise RunnerError(
                ErrorCode.INVALID_INPUT, "The local model reads text only; remove the image."
            )
        temperature = self.temperature if request.temperature is None else request.temperature
        if not 0.0 <= temperature <= 2.0:
            raise RunnerError(ErrorCode.INVALID_INPUT, "temperature must be between 0 and 2")
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
        from executorch.extension.llm.runner import GenerationConfig

        # warming=True only stops the native runner from echoing every token
        # and its report to the server's stdout; callbacks and stats still run.
        config = GenerationConfig(
            echo=False, max_new_tokens=max_new, temperature=float(temperature), warming=True
        )
        chunks = engine.split_prompt(prompt)

        loop = asyncio.get_running_loop()
        acquired = engine.pool.acquire_nowait(loop)
        if isinstance(acquired, _Waiter):
            waiter = acquired
            try:
                last_position = -1
                while True:
                    position = engine.pool.position(waiter)
                    if position and position != last_position:
                        last_position = position
                        yield Notice(
                            code="queued",
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

        # From here until the worker starts nothing may raise or await: the
        # worker is what returns the slot to the pool.
        gen = _Generation(loop=loop, queue=asyncio.Queue(), native=slot.native)
        worker = threading.Thread(
            target=_run_generation,
            args=(engine.pool, slot, gen, chunks, config),
            name=f"executorch-gen-{slot.index}",
            daemon=True,
        )
        scanner = StopScanner(request.stop)
        decoder = PieceDecoder(engine.byte_level)
        pieces = 0
        first_token_at: float | None = None
        stats: dict[str, float] = {}
        finish = "length"
        completed = False
        worker.start()
        try:
            while True:
                kind, payload = await gen.queue.get()
                if kind == "token":
                    pieces += 1
                    text, stopped = scanner.feed(decoder.feed(payload))
                    if text:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield TokenDelta(text)
                    if stopped:
                        finish = "stop"
                        gen.cancelled.set()
                        slot.native.stop()
                        # The stats arrive once the native loop has noticed.
                        stats = await _drain_stats(gen.queue)
                        break
                elif kind == "stats":
                    stats = payload
                elif kind == "end":
                    tail = scanner.feed(decoder.flush())[0] + scanner.flush()
                    if tail:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield TokenDelta(tail)
                    finish = "length" if pieces >= max_new else "stop"
                    break
                else:  # "error"
                    raise RunnerError(
                        ErrorCode.RUNTIME, f"The local model failed while generating: {payload}"
                    )
            completed = True
        finally:
            if not completed:
                # Cancelled, or the consumer stopped iterating: stop the native
                # loop; the worker resets and frees the slot by itself.
                gen.cancelled.set()
                slot.native.stop()
        finished = time.perf_counter()
        # One callback per generated token (the native count leaves out the
        # token produced by the prefill).
        completion_tokens = pieces
        yield Done(
            finish_reason=finish,
            # Our count: the native stats only see the last prefill chunk.
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            timings=_timings(stats, started, first_token_at, finished, gen, prompt_tokens),
            model_id=self.model_id,
        )


async def _drain_stats(queue: asyncio.Queue, wait_seconds: float = 2.0) -> dict[str, float]:
    """Wait briefly for the native runner's stats after a stop."""
    deadline = time.monotonic() + wait_seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            kind, payload = await asyncio.wait_for(queue.get(), remaining)
        except TimeoutError:
            break
        if kind == "stats":
            return payload
        if kind in ("end", "error"):
            break
    return {}


def _timings(
    stats: dict[str, float],
    started: float,
    first_token_at: float | None,
    finished: float,
    gen: _Generation,
    prompt_tokens: int,
) -> Timings:
    """TTFT and total from our own clock (they include queueing and prompt
    formatting: what the user waits for); decode rate from the native stats;
    prefill rate from the native stats too unless the prompt was prefilled in
    chunks (they see only the last), then from the worker's clock."""
    decode = prefill = None
    if stats:
        chunked = stats["num_prompt_tokens"] < prompt_tokens
        prompt_ms = stats["prompt_eval_end_ms"] - stats["inference_start_ms"]
        if chunked and gen.first_piece_at > gen.started_at > 0:
            prefill = prompt_tokens / (gen.first_piece_at - gen.started_at)
        elif not chunked and prompt_ms > 0:
            prefill = stats["num_prompt_tokens"] / prompt_ms * 1000
        decode_ms = stats["inference_end_ms"] - stats["prompt_eval_end_ms"]
        if decode_ms > 0 and stats["num_generated_tokens"] > 0:
            decode = stats["num_generated_tokens"] / decode_ms * 1000
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
