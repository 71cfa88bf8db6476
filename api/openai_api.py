"""The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/chat/completions`.

Requests are checked completely (shape, types, model, collections,
conversation, images) before anything runs or is saved, and every failure is
an OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`.
A completion is one chat turn through `chat.pipeline.run_turn` (guardian,
RAG, routing with fallback, output filtering); `stream: true` answers in
Server-Sent Events as `chat.completion.chunk` objects ending with `data: [DONE]`.
Stateless by default: `breezeweb.save` / `breezeweb.conversation_id` record the
exchange as a Conversation, once the answer is known (never half-way).
See docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from asgiref.sync import sync_to_async

from accounts import limits, quotas
from accounts.quotas import QuotaExceeded
from agents.loop import StepFinished, StepStarted
from api import schemas
from api.decorators import api_view
from api.errors import http_error, openai_error, openai_error_body
from api.heartbeat import HEARTBEAT, Heartbeat
from api.inputs import read_json
from chat import services
from chat.errors import ChatError
from chat.errors import turn_error as chat_error
from chat.frames import sampling_of
from chat.inputs import InputError
from chat.limits import MAX_JSON_DEPTH
from chat.models import Conversation, Message
from chat.pipeline import GuardianBlocked, TurnInput, run_turn, turn_settings
from chat.turns import TurnRecorder
from core import generation
from rag.models import Collection
from runners.base import ChatMessage, Done, RunnerError, TokenDelta, ToolCall
from runners.models import RunnerConfig
from runners.router import usable_configs

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
# An SSE comment after this much silence keeps proxies from closing the stream.
SSE_HEARTBEAT_SECONDS = 10.0
# How long a stream waits for its first event before its headers go out anyway
# (later failures then arrive as an error event inside the stream).
PRIME_MAX_SECONDS = 10.0
OWNER = "breezeweb"


class ApiError(ChatError):
    """A request the API refuses: the one error type (chat.errors.ChatError),
    built status first, with its OpenAI-shaped error (`type_` overrides the
    type the status implies)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type_: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message, status=status, param=param, retry_after=retry_after)
        self.type_ = type_

    def response(self) -> JsonResponse:
        return openai_error(
            self.status,
            self.code,
            self.message,
            type_=self.type_,
            param=self.param,
            retry_after=self.retry_after,
        )

    def body(self) -> dict[str, Any]:
        return openai_error_body(
            self.status, self.code, self.message, type_=self.type_, param=self.param
        )


# ---- the request ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """Where an image sits in the request (for errors) and its data URL."""

    message: int
    part: int
    url: str

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}].image_url.url"


@dataclass(frozen=True)
class CompletionRequest:
    """A checked `POST /v1/chat/completions` body. `model` None means auto."""

    model: str | None
    messages: tuple[ChatMessage, ...]
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    tools: tuple[dict[str, Any], ...] = ()
    rag: bool = False
    collection_ids: tuple[int, ...] = ()
    conversation_id: int | None = None
    save: bool = False
    images: tuple[ImageRef, ...] = field(default=(), repr=False)
    agent: bool = False
    timezone: str = ""

    @property
    def records(self) -> bool:
        return self.save or self.conversation_id is not None


def parse_completion_request(body: Any) -> CompletionRequest:
    """Check a decoded JSON body against api.schemas.ChatCompletionRequest;
    raises ApiError(400) naming the bad `param`. Fields OpenAI defines that
    BreezeWeb has no use for are ignored (e.g. `user`)."""
    try:
        checked = schemas.parse(schemas.ChatCompletionRequest, body)
    except InputError as exc:
        raise ApiError(exc.status, exc.code, exc.message, param=exc.param) from None
    messages: list[ChatMessage] = []
    images: list[ImageRef] = []
    for i, message in enumerate(checked.messages):
        urls = [p.image_url.url for p in message.parts if isinstance(p, schemas.ImagePart)]
        images += (
            ImageRef(i, j, p.image_url.url)
            for j, p in enumerate(message.parts)
            if isinstance(p, schemas.ImagePart)
        )
        calls = getattr(message, "tool_calls", None) or ()
        messages.append(
            ChatMessage(
                role="system" if message.role == "developer" else message.role,
                content=message.text,
                images=tuple(urls),
                tool_calls=tuple(c.model_dump() for c in calls),
                tool_call_id=getattr(message, "tool_call_id", ""),
            )
        )
    ext = checked.breezeweb or schemas.BreezeWebRequest()
    ids = tuple(dict.fromkeys(ext.collections or ()))
    tools = checked.tools if checked.tool_choice != "none" else None
    max_tokens = checked.max_completion_tokens or checked.max_tokens
    return CompletionRequest(
        model=None if checked.model == AUTO_MODEL else checked.model,
        messages=tuple(messages),
        sampling=sampling_of(checked),
        max_tokens=max_tokens,
        stop=tuple(checked.stop or ()),
        stream=bool(checked.stream),
        include_usage=bool(checked.stream_options and checked.stream_options.include_usage),
        tools=tuple(t.model_dump(exclude_none=True) for t in tools or ()),
        rag=ext.rag if ext.rag is not None else bool(ids),
        collection_ids=ids,
        conversation_id=ext.conversation_id,
        save=ext.save,
        images=tuple(images),
        agent=ext.agent,
        timezone=ext.timezone or "",
    )


