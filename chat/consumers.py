"""The chat websocket, `/ws/chat/` (protocol: docs/websocket.md).

Channels hands a consumer one frame at a time, so every generation runs in an
asyncio.Task the consumer owns: `stop` and disconnect can cancel it while it
streams (django/channels#1119). Each task's frames go through a `FrameOutbox`
that merges pending token texts, so the generation never waits on the socket
and a slow reader gets fewer, larger token frames instead of an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from channels.db import aclose_old_connections, database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from accounts.revocation import credential_still_valid, groups_for
from accounts.ws_auth import CLOSE_UNAUTHENTICATED
from chat import services
from chat.pipeline import GuardianBlocked, Routed, Sources, TurnInput, run_turn
from chat.services import ChatError, TurnOutcome, TurnStart
from runners.base import Done, Notice, RunnerError, TokenDelta, ToolCall, ToolResult, unencodable

log = logging.getLogger(__name__)

# A frame larger than this is refused with `frame_too_large` (Daphne must let
# it through: run it with --websocket-max-message-size above this).
MAX_FRAME_BYTES = settings.CHAT_MAX_FRAME_BYTES
MAX_TEXT_CHARS = 100_000
MAX_IMAGES = 4
MAX_REQUEST_ID_CHARS = 128
MAX_COLLECTIONS = 100
# RunnerConfig.name is a slug of at most 100 characters.
MAX_RUNNER_NAME_CHARS = 100
# The answer so far is saved at most this often while it streams.
FLUSH_INTERVAL_SECONDS = 0.5
# After a token frame, the next one waits this long, gathering what arrives
# meanwhile: at most 40 token frames a second per answer, whatever the model's
# pace (smooth to read; fewer frames leave the CPU to the model).
TOKEN_FRAME_INTERVAL_SECONDS = settings.CHAT_TOKEN_FRAME_INTERVAL_MS / 1000

GENERATING_TYPES = ("message", "regenerate", "edit")


class FrameError(Exception):
    """A client frame we cannot act on; answered with an `error` frame."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.request_id: str | None = None


# ---- frame parsing -----------------------------------------------------------------


@dataclass(frozen=True)
class GenerateFrame:
    """A parsed `message`, `regenerate` or `edit` frame."""

    type: str
    request_id: str
    conversation_id: int | None = None
    message_id: int | None = None
    text: str = ""
    images: tuple[str, ...] = ()
    runner: str | None = None
    rag: bool | None = None
    collections: tuple[int, ...] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _field(frame: dict, name: str, kind: type | tuple, *, required: bool = False) -> Any:
    value = frame.get(name)
    if value is None:
        if required:
            raise FrameError("missing_field", f"`{name}` is required in a `{frame['type']}` frame.")
        return None
    # bool is an int in Python; an id or a count must not be `true`.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise FrameError(
            "bad_field", f"`{name}` must be {_kind_name(kind)}, got {type(value).__name__}."
        )
    if isinstance(value, str):
        _check_storable(name, value)
    return value


def _check_storable(name: str, text: str) -> None:
    """Text that no tokenizer or database takes (a lone UTF-16 surrogate from a
    JSON escape, or a NUL, which PostgreSQL refuses) is the client's mistake:
    `invalid_input`, before anything is saved."""
    problem = unencodable(text)
    if problem is None and "\x00" in text:
        problem = f"a NUL character at character {text.index(chr(0))}"
    if problem:
        raise FrameError("invalid_input", f"`{name}` contains {problem}; send valid text.")


# Database ids are positive 64-bit integers; anything else names nothing.
MAX_ID = 2**63 - 1


def _short(value: int) -> str:
    text = str(value) if value.bit_length() < 200 else f"{str(value)[:20]}…"
    return text


def _id(frame: dict, name: str, what: str, *, required: bool = False) -> int | None:
    """An id field: an integer (not a bool, not a float); one outside
    1..2**63-1 cannot exist, so it is `not_found` without asking the database."""
    value = _field(frame, name, int, required=required)
    if value is not None and not 1 <= value <= MAX_ID:
        raise FrameError("not_found", f"{what} {_short(value)} was not found.")
    return value


