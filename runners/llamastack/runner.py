"""The remote runner: any Llama Stack distribution, through `llama-stack-client`.

One `AsyncLlamaStackClient` per runner (and per event loop), created on first
use and reused so its HTTP connections are pooled. Answers stream from
`POST /v1/chat/completions` with `stream: true`, sent through the SDK client
and read to the end so connections are reused: each content delta becomes a
`TokenDelta` as it arrives, tool-call deltas are assembled into `ToolCall`
events, and `Done` carries the finish reason, usage and timings.

The SDK's own retries are off (`max_retries=0`): this runner retries only
before the first token (a connection reset on a stale keep-alive connection,
502/503/504), so a partial answer is never sent twice. Every failure becomes
a `RunnerError` (see docs/llamastack.md for the table); no message names the
API key, and the endpoint is shown without any credentials in it.

`RunnerConfig.extra_params` go into the request body (e.g. `seed`,
`repetition_penalty`), except these runner options:
`retries` (int, default 1: attempts added before the first token),
`headers` (extra HTTP headers, e.g. for a gateway) and `provider_data`
(sent as Llama Stack's `X-LlamaStack-Provider-Data` header).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

import httpx

from runners.base import (
    Capability,
    ChatMessage,
    ChatRequest,
    Done,
    ErrorCode,
    Event,
    Health,
    RunnerError,
    Timings,
    TokenDelta,
    ToolCall,
    Usage,
)


def _import_sdk_quietly() -> Any:
    """Import llama_stack_client without letting it reconfigure logging.

    Importing it runs `logging.basicConfig(level=INFO)` (from its MCP OAuth
    helper), which, in a process whose logging is not configured yet, would
    log every HTTP request at INFO. The root logger is put back as it was."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import llama_stack_client

    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    return llama_stack_client


lsc = _import_sdk_quietly()

log = logging.getLogger(__name__)

_RESERVED_BODY_KEYS = frozenset({"model", "messages", "stream", "stream_options"})
_RUNNER_OPTIONS = frozenset({"retries", "headers", "provider_data"})
_RETRY_STATUSES = frozenset({502, 503, 504})
_MAX_SERVER_DETAIL = 300
_DRAIN_SECONDS = 0.25


@dataclass
class _PendingToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