# ---- checks against the database and the images ----------------------------------------


def _admit(user, request: CompletionRequest, turn: TurnInput):
    """Everything a completion checks and reads in the database before it
    runs, in one trip to the database thread: the references exist (ApiError),
    the caller's budgets admit one more turn (accounts.quotas.charge: counted
    only now, once the request is well-formed and admitted by the rate
    limits; QuotaExceeded), and what the turn reads (chat.pipeline's
    TurnSettings; None when every runner's own budget is spent, which
    `run_turn` then reports as it always does)."""
    with generation.one_stamp():  # five memos, one read of the config version
        _check_references(user, request)
        budgets = quotas.charge(user)
        try:
            read = turn_settings(turn)
        except QuotaExceeded:
            read = None
    return budgets, read


def _check_references(user, request: CompletionRequest) -> None:
    """The model, collections and conversation exist and are the user's to use."""
    if request.model is not None:
        config = next((c for c in usable_configs(user) if c.name == request.model), None)
        if config is None or not config.enabled:
            raise ApiError(
                404,
                "model_not_found",
                f"The model {request.model!r} does not exist, is disabled or is not open "
                "to you; "
                "GET /v1/models lists the available ones (or use `auto`).",
                param="model",
            )
    if request.collection_ids:
        readable = set(
            Collection.objects.readable_by(user)
            .filter(pk__in=request.collection_ids)
            .values_list("pk", flat=True)
        )
        missing = [i for i in request.collection_ids if i not in readable]
        if missing:
            raise ApiError(
                404,
                "collection_not_found",
                f"Collection {missing[0]} was not found.",
                param="breezeweb.collections",
            )
    if request.conversation_id is not None and not (
        Conversation.objects.filter(pk=request.conversation_id, owner=user).exists()
    ):
        raise ApiError(
            404,
            "conversation_not_found",
            f"Conversation {request.conversation_id} was not found.",
            param="breezeweb.conversation_id",
        )


def _validated_images(request: CompletionRequest) -> CompletionRequest:
    """The request with every image decoded, checked and normalised."""
    if not request.images:
        return request
    from runners.images import validate_image_data_url

    replaced: dict[tuple[int, str], str] = {}
    for ref in request.images:
        try:
            replaced[(ref.message, ref.url)] = validate_image_data_url(ref.url).data_url
        except RunnerError as exc:
            raise ApiError(400, "invalid_image", exc.message, param=ref.param) from None
    messages = tuple(
        m
        if not m.images
        else ChatMessage(
            role=m.role,
            content=m.content,
            images=tuple(replaced[(i, url)] for url in m.images),
            tool_calls=m.tool_calls,
            tool_call_id=m.tool_call_id,
        )
        for i, m in enumerate(request.messages)
    )
    return replace(request, messages=messages, images=())


# ---- errors from a turn ---------------------------------------------------------------------


def turn_error(exc: Exception, *, pinned: bool) -> ApiError:
    """The HTTP error for a failed turn: api.errors.HTTP_ERRORS (the table in
    docs/http-api.md)."""
    error = http_error(exc, pinned=pinned)
    assert error is not None, exc
    type_ = "server_error" if error.status >= 500 else ""
    return ApiError(
        error.status,
        error.code,
        error.message,
        param=error.param,
        type_=type_,
        retry_after=error.retry_after,
    )


# ---- the answer in OpenAI's terms ------------------------------------------------------------
# The turn itself is recorded by chat.turns.TurnRecorder and saved through
# chat.services.record_exchange, exactly as the websocket's (docs/architecture.md).