def _kinds(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
    names |= {dict: "an object", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in _kinds(kind))


def _params(frame: dict) -> dict[str, Any]:
    raw = _field(frame, "params", dict) or {}
    params: dict[str, Any] = {}
    limits = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}
    for name, (low, high) in limits.items():
        value = raw.get(name)
        if value is None:
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not low <= value <= high:
            raise FrameError("bad_field", f"`params.{name}` must be a number from {low} to {high}.")
        params[name] = float(value)
    value = raw.get("max_tokens")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32768:
            raise FrameError("bad_field", "`params.max_tokens` must be an integer from 1 to 32768.")
        params["max_tokens"] = value
    unknown = sorted(set(raw) - {"temperature", "top_p", "max_tokens"})
    if unknown:
        raise FrameError("bad_field", f"Unknown generation parameter `params.{unknown[0][:40]}`.")
    return params


def _text(frame: dict, *, allow_empty: bool) -> str:
    text = _field(frame, "text", str, required=not allow_empty) or ""
    if not allow_empty and not text.strip():
        raise FrameError("missing_field", "`text` must not be empty.")
    if len(text) > MAX_TEXT_CHARS:
        raise FrameError(
            "text_too_long",
            f"The message is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}.",
        )
    return text


def parse_generate_frame(frame: dict, request_id: str) -> GenerateFrame:
    """Check a `message`/`regenerate`/`edit` frame's fields (types, limits);
    images are checked separately (decoding them is slow). Raises FrameError."""
    kind = frame["type"]
    runner = _field(frame, "runner", str)
    rag = _field(frame, "rag", bool)
    collections = _field(frame, "collections", list)
    if collections is not None:
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in collections):
            raise FrameError("bad_field", "`collections` must be a list of collection ids.")
        if len(collections) > MAX_COLLECTIONS:
            raise FrameError("bad_field", f"At most {MAX_COLLECTIONS} collections per message.")
        for c in collections:
            if not 1 <= c <= MAX_ID:
                raise FrameError("not_found", f"Collection {_short(c)} was not found.")
    if runner is not None and len(runner) > MAX_RUNNER_NAME_CHARS:
        raise FrameError("unknown_runner", "There is no enabled runner with that name.")
    common = {
        "type": kind,
        "request_id": request_id,
        "runner": runner,
        "rag": rag,
        "collections": tuple(collections) if collections is not None else None,
        "params": _params(frame),
    }
    if kind == "message":
        images = _field(frame, "images", list) or []
        if len(images) > MAX_IMAGES:
            raise FrameError("too_many_images", f"At most {MAX_IMAGES} images per message.")
        if not all(isinstance(i, str) for i in images):
            raise FrameError("bad_field", "`images` must be a list of data URLs.")
        for index, image in enumerate(images):
            _check_storable(f"images[{index}]", image)
        return GenerateFrame(
            conversation_id=_id(frame, "conversation_id", "Conversation"),
            text=_text(frame, allow_empty=bool(images)),
            images=tuple(images),
            **common,
        )
    conversation_id = _id(frame, "conversation_id", "Conversation", required=True)
    if kind == "regenerate":
        return GenerateFrame(conversation_id=conversation_id, **common)
    return GenerateFrame(
        conversation_id=conversation_id,
        message_id=_id(frame, "message_id", "Message", required=True),
        text=_text(frame, allow_empty=False),
        **common,
    )


def validate_images(images: tuple[str, ...]) -> tuple[str, ...]:
    """Decode every image; the validated data URLs (EXIF stripped, MIME type
    corrected). Raises FrameError(bad_image) naming the image and the problem."""
    from runners.images import validate_image_data_url

    checked = []
    for index, data_url in enumerate(images, start=1):
        try:
            checked.append(validate_image_data_url(data_url).data_url)
        except RunnerError as exc:
            prefix = f"Image {index}: " if len(images) > 1 else ""
            raise FrameError("bad_image", prefix + exc.message) from None
    return tuple(checked)


