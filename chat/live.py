"""Live answers: following an answer while it is being generated, from any
socket of its owner, whichever server process generates it (docs/websocket.md,
*Attaching to an answer*; why it is built this way: docs/architecture.md,
*Live re-attach*).

Where the answer is generated:

- `LiveAnswer` stands between the generation and its socket's outbox. It
  numbers the token frames (`seq`: the answer's length in characters once the
  frame's text is appended, like a TCP sequence number) and, once somebody
  has attached, also publishes every frame to the channel-layer group of the
  answer's watchers through a second coalescing `FrameOutbox`. Until then a
  token costs one addition.
- `AnswerHub`, one per server process, owns a channel that is the one member
  of the group `chat.answer.<message id>` of every answer generated here, and
  serves the attachers' requests: `snapshot` (publish the text so far, then
  every frame) and `stop`. It lives apart from the sockets because the answers
  most worth re-attaching to are those whose socket has closed (chat/saver.py,
  *detached answers*).

Where a socket attaches (`Attachments`, one per socket):

1. the answer is looked up (the owner's only); one that has ended is sent at
   once as `sync` (its saved text) and `done`;
2. the socket joins `chat.watch.<message id>`, then asks the hub for a
   snapshot. Frames published before the snapshot are dropped; the snapshot
   becomes the `sync` frame and what follows goes out live. The snapshot
   travels through the same outbox as the frames, so nothing overtakes it and
   what follows continues it exactly;
3. every token frame must continue the last one (its `seq` minus its length
   is the previous `seq`). One that does not (a channel layer drops messages
   to a full channel) asks for a new snapshot, whose `sync` carries what was
   missed;
4. no hub answers within SNAPSHOT_TIMEOUT_SECONDS, or it says the answer is
   not running there: the saved message decides. Ended: `sync` and `done`.
   Still `streaming` (its process died, or is too busy to answer yet): a
   `sync` of the saved text with `live: false`, and the request is repeated
   every SNAPSHOT_TIMEOUT_SECONDS; a snapshot arriving later takes over, and
   an answer a dead process left is settled as `stopped` after
   `services.STALE_STREAMING_SECONDS`, which ends the attachment with `done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from accounts.revocation import MESSAGE_TYPE as CREDENTIAL_ENDED
from chat import limits, services
from chat.errors import ChatError, error_frame, rate_limited
from chat.frames import AttachFrame
from chat.models import Message
from chat.outbox import TOKEN_FRAME_INTERVAL_SECONDS, FrameOutbox, done_frame

log = logging.getLogger(__name__)

# How long an attacher waits for the generating process to answer before the
# saved message speaks for the answer (and between repeated requests).
SNAPSHOT_TIMEOUT_SECONDS = 3.0


def answer_group(message_id: int) -> str:
    """The group of the hub whose process generates the answer."""
    return f"chat.answer.{message_id}"


def watch_group(message_id: int) -> str:
    """The group of the sockets attached to the answer."""
    return f"chat.watch.{message_id}"


# ---- where the answer is generated -----------------------------------------------------


class LiveAnswer:
    """One answer being generated here, as its socket and its watchers see it.

    `put` replaces the socket outbox's `put` for the answer's frames."""

    def __init__(self, message_id: int, outbox: FrameOutbox, recorder: Any) -> None:
        self.message_id = message_id
        self.seq = 0
        self.ended = False
        self._outbox = outbox
        self._recorder = recorder  # chat.turns.TurnRecorder: the text and routing so far
        self._task = asyncio.current_task()
        self._watched: FrameOutbox | None = None

    def put(self, frame: dict) -> None:
        if frame["type"] == "token":
            self.seq += len(frame["text"])
            frame["seq"] = self.seq
        elif frame["type"] == "done":
            self.ended = True
        self._outbox.put(frame)
        if self._watched is not None:
            self._watched.put(frame)

    def flush(self) -> None:
        """Send the pending tokens now (the answer ended)."""
        self._outbox.flush()
        if self._watched is not None:
            self._watched.flush()

    def snapshot(self) -> None:
        """Somebody is attaching: publish the answer so far, and from now on
        every frame, to the watchers (coalesced like the socket's frames)."""
        if self._watched is None:
            self._watched = FrameOutbox(self._publish, TOKEN_FRAME_INTERVAL_SECONDS)
        recorder = self._recorder
        self._watched.put(
            {
                "type": "snapshot",
                "text": recorder.content,
                "seq": self.seq,
                "runner": recorder.runner_name,
                "model": recorder.model_id,
                "fallback": recorder.fallback,
                "sources": recorder.sources,
            }
        )

    def stop(self) -> None:
        """An attached socket sent `stop`: the same as the owner's `stop`."""
        if not self.ended and self._task is not None:
            self._task.cancel()

    async def close(self, done: dict | None) -> None:
        """The answer ended with `done` (None: it could not say how)."""
        if self._watched is not None:
            await self._watched.close()
        elif done is not None:
            # Nobody asked for a snapshot, but a socket may be attaching right
            # now (it joined the watchers and read `streaming` before the final
            # save): `done` tells it to read the saved answer instead of waiting.
            with contextlib.suppress(Exception):
                await self._publish(done)

    async def _publish(self, frame: dict) -> None:
        await get_channel_layer().group_send(
            watch_group(self.message_id),
            {"type": "answer.frame", "message_id": self.message_id, "frame": frame},
        )


class AnswerHub:
    """The answers generated in this process, reachable from any process.

    It also stands in for the sockets of answers that outlived them
    (`hold_credentials`): a closed socket no longer hears that its key was
    revoked or its session logged out (accounts/revocation.py), so the hub
    joins those credential groups for the answers it left behind and stops
    them (saved as `stopped`) when the credential ends."""

    def __init__(self) -> None:
        self._answers: dict[int, LiveAnswer] = {}
        self._channel: str | None = None
        self._serving: asyncio.Task | None = None
        self._finishing: set[asyncio.Task] = set()
        # Detached generations -> the credential groups of the socket that started them.
        self._held: dict[asyncio.Task, tuple[str, ...]] = {}
        self._members: dict[str, int] = {}  # credential group -> how many held tasks

    async def _channel_of(self, layer) -> str:
        if self._channel is None:
            self._channel = await layer.new_channel()
            self._serving = asyncio.get_running_loop().create_task(self._serve(layer))
        return self._channel

    async def add(self, answer: LiveAnswer) -> None:
        layer = get_channel_layer()
        channel = await self._channel_of(layer)
        self._answers[answer.message_id] = answer
        await layer.group_add(answer_group(answer.message_id), channel)

    async def hold_credentials(self, task: asyncio.Task, groups: list[str]) -> None:
        """`task` is a generation whose socket closed, started with the
        credential of `groups` (accounts.revocation.groups_for): stop it when
        that credential ends, from any process. The caller then checks the
        credential (it may have ended before the hub joined the groups) and
        calls `stop_tasks` if it did."""
        if task.done() or task in self._held or not groups:
            return
        layer = get_channel_layer()
        channel = await self._channel_of(layer)
        self._held[task] = tuple(groups)
        task.add_done_callback(self._forget_held)
        for group in groups:
            self._members[group] = self._members.get(group, 0) + 1
            if self._members[group] == 1:
                await layer.group_add(group, channel)

    def stop_held(self, group: str) -> int:
        """Stop the held generations started with the credential of `group`;
        how many."""
        return self.stop_tasks([task for task, groups in self._held.items() if group in groups])

    def stop_tasks(self, tasks: list[asyncio.Task]) -> int:
        """Stop these held generations, each at most once (a second cancel
        could cut short its final save); how many."""
        stopped = 0
        for task in tasks:
            if task not in self._held:
                continue
            self._forget_held(task)
            if not task.done():
                task.cancel()
                stopped += 1
        return stopped

    def _forget_held(self, task: asyncio.Task) -> None:
        groups = self._held.pop(task, ())
        left = []
        for group in groups:
            self._members[group] -= 1
            if self._members[group] == 0:
                del self._members[group]
                left.append(group)
        if left and self._channel is not None:
            leaving = asyncio.get_running_loop().create_task(self._leave_groups(left))
            self._finishing.add(leaving)
            leaving.add_done_callback(self._finishing.discard)

    async def _leave_groups(self, groups: list[str]) -> None:
        layer = get_channel_layer()
        for group in groups:
            if group in self._members:  # held again meanwhile
                continue
            with contextlib.suppress(Exception):
                await layer.group_discard(group, self._channel)

    def finish(self, answer: LiveAnswer, done: dict | None) -> None:
        """The answer ended (its final state is saved): forget it, and tell the
        watchers in the background. It returns at once: the socket's next
        question must find the answer over, not wait on the channel layer."""
        self._answers.pop(answer.message_id, None)
        task = asyncio.get_running_loop().create_task(self._finish(answer, done))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, answer: LiveAnswer, done: dict | None) -> None:
        try:
            await answer.close(done)
        except Exception:
            log.exception("could not tell the watchers of answer %s", answer.message_id)
        finally:
            with contextlib.suppress(Exception):
                await get_channel_layer().group_discard(
                    answer_group(answer.message_id), self._channel
                )

    async def _serve(self, layer) -> None:
        while True:
            try:
                message = await layer.receive(self._channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. Redis restarting: keep serving once it is back
                log.exception("the answer hub could not read its channel")
                await asyncio.sleep(1)
                continue
            try:
                await self._handle(layer, message)
            except Exception:
                log.exception("the answer hub could not handle %r", message.get("type"))

    async def _handle(self, layer, message: dict) -> None:
        message_id = message.get("message_id")
        answer = self._answers.get(message_id)
        if message["type"] == "answer.snapshot":
            if answer is None or answer.ended:
                # Its final state is saved: the attacher reads it.
                await layer.send(
                    message["reply_to"], {"type": "answer.gone", "message_id": message_id}
                )
            else:
                answer.snapshot()
        elif message["type"] == "answer.stop" and answer is not None:
            answer.stop()
        elif message["type"] == CREDENTIAL_ENDED and message.get("group"):
            stopped = self.stop_held(message["group"])
            if stopped:
                log.info("stopped %d detached answers: their credential ended", stopped)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AnswerHub] = weakref.WeakKeyDictionary()