def _finish_reason(turn: TurnRecorder, blocked: str) -> str:
    if blocked:
        return "content_filter"
    if turn.tool_calls:
        return "tool_calls"
    reason = turn.done.finish_reason if turn.done else "stop"
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def _usage(turn: TurnRecorder) -> dict[str, int]:
    prompt = turn.prompt_tokens or 0
    completion = turn.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _breezeweb(turn: TurnRecorder, blocked: str, conversation_id: int | None) -> dict[str, Any]:
    ext: dict[str, Any] = {
        "runner": turn.runner_name,
        "model_id": turn.model_id,
        "fallback": turn.fallback,
        "sources": turn.sources,
        "notices": [{"code": n.code, "message": n.message, **n.data} for n in turn.notices],
    }
    if blocked:
        ext["blocked"] = blocked
    if conversation_id is not None:
        ext["conversation_id"] = conversation_id
    if turn.steps:
        ext["steps"] = turn.steps
    return ext


# ---- the views ---------------------------------------------------------------------------


def _model_entry(config: RunnerConfig) -> dict[str, Any]:
    return {
        "id": config.name,
        "object": "model",
        "created": int(config.created_at.timestamp()),
        "owned_by": OWNER,
        "metadata": {
            "kind": config.kind,
            "model_id": config.model_id,
            "capabilities": config.capabilities,
            "priority": config.priority,
            "context_tokens": config.context_tokens,
            "max_tokens": config.max_tokens,
        },
    }


def _auto_entry(configs: list[RunnerConfig]) -> dict[str, Any]:
    capabilities = sorted({c for config in configs for c in config.capabilities})
    return {
        "id": AUTO_MODEL,
        "object": "model",
        "created": min((int(c.created_at.timestamp()) for c in configs), default=0),
        "owned_by": OWNER,
        "metadata": {
            "kind": "router",
            "model_id": "",
            "capabilities": capabilities,
            "runners": [c.name for c in configs],
            "description": "The router's choice: the highest-priority enabled runner able "
            "to answer, with fallback to the next one.",
        },
    }


def _enabled_configs(user) -> list[RunnerConfig]:
    """The enabled runners `user` may use: the only models the API shows them."""
    return [c for c in usable_configs(user) if c.enabled]


def _method_not_allowed(allowed: str) -> JsonResponse:
    response = openai_error(
        405, "method_not_allowed", f"Use {allowed} on this endpoint.", param=None
    )
    response["Allow"] = allowed
    return response


@api_view(error=openai_error, limit="API_REQUESTS_PER_MINUTE")
async def models(request: HttpRequest) -> JsonResponse:
    """`GET /v1/models`: `auto` plus every enabled runner config the caller may use."""
    if request.method != "GET":
        return _method_not_allowed("GET")
    configs = await sync_to_async(_enabled_configs)(request.user)
    data = [_auto_entry(configs), *(_model_entry(c) for c in configs)]
    return JsonResponse({"object": "list", "data": data})


@api_view(error=openai_error, limit="API_REQUESTS_PER_MINUTE")
async def model_detail(request: HttpRequest, model_id: str) -> JsonResponse:
    """`GET /v1/models/{id}`: one model, as listed by `GET /v1/models`."""
    if request.method != "GET":
        return _method_not_allowed("GET")
    configs = await sync_to_async(_enabled_configs)(request.user)
    if model_id == AUTO_MODEL:
        return JsonResponse(_auto_entry(configs))
    for config in configs:
        if config.name == model_id:
            return JsonResponse(_model_entry(config))
    return openai_error(
        404,
        "model_not_found",
        f"The model {model_id!r} does not exist, is disabled or is not open to you.",
        param="model",
    )


@csrf_exempt  # it changes nothing; a JSON 404 beats an HTML CSRF page for a wrong URL
async def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    """Any other path under /v1/: an OpenAI-shaped 404."""
    return openai_error(
        404,
        "unknown_url",
        f"Unknown endpoint {request.method} {request.path}; "
        "see /api/docs for what BreezeWeb serves.",
    )


def _read_body(request: HttpRequest) -> Any:
    """The body as JSON, within the limits of api.inputs (size,
    nesting, integers, text), checked before any other work."""
    try:
        return read_json(request, syntax_code="invalid_json", max_depth=MAX_JSON_DEPTH)
    except InputError as exc:
        raise ApiError(exc.status, exc.code, exc.message, param=exc.param) from None


