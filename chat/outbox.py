"""The frames of one answer on their way to the socket (docs/websocket.md,
*Limits and slow clients*): generation never waits for the client."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

# After a token frame, the next one waits this long, gathering what arrives
# meanwhile: at most 40 token frames a second per answer, whatever the model's
# pace (smooth to read; fewer frames leave the CPU to the model).
TOKEN_FRAME_INTERVAL_SECONDS = settings.CHAT_TOKEN_FRAME_INTERVAL_MS / 1000


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
        self._task = asyncio.create_task(self._drain())

    def put(self, frame: dict) -> None:
        if frame["type"] == "token":
            tail = self._frames[-1] if self._frames else None
            if tail is not None and tail["type"] == "token":
                tail["_parts"].append(frame["text"])
                if "seq" in frame:  # a merged frame ends where its last piece ends
                    tail["seq"] = frame["seq"]
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


def done_frame(request_id: str, conversation_id: int, message_id: int, answer: Any) -> dict:
    """The `done` frame of docs/websocket.md. `answer` is how the answer ended:
    a `chat.services.TurnOutcome` just saved, or the saved `chat.models.Message`
    itself (an attach after the end); both have these fields, and `cost`
    (chat.services.answer_cost) once the answer is saved."""
    return {
        "type": "done",
        "request_id": request_id,
        "conversation_id": conversation_id,
        "message_id": message_id,
        "status": answer.status,
        "runner": answer.runner_name,
        "model": answer.model_id,
        "fallback": answer.fallback,
        "finish_reason": answer.finish_reason,
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
        },
        "timings": {
            "time_to_first_token_ms": answer.time_to_first_token_ms,
            "tokens_per_second": answer.tokens_per_second,
            "total_ms": answer.total_ms,
        },
        "cost": getattr(answer, "cost", None),
    }