# ---- outgoing frames ----------------------------------------------------------------


class FrameOutbox:
    """The frames of one request, sent in order by a writer task.

    `put` never waits. A token frame put while the previous token frame is
    still queued is merged into it, so the queue holds at most one token frame
    (plus the few non-token frames): a client that reads slowly receives fewer,
    larger frames and neither stalls the generation nor grows memory beyond
    the answer's own text. After a token frame is sent, further tokens are
    held for `interval` (merging meanwhile); any other frame, `flush()` or
    `close()` sends everything at once.
    """

    def __init__(self, send: Callable[[dict], Awaitable[None]], interval: float) -> None:
        self._send = send
        self._interval = interval
        self._frames: deque[dict] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._hold_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.frames_sent = 0
        self._task = asyncio.create_task(self._drain())

    def put(self, frame: dict) -> None:
        if frame["type"] == "token":
            tail = self._frames[-1] if self._frames else None
            if tail is not None and tail["type"] == "token":
                tail["_parts"].append(frame["text"])
            else:
                self._frames.append({**frame, "_parts": [frame["text"]]})
            if self._loop.time() < self._hold_until:
                # One timer per hold, not one per token.
                if self._timer is None:
                    self._timer = self._loop.call_at(self._hold_until, self._release)
                return
        else:
            self._frames.append(frame)
        self._wake.set()

    def flush(self) -> None:
        """Send the pending tokens now (the answer ended)."""
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._frames)

    def _release(self) -> None:
        self._timer = None
        self._wake.set()

    async def _drain(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                sent_token = False
                while self._frames:
                    frame = self._frames.popleft()
                    if frame["type"] == "token":
                        frame["text"] = "".join(frame.pop("_parts"))
                        sent_token = True
                    try:
                        await self._send(frame)
                    except Exception:  # the socket is gone; the answer is saved regardless
                        log.debug("dropping frames of a closed socket", exc_info=True)
                        self._frames.clear()
                        return
                    self.frames_sent += 1
                if self._closing:
                    return
                if sent_token:
                    self._hold_until = self._loop.time() + self._interval
        finally:
            if self._timer is not None:
                self._timer.cancel()

    async def close(self) -> None:
        """Send what is queued, then stop."""
        self._closing = True
        self._wake.set()
        await self._task


# Generations whose socket has gone, still being written and saved.
_detached: set[asyncio.Task] = set()


async def finish_detached(*, cancel: bool = False, wait_seconds: float = 30.0) -> None:
    """Wait for (or stop) the generations that outlived their socket: tests
    and graceful shutdowns use it."""
    tasks = list(_detached)
    if cancel:
        for task in tasks:
            task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=wait_seconds)


@dataclass
class Generation:
    task: asyncio.Task
    conversation_id: int | None


# ---- the consumer --------------------------------------------------------------------