def _redacted_endpoint(url: str) -> str:
    """scheme://host[:port]/path with any user:password@ left out."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


def _retry_after(headers: Mapping[str, str] | httpx.Headers | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not headers:
        return None
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LlamaStackRunner:
    """A `runners.base.Runner` backed by a remote Llama Stack server."""

    local = False

    def __init__(
        self,
        *,
        name: str,
        model_id: str,
        endpoint: str,
        api_key: str = "",
        temperature: float | None = 0.7,
        max_tokens: int | None = 512,
        context_tokens: int = 2048,
        timeout_seconds: float = 60.0,
        enable_vision: bool = False,
        enable_agents: bool = False,
        extra_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.model_id = model_id
        self.endpoint = endpoint.rstrip("/")
        self.context_tokens = context_tokens
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_seconds = timeout_seconds
        caps = {Capability.LLM}
        if enable_vision:
            caps.add(Capability.VLM)
        if enable_agents:
            caps.add(Capability.AGENT)
        self.capabilities: frozenset[Capability] = frozenset(caps)
        self.__api_key = api_key  # name-mangled: never in repr, vars() dumps are rare
        extra = dict(extra_params or {})
        self.retries = max(0, int(extra.get("retries", 1)))
        headers = {str(k): str(v) for k, v in (extra.get("headers") or {}).items()}
        if extra.get("provider_data"):
            headers["X-LlamaStack-Provider-Data"] = json.dumps(extra["provider_data"])
        self._headers = headers
        self.extra_body = {
            k: v for k, v in extra.items() if k not in _RESERVED_BODY_KEYS | _RUNNER_OPTIONS
        }
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._shown_endpoint = _redacted_endpoint(self.endpoint)

    @classmethod
    def validate_config(cls, config: Any) -> dict[str, str]:
        """An enabled Llama Stack runner needs an endpoint and a model id."""
        errors = {}
        if not config.endpoint:
            errors["endpoint"] = "A Llama Stack runner needs an endpoint."
        if not config.model_id:
            errors["model_id"] = "A Llama Stack runner needs the model id it should use."
        return errors

    @classmethod
    def from_config(cls, config: Any) -> LlamaStackRunner:
        """Build from a `runners.models.RunnerConfig` (saved or not)."""
        return cls(
            name=config.name,
            model_id=config.model_id,
            endpoint=config.endpoint,
            api_key=config.api_key,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            context_tokens=config.context_tokens,
            timeout_seconds=config.timeout_seconds,
            enable_vision=config.enable_vision,
            enable_agents=config.enable_agents,
            extra_params=config.extra_params if isinstance(config.extra_params, dict) else {},
        )

    def __repr__(self) -> str:
        return (
            f"LlamaStackRunner(name={self.name!r}, model_id={self.model_id!r}, "
            f"endpoint={self._shown_endpoint!r})"
        )

    # ---- lifecycle ------------------------------------------------------------------

    def _client_for_loop(self) -> Any:
        """The shared SDK client, made in (and tied to) the running event loop.

        httpx pools belong to the loop that opened them; a caller on another
        loop (e.g. a sync admin action through async_to_sync) gets its own."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            client = lsc.AsyncLlamaStackClient(
                base_url=self.endpoint,
                api_key="",
                timeout=self.timeout_seconds,
                max_retries=0,
                default_headers=self._headers or None,
                # The SDK's default pool (100 connections) queues the 101st
                # concurrent stream for seconds; chat streams are long-lived.
                http_client=lsc.DefaultAsyncHttpxClient(
                    timeout=self.timeout_seconds,
                    limits=httpx.Limits(
                        max_connections=settings.LLAMASTACK_MAX_CONNECTIONS,
                        max_keepalive_connections=100,
                    ),
                ),
            )
            # Set after construction: passing None would make the SDK read
            # LLAMA_STACK_CLIENT_API_KEY from the environment instead.
            client.api_key = self.__api_key or None
            self._client, self._client_loop = client, loop
        return self._client

    async def load(self) -> None:
        self._client_for_loop()

    async def close(self) -> None:
        client, self._client = self._client, None
        loop, self._client_loop = self._client_loop, None
        if client is not None and loop is asyncio.get_running_loop():
            await client.close()

    def count_tokens(self, text: str) -> int:
        # The server's tokenizer is not reachable cheaply; ~4 characters a token.
        return max(1, (len(text) + 3) // 4) if text else 0

    # ---- health ---------------------------------------------------------------------

    async def available_models(self, wait_seconds: float | None = None) -> list[str]:
        """The model ids the server lists (`GET /v1/models`)."""
        client = self._client_for_loop()
        wait = wait_seconds or self.timeout_seconds
        try:
            models = await client.models.list(timeout=wait)
        except lsc.APITimeoutError:
            raise
        except lsc.APIConnectionError:
            # A server may close the pooled connection after an error answer
            # (Llama Stack does after a 404 or 500): one fresh attempt.
            models = await client.models.list(timeout=wait)
        return [m.id for m in models]

    async def health(self) -> Health:
        started = time.perf_counter()
        try:
            models = await self.available_models(wait_seconds=min(self.timeout_seconds, 10.0))
        except (lsc.APIError, httpx.HTTPError) as exc:
            error = self._error(exc, tokens=0)
            return Health(
                ok=False, detail=error.message, latency_ms=(time.perf_counter() - started) * 1000
            )
        latency = (time.perf_counter() - started) * 1000
        if self.model_id in models:
            return Health(
                ok=True,
                detail=f"{self.model_id} is served by {self._shown_endpoint}",
                models=tuple(models),
                latency_ms=latency,
            )
        listed = ", ".join(models) if models else "none"
        return Health(
            ok=False,
            detail=f"{self._shown_endpoint} does not serve {self.model_id!r}; it serves: {listed}",
            models=tuple(models),
            latency_ms=latency,
        )

    # ---- streaming ------------------------------------------------------------------

    def _messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        if request.has_images and Capability.VLM not in self.capabilities:
            raise RunnerError(
                ErrorCode.INVALID_INPUT,
                f"The runner {self.name!r} cannot see images (vision is off for it); "
                "remove the image or choose a runner with vision.",
            )
        return [self._message(m) for m in request.messages]

    @staticmethod
    def _message(message: ChatMessage) -> dict[str, Any]:
        out: dict[str, Any] = {"role": message.role}
        if message.images:
            parts: list[dict[str, Any]] = []
            if message.content:
                parts.append({"type": "text", "text": message.content})
            parts.extend({"type": "image_url", "image_url": {"url": url}} for url in message.images)
            out["content"] = parts
        else:
            out["content"] = message.content
        if message.tool_calls:
            out["tool_calls"] = list(message.tool_calls)
        if message.tool_call_id:
            out["tool_call_id"] = message.tool_call_id
        return out

    def _params(self, request: ChatRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.model_id,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        temperature = request.temperature if request.temperature is not None else self.temperature
        max_tokens = request.max_tokens if request.max_tokens is not None else self.max_tokens
        if temperature is not None:
            params["temperature"] = temperature
        for name in ("top_p", "frequency_penalty", "presence_penalty", "seed"):
            if getattr(request, name) is not None:
                params[name] = getattr(request, name)
        if request.logit_bias is not None:
            params["logit_bias"] = {str(token): bias for token, bias in request.logit_bias.items()}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if request.stop:
            params["stop"] = list(request.stop)
        if request.tools:
            params["tools"] = list(request.tools)
        # Not OpenAI's but vLLM's and llama.cpp's server's: in the body as they are.
        beyond = {
            name: getattr(request, name)
            for name in ("top_k", "repetition_penalty")
            if getattr(request, name) is not None
        }
        # extra_body wins over keyword params in the SDK: drop what we set.
        extra = {k: v for k, v in {**self.extra_body, **beyond}.items() if k not in params}
        if extra:
            params["extra_body"] = extra
        return params

    async def _open(self, params: dict[str, Any]) -> httpx.Response:
        """Send the streamed call and return the HTTP response (headers
        received, body unread), retrying only what is safe before any token:
        a dropped connection and 502/503/504."""
        client = self._client_for_loop()
        # The SDK's `post`, not `chat.completions.create`: the body is built
        # here as plain JSON already, and `create` would first walk it against
        # its TypedDicts (`maybe_transform`: ~1 ms for a 10-message
        # conversation, and an identity for these params, which have no aliased
        # or formatted fields). Same client, headers, auth, timeouts and error
        # types (APIStatusError, APIConnectionError). `extra_body` is merged
        # last, as the SDK does. The runner reads the SSE body itself, to the
        # end, so the keep-alive connection goes back to the pool and no model
        # object is built per chunk; stream() closes the response.
        body = dict(params)
        body.update(body.pop("extra_body", None) or {})
        attempt = 0
        while True:
            try:
                return await client.post(
                    "/v1/chat/completions", body=body, cast_to=httpx.Response, stream=True
                )
            except (lsc.APIConnectionError, lsc.APIStatusError) as exc:
                retry = attempt < self.retries and (
                    (
                        isinstance(exc, lsc.APIConnectionError)
                        and not isinstance(exc, lsc.APITimeoutError)
                    )
                    or (isinstance(exc, lsc.APIStatusError) and exc.status_code in _RETRY_STATUSES)
                )
                if not retry:
                    raise
                attempt += 1
                # A reset keep-alive connection is retried at once; a busy server a bit later.
                delay = 0.0 if isinstance(exc, lsc.APIConnectionError) else 0.1 * attempt
                log.info(
                    "runner %s: retrying before the first token (%s)", self.name, type(exc).__name__
                )
                if delay:
                    await asyncio.sleep(delay)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        """See `runners.base.Runner.stream`."""
        messages = self._messages(request)  # refuses images without vision, before any I/O
        params = self._params(request, messages)
        started = time.perf_counter()
        first_token_at: float | None = None
        tokens = 0
        finish_reason = ""
        usage: Usage | None = None
        pending: dict[int, _PendingToolCall] = {}
        try:
            response = await self._open(params)
        except (lsc.APIError, httpx.HTTPError) as exc:
            raise await self._error_with_models(exc) from None
        events = _sse_data(response.aiter_lines())
        try:
            async for data in events:
                if data == "[DONE]":
                    await _drain(events)
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError("a chunk is not a JSON object")
                if chunk.get("error"):
                    raise self._stream_error(chunk["error"], tokens)
                choices = chunk.get("choices")
                if not isinstance(choices, list):
                    raise ValueError("a chunk has no choices")
                chunk_usage = chunk.get("usage")
                if isinstance(chunk_usage, dict):
                    usage = Usage(
                        prompt_tokens=int(chunk_usage.get("prompt_tokens") or 0),
                        completion_tokens=int(chunk_usage.get("completion_tokens") or 0),
                    )
                for choice in choices:
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        tokens += 1
                        yield TokenDelta(text)
                    tool_calls = delta.get("tool_calls")
                    if tool_calls:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        _merge_tool_calls(pending, tool_calls)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
        except RunnerError:
            raise
        except (lsc.APIError, httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
            # ValueError: json.JSONDecodeError and our own checks; Type/AttributeError:
            # a chunk of the wrong shape (e.g. a list where an object belongs).
            raise self._error(exc, tokens=tokens) from None
        finally:
            # Closing a response whose body is unread drops the connection: the
            # server stops generating when the caller cancels or stops iterating.
            await events.aclose()
            await response.aclose()

        for index in sorted(pending):
            call = pending[index]
            if not call.name:
                raise RunnerError(
                    ErrorCode.RUNTIME,
                    "The Llama Stack server sent a tool call without a function name.",
                )
            yield ToolCall(id=call.id or f"call_{index}", name=call.name, arguments=call.arguments)

        ended = time.perf_counter()
        if usage is None:
            # Servers that ignore include_usage: count deltas, estimate the prompt.
            prompt = sum(self.count_tokens(m.content) for m in request.messages)
            usage = Usage(prompt_tokens=prompt, completion_tokens=tokens)
        ttft_ms = (first_token_at - started) * 1000 if first_token_at is not None else None
        decode_seconds = ended - first_token_at if first_token_at is not None else 0.0
        tokens_per_second = (
            usage.completion_tokens / decode_seconds
            if decode_seconds > 0 and usage.completion_tokens
            else None
        )
        yield Done(
            finish_reason=finish_reason or ("tool_calls" if pending else "stop"),
            usage=usage,
            timings=Timings(
                time_to_first_token_ms=ttft_ms,
                total_ms=(ended - started) * 1000,
                tokens_per_second=tokens_per_second,
            ),
            model_id=self.model_id,
        )

    def _stream_error(self, error: Any, tokens: int) -> RunnerError:
        message = error.get("message") if isinstance(error, dict) else error
        after = f" after {tokens} tokens" if tokens else ""
        text = self._scrub(" ".join(str(message or "unknown error").split()))
        return RunnerError(
            ErrorCode.RUNTIME,
            f"The Llama Stack server at {self._shown_endpoint} reported an error{after}: "
            f"{text[:_MAX_SERVER_DETAIL]}",
            retryable=True,
        )

    # ---- errors ---------------------------------------------------------------------

    async def _error_with_models(self, exc: BaseException) -> RunnerError:
        error = self._error(exc, tokens=0)
        if error.code is ErrorCode.NOT_FOUND:
            # Cheap and useful: tell the admin what the server does serve.
            try:
                models = await self.available_models(wait_seconds=min(self.timeout_seconds, 3.0))
            except (lsc.APIError, httpx.HTTPError):
                return error
            listed = ", ".join(models) if models else "none"
            return RunnerError(
                ErrorCode.NOT_FOUND, f"{error.message} Models it serves: {listed}.", retryable=False
            )
        return error

    def _scrub(self, text: str) -> str:
        key = self.__api_key
        if key and key in text:
            text = text.replace(key, "***")
        return text

    def _server_detail(self, exc: Any) -> str:
        body = getattr(exc, "body", None)
        detail: Any = None
        if isinstance(body, dict):
            error = body.get("error")
            detail = (
                error.get("message")
                if isinstance(error, dict)
                else error or body.get("detail") or body.get("message")
            )
        elif isinstance(body, str):
            detail = body
        if not detail:
            return ""
        text = " ".join(str(detail).split())[:_MAX_SERVER_DETAIL]
        return f" The server said: {self._scrub(text)}"

    def _error(self, exc: BaseException, *, tokens: int) -> RunnerError:
        """Map an SDK/httpx failure to a RunnerError (table in docs/llamastack.md)."""
        where = self._shown_endpoint
        after = f" after {tokens} tokens" if tokens else ""
        if isinstance(exc, (lsc.APITimeoutError, httpx.TimeoutException)):
            phase = f"stopped sending{after}" if tokens else "did not answer"
            return RunnerError(
                ErrorCode.TIMEOUT,
                f"The Llama Stack server at {where} {phase} within {self.timeout_seconds:g} s.",
                retryable=True,
            )
        if isinstance(exc, lsc.APIConnectionError) or (
            isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) and not tokens
        ):
            return RunnerError(
                ErrorCode.UNAVAILABLE,
                f"Could not reach the Llama Stack server at {where}; is it running?",
                retryable=True,
            )
        if isinstance(exc, lsc.APIStatusError):
            status = exc.status_code
            detail = self._server_detail(exc)
            if status in (401, 403):
                return RunnerError(
                    ErrorCode.AUTH,
                    f"The Llama Stack server at {where} refused the runner's credentials "
                    f"({status}); check the runner's API key.",
                    retryable=False,
                )
            if status == 404:
                return RunnerError(
                    ErrorCode.NOT_FOUND,
                    f"The Llama Stack server at {where} does not serve model {self.model_id!r}.",
                    retryable=False,
                )
            if status == 429:
                retry_after = _retry_after(exc.response.headers)
                wait = f" Retry after {retry_after:g} s." if retry_after is not None else ""
                return RunnerError(
                    ErrorCode.RATE_LIMITED,
                    f"The Llama Stack server at {where} is rate limiting requests.{wait}",
                    retryable=True,
                    retry_after=retry_after,
                )
            if status in (400, 413, 422):
                return RunnerError(
                    ErrorCode.INVALID_INPUT,
                    f"The Llama Stack server at {where} rejected the request ({status}).{detail}",
                    retryable=False,
                )
            if status >= 500:
                code = ErrorCode.UNAVAILABLE if status in _RETRY_STATUSES else ErrorCode.RUNTIME
                return RunnerError(
                    code,
                    f"The Llama Stack server at {where} failed ({status}).{detail}",
                    retryable=True,
                    retry_after=_retry_after(exc.response.headers),
                )
            return RunnerError(
                ErrorCode.RUNTIME,
                f"The Llama Stack server at {where} answered {status}.{detail}",
                retryable=status in (408, 409),
            )
        if isinstance(exc, (ValueError, TypeError, AttributeError)):
            return RunnerError(
                ErrorCode.RUNTIME,
                f"The Llama Stack server at {where} sent a malformed chunk{after}.",
                retryable=True,
            )
        # httpx transport errors while reading: the stream broke.
        when = after or " before any token"
        return RunnerError(
            ErrorCode.RUNTIME,
            f"The connection to the Llama Stack server at {where} broke{when}.",
            retryable=True,
        )


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined with
    newlines, comments and other fields skipped), as in the SSE spec."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # ":" comments, "event:", "id:" and "retry:" carry nothing we use.
    if data:
        yield "\n".join(data)


async def _drain(events: AsyncIterator[str]) -> None:
    """Read what follows [DONE] (normally just the end of the body) so the
    connection can be reused; a server that lingers only costs its reuse."""
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in events:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass


def _merge_tool_calls(pending: dict[int, _PendingToolCall], deltas: list[Any]) -> None:
    """OpenAI streams a tool call as pieces keyed by `index`: id and name in
    the first, the JSON arguments spread over the following ones."""
    for position, delta in enumerate(deltas):
        index = delta.get("index")
        if not isinstance(index, int):
            index = position
        call = pending.setdefault(index, _PendingToolCall())
        if delta.get("id"):
            call.id = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call.name = function["name"]
        if function.get("arguments"):
            call.arguments += function["arguments"]