@api_view(error=openai_error, limit="API_REQUESTS_PER_MINUTE")
async def chat_completions(request: HttpRequest):
    """`POST /v1/chat/completions` (see the module docstring)."""
    if request.method != "POST":
        return _method_not_allowed("POST")
    # The clock of the turn's timings starts at the request's arrival.
    arrived = time.monotonic()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    lease: limits.SlotLease | None = None
    try:
        parsed = parse_completion_request(_read_body(request))
        if parsed.images:  # decoding images is CPU work: off the event loop
            parsed = await sync_to_async(_validated_images, thread_sensitive=False)(parsed)
        if parsed.stream:
            lease = await limits.acquire_slot(
                f"api-streams:{request.client_id}", settings.API_MAX_CONCURRENT_STREAMS
            )
            if lease is None:
                raise ApiError(
                    429,
                    "too_many_concurrent_streams",
                    f"At most {settings.API_MAX_CONCURRENT_STREAMS} streams may run at once "
                    "for this key; wait for one to finish.",
                    retry_after=limits.SLOT_RETRY_AFTER_SECONDS,
                )
    except ApiError as exc:
        return exc.response()
    turn = TurnInput(
        user=request.user,
        messages=parsed.messages,
        rag=parsed.rag,
        collection_ids=parsed.collection_ids,
        pinned_runner=parsed.model,
        sampling=parsed.sampling,
        max_tokens=parsed.max_tokens,
        stop=parsed.stop,
        tools=parsed.tools,
        source="api",
        request_id=completion_id,
        agent=parsed.agent,
        timezone=parsed.timezone,
        api_key_id=getattr(request, "api_key_id", None),
    )
    try:
        budgets, read = await sync_to_async(_admit)(request.user, parsed, turn)
    except BaseException as exc:
        if lease is not None:
            await lease.release()
        if isinstance(exc, ApiError):
            return exc.response()
        if isinstance(exc, QuotaExceeded):
            return _with_budget(turn_error(exc, pinned=False).response(), [exc.status])
        raise
    turn = replace(turn, settings=read)
    completion = Completion(completion_id, request.user, parsed, turn, started=arrived)
    if not parsed.stream:
        return _with_budget(await completion.answer(), budgets)
    try:
        error = await completion.prime()
    except BaseException:
        await lease.release()
        raise
    if error is not None:
        await lease.release()
        return _with_budget(error.response(), budgets)
    response = StreamingHttpResponse(
        completion.sse(lease), content_type="text/event-stream; charset=utf-8"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must not hold the stream back
    return _with_budget(response, budgets)


def _with_budget(response: HttpResponse, budgets: list[quotas.QuotaStatus]) -> HttpResponse:
    """The caller's tightest budgets as X-RateLimit-*-{Requests,Tokens} headers."""
    for name, value in quotas.headers(budgets).items():
        response[name] = value
    return response


class Completion:
    """One completion in flight: the turn's events turned into OpenAI objects."""

    def __init__(
        self,
        completion_id: str,
        user,
        request: CompletionRequest,
        turn: TurnInput,
        *,
        started: float | None = None,
    ):
        self.id = completion_id
        self.user = user
        self.request = request
        self.created = int(time.time())
        self.state = TurnRecorder(started=time.monotonic() if started is None else started)
        # The output rule's message when one ended the answer (finish `content_filter`).
        self.blocked = ""
        # What ended the turn early, saved with a failed answer.
        self.failure: Exception | None = None
        # Streams: silences become SSE comments so proxies keep the stream.
        self.events = Heartbeat(run_turn(turn), SSE_HEARTBEAT_SECONDS)
        self.buffered: list[Any] = []

    @property
    def model(self) -> str:
        return self.state.runner_name or self.request.model or AUTO_MODEL

    async def _record(self, status: str, error: ApiError | None = None) -> int | None:
        """Save the exchange through the chat service when asked to (`error`:
        the turn failed; the saved code is the chat's, as on the websocket)."""
        if not self.request.records:
            return None
        failure = chat_error(self.failure) if error is not None and self.failure else None
        outcome = self.state.outcome(
            status, failure, finish_reason="content_filter" if self.blocked else None
        )
        return await sync_to_async(services.record_exchange)(
            self.user,
            conversation_id=self.request.conversation_id,
            messages=self.request.messages,
            outcome=outcome,
        )

    def _error(self, exc: Exception) -> ApiError:
        self.failure = exc
        return turn_error(exc, pinned=self.request.model is not None)

    # -- non-streaming --

    async def answer(self) -> JsonResponse:
        try:
            async for event in self.events:
                if event is not HEARTBEAT:
                    self.state.take(event)
        except GuardianBlocked as exc:
            if exc.where != "output":
                return self._error(exc).response()
            self.blocked = exc.message
        except QuotaExceeded as exc:  # every runner's own budget is spent
            return self._error(exc).response()
        except RunnerError as exc:
            error = self._error(exc)
            if self.state.parts or self.state.tool_calls:
                await self._record(Message.Status.FAILED, error)
            return error.response()
        finally:
            await self.events.aclose()
        status = Message.Status.STOPPED if self.blocked else Message.Status.COMPLETE
        conversation_id = await self._record(status)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": self.state.content
            if (self.state.parts or not self.state.tool_calls)
            else None,
            "refusal": None,
        }
        if self.state.tool_calls:
            message["tool_calls"] = [_tool_call_dict(c) for c in self.state.tool_calls]
        return JsonResponse(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": _finish_reason(self.state, self.blocked),
                    }
                ],
                "usage": _usage(self.state),
                "breezeweb": _breezeweb(self.state, self.blocked, conversation_id),
            }
        )

    # -- streaming --

    async def prime(self) -> ApiError | None:
        """Run the turn up to its first answer event, so that failures before
        any output are plain HTTP errors with the right status code."""
        waited = 0.0
        try:
            async for event in self.events:
                if event is HEARTBEAT:
                    # Queued or slow to start: open the stream rather than keep
                    # the client (and any proxy) waiting without a byte.
                    waited += self.events.interval
                    if waited >= PRIME_MAX_SECONDS:
                        return None
                    continue
                self.state.take(event)
                self.buffered.append(event)
                if isinstance(event, TokenDelta | ToolCall | Done | StepStarted):
                    return None
        except GuardianBlocked as exc:
            await self.events.aclose()
            if exc.where != "output":
                return self._error(exc)
            # The answer's first words broke an output rule: an empty, filtered answer.
            self.blocked = exc.message
            return None
        except (RunnerError, QuotaExceeded) as exc:
            await self.events.aclose()
            return self._error(exc)
        except BaseException:
            await self.events.aclose()
            raise
        return None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.request.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return _sse(chunk)

    def _event_chunk(self, event: Any) -> bytes | None:
        if isinstance(event, TokenDelta):
            return self._chunk({"content": event.text}) if event.text else None
        if isinstance(event, ToolCall):
            index = self.state.tool_calls.index(event)
            return self._chunk({"tool_calls": [{"index": index, **_tool_call_dict(event)}]})
        if isinstance(event, StepStarted | StepFinished):
            # A chunk with an empty delta (OpenAI clients skip it) under its own
            # event name, carrying the step in `breezeweb`.
            kind = "tool_call" if isinstance(event, StepStarted) else "tool_result"
            step = {"event": kind, "step": event.step.as_dict()}
            return b"event: breezeweb.step\n" + self._chunk({}, breezeweb=step)
        return None

    async def sse(self, lease: limits.SlotLease) -> AsyncIterator[bytes]:
        """The SSE body. Closing it (the client went away) cancels generation."""
        finished = False
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            for event in self.buffered:
                chunk = self._event_chunk(event)
                if chunk:
                    yield chunk
            self.buffered.clear()
            error: ApiError | None = None
            try:
                async for event in self.events:
                    if event is HEARTBEAT:
                        yield b": keep-alive\n\n"
                        continue
                    self.state.take(event)
                    chunk = self._event_chunk(event)
                    if chunk:
                        yield chunk
            except GuardianBlocked as exc:
                self.blocked = exc.message
            except (RunnerError, QuotaExceeded) as exc:
                error = self._error(exc)
            if error is not None:
                finished = True
                await self._record(Message.Status.FAILED, error)
                yield _sse(error.body())
                yield b"data: [DONE]\n\n"
                return
            finished = True
            status = Message.Status.STOPPED if self.blocked else Message.Status.COMPLETE
            conversation_id = await self._record(status)
            ext = _breezeweb(self.state, self.blocked, conversation_id)
            yield self._chunk({}, _finish_reason(self.state, self.blocked), breezeweb=ext)
            if self.request.include_usage:
                usage_chunk = {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": _usage(self.state),
                    "breezeweb": ext,
                }
                yield _sse(usage_chunk)
            yield b"data: [DONE]\n\n"
        finally:
            # Runs on normal end, on error, and when the server closes the body
            # because the client disconnected: the turn is closed (stopping the
            # runner) and, when recording, the partial answer kept as stopped.
            await self.events.aclose()
            if not finished and self.request.records:
                await asyncio.shield(self._record(Message.Status.STOPPED))
            await lease.release()


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