class ChatConsumer(AsyncWebsocketConsumer):
    """`/ws/chat/`: one socket, any number of requests kept apart by request_id."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            # Accepted, then closed: a refusal before accepting is an HTTP 403
            # that browsers report only as 1006 (see accounts.ws_auth).
            await self.accept()
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.generations: dict[str, Generation] = {}
        self.closed = False
        self.documents_group = f"documents.user.{user.pk}"
        # The groups through which revoking the key, logging out or
        # deactivating the user ends this socket (accounts.revocation).
        self.credential_groups = groups_for(self.scope)
        for group in (self.documents_group, *self.credential_groups):
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        # Checked after joining the groups: a revocation between the
        # handshake's authentication and now is not missed.
        if not await database_sync_to_async(credential_still_valid)(self.scope):
            await self.credential_ended({"reason": "The credential is no longer valid."})

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if not hasattr(self, "generations"):
            return  # refused at the handshake
        tasks = [g.task for g in self.generations.values()]
        if settings.CHAT_CONTINUE_AFTER_DISCONNECT:
            # A reload, a flaky network or a proxy's idle timeout must not cut
            # the answer short: it goes on being written and saved (every
            # ~0.5 s), and the reloaded page shows it growing until it is done.
            # Only an explicit `stop` ends a generation early. The user's
            # concurrency slot stays taken until it finishes.
            for task in tasks:
                _detached.add(task)
                task.add_done_callback(_detached.discard)
        else:
            for task in tasks:
                if not task.cancelling():
                    task.cancel()
            # Each task saves its partial answer as `stopped` before it ends.
            await asyncio.gather(*tasks, return_exceptions=True)
        for group in (self.documents_group, *self.credential_groups):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def credential_ended(self, event: dict) -> None:
        """The key was revoked, the session logged out or the user deactivated
        (a channel-layer message, from any process): stop every answer of this
        socket (each is saved as `stopped` and ends with its `done` frame),
        say why, and close with 4401. Answers never outlive the credential."""
        if self.closed:
            return
        tasks = [g.task for g in self.generations.values()]
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.send_error(None, "credential_ended", str(event.get("reason", ""))[:200])
        self.closed = True
        await self.close(code=CLOSE_UNAUTHENTICATED)

    # ---- incoming -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        """Answer one client frame. Whatever it holds, the socket stays open:
        a frame we cannot act on gets an `error` frame, and so does a bug
        (`internal_error`, details only in the server log)."""
        request_id = None
        try:
            await self._receive(text_data)
        except FrameError as exc:
            request_id = exc.request_id
            await self.send_error(request_id, exc.code, exc.message, retryable=exc.retryable)
        except Exception:
            log.exception("a chat frame could not be handled")
            await self.send_error(
                None, "internal_error", "The frame could not be handled.", retryable=True
            )

    async def _receive(self, text_data: str | None) -> None:
        request_id = None
        try:
            if text_data is None:
                raise FrameError("bad_frame", "Send JSON text frames, not binary ones.")
            if len(text_data) > MAX_FRAME_BYTES or (
                len(text_data) * 4 > MAX_FRAME_BYTES
                and len(text_data.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES
            ):
                raise FrameError(
                    "frame_too_large",
                    f"The frame is larger than {MAX_FRAME_BYTES // (1024 * 1024)} MB; "
                    "send smaller images.",
                )
            try:
                frame = json.loads(text_data)
            except RecursionError:
                raise FrameError("bad_json", "The frame's JSON is nested too deeply.") from None
            except ValueError:
                # Also numbers beyond Python's digit limit.
                raise FrameError("bad_json", "The frame is not valid JSON.") from None
            if not isinstance(frame, dict):
                raise FrameError("bad_frame", "A frame must be a JSON object with a `type`.")
            raw_id = frame.get("request_id")
            if (
                isinstance(raw_id, str)
                and 0 < len(raw_id) <= MAX_REQUEST_ID_CHARS
                and unencodable(raw_id) is None
            ):
                request_id = raw_id
            kind = frame.get("type")
            if not isinstance(kind, str):
                raise FrameError("missing_field", "`type` is required (a string).")
            if kind == "ping":
                await self.send_frame({"type": "pong", "request_id": request_id})
                return
            if kind not in (*GENERATING_TYPES, "stop"):
                raise FrameError(
                    "unknown_type",
                    f"Unknown frame type {kind[:40]!r}; expected message, stop, "
                    "regenerate, edit or ping.",
                )
            if request_id is None:
                raise FrameError(
                    "missing_field" if raw_id is None else "bad_field",
                    f"`request_id` must be a non-empty string of at most "
                    f"{MAX_REQUEST_ID_CHARS} characters.",
                )
            if kind == "stop":
                await self.stop(request_id)
            else:
                await self.start(parse_generate_frame(frame, request_id))
        except FrameError as exc:
            exc.request_id = request_id
            raise

    async def stop(self, request_id: str) -> None:
        generation = self.generations.get(request_id)
        if generation is None:
            raise FrameError("not_running", f"No answer is being generated for {request_id!r}.")
        generation.task.cancel()

    async def start(self, frame: GenerateFrame) -> None:
        if frame.request_id in self.generations:
            raise FrameError(
                "duplicate_request_id", f"Request {frame.request_id!r} is already running."
            )
        if frame.conversation_id is not None and any(
            g.conversation_id == frame.conversation_id for g in self.generations.values()
        ):
            raise FrameError(
                "conversation_busy",
                "This conversation is still answering; stop it or wait for it to finish.",
                retryable=True,
            )
        images = frame.images
        if images:
            images = await asyncio.to_thread(validate_images, images)
        user_id = self.user.pk
        decision = await services.allow_message(user_id)
        if not decision.allowed:
            message = (
                f"You can send {settings.CHAT_MESSAGES_PER_MINUTE} messages a minute; "
                f"try again in {decision.retry_after} s."
            )
            frame_out = _error_frame(frame.request_id, "rate_limited", message, True)
            await self.send_frame({**frame_out, "retry_after_s": decision.retry_after})
            return
        if not await services.acquire_generation_slot(user_id):
            message = (
                f"You already have {settings.CHAT_MAX_CONCURRENT_PER_USER} answers "
                "being generated; stop one or wait for it to finish."
            )
            frame_out = _error_frame(frame.request_id, "rate_limited", message, True)
            await self.send_frame({**frame_out, "retry_after_s": services.SLOT_RETRY_AFTER_SECONDS})
            return
        outbox = FrameOutbox(self.send_frame, TOKEN_FRAME_INTERVAL_SECONDS)
        task = asyncio.create_task(self._generate(frame, images, outbox, time.monotonic()))
        self.generations[frame.request_id] = Generation(task, frame.conversation_id)

    # ---- one generation, in its own task -----------------------------------------

    async def _begin(self, frame: GenerateFrame, images: tuple[str, ...]) -> TurnStart:
        if frame.type == "message":
            return await database_sync_to_async(services.begin_message)(
                self.user,
                conversation_id=frame.conversation_id,
                text=frame.text,
                images=images,
                runner=frame.runner,
                rag=frame.rag,
                collection_ids=frame.collections,
            )
        if frame.type == "regenerate":
            return await database_sync_to_async(services.begin_regenerate)(
                self.user, conversation_id=frame.conversation_id
            )
        return await database_sync_to_async(services.begin_edit)(
            self.user,
            conversation_id=frame.conversation_id,
            message_id=frame.message_id,
            text=frame.text,
        )

    async def _generate(
        self, frame: GenerateFrame, images: tuple[str, ...], outbox: FrameOutbox, t0: float
    ) -> None:
        rid = frame.request_id
        try:
            # Shielded: once the turn is saved we must know its ids, even if
            # stop or disconnect arrives meanwhile, to mark the answer stopped.
            begin = asyncio.ensure_future(self._begin(frame, images))
            try:
                start = await asyncio.shield(begin)
                cancelled = False
            except asyncio.CancelledError:
                _uncancel()
                start = await begin
                cancelled = True
            except ChatError as exc:
                outbox.put(_error_frame(rid, exc.code, exc.message, exc.retryable))
                return
            self.generations[rid].conversation_id = start.conversation_id
            outbox.put(
                {
                    "type": "accepted",
                    "request_id": rid,
                    "conversation_id": start.conversation_id,
                    "user_message_id": start.user_message_id,
                    "assistant_message_id": start.assistant_message_id,
                    "title": start.title,
                }
            )
            await self._stream(frame, start, outbox, t0, cancelled=cancelled)
        except ChatError as exc:  # raised by a shielded begin after a cancel
            outbox.put(_error_frame(rid, exc.code, exc.message, exc.retryable))
        except Exception:
            log.exception("chat request %s failed before streaming", rid)
            outbox.put(_error_frame(rid, "internal_error", "The message could not be saved.", True))
        finally:
            self.generations.pop(rid, None)
            await services.release_generation_slot(self.user.pk)
            await outbox.close()

    async def _stream(
        self,
        frame: GenerateFrame,
        start: TurnStart,
        outbox: FrameOutbox,
        t0: float,
        *,
        cancelled: bool,
    ) -> None:
        rid = frame.request_id
        message_id = start.assistant_message_id
        saver = streaming_saver()
        parts: list[str] = []
        routed: Routed | None = None
        done: Done | None = None
        sources: list[dict] = []
        first_token_at: float | None = None
        status = "complete"
        error: tuple[str, str, bool] | None = None
        pinned = start.pinned_runner
        if frame.runner is not None:
            pinned = None if frame.runner == "auto" else frame.runner
        turn = TurnInput(
            user=self.user,
            messages=start.history,
            rag=start.rag if frame.rag is None else frame.rag,
            collection_ids=start.collection_ids,
            pinned_runner=pinned,
            temperature=frame.params.get("temperature"),
            top_p=frame.params.get("top_p"),
            max_tokens=frame.params.get("max_tokens"),
            source="chat",
            message_id=message_id,
            request_id=rid,
        )
        try:
            if cancelled:
                raise asyncio.CancelledError
            async for event in run_turn(turn):
                if isinstance(event, TokenDelta):
                    if not event.text:
                        continue
                    now = time.monotonic()
                    if first_token_at is None:
                        first_token_at = now
                    parts.append(event.text)
                    outbox.put({"type": "token", "request_id": rid, "text": event.text})
                    # The list itself: the saver joins it when it writes.
                    saver.mark(message_id, parts)
                elif isinstance(event, Routed):
                    routed = event
                    outbox.put(
                        {
                            "type": "routed",
                            "request_id": rid,
                            "runner": event.runner_name,
                            "model": event.model_id,
                            "fallback": event.fallback,
                            "attempts": list(event.attempts),
                        }
                    )
                elif isinstance(event, Sources):
                    sources = [dict(s) for s in event.sources]
                    outbox.put({"type": "sources", "request_id": rid, "sources": sources})
                elif isinstance(event, Notice):
                    outbox.put(
                        {
                            "type": "notice",
                            "request_id": rid,
                            "code": event.code,
                            "message": event.message,
                            "data": event.data,
                        }
                    )
                elif isinstance(event, ToolCall | ToolResult):
                    outbox.put(
                        {
                            "type": "tool_call" if isinstance(event, ToolCall) else "tool_result",
                            "request_id": rid,
                            "id": event.id,
                            "name": event.name,
                            **(
                                {"arguments": event.arguments}
                                if isinstance(event, ToolCall)
                                else {"content": event.content}
                            ),
                        }
                    )
                elif isinstance(event, Done):
                    done = event
        except asyncio.CancelledError:
            _uncancel()
            status = "stopped"
        except GuardianBlocked as exc:
            status = "failed"
            error = ("guardian_blocked", exc.message, False)
        except RunnerError as exc:
            status = "failed"
            error = (exc.code.value, exc.message, exc.retryable)
        except Exception:
            log.exception("chat request %s failed while streaming", rid)
            status = "failed"
            error = ("internal_error", "Something went wrong while answering.", True)

        end = time.monotonic()
        outbox.flush()  # the last tokens go out before the final save
        outcome = _outcome(
            "".join(parts), status, routed, done, sources, error, t0, first_token_at, end
        )
        # A periodic save of this answer must not land after the final one.
        await saver.forget(message_id)
        try:
            await aclose_old_connections()
            await database_sync_to_async(services.finish_message)(message_id, outcome)
        except Exception:
            log.exception("could not save the answer of chat request %s", rid)
        if error is not None:
            outbox.put(_error_frame(rid, *error))
        outbox.put(
            {
                "type": "done",
                "request_id": rid,
                "conversation_id": start.conversation_id,
                "message_id": message_id,
                "status": outcome.status,
                "runner": outcome.runner_name,
                "model": outcome.model_id,
                "fallback": outcome.fallback,
                "finish_reason": outcome.finish_reason,
                "usage": {
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens,
                },
                "timings": {
                    "time_to_first_token_ms": outcome.time_to_first_token_ms,
                    "tokens_per_second": outcome.tokens_per_second,
                    "total_ms": outcome.total_ms,
                },
            }
        )

    # ---- sending --------------------------------------------------------------------

    async def send_frame(self, frame: dict) -> None:
        if self.closed:
            return
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def send_error(
        self, request_id: str | None, code: str, message: str, *, retryable: bool = False
    ) -> None:
        await self.send_frame(_error_frame(request_id, code, message, retryable))

    async def document_status(self, event: dict) -> None:
        """A channel-layer message from RAG ingestion: forwarded as a frame."""
        payload = {k: v for k, v in event.items() if k != "type"}
        await self.send_frame({"type": "document_status", "request_id": None, **payload})


# ---- helpers ------------------------------------------------------------------------


def _uncancel() -> None:
    # We handle the cancellation ourselves (save, report); later awaits must run.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _error_frame(request_id: str | None, code: str, message: str, retryable: bool) -> dict:
    return {
        "type": "error",
        "request_id": request_id,
        "code": code,
        "message": message,
        "retryable": retryable,
    }


class StreamingSaver:
    """Saves the answers being streamed in this process, all of them in one
    database call every FLUSH_INTERVAL_SECONDS, so a crash loses at most that
    much of each answer. One batched write instead of one per answer keeps the
    database thread (and the GIL) free for streaming when many answers run."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._pending: dict[int, list[str]] = {}
        self._task: asyncio.Task | None = None
        self._inflight: asyncio.Future | None = None

    def mark(self, message_id: int, parts: list[str]) -> None:
        """The answer `message_id` grew; `parts` is its live list of pieces."""
        self._pending[message_id] = parts
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def forget(self, message_id: int) -> None:
        """Stop saving this answer, and wait out a save of it already under way."""
        self._pending.pop(message_id, None)
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(inflight)

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.interval)
            batch = {mid: "".join(parts) for mid, parts in self._pending.items()}
            self._pending.clear()
            if not batch:
                continue
            self._inflight = asyncio.ensure_future(
                database_sync_to_async(services.flush_contents)(batch)
            )
            try:
                await asyncio.shield(self._inflight)
            except Exception:
                log.exception("could not save %d streaming answers", len(batch))