def answer_hub() -> AnswerHub:
    """The hub of the running event loop (one per server process)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = AnswerHub()
    return hub


# ---- where a socket attaches ------------------------------------------------------------

PENDING, LIVE, ENDED = "pending", "live", "ended"


@dataclass
class Attachment:
    request_id: str
    message_id: int
    conversation_id: int
    seq: int  # where the client's text of the answer ends
    state: str = PENDING
    told_saved: bool = False  # a `sync` of the saved text went out (`live: false`)
    timer: asyncio.TimerHandle | None = None


class Attachments:
    """The answers one socket follows (see the module docstring)."""

    def __init__(self, user, channel: str, send: Callable[[dict], Awaitable[None]]) -> None:
        self._user = user
        self._channel = channel
        self._send = send
        self._by_request: dict[str, Attachment] = {}
        self._tasks: set[asyncio.Task] = set()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_request

    async def attach(self, frame: AttachFrame) -> None:
        """Answer an `attach` frame. Raises ChatError (not_found, rate_limited)."""
        if len(self._by_request) >= limits.MAX_ATTACHED_PER_SOCKET:
            raise rate_limited(
                f"This connection follows {limits.MAX_ATTACHED_PER_SOCKET} answers already; "
                "wait for one to end.",
                services.SLOT_RETRY_AFTER_SECONDS,
            )
        answer = await self._saved(frame.conversation_id, frame.message_id)
        attachment = Attachment(
            frame.request_id, answer.pk, answer.conversation_id, seq=frame.last_seq
        )
        if answer.status != Message.Status.STREAMING:
            await self._send_saved(attachment, answer)
            return
        layer = get_channel_layer()
        await layer.group_add(watch_group(answer.pk), self._channel)
        # Read it again now that this socket hears the answer's `done`: one that
        # ended in between published its `done` before we could hear it.
        try:
            answer = await self._saved(None, answer.pk)
        except ChatError:  # deleted in between
            await self._leave(attachment.message_id)
            raise
        if answer.status != Message.Status.STREAMING:
            await self._leave(answer.pk)
            await self._send_saved(attachment, answer)
            return
        self._by_request[attachment.request_id] = attachment
        await self._ask_snapshot(attachment)

    async def stop(self, request_id: str) -> bool:
        """`stop` for an attach request: stop the answer, wherever it runs."""
        attachment = self._by_request.get(request_id)
        if attachment is None:
            return False
        await get_channel_layer().group_send(
            answer_group(attachment.message_id),
            {"type": "answer.stop", "message_id": attachment.message_id},
        )
        return True

    async def close(self) -> None:
        """The socket closed."""
        message_ids = {a.message_id for a in self._by_request.values()}
        for attachment in list(self._by_request.values()):
            self._end(attachment)
        for task in self._tasks:
            task.cancel()
        for message_id in message_ids:
            with contextlib.suppress(Exception):
                await get_channel_layer().group_discard(watch_group(message_id), self._channel)

    # ---- channel-layer messages (through the consumer) -------------------------------

    async def frame(self, event: dict) -> None:
        """A frame the generating process published for the answer's watchers."""
        frame = event["frame"]
        for attachment in self._following(event["message_id"]):
            await self._take(attachment, frame)

    async def gone(self, event: dict) -> None:
        """The hub of the answer's process says it has ended."""
        for attachment in self._following(event["message_id"]):
            await self._from_saved(attachment)

    # ---- one attachment ------------------------------------------------------------------

    async def _take(self, a: Attachment, frame: dict) -> None:
        kind = frame["type"]
        if a.state == PENDING:
            if kind == "snapshot":
                await self._sync(a, frame)
            elif kind == "done":
                await self._from_saved(a, done=frame)
            return  # anything else is in the snapshot still to come
        if a.state != LIVE or kind == "snapshot":
            return  # a snapshot another socket asked for
        if kind == "token":
            start = frame["seq"] - len(frame["text"])
            if start > a.seq:  # a frame was lost on the way: catch up from a snapshot
                a.state = PENDING
                await self._ask_snapshot(a)
                return
            if frame["seq"] <= a.seq:
                return
            frame = {**frame, "text": frame["text"][a.seq - start :]}
            a.seq = frame["seq"]
        await self._send({**frame, "request_id": a.request_id})
        if kind == "done":
            self._end(a)
            await self._leave(a.message_id)

    async def _sync(self, a: Attachment, snapshot: dict) -> None:
        if a.timer is not None:
            a.timer.cancel()
        a.state = LIVE
        await self._send(
            self._sync_frame(
                a,
                snapshot["text"],
                status=Message.Status.STREAMING,
                live=True,
                runner=snapshot["runner"],
                model=snapshot["model"],
                fallback=snapshot["fallback"],
                sources=snapshot["sources"],
            )
        )

    def _sync_frame(self, a: Attachment, text: str, **fields) -> dict:
        """`sync`: the answer's text after the client's `seq` (all of it when
        the client claims more than there is), and where it now ends."""
        since = a.seq if a.seq <= len(text) else 0
        a.seq = len(text)
        return {
            "type": "sync",
            "request_id": a.request_id,
            "conversation_id": a.conversation_id,
            "message_id": a.message_id,
            "text": text[since:],
            "since": since,
            "seq": a.seq,
            **fields,
        }

    async def _ask_snapshot(self, a: Attachment) -> None:
        if a.timer is not None:
            a.timer.cancel()
        a.timer = asyncio.get_running_loop().call_later(
            SNAPSHOT_TIMEOUT_SECONDS, self._timed_out, a
        )
        await get_channel_layer().group_send(
            answer_group(a.message_id),
            {"type": "answer.snapshot", "message_id": a.message_id, "reply_to": self._channel},
        )

    def _timed_out(self, a: Attachment) -> None:
        a.timer = None
        task = asyncio.get_running_loop().create_task(self._from_saved(a))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _from_saved(self, a: Attachment, done: dict | None = None) -> None:
        """No live snapshot (yet): the saved message speaks for the answer."""
        if a.state != PENDING:
            return
        try:
            answer = await self._saved(None, a.message_id)
        except ChatError:  # deleted meanwhile
            answer = None
        if a.state != PENDING:  # a snapshot or another reading came first
            return
        if answer is None:
            self._end(a)
            await self._leave(a.message_id)
            await self._send(
                error_frame(a.request_id, ChatError("not_found", "The answer was deleted."))
            )
            return
        if done is None and answer.status == Message.Status.STREAMING:
            # Not running anywhere we can hear, or too busy to answer yet.
            if not a.told_saved or len(answer.content) > a.seq:
                a.told_saved = True
                await self._send(self._saved_sync(a, answer))
            await self._ask_snapshot(a)
            return
        self._end(a)
        await self._leave(a.message_id)
        await self._send_saved(a, answer, done)

    async def _send_saved(self, a: Attachment, answer: Message, done: dict | None = None) -> None:
        """An answer that has ended: its saved text, then `done`."""
        await self._send(self._saved_sync(a, answer))
        if done is not None:
            await self._send({**done, "request_id": a.request_id})
        else:
            await self._send(done_frame(a.request_id, a.conversation_id, a.message_id, answer))

    def _saved_sync(self, a: Attachment, answer: Message) -> dict:
        return self._sync_frame(
            a,
            answer.content,
            status=answer.status,
            live=False,
            runner=answer.runner_name,
            model=answer.model_id,
            fallback=answer.fallback,
            sources=answer.sources,
        )

    def _following(self, message_id: int) -> list[Attachment]:
        return [a for a in self._by_request.values() if a.message_id == message_id]

    def _end(self, a: Attachment) -> None:
        a.state = ENDED
        if a.timer is not None:
            a.timer.cancel()
        self._by_request.pop(a.request_id, None)

    async def _leave(self, message_id: int) -> None:
        if not self._following(message_id):
            await get_channel_layer().group_discard(watch_group(message_id), self._channel)

    async def _saved(self, conversation_id: int | None, message_id: int | None) -> Message:
        return await database_sync_to_async(services.answer_to_attach)(
            self._user, conversation_id=conversation_id, message_id=message_id
        )
