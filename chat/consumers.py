"""The chat websocket, `/ws/chat/` (protocol: docs/websocket.md).

Thin on purpose: frames are decoded by chat/frames.py, turns are saved by
chat/services.py and recorded by chat/turns.py, the answer so far is saved by
chat/saver.py, each answer's frames go out through chat/outbox.py, and
chat/live.py numbers them and lets other sockets attach to the answer.

Channels hands a consumer one frame at a time, so every generation runs in an
asyncio.Task the consumer owns: `stop` and disconnect can cancel it while it
streams (django/channels#1119).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, replace

from django.conf import settings

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from accounts import quotas
from accounts.limits import SlotLease
from accounts.revocation import credential_still_valid, groups_for
from accounts.ws_auth import CLOSE_UNAUTHENTICATED
from agents.loop import ApprovalRequested, StepFinished, StepStarted
from agents.steps import decide
from chat import services
from chat.errors import TURN_ERRORS, ChatError, error_frame, rate_limited, websocket_error
from chat.frames import (
    ApproveFrame,
    AttachFrame,
    GenerateFrame,
    Ping,
    Stop,
    decode,
    sampling_of,
    validate_images,
)
from chat.live import Attachments, LiveAnswer, answer_hub
from chat.outbox import TOKEN_FRAME_INTERVAL_SECONDS, FrameOutbox, done_frame
from chat.pipeline import Routed, Sources, TurnInput, run_turn
from chat.saver import detach, finish_detached, streaming_saver
from chat.services import TurnStart
from chat.turns import COMPLETE, FAILED, STOPPED, TurnRecorder
from runners.base import Notice, TokenDelta, ToolCall

__all__ = ["ChatConsumer", "finish_detached"]

log = logging.getLogger(__name__)


@dataclass
class Generation:
    task: asyncio.Task
    conversation_id: int | None


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
        self.attachments = Attachments(user, self.channel_name, self.send_frame)
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
                detach(task)
            await self._hold_credentials(tasks)
        else:
            for task in tasks:
                if not task.cancelling():
                    task.cancel()
            # Each task saves its partial answer as `stopped` before it ends.
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.attachments.close()
        for group in (self.documents_group, *self.credential_groups):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def _hold_credentials(self, tasks: list[asyncio.Task]) -> None:
        """The answers left running must not outlive the credential that
        started them: the process' answer hub listens for its end in this
        socket's place (accounts.revocation), and stops them at once if it
        ended before the hub was listening."""
        hub = answer_hub()
        running = [task for task in tasks if not task.done()]
        if not running:
            return
        for task in running:
            await hub.hold_credentials(task, self.credential_groups)
        if not await database_sync_to_async(credential_still_valid)(self.scope):
            hub.stop_tasks(running)

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
        reason = str(event.get("reason", ""))[:200]
        await self.send_frame(error_frame(None, ChatError("credential_ended", reason)))
        self.closed = True
        await self.close(code=CLOSE_UNAUTHENTICATED)

    # ---- incoming -----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        """Answer one client frame. Whatever it holds, the socket stays open:
        a frame we cannot act on gets an `error` frame, and so does a bug
        (`internal_error`, details only in the server log)."""
        request_id = None
        try:
            frame = decode(text_data)
            request_id = frame.request_id
            if isinstance(frame, Ping):
                await self.send_frame({"type": "pong", "request_id": request_id})
            elif isinstance(frame, Stop):
                await self.stop(request_id)
            elif isinstance(frame, ApproveFrame):
                await self.approve(frame)
            elif isinstance(frame, AttachFrame):
                await self.attach(frame)
            else:
                await self.start(frame)
        except ChatError as exc:
            await self.send_frame(error_frame(getattr(exc, "request_id", request_id), exc))
        except Exception as exc:
            log.exception("a chat frame could not be handled")
            error = websocket_error(exc, "The frame could not be handled.")
            await self.send_frame(error_frame(None, error))

    async def stop(self, request_id: str) -> None:
        generation = self.generations.get(request_id)
        if generation is None:
            if await self.attachments.stop(request_id):
                return
            raise ChatError("not_running", f"No answer is being generated for {request_id!r}.")
        generation.task.cancel()

    async def approve(self, frame: ApproveFrame) -> None:
        """Record the decision on a paused step; the turn (on whichever socket
        or process runs it) reads it from the database and goes on."""
        if not await database_sync_to_async(decide)(self.user, frame.step_id, frame.approved):
            raise ChatError(
                "not_found", f"Step {frame.step_id} of yours is not waiting for approval."
            )
        await self.send_frame(
            {
                "type": "approval",
                "request_id": frame.request_id,
                "step_id": frame.step_id,
                "approved": frame.approved,
            }
        )

    async def attach(self, frame: AttachFrame) -> None:
        """Follow one of the user's answers live (chat/live.py)."""
        self._check_new_request_id(frame.request_id)
        await self.attachments.attach(frame)

    def _check_new_request_id(self, request_id: str) -> None:
        if request_id in self.generations or request_id in self.attachments:
            raise ChatError("duplicate_request_id", f"Request {request_id!r} is already running.")

    async def start(self, frame: GenerateFrame) -> None:
        self._check_new_request_id(frame.request_id)
        if frame.conversation_id is not None and any(
            g.conversation_id == frame.conversation_id for g in self.generations.values()
        ):
            raise ChatError(
                "conversation_busy",
                "This conversation is still answering; stop it or wait for it to finish.",
                retryable=True,
            )
        images = tuple(frame.images)
        if images:
            images = await asyncio.to_thread(validate_images, images)
        user_id = self.user.pk
        decision = await services.allow_message(user_id)
        if not decision.allowed:
            message = (
                f"You can send {settings.CHAT_MESSAGES_PER_MINUTE} messages a minute; "
                f"try again in {decision.retry_after} s."
            )
            await self.send_frame(
                error_frame(frame.request_id, rate_limited(message, decision.retry_after))
            )
            return
        lease = await services.acquire_generation_slot(user_id)
        if lease is None:
            message = (
                f"You already have {settings.CHAT_MAX_CONCURRENT_PER_USER} answers "
                "being generated; stop one or wait for it to finish."
            )
            retry = services.SLOT_RETRY_AFTER_SECONDS
            await self.send_frame(error_frame(frame.request_id, rate_limited(message, retry)))
            return
        try:
            # The runner, then the user's budgets, before anything is saved: a
            # turn refused for its runner is not counted (services.admit_turn).
            await database_sync_to_async(services.admit_turn)(self.user, frame.runner)
        except (ChatError, quotas.QuotaExceeded) as exc:
            await lease.release()
            await self.send_frame(error_frame(frame.request_id, websocket_error(exc)))
            return
        outbox = FrameOutbox(self.send_frame, TOKEN_FRAME_INTERVAL_SECONDS)
        # The clock of the turn's timings starts at the frame's arrival.
        recorder = TurnRecorder()
        task = asyncio.create_task(self._generate(frame, images, outbox, recorder, lease))
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
                collection_ids=tuple(frame.collections) if frame.collections is not None else None,
                agent=frame.agent,
                project_id=frame.project_id,
            )
        if frame.type == "regenerate":
            return await database_sync_to_async(services.begin_regenerate)(
                self.user, conversation_id=frame.conversation_id, agent=frame.agent
            )
        return await database_sync_to_async(services.begin_edit)(
            self.user,
            conversation_id=frame.conversation_id,
            message_id=frame.message_id,
            text=frame.text,
            agent=frame.agent,
        )

    async def _generate(
        self,
        frame: GenerateFrame,
        images: tuple[str, ...],
        outbox: FrameOutbox,
        recorder: TurnRecorder,
        lease: SlotLease,
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
            await self._stream(frame, start, outbox, recorder, cancelled=cancelled)
        except ChatError as exc:  # refused by the chat service: nothing was saved
            outbox.put(error_frame(rid, exc))
        except Exception as exc:
            log.exception("chat request %s failed before streaming", rid)
            outbox.put(error_frame(rid, websocket_error(exc, "The message could not be saved.")))
        finally:
            self.generations.pop(rid, None)
            await lease.release()
            await outbox.close()

    async def _stream(
        self,
        frame: GenerateFrame,
        start: TurnStart,
        outbox: FrameOutbox,
        recorder: TurnRecorder,
        *,
        cancelled: bool,
    ) -> None:
        rid = frame.request_id
        message_id = start.assistant_message_id
        saver = streaming_saver()
        status = COMPLETE
        error: ChatError | None = None
        pinned = start.pinned_runner
        if frame.runner is not None:
            pinned = None if frame.runner == "auto" else frame.runner
        turn = TurnInput(
            user=self.user,
            messages=start.history,
            rag=start.rag if frame.rag is None else frame.rag,
            collection_ids=start.collection_ids,
            pinned_runner=pinned,
            # The frame's parameters win over the conversation's own (its project's).
            sampling=start.sampling() | sampling_of(frame.params),
            max_tokens=_first(frame.params.max_tokens, start.max_tokens),
            source="chat",
            message_id=message_id,
            request_id=rid,
            agent=start.agent,
            timezone=frame.timezone or "",
            api_key_id=self.scope.get("api_key_id"),
        )
        # The answer's frames go out numbered, and to its attached sockets too.
        live = LiveAnswer(message_id, outbox, recorder)
        hub = answer_hub()
        done = None
        try:
            await hub.add(live)
            if cancelled:
                raise asyncio.CancelledError
            async for event in run_turn(turn):
                recorder.take(event)
                out = _frame_of(rid, event)
                if out is not None:
                    live.put(out)
                if isinstance(event, TokenDelta) and event.text:
                    # The list itself: the saver joins it when it writes.
                    saver.mark(message_id, recorder.parts)
        except asyncio.CancelledError:
            _uncancel()
            status = STOPPED
        except Exception as exc:
            if not isinstance(exc, tuple(TURN_ERRORS)):  # a bug
                log.exception("chat request %s failed while streaming", rid)
            status = FAILED
            error = websocket_error(exc, "Something went wrong while answering.")

        try:
            live.flush()  # the last tokens go out before the final save
            outcome = recorder.outcome(status, error)
            # A periodic save of this answer must not land after the final one.
            await saver.forget(message_id)
            try:
                # database_sync_to_async closes stale connections in the thread
                # itself, before and after: no hop of its own for that.
                cost = await database_sync_to_async(services.finish_message)(message_id, outcome)
                outcome = replace(outcome, cost=cost)
            except Exception:
                log.exception("could not save the answer of chat request %s", rid)
            if error is not None:
                live.put(error_frame(rid, error))
            done = done_frame(rid, start.conversation_id, message_id, outcome)
            live.put(done)
        finally:
            # After the final save: an attacher told the answer ended reads it.
            hub.finish(live, done)

    # ---- sending --------------------------------------------------------------------

    async def send_frame(self, frame: dict) -> None:
        if self.closed:
            return
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def answer_frame(self, event: dict) -> None:
        """A channel-layer message: a frame of an answer this socket attached to."""
        await self.attachments.frame(event)

    async def answer_gone(self, event: dict) -> None:
        """A channel-layer message: the answer asked for is not running there."""
        await self.attachments.gone(event)

    async def document_status(self, event: dict) -> None:
        """A channel-layer message from RAG ingestion: forwarded as a frame."""
        payload = {k: v for k, v in event.items() if k != "type"}
        await self.send_frame({"type": "document_status", "request_id": None, **payload})


# ---- helpers ------------------------------------------------------------------------


def _frame_of(request_id: str, event) -> dict | None:
    """The frame an event of the turn becomes (None: nothing to send)."""
    if isinstance(event, TokenDelta):
        return (
            {"type": "token", "request_id": request_id, "text": event.text} if event.text else None
        )
    if isinstance(event, Routed):
        return {
            "type": "routed",
            "request_id": request_id,
            "runner": event.runner_name,
            "model": event.model_id,
            "fallback": event.fallback,
            "attempts": list(event.attempts),
        }
    if isinstance(event, Sources):
        return {
            "type": "sources",
            "request_id": request_id,
            "sources": [dict(s) for s in event.sources],
        }
    if isinstance(event, Notice):
        return {
            "type": "notice",
            "request_id": request_id,
            "code": event.code,
            "message": event.message,
            "data": event.data,
        }
    if isinstance(event, ToolCall):
        return _tool_call_frame(request_id, event.id, event.name, event.arguments)
    if isinstance(event, StepStarted):
        step = event.step
        frame = _tool_call_frame(request_id, step.call_id, step.name, step.arguments)
        return {**frame, "step_id": step.id, "round": step.round}
    if isinstance(event, ApprovalRequested):
        step = event.step
        return {
            "type": "approval_request",
            "request_id": request_id,
            "step_id": step.id,
            "id": step.call_id,
            "name": step.name,
            "arguments": step.arguments,
            "timeout_s": event.timeout_seconds,
        }
    if isinstance(event, StepFinished):
        return {"type": "tool_result", "request_id": request_id, **event.step.as_dict()}
    return None


def _tool_call_frame(request_id: str, call_id: str, name: str, arguments) -> dict:
    """A `tool_call` frame: the model asked for a tool (a runner's call or an agent's step)."""
    return {
        "type": "tool_call",
        "request_id": request_id,
        "id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _uncancel() -> None:
    # We handle the cancellation ourselves (save, report); later awaits must run.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _first(*values):
    """The first value that is not None (a frame's parameter, else the conversation's)."""
    return next((v for v in values if v is not None), None)