_savers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamingSaver] = (
    weakref.WeakKeyDictionary()
)


def streaming_saver() -> StreamingSaver:
    """The saver of the running event loop (one per server process)."""
    loop = asyncio.get_running_loop()
    saver = _savers.get(loop)
    if saver is None:
        saver = _savers[loop] = StreamingSaver(FLUSH_INTERVAL_SECONDS)
    return saver


def _outcome(
    content: str,
    status: str,
    routed: Routed | None,
    done: Done | None,
    sources: list[dict],
    error: tuple[str, str, bool] | None,
    t0: float,
    first_token_at: float | None,
    end: float,
) -> TurnOutcome:
    """The saved record of an answer. Time to first token is measured here,
    from the frame's arrival, so it includes queueing and routing: what the
    user waited. Throughput is the runner's own when it reported one."""
    ttft = (first_token_at - t0) * 1000 if first_token_at is not None else None
    usage = done.usage if done else None
    timings = done.timings if done else None
    tps = timings.tokens_per_second if timings and timings.tokens_per_second else None
    streamed = end - first_token_at if first_token_at is not None else 0.0
    if tps is None and usage and usage.completion_tokens and streamed > 0:
        tps = usage.completion_tokens / streamed
    if status == "complete":
        finish = done.finish_reason if done else "stop"
    else:
        finish = "cancelled" if status == "stopped" else "error"
    return TurnOutcome(
        content=content,
        status=status,
        runner_name=routed.runner_name if routed else "",
        model_id=(done.model_id if done and done.model_id else routed.model_id if routed else ""),
        fallback=routed.fallback if routed else False,
        finish_reason=finish,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        time_to_first_token_ms=round(ttft, 1) if ttft is not None else None,
        tokens_per_second=round(tps, 1) if tps else None,
        total_ms=round((end - t0) * 1000, 1),
        sources=sources,
        error_code=error[0] if error else "",
        error=error[1] if error else "",
    )
